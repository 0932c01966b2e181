"""End to end: how users work with the pipeline. Determinism across fresh clones, experiments and queues.

The whole pipeline (download -> ... -> export) on tiny synthetic data with a small random-weight backbone, so a
full `dvc repro` takes a few minutes here; the two clones run at the same time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time

import pytest

from tests.pipeline_repo import make_pipeline_repo, run

pytestmark = pytest.mark.e2e

QUICK_PIPELINE = {
    # Random DenseNet121 weights give scores that vary between images (a random MobileNetV3's are constant),
    # so identical metrics mean identical numbers, not a constant model.
    "model": {"backbone": "densenet121", "weights": None, "unfreeze": {"densenet121": 0.1}, "head": {"units": [8]}},
    "train": {"batch_size": 8, "steps_per_epoch": 2, "validation_batch_size": 32,
              "phase1": {"epochs": 1, "learning_rate": 1e-3}, "phase2": {"epochs": 1, "learning_rate": 1e-4}},
    "evaluate": {"bootstrap_resamples": 200, "gradcam_images": 4},
    "export": {"formats": ["keras"], "latency_runs": 3},
}
SWEEP = ("target_sensitivity", "fixed")  # both differ from the committed youden
ALL_STAGES = ["download", "split", "preprocess", "robust_valid", "train_phase1", "train_phase2", "evaluate", "export"]


def stages_run(stdout: str) -> list[str]:
    return [line.split("'")[1] for line in stdout.splitlines() if line.startswith("Running stage '")]


@pytest.fixture(scope="module")
def clones(tmp_path_factory):
    """Two fresh clones of one commit, each with its own DVC cache, both reproduced (at the same time)."""
    origin = make_pipeline_repo(tmp_path_factory.mktemp("origin") / "project", QUICK_PIPELINE)
    repos = []
    for name in ("first", "second"):
        repos.append(tmp_path_factory.mktemp(name) / "project")
        run(["git", "clone", "-q", str(origin), str(repos[-1])], origin.parent)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = [subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for repo in repos]
    for process in processes:
        output, _ = process.communicate(timeout=1800)
        assert process.returncode == 0, output[-4000:]
        assert stages_run(output) == ALL_STAGES
    return repos


def test_two_fresh_clones_give_identical_metrics_and_curves(clones):
    first, second = clones
    names = sorted(path.name for path in (first / "metrics").glob("*.json"))
    assert names == ["data.json", "eval.json", "export.json", "preprocess.json", "summary.json", "train_phase1.json",
                     "train_phase2.json"]
    compared = [f"metrics/{name}" for name in names] + ["models/threshold.json"]
    compared += sorted(str(path.relative_to(first)) for path in (first / "plots/eval").glob("*.csv"))
    for relative in compared:
        assert (first / relative).read_text() == (second / relative).read_text(), f"{relative} differs"
    # Not a constant model: the test scores vary, so the bootstrap AUC interval has a width.
    low, high = json.loads((first / "metrics/eval.json").read_text())["test"]["auc_ci"]
    assert low < high


def test_one_experiment_from_the_command_line(clones):
    """`dvc exp run -S key=value` overrides any param; an evaluate-only change reruns evaluate and export only."""
    repo = clones[0]
    result = run(["dvc", "exp", "run", "-S", "evaluate.bootstrap_resamples=300", "--name", "more-resamples"], repo)
    assert stages_run(result.stdout) == ["evaluate", "export"]
    shown = run(["dvc", "exp", "show", "--csv"], repo).stdout
    row = next(r for r in csv.DictReader(io.StringIO(shown)) if r["Experiment"] == "more-resamples")
    assert row["evaluate.bootstrap_resamples"] == "300"


def test_a_queued_sweep_runs_every_point_and_lists_its_metrics(clones):
    """A two-point grid through the queue with two workers; each point reruns what its param touches only."""
    repo = clones[1]
    # Queued experiments start from the last commit: record the baseline run first.
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-q", "-m", "baseline run"], repo)
    run(["dvc", "exp", "run", "--queue", "-S", f"evaluate.threshold.method={','.join(SWEEP)}"], repo)
    run(["dvc", "queue", "start", "-j", "2"], repo)
    deadline = time.monotonic() + 900
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        assert time.monotonic() < deadline, f"the queue did not finish in 15 minutes:\n{status}"
        time.sleep(3)
    assert "Failed" not in status, status

    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout)))
    swept = {row["evaluate.threshold.method"]: row for row in rows if row["Experiment"]}
    assert set(swept) == set(SWEEP), rows
    auc_column = next(column for column in rows[0] if column.endswith("test.auc"))
    for method, row in swept.items():
        assert 0.0 <= float(row[auc_column]) <= 1.0, row
        log = run(["dvc", "queue", "logs", row["Experiment"]], repo).stdout
        assert stages_run(log) == ["evaluate", "export"], (method, log[-2000:])
