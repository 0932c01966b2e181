"""Copy the project into a temporary git repo with tiny synthetic params, and run dvc there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import PROJECT_ROOT

TINY_OVERRIDES = {
    "data": {"source": "synthetic",
             "synthetic": {"normal": {"train": 16, "valid": 6, "test": 8},
                           "cancer": {"train": 16, "valid": 6, "test": 8},
                           "min_size": 96, "max_size": 240, "duplicates": 2}},
    "preprocess": {"image_size": 32},
}


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def project_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    return [f for f in listed if (PROJECT_ROOT / f).is_file()]


RUN_TIMEOUT_S = 900  # far above any one command here (a whole tiny `dvc repro` takes a few minutes)


def command_env() -> dict[str, str]:
    """The environment the tests run dvc and the stages in: this venv first, a git identity, quiet TensorFlow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "chestct tests")
    env.setdefault("GIT_AUTHOR_EMAIL", "tests@chestct.invalid")
    env.setdefault("GIT_COMMITTER_NAME", "chestct tests")
    env.setdefault("GIT_COMMITTER_EMAIL", "tests@chestct.invalid")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def run(command: list[str], cwd: Path, check: bool = True, timeout: float = RUN_TIMEOUT_S
        ) -> subprocess.CompletedProcess:
    """Run a command to its end and return its output. A command still running after `timeout` seconds fails the
    test with what it printed, so a hung dvc call cannot stall the whole suite; no prompt can wait on stdin."""
    try:
        result = subprocess.run(command, cwd=cwd, env=command_env(), capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        printed = "\n".join(_text(stream)[-4000:] for stream in (exc.stdout, exc.stderr))
        raise AssertionError(f"{' '.join(command)} was still running after {timeout:.0f} s:\n{printed}") from None
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def update_params(repo: Path, overrides: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(_merge(params, overrides), sort_keys=False))


def make_pipeline_repo(destination: Path, overrides: dict | None = None) -> Path:
    """A fresh git repo holding the project's files, tiny synthetic params, committed."""
    destination.mkdir(parents=True)
    for relative in project_files():
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, target)
    update_params(destination, _merge(TINY_OVERRIDES, overrides or {}))
    run(["git", "init", "-q", "-b", "main"], destination)
    run(["git", "add", "-A"], destination)
    run(["git", "commit", "-q", "-m", "pipeline under test"], destination)
    return destination


def _text(stream: bytes | str | None) -> str:
    """TimeoutExpired keeps what a command printed as bytes, whatever `text` asked for."""
    if stream is None:
        return ""
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream
