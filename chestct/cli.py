"""The `chestct` command.

    chestct check-params [--params params.yaml]          validate params.yaml and print every resolved value
    chestct preprocess IMAGE... --out-dir DIR [--params]  run THE preprocessing on files, save what the model sees
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from chestct.errors import ChestctError
from chestct.params import DEFAULT_PARAMS_FILE, load_params


def _check_params(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    print(f"{args.params}: valid")
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")


def _preprocess(args: argparse.Namespace) -> None:
    from PIL import Image

    from chestct.imaging import preprocess_image

    params = load_params(args.params)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for image_path in args.images:
        try:
            array = preprocess_image(image_path, params.preprocess)
        except ChestctError as exc:
            failures += 1
            print(f"{image_path}: skipped: {exc}", file=sys.stderr)
            continue
        target = args.out_dir / f"{Path(image_path).stem}.png"
        Image.fromarray(array[:, :, 0]).save(target)
        print(f"{image_path} -> {target} ({array.shape[0]}x{array.shape[1]} uint8)")
    if failures:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chestct", description="Chest CT cancer detection pipeline tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-params", help="validate params.yaml and print the resolved values")
    check.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    check.set_defaults(run=_check_params)

    preprocess = commands.add_parser("preprocess", help="save the model's view of images (CLAHE, window, resize)")
    preprocess.add_argument("images", nargs="+", type=Path)
    preprocess.add_argument("--out-dir", type=Path, required=True)
    preprocess.add_argument("--params", type=Path, default=DEFAULT_PARAMS_FILE)
    preprocess.set_defaults(run=_preprocess)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except ChestctError as exc:
        print(f"chestct {args.command}: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
