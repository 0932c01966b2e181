"""metadata.json (what a server needs to reproduce the model's input and decision) and MODEL_CARD.md."""

from __future__ import annotations

import hashlib
import json

from chestct.labels import CLASS_NAMES
from chestct.params import Params


def params_digest(params: Params) -> str:
    """sha256 of the validated params, independent of comments and key order in params.yaml."""
    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _summary(section: dict | None) -> dict | None:
    if not section:
        return None
    keys = ("n", "n_normal", "auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci",
            "ppv", "npv", "brier")
    return {key: section.get(key) for key in keys}


def build_metadata(params: Params, threshold: dict, artifacts: dict[str, dict], skipped: dict[str, str],
                   image_size: int, eval_metrics: dict | None) -> dict:
    return {
        "model": "chestct",
        "backbone": params.model.backbone,
        "weights": params.model.weights,
        "class_names": list(CLASS_NAMES),
        "positive_class": CLASS_NAMES[1],
        "threshold": threshold["threshold"],
        "threshold_method": threshold["method"],
        "threshold_chosen_on": threshold.get("chosen_on", "valid"),
        "decision": "Cancer when probability >= threshold",
        "input": {"shape": [image_size, image_size, 1], "dtype": "uint8",
                  "meaning": "grayscale after chestct.imaging.preprocess_image with the preprocess params below"},
        "output": {"shape": [1], "dtype": "float32", "meaning": "probability of Cancer"},
        "preprocess": params.preprocess.model_dump(mode="json"),
        "serve": params.serve.model_dump(mode="json"),
        "params_sha256": params_digest(params),
        "artifacts": artifacts,
        "skipped_formats": skipped,
        "metrics": {name: _summary((eval_metrics or {}).get(name)) for name in ("test", "test_leak_free", "valid")}
        | {"shortcut": (eval_metrics or {}).get("shortcut")},
    }


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_model_card(metadata: dict, data_metrics: dict | None) -> str:
    metrics, shortcut = metadata["metrics"], metadata["metrics"].get("shortcut") or {}
    rows = []
    for name, label in (("test", "official test"), ("test_leak_free", "leak-free test"), ("valid", "validation")):
        m = metrics.get(name)
        if m:
            rows.append(f"| {label} | {m['n']} ({m['n_normal']} normal) | {_fmt(m['auc'])} {_fmt(m['auc_ci'])} | "
                        f"{_fmt(m['sensitivity'])} {_fmt(m['sensitivity_ci'])} | "
                        f"{_fmt(m['specificity'])} {_fmt(m['specificity_ci'])} |")
    data = data_metrics or {}
    leaks = data.get("leaks", {})
    formats = "\n".join(f"| {name} | {a['file']} | {a['bytes'] / 1e6:.1f} MB | `{a['sha256'][:16]}…` |"
                        for name, a in metadata["artifacts"].items())
    skipped = "".join(f"\n- {name} not exported: {why}" for name, why in metadata["skipped_formats"].items())
    return f"""# Model card: chestct ({metadata['backbone']})

## Intended use
Research and education on chest CT classification (Normal vs Cancer). **Not for clinical use**: it was not
validated on any clinical population, and its test figures are inflated by the dataset's problems below.

## Data and its known problems
Kaggle "chest-ctscan-images" (1000 images: adenocarcinoma, large cell carcinoma, squamous cell carcinoma,
normal). {data.get('unique_sha256', 'n/a')} distinct files; test normals with a copy in train:
{leaks.get('test', {}).get('normal', 'n/a')}, validation normals with a copy in train:
{leaks.get('valid', {}).get('normal', 'n/a')}. The Normal class comes from a different source and differs from
Cancer in global brightness and contrast, so trivial intensity rules separate the classes.

## Training
Backbone {metadata['backbone']} (initial weights: {metadata['weights']}), channel and spatial attention, dense
head; phase 1 with the backbone frozen, phase 2 fine-tuning its last layers; balanced batches with augmentation;
model selection on the exact validation ROC AUC. Input: {metadata['input']['shape']} {metadata['input']['dtype']}
after CLAHE (clip {metadata['preprocess']['clahe']['clip_limit']}) and resizing to
{metadata['preprocess']['image_size']} px. Params digest `{metadata['params_sha256'][:16]}…`.

## Operating point
Threshold {_fmt(metadata['threshold'], 4)} ({metadata['threshold_method']}), chosen on the validation split only:
Cancer when the probability is at least the threshold.

| split | images | AUC [95% CI] | sensitivity [95% CI] | specificity [95% CI] |
|---|---|---|---|---|
{chr(10).join(rows)}

## Shortcut audit (test split)
| predictor | ROC AUC |
|---|---|
| this model | {_fmt(shortcut.get('model_auc'))} |
| this model on histogram-matched images | {_fmt(shortcut.get('hist_matched_model_auc'))} |
| intensity mean + std (logistic regression, fitted on train) | {_fmt(shortcut.get('intensity_std_auc'))} |
| 32-bin intensity histogram | {_fmt(shortcut.get('histogram_auc'))} |
| width, height, file format | {_fmt(shortcut.get('geometry_auc'))} |

If a trivial predictor matches the model, the official test split cannot tell them apart; a drop on
histogram-matched images shows reliance on global intensity.

## Limitations
- Small data: the leak-free test subset has few normals, so specificity intervals are wide.
- Confounded classes: high scores here do not show that the model recognises tumours.
- Single slices, no patient-level information; no external validation.

## Artifacts
| format | file | size | sha256 |
|---|---|---|---|
{formats}{skipped}
"""
