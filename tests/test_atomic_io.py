"""atomic_io: outputs appear whole or not at all, and the temporaries of killed writers are removed by the next write.

The writers here are real processes: one killed with SIGKILL in the middle of its write (it cannot clean up), one
alive and still writing the same target while the next write runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chestct.atomic_io import OWNER_LOCK, UNLOCKED_GRACE_S, atomic_path, remove_stale_temps, write_text
from tests.conftest import PROJECT_ROOT

# Writes a folder target half-way, says "ready", then waits for a line on stdin before it finishes.
_WRITER = """
import sys
from pathlib import Path
from chestct.atomic_io import atomic_path

with atomic_path(Path(sys.argv[1])) as temp:
    temp.mkdir()
    (temp / "part.txt").write_text(sys.argv[2])
    print(temp.parent.name, flush=True)
    sys.stdin.readline()
"""


def _start_writer(target: Path, content: str) -> tuple[subprocess.Popen, Path]:
    """A writer process holding its temporary of `target`; returns it and that temporary folder."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), content], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env)
    temp_name = process.stdout.readline().strip()
    assert temp_name, f"the writer of {target} did not start"
    return process, target.parent / temp_name


def _temps(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir() if entry.name.endswith(".tmp")}


def test_a_killed_writers_temporary_is_removed_and_a_live_writers_is_not(tmp_path):
    target = tmp_path / "processed"
    killed, killed_temp = _start_writer(target, "killed")
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert (killed_temp / "processed" / "part.txt").exists()  # what SIGKILL leaves behind
    live, live_temp = _start_writer(target, "live")
    try:
        with atomic_path(target) as temp:
            temp.mkdir()
            (temp / "part.txt").write_text("next run")
        assert not killed_temp.exists()
        assert (live_temp / "processed" / "part.txt").read_text() == "live"  # untouched while its writer runs
        assert (target / "part.txt").read_text() == "next run"
        live.communicate("finish\n", timeout=30)
    finally:
        live.kill()
    assert live.returncode == 0
    assert (target / "part.txt").read_text() == "live"  # the concurrent writer still completed its write
    assert _temps(tmp_path) == set()


def test_only_temporaries_of_the_same_target_are_considered(tmp_path):
    neighbour = tmp_path / ".data.json.abc123xy.tmp"  # a temporary of "data.json", not of "data"
    neighbour.mkdir()
    (neighbour / OWNER_LOCK).touch()  # its lock is free: stale, but not for "data" to remove
    own = tmp_path / ".data.abc123xy.tmp"
    own.mkdir()
    (own / OWNER_LOCK).touch()
    write_text(tmp_path / "data", "x")
    assert _temps(tmp_path) == {neighbour.name}
    assert (tmp_path / "data").read_text() == "x"


def test_an_unlocked_temporary_from_an_older_version_is_removed_once_it_is_old(tmp_path):
    target = tmp_path / "split.csv"
    old, young = tmp_path / ".split.csv.oldoldol.tmp", tmp_path / ".split.csv.youngyou.tmp"
    for folder in (old, young):
        folder.mkdir()
        (folder / "split.csv").write_text("half")
    stamp = time.time() - UNLOCKED_GRACE_S - 10
    os.utime(old, (stamp, stamp))
    assert remove_stale_temps(target) == [old]
    assert young.exists()  # might be a writer in the instant between creating its folder and locking it


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "old")
    with pytest.raises(ValueError), atomic_path(target) as temp:
        temp.write_text("half")
        raise ValueError("the stage failed")
    assert target.read_text() == "old"
    assert _temps(tmp_path) == set()
    with pytest.raises(RuntimeError, match="nothing was written"), atomic_path(target):
        pass
    assert target.read_text() == "old"
