"""The pipeline run stage by stage in this process, recording the params keys each stage reads.

Shared by two tests (tests/conftest.py's `in_process_pipeline`): dvc.yaml's params contract
(test_dvc_contract.py) and the out-of-fold threshold choice (test_out_of_fold.py), which would otherwise train the
same tiny pipeline twice.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT
from tests.params_tracking import ParamsTracker, leaf_keys
from tests.pipeline_repo import make_pipeline_repo

STAGE_COMMAND = re.compile(r"^python3? -m (stages(?:\.\w+)+)\s*$")

# Tiny settings on top of pipeline_repo.TINY_OVERRIDES: every stage runs, as fast as possible.
PIPELINE_OVERRIDES = {
    "model": {"backbone": "mobilenetv3small", "weights": None},  # the smallest backbone; no ImageNet download
    # One worker: preprocessing runs in this process, where the reads are recorded (a Pool child's are lost).
    "preprocess": {"image_size": 32, "workers": 1},
    "train": {"steps_per_epoch": 2, "phase1": {"epochs": 1}, "phase2": {"epochs": 1}},
    # The out_of_fold stage reads its keys only when it trains: two folds of the tiny train + valid.
    "evaluate": {"bootstrap_resamples": 100, "threshold": {"chosen_on": "out_of_fold", "folds": 2}},
    # An untrained model scores every image near the threshold, so quantization alone flips decisions; the
    # parity rule is not under test here, and every export key is still read.
    "export": {"latency_runs": 1, "min_decision_agreement": 0.0},
}


@dataclass
class PipelineRun:
    repo: Path
    leaves: set[str]  # every params key of the copy's params.yaml
    reads: dict[str, set[str]]  # stage -> the params keys its main() read
    printed: str  # what the stages printed on stdout, in order


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]


def python_stages() -> list[tuple[str, str, dict]]:
    """(stage, module, definition) for every stage run as `python -m stages.<name>`, in dvc.yaml order."""
    found = []
    for name, stage in dvc_stages().items():
        match = STAGE_COMMAND.match(str(stage.get("cmd", "")))
        if match:
            found.append((name, match.group(1), stage))
    return found


def run_every_stage(destination: Path) -> PipelineRun:
    from tensorflow.python.framework import config as tf_config  # no public switch-off of op determinism

    from chestct.params import load_params

    stages = python_stages()
    mains = {name: importlib.import_module(module).main for name, module, _ in stages}  # imported from the project
    repo = make_pipeline_repo(destination, PIPELINE_OVERRIDES)
    reads, printed = {}, io.StringIO()
    was_deterministic = tf_config.is_op_determinism_enabled()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(repo)  # the stages read and write cwd-relative paths: all inside the copy
        tracker = ParamsTracker().install(monkeypatch)
        try:
            for name, _, _ in stages:
                tracker.reset()
                with contextlib.redirect_stdout(printed):
                    mains[name]()
                reads[name] = set(tracker.read)
        finally:
            if not was_deterministic:  # training switched it on for this process: leave the other tests' world
                tf_config.disable_op_determinism()
    return PipelineRun(repo, leaf_keys(load_params(repo / "params.yaml")), reads, printed.getvalue())
