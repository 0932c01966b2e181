"""Acquisition robustness: does the model keep its skill when a slice is acquired or stored differently?

Each perturbation changes how a slice was windowed, exported or scanned, never what it shows: gamma, a window
shift, a narrower and a wider window, contrast around the slice's mean, JPEG re-encoding, down-then-up scaling,
additive Gaussian noise and its opposite (a light blur), a tighter and a wider field of view, and histogram
matching to a reference taken from the RAW train images. Every perturbation is applied to the RAW decoded
grayscale, before the pipeline's own preprocessing (chestct.imaging.preprocess.preprocess_gray), so the
preprocessing is part of what is tested: a step that removes a cue (a crop, an intensity standardisation) earns
its robustness here. Noise is seeded per image from the global seed: the suite is the same on every run.

A lesion detector keeps its AUC under all of them; a model that learned the window or the scanner loses it under
some (histogram matching takes the global intensity cue away). `robustness.worst_auc` names the worst.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from chestct.decision import decide
from chestct.evaluation.metrics import auc_with_interval
from chestct.evaluation.shortcuts import match_to_reference, raw_grayscale, reference_quantiles
from chestct.imaging.preprocess import preprocess_gray
from chestct.imaging.processed import SplitArrays
from chestct.params import Params, PreprocessParams, RobustnessParams

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # raw uint8 (H, W) -> uint8, any size


@dataclass(frozen=True)
class Perturbation:
    name: str
    apply: Transform


def _lookup(table: np.ndarray) -> Transform:
    table = np.clip(np.rint(table), 0, 255).astype(np.uint8)
    return lambda gray, rng: cv2.LUT(gray, table)


def _levels() -> np.ndarray:
    return np.arange(256, dtype=np.float64)


def gamma(value: float) -> Transform:
    return _lookup(255.0 * (_levels() / 255.0) ** value)


def window_shift(fraction: float) -> Transform:
    """The window's level moved by `fraction` of the grey range: every pixel brighter (or darker) by that much."""
    return _lookup(_levels() + 255.0 * fraction)


def window_width(fraction: float) -> Transform:
    """A window `fraction` as wide as the stored one, around mid-grey: < 1 narrows it (more contrast)."""
    return _lookup((_levels() - 127.5) / fraction + 127.5)


def contrast(factor: float) -> Transform:
    def apply(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        mean = float(gray.mean())
        return _lookup((_levels() - mean) * factor + mean)(gray, rng)

    return apply


def jpeg(quality: int) -> Transform:
    def apply(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ok, encoded = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)

    return apply


def rescale(factor: float) -> Transform:
    """Down to `factor` of the size and back up: the detail a lower-resolution scan or export loses."""

    def apply(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = gray.shape
        small = cv2.resize(gray, (max(1, round(width * factor)), max(1, round(height * factor))),
                           interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)

    return apply


def gaussian_noise(std_fraction: float) -> Transform:
    def apply(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noisy = gray.astype(np.float32) + rng.normal(0.0, 255.0 * std_fraction, gray.shape).astype(np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)

    return apply


def blur(sigma: float) -> Transform:
    return lambda gray, rng: cv2.GaussianBlur(gray, (0, 0), sigmaX=float(sigma))


def field_of_view(fraction: float) -> Transform:
    """< 1: keep the central `fraction` of each side (a tighter field of view); > 1: pad with black to it."""

    def apply(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = gray.shape
        if fraction < 1:
            new_h, new_w = max(1, round(height * fraction)), max(1, round(width * fraction))
            top, left = (height - new_h) // 2, (width - new_w) // 2
            return np.ascontiguousarray(gray[top:top + new_h, left:left + new_w])
        new_h, new_w = round(height * fraction), round(width * fraction)
        canvas = np.zeros((new_h, new_w), np.uint8)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        canvas[top:top + height, left:left + width] = gray
        return canvas

    return apply


def histogram_match(reference: np.ndarray) -> Transform:
    return lambda gray, rng: match_to_reference(gray, reference)


def _number(value: float) -> str:
    """0.6 -> "0p6", -0.1 -> "minus_0p1": names without dots, since DVC joins nested metric keys with dots."""
    text = f"{abs(value):g}".replace(".", "p")
    return f"minus_{text}" if value < 0 else text


def build_perturbations(params: RobustnessParams, reference: np.ndarray | None) -> list[Perturbation]:
    """The suite `evaluate.robustness` asks for, in a fixed order; `reference`: raw-train quantiles."""
    suite = [Perturbation(f"gamma_{_number(value)}", gamma(value)) for value in params.gamma]
    suite += [Perturbation(f"window_shift_{_number(value)}", window_shift(value)) for value in params.window_shift]
    suite += [Perturbation(f"window_width_{_number(value)}", window_width(value)) for value in params.window_width]
    suite += [Perturbation(f"contrast_{_number(value)}", contrast(value)) for value in params.contrast]
    suite += [Perturbation(f"jpeg_q{value}", jpeg(value)) for value in params.jpeg_quality]
    suite += [Perturbation(f"rescale_{_number(value)}", rescale(value)) for value in params.rescale]
    suite += [Perturbation(f"noise_{_number(value)}", gaussian_noise(value)) for value in params.noise_std]
    suite += [Perturbation(f"blur_{_number(value)}", blur(value)) for value in params.blur_sigma]
    suite += [Perturbation(f"field_of_view_{_number(value)}", field_of_view(value)) for value in params.field_of_view]
    if params.histogram_match:
        if reference is None:
            raise ValueError("histogram matching needs a reference from the train images")
        suite.append(Perturbation("histogram_match", histogram_match(reference)))
    return suite


def raw_reference(train_grays: Sequence[np.ndarray]) -> np.ndarray:
    """The histogram-matching target: the mean quantile function of the raw train images (any sizes)."""
    return reference_quantiles(train_grays)


def perturbed_input(gray: np.ndarray, index: int, perturbation: Perturbation, preprocess: PreprocessParams,
                    seed: int) -> np.ndarray:
    """The model's input (S, S, 1) for raw image number `index` under `perturbation`; its noise is seeded
    [seed, index], so the suite is the same on every run."""
    return preprocess_gray(perturbation.apply(gray, np.random.default_rng([seed, index])), preprocess)


def perturbed_inputs(grays: Sequence[np.ndarray], perturbation: Perturbation, preprocess: PreprocessParams,
                     seed: int) -> np.ndarray:
    """The model's inputs (N, S, S, 1) for the perturbed raw images."""
    return np.stack([perturbed_input(gray, index, perturbation, preprocess, seed) for index, gray in enumerate(grays)])


def robustness_report(predict: Callable[[np.ndarray], np.ndarray], grays: Sequence[np.ndarray],
                      labels: np.ndarray, threshold: float, clean_auc: float | None, suite: list[Perturbation],
                      preprocess: PreprocessParams, level: float, resamples: int, seed: int) -> dict:
    """AUC with its bootstrap CI, sensitivity and specificity at the stored threshold, per perturbation.

    `predict` maps model inputs (N, S, S, 1) uint8 to cancer probabilities (N,). `worst_auc` is the lowest AUC
    over the suite and `worst` its name; `worst_drop` how far that lies below the clean AUC.
    """
    labels = np.asarray(labels, int)
    report: dict = {"perturbations": {}}
    for perturbation in suite:
        scores = np.asarray(predict(perturbed_inputs(grays, perturbation, preprocess, seed)), np.float64)
        decisions = decide(scores, threshold)
        auc, auc_ci = auc_with_interval(labels, scores, level, resamples, seed)
        report["perturbations"][perturbation.name] = {
            "auc": auc, "auc_ci": auc_ci,
            "sensitivity": float(decisions[labels == 1].mean()) if np.any(labels == 1) else None,
            "specificity": float(1 - decisions[labels == 0].mean()) if np.any(labels == 0) else None}
    scored = {name: entry["auc"] for name, entry in report["perturbations"].items() if entry["auc"] is not None}
    worst = min(scored, key=scored.get) if scored else None
    report["clean_auc"] = clean_auc
    report["worst"] = worst
    report["worst_auc"] = scored[worst] if worst else None
    report["worst_drop"] = (clean_auc - scored[worst]) if worst and clean_auc is not None else None
    return report


def perturbed_mixture(grays: Sequence[np.ndarray], suite: list[Perturbation], preprocess: PreprocessParams,
                      seed: int) -> tuple[np.ndarray, list[str]]:
    """One fixed perturbed copy of a split: image i gets perturbation i mod len(suite) (noise seeded [seed, i]),
    then the pipeline's preprocessing. Training selects epochs on it (train.selection: val_auc_robust)."""
    if not suite:
        raise ValueError("the robustness suite is empty: enable at least one perturbation in evaluate.robustness")
    chosen = [suite[index % len(suite)] for index in range(len(grays))]
    images = np.stack([perturbed_input(gray, index, perturbation, preprocess, seed)
                       for index, (gray, perturbation) in enumerate(zip(grays, chosen, strict=True))])
    return images, [perturbation.name for perturbation in chosen]


def perturbed_split(split: SplitArrays, raw_data: Path, train_ids: Sequence[str], params: Params
                    ) -> tuple[SplitArrays, list[str]]:
    """`split` re-read from the raw images in `raw_data` under perturbed_mixture (the histogram-matching reference
    from the raw `train_ids`), with the perturbation each image got. The robust_valid stage's copy of validation,
    and the out_of_fold stage's copy of train + valid."""
    robustness = params.evaluate.robustness
    reference = raw_reference(raw_grayscale(train_ids, raw_data)) if robustness.histogram_match else None
    images, names = perturbed_mixture(raw_grayscale(split.ids, raw_data), build_perturbations(robustness, reference),
                                      params.preprocess, params.seed)
    return SplitArrays(images=images, labels=split.labels, subtypes=split.subtypes, ids=split.ids), names
