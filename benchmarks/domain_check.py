"""The first layer of the domain check on real CT and phantoms: how many axial chest slices it refuses, and why.

    python -m benchmarks.domain_check --real ../shared/data/chest-ctscan-images \
        [--cross-source ../shared/data/cross-source] [--phantoms 100] [--sample 500] [--out reports/domain.json]

Every image of the Kaggle set (--real), a seeded sample of the cross-source slices (--cross-source: the
Lung-PET-CT-Dx DICOM series through serve.dicom_window, and LUNA16's normal-lung PNGs) and rendered phantoms go
through chestct.imaging.domain as the service would see them. It prints, per source, the share refused with the
reasons and the percentiles of every figure the thresholds were set from (the module's constants). Every slice
here is an axial chest CT, so each refusal is either a slice without lungs (the first and last slices of a
series) or a false alarm.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chestct.data.phantoms import render_phantom
from chestct.imaging.decode import decode_with_colour
from chestct.imaging.domain import check_chest_ct
from chestct.params import load_params


def _files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in suffixes)


def survey(sources: dict[str, list], window) -> dict:
    report = {}
    for name, items in sources.items():
        checks = []
        for item in tqdm(items, desc=name, unit="img"):
            if isinstance(item, np.ndarray):
                checks.append(check_chest_ct(item))
            else:
                gray, colour = decode_with_colour(item, dicom_window=window)
                checks.append(check_chest_ct(gray, colour))
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
    report = survey(sources, load_params().serve.dicom_window)
    for name, figures in report.items():
        print(f"{name}: {figures['refused']} of {figures['images']} refused ({figures['refused_share']:.1%})")
        for reason, count in figures["reasons"].items():
            print(f"    {count:4d}  {reason}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
