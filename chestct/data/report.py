"""What the split stage tells a person: metrics/data.json and two pictures (sample montage, size histogram)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # the object API: no pyplot, no display backend, no global state

from chestct.atomic_io import atomic_path
from chestct.data.records import UnreadableImage
from chestct.data.duplicates import cross_class_groups, duplicate_summary
from chestct.imaging.decode import decode_grayscale
from chestct.imaging.transforms import resize_square
from chestct.labels import CLASS_NAMES, SPLITS


def _split_counts(table: pd.DataFrame) -> dict:
    counts = {}
    for split in SPLITS:
        rows = table[table["split"] == split]
        counts[split] = {
            "total": int(len(rows)),
            "normal": int((rows["label"] == 0).sum()),
            "cancer": int((rows["label"] == 1).sum()),
            "subtypes": {k: int(v) for k, v in rows["subtype"].value_counts().sort_index().items()},
        }
    return counts


def _leak_counts(table: pd.DataFrame) -> dict:
    leaks = {}
    for split in ("valid", "test"):
        rows = table[(table["split"] == split) & table["dup_in_train"]]
        leaks[split] = {"normal": int((rows["label"] == 0).sum()), "cancer": int((rows["label"] == 1).sum())}
    test_from_valid = table[(table["split"] == "test") & table["dup_in_valid"]]
    leaks["test_from_valid"] = {"normal": int((test_from_valid["label"] == 0).sum()),
                                "cancer": int((test_from_valid["label"] == 1).sum())}
    return leaks


def data_summary(scanned: pd.DataFrame, final: pd.DataFrame, unreadable: list[UnreadableImage],
                 dedup: dict, source: str) -> dict:
    """metrics/data.json: counts per split, hashes, duplicate groups, leaks, formats and unreadable files.

    Duplicate figures describe every readable image (before dedup); splits and leaks describe the final split.
    """
    formats = (scanned["format"] + "/" + scanned["mode"]).value_counts().sort_index()
    return {
        "source": source,
        "images_found": int(len(scanned) + len(unreadable)),
        "splits": _split_counts(final),
        "unique_sha256": int(scanned["sha256"].nunique()),
        "duplicates": duplicate_summary(scanned),
        "leaks": _leak_counts(final),
        "cross_class_duplicates": cross_class_groups(scanned, "subtype"),
        "cross_label_duplicates": cross_class_groups(scanned, "label"),
        "formats": {k: int(v) for k, v in formats.items()},
        "extension_mismatches": int((~scanned["extension_matches"]).sum()),
        "unreadable": {"count": len(unreadable), "files": [{"id": u.id, "reason": u.reason} for u in unreadable]},
        "dedup": dedup,
    }


def save_montage(table: pd.DataFrame, data_folder: Path, path: Path, per_row: int = 6, tile: int = 128,
                 seed: int = 0) -> None:
    """One row per split and class with a few random samples, as they are stored (before CLAHE)."""
    rows = [(split, label) for split in SPLITS for label in (0, 1)]
    figure = Figure(figsize=(per_row * 1.6, len(rows) * 1.75))
    axes = figure.subplots(len(rows), per_row)
    rng = np.random.default_rng(seed)
    for row_index, (split, label) in enumerate(rows):
        members = table[(table["split"] == split) & (table["label"] == label)]
        picks = members.iloc[rng.permutation(len(members))[:per_row]] if len(members) else members
        for column in range(per_row):
            axis = axes[row_index, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(picks):
                record = picks.iloc[column]
                image = resize_square(decode_grayscale(data_folder / record["id"]), tile, "pad")
                axis.imshow(image, cmap="gray", vmin=0, vmax=255)
                axis.set_title(record["subtype"].split(".")[0][:10], fontsize=7)
            else:
                axis.axis("off")
        axes[row_index, 0].set_ylabel(f"{split}\n{CLASS_NAMES[label]}", fontsize=9)
    figure.suptitle("Sample images per split and class (as stored)", fontsize=11)
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=90, format="png")


def save_size_histogram(table: pd.DataFrame, path: Path) -> None:
    """Width and height distributions per class: a size difference between classes would be a shortcut."""
    figure = Figure(figsize=(10, 3.8))
    axes = figure.subplots(1, 2)
    bins = np.linspace(0, max(int(table[["width", "height"]].max().max()), 1) * 1.05, 30)
    for axis, dimension in zip(axes, ("width", "height"), strict=True):
        for label, name in enumerate(CLASS_NAMES):
            axis.hist(table.loc[table["label"] == label, dimension], bins=bins, alpha=0.6, label=name)
        axis.set_xlabel(f"image {dimension} (px)")
        axis.set_ylabel("images")
        axis.legend()
    figure.suptitle("Image sizes per class (all splits)")
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=90, format="png")
