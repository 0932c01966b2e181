"""Benchmark results as files: each benchmark that feeds a documentation table writes one JSON under docs/results/.

    write_result("epoch_time", figures={...}, tables={...})

The file records how the figures were made (the command line, the commit and whether the tree had uncommitted
changes, the CPU and its core count, the date) beside the figures, so the documentation page that renders a table
from it can say which commit and machine the table came from, and re-running the benchmark refreshes the table.
Written atomically: a benchmark interrupted half-way leaves the previous file whole.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

from chestct.atomic_io import write_json
from chestct.export.provenance import git_output, git_revision

RESULTS_DIR = Path(__file__).resolve().parent.parent / "docs" / "results"
SCHEMA_VERSION = 1


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_features() -> list[str]:
    """The instruction-set extensions that change this project's CPU timings (oneDNN's kernels, bfloat16)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"})


def provenance(command: list[str] | None = None) -> dict:
    """How and where a result was made: command, commit (with `dirty` when the tree had changes), CPU, date."""
    root = RESULTS_DIR.parent.parent
    status = git_output(["status", "--porcelain", "--untracked-files=no"], root)
    return {
        "command": "python -m " + _module_name() + " " + shlex.join(command if command is not None else sys.argv[1:]),
        "commit": git_revision(root),
        "dirty": bool(status) if status is not None else None,
        "cpu": cpu_name(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None and spec.name else Path(sys.argv[0]).stem


def write_result(name: str, figures: dict, *, command: list[str] | None = None,
                 directory: Path = RESULTS_DIR) -> Path:
    """Write docs/results/<name>.json: {"schema_version", "provenance", "figures"}; returns its path."""
    path = Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"schema_version": SCHEMA_VERSION, "provenance": provenance(command),
                             "figures": figures})
    return path
