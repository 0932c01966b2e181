"""End to end: how users work with the pipeline. Determinism across fresh clones, experiments and queues.

The whole pipeline (download -> ... -> export) on tiny synthetic data with a small random-weight backbone, so a
full `dvc repro` takes a few minutes here; the two clones run at the same time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.pipeline_repo import command_env, make_pipeline_repo, run

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
ALL_STAGES = ["download", "split", "preprocess", "robust_valid", "train_phase1", "train_phase2", "out_of_fold",
              "evaluate", "export", "external"]


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
    processes = [subprocess.Popen(["dvc", "repro"], cwd=repo, env=command_env(), text=True, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for repo in repos]
    try:
        outputs = [process.communicate(timeout=1800)[0] for process in processes]
    finally:
        for process in processes:  # one that timed out, or the other after its twin failed
            process.kill()
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
        assert stages_run(output) == ALL_STAGES
    return repos


def test_two_fresh_clones_give_identical_metrics_and_curves(clones):
    first, second = clones
    names = sorted(path.name for path in (first / "metrics").glob("*.json"))
    assert names == ["data.json", "eval.json", "export.json", "external.json", "preprocess.json", "summary.json",
                     "train_phase1.json", "train_phase2.json"]
    compared = [f"metrics/{name}" for name in names] + ["models/threshold.json"]
    compared += sorted(str(path.relative_to(first)) for path in (first / "plots/eval").glob("*.csv"))
    for relative in compared:
        assert (first / relative).read_text() == (second / relative).read_text(), f"{relative} differs"
    # Not a constant model: the test scores vary, so the bootstrap AUC interval has a width.
    low, high = json.loads((first / "metrics/eval.json").read_text())["test"]["auc_ci"]
    assert low < high


def test_one_experiment_from_the_command_line(clones):
    """`dvc exp run -S key=value` overrides any param; an evaluate-only change reruns evaluate, export and the
    external panel (which scores the new export) only."""
    repo = clones[0]
    result = run(["dvc", "exp", "run", "-S", "evaluate.bootstrap_resamples=300", "--name", "more-resamples"], repo)
    assert stages_run(result.stdout) == ["evaluate", "export", "external"]
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
    try:
        status = run_queue(repo, workers=2)
    finally:
        stop_workers(repo)
    assert "Failed" not in status, status

    rows = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], repo).stdout)))
    swept = {row["evaluate.threshold.method"]: row for row in rows if row["Experiment"]}
    assert set(swept) == set(SWEEP), rows
    auc_column = next(column for column in rows[0] if column.endswith("test.auc"))
    for method, row in swept.items():
        assert 0.0 <= float(row[auc_column]) <= 1.0, row
        log = run(["dvc", "queue", "logs", row["Experiment"]], repo).stdout
        assert stages_run(log) == ["evaluate", "export", "external"], (method, log[-2000:])


QUEUE_DEADLINE_S = 900
WORKERS_GONE = "Worker status: 0 active, 0 idle"


def start_queue(repo: Path, workers: int) -> None:
    """`dvc queue start -j N`. Its workers are forked from it and keep its stdout: a command whose output is piped
    back would only return once the last worker exits, and never if one hangs. They print to a file instead."""
    log = repo / ".dvc" / "tmp" / "queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        started = subprocess.run(["dvc", "queue", "start", "-j", str(workers)], cwd=repo, env=command_env(),
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=120)
    assert started.returncode == 0, log.read_text()[-4000:]


def run_queue(repo: Path, workers: int) -> str:
    """Start the queue and wait until nothing is queued or running; returns the last `dvc queue status`."""
    start_queue(repo, workers)
    deadline = time.monotonic() + QUEUE_DEADLINE_S
    while True:
        status = run(["dvc", "queue", "status"], repo, timeout=120).stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"the queue did not finish in {QUEUE_DEADLINE_S // 60} minutes:\n{status}\n"
                        + worker_logs(repo))
        if "Running" not in status and WORKERS_GONE in status:
            start_queue(repo, workers)  # workers can leave with tasks still queued (treeverse/dvc#10562)
        time.sleep(3)


def worker_logs(repo: Path) -> str:
    logs = sorted((repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.out"))
    return "\n".join(f"--- {log.name}:\n{log.read_text(errors='replace')[-2000:]}" for log in logs)


def stop_workers(repo: Path) -> None:
    """Leave no queue worker behind: ask them to stop, then kill any that did not (their pid files)."""
    with contextlib.suppress(AssertionError):  # a stop that hangs too is no reason to leave the workers running
        run(["dvc", "queue", "stop", "--kill"], repo, check=False, timeout=120)
    for pid_file in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        with contextlib.suppress(OSError, ValueError):  # gone already, or the file is not a pid
            pid = int(pid_file.read_text().strip())
            # A finished worker's pid may belong to another process by now: kill only a queue worker.
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
