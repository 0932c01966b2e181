"""benchmarks.variants_table: seed runs of several configurations side by side, as the docs render them."""

import json

import pytest

from benchmarks.results import write_result
from benchmarks.seeds import summarise
from benchmarks.variants_table import PANEL_ROWS, VariantSourceError, column_cells, main, parse_column, variants_table
from scripts import docs_macros


def _seed_run(directory, name, auc_values, luna_values):
    summary = summarise([{"test AUC": auc, "external: luna16_normal.specificity": luna}
                         for auc, luna in zip(auc_values, luna_values, strict=True)])
    write_result(name, {"tables": {}, "summary": summary}, command=["--seeds", "3"], directory=directory)


def test_a_column_from_a_seed_summary_gives_mean_sd_and_every_seed(tmp_path):
    _seed_run(tmp_path, "procedural", [0.9, 0.95, 1.0], [0.5, None, 0.7])
    cells = dict(zip([title for title, _, _ in PANEL_ROWS], column_cells("procedural", tmp_path), strict=True))
    assert cells["test AUC"] == "0.950 ± 0.050 (0.900, 0.950, 1.000)"
    # a seed that lacks a figure stays visible as n/a, and the mean is over the seeds that have it
    assert cells["**LUNA16 normal specificity**"] == "0.600 ± 0.141 (0.500, n/a, 0.700)"
    assert cells["kernel decision agreement"] == "n/a"


def test_a_column_copied_from_an_older_table_follows_the_row_titles(tmp_path):
    table = {"title": "t", "columns": ["figure", "bank only: mean ± sd"],
             "rows": [["**LUNA16 normal specificity**", "0.438 ± 0.112"], ["test AUC (official split)", "0.998"]]}
    write_result("bank", {"tables": {"official": table}}, command=[], directory=tmp_path)
    cells = column_cells("bank:bank only: mean ± sd", tmp_path)
    assert cells[0] == "0.998" and cells[[title for title, _, _ in PANEL_ROWS].index(
        "**LUNA16 normal specificity**")] == "0.438 ± 0.112"
    with pytest.raises(VariantSourceError, match="no table of bank.json has a column 'absent'"):
        column_cells("bank:absent", tmp_path)
    with pytest.raises(VariantSourceError, match="bank.json has no summary of seeds"):
        column_cells("bank", tmp_path)
    with pytest.raises(VariantSourceError, match="no results file .*missing.json"):
        column_cells("missing", tmp_path)


def test_the_test_auc_row_names_the_split_and_matches_either_title(tmp_path):
    table = {"title": "t", "columns": ["figure", "today's recipe"], "rows": [["test AUC", "0.882 ± 0.032"]]}
    write_result("regroup", {"tables": {"regroup": table}}, command=[], directory=tmp_path)
    built = variants_table([("today", "regroup:today's recipe")], "t", split="regroup", goals=False,
                           directory=tmp_path)
    assert built["rows"][0] == ["test AUC (regroup split)", "0.882 ± 0.032"]
    assert built["columns"] == ["figure", "today"]


def test_the_written_table_renders_and_keeps_the_files_other_tables(tmp_path):
    _seed_run(tmp_path, "procedural", [0.9, 0.95, 1.0], [0.5, 0.6, 0.7])
    write_result("sources", {"tables": {"regroup": {"title": "r", "columns": ["a"], "rows": [["b"]]}}},
                 command=[], directory=tmp_path)
    main(["sources", "--title", "Each source alone", "--column", "procedural only=procedural"], tmp_path)
    result = json.loads((tmp_path / "sources.json").read_text())
    assert set(result["figures"]["tables"]) == {"regroup", "official"}
    rendered = docs_macros.render_results_table("sources", "official", "index.md", tmp_path)
    assert rendered.splitlines()[0] == "| figure | procedural only | goal |"
    assert "| **LUNA16 normal specificity** | 0.600 ± 0.100 (0.500, 0.600, 0.700) | >= 0.90 |" in rendered
    assert "*Each source alone.* *Measured by `python -m" in rendered
    assert "--column 'procedural only=procedural'" in rendered


def test_a_column_needs_a_label_and_a_source():
    assert parse_column("bank only = lesion_map_bank:bank only: mean ± sd") == (
        "bank only", "lesion_map_bank:bank only: mean ± sd")
    with pytest.raises(Exception, match="expected LABEL=RESULTS"):
        parse_column("lesion_map_bank")
