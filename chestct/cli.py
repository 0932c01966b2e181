"""The `chestct` command.

```text
chestct check-params [--params params.yaml]          validate params.yaml and print every resolved value
chestct preprocess IMAGE... --out-dir DIR [--params]  run THE preprocessing on files, save what the model sees
chestct predict IMAGE|DIR... [--json] [--gradcam-dir DIR] [--csv F]  diagnose files (folders: recursively)
chestct predict SERIES_DIR... --series [--json] [--plot-dir DIR]   one answer per DICOM series
chestct serve [--host --port] [--artifact chestct@prod]  start the web service (page + JSON API)
chestct evaluate-external DIR --label-map F=L ...     score a labelled folder of scans, write a report
```
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml
from PIL import Image

from chestct.errors import ChestctError
from chestct.export.formats import FORMAT_ORDER, export_format
from chestct.params import DEFAULT_PARAMS_FILE, Params, ParamsError, load_params
from chestct.training.backbones import BACKBONES, backbone_spec

# The commands below import their heavy modules (TensorFlow through the model code, uvicorn, the web app) inside
# the function that needs them: `chestct check-params` and `chestct --help` answer without loading TensorFlow, and
# the library never imports the web app at module level.


def check_registry_names(params: Params) -> None:
    """The names params.yaml gives to registry entries exist: the backbone, its unfreeze amount, export formats."""
    problems = []
    try:
        backbone_spec(params.model.backbone)
    except ChestctError as exc:
        problems.append(str(exc))
    for name in params.export.formats:
        try:
            export_format(name)
        except ChestctError as exc:
            problems.append(f"export.formats: {exc}")
    missing = [name for name in BACKBONES if name not in params.model.unfreeze]
    if missing:
        problems.append(f"model.unfreeze: no amount for {', '.join(missing)} (every registered backbone needs one)")
    if problems:
        raise ParamsError("params.yaml names unknown registry entries:\n  " + "\n  ".join(problems))


def _check_params(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    check_registry_names(params)
    print(f"{args.params}: valid")
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False), end="")


def _preprocess(args: argparse.Namespace) -> None:
    from chestct.imaging.files import upload_limit_bytes
    from chestct.imaging.preprocess import preprocess_image

    params = load_params(args.params)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for image_path in args.images:
        try:
            array = preprocess_image(image_path, params.preprocess, max_pixels=params.serve.max_pixels,
                                     dicom_window=params.serve.dicom_window,
                                     max_bytes=upload_limit_bytes(params.serve.max_upload_mb))
            target = args.out_dir / f"{Path(image_path).stem}.png"
            _save_png(array[:, :, 0], target)
        except ChestctError as exc:  # one bad file does not stop the others
            failures += 1
            print(f"{image_path}: skipped: {exc}", file=sys.stderr)
            continue
        print(f"{image_path} -> {target} ({array.shape[0]}x{array.shape[1]} uint8)")
    if failures:
        raise SystemExit(1)


def _save_png(array, target: Path) -> None:
    """Save an output image; a target that cannot be written is a ChestctError naming it (one line, no traceback)."""
    try:
        Image.fromarray(array).save(target, format="PNG")
    except OSError as exc:
        raise ChestctError(f"cannot write {target} ({exc.strerror or exc}); check the output folder") from None


def _model_options(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--export-dir", type=Path, default=None,
                       help="export folder (default: $CHESTCT_EXPORT_DIR or models/export)")
    which.add_argument("--artifact", default=None, metavar="NAME@VERSION|NAME#STAGE",
                       help="use a registered model instead of an export folder, e.g. chestct@prod or "
                            "chestct@v1.0.0: fetched from the registry (GTO tags + DVC remote) into a cache folder "
                            "($CHESTCT_ARTIFACT_CACHE, default ~/.cache/chestct/artifacts)")
    parser.add_argument("--artifact-repo", default=".", metavar="REPO",
                        help="git repository (path or URL) holding the registry tags (default: this folder)")
    parser.add_argument("--formats", default=None,
                        help="format order to try, comma-separated (default: $CHESTCT_FORMATS or "
                             f"{','.join(FORMAT_ORDER)})")


def _format_order(args: argparse.Namespace) -> tuple[str, ...] | None:
    """--formats as a tuple; None when absent, so the Predictor falls back to $CHESTCT_FORMATS or the default."""
    from chestct.serving.predictor import parse_format_order

    return parse_format_order(args.formats) if args.formats else None


def _export_dir(args: argparse.Namespace) -> Path | None:
    """--export-dir, or the folder --artifact was fetched into; None: the Predictor's default."""
    if args.artifact is None:
        return args.export_dir
    from chestct.registry import fetch_artifact

    folder = fetch_artifact(args.artifact, args.artifact_repo)
    print(f"chestct {args.command}: {args.artifact} from {args.artifact_repo} -> {folder}", file=sys.stderr)
    return folder


def _refusal(args: argparse.Namespace) -> bool | None:
    """--refuse-out-of-domain, or None: the export's serve.refuse_out_of_domain decides."""
    return True if args.refuse_out_of_domain else None


def _predict(args: argparse.Namespace) -> None:
    if args.series:
        _predict_series(args)
        return
    if args.plot_dir is not None:
        raise ChestctError("--plot-dir saves series z-profiles: add --series (or drop --plot-dir)")
    if args.csv is not None:
        _predict_to_csv(args)
        return
    from chestct.evaluation.gradcam import overlay
    from chestct.external.batch import list_inputs
    from chestct.serving.predictor import Predictor

    logging.basicConfig(level=logging.WARNING, format="chestct predict: %(message)s")
    inputs = list_inputs(args.images)
    predictor = Predictor(_export_dir(args), _format_order(args), _refusal(args))
    gradcam = args.gradcam_dir is not None and predictor.gradcam_available
    if args.gradcam_dir is not None:
        if not gradcam:
            print(f"chestct predict: no Grad-CAM for the {predictor.format} format; --gradcam-dir ignored",
                  file=sys.stderr)
        args.gradcam_dir.mkdir(parents=True, exist_ok=True)
    lesion_maps = args.lesion_map_dir is not None and predictor.has_lesion_map
    if args.lesion_map_dir is not None:
        if not lesion_maps:
            print("chestct predict: this model has no lesion map (model.lesion_map.enabled was false); "
                  "--lesion-map-dir ignored", file=sys.stderr)
        args.lesion_map_dir.mkdir(parents=True, exist_ok=True)
    failures = len(inputs.skipped)
    for path, reason in inputs.skipped:
        print(f"{path}: skipped: {reason}", file=sys.stderr)
    for image_path in inputs.files:
        try:
            prediction = predictor.predict_file(image_path, gradcam=gradcam)
            if gradcam:
                target = args.gradcam_dir / f"{Path(image_path).stem}_gradcam.png"
                _save_png(overlay(prediction.model_input, prediction.heatmap), target)
            if lesion_maps:
                target = args.lesion_map_dir / f"{Path(image_path).stem}_lesion_map.png"
                _save_png(overlay(prediction.model_input, prediction.lesion_map), target)
        except ChestctError as exc:  # one unreadable file does not stop the others
            failures += 1
            print(f"{image_path}: error: {exc}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps(prediction.to_dict()))
        else:
            print(f"{image_path}: {prediction.diagnosis:<6}  p(cancer) {prediction.cancer_probability_calibrated:.3f}  "
                  f"threshold {prediction.threshold_calibrated:.3f}  confidence {prediction.confidence:.3f}  "
                  f"(score {prediction.cancer_probability:.3f}, threshold {prediction.threshold:.3f}; "
                  f"{prediction.calibration})  [{prediction.model_format} {prediction.model_sha256[:12]}]")
            if not prediction.in_domain:
                print(f"{image_path}: warning: {prediction.domain_reason}", file=sys.stderr)
    if failures:
        raise SystemExit(1)


def _series_text(result: dict) -> list[str]:
    """A series' answer as the lines `chestct predict --series` prints."""
    head = f"series {result['label']} ({result['slices']} slices, kernel {result['kernel'] or 'unknown'})"
    if result["score"] is None:
        lines = [f"{head}: {result['note']}"]
    else:
        top = result["top_slice"]
        lines = [f"{head}: {result['diagnosis']:<6}  series score {result['score']:.3f}  threshold "
                 f"{result['threshold']:.3f}  from {top['file']} (z {top['z']:g} mm)",
                 f"  {result['note']}"]
    for item in result["per_slice"]:
        shown = (f"error: {item['error']}" if item["error"] else
                 f"p(cancer) {item['probability']:.3f}" + ("" if item["in_lungs"] else "  (no lung fields)"))
        position = "z ?" if item["z"] is None else f"z {item['z']:g}"
        lines.append(f"  {position:>10}  {item['file']}: {shown}")
    return lines


def _predict_series(args: argparse.Namespace) -> None:
    """Every DICOM slice under the folders given, grouped by SeriesInstanceUID, each series scored as one."""
    from chestct.external.batch import list_inputs
    from chestct.external.series import list_series
    from chestct.external.series_plots import z_profile_png
    from chestct.external.series_scoring import SERIES_RULE, score_series
    from chestct.imaging.files import upload_limit_bytes
    from chestct.serving.predictor import Predictor

    if args.csv is not None or args.gradcam_dir is not None or args.lesion_map_dir is not None:
        raise ChestctError("--series prints one answer per series: drop --csv, --gradcam-dir and --lesion-map-dir "
                           "(--plot-dir saves each series' z-profile)")
    logging.basicConfig(level=logging.WARNING, format="chestct predict: %(message)s")
    inputs = list_inputs(args.images)
    predictor = Predictor(_export_dir(args), _format_order(args))
    # Slices are named relative to the folder(s) given, as the user typed them.
    root = Path(os.path.commonpath([str(path if path.is_dir() else path.parent) for path in map(Path, args.images)]))
    found = list_series(inputs.files, root, upload_limit_bytes(predictor.serve_params.max_upload_mb))
    for path, reason in [*inputs.skipped, *found.not_dicom]:
        print(f"{path}: skipped: {reason}", file=sys.stderr)
    if not found.series:
        raise ChestctError(f"no DICOM slice found under {', '.join(map(str, args.images))}; --series reads DICOM "
                           f"series (PNG and JPEG files carry no series): drop --series to score them as images")
    results = score_series(predictor, found.series, args.batch_size, progress=not args.json)
    if args.plot_dir is not None:
        args.plot_dir.mkdir(parents=True, exist_ok=True)
    if not args.json:
        print(f"chestct predict --series: {SERIES_RULE}")
    for result in results:
        answer = result.to_dict(predictor.threshold)
        if args.plot_dir is not None:
            target = args.plot_dir / f"{result.series.label}_z_profile.png"
            z_profile_png(target, [result], predictor.threshold, title=f"{result.series.label}: p(cancer) along z")
            answer["z_profile_png"] = str(target)
        print(json.dumps(answer) if args.json else "\n".join(_series_text(answer)))
    if all(result.score is None for result in results):
        raise SystemExit(1)  # no series could be scored as one (each reason is printed)


def _predict_to_csv(args: argparse.Namespace) -> None:
    """Every file under the folders (and every file) given, scored in batches into one CSV row each."""
    from chestct.external.batch import check_csv_target, list_inputs, score_inputs, write_predictions_csv
    from chestct.serving.predictor import Predictor

    if args.json or args.gradcam_dir is not None or args.lesion_map_dir is not None:
        raise ChestctError("--csv writes every result to the CSV: drop --json, --gradcam-dir and --lesion-map-dir "
                           "(for overlays, run chestct predict on the files of interest without --csv)")
    logging.basicConfig(level=logging.WARNING, format="chestct predict: %(message)s")
    check_csv_target(args.csv)  # refused before the listing and the model load
    if args.batch_size < 1:
        raise ChestctError(f"--batch-size must be at least 1, got {args.batch_size}")
    inputs = list_inputs(args.images)
    predictor = Predictor(_export_dir(args), _format_order(args), _refusal(args))
    rows = score_inputs(predictor, inputs, args.batch_size)
    write_predictions_csv(args.csv, rows)
    errors = sum(1 for row in rows if row["error"])
    hidden = f"; {inputs.hidden} hidden entries (dotfiles) not read" if inputs.hidden else ""
    print(f"chestct predict: {len(rows) - errors} files scored, {errors} not (the reason is in the error column)"
          f"{hidden} -> {args.csv}")
    if errors == len(rows):
        raise SystemExit(1)  # nothing scored: the CSV holds only errors (or no rows at all)


def _serve(args: argparse.Namespace) -> None:
    from chestct.serving.app import create_app  # the web app, only when serving
    from chestct.serving.limits import uvicorn_limits
    from chestct.serving.shutdown import serve_until_stopped

    export_dir = _export_dir(args)
    app = create_app(export_dir, _format_order(args))
    # Connection limits and the shutdown grace come from the export's serve params, like the upload limits.
    serve_until_stopped(app, host=args.host, port=args.port, log_level="info", **uvicorn_limits(export_dir))


def _evaluate_external(args: argparse.Namespace) -> None:
    from chestct.external.report import summary_lines
    from chestct.external.validation import evaluate_external

    logging.basicConfig(level=logging.WARNING, format="chestct evaluate-external: %(message)s")
    result = evaluate_external(args.data_dir, args.label_map, export_dir=_export_dir(args), formats=_format_order(args),
                               out_dir=args.out, dedup=args.dedup, params_path=args.params,
                               resamples=args.resamples, level=args.level, seed=args.seed,
                               batch_size=args.batch_size)
    print("\n".join(summary_lines(result)))


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

    predict = commands.add_parser("predict", help="diagnose image files (PNG, JPEG, DICOM) with the exported model")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE|DIR",
                         help="image files, and folders to score every regular file under (recursively)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    predict.add_argument("--refuse-out-of-domain", action="store_true",
                         help="an image that is not an axial chest CT slice is an error (its reason printed), not a "
                              "result with in_domain false")
    predict.add_argument("--gradcam-dir", type=Path, default=None, help="also save Grad-CAM overlays here")
    predict.add_argument("--lesion-map-dir", type=Path, default=None,
                         help="also save the model's lesion map over each input here (lesion-map models)")
    predict.add_argument("--csv", type=Path, default=None, metavar="FILE",
                         help="write one row per file (file, probability, diagnosis, threshold, model_format, "
                              "model_sha256, error) here instead of printing, with a progress bar; unreadable "
                              "files get their reason; exit status 1 only when no file could be scored")
    predict.add_argument("--batch-size", type=int, default=32,
                         help="images per model call with --csv or --series (default 32)")
    predict.add_argument("--series", action="store_true",
                         help="read the folders as DICOM series (any layout, split by SeriesInstanceUID): every "
                              "slice scored once, the series' score is the highest slice probability among the "
                              "slices with lung fields, and the slice that gave it")
    predict.add_argument("--plot-dir", type=Path, default=None,
                         help="with --series: save each series' z-profile (probability along z) here")
    _model_options(predict)
    predict.set_defaults(run=_predict)

    serve = commands.add_parser("serve", help="start the web page and JSON API (uvicorn)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000)
    _model_options(serve)
    serve.set_defaults(run=_serve)

    external = commands.add_parser(
        "evaluate-external", help="score a labelled folder of scans (PNG, JPEG, DICOM) with the exported model",
        description="Score every image under the mapped folders of DIR with an exported model at the threshold "
                    "stored in its metadata, and write metrics.json (the evaluate stage's metrics with CIs), "
                    "predictions.csv and PNGs (ROC, score histograms, Grad-CAM of the most confident errors).")
    external.add_argument("data_dir", type=Path, metavar="DIR", help="folder holding the class folders")
    external.add_argument("--label-map", nargs="+", required=True, metavar="FOLDER=LABEL",
                          help='class folders (relative to DIR) and their labels, 0/normal or 1/cancer, e.g. '
                               '"Normal cases=0" "Malignant cases=1"; folders not named are ignored and listed')
    external.add_argument("--out", type=Path, default=None,
                          help="report folder (default: reports/external/<DIR's name>); replaced as a whole")
    external.add_argument("--dedup", action="store_true",
                          help="score each distinct file content once; contents under both labels are left out")
    external.add_argument("--params", type=Path, default=None,
                          help="params file for evaluate.bootstrap_resamples, evaluate.confidence_level, "
                               "evaluate.gradcam_images and seed (default: ./params.yaml when present)")
    external.add_argument("--resamples", type=int, default=None, help="bootstrap resamples (overrides params)")
    external.add_argument("--level", type=float, default=None, help="confidence level (overrides params)")
    external.add_argument("--seed", type=int, default=None, help="bootstrap and cross-validation seed")
    external.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    _model_options(external)
    external.set_defaults(run=_evaluate_external)
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
