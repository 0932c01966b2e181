"""The documentation's lesion-map picture (docs/lesion-map.md): what a lesion-map model's own map shows on three
kinds of slice.

    python scripts/lesion_map_figure.py PROJECT [--set lung_pet_ct_dx] [--out docs/figures/lesion-map.png]

PROJECT is a pipeline run of a lesion-map model (model.lesion_map.enabled) that has run the `external` stage
with the cross-source panel declared, e.g. a `python -m benchmarks.seeds --keep DIR ...` copy. Rows:
1. test-split Normal slices with a lesion inserted (the inserted-lesion check's copies; green: the lesion's
   outline), scored by the exported model;
2. real Cancer slices of the test split (no outline exists);
3. the external stage's own figure of the set's boxed tumour slices (plots/external/<set>/lesion_map_boxed.png,
   white: the tumour box), appended as it is.
The map is drawn as it is (not rescaled per image): blue is a low lesion probability, red a high one.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from chestct.evaluation.gradcam import overlay
from chestct.evaluation.plots import gradcam_grid_png
from chestct.imaging.processed import load_split
from chestct.params import load_params
from chestct.serving.predictor import Predictor
from chestct.training.lesion_check import build_lesion_check

PER_ROW = 4


def _outlined(image: np.ndarray, lesion_map: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    tile = overlay(image, lesion_map)
    if mask is not None:
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        tile[edge] = (0, 255, 0)
    return tile


def test_tiles(project: Path, predictor: Predictor) -> list[tuple[np.ndarray, str]]:
    params = load_params(project / "params.yaml")
    test = load_split(project / "data/processed/test")
    check = build_lesion_check(test, params.augment.lesion_insertion, params.preprocess, params.seed)
    tiles = []
    inserted = check.inserted[:PER_ROW]
    probabilities, maps = predictor.probabilities_and_maps(inserted)
    for image, lesion_map, mask, probability in zip(inserted, maps, check.masks, probabilities, strict=False):
        tiles.append((_outlined(image, lesion_map, mask), f"inserted lesion, p={probability:.2f}"))
    cancers = np.asarray(test.images)[np.flatnonzero(np.asarray(test.labels) == 1)[::25][:PER_ROW]]
    probabilities, maps = predictor.probabilities_and_maps(cancers)
    for image, lesion_map, probability in zip(cancers, maps, probabilities, strict=True):
        tiles.append((_outlined(image, lesion_map, None), f"test Cancer, p={probability:.2f}"))
    return tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path)
    parser.add_argument("--set", default="lung_pet_ct_dx", help="the annotated_series set of the panel")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/lesion-map.png"))
    args = parser.parse_args()
    predictor = Predictor(args.project / "models/export")
    if not predictor.has_lesion_map:
        sys.exit(f"{args.project}: the exported model has no lesion map (model.lesion_map.enabled was false)")
    series_png = args.project / "plots/external" / args.set / "lesion_map_boxed.png"
    if not series_png.is_file():
        sys.exit(f"{series_png}: missing; declare the panel and run `dvc repro external` in {args.project}")
    with tempfile.TemporaryDirectory() as scratch:
        top = Path(scratch) / "test.png"
        gradcam_grid_png(top, test_tiles(args.project, predictor), columns=PER_ROW,
                         title="The model's lesion map: inserted lesions (green outline) and real test Cancers")
        parts = [Image.open(top).convert("RGB"), Image.open(series_png).convert("RGB")]
        width = max(part.width for part in parts)
        parts = [part.resize((width, round(part.height * width / part.width))) for part in parts]
        figure = Image.new("RGB", (width, sum(part.height for part in parts)), "white")
        offset = 0
        for part in parts:
            figure.paste(part, (0, offset))
            offset += part.height
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figure.quantize(256).save(args.out, optimize=True)  # a palette keeps the PNG small
    print(f"{args.out}: {figure.width}x{figure.height} px")


if __name__ == "__main__":
    main()
