"""train_phase2 stage: fine-tune the last backbone layers (model.unfreeze) of the phase-1 model."""

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
from chestct.training.model import load_trained_model, unfreeze_for_finetuning
from stages.errors import run_stage

PROCESSED = Path("data/processed")
ROBUST_VALID = Path("data/robust_valid")
PHASE1_MODEL = Path("models/phase1.keras")
MODEL = Path("models/phase2.keras")
LIVE = Path("live/phase2")
METRICS = Path("metrics/train_phase2.json")


def main() -> None:
    params = load_params()
    setup = prepare_training(params, PROCESSED, ROBUST_VALID)
    with setup.strategy.scope():
        model = load_trained_model(PHASE1_MODEL, keep_lesion_map=True)
        unfrozen = unfreeze_for_finetuning(model, params.model)
        loss = compile_for_phase(model, params, params.train.phase2)
    print(f"phase2: {unfrozen} backbone layers unfrozen, {count_trainable_parameters(model):,} trainable "
          f"parameters, {setup.describe()}", flush=True)
    result = train_phase(model, loss, setup.train, setup.valid, params, params.train.phase2, "phase2", MODEL, LIVE,
                         seed_offset=1, robust_valid=setup.robust_valid, chief=setup.chief)
    if setup.chief:
        save_phase_metrics(METRICS, result, model, unfrozen_backbone_layers=unfrozen)
    if setup.strategy.num_replicas_in_sync > 1:
        print(f"phase2: trainable weights digest {result.weights_digest} (the same on every worker)", flush=True)
    print(f"phase2: best validation AUC {result.best_val_auc:.4f} at epoch {result.best_epoch} "
          f"of {result.epochs_run}, {result.seconds:.0f} s -> {MODEL}")


if __name__ == "__main__":
    run_stage("train_phase2", main)
