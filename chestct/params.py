"""Load and validate params.yaml into typed objects.

Every section is a pydantic model that forbids unknown keys, so a typo such as `learnig_rate` fails at once
with a message naming the key instead of silently using a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from chestct.errors import ChestctError

DEFAULT_PARAMS_FILE = Path("params.yaml")

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class ParamsError(ChestctError, ValueError):
    """params.yaml is missing, unreadable or holds a wrong key or value."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _ordered_pair(pair: tuple[float, float], name: str) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(pair)}")
    return pair


# --- data -------------------------------------------------------------------------------------------------


class PerSplitCounts(Section):
    train: NonNegativeInt
    valid: NonNegativeInt
    test: NonNegativeInt


class SyntheticParams(Section):
    seed: int
    normal: PerSplitCounts
    cancer: PerSplitCounts
    min_size: Annotated[int, Field(ge=32, le=4096)]
    max_size: Annotated[int, Field(ge=32, le=4096)]
    duplicates: NonNegativeInt

    @model_validator(mode="after")
    def _sizes_ordered(self) -> SyntheticParams:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        return self


class DataParams(Section):
    source: Literal["kaggle", "local", "synthetic"]
    kaggle_dataset: str
    local_path: str | None
    synthetic: SyntheticParams


# --- split ------------------------------------------------------------------------------------------------


class SplitFractions(Section):
    train: Annotated[float, Field(gt=0.0, lt=1.0)]
    valid: Annotated[float, Field(gt=0.0, lt=1.0)]
    test: Annotated[float, Field(gt=0.0, lt=1.0)]

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitFractions:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + valid + test must sum to 1, got {total:g}")
        return self


class SplitParams(Section):
    dedup: Literal["keep", "drop_leaks", "regroup"]
    near_duplicate_distance: Annotated[int, Field(ge=0, le=32)]
    fractions: SplitFractions
    on_unreadable: Literal["fail", "skip"]


# --- preprocess -------------------------------------------------------------------------------------------


class ClaheParams(Section):
    enabled: bool
    clip_limit: Annotated[float, Field(gt=0.0, le=100.0)]
    tile_grid: Annotated[int, Field(ge=1, le=64)]


class WindowParams(Section):
    enabled: bool
    center: Annotated[float, Field(ge=0.0, le=255.0)]
    width: Annotated[float, Field(gt=0.0, le=512.0)]


class DenoiseParams(Section):
    method: Literal["none", "nlmeans", "bilateral"]
    strength: Annotated[float, Field(gt=0.0, le=10.0)]
    # Exports made before the noise floor existed carry no `renoise`: they had none.
    renoise: Annotated[float, Field(ge=0.0, le=64.0)] = 0.0


class PreprocessParams(Section):
    image_size: Annotated[int, Field(ge=16, le=2048)]
    resize_mode: Literal["pad", "stretch"]
    crop: Literal["none", "body", "lungs"]
    crop_margin: Annotated[float, Field(ge=0.0, le=0.5)]
    # Exports made before the lung mask existed carry neither key: they kept the body.
    mask: Literal["body", "lungs"] = "body"
    mask_margin: Annotated[float, Field(ge=0.0, le=0.25)] = 0.0
    clahe: ClaheParams
    window: WindowParams
    denoise: DenoiseParams
    intensity: Literal["none", "equalise_in_mask", "percentile"]
    percentile: tuple[Annotated[float, Field(ge=0.0, le=100.0)], Annotated[float, Field(ge=0.0, le=100.0)]]
    workers: Annotated[int, Field(ge=1, le=256)]
    shard_images: Annotated[int, Field(ge=1, le=1_000_000)]

    @model_validator(mode="after")
    def _percentiles_ordered(self) -> PreprocessParams:
        if self.percentile[0] >= self.percentile[1]:
            raise ValueError(f"percentile must be [low, high] with low < high, got {list(self.percentile)}")
        return self

    @model_validator(mode="after")
    def _lung_mask_needs_lung_crop(self) -> PreprocessParams:
        if self.mask == "lungs" and self.crop != "lungs":
            raise ValueError(f"mask: lungs keeps the lung fields found while cropping to them; set crop: lungs "
                             f"(got crop: {self.crop}) or mask: body")
        return self


# --- model ------------------------------------------------------------------------------------------------


class AttentionParams(Section):
    ratio: Annotated[int, Field(ge=1, le=256)]
    kernel_size: Annotated[int, Field(ge=1, le=15)]


class HeadParams(Section):
    units: Annotated[list[PositiveInt], Field(min_length=1)]
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]
    l2: Annotated[float, Field(ge=0.0)]
    batchnorm_momentum: Annotated[float, Field(gt=0.0, lt=1.0)]
    input_noise_stddev: Annotated[float, Field(ge=0.0)]


UnfreezeAmount = Annotated[float, Field(gt=0.0)]
# Names of registry entries (backbones, export formats). The registries themselves live with the code that uses
# them (chestct.training.backbones, chestct.export.formats) and check the names there; `chestct check-params`
# checks them too, so a typo is caught before any stage runs.
RegistryName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]


class BackboneBatchnormParams(Section):
    mode: Literal["auto", "frozen", "trainable"]
    momentum: Annotated[float, Field(gt=0.0, lt=1.0)]


class LesionMapParams(Section):
    """model.lesion_map: a per-position lesion probability map, the slice score pooled from it."""

    enabled: bool = False
    stride: Literal[8, 16] = 8
    pooling: Literal["max", "top_k", "lse"] = "lse"
    top_k: PositiveInt = 4
    lse_sharpness: Annotated[float, Field(gt=0.0, le=100.0)] = 5.0
    decoder_channels: PositiveInt = 64
    min_lung_coverage: Probability = 0.25


class ModelParams(Section):
    backbone: RegistryName
    weights: str | None
    attention: AttentionParams
    head: HeadParams
    unfreeze: dict[RegistryName, UnfreezeAmount]
    backbone_batchnorm: BackboneBatchnormParams
    lesion_map: LesionMapParams = LesionMapParams()


# --- augment ----------------------------------------------------------------------------------------------


class RotationParams(Section):
    probability: Probability
    degrees: Annotated[float, Field(ge=0.0, le=180.0)]


class FractionAugParams(Section):
    probability: Probability
    fraction: Annotated[float, Field(ge=0.0, lt=1.0)]


class ShearParams(Section):
    probability: Probability
    factor: Annotated[float, Field(ge=0.0, le=1.0)]


class FlipParams(Section):
    probability: Probability
    mode: Literal["horizontal", "vertical", "horizontal_and_vertical"]


class BrightnessParams(Section):
    probability: Probability
    delta: Annotated[float, Field(ge=0.0, le=1.0)]


class FactorRangeParams(Section):
    probability: Probability
    range: tuple[Annotated[float, Field(ge=0.0)], Annotated[float, Field(ge=0.0)]]

    @model_validator(mode="after")
    def _ordered(self) -> FactorRangeParams:
        _ordered_pair(self.range, "range")
        return self


class HuWindowParams(Section):
    probability: Probability
    center: tuple[Annotated[float, Field(ge=0.0, le=255.0)], Annotated[float, Field(ge=0.0, le=255.0)]]
    width: tuple[Annotated[float, Field(gt=0.0, le=512.0)], Annotated[float, Field(gt=0.0, le=512.0)]]

    @model_validator(mode="after")
    def _ordered(self) -> HuWindowParams:
        _ordered_pair(self.center, "center")
        _ordered_pair(self.width, "width")
        return self


class WindowLevelParams(Section):
    probability: Probability
    shift: Annotated[float, Field(ge=0.0, lt=1.0)]
    width: tuple[Annotated[float, Field(gt=0.0, le=10.0)], Annotated[float, Field(gt=0.0, le=10.0)]]

    @model_validator(mode="after")
    def _ordered(self) -> WindowLevelParams:
        _ordered_pair(self.width, "width")
        return self


class NoiseParams(Section):
    probability: Probability
    std: Annotated[float, Field(ge=0.0, lt=1.0)]


class BlurParams(Section):
    probability: Probability
    sigma: Annotated[float, Field(gt=0.0, le=10.0)]
    strength: Annotated[float, Field(ge=0.0, le=3.0)]


class JpegParams(Section):
    probability: Probability
    quality: tuple[Annotated[int, Field(ge=1, le=100)], Annotated[int, Field(ge=1, le=101)]]

    @model_validator(mode="after")
    def _ordered(self) -> JpegParams:
        if self.quality[0] >= self.quality[1]:
            raise ValueError(f"quality must be [low, high) with low < high, got {list(self.quality)}")
        return self


class MixupParams(Section):
    probability: Probability
    alpha: Annotated[float, Field(gt=0.0)]


class LesionInsertionParams(Section):
    """augment.lesion_insertion: how a lesion is put into a Normal training slice (chestct.training.lesions)."""

    diameter: tuple[Annotated[float, Field(gt=0.0, le=0.6)], Annotated[float, Field(gt=0.0, le=0.6)]] = (0.08, 0.2)
    border_margin: Annotated[float, Field(ge=0.0, le=0.3)] = 0.03
    contrast: tuple[Annotated[float, Field(ge=0.0, le=2.0)], Annotated[float, Field(ge=0.0, le=2.0)]] = (0.8, 1.1)
    variants: PositiveInt = 6

    @model_validator(mode="after")
    def _ordered(self) -> LesionInsertionParams:
        _ordered_pair(self.diameter, "diameter")
        _ordered_pair(self.contrast, "contrast")
        return self


class AugmentParams(Section):
    rotation: RotationParams
    shift: FractionAugParams
    zoom: FractionAugParams
    shear: ShearParams
    flip: FlipParams
    brightness: BrightnessParams
    contrast: FactorRangeParams
    sharpness: FactorRangeParams
    hu_window: HuWindowParams
    window_level: WindowLevelParams
    gamma: FactorRangeParams
    noise: NoiseParams
    blur: BlurParams
    jpeg: JpegParams
    mixup: MixupParams
    lesion_insertion: LesionInsertionParams = LesionInsertionParams()


# --- train ------------------------------------------------------------------------------------------------


class LossParams(Section):
    name: Literal["focal", "bce"]
    gamma: Annotated[float, Field(ge=0.0)]
    alpha: Annotated[float, Field(gt=0.0, lt=1.0)]
    label_smoothing: Annotated[float, Field(ge=0.0, lt=0.5)]


class ReduceLrParams(Section):
    factor: Annotated[float, Field(gt=0.0, lt=1.0)]
    patience: NonNegativeInt
    min_lr: Annotated[float, Field(ge=0.0)]


class PhaseParams(Section):
    epochs: PositiveInt
    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)]


class LesionSupervisionParams(Section):
    """train.lesion_supervision: dense lesion-map targets mixed into training (needs model.lesion_map)."""

    map_loss_weight: Annotated[float, Field(ge=0.0)] = 1.0
    procedural_rate: Probability = 0.0
    bank_rate: Probability = 0.0
    crop_rate: Probability = 0.0
    bank_path: str = "../shared/data/lidc-nodules"

    @property
    def source_rates(self) -> dict[str, float]:
        """The share of the Normal half each source of outlined lesions takes, by source name."""
        return {"procedural": self.procedural_rate, "bank": self.bank_rate, "crop": self.crop_rate}

    @property
    def reads_bank(self) -> bool:
        """Whether training reads the nodule bank (pasted nodules or crops at their own scale)."""
        return self.bank_rate > 0 or self.crop_rate > 0

    @model_validator(mode="after")
    def _rates(self) -> LesionSupervisionParams:
        if sum(self.source_rates.values()) > 1.0:
            terms = " + ".join(f"{rate}" for rate in self.source_rates.values())
            raise ValueError(f"procedural_rate + bank_rate + crop_rate must not exceed 1 (they share the Normal "
                             f"half of a batch), got {terms}")
        return self


class TrainParams(Section):
    batch_size: Annotated[int, Field(ge=2)]
    balanced_batches: bool
    shuffle_buffer: PositiveInt
    steps_per_epoch: PositiveInt
    validation_batch_size: PositiveInt
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16", "auto"]
    distribute: Literal["none", "mirrored", "multi_worker"]
    deterministic: bool
    loss: LossParams
    early_stopping_patience: NonNegativeInt
    selection: Literal["val_auc", "val_auc_robust", "val_auc_lesion"]
    reduce_lr: ReduceLrParams
    phase1: PhaseParams
    phase2: PhaseParams
    lesion_supervision: LesionSupervisionParams = LesionSupervisionParams()


# --- evaluate, export, serve ------------------------------------------------------------------------------


class ThresholdParams(Section):
    method: Literal["youden", "youden_prior", "target_sensitivity", "fixed"]
    sensitivity: Annotated[float, Field(gt=0.0, le=1.0)]
    fixed: Annotated[float, Field(gt=0.0, lt=1.0)]
    prior: Annotated[float, Field(gt=0.0, lt=1.0)]
    # valid, or out_of_fold: scores of k fold models over train + valid (stage out_of_fold, chestct/training/folds.py)
    chosen_on: Literal["valid", "out_of_fold"] = "valid"
    folds: Annotated[int, Field(ge=2, le=20)] = 3


class CalibrationParams(Section):
    """evaluate.calibration: the map from score to probability, fitted where the threshold is chosen."""

    method: Literal["none", "temperature", "platt", "isotonic"] = "isotonic"
    bins: Annotated[int, Field(ge=2, le=50)] = 10


class DomainParams(Section):
    """evaluate.domain: the second layer of the domain check, a distance in the model's own feature space."""

    enabled: bool = True
    # The cut: this quantile of held-out distances (0.99: 1 in 100 in-domain images is flagged).
    quantile: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.99
    # Which held-out distances: the validation images', or those and the training images' cross-fitted ones.
    cut_on: Literal["valid", "cross_fitted"] = "cross_fitted"
    folds: Annotated[int, Field(ge=2, le=20)] = 5  # for cut_on cross_fitted: stratified folds of the training images


class RobustnessParams(Section):
    enabled: bool
    gamma: list[Annotated[float, Field(gt=0.0, le=10.0)]]
    window_shift: list[Annotated[float, Field(gt=-1.0, lt=1.0)]]
    window_width: list[Annotated[float, Field(ge=0.1, le=10.0)]]
    contrast: list[Annotated[float, Field(gt=0.0, le=10.0)]]
    jpeg_quality: list[Annotated[int, Field(ge=1, le=100)]]
    rescale: list[Annotated[float, Field(gt=0.0, lt=1.0)]]
    noise_std: list[Annotated[float, Field(gt=0.0, lt=1.0)]]
    blur_sigma: list[Annotated[float, Field(gt=0.0, le=20.0)]]
    field_of_view: list[Annotated[float, Field(ge=0.3, le=3.0)]]
    histogram_match: bool


class EvaluateParams(Section):
    threshold: ThresholdParams
    calibration: CalibrationParams = CalibrationParams()
    domain: DomainParams = DomainParams()
    bootstrap_resamples: Annotated[int, Field(ge=100)]
    confidence_level: Annotated[float, Field(gt=0.5, lt=1.0)]
    histogram_bins: Annotated[int, Field(ge=2, le=256)]
    gradcam_images: NonNegativeInt
    attention: bool
    robustness: RobustnessParams
    audit_max_train_images: Annotated[int, Field(ge=2)] | None = None


class ExportParams(Section):
    formats: Annotated[list[RegistryName], Field(min_length=1)]
    float_tolerance: Annotated[float, Field(gt=0.0)]
    quantized_tolerance: Annotated[float, Field(gt=0.0)]
    min_decision_agreement: Probability
    require_all: bool
    latency_runs: PositiveInt


class DicomWindowParams(Section):
    center: float
    width: Annotated[float, Field(gt=0.0)]


class ServeParams(Section):
    max_upload_mb: Annotated[float, Field(gt=0.0)]
    max_files: PositiveInt
    max_pixels: PositiveInt
    dicom_window: DicomWindowParams
    max_concurrent: PositiveInt
    queue_timeout_s: Annotated[float, Field(ge=0.0)]
    body_timeout_s: Annotated[float, Field(gt=0.0)]
    max_connections: PositiveInt
    # A connection whose request headers are not complete this long after it opened (or after its last response)
    # gets 408 and is closed; one address holds at most max_connections_per_client (chestct.serving.connection_guard).
    header_timeout_s: Annotated[float, Field(gt=0.0)] = 10.0
    max_connections_per_client: PositiveInt = 16
    # On SIGTERM the requests in flight get this long to finish before they are cancelled (chestct.serving.shutdown).
    shutdown_grace_s: Annotated[float, Field(gt=0.0)] = 30.0
    refuse_out_of_domain: bool = False  # true: an image the domain check refuses gets 422, not a flagged answer


# --- external: the cross-source panel ---------------------------------------------------------------------

SetName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$", max_length=64)]


class ExternalSetParams(Section):
    """One declared set of scans from another source, scored by the `external` stage (chestct/external/panel.py)."""

    name: SetName  # the prefix of its keys in metrics/external.json: letters, digits, _ and - (no dots)
    path: Annotated[str, Field(min_length=1)]  # its folder, relative to the project root or absolute
    kind: Literal["labelled", "normal_only", "annotated_series"]
    label_map: list[str] | None = None  # labelled only: FOLDER=LABEL entries, as `chestct evaluate-external` takes

    @model_validator(mode="after")
    def _label_map_for_labelled_only(self) -> ExternalSetParams:
        if self.kind == "labelled" and not self.label_map:
            raise ValueError(f"set {self.name!r} is labelled: give its label_map, e.g. "
                             f'["Normal cases=0", "Malignant cases=1"]')
        if self.kind != "labelled" and self.label_map is not None:
            raise ValueError(f"set {self.name!r} is {self.kind}: label_map is for labelled sets only; remove it")
        return self


class ExternalParams(Section):
    sets: list[ExternalSetParams] = []

    @model_validator(mode="after")
    def _names_unique(self) -> ExternalParams:
        names = [entry.name for entry in self.sets]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"set names repeat ({', '.join(repeated)}): each set needs its own name, the prefix "
                             f"of its keys in metrics/external.json")
        return self


class Params(Section):
    seed: int
    data: DataParams
    split: SplitParams
    preprocess: PreprocessParams
    model: ModelParams
    augment: AugmentParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    serve: ServeParams
    # Params files written before the cross-source stage have no `external` section: no sets.
    external: ExternalParams = ExternalParams()

    @model_validator(mode="after")
    def _supervision_needs_a_map(self) -> Params:
        supervision = self.train.lesion_supervision
        if any(supervision.source_rates.values()) and not self.model.lesion_map.enabled:
            raise ValueError("train.lesion_supervision: outlined lesions train the lesion map; set "
                             "model.lesion_map.enabled: true, or every rate to 0")
        if self.train.selection == "val_auc_lesion" and not self.model.lesion_map.enabled:
            raise ValueError("train.selection: val_auc_lesion selects on the inserted-lesion check of a lesion-map "
                             "model; set model.lesion_map.enabled: true, or choose val_auc or val_auc_robust")
        return self


def _describe(error: dict) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against params.yaml's documented keys)"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors()]
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Read and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root, where params.yaml lives)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
