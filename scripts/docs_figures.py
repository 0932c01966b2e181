"""The documentation's pictures, made from the code and the runs they show, never kept by hand.

    python scripts/docs_figures.py screenshots               # docs/figures/serve-page.png, serve-page-series.png
    python scripts/docs_figures.py run --run RUN [--set lung_pet_ct_dx] [--out docs/figures]

`screenshots` runs the two browser tests that photograph the web page (tests/test_browser.py, Debian's chromium
driven by Playwright, the tests' random-weight model) with CHESTCT_SCREENSHOT_DIR set to docs/figures, and fails
when they skipped (no chromium) instead of leaving the old pictures in place silently.

`run` takes a pipeline project that `dvc repro` (or `dvc exp run`) has run: this checkout after the quick run of
the README, or a copy kept by `python -m benchmarks.seeds --keep DIR`. Into docs/figures/run/ it copies the run's
own pictures (plots/eval/*.png, plots/data/*.png), renders `dvc plots show` there (the offline template of
.dvc/config) in headless Chromium and keeps each chart, and writes SOURCE.json: which run (its commit and main
params) and when. The Evaluation page shows them with that line (scripts/docs_macros.py, `figures_from_run`).
With the cross-source panel declared in the run, plots/external/<set>/z_profile.png becomes
docs/figures/external-z-profile.png. The other pictures have their own makers (docs/figures.md): the domain
check's refusals (benchmarks/domain_check.py --figure) and the lesion map (scripts/lesion_map_figure.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
SCREENSHOT_TESTS = ("test_upload_a_scan_and_see_the_diagnosis_and_the_overlay",
                    "test_upload_a_zipped_series_and_see_one_card_per_series")
SCREENSHOTS = ("serve-page.png", "serve-page-series.png")
# The run's own pictures, in the order the Evaluation page shows them, with their captions.
RUN_PICTURES = (
    ("plots/eval/roc.png", "ROC of the test split with its bootstrap band and the operating point"),
    ("plots/eval/scores.png", "The test scores of each class against the threshold"),
    ("plots/eval/confusion.png", "The test confusion matrix at the threshold"),
    ("plots/eval/calibration.png", "Test reliability, before and after calibration"),
    ("plots/eval/robustness.png", "Test AUC under each acquisition perturbation, against the clean AUC"),
    ("plots/eval/gradcam.png", "Grad-CAM of test TP/FP/TN/FN with the body (white) and lung (cyan) outlines"),
    ("plots/data/samples.png", "Sample images per split and class"),
    ("plots/data/sizes.png", "The image size distribution per class"),
)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def screenshots(out: Path) -> None:
    started = time.time()
    env = dict(os.environ, CHESTCT_SCREENSHOT_DIR=str(out))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py", "-k",
               " or ".join(SCREENSHOT_TESTS)]
    print("$ " + " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, env=env)
    stale = [name for name in SCREENSHOTS if not (out / name).is_file() or (out / name).stat().st_mtime < started]
    if result.returncode != 0 or stale:
        raise SystemExit(f"docs_figures: the browser tests did not write {', '.join(stale) or 'their pictures'} "
                         f"(did they skip? they need Debian's chromium and Playwright)")
    print(f"written: {', '.join(str(out / name) for name in SCREENSHOTS)}")


def _git(run: Path, *args: str) -> str | None:
    result = subprocess.run(["git", "-C", str(run), *args], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def dvc_plot_charts(run: Path, folder: Path) -> list[dict]:
    """`dvc plots show` in the run, each chart of its page screenshotted in headless Chromium."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, DVC_NO_ANALYTICS="1")
        subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", scratch], cwd=run, env=env, check=True,
                       capture_output=True, text=True)
        charts = []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 800})
                page.goto((Path(scratch) / "index.html").as_uri())
                page.wait_for_function("document.querySelectorAll('.vega-embed canvas, .vega-embed svg').length"
                                       " >= document.querySelectorAll('.vega-embed').length", timeout=30_000)
                for index, element in enumerate(page.query_selector_all(".vega-embed")):
                    name = f"dvc-plot-{index + 1}.png"
                    element.screenshot(path=str(folder / name))
                    title = (element.get_attribute("id") or f"chart {index + 1}").replace("_", " ").strip()
                    charts.append({"file": name, "title": f"dvc plots show: {title}"})
            finally:
                browser.close()
    return charts


def run_figures(run: Path, out: Path, panel_set: str, dvc_plots: bool) -> None:
    run = run.resolve()
    if not (run / "dvc.yaml").is_file() or not (run / "plots" / "eval").is_dir():
        raise SystemExit(f"docs_figures: {run} is not a pipeline run (no dvc.yaml or plots/eval/): run "
                         f"`dvc repro` there first")
    folder = out / "run"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    figures = []
    for relative, title in RUN_PICTURES:
        if (run / relative).is_file():
            name = relative.replace("plots/", "").replace("/", "-")
            shutil.copy2(run / relative, folder / name)
            figures.append({"file": name, "title": title})
    if dvc_plots:
        figures += dvc_plot_charts(run, folder)
    z_profile = run / "plots" / "external" / panel_set / "z_profile.png"
    if z_profile.is_file():
        shutil.copy2(z_profile, out / "external-z-profile.png")
        print(f"written: {out / 'external-z-profile.png'}")
    else:
        print(f"no {z_profile.relative_to(run)} in this run (declare the cross-source panel to make one); "
              f"{out / 'external-z-profile.png'} is left as it is")

    params = yaml.safe_load((run / "params.yaml").read_text())
    commit = _git(run, "rev-parse", "HEAD")
    dirty = bool(_git(run, "status", "--porcelain", "--untracked-files=no"))
    date = datetime.datetime.now(datetime.UTC).date().isoformat()
    description = (f"Pictures of the run in {run.name}/ (commit {commit[:7] if commit else 'unknown'}"
                   f"{' + uncommitted changes' if dirty else ''}: {params['model']['backbone']} at "
                   f"{params['preprocess']['image_size']} px, weights {params['model']['weights']}, seed "
                   f"{params['seed']}, data.source {params['data']['source']}, split.dedup "
                   f"{params['split']['dedup']}), made by `python scripts/docs_figures.py run` on {date}.")
    source = {"description": description, "run": str(run), "commit": commit, "dirty": dirty, "date": date,
              "params": {key: params[key] for key in ("seed", "data", "split", "preprocess", "model")},
              "figures": figures}
    (folder / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    print(f"written: {len(figures)} pictures and SOURCE.json in {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    shots = commands.add_parser("screenshots", help="the web page, from the browser tests")
    shots.add_argument("--out", type=Path, default=FIGURES)
    from_run = commands.add_parser("run", help="a pipeline run's plots and dvc plots charts")
    from_run.add_argument("--run", type=Path, required=True, help="a project where `dvc repro` has run")
    from_run.add_argument("--set", default="lung_pet_ct_dx", help="the external set whose z-profile to keep")
    from_run.add_argument("--out", type=Path, default=FIGURES)
    from_run.add_argument("--no-dvc-plots", action="store_true", help="skip the `dvc plots show` charts")
    args = parser.parse_args()
    if args.command == "screenshots":
        screenshots(args.out)
    else:
        run_figures(args.run, args.out, args.set, not args.no_dvc_plots)


if __name__ == "__main__":
    main()
