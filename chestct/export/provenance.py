"""Where an export came from: the git commit its run started from, and the registry version that commit carries.

The export stage records both in metadata.json (`source`), so a model fetched from the registry, or found on a
server, names the code and params that produced it. The version is a GTO registration tag (`chestct@v1.2.0`, see
docs/registry.md) on that commit. A first export is committed, then registered, so its commit carries no tag
yet when the stage runs and the version is null; it is recorded when the export is reproduced from a registered
commit (CI rebuilding a release). `gto check-ref <revision>` answers which version a recorded revision became.
Outside a git repository (or without git) both are null.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ARTIFACT_NAME = "chestct"  # the model's name in dvc.yaml `artifacts:` and in its GTO tags

_GIT_TIMEOUT_S = 30


def git_output(arguments: list[str], cwd: Path) -> str | None:
    """stdout of a git command, or None when git is missing, the folder is not a repository, or git fails."""
    try:
        result = subprocess.run(["git", *arguments], cwd=cwd, capture_output=True, text=True,
                                timeout=_GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def git_revision(cwd: Path) -> str | None:
    """The full sha of HEAD; None outside a git repository or before its first commit."""
    return git_output(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], cwd)


def registered_version(tag_names: list[str], name: str = ARTIFACT_NAME) -> str | None:
    """The version GTO registered for `name` among these tag names (the greatest, should there be several); a
    version deregistered by a later tag (`chestct@v1.0.0!`), stage assignments and other artifacts' tags do not
    count."""
    from gto.constants import VERSION, Action
    from gto.tag import parse_name
    from gto.versions import SemVer

    registered, deregistered = set(), set()
    for tag in tag_names:
        parsed = parse_name(tag, raise_on_fail=False)
        if parsed.get("name") == name and parsed.get("action") in (Action.REGISTER, Action.DEREGISTER):
            (registered if parsed["action"] == Action.REGISTER else deregistered).add(parsed[VERSION])
    versions = registered - deregistered
    return max(versions, key=SemVer) if versions else None


def export_source(cwd: Path = Path(".")) -> dict[str, str | None]:
    """{"git_revision", "artifact_version"} of the repository at `cwd` (the export stage's working directory)."""
    revision = git_revision(cwd)
    if revision is None:
        return {"git_revision": None, "artifact_version": None}
    tags = git_output(["tag", "--points-at", revision], cwd) or ""
    return {"git_revision": revision, "artifact_version": registered_version(tags.splitlines())}
