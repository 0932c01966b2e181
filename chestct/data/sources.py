"""Acquire the dataset into data/raw/Data/{train,valid,test}/<class folder>/<file>, whatever the source.

Sources: `kaggle` (kagglehub, anonymous for this public dataset, credentials used when present), `local` (a
folder or a .zip holding the Kaggle layout anywhere inside) and `synthetic` (generated phantoms). Everything
downstream reads one layout, so it never needs to know where the images came from.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from chestct.atomic_io import atomic_path
from chestct.data.phantoms import generate_phantom_dataset
from chestct.errors import ChestctError
from chestct.labels import SPLITS, subtype_of_folder
from chestct.params import DataParams

DATA_FOLDER = "Data"
ALTERNATIVES = (
    "set `data.source: local` and `data.local_path` to a folder or .zip with the Kaggle layout, "
    "or `data.source: synthetic` for generated phantoms"
)


class SourceError(ChestctError, RuntimeError):
    """The dataset cannot be acquired; the message says why and what to do."""


def _is_junk(name: str) -> bool:
    # Finder and macOS zip leftovers are not data.
    return name.startswith(".") or name == "__MACOSX" or name == "Thumbs.db"


def _looks_like_data_folder(folder: Path) -> bool:
    return any((folder / split).is_dir() for split in SPLITS)


def find_data_folder(root: Path) -> Path:
    """The shallowest folder named Data (any case) under `root` that holds split folders."""
    candidates = [root] if root.name.lower() == DATA_FOLDER.lower() else []
    candidates += sorted(
        (p for p in root.rglob("*") if p.is_dir() and p.name.lower() == DATA_FOLDER.lower()
         and "__MACOSX" not in p.parts),
        key=lambda p: (len(p.parts), str(p)),
    )
    for candidate in candidates:
        if _looks_like_data_folder(candidate):
            return candidate
    raise SourceError(
        f"{root}: no '{DATA_FOLDER}/' folder with train/, valid/ and test/ inside; "
        "point data.local_path at the Kaggle download (the folder or .zip that contains Data/)"
    )


def check_layout(data_folder: Path) -> None:
    """Every split folder exists and every class folder has a known name."""
    for split in SPLITS:
        split_folder = data_folder / split
        if not split_folder.is_dir():
            raise SourceError(f"{split_folder}: missing split folder (expected {', '.join(SPLITS)} under Data/)")
        class_folders = [p for p in split_folder.iterdir() if p.is_dir() and not _is_junk(p.name)]
        if not class_folders:
            raise SourceError(f"{split_folder}: no class folders inside")
        for folder in class_folders:
            try:
                subtype_of_folder(folder.name)
            except ValueError as exc:
                raise SourceError(f"{folder}: {exc}") from None


def _data_files(data_folder: Path) -> list[Path]:
    return sorted(
        p for p in data_folder.rglob("*")
        if p.is_file() and not any(_is_junk(part) for part in p.relative_to(data_folder).parts)
    )


def copy_data_folder(data_folder: Path, destination: Path, progress: bool = True) -> int:
    check_layout(data_folder)
    files = _data_files(data_folder)
    for source in tqdm(files, desc="copying images", unit="file", disable=not progress):
        target = destination / source.relative_to(data_folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return len(files)


def _zip_data_prefix(archive: zipfile.ZipFile, zip_path: Path) -> PurePosixPath:
    """The member prefix of the shallowest Data/ folder that holds split folders."""
    prefixes = set()
    for name in archive.namelist():
        parts = PurePosixPath(name).parts
        if "__MACOSX" in parts:
            continue
        for index, part in enumerate(parts[:-1]):
            if part.lower() == DATA_FOLDER.lower() and index + 1 < len(parts) and parts[index + 1] in SPLITS:
                prefixes.add(PurePosixPath(*parts[: index + 1]))
    if not prefixes:
        raise SourceError(
            f"{zip_path}: the archive holds no '{DATA_FOLDER}/' folder with train/, valid/ and test/ inside; "
            "use the Kaggle chest-ctscan-images archive or a folder with that layout"
        )
    return min(prefixes, key=lambda p: (len(p.parts), str(p)))


def extract_zip(zip_path: Path, destination: Path, progress: bool = True) -> int:
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise SourceError(f"{zip_path}: not a valid .zip archive (corrupt or incomplete download?)") from None
    with archive:
        prefix = _zip_data_prefix(archive, zip_path)
        members = []
        for info in archive.infolist():
            member = PurePosixPath(info.filename)
            if info.is_dir() or member.parts[: len(prefix.parts)] != prefix.parts:
                continue
            relative = PurePosixPath(*member.parts[len(prefix.parts):])
            if any(_is_junk(part) or part == ".." for part in relative.parts):
                continue
            members.append((info, relative))
        for info, relative in tqdm(members, desc="extracting images", unit="file", disable=not progress):
            target = destination.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
    check_layout(destination)
    return len(members)


def download_kaggle(dataset: str) -> Path:
    """Download (or reuse kagglehub's cache of) the public dataset; anonymous unless credentials exist."""
    try:
        # Imported only for data.source kaggle: kagglehub reads credentials and config when it loads, and a local
        # or synthetic run should not depend on that.
        import kagglehub

        return Path(kagglehub.dataset_download(dataset))
    except (Exception, SystemExit) as exc:  # kaggle's own client raises SystemExit without credentials
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise SourceError(
            f"cannot download Kaggle dataset {dataset!r} ({type(exc).__name__}: {reason}). "
            f"Without internet access, {ALTERNATIVES}."
        ) from None


def _acquire_local(params: DataParams, destination: Path, progress: bool) -> int:
    if not params.local_path:
        raise SourceError(f"data.source is local but data.local_path is empty; {ALTERNATIVES}")
    path = Path(params.local_path).expanduser()
    if not path.exists():
        raise SourceError(f"data.local_path {str(path)!r} does not exist; fix the path in params.yaml")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise SourceError(f"{path}: data.local_path must be a folder or a .zip archive")
        return extract_zip(path, destination, progress)
    return copy_data_folder(find_data_folder(path), destination, progress)


def acquire_dataset(params: DataParams, raw_dir: Path, progress: bool = True) -> dict:
    """Fill raw_dir/Data from the configured source; raw_dir appears only when complete."""
    raw_dir = Path(raw_dir)
    with atomic_path(raw_dir) as temp_raw:
        data_dest = temp_raw / DATA_FOLDER
        if params.source == "synthetic":
            generate_phantom_dataset(temp_raw, params.synthetic, progress=progress)
            check_layout(data_dest)
            origin = "synthetic phantoms"
        elif params.source == "local":
            data_dest.mkdir(parents=True)
            _acquire_local(params, data_dest, progress)
            origin = str(params.local_path)
        else:
            downloaded = download_kaggle(params.kaggle_dataset)
            data_dest.mkdir(parents=True)
            copy_data_folder(find_data_folder(downloaded), data_dest, progress)
            origin = f"kaggle:{params.kaggle_dataset}"
    files = _data_files(raw_dir / DATA_FOLDER)
    return {"source": params.source, "origin": origin, "files": len(files)}
