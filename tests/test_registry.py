"""The model as a versioned DVC artifact: dvc.yaml `artifacts:`, GTO versions and stages, the export's source
revision, and fetching a registered version by name.

The unit tests use small git repositories; the end-to-end test runs the whole pipeline on tiny phantoms once,
pushes it to a local-folder DVC remote, registers and promotes the export with GTO, and fetches it by stage and by
version into empty folders from a fresh clone, as another team would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from chestct.export.provenance import ARTIFACT_NAME, export_source, registered_version
from chestct.registry import ArtifactReference, RegistryError, parse_reference
from tests.conftest import PROJECT_ROOT
from tests.pipeline_repo import make_pipeline_repo, run


def _git_repo(folder: Path, commit: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    run(["git", "init", "-q", "-b", "main"], folder)
    if commit:
        (folder / "README").write_text("x\n")
        run(["git", "add", "README"], folder)
        run(["git", "commit", "-q", "-m", "first"], folder)
    return folder


def _head(repo: Path) -> str:
    return run(["git", "rev-parse", "HEAD"], repo).stdout.strip()


# --- dvc.yaml ---------------------------------------------------------------------------------------------------


def test_dvc_yaml_declares_the_export_as_a_model_artifact():
    dvc_yaml = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    artifact = dvc_yaml["artifacts"][ARTIFACT_NAME]
    assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"]
    assert artifact["path"] in dvc_yaml["stages"]["export"]["outs"]  # what the export stage writes, as is


# --- references ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("chestct", ArtifactReference("chestct")),
    ("chestct@latest", ArtifactReference("chestct")),
    ("chestct@v1.2.0", ArtifactReference("chestct", version="v1.2.0")),
    ("chestct#prod", ArtifactReference("chestct", stage="prod")),
    ("chestct@prod", ArtifactReference("chestct", stage="prod")),
    ("chestct@staging-eu", ArtifactReference("chestct", stage="staging-eu")),
])
def test_references_name_a_version_a_stage_or_the_greatest_version(text, expected):
    assert parse_reference(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("chestct@", "is not an artifact reference"),
    ("@prod", "is not an artifact reference"),
    ("chestct#prod#1", "is not an artifact reference"),
    ("chest ct@prod", "is not an artifact reference"),
    ("chestct@v1.2", "'v1.2' is not a GTO version"),
])
def test_a_malformed_reference_is_refused_saying_what_is_accepted(text, message):
    with pytest.raises(RegistryError, match=message) as error:
        parse_reference(text)
    assert "chestct#prod" in str(error.value) or "v1.0.0" in str(error.value)


# --- provenance ---------------------------------------------------------------------------------------------------


def test_the_registered_version_ignores_stages_deregistrations_and_other_artifacts():
    assert registered_version(["chestct#prod#1", "other@v9.0.0", "v2.0.0", "chestct@deprecated"]) is None
    assert registered_version(["chestct@v1.2.0", "chestct#prod#3"]) == "v1.2.0"
    assert registered_version(["chestct@v1.9.0", "chestct@v1.10.0"]) == "v1.10.0"  # semver order, not text
    assert registered_version(["chestct@v1.0.0", "chestct@v1.0.0!"]) is None


def test_export_source_is_null_outside_git_and_before_the_first_commit(tmp_path):
    assert export_source(tmp_path) == {"git_revision": None, "artifact_version": None}
    empty = _git_repo(tmp_path / "empty", commit=False)
    assert export_source(empty) == {"git_revision": None, "artifact_version": None}


def test_export_source_records_the_commit_and_the_version_registered_on_it(tmp_path):
    repo = _git_repo(tmp_path / "repo")
    assert export_source(repo) == {"git_revision": _head(repo), "artifact_version": None}
    run(["gto", "register", ARTIFACT_NAME, "--version", "v1.0.0"], repo)
    run(["gto", "assign", ARTIFACT_NAME, "--version", "v1.0.0", "--stage", "prod"], repo)
    assert export_source(repo) == {"git_revision": _head(repo), "artifact_version": "v1.0.0"}


def test_metadata_records_the_source_and_reads_older_files_without_it(default_params, tmp_path):
    from chestct.evaluation.thresholds import threshold_record
    from chestct.export.metadata import SCHEMA_VERSION, build_metadata, read_metadata, write_metadata

    artifacts = {"keras": {"file": "chestct.keras", "sha256": "0" * 64, "bytes": 1000}}
    threshold = threshold_record({"threshold": 0.5, "method": "fixed"}, default_params)
    source = {"git_revision": "a" * 40, "artifact_version": "v3.1.4"}
    write_metadata(tmp_path, build_metadata(default_params, threshold, artifacts, {}, 64, None, None, source))
    raw = json.loads((tmp_path / "metadata.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == "2.6" and raw["source"] == source
    assert read_metadata(tmp_path).source.artifact_version == "v3.1.4"
    raw.pop("source")  # as a 2.1 file was written
    (tmp_path / "metadata.json").write_text(json.dumps({**raw, "schema_version": "2.1"}))
    assert read_metadata(tmp_path).source.model_dump() == {"git_revision": None, "artifact_version": None}
    unknown = build_metadata(default_params, threshold, artifacts, {}, 64, None)  # built outside the pipeline
    assert unknown.source.git_revision is None


# --- fetching -----------------------------------------------------------------------------------------------------


def fetch_in_a_fresh_process(reference: str, repo: Path, cache: Path) -> tuple[bool, str]:
    """fetch_artifact as `chestct serve --artifact` runs it, in a process of its own: (fetched, the folder or the
    RegistryError's message). Not in the test process: importing DVC wraps sys.stderr with colorama, which can
    break pytest's output capture in the tests that follow."""
    code = ("import sys; from pathlib import Path; from chestct.registry import RegistryError, fetch_artifact\n"
            "try: print(fetch_artifact(sys.argv[1], sys.argv[2], Path(sys.argv[3])))\n"
            "except RegistryError as exc: print(f'RegistryError: {exc}')")
    cache.parent.mkdir(parents=True, exist_ok=True)
    printed = run([sys.executable, "-c", code, reference, str(repo), str(cache)], cache.parent).stdout.strip()
    last = printed.splitlines()[-1]
    return (False, last.removeprefix("RegistryError: ")) if last.startswith("RegistryError: ") else (True, last)


@pytest.fixture(scope="module")
def small_registry(tmp_path_factory) -> tuple[Path, Path, str]:
    """A DVC project whose export is a two-file folder (no pipeline): pushed to a local-folder remote, v1.0.0
    registered and in prod; and a git clone of it (no DVC cache). Returns (origin, clone, tagged commit)."""
    root = tmp_path_factory.mktemp("small_registry")
    origin = _git_repo(root / "origin")
    run(["dvc", "init", "-q"], origin)
    (origin / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": {ARTIFACT_NAME: {
        "path": "models/export", "type": "model"}}}))
    (origin / "models/export").mkdir(parents=True)
    (origin / "models/export/metadata.json").write_text('{"model": "chestct"}\n')
    (origin / "models/export/weights.bin").write_bytes(bytes(range(256)) * 40)
    run(["dvc", "add", "-q", "models/export"], origin)
    run(["dvc", "remote", "add", "-d", "storage", str(root / "remote")], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-q", "-m", "an export"], origin)
    run(["dvc", "push", "-q"], origin)
    run(["gto", "register", ARTIFACT_NAME, "--version", "v1.0.0"], origin)
    run(["gto", "assign", ARTIFACT_NAME, "--version", "v1.0.0", "--stage", "prod"], origin)
    clone = root / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], root)
    return origin, clone, _head(origin)


def test_a_promoted_version_is_fetched_into_the_cache_once_per_commit(small_registry, tmp_path):
    origin, clone, commit = small_registry
    cache = tmp_path / "cache"
    fetched, folder = fetch_in_a_fresh_process("chestct@prod", clone, cache)  # from the remote: no cache in clone
    assert fetched and Path(folder) == cache / ARTIFACT_NAME / commit
    for name in ("metadata.json", "weights.bin"):
        assert (Path(folder) / name).read_bytes() == (origin / "models/export" / name).read_bytes()
    (Path(folder) / "weights.bin").write_bytes(b"kept")  # a second fetch of the same commit downloads nothing
    assert fetch_in_a_fresh_process("chestct@v1.0.0", clone, cache) == (True, folder)
    assert (Path(folder) / "weights.bin").read_bytes() == b"kept"
    assert [path.name for path in (cache / ARTIFACT_NAME).iterdir()] == [commit]  # no temporary left


def test_a_version_missing_from_the_remote_says_to_push_it_and_leaves_no_folder(small_registry, tmp_path):
    _, clone, _ = small_registry
    unpushed = tmp_path / "unpushed"
    run(["git", "clone", "-q", str(clone), str(unpushed)], tmp_path)
    run(["dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "empty_remote")], unpushed)
    fetched, message = fetch_in_a_fresh_process("chestct#prod", unpushed, tmp_path / "cache")
    assert not fetched
    assert message.startswith("cannot fetch models/export of chestct in stage prod (commit ") and "dvc push" in message
    assert not any((tmp_path / "cache").rglob("metadata.json"))


def test_fetching_what_is_not_registered_says_how_to_register_or_promote(small_registry, tmp_path):
    _, clone, _ = small_registry
    assert fetch_in_a_fresh_process("chestct@staging", clone, tmp_path / "cache") == (False, (
        f"no chestct in stage staging is registered in {clone}: promote a version with `gto assign chestct "
        f"--version vX.Y.Z --stage staging` (`gto show chestct` lists what is registered), and push the tags "
        f"(`git push --tags`)"))
    fetched, message = fetch_in_a_fresh_process("chestct@v2.0.0", clone, tmp_path / "cache")
    assert not fetched and message.startswith(f"no chestct v2.0.0 is registered in {clone}: register one with "
                                              f"`gto register chestct --version vX.Y.Z`")
    assert not (tmp_path / "cache").exists()


def test_fetching_from_a_folder_that_is_not_a_repository_names_it(tmp_path):
    fetched, message = fetch_in_a_fresh_process("chestct@prod", tmp_path / "nowhere", tmp_path / "cache")
    assert not fetched and message.startswith(f"cannot read the model registry of {tmp_path / 'nowhere'} (")
    assert message.endswith("give a git repository of this project (a path or URL) with --artifact-repo")


def test_the_cli_refuses_an_export_folder_and_an_artifact_together(tmp_path, capsys):
    from chestct.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(tmp_path / "x.png"), "--export-dir", str(tmp_path), "--artifact", "chestct@prod"])
    assert exit_info.value.code == 2  # argparse's usage error, before anything is loaded
    assert "argument --artifact: not allowed with argument --export-dir" in capsys.readouterr().err


# --- end to end ---------------------------------------------------------------------------------------------------

# The cheapest full pipeline: a few phantoms, one short epoch per phase, the audits off, one export format.
REGISTRY_PIPELINE = {
    "model": {"backbone": "densenet121", "weights": None, "unfreeze": {"densenet121": 0.1}, "head": {"units": [8]}},
    "train": {"batch_size": 8, "steps_per_epoch": 1, "validation_batch_size": 32,
              "phase1": {"epochs": 1}, "phase2": {"epochs": 1}},
    "evaluate": {"bootstrap_resamples": 100, "gradcam_images": 2, "attention": False,
                 "robustness": {"enabled": False}},
    "export": {"formats": ["keras"], "latency_runs": 1},
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The pipeline reproduced and committed, pushed to a local-folder remote, v1.0.0 registered and in prod;
    then a fresh clone of it (git only: no DVC cache, no workspace outputs)."""
    root = tmp_path_factory.mktemp("registry")
    origin = make_pipeline_repo(root / "origin", REGISTRY_PIPELINE)
    built_from = _head(origin)
    run(["dvc", "repro"], origin)
    run(["dvc", "remote", "add", "-d", "storage", str(root / "remote")], origin)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-q", "-m", "trained and exported"], origin)
    run(["dvc", "push"], origin)
    run(["gto", "register", ARTIFACT_NAME, "--version", "v1.0.0"], origin)
    run(["gto", "assign", ARTIFACT_NAME, "--version", "v1.0.0", "--stage", "prod"], origin)
    clone = root / "clone"
    run(["git", "clone", "-q", str(origin), str(clone)], root)
    return origin, clone, built_from


@pytest.mark.e2e
def test_a_promoted_version_is_fetched_by_stage_and_by_version_and_predicts_as_built(registered, tmp_path):
    from chestct.imaging.processed import load_split
    from chestct.serving.predictor import Predictor

    origin, clone, built_from = registered
    assert not (clone / "models/export").exists() and not (clone / ".dvc/cache").exists()
    shown = run(["gto", "show", ARTIFACT_NAME, "--json"], clone).stdout
    assert "v1.0.0" in shown and "prod" in shown

    by_stage, by_version = tmp_path / "empty" / "prod", tmp_path / "empty" / "v1"
    run(["dvc", "artifacts", "get", str(clone), ARTIFACT_NAME, "--stage", "prod", "-o", str(by_stage)], tmp_path)
    run(["dvc", "artifacts", "get", str(clone), ARTIFACT_NAME, "--rev", "v1.0.0", "-o", str(by_version)], tmp_path)
    built = origin / "models/export"
    for fetched in (by_stage, by_version):
        assert sorted(p.name for p in fetched.iterdir()) == sorted(p.name for p in built.iterdir())
        assert (fetched / "metadata.json").read_bytes() == (built / "metadata.json").read_bytes()

    metadata = json.loads((by_stage / "metadata.json").read_text())
    assert metadata["source"] == {"git_revision": built_from, "artifact_version": None}  # registered afterwards
    test = load_split(origin / "data/processed/test").in_memory()
    fetched_model, built_model = Predictor(by_stage), Predictor(built)
    assert fetched_model.sha256 == built_model.sha256
    assert (fetched_model.probabilities(test.images) == built_model.probabilities(test.images)).all()


@pytest.mark.e2e
def test_the_run_writes_its_summary_and_dvc_shows_it_in_one_small_table(registered):
    from chestct.export.summary import SUMMARY_KEYS

    origin, _, _ = registered
    summary = json.loads((origin / "metrics/summary.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS and summary["formats"] == "keras"
    assert 0.0 <= summary["test_auc"] <= 1.0 and summary["phase2_best_epoch"] == 1
    assert summary["robust_worst_auc"] is None  # switched off in this run
    shown = json.loads(run(["dvc", "metrics", "show", "--json", "metrics/summary.json"], origin).stdout)
    # DVC leaves null figures out (its tables show "-" for them); every other key is read back as written.
    assert shown[""]["data"]["metrics/summary.json"]["data"] == {k: v for k, v in summary.items() if v is not None}


@pytest.mark.e2e
def test_chestct_serve_artifact_serves_the_promoted_version_over_the_v2_protocol(registered, tmp_path):
    """`chestct serve --artifact chestct@prod`, queried with tritonclient, answers as the model that was built."""
    import os
    import subprocess
    import sys
    import time

    import numpy as np
    import tritonclient.http as triton

    from chestct.imaging.processed import load_split
    from chestct.serving.predictor import Predictor
    from tests.serving_support import free_port

    origin, clone, _ = registered
    port = free_port()
    command = [sys.executable, "-c", "from chestct.cli import main; main()", "serve", "--port", str(port),
               "--artifact", "chestct@prod", "--artifact-repo", str(clone)]
    env = {**os.environ, "CHESTCT_ARTIFACT_CACHE": str(tmp_path / "cache"), "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}", network_timeout=120.0)
    try:
        deadline = time.monotonic() + 120
        while not _ready(client):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "chestct serve --artifact was not ready within 120 s"
            time.sleep(0.5)
        images = np.asarray(load_split(origin / "data/processed/test").images)
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        served = client.infer(ARTIFACT_NAME, [tensor]).as_numpy("probability")[:, 0]
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=30)
    np.testing.assert_allclose(served, Predictor(origin / "models/export").probabilities(images), rtol=0, atol=1e-6)


def _ready(client) -> bool:
    from tritonclient.utils import InferenceServerException

    try:
        return client.is_server_ready()
    except (InferenceServerException, ConnectionError, OSError):
        return False
