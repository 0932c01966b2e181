"""train.distribute: multi_worker end to end: two worker processes on 127.0.0.1 train phase 1 together.

Each worker runs the real stage (`python -m stages.train_phase1`) in its own copy of the workspace, as it would on
its own machine, with the TF_CONFIG a launcher would set. They must finish with identical trainable weights, only
the chief may write the stage's outputs, and the chief's model must be the model one process trains with the same
global batch (phase 1: the backbone runs in inference mode and the head's BatchNorm is synchronised, so the two
runs differ only by floating-point summation order).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import yaml

from chestct.imaging.processed import save_processed
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.e2e

SIZE = 32
OUTPUTS = ("models/phase1.keras", "metrics/train_phase1.json", "live/phase1")
TINY = {
    "seed": 3,
    "preprocess": {"image_size": SIZE},
    "model": {"backbone": "mobilenetv3small", "weights": None, "head": {"units": [16]}},
    "train": {"batch_size": 8, "steps_per_epoch": 4, "selection": "val_auc", "precision": "float32",
              "phase1": {"epochs": 2, "learning_rate": 1.0e-3}},
}


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _splits() -> dict:
    """Disks brighter in Cancer than in Normal, with noise: learnable in a few steps."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disk = (yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (SIZE / 3) ** 2
    splits = {}
    for split, count in (("train", 32), ("valid", 16)):
        labels = np.arange(count) % 2
        images = rng.normal(60, 20, (count, SIZE, SIZE)) + disk * (90 + 60 * labels[:, None, None])
        splits[split] = {"images": np.clip(images, 0, 255).astype(np.uint8)[..., None], "labels": labels,
                         "subtypes": np.where(labels == 0, "normal", "squamous"),
                         "ids": np.array([f"{split}/{i}.png" for i in range(count)])}
    return splits


def _workspace(path, distribute: str):
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    (path).mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(_merge(params, _merge(TINY, {"train": {
        "distribute": distribute}})), sort_keys=False))
    save_processed(path / "data/processed", _splits(), shard_images=8)
    return path


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _start(workspace, tf_config: dict | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, "-m", "stages.train_phase1"], cwd=workspace, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, name: str) -> str:
    try:
        output, _ = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"{name} did not finish within 420 s:\n{output[-3000:]}")
    assert process.returncode == 0, f"{name} failed:\n{output[-3000:]}"
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process workspace, [worker 0, worker 1] workspaces, [their logs])."""
    root = tmp_path_factory.mktemp("multi_worker")
    single = _workspace(root / "single", "none")
    _finish(_start(single, None), "the single-process run")
    workers = [_workspace(root / f"worker{index}", "multi_worker") for index in range(2)]
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = [_start(workspace, {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
                 for index, workspace in enumerate(workers)]
    logs = [_finish(process, f"worker {index}") for index, process in enumerate(processes)]
    yield single, workers, logs
    shutil.rmtree(root, ignore_errors=True)


def test_both_workers_finish_with_identical_weights(runs):
    _, _, logs = runs
    digests = [re.findall(r"trainable weights digest ([0-9a-f]{16})", log) for log in logs]
    assert all(len(found) == 1 for found in digests), logs
    assert digests[0] == digests[1]
    assert "2 replica(s)" in logs[0] and "not the chief: writes nothing" in logs[1]


def test_only_the_chief_writes_the_stage_outputs(runs):
    _, (chief, other), _ = runs
    for output in OUTPUTS:
        assert (chief / output).exists(), output
        assert not (other / output).exists(), output


def test_the_chief_trains_the_model_one_process_trains_with_the_same_global_batch(runs):
    from chestct.imaging.processed import load_split
    from chestct.training.model import load_trained_model

    single, (chief, _), _ = runs
    images = np.asarray(load_split(single / "data/processed/valid").images)
    alone = load_trained_model(single / "models/phase1.keras").predict(images, verbose=0)
    together = load_trained_model(chief / "models/phase1.keras").predict(images, verbose=0)
    np.testing.assert_allclose(together, alone, atol=2e-3)
    metrics = [json.loads((workspace / "metrics/train_phase1.json").read_text()) for workspace in (single, chief)]
    assert metrics[0]["best_epoch"] == metrics[1]["best_epoch"]
    assert metrics[0]["best_val_auc"] == pytest.approx(metrics[1]["best_val_auc"], abs=0.02)
