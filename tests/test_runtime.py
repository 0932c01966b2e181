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
