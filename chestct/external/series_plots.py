"""The z-profile: a series' slice probabilities along the table position, with the threshold and (when known) the
slices that hold the tumour. The picture that shows at a glance whether a model follows the tumour: its curve
should rise on the marked slices and stay under the threshold elsewhere."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no display backend, no global state

from chestct.atomic_io import atomic_path
from chestct.external.series_scoring import SeriesScore


def _position(result: SeriesScore) -> tuple[np.ndarray, str]:
    """x values of the slices: z in mm when the series is ordered along z, else their order."""
    if result.series.profiled:
        return np.array([item.header.z for item in result.slices], float), "table position z (mm)"
    return np.arange(len(result.slices), dtype=float), "slice (in instance-number order: no usable z)"


def z_profile_figure(results: Sequence[SeriesScore], threshold: float, boxed: set[str] | None = None,
                     title: str = "Slice probability along z") -> Figure:
    """One panel per series; `boxed`: SOPInstanceUIDs of the slices that hold the tumour (marked in red)."""
    count = max(1, len(results))
    columns = 1 if count == 1 else 2
    rows = int(np.ceil(count / columns))
    figure = Figure(figsize=(6.4 * columns, 3.0 * rows))
    axes = np.atleast_1d(figure.subplots(rows, columns, squeeze=False)).ravel()
    for axis in axes[len(results):]:
        axis.axis("off")
    for axis, result in zip(axes, results, strict=False):
        x, x_label = _position(result)
        probability = np.array([np.nan if item.probability is None else item.probability for item in result.slices])
        axis.plot(x, probability, "-o", color="tab:blue", markersize=3, linewidth=1, label="slice probability")
        outside = np.array([item.in_lungs is False for item in result.slices])
        if outside.any():
            axis.plot(x[outside], probability[outside], "o", color="lightgray", markersize=3,
                      label="no lung fields found")
        if boxed:
            marked = np.array([item.header.sop_uid in boxed for item in result.slices])
            if marked.any():
                axis.plot(x[marked], probability[marked], "o", color="tab:red", markersize=6,
                          label="tumour slice (boxed)")
        axis.axhline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
        if result.top is not None:
            axis.plot([x[result.slices.index(result.top)]], [result.top.probability], "o", markersize=11,
                      markerfacecolor="none", markeredgecolor="black", label="the slice that gave the series score")
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel(x_label, fontsize=8)
        axis.set_ylabel("p(cancer)", fontsize=8)
        score = "no series score" if result.score is None else f"score {result.score:.3f}"
        axis.set_title(f"{result.series.label} ({len(result.slices)} slices, {score})", fontsize=9)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=6, loc="upper right")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def z_profile_png(path: Path, results: Sequence[SeriesScore], threshold: float, boxed: set[str] | None = None,
                  title: str = "Slice probability along z") -> Path:
    """The figure written to `path` (atomically)."""
    figure = z_profile_figure(results, threshold, boxed, title)
    with atomic_path(Path(path)) as temp:
        figure.savefig(temp, dpi=100, format="png")
    return Path(path)


def z_profile_png_bytes(results: Sequence[SeriesScore], threshold: float, title: str = "Slice probability along z"
                        ) -> bytes:
    """The figure as PNG bytes (the web page shows it inline)."""
    buffer = io.BytesIO()
    z_profile_figure(results, threshold, None, title).savefig(buffer, dpi=100, format="png")
    return buffer.getvalue()
