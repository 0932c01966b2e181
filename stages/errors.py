"""Turn the library's user-facing errors into one clear line and exit code 1, instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from chestct.dataset import DatasetError
from chestct.imaging import ImageDecodeError
from chestct.labels import UnknownClassFolderError
from chestct.params import ParamsError
from chestct.sources import SourceError

USER_ERRORS = (ParamsError, SourceError, DatasetError, UnknownClassFolderError, ImageDecodeError)


def run_stage(name: str, main: Callable[[], None]) -> None:
    try:
        main()
    except USER_ERRORS as exc:
        print(f"\n{name} failed: {exc}", file=sys.stderr)
        sys.exit(1)
