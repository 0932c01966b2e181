"""Write outputs completely or not at all.

Each writer produces a temporary sibling and renames it into place only when it finished, so an interrupted or
failed stage never leaves a half-written file or folder that a later stage might read.

A writer killed outright (SIGKILL, OOM killer, power loss) cannot remove its temporary sibling, so each write first
removes the temporaries of the same target whose writer is gone. "Gone" is decided by a lock, not by a process id:
each temporary folder holds a lock file its writer keeps locked (flock) while it runs, and the kernel releases that
lock when the writer dies however it dies. A pid recorded in the name would be wrong in both directions once
containers share a folder (each container numbers its processes from 1, so a live writer in one looks dead from
another, and a dead writer's pid is reused by the next run), and an age threshold would delete the temporary of a
slow live writer. Locks are shared across containers on one host and, through NFS byte-range locks, across hosts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_TEMP_SUFFIX = ".tmp"
OWNER_LOCK = ".owner.lock"
# A temporary folder without a lock file was left by a version before the lock, or by a writer killed in the
# microseconds between creating the folder and locking (a live writer creates both at once): removed once older
# than this, so a folder that is just being created is never taken.
UNLOCKED_GRACE_S = 60.0
_NO_LOCK_SUPPORT = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # some FUSE and network filesystems


def _temp_name_pattern(target_name: str) -> re.Pattern[str]:
    """`.{name}.{random}.tmp` exactly: tempfile's random part has no dot, so the temporaries of a target named
    `{name}.json` (`.{name}.json.{random}.tmp`) never match."""
    return re.compile(rf"\.{re.escape(target_name)}\.[^.]+{re.escape(_TEMP_SUFFIX)}")


def _owner_is_gone(temp_dir: Path, now: float) -> bool:
    """Whether the writer of `temp_dir` no longer runs: its lock file can be locked (or it has none and is old)."""
    try:
        fd = os.open(temp_dir / OWNER_LOCK, os.O_RDWR)  # read-write: NFS grants exclusive locks only to writers
    except FileNotFoundError:
        try:
            return now - temp_dir.stat().st_mtime > UNLOCKED_GRACE_S
        except FileNotFoundError:  # its writer finished meanwhile
            return False
    except OSError:  # not ours to judge (permissions): leave it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by its live writer, or a filesystem without locks: either way not provably stale
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_temps(target: str | Path) -> list[Path]:
    """Remove the temporary siblings of `target` left by writers that are gone; returns what was removed."""
    target = Path(target)
    pattern = _temp_name_pattern(target.name)
    try:
        candidates = [entry for entry in target.parent.iterdir() if pattern.fullmatch(entry.name)]
    except FileNotFoundError:
        return []
    removed = []
    now = time.time()
    for candidate in sorted(candidates):
        if candidate.is_symlink() or not candidate.is_dir() or not _owner_is_gone(candidate, now):
            continue
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
        log.info("removed %s, the temporary output of an earlier writer of %s that was killed", candidate.name,
                 target.name)
    return removed


def _make_owned_temp_dir(target: Path) -> tuple[Path, int]:
    """A new temporary folder beside `target` holding OWNER_LOCK, locked by this process; returns it and the fd.

    The lock file is created and locked under another name and only then renamed to OWNER_LOCK, so another
    writer's cleanup never finds OWNER_LOCK unlocked while this writer runs.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_TEMP_SUFFIX, dir=target.parent))
    partial = temp_dir / (OWNER_LOCK + ".partial")
    fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file nobody else knows yet: never blocks
    except OSError as exc:
        if exc.errno not in _NO_LOCK_SUPPORT:
            os.close(fd)
            raise
        # Without locks no cleanup can lock OWNER_LOCK either, so this folder is never taken for stale.
    os.replace(partial, temp_dir / OWNER_LOCK)
    return temp_dir, fd


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `target` (a file or a folder); move it onto `target` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    temp_dir, lock_fd = _make_owned_temp_dir(target)
    temp_target = temp_dir / target.name
    try:
        yield temp_target
        if not temp_target.exists():
            raise RuntimeError(f"nothing was written for {target}")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(temp_target, target)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        os.close(lock_fd)  # after the removal: the folder is never unlocked while it exists


def write_json(path: str | Path, payload: object) -> None:
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)
