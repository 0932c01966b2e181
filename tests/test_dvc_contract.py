"""dvc.yaml's contract with the code: each stage declares the code it loads and the params it reads, no more.

A file a stage imports but does not list in `deps`, or a key it reads but does not list in `params`, lets a
change skip the rerun it needs; a listed file it never loads, or a key it never reads, causes reruns for
nothing. Stages, modules and keys are all discovered (dvc.yaml, the source tree, the params objects), so these
checks follow any package layout.
"""

from __future__ import annotations

import pytest

from chestct.params import TrainParams, load_params
from tests.conftest import PROJECT_ROOT
from tests.import_graph import PACKAGE_ROOTS, ImportGraph, find_cycles, module_files, project_graph, transitive_files
from tests.in_process_pipeline import python_stages
from tests.params_tracking import WHOLE_FILE, ParamsTracker, declared_keys, leaf_keys, params_drift

WEB_FRAMEWORKS = ("fastapi", "starlette")  # a module importing one of these at load time is part of the web app


def _dep_paths(stage: dict) -> list[str]:
    """Repo-relative paths of a stage's deps (a dep may be written `path` or `path: {options}`)."""
    paths = []
    for dep in stage.get("deps", []):
        for path in dep if isinstance(dep, dict) else [dep]:
            paths.append(str(path).rstrip("/"))
    return paths


def _covered(file: str, dep: str) -> bool:
    return file == dep or file.startswith(f"{dep}/")


def _is_code_dep(dep: str) -> bool:
    if dep.endswith(".py"):
        return True
    return (PROJECT_ROOT / dep).is_dir() and dep.split("/")[0] in PACKAGE_ROOTS


def test_dvc_yaml_runs_the_stage_modules():
    """Guards the checks below: they would pass vacuously if no stage matched STAGE_COMMAND."""
    modules = module_files()
    stages = python_stages()
    assert stages, "no dvc.yaml stage runs `python -m stages.<name>`"
    for name, module, _ in stages:
        assert module in modules, f"{name}: runs {module}, which is not a module of the project"


def test_every_imported_module_is_a_declared_dep():
    problems = []
    for name, module, stage in python_stages():
        deps = _dep_paths(stage)
        problems += [f"{name}: {file} is imported but not a dep"
                     for file in sorted(transitive_files(module)) if not any(_covered(file, dep) for dep in deps)]
    assert not problems, "code a stage loads is missing from its dvc.yaml deps:\n  " + "\n  ".join(problems)


def test_no_declared_code_dep_is_unused():
    problems = []
    for name, module, stage in python_stages():
        loaded = transitive_files(module)
        for dep in _dep_paths(stage):
            if _is_code_dep(dep) and not any(_covered(file, dep) for file in loaded):
                problems.append(f"{name}: {dep} is a dep but the stage never loads it")
    assert not problems, "dvc.yaml deps that only cause spurious reruns:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    cycles = find_cycles()
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(cycle) for cycle in cycles)


def web_app_violations(graph: ImportGraph, library: str = "chestct") -> list[str]:
    """Library modules that import a web-app module when they load.

    A web-app module is one in the `app` package or one that imports a web framework at module level; those
    may import each other. Every other module under `library` may import them only inside a function.
    """
    def is_web_app(module: str) -> bool:
        return module.split(".")[0] == "app" or any(
            name.split(".")[0] in WEB_FRAMEWORKS for name in graph.module_level_imports(module))

    app_modules = {module for module in graph.modules if is_web_app(module)}
    return [f"{module} imports {target} at module level"
            for module in sorted(graph.modules) if module.split(".")[0] == library and module not in app_modules
            for target in sorted(graph.module_level_imports(module) & app_modules)]


def test_library_does_not_import_the_web_app_at_module_level():
    """Importing the library (stages, CLI, tests) must not load the web stack; a deferred import in a def is fine."""
    problems = web_app_violations(project_graph())
    assert not problems, "library modules that load the web app when imported:\n  " + "\n  ".join(problems)


def test_web_app_rule_on_a_made_up_tree(tmp_path):
    files = {
        "lib/__init__.py": "",
        "lib/serving/__init__.py": "",
        "lib/serving/api.py": "from fastapi import FastAPI\n",  # the app, wherever it lives
        "lib/serving/routes.py": "from fastapi import APIRouter\nimport lib.serving.api\n",  # app to app: fine
        "lib/cli.py": "def serve():\n    from lib.serving.api import FastAPI\n",  # deferred: fine
        "lib/eager.py": "from lib.serving import api\nimport app.main\n",
        "app/__init__.py": "",
        "app/main.py": "",
    }
    for relative, source in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(source)
    graph = ImportGraph(tmp_path, packages=("lib", "app"))
    assert web_app_violations(graph, library="lib") == ["lib.eager imports app.main at module level",
                                                        "lib.eager imports lib.serving.api at module level"]


# --- params: the comparison, the tracker, then the pipeline run ---------------------------------------------


def test_params_drift_accepts_reads_under_declared_keys():
    read = {"seed", "augment.flip.mode", "train.phase1.epochs", "train.phase1.learning_rate"}
    assert params_drift("s", ["seed", "augment", "train.phase1"], read) == []


def test_params_drift_names_undeclared_reads_and_unused_declarations():
    read = {"seed", "model.backbone", "model.weights", "data.source", "train.phase10"}
    problems = params_drift("s", ["seed", "model.weights", "train.phase1", "evaluate"], read)
    assert problems == [
        "s: reads data.source but does not declare it",
        "s: reads model.backbone but does not declare it",
        "s: reads train.phase10 but does not declare it",  # a prefix of the name is not a parent key
        "s: declares train.phase1 but reads nothing under it",
        "s: declares evaluate but reads nothing under it",
    ]


def test_params_drift_names_a_section_read_in_full_once():
    leaves = {"seed", "model.backbone", "model.weights", "model.head.units", "model.head.dropout", "data.source",
              "data.local_path"}
    read = leaves - {"data.local_path"}
    assert params_drift("s", ["model.backbone"], read, leaves) == [
        "s: reads data.source but does not declare it",  # data.local_path is not read: data is not named whole
        "s: reads every key of model.head but does not declare it",  # model is partly declared: not named whole
        "s: reads model.weights but does not declare it",
        "s: reads seed but does not declare it",
    ]


def test_params_drift_rejects_entries_of_another_params_file():
    with pytest.raises(ValueError, match=r"s: params entry \{'other.yaml': \['a'\]\}"):
        declared_keys("s", ["seed", {"other.yaml": ["a"]}])


def test_the_whole_params_file_declares_every_key():
    assert declared_keys("s", ["seed", {"params.yaml": None}, {"params.yaml": ["data.source"]}]) == [
        "seed", WHOLE_FILE, "data.source"]
    assert params_drift("s", [{"params.yaml": None}], {"seed", "model.head.units"}) == []
    assert params_drift("s", [{"params.yaml": None}], set()) == ["s: declares the whole params file but reads nothing "
                                                                 "under it"]


def test_tracker_records_leaf_reads_and_dumps(monkeypatch):
    tracker = ParamsTracker().install(monkeypatch)
    params = load_params(PROJECT_ROOT / "params.yaml")
    assert tracker.read == set()  # validating and annotating read nothing
    assert params.train.phase1.epochs > 0
    dumped = params.evaluate.model_dump()
    every_evaluate_key = {key for key in leaf_keys(params) if key.startswith("evaluate.")}
    assert "evaluate.threshold.method" in every_evaluate_key and "evaluate.bootstrap_resamples" in every_evaluate_key
    assert tracker.read == {"train.phase1.epochs"} | every_evaluate_key
    assert dumped["threshold"]["method"] == params.evaluate.threshold.method
    tracker.reset()
    assert params.model.unfreeze["resnet50"] > 0  # a mapping is one leaf: reading any entry reads the key
    assert tracker.read == {"model.unfreeze"}
    tracker.reset()
    assert dict(params.split.fractions)["train"] > 0
    assert tracker.read == {"split.fractions.train", "split.fractions.valid", "split.fractions.test"}
    tracker.reset()
    params.model_dump_json()
    assert tracker.read == leaf_keys(params) and "data.synthetic.normal.train" in tracker.read


def test_tracker_keeps_pydantic_behaviour(monkeypatch):
    ParamsTracker().install(monkeypatch)
    params = load_params(PROJECT_ROOT / "params.yaml")
    again = load_params(PROJECT_ROOT / "params.yaml")
    assert isinstance(params.train, TrainParams)
    assert params == again and params.train == again.train
    assert TrainParams.model_validate(params.train.model_dump()) == params.train


@pytest.mark.e2e
def test_stage_params_match_dvc_yaml(in_process_pipeline):
    """Every stage's main(), run in this process in dvc.yaml order: the keys it read against its `params:`."""
    problems = []
    for name, _, stage in python_stages():
        problems += params_drift(name, stage.get("params", []), in_process_pipeline.reads[name],
                                 in_process_pipeline.leaves)
    assert not problems, "params read versus dvc.yaml's params lists:\n  " + "\n  ".join(problems)

