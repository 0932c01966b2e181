"""Class folders of the Kaggle chest CT layout and the labels they map to.

train/ and valid/ use long folder names that carry a TNM stage; test/ uses short ones. A folder's label comes
from its name's prefix, so both spellings map to the same subtype.
"""

from __future__ import annotations

from chestct.errors import ChestctError

SPLITS = ("train", "valid", "test")

NORMAL, CANCER = 0, 1
CLASS_NAMES = ("Normal", "Cancer")

SUBTYPES = ("normal", "adenocarcinoma", "large.cell.carcinoma", "squamous.cell.carcinoma")
CANCER_SUBTYPES = SUBTYPES[1:]

# The exact folder names of the public dataset, per split (used by the phantom generator to mimic it).
LONG_FOLDER_NAMES = {
    "normal": "normal",
    "adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib",
    "large.cell.carcinoma": "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
    "squamous.cell.carcinoma": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa",
}
SHORT_FOLDER_NAMES = {subtype: subtype for subtype in SUBTYPES}
FOLDER_NAMES_BY_SPLIT = {"train": LONG_FOLDER_NAMES, "valid": LONG_FOLDER_NAMES, "test": SHORT_FOLDER_NAMES}


class UnknownClassFolderError(ChestctError, ValueError):
    """A folder under a split does not name a known class."""


def subtype_of_folder(folder_name: str) -> str:
    """Map a class folder name (long or short spelling) to its subtype, e.g. 'large.cell.carcinoma'."""
    name = folder_name.strip().lower()
    for subtype in SUBTYPES:
        if name == subtype or name.startswith(subtype + "_"):
            return subtype
    raise UnknownClassFolderError(
        f"unknown class folder {folder_name!r}: expected a name starting with one of "
        f"{', '.join(SUBTYPES)} (the Kaggle dataset's folders)"
    )


def label_of_subtype(subtype: str) -> int:
    """0 for normal, 1 for any cancer subtype."""
    return NORMAL if subtype == "normal" else CANCER
