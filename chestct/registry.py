"""The model registry: fetch the export of a registered version or stage, by name, into a local cache folder.

Versions and stages are GTO git tags (`chestct@v1.2.0`, `chestct#prod#1`; docs/registry.md); the files
come from the DVC remote of the repository that holds the tags, the way `dvc artifacts get` fetches them. A
reference names the artifact declared in dvc.yaml `artifacts:` and, optionally, what to take of it:

    chestct            the greatest registered version
    chestct@v1.2.0     that version
    chestct@latest     the greatest registered version
    chestct#prod       the version now in stage prod (GTO's spelling)
    chestct@prod       the same, for readers used to NAME@TAG

A fetched export is kept under the cache folder by artifact name and git commit, so serving the same version
again reads no remote, and a stage that moves to another version gets a folder of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from chestct.atomic_io import atomic_path
from chestct.errors import ChestctError
from chestct.export.metadata import METADATA_FILE

CACHE_ENV = "CHESTCT_ARTIFACT_CACHE"
_LATEST = ("latest", "greatest")  # GTO's words for the greatest registered version


class RegistryError(ChestctError, RuntimeError):
    """The reference cannot be parsed, names nothing registered, or its files cannot be fetched."""


@dataclass(frozen=True)
class ArtifactReference:
    name: str
    version: str | None = None  # "v1.2.0"
    stage: str | None = None  # "prod"

    def describe(self) -> str:
        if self.stage:
            return f"{self.name} in stage {self.stage}"
        return f"{self.name} {self.version}" if self.version else f"the greatest version of {self.name}"


def parse_reference(text: str) -> ArtifactReference:
    """'chestct@v1.2.0' / 'chestct#prod' / 'chestct@prod' / 'chestct' -> ArtifactReference; RegistryError
    saying what is accepted otherwise."""
    from gto.constants import check_string_is_valid
    from gto.versions import SemVer

    name, separator, what = text.partition("#") if "#" in text else text.partition("@")
    usage = "write NAME, NAME@vX.Y.Z, NAME#STAGE or NAME@STAGE, e.g. chestct@v1.0.0 or chestct#prod"
    if not check_string_is_valid(name):
        raise RegistryError(f"--artifact {text!r} is not an artifact reference: {usage}")
    if not separator or what in _LATEST:
        return ArtifactReference(name)
    if separator == "@" and SemVer.is_valid(what):
        return ArtifactReference(name, version=what)
    if separator == "@" and what[:1] == "v" and what[1:2].isdigit():  # meant as a version, but not semver
        raise RegistryError(f"--artifact {text!r}: {what!r} is not a GTO version (vMAJOR.MINOR.PATCH); {usage}")
    if not check_string_is_valid(what):  # GTO's rule for stage names is its rule for artifact names
        raise RegistryError(f"--artifact {text!r} is not an artifact reference: {usage}")
    return ArtifactReference(name, stage=what)


def default_cache_dir() -> Path:
    """$CHESTCT_ARTIFACT_CACHE, else chestct/artifacts under $XDG_CACHE_HOME (~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chestct" / "artifacts"


def locate(reference: ArtifactReference, repo: str) -> tuple[str, str]:
    """(git commit, path in the repository) of the referenced export, from the GTO tags of `repo`."""
    import dvc.api
    from dvc.exceptions import ArtifactNotFoundError, DvcException
    from gto.exceptions import GTOException

    try:
        found = dvc.api.artifacts_show(reference.name, version=reference.version, stage=reference.stage, repo=repo)
    except ArtifactNotFoundError:
        how = (f"promote a version with `gto assign {reference.name} --version vX.Y.Z --stage {reference.stage}`"
               if reference.stage else f"register one with `gto register {reference.name} --version vX.Y.Z`")
        raise RegistryError(f"no {reference.describe()} is registered in {repo}: {how} (`gto show {reference.name}` "
                            f"lists what is registered), and push the tags (`git push --tags`)") from None
    except (DvcException, GTOException) as exc:  # GTO's: a folder without git has no tags to read
        raise RegistryError(f"cannot read the model registry of {repo} ({exc}); give a git repository of this "
                            f"project (a path or URL) with --artifact-repo") from None
    return found["rev"], found["path"]


def _download(files, path: str, temp: Path, reference: ArtifactReference, revision: str, repo: str) -> None:
    """Copy `path` at the tagged commit into `temp`; any failure to read it is a RegistryError saying why."""
    try:
        files.get(path, str(temp), recursive=True)
    except Exception as exc:  # noqa: BLE001  (DVC, dvc-data and fsspec each raise their own kinds)
        raise RegistryError(f"cannot fetch {path} of {reference.describe()} (commit {revision[:12]}) from the DVC "
                            f"remote of {repo} ({type(exc).__name__}: {exc}); `dvc push` it from the clone that "
                            f"built it, or configure the remote it was pushed to (`dvc remote add -d`)") from None


def fetch_artifact(text: str, repo: str = ".", cache_dir: Path | None = None) -> Path:
    """The export folder of the referenced version, fetched into the cache unless already there.

    The files are read through DVC's filesystem at the tagged commit (what `dvc artifacts get` does): from the
    repository's DVC cache when it holds them, else from its default remote.
    """
    from dvc.api import DVCFileSystem

    reference = parse_reference(text)
    revision, path = locate(reference, repo)
    target = (cache_dir or default_cache_dir()) / reference.name / revision
    if (target / METADATA_FILE).is_file():
        return target
    files = DVCFileSystem(repo, rev=revision)
    try:
        with atomic_path(target) as temp:  # a download cut short never leaves a folder that looks complete
            _download(files, path, temp, reference, revision, repo)
    except OSError as exc:
        raise RegistryError(f"cannot write the fetched model into {target} ({exc.strerror or exc}); set "
                            f"{CACHE_ENV} to a writable folder") from None
    finally:
        files.close()
    return target
