"""Importing chestct sets TensorFlow's runtime options: oneDNN kernels on unless the environment says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import chestct, tensorflow; from tensorflow.python.util import _pywrap_util_port as port; "
         "from chestct.training.loop import onednn_enabled; print(port.IsMklEnabled(), onednn_enabled())")


def _probe(setting: str | None) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    completed = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout.split()[-2:]


@pytest.mark.parametrize(("setting", "expected"), [(None, ["True", "True"]), ("0", ["False", "False"])])
def test_onednn_follows_chestct_default_and_the_environment(setting, expected):
    # TensorFlow itself reports whether it runs oneDNN kernels; chestct's own report must agree with it.
    assert _probe(setting) == expected


ENTRY_POINTS = ("stages.train_phase1", "stages.evaluate", "chestct.cli", "chestct.serving.app", "benchmarks.epoch_time")
SETTINGS_PROBE = (
    "import importlib, os, sys; importlib.import_module(sys.argv[1]); import tensorflow as tf; "
    "from chestct.tf_data import pipeline_options; "
    "print(os.environ.get('TF_ENABLE_ONEDNN_OPTS'), tf.config.threading.get_inter_op_parallelism_threads(), "
    "tf.config.threading.get_intra_op_parallelism_threads(), pipeline_options().autotune.enabled)")


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_every_entry_point_runs_with_the_same_runtime_settings(entry_point):
    # Read back from TensorFlow and the environment after importing the entry point as its command would: oneDNN
    # on, both thread pools at TensorFlow's "every core" (0: nothing narrows them), tf.data autotuning off.
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    completed = subprocess.run([sys.executable, "-c", SETTINGS_PROBE, entry_point], env=env, capture_output=True,
                               text=True, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split()[-4:] == ["1", "0", "0", "False"]
