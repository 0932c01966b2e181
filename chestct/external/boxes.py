"""Lesion boxes as Lung-PET-CT-Dx ships them: one Pascal VOC XML per annotated slice, named by its SOPInstanceUID.

The boxes are in the stored slice's pixel grid (columns x, rows y, inclusive corners as VOC writes them). A slice
with no XML has no box. Files may sit in any folder under the set; two XML files for one slice are refused, since
they could disagree.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chestct.errors import ChestctError

MAX_XML_BYTES = 1 << 20  # an annotation is a few hundred bytes


class BoxFileError(ChestctError, ValueError):
    """An annotation file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Box:
    x0: int
    y0: int
    x1: int  # inclusive, as Pascal VOC writes it
    y1: int
    name: str = ""

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The box as a boolean mask of an image of `shape` (rows, columns), clipped to the image."""
        region = np.zeros(shape, bool)
        rows, cols = shape
        region[max(0, self.y0):min(rows, self.y1 + 1), max(0, self.x0):min(cols, self.x1 + 1)] = True
        return region


def _integer(node: ElementTree.Element, tag: str, path: str) -> int:
    text = node.findtext(tag)
    try:
        return int(round(float(text)))
    except (TypeError, ValueError):
        raise BoxFileError(f"{path}: <bndbox> has no numeric <{tag}> (got {text!r})") from None


def read_voc_boxes(path: Path, shown: str) -> list[Box]:
    """The boxes of one Pascal VOC file; BoxFileError (naming `shown`) when it is not one."""
    if path.stat().st_size > MAX_XML_BYTES:
        raise BoxFileError(f"{shown}: {path.stat().st_size} bytes is far more than an annotation; not read")
    try:
        root = ElementTree.fromstring(path.read_bytes())
    except ElementTree.ParseError as exc:
        raise BoxFileError(f"{shown}: not well-formed XML ({exc})") from None
    if root.tag != "annotation":
        raise BoxFileError(f"{shown}: not a Pascal VOC annotation (root element <{root.tag}>, expected <annotation>)")
    boxes = []
    for item in root.iter("object"):
        node = item.find("bndbox")
        if node is None:
            continue
        box = Box(*(_integer(node, tag, shown) for tag in ("xmin", "ymin", "xmax", "ymax")),
                  name=(item.findtext("name") or "").strip())
        if box.x1 < box.x0 or box.y1 < box.y0:
            raise BoxFileError(f"{shown}: a box with xmax < xmin or ymax < ymin ({box.x0}, {box.y0}, {box.x1}, "
                               f"{box.y1})")
        boxes.append(box)
    if not boxes:
        raise BoxFileError(f"{shown}: no <object> with a <bndbox>; an annotation file must hold at least one box")
    return boxes


def read_box_files(files: Sequence[tuple[Path, str]]) -> dict[str, tuple[str, list[Box]]]:
    """{SOPInstanceUID (the file's stem): (shown name, boxes)} for (path, shown name) pairs of .xml files."""
    found: dict[str, tuple[str, list[Box]]] = {}
    for path, shown in files:
        uid = Path(path).stem
        if uid in found:
            raise BoxFileError(f"{shown} and {found[uid][0]}: two annotation files for the slice {uid}; keep one")
        found[uid] = (shown, read_voc_boxes(Path(path), shown))
    return found
