"""The README and the documentation site: short, true to CI, and every measured figure traceable to a file.

- The README fits on two screens and its commands are the ones CI runs (.ci/run).
- Its headline table is the results file it names, row for row.
- Every table of measured figures on the site is rendered from docs/results/*.json (scripts/docs_macros.py), and
  every such file says how, where and when its figures were made; a transcribed one holds only numbers that the
  README of its commit held.
- The params reference is generated from params.yaml and chestct/params.py, so it names every key.
- `mkdocs build --strict` passes (CI runs it too, before the tests).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chestct.params import parse_params
from scripts import docs_macros
from scripts.docs_macros import DocsError
from tests.conftest import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
CI_RUN = PROJECT_ROOT / ".ci" / "run"
DOCS = PROJECT_ROOT / "docs"
RESULTS = DOCS / "results"
MACRO_CALL = re.compile(r"""\{\{\s*results_table\(\s*["']([^"']+)["']\s*,\s*["']([^"']+)["']\s*\)""")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def _commands(text: str) -> list[str]:
    """Shell commands of a script or of ```bash blocks: comments dropped, continuation lines joined, leading
    VAR=value assignments and `&&` chains split off."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = re.split(r"\s+#", line, maxsplit=1)[0]
        for part in line.split("&&"):
            words = part.split()  # the commands compared here quote nothing; .ci/run's shell lines need no parsing
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words = words[1:]
            if words:
                commands.append(" ".join(words))
    return commands


def _bash_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL))


def _readme_commands(section: str) -> list[str]:
    return _commands(_bash_blocks(docs_macros.readme_section(section)))


def _ci_commands() -> list[str]:
    return _commands(CI_RUN.read_text())


def _program(command: str) -> str:
    """`.venv/bin/python -m pip ...` and `python -m pip ...` name the same program."""
    return re.sub(r"^(\S*/)?(python3?|pip|ruff|mkdocs)\b", r"\2", command)


# --- the README ---------------------------------------------------------------------------------------------


def test_the_readme_fits_on_two_screens():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail to a page under docs/"


def test_the_readmes_test_command_is_the_one_ci_runs():
    readme = [_program(command) for command in _readme_commands("Run the tests")]
    ci = [_program(command) for command in _ci_commands()]
    readme_pytest = [command for command in readme if " pytest" in command]
    ci_pytest = [command for command in ci if " pytest" in command]
    assert readme_pytest == ci_pytest == ["python -m pytest -q"], (readme_pytest, ci_pytest)
    assert [c for c in readme if c.startswith("ruff")] == [c for c in ci if c.startswith("ruff")]


def test_the_readme_installs_what_ci_installs():
    def requirement_files(commands: list[str]) -> set[str]:
        return {word for command in commands if "pip install" in command
                for flag, word in zip(command.split(), command.split()[1:], strict=False) if flag == "-r"}

    def editable(commands: list[str]) -> bool:
        return any("pip install" in command and "--no-deps" in command and command.endswith("-e .")
                   for command in commands)

    readme, ci = _readme_commands("Install"), _ci_commands()
    assert requirement_files(readme) == requirement_files(ci) == {"requirements.txt", "requirements-dev.txt"}
    assert editable(readme) and editable(ci)


def test_ci_builds_the_site_strictly_as_the_readme_says():
    assert any(_program(command).startswith("mkdocs build --strict") for command in _ci_commands())
    assert "mkdocs build --strict" in README.read_text()


def test_the_readme_quick_run_is_the_from_scratch_recipe_of_the_site():
    (run,) = [command for command in _readme_commands("A quick run on a CPU") if command.startswith("dvc exp run")]
    settings = dict(word.split("=", 1) for word in shlex.split(run) if "=" in word)
    assert settings["data.source"] == "local" and settings["model.weights"] == "null"
    assert settings["model.backbone"] == "mobilenetv3small" and settings["preprocess.image_size"] == "128"
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for key, text in settings.items():  # every -S names a real key, and together they make valid params
        section = params
        *parents, leaf = key.split(".")
        for part in parents:
            section = section[part]
        assert leaf in section, f"README quick run: -S {key} is not in params.yaml"
        section[leaf] = yaml.safe_load(text)
    parse_params(params, "params.yaml with the README's quick run")


def _github_slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readmes_links_resolve():
    text = README.read_text()
    anchors = {_github_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (PROJECT_ROOT / path).exists(), f"README links to {path}, which does not exist"
        else:
            assert anchor in anchors, f"README links to #{anchor}, which is no heading of the README"


def _headline() -> tuple[str, str, list[str], list[list[str]]]:
    lines = README.read_text().splitlines()
    (start,) = [index for index, line in enumerate(lines) if line.startswith("<!-- headline:")]
    name, table_id = re.match(r"<!-- headline: docs/results/(\S+)\.json (\S+)", lines[start]).groups()
    table = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return name, table_id, table[0], table[2:]


def test_the_readmes_headline_table_is_its_results_file():
    name, table_id, columns, rows = _headline()
    table = docs_macros.result_table(docs_macros.load_result(name), name, table_id)
    assert columns == table["columns"]
    assert rows, "the README's headline table has no rows"
    for row in rows:
        assert row in table["rows"], f"README headline row {row} differs from docs/results/{name}.json"
    commit = docs_macros.load_result(name)["provenance"]["commit"][:7]
    assert f"docs/results/{name}.json" in README.read_text() and f"`{commit}`" in README.read_text()


# --- results files and the tables rendered from them -----------------------------------------------------------


def _results_files() -> list[Path]:
    return sorted(RESULTS.glob("*.json"))


def _references() -> list[tuple[Path, str, str]]:
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        if page.is_relative_to(RESULTS):  # results/README.md describes the macro; it is not a page of the site
            continue
        found += [(page, name, table) for name, table in MACRO_CALL.findall(page.read_text())]
    return found


def test_every_results_file_records_how_its_figures_were_made():
    assert _results_files(), "docs/results/ holds no results file"
    for path in _results_files():
        result = json.loads(path.read_text())
        assert result["schema_version"] == 1, path.name
        missing = [field for field in docs_macros.PROVENANCE_FIELDS if field not in result["provenance"]]
        assert not missing, f"{path.name}: provenance lacks {missing}"
        assert result["provenance"]["command"] and result["provenance"]["commit"], path.name
        for table_id, table in result["figures"].get("tables", {}).items():
            assert table["title"] and table["columns"] and table["rows"], (path.name, table_id)
            assert all(len(row) == len(table["columns"]) for row in table["rows"]), (path.name, table_id)


def test_every_table_a_page_asks_for_exists_and_renders():
    references = _references()
    assert len(references) >= 15, references
    for page, name, table_id in references:
        rendered = docs_macros.render_results_table(name, table_id, page.relative_to(DOCS).as_posix())
        assert rendered.startswith("| ") and f"results/{name}.json" in rendered, (page, name, table_id)


def test_every_results_file_is_on_a_page():
    used = {name for _, name, _ in _references()}
    unused = [path.stem for path in _results_files() if path.stem not in used]
    assert not unused, f"docs/results/ files no page renders: {unused}"


def _readme_at(commit: str) -> str | None:
    result = subprocess.run(["git", "show", f"{commit}:README.md"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else None


def test_transcribed_tables_hold_only_numbers_of_the_readme_they_came_from():
    checked = 0
    for path in _results_files():
        result = json.loads(path.read_text())
        for table_id, table in result["figures"].get("tables", {}).items():
            provenance = {**result["provenance"], **table.get("provenance", {})}
            if not provenance.get("transcribed_from"):
                continue
            readme = _readme_at(provenance["commit"])
            if readme is None:
                continue  # a shallow clone without that commit
            known = set(NUMBER.findall(readme))
            unknown = sorted({number for row in table["rows"] for cell in row for number in NUMBER.findall(str(cell))
                              if number not in known})
            assert not unknown, f"{path.name} {table_id}: {unknown} are not in README.md at {provenance['commit']}"
            checked += 1
    if not checked:
        pytest.skip("the transcribed tables' commits are not in this clone")


def _write(directory: Path, name: str, provenance: dict, tables: dict) -> None:
    (directory / f"{name}.json").write_text(json.dumps(
        {"schema_version": 1, "provenance": provenance, "figures": {"tables": tables}}))


PROVENANCE = {"command": "python -m benchmarks.scaling", "commit": "0123456789abcdef" * 2 + "01234567",
              "dirty": False, "cpu": "Test CPU", "cpu_features": [], "cores": 2, "date": "2026-12-08T10:00:00+00:00"}
TABLE = {"title": "t", "columns": ["a", "b"], "rows": [["x|y", 1.23456], ["z", None]], "notes": "A note."}


def test_a_table_renders_with_its_caption(tmp_path):
    _write(tmp_path, "bench", PROVENANCE, {"main": TABLE})
    rendered = docs_macros.render_results_table("bench", "main", "reference/page.md", tmp_path)
    assert rendered.splitlines()[:4] == ["| a | b |", "|---|---|", "| x\\|y | 1.235 |", "| z |  |"]
    assert ("*t.* *Measured by `python -m benchmarks.scaling` at commit `0123456` on Test CPU, 2 cores, 2026-12-08 "
            "([bench.json](../results/bench.json)).*") in rendered
    assert rendered.endswith("A note.")


def test_a_caption_says_uncommitted_changes_and_transcription():
    assert "`0123456` + uncommitted changes" in docs_macros.caption({**PROVENANCE, "dirty": True})
    transcribed = docs_macros.caption({**PROVENANCE, "transcribed_from": "README.md at 0123456"})
    assert transcribed.startswith("*Transcribed from README.md at 0123456: `python -m benchmarks.scaling`")


def test_a_table_may_carry_its_own_provenance(tmp_path):
    _write(tmp_path, "bench", PROVENANCE, {"main": {**TABLE, "provenance": {"commit": "fedcba9" + "0" * 33}}})
    assert "at commit `fedcba9`" in docs_macros.render_results_table("bench", "main", "index.md", tmp_path)


def test_a_missing_file_or_table_fails_the_build(tmp_path):
    with pytest.raises(DocsError, match="docs/results/absent.json does not exist"):
        docs_macros.render_results_table("absent", "main", "index.md", tmp_path)
    _write(tmp_path, "bench", PROVENANCE, {"main": TABLE})
    with pytest.raises(DocsError, match="has no table 'other' \\(it has: main\\)"):
        docs_macros.render_results_table("bench", "other", "index.md", tmp_path)
    _write(tmp_path, "bare", {"command": "x"}, {"main": TABLE})
    with pytest.raises(DocsError, match="lacks commit, dirty, cpu"):
        docs_macros.render_results_table("bare", "main", "index.md", tmp_path)


def test_benchmarks_write_tables_the_macro_renders(tmp_path):
    from benchmarks.results import write_result
    from benchmarks.scaling import cost_table
    from benchmarks.seeds import seeds_table, summarise

    rows = [{"size": size, "pre": {"seconds": size / 500, "rss_main_mib": 114, "rss_worker_mib": 88},
             "disk": 8 * 2**20, "pipe": {"images_per_s": 4475.2}, "epoch": {"seconds": 7, "rss_mib": 929}}
            for size in (1000, 10000)]
    summary = summarise([{"test AUC": 0.9}, {"test AUC": 0.95}])
    write_result("bench", {"tables": {"cost": cost_table(rows, 64), "seeds": seeds_table(summary, [42, 43], "t")}},
                 command=["--sizes", "1000,10000"], directory=tmp_path)
    cost = docs_macros.render_results_table("bench", "cost", "index.md", tmp_path)
    assert "| 10,000 | 20 s | 2.00 (1.00x) | 114 / 88 MiB | 8 MiB | 4,475 img/s | 7 s, 929 MiB |" in cost
    assert "--sizes 1000,10000`" in cost and cost.count("*Measured by") == 1
    seeds = docs_macros.render_results_table("bench", "seeds", "index.md", tmp_path)
    assert "| test AUC | 0.925 ± 0.035 | 0.900, 0.950 |" in seeds


# --- the params reference ------------------------------------------------------------------------------------


def test_the_params_reference_names_every_key_of_params_yaml():
    rendered = docs_macros.render_params_reference()
    keys = docs_macros.params_yaml_keys()
    assert len(keys) > 150
    missing = [key for key in keys if f"| `{key}` |" not in rendered]
    assert not missing, f"the params reference lacks {missing}"


def test_every_key_of_the_reference_says_what_it_does():
    rows = docs_macros.params_rows()
    documented = {row.key for row in rows if row.doc}
    # A key of a flow mapping ({probability: 0.5, degrees: 30}) or of model.unfreeze shares its parent's comment.
    silent = [row.key for row in rows if not row.doc and row.key.rsplit(".", 1)[0].removesuffix("[]") not in documented
              and row.allowed != "section"]
    assert not silent, f"params with neither a comment nor a documented parent: {silent}"
    stages = {row.key: row.stages for row in rows}
    assert stages["train.phase1.epochs"] == "train_phase1, out_of_fold, export"
    assert stages["external.sets[].path"] == "external"


def test_the_reference_follows_params_yaml_by_construction(tmp_path):
    text = (PROJECT_ROOT / "params.yaml").read_text()
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(text.replace("seed: 42  #", "sede: 1  # a typo\nseed: 42  #", 1))
    with pytest.raises(DocsError, match="params.yaml sets sede, which chestct/params.py does not define"):
        docs_macros.params_rows(unknown)
    omitted = tmp_path / "omitted.yaml"
    omitted.write_text(re.sub(r"\n  refuse_out_of_domain: .*", "", text))
    (row,) = [row for row in docs_macros.params_rows(omitted) if row.key == "serve.refuse_out_of_domain"]
    assert row.default == "false (not in params.yaml: the model's default)"
    assert "422" in row.doc  # the model's own comment still says what it does


def test_params_yaml_comments_are_read_with_their_preface():
    text = "# file header\n\na:  # section\n  # above b\n  b: 1  # after b\n  c: {x: 1}\n"
    comments = docs_macros.yaml_comments(text)
    assert comments == {"a": "section", "a.b": "above b after b", "a.c": ""}


# --- README sections on pages, and the site ------------------------------------------------------------------


def test_a_readme_section_renders_for_a_page():
    section = docs_macros.readme_section("The pipeline")
    assert section.startswith("```") and "](docs/" not in section and "](export.md)" in section
    with pytest.raises(DocsError, match="README.md has no section '## Nothing here'"):
        docs_macros.readme_section("Nothing here")


@pytest.mark.skipif(subprocess.run([sys.executable, "-m", "mkdocs", "--version"], capture_output=True).returncode,
                    reason="mkdocs is not installed (requirements-dev.txt)")
def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    params = (tmp_path / "params" / "index.html").read_text()
    assert "model.unfreeze.mobilenetv3small" in params
    assert "Transcribed from README.md at" in (tmp_path / "scaling" / "index.html").read_text()
