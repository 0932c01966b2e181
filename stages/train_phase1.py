"""train_phase1 stage: backbone frozen (inference mode), attention and head trained on the cached arrays."""

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
    make_strategy,
    train_phase,
)
from stages.errors import run_stage

PROCESSED = Path("data/processed")
MODEL = Path("models/phase1.keras")
LIVE = Path("live/phase1")
METRICS = Path("metrics/train_phase1.json")


def main() -> None:
    from chestct.model import build_model

    params = load_params()
    configure_determinism(params.seed, params.train.deterministic)
    policy = configure_precision(params.train.precision)
    train, valid = load_split(PROCESSED / "train.npz"), load_split(PROCESSED / "valid.npz")
    strategy = make_strategy(params.train.distribute)
    with strategy.scope():
        model = build_model(params.model, train.image_size)
        loss = compile_for_phase(model, params, params.train.phase1)
    trainable = count_trainable_parameters(model)
    print(f"phase1: {params.model.backbone} (weights {params.model.weights}) at {train.image_size} px, "
          f"{trainable:,} trainable parameters, precision {policy}, {strategy.num_replicas_in_sync} replica(s); "
          f"train {len(train)}, valid {len(valid)} images", flush=True)
    result = train_phase(model, loss, train, valid, params, params.train.phase1, "phase1", MODEL, LIVE)
    write_json(METRICS, {"best_val_auc": result.best_val_auc, "best_epoch": result.best_epoch,
                         "epochs_run": result.epochs_run, "trainable_parameters": trainable})
    print(f"phase1: best validation AUC {result.best_val_auc:.4f} at epoch {result.best_epoch} "
          f"of {result.epochs_run}, {result.seconds:.0f} s -> {MODEL}")


if __name__ == "__main__":
    run_stage("train_phase1", main)
