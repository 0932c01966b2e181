"""The first layer of the domain check on real CT and phantoms: how many axial chest slices it refuses, and why.

    python -m benchmarks.domain_check --real ../shared/data/chest-ctscan-images \
        [--cross-source ../shared/data/cross-source] [--phantoms 100] [--sample 500] [--out reports/domain.json] \
        [--figure docs/figures/domain-refused.png] [--no-results]

Every image of the Kaggle set (--real), a seeded sample of the cross-source slices (--cross-source: the
Lung-PET-CT-Dx DICOM series through serve.dicom_window, and LUNA16's normal-lung PNGs) and rendered phantoms go
through chestct.imaging.domain as the service would see them. It prints, per source, the share refused with the
reasons and the percentiles of every figure the thresholds were set from (the module's constants). Every slice
here is an axial chest CT, so each refusal is either a slice without lungs (the first and last slices of a
series) or a false alarm. The documentation's table (refused per source, and why) goes to
docs/results/domain_check.json.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from benchmarks.results import write_result
from chestct.data.phantoms import render_phantom
from chestct.imaging.decode import decode_with_colour
from chestct.imaging.domain import check_chest_ct
from chestct.params import load_params


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in suffixes)


def survey(sources: dict[str, list], window, refused_images: list | None = None) -> dict:
    """The report per source; `refused_images` collects (source, grayscale, reason) of every refusal."""
    report = {}
    for name, items in sources.items():
        checks = []
        for item in tqdm(items, desc=name, unit="img"):
            rendered = isinstance(item, np.ndarray)
            gray, colour = (item, 0.0) if rendered else decode_with_colour(item, dicom_window=window)
            checks.append(check_chest_ct(gray, colour))
            if refused_images is not None and not checks[-1].passed:
                refused_images.append((name, gray, checks[-1].reason))
        refused = [check.reason.split(" (")[0].split(":")[0] for check in checks if not check.passed]
        figures = {key: [check.figures[key] for check in checks] for key in checks[0].figures}
        report[name] = {"images": len(checks), "refused": len(refused),
                        "refused_share": round(len(refused) / len(checks), 4),
                        "reasons": dict(Counter(refused).most_common()),
                        "percentiles": {key: dict(zip(("p01", "p05", "p50", "p95", "p99"),
                                                      np.round(np.percentile(values, [1, 5, 50, 95, 99]), 3).tolist(),
                                                      strict=True)) for key, values in figures.items()}}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=None, help="the chest-ctscan-images folder")
    parser.add_argument("--cross-source", type=Path, default=None, help="the cross-source folder")
    parser.add_argument("--phantoms", type=int, default=100, help="rendered phantom slices (default 100)")
    parser.add_argument("--sample", type=int, default=500, help="cross-source slices drawn (default 500)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON")
    parser.add_argument("--no-results", action="store_true",
                        help="do not write docs/results/domain_check.json (the documentation's table)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="draw the refused images of the first source (with their reasons) into this PNG")
    args = parser.parse_args()
    sources: dict[str, list] = {}
    if args.real is not None:
        sources["kaggle"] = _files(args.real, (".png", ".jpg", ".jpeg"))
    if args.cross_source is not None:
        slices = _files(args.cross_source, (".dcm", ".png"))
        rng = np.random.default_rng(0)
        sources["cross-source"] = sorted(rng.choice(slices, min(args.sample, len(slices)), replace=False).tolist())
    sources["phantoms"] = [render_phantom(np.random.default_rng(seed), (256, 256), seed % 3)
                           for seed in range(args.phantoms)]
    refused: list = []
    report = survey(sources, load_params().serve.dicom_window, refused)
    for name, figures in report.items():
        print(f"{name}: {figures['refused']} of {figures['images']} refused ({figures['refused_share']:.1%})")
        for reason, count in figures["reasons"].items():
            print(f"    {count:4d}  {reason}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.figure and refused:
        _figure(args.figure, [item for item in refused if item[0] == next(iter(sources))] or refused)
    if not args.no_results:
        figures = {"tables": {"first_layer": first_layer_table(report)}, "report": report}
        print(f"written: {write_result('domain_check', figures)}")


SOURCE_LABELS = {"kaggle": "Kaggle set, all {n:,} images", "cross-source": "cross-source slices (Lung-PET-CT-Dx "
                 "series, LUNA16 normals), {n:,}", "phantoms": "phantoms, {n:,}"}


def first_layer_table(report: dict) -> dict:
    """The documentation's table: per source, how many images the first layer refuses and why."""
    rows = [[SOURCE_LABELS.get(name, name + ", {n:,}").format(n=figures["images"]),
             f"{figures['refused']:,} ({figures['refused_share']:.1%})" if figures["refused"] else "0",
             "; ".join(f"{count} {reason}" for reason, count in figures["reasons"].items())]
            for name, figures in report.items()]
    return {"title": "What the first layer of the domain check refuses",
            "columns": ["source (all axial CT)", "refused by the first layer", "why"], "rows": rows}


def _figure(path: Path, refused: list, columns: int = 5, side: int = 192) -> None:
    """The refused images of the first source, each with the start of its reason."""
    tiles = []
    for _, gray, reason in refused[:2 * columns]:
        tile = cv2.cvtColor(cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
        for row, text in enumerate(textwrap.wrap(reason.split(":")[0], 30)[:3]):
            cv2.putText(tile, text, (4, 14 + 13 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (60, 200, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % columns)
    rows = [np.hstack(tiles[start:start + columns]) for start in range(0, len(tiles), columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(rows))


if __name__ == "__main__":
    main()
