"""MODEL_CARD.md: generated from the export's metadata and metrics/data.json, never from fixed prose.

Every figure in the card (data size, leaks, confidence level, histogram bins, the operating point, the shortcut
audit, the artifacts) comes from the run that produced the model; where a figure is missing it says "n/a".
"""

from __future__ import annotations

from pathlib import Path

from chestct.export.metadata import ExportMetadata
from chestct.params import PreprocessParams

MODEL_CARD_FILE = "MODEL_CARD.md"


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _percent(level: float) -> str:
    return f"{100 * level:g}%"


def _data_section(data: dict) -> str:
    splits = data.get("splits") or {}
    leaks = data.get("leaks") or {}
    per_split = ", ".join(f"{name} {counts.get('total', 'n/a')} ({counts.get('normal', 'n/a')} normal)"
                          for name, counts in splits.items()) or "n/a"
    unreadable = (data.get("unreadable") or {}).get("count", "n/a")
    return (f"Source: `{data.get('source', 'n/a')}`; {data.get('images_found', 'n/a')} image files found, "
            f"{data.get('unique_sha256', 'n/a')} distinct contents, {unreadable} unreadable. Split used: "
            f"{per_split} (split.dedup: {(data.get('dedup') or {}).get('mode', 'n/a')}). Test normals with a copy "
            f"in train: {(leaks.get('test') or {}).get('normal', 'n/a')}; validation normals with a copy in train: "
            f"{(leaks.get('valid') or {}).get('normal', 'n/a')}.")


def _left_out_lines(metadata: ExportMetadata) -> str:
    """One bullet per quantized format removed from the export, with the reason and the figures measured."""
    lines = []
    for name, record in metadata.left_out_formats.items():
        figures = ""
        if record.max_abs_diff is not None and record.decision_agreement is not None:
            figures = (f" Measured on the test split: max |p - p_keras| {record.max_abs_diff:.4g} (limit "
                       f"{record.tolerance:g}), decision agreement {record.decision_agreement:.4f} (required "
                       f"{record.required_agreement:.4f}).")
        lines.append(f"\n- {name} left out: it failed the parity check against the Keras model ({record.reason})."
                     f"{figures}")
    return "".join(lines)


def _chosen_on(metadata: ExportMetadata) -> str:
    if metadata.threshold_chosen_on == "out_of_fold":
        return "out-of-fold scores over train + valid (evaluate.threshold.chosen_on, never the test split)"
    return f"the {metadata.threshold_chosen_on} split"


def _limitations(metadata: ExportMetadata, data: dict) -> list[str]:
    lines = []
    leak_free = metadata.metrics.get("test_leak_free") or {}
    if leak_free.get("n_normal") is not None:
        lines.append(f"The leak-free test subset holds {leak_free['n_normal']} normal images, so its specificity "
                     f"interval is {_fmt(leak_free.get('specificity_ci'))}.")
    valid = metadata.metrics.get("valid") or {}
    pool = metadata.metrics.get("out_of_fold")  # the threshold's pool, with chosen_on out_of_fold
    if pool is not None:
        lines.append(f"The threshold was chosen on out-of-fold scores of {pool['images']} train + valid images "
                     f"({pool['normal_slices']} distinct Normal slices) from {pool['folds']} fold models, then "
                     "applied to this model, which the same recipe trained on train alone.")
    elif valid.get("n_normal") is not None:
        lines.append(f"The threshold was chosen on {valid.get('n')} validation images ({valid['n_normal']} normal): "
                     f"an operating point from so few images may not transfer.")
    shortcut = metadata.metrics.get("shortcut") or {}
    model_auc, trivial = shortcut.get("model_auc"), shortcut.get("intensity_std_auc")
    if model_auc is not None and trivial is not None and trivial >= model_auc:
        lines.append(f"A two-number intensity rule (AUC {_fmt(trivial)}) matches or beats the model "
                     f"(AUC {_fmt(model_auc)}) on the test split: these figures do not show that it recognises "
                     f"tumours.")
    lines.append("Single slices, no patient-level information.")
    lines.append("External validation: not part of this export (the card is written with the model, before any "
                 "`chestct evaluate-external` run on it; see reports/external/).")
    return lines


def _kept(preprocess: PreprocessParams) -> str:
    """The region the input keeps (non-zero), in words."""
    return "the lung fields" if preprocess.mask == "lungs" else "the body"


def _crop_step(preprocess: PreprocessParams) -> str:
    zeroed = f"zero outside {_kept(preprocess)}"
    if preprocess.mask == "lungs":
        zeroed += f" grown by {preprocess.mask_margin:g}, or outside the body where no lung is found"
    region = "lung fields" if preprocess.crop == "lungs" else "body"
    return f"crop to the {region} (margin {preprocess.crop_margin:g}, {zeroed})"


def preprocessing_steps(preprocess: PreprocessParams) -> list[str]:
    """The deterministic preprocessing in the order chestct.imaging.preprocess applies it, in words."""
    steps = ["decode to grayscale"]
    if preprocess.crop != "none":
        steps.append(_crop_step(preprocess))
    if preprocess.clahe.enabled:
        steps.append(f"CLAHE (clip {preprocess.clahe.clip_limit:g}, {preprocess.clahe.tile_grid} tiles a side)")
    if preprocess.window.enabled:
        steps.append(f"window {preprocess.window.center:g}/{preprocess.window.width:g}")
    steps.append(f"{preprocess.resize_mode} to {preprocess.image_size} px")
    denoise = preprocess.denoise
    if denoise.method != "none":
        steps.append(f"{denoise.method} denoising at {denoise.strength:g}x the slice's noise")
    if denoise.renoise:
        steps.append(f"a fixed noise floor of {denoise.renoise:g} grey levels")
    if preprocess.intensity == "equalise_in_mask":
        steps.append(f"histogram equalisation inside {_kept(preprocess)}")
    elif preprocess.intensity == "percentile":
        low, high = preprocess.percentile
        steps.append(f"percentiles {low:g}-{high:g} inside {_kept(preprocess)} mapped to 1-255")
    return steps


def _source_line(metadata: ExportMetadata) -> str:
    source = metadata.source
    if source.git_revision is None:
        return "an unknown commit (not a git checkout, or an export older than schema 2.2)"
    version = f", registered as {source.artifact_version}" if source.artifact_version else ""
    return f"commit `{source.git_revision[:12]}`{version}"


def render_model_card(metadata: ExportMetadata, data_metrics: dict | None) -> str:
    data = data_metrics or {}
    settings = metadata.evaluation
    level = _percent(settings.confidence_level)
    shortcut = metadata.metrics.get("shortcut") or {}
    rows = []
    for name, label in (("test", "official test"), ("test_leak_free", "leak-free test"), ("valid", "validation")):
        m = metadata.metrics.get(name)
        if m:
            rows.append(f"| {label} | {m['n']} ({m['n_normal']} normal) | {_fmt(m['auc'])} {_fmt(m['auc_ci'])} | "
                        f"{_fmt(m['sensitivity'])} {_fmt(m['sensitivity_ci'])} | "
                        f"{_fmt(m['specificity'])} {_fmt(m['specificity_ci'])} |")
    formats = "\n".join(f"| {name} | {a.file} | {a.bytes / 1e6:.1f} MB | `{a.sha256[:16]}…` |"
                        for name, a in metadata.artifacts.items())
    skipped = "".join(f"\n- {name} not exported: {why}" for name, why in metadata.skipped_formats.items())
    skipped += _left_out_lines(metadata)
    if skipped:
        skipped = "\n" + skipped  # a blank line ends the table before the list
    steps = preprocessing_steps(metadata.preprocess)
    limitations = "\n".join(f"- {line}" for line in _limitations(metadata, data))
    versions = ", ".join(f"{name} {version}" for name, version in metadata.versions.items())
    return f"""# Model card: chestct ({metadata.backbone})

## Intended use
Research and education on chest CT classification (Normal vs Cancer). **Not for clinical use**: it was not
validated on any clinical population.

## Data
{_data_section(data)}

## Training
Backbone {metadata.backbone} (initial weights: {metadata.weights}), channel and spatial attention, dense head;
phase 1 with the backbone frozen, phase 2 fine-tuning its last layers; model selection on the exact validation
ROC AUC. Input: {metadata.input.shape} {metadata.input.dtype} after {", ".join(steps)}.
Params digest `{metadata.params_sha256[:16]}…`; written by {versions}.
Built from {_source_line(metadata)}.

## Operating point
Threshold {_fmt(metadata.threshold, 4)} ({metadata.threshold_method}), chosen on {_chosen_on(metadata)} only:
{metadata.decision}.
The probability shown is {metadata.calibration.describe()}; on its scale the threshold is
{_fmt(float(metadata.calibration.apply(metadata.threshold)), 4)}, with the same decisions.
Domain check: {_domain_line(metadata)}

| split | images | AUC [{level} CI] | sensitivity [{level} CI] | specificity [{level} CI] |
|---|---|---|---|---|
{chr(10).join(rows)}

Intervals: {settings.bootstrap_resamples} stratified bootstrap resamples for AUC, Wilson intervals for rates.

## Shortcut audit (test split)
| predictor | ROC AUC |
|---|---|
| this model | {_fmt(shortcut.get('model_auc'))} |
| this model on histogram-matched images | {_fmt(shortcut.get('hist_matched_model_auc'))} |
| intensity mean + std (logistic regression, fitted on train) | {_fmt(shortcut.get('intensity_std_auc'))} |
| {settings.histogram_bins}-bin intensity histogram | {_fmt(shortcut.get('histogram_auc'))} |
| width, height, file format | {_fmt(shortcut.get('geometry_auc'))} |

If a trivial predictor matches the model, the test split cannot tell them apart; a drop on histogram-matched
images shows reliance on global intensity.

## Limitations
{limitations}

## Artifacts
| format | file | size | sha256 |
|---|---|---|---|
{formats}{skipped}
"""


def _domain_line(metadata: ExportMetadata) -> str:
    first = "every answer says whether the image passed the axial-chest-CT checks (body outline, lung fields)"
    record = metadata.domain
    if record is None:
        return first + "; this export has no feature-distance check (evaluate.domain.enabled was off, or it is older)."
    return (f"{first} and whether its pooled features lie within distance {_fmt(record.cut, 2)} of the training "
            f"images' (the {record.quantile:g} quantile of {record.cut_basis}). In domain "
            f"does not mean right: an image like the validation images can still be misread.")


def write_model_card(folder: Path, metadata: ExportMetadata, data_metrics: dict | None) -> Path:
    path = folder / MODEL_CARD_FILE
    path.write_text(render_model_card(metadata, data_metrics))
    return path
