"""train_phase2 stage: fine-tune the last backbone layers (model.unfreeze) of the phase-1 model."""

from __future__ import annotations

from pathlib import Path

from chestct.atomic_io import write_json
from chestct.input_pipeline import load_split
from chestct.params import load_params
from chestct.training import (
    compile_for_phase,
    configure_determinism,
    configure_precision,
    count_trainable_parameters,
    load_trained_model,
    make_strategy,
    train_phase,
)
from stages.errors import run_stage

PROCESSED = Path("data/processed")
PHASE1_MODEL = Path("models/phase1.keras")
MODEL = Path("models/phase2.keras")
LIVE = Path("live/phase2")
METRICS = Path("metrics/train_phase2.json")


def main() -> None:
    from chestct.model import unfreeze_for_finetuning

    params = load_params()
    configure_determinism(params.seed, params.train.deterministic)
    policy = configure_precision(params.train.precision)
    train, valid = load_split(PROCESSED / "train.npz"), load_split(PROCESSED / "valid.npz")
    strategy = make_strategy(params.train.distribute)
    with strategy.scope():
        model = load_trained_model(PHASE1_MODEL)
        unfrozen = unfreeze_for_finetuning(model, params.model)
        loss = compile_for_phase(model, params, params.train.phase2)
    trainable = count_trainable_parameters(model)
    print(f"phase2: {unfrozen} backbone layers unfrozen, {trainable:,} trainable parameters, precision {policy}",
          flush=True)
    result = train_phase(model, loss, train, valid, params, params.train.phase2, "phase2", MODEL, LIVE,
                         seed_offset=1)
    write_json(METRICS, {"best_val_auc": result.best_val_auc, "best_epoch": result.best_epoch,
                         "epochs_run": result.epochs_run, "unfrozen_backbone_layers": unfrozen,
                         "trainable_parameters": trainable})
    print(f"phase2: best validation AUC {result.best_val_auc:.4f} at epoch {result.best_epoch} "
          f"of {result.epochs_run}, {result.seconds:.0f} s -> {MODEL}")


if __name__ == "__main__":
    run_stage("train_phase2", main)
