"""One training phase: seeding, precision, strategy, callbacks on an exact validation AUC, dvclive logging.

Both phases select, reduce the learning rate and stop early on the ROC AUC computed by scikit-learn from
predictions over the whole validation set (Keras' streaming AUC collapses to 0.5 when outputs saturate), with
mode='max' set explicitly. The best model by that AUC is what the phase writes.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from dvclive import Live
from dvclive.keras import DVCLiveCallback
from sklearn.metrics import roc_auc_score

from chestct.atomic_io import atomic_path, write_json
from chestct.errors import ChestctError
from chestct.imaging.processed import SplitArrays, load_split
from chestct.labels import NORMAL
from chestct.params import Params, PhaseParams
from chestct.training.distribute import make_strategy, weights_digest
from chestct.training.input_pipeline import training_dataset, validation_dataset
from chestct.training.lesion_check import LesionCheckSet, build_lesion_check, lesion_check_auc
from chestct.training.lesion_map import LesionMapLoss
from chestct.training.lesion_pool import SOURCE_DESCRIPTIONS, CropPreparation, LesionPool, build_lesion_pool
from chestct.training.losses import make_loss
from chestct.training.model import has_lesion_map, prediction_of
from chestct.training.pace import CorePace
from chestct.training.photometric import standardise_tf

MONITOR = "val_auc"


class TrainingError(ChestctError, RuntimeError):
    """Training cannot start or produced nothing usable; the message says why."""


def configure_determinism(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and TensorFlow; optionally make TensorFlow ops deterministic."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def cpu_supports_bfloat16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str) -> str:
    """`auto`: mixed_float16 on a GPU, mixed_bfloat16 on a CPU that supports it, else float32."""
    if precision != "auto":
        return precision
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_supports_bfloat16() else "float32"


def configure_precision(precision: str) -> str:
    policy = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN kernels (chestct turns them on unless TF_ENABLE_ONEDNN_OPTS says 0)."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("1", "true")


def exact_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(roc_auc_score(labels, scores))


class ValidationAUC(keras.callbacks.Callback):
    """Predicts the whole validation set once per epoch and adds val_auc, val_loss and learning_rate to logs.

    It must run before the callbacks that read those logs (early stopping, LR schedule, checkpoint, dvclive).
    Every worker scores the whole set itself, outside the strategy: with identical weights they log identical
    figures, so early stopping and the LR schedule stay in lockstep across workers.
    """

    def __init__(self, dataset: tf.data.Dataset, loss: keras.losses.Loss, robust: tf.data.Dataset | None = None,
                 lesion_check: LesionCheckSet | None = None, select_on_lesion_check: bool = False):
        super().__init__()
        self.dataset, self.robust = dataset, robust
        self.lesion_check, self.select_on_lesion_check = lesion_check, select_on_lesion_check
        self.loss = loss
        self._forward = None

    def _predict(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate([self._forward(tf.cast(images[start:start + 64], tf.float32)).numpy()
                               for start in range(0, len(images), 64)])

    def _scores(self, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
        """(labels (N, 1), scores (N, 1)) in the dataset's order."""
        if self._forward is None:
            self._forward = tf.function(
                lambda images: tf.cast(prediction_of(self.model(images, training=False)), tf.float32))
        labels, scores = [], []
        for images, batch_labels in dataset:
            labels.append(batch_labels.numpy())
            scores.append(self._forward(images).numpy())
        return np.concatenate(labels).reshape(-1, 1), np.concatenate(scores).reshape(-1, 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        labels, scores = self._scores(self.dataset)
        logs[MONITOR] = exact_auc(labels.ravel(), scores.ravel())
        if self.robust is not None:
            # Shortcut-aware selection: an epoch counts only as good as its worse validation copy.
            robust_labels, robust_scores = self._scores(self.robust)
            logs["val_auc_clean"] = logs[MONITOR]
            logs["val_auc_perturbed"] = exact_auc(robust_labels.ravel(), robust_scores.ravel())
            logs[MONITOR] = min(logs["val_auc_clean"], logs["val_auc_perturbed"])
        if self.lesion_check is not None:
            # The same validation Normals with and without an inserted lesion: does the model see the lesion?
            logs["val_lesion_check"] = lesion_check_auc(self.lesion_check, self._predict)
            if self.select_on_lesion_check:
                logs["val_auc_clean"] = logs.get("val_auc_clean", logs[MONITOR])
                logs[MONITOR] = min(logs[MONITOR], logs["val_lesion_check"])
        logs["val_loss"] = float(keras.ops.convert_to_numpy(keras.ops.mean(self.loss(labels, scores))))
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class EpochReport(keras.callbacks.Callback):
    """One line per epoch with the figures that matter and an estimate of the time left."""

    def __init__(self, phase: str, epochs: int, pace: CorePace | None = None):
        super().__init__()
        self.phase, self.epochs, self.pace = phase, epochs, pace
        self.best = -math.inf

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        elapsed = time.perf_counter() - self.started
        per_epoch = elapsed / (epoch + 1)
        remaining = per_epoch * (self.epochs - epoch - 1)
        auc = logs.get(MONITOR, float("nan"))
        marker = " *best*" if auc > self.best else ""
        self.best = max(self.best, auc)
        split = (f" (clean {logs['val_auc_clean']:.4f}, perturbed {logs['val_auc_perturbed']:.4f})"
                 if "val_auc_perturbed" in logs else "")
        if "val_lesion_check" in logs:
            split += f" lesion check {logs['val_lesion_check']:.4f}"
        print(f"{self.phase} epoch {epoch + 1}/{self.epochs}  loss {logs.get('loss', float('nan')):.4f}  "
              f"val_loss {logs.get('val_loss', float('nan')):.4f}  val_auc {auc:.4f}{split}{marker}  "
              f"lr {logs.get('learning_rate', float('nan')):.1e}  {per_epoch:.1f} s/epoch  "
              f"ETA {remaining / 60:.1f} min (at most)"
              + (f"  training {self.pace.describe()}" if self.pace is not None else ""), flush=True)
        if self.pace is not None and self.pace.warning:
            print(f"{self.phase} epoch {epoch + 1}: {self.pace.warning}", flush=True)


@dataclass(frozen=True)
class PhaseResult:
    best_val_auc: float
    best_epoch: int
    epochs_run: int
    seconds: float
    weights_digest: str = ""  # of the trainable weights kept: equal on every worker of a multi-worker run
    lesion_insertion: dict | None = None  # a lesion-map model's inserted lesions: counts, rates, sizes in px
    lesion_check: float | None = None  # the kept epoch's inserted-lesion check on validation

    def as_dict(self) -> dict:
        return {"best_val_auc": self.best_val_auc, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "seconds": round(self.seconds, 1)}


def _check_validation(valid: SplitArrays) -> None:
    if len(np.unique(valid.labels)) < 2:
        raise TrainingError("the validation split holds only one class, so its ROC AUC is undefined; "
                            "check split.dedup (drop_leaks can empty valid of normals) or use regroup")


def compile_for_phase(model: keras.Model, params: Params, phase: PhaseParams) -> keras.losses.Loss:
    """Compile for one phase; return the image-level loss (the one validation reports).

    A lesion-map model gets the image-level loss on its pooled prediction and the dense LesionMapLoss on its map,
    weighted by `train.lesion_supervision.map_loss_weight`."""
    loss = make_loss(params.train.loss)
    optimizer = keras.optimizers.Adam(learning_rate=phase.learning_rate)
    if has_lesion_map(model):
        # In the outputs' order, prediction then lesion_map (the dataset's targets come in the same order).
        model.compile(optimizer=optimizer, loss=[loss, LesionMapLoss()],
                      loss_weights=[1.0, params.train.lesion_supervision.map_loss_weight])
    else:
        model.compile(optimizer=optimizer, loss=loss)
    return loss


def lesion_training_pool(model: keras.Model, train: SplitArrays, params: Params, seed: int,
                         restandardised: bool) -> LesionPool | None:
    """The inserted-lesion copies of the training Normals for a lesion-map model (None without a map), built
    from the images training starts from (the unstandardised ones when it redoes the standardisation)."""
    supervision = params.train.lesion_supervision
    # Read whatever the model: a model without a map ignores them, and says so below, rather than being stale.
    if not has_lesion_map(model):
        if any(supervision.source_rates.values()):
            raise TrainingError("train.lesion_supervision mixes in outlined lesions, but the model has no lesion "
                                "map; set model.lesion_map.enabled: true (phase 1 builds the map) or every rate to 0")
        return None
    normals = train.take(np.flatnonzero(np.asarray(train.labels) == NORMAL))
    hosts = np.asarray(normals.unstandardised) if restandardised else np.asarray(normals.images)[..., 0]
    return build_lesion_pool(hosts, params.augment.lesion_insertion, supervision, seed,
                             crop_preparation=CropPreparation(params.preprocess, restandardised))


def describe_batches(params: Params, pool: LesionPool | None) -> str:
    """The batch composition training logs: what each half of a batch holds and which loss reaches it."""
    half = params.train.batch_size // 2
    if pool is None:
        return f"batches of {params.train.batch_size}" + (f": {half} Normal, {half} Cancer"
                                                         if params.train.balanced_batches else "")
    inserted = ", ".join(f"{rate:.0%} {SOURCE_DESCRIPTIONS[source]} (mask targets)"
                         for source, rate in pool.rates.items())
    plain = 1.0 - sum(pool.rates.values())
    return (f"batches of {params.train.batch_size}: {half} real Cancer (pooled image-level loss only), {half} from "
            f"the Normal half: {plain:.0%} Normal (all-zero map target)" + (f", {inserted}" if inserted else ""))


def train_phase(model: keras.Model, loss: keras.losses.Loss, train: SplitArrays, valid: SplitArrays,
                params: Params, phase: PhaseParams, phase_name: str, model_path: Path, live_dir: Path,
                seed_offset: int = 0, robust_valid: SplitArrays | None = None, chief: bool = True) -> PhaseResult:
    """Fit one phase; write the best model by validation AUC to `model_path` and dvclive logs to `live_dir`.

    A worker that is not the chief trains in lockstep but writes neither (its checkpoints stay in a temporary
    folder that is removed).
    """
    _check_validation(valid)
    settings = params.train
    standardise = restandardisation(params, train)
    if standardise is not None:
        print(f"{phase_name}: training starts from the unstandardised images: acquisition augmentation, then "
              f"preprocess.intensity ({params.preprocess.intensity}) redone in TensorFlow", flush=True)
    pool = lesion_training_pool(model, train, params, params.seed + seed_offset, standardise is not None)
    print(f"{phase_name}: {describe_batches(params, pool)}", flush=True)
    if pool is not None and pool.images:
        print(f"{phase_name}: inserted lesions {pool.summary()}", flush=True)
    train_ds = training_dataset(train, params.augment, settings, params.seed + seed_offset, standardise, pool)
    valid_ds = validation_dataset(valid, settings.validation_batch_size)
    robust_ds = None
    if robust_valid is not None:
        if not np.array_equal(robust_valid.ids, valid.ids):
            raise TrainingError("the perturbed validation copy does not match the validation split; "
                                "rerun `dvc repro robust_valid`")
        robust_ds = validation_dataset(robust_valid, settings.validation_batch_size)
    lesion_check = None
    if has_lesion_map(model):
        lesion_check = build_lesion_check(valid, params.augment.lesion_insertion, params.preprocess, params.seed)
    checkpoint_dir = Path(tempfile.mkdtemp(prefix=f"chestct-{phase_name}-"))
    checkpoint = checkpoint_dir / model_path.name
    pace = CorePace(settings.batch_size, settings.steps_per_epoch)
    callbacks = [
        pace,  # first: it times the training steps, before the validation pass below
        # before the rest: they read what it logs
        ValidationAUC(valid_ds, loss, robust_ds, lesion_check, settings.selection == "val_auc_lesion"),
        keras.callbacks.ModelCheckpoint(checkpoint, monitor=MONITOR, mode="max", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=settings.early_stopping_patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=settings.reduce_lr.factor,
                                          patience=settings.reduce_lr.patience, min_lr=settings.reduce_lr.min_lr),
        EpochReport(phase_name, phase.epochs, pace),
    ]
    if chief:
        callbacks.insert(-1, DVCLiveCallback(live=Live(dir=str(live_dir), dvcyaml=False, save_dvc_exp=False,
                                                       report=None)))
    started = time.perf_counter()
    try:
        history = model.fit(train_ds, epochs=phase.epochs, steps_per_epoch=settings.steps_per_epoch,
                            callbacks=callbacks, verbose=0)
        if not checkpoint.exists():
            raise TrainingError(f"{phase_name}: no epoch produced a checkpoint (validation AUC was never finite)")
        if chief:
            with atomic_path(model_path) as temp:
                shutil.copyfile(checkpoint, temp)
    finally:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    aucs = history.history[MONITOR]  # Keras' History runs last, so it sees what ValidationAUC logged
    best_epoch = int(np.nanargmax(aucs))
    checks = history.history.get("val_lesion_check")
    return PhaseResult(float(aucs[best_epoch]), best_epoch + 1, len(aucs), time.perf_counter() - started,
                       weights_digest([weight.numpy() for weight in model.trainable_weights]),
                       None if pool is None else pool.summary(), None if checks is None else float(checks[best_epoch]))


def restandardisation(params: Params, train: SplitArrays):
    """The TensorFlow standardisation training redoes after the acquisition steps, or None to train on the cached
    images: when preprocess cached no unstandardised images, or CLAHE or a window follows the crop."""
    standardise = standardise_tf(params.preprocess)
    return standardise if train.unstandardised is not None else None


def count_trainable_parameters(model: keras.Model) -> int:
    return int(sum(np.prod(weight.shape) for weight in model.trainable_weights))


@dataclass(frozen=True)
class TrainingSetup:
    train: SplitArrays
    valid: SplitArrays
    strategy: tf.distribute.Strategy
    precision: str
    robust_valid: SplitArrays | None = None  # the perturbed validation copy, for train.selection val_auc_robust
    chief: bool = True  # whether this process writes the phase's outputs (always, except a multi-worker non-chief)

    def describe(self) -> str:
        kernels = "oneDNN" if onednn_enabled() else "Eigen (oneDNN off)"
        role = "" if self.chief else " (not the chief: writes nothing)"
        return (f"precision {self.precision}, {kernels} kernels, {self.strategy.num_replicas_in_sync} replica(s)"
                f"{role}; train {len(self.train)}, valid {len(self.valid)}")


def prepare_training(params: Params, processed_dir: Path, robust_dir: Path) -> TrainingSetup:
    """What both phases do first: the distribution strategy, seeds, precision policy and the processed splits."""
    strategy, chief = make_strategy(params.train.distribute)  # first: a collective strategy sets up the runtime
    configure_determinism(params.seed, params.train.deterministic)
    precision = configure_precision(params.train.precision)
    train = load_split(processed_dir / "train")
    valid = load_split(processed_dir / "valid")
    robust = load_split(robust_dir / "valid") if params.train.selection == "val_auc_robust" else None
    return TrainingSetup(train, valid, strategy, precision, robust, chief)


def save_phase_metrics(path: Path, result: PhaseResult, model: keras.Model, **extra: int) -> None:
    """metrics/train_phase*.json: only deterministic figures, so reruns compare equal (no wall times)."""
    lesion = {}
    if result.lesion_insertion is not None:
        lesion = {"lesion_insertion": result.lesion_insertion, "best_val_lesion_check": result.lesion_check}
    write_json(path, {"best_val_auc": result.best_val_auc, "best_epoch": result.best_epoch,
                      "epochs_run": result.epochs_run, "trainable_parameters": count_trainable_parameters(model),
                      **lesion, **extra})
