"""train_phase1 stage: backbone frozen (inference mode), attention and head trained on the cached arrays."""

from __future__ import annotations

from pathlib import Path

from chestct.params import load_params
from chestct.training.loop import (
    compile_for_phase,
    count_trainable_parameters,
    prepare_training,
    save_phase_metrics,
    train_phase,
)
from chestct.training.model import build_model
from stages.errors import run_stage

PROCESSED = Path("data/processed")
ROBUST_VALID = Path("data/robust_valid")
MODEL = Path("models/phase1.keras")
LIVE = Path("live/phase1")
METRICS = Path("metrics/train_phase1.json")


def main() -> None:
    params = load_params()
    setup = prepare_training(params, PROCESSED, ROBUST_VALID)
    with setup.strategy.scope():
        model = build_model(params.model, setup.train.image_size,
                            synchronized_batchnorm=params.train.distribute != "none")
        loss = compile_for_phase(model, params, params.train.phase1)
    print(f"phase1: {params.model.backbone} (weights {params.model.weights}) at {setup.train.image_size} px, "
          f"{count_trainable_parameters(model):,} trainable parameters, {setup.describe()}", flush=True)
    result = train_phase(model, loss, setup.train, setup.valid, params, params.train.phase1, "phase1", MODEL, LIVE,
                         robust_valid=setup.robust_valid, chief=setup.chief)
    if setup.chief:
        save_phase_metrics(METRICS, result, model)
    if setup.strategy.num_replicas_in_sync > 1:
        print(f"phase1: trainable weights digest {result.weights_digest} (the same on every worker)", flush=True)
    print(f"phase1: best validation AUC {result.best_val_auc:.4f} at epoch {result.best_epoch} "
          f"of {result.epochs_run}, {result.seconds:.0f} s -> {MODEL}")


if __name__ == "__main__":
    run_stage("train_phase1", main)
