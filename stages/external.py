"""external stage: the cross-source panel. Every set under `external.sets` scored with the exported model, as
`chestct predict` scores files (chestct.external.panel); metrics/external.json and plots/external/<set>/.

These sets measure; nothing is trained, selected or chosen on them. With no set declared the stage writes an
empty report at once, without loading the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from chestct.atomic_io import write_json
from chestct.params import DEFAULT_PARAMS_FILE, load_params
from stages.errors import run_stage

EXPORT = Path("models/export")
METRICS = Path("metrics/external.json")
PLOTS = Path("plots/external")
INDEX = PLOTS / "index.json"


def main() -> None:
    params = load_params()
    sets = params.external.sets
    shutil.rmtree(PLOTS, ignore_errors=True)  # a set removed from params leaves no stale folder behind
    PLOTS.mkdir(parents=True)
    metrics = {}
    evaluate = params.evaluate  # the CIs and the Grad-CAM grid follow the evaluate stage's settings
    settings = dict(confidence_level=evaluate.confidence_level, bootstrap_resamples=evaluate.bootstrap_resamples,
                    seed=params.seed, gradcam_images=evaluate.gradcam_images, params_file=DEFAULT_PARAMS_FILE)
    if sets:
        # The model and its libraries load only when there is something to score.
        from chestct.external.panel import PanelSettings, check_sets, run_panel, summary_line
        from chestct.serving.predictor import Predictor

        check_sets(sets, Path("."))  # a bad path stops the stage before the model loads
        settings = PanelSettings(**settings)
        predictor = Predictor(EXPORT, formats=("keras",))  # the Keras format: Grad-CAM needs its gradients
        metrics, _ = run_panel(sets, predictor, PLOTS, settings)
        for name, figures in metrics.items():
            print(summary_line(name, figures), flush=True)
    write_json(INDEX, {"sets": [entry.model_dump(mode="json") for entry in sets],
                       "note": "one folder per set: report.json (every figure, what was skipped and why) and its "
                               "figures; metrics/external.json holds the flat figures"})
    write_json(METRICS, metrics)
    print(f"external: {len(sets)} set(s) scored -> {METRICS}" if sets else
          f"external: no set declared (external.sets is empty) -> empty {METRICS}")


if __name__ == "__main__":
    run_stage("external", main)
