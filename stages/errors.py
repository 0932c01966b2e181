"""Turn the library's user-facing errors into one clear message and exit code 1, instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from chestct.errors import ChestctError


def run_stage(name: str, main: Callable[[], None]) -> None:
    try:
        main()
    except ChestctError as exc:
        print(f"\n{name} failed: {exc}", file=sys.stderr)
        sys.exit(1)
