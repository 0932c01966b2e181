"""Several configurations, one table: the lesion-map panel of `benchmarks.seeds` runs side by side.

    python -m benchmarks.variants_table NAME --title TITLE [--table ID] [--split official|regroup] [--no-goals]
        --column "today's default=lesion_map_no_insertion:today's default: mean ± sd"
        --column "procedural only=lesion_map_procedural" ...

Each --column is LABEL=SOURCE, where SOURCE names a file under docs/results:

- `RESULTS`: a file written by `benchmarks.seeds --results`; the cell is the mean ± sd over its seeds with the
  per-seed values, read from the file's `summary`, so re-running a variant refreshes its column here;
- `RESULTS:COLUMN`: the column titled COLUMN of an earlier table in that file, copied row by row (for results
  written before `benchmarks.seeds` kept its summary).

The rows are PANEL_ROWS: the in-domain figures, the inserted-lesion check and the cross-source panel, the figures
issue 27 chooses the default by; --split names the split in the test AUC's row (a copied column matches a row by
its title with or without such a parenthesis). The table goes to docs/results/NAME.json as table ID (default
"official"), with this command as its provenance; an existing file keeps its other tables.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.results import RESULTS_DIR, provenance
from benchmarks.seeds import figure_text, mean_sd_text
from chestct.atomic_io import write_json

# (row title, benchmarks.seeds summary label, goal) in the order the table shows them.
PANEL_ROWS = [
    ("test AUC", "test AUC", ">= 0.95"),
    ("hist-matched test AUC", "hist-matched test AUC", ">= 0.90"),
    ("robustness worst AUC", "robustness worst AUC", ">= 0.85"),
    ("inserted-lesion check (test Normals)", "inserted-lesion check, test Normals", ">= 0.95"),
    ("**Lung-PET-CT-Dx within-series AUC**", "external: lung_pet_ct_dx.within_series_auc", ">= 0.80"),
    ("tumour slices called Cancer", "external: lung_pet_ct_dx.lesion_sensitivity", ""),
    ("tumour-free slices called Cancer", "external: lung_pet_ct_dx.other_slices_positive_rate", "<= 0.20"),
    ("kernel decision agreement", "external: lung_pet_ct_dx.kernel_agreement", ">= 0.95"),
    ("Grad-CAM mass in the tumour box (box area 0.054)", "external: lung_pet_ct_dx.in_box_gradcam_share",
     ">= 0.5 (either)"),
    ("lesion-map mass in the tumour box", "external: lung_pet_ct_dx.in_box_lesion_map_share", ">= 0.5 (either)"),
    ("**LUNA16 normal specificity**", "external: luna16_normal.specificity", ">= 0.90"),
    ("test ECE, calibrated", "test ECE, calibrated (evaluate.calibration.method)", "<= 0.05"),
    ("test images flagged out of domain", "domain: test flagged out of domain", "<= 0.05"),
]


class VariantSourceError(ValueError):
    """A --column whose results file, summary or column is not there."""


def summary_cell(entry: dict | None) -> str:
    """'mean ± sd (v1, v2, v3)' of one benchmarks.seeds summary entry; 'n/a' where the figure was not measured."""
    if not entry or entry.get("mean") is None:
        return "n/a"
    values = entry.get("values") or []
    return mean_sd_text(entry) + (f" ({', '.join(figure_text(value) for value in values)})" if len(values) > 1 else "")


def _load(name: str, directory: Path) -> dict:
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise VariantSourceError(f"no results file {path}: run the benchmark that writes it (benchmarks.seeds "
                                 f"--results {name}) or fix the --column")
    return json.loads(path.read_text())


def _bare(title: str) -> str:
    """A row title without a closing parenthesis: 'test AUC (official split)' and 'test AUC' are one row."""
    return re.sub(r"\s*\([^()]*\)$", "", title)


def column_cells(source: str, directory: Path = RESULTS_DIR) -> list[str]:
    """The cells of one --column SOURCE, one per PANEL_ROWS row."""
    name, _, column = source.partition(":")
    figures = _load(name, directory)["figures"]
    if not column:
        if "summary" not in figures:
            raise VariantSourceError(f"{name}.json has no summary of seeds (written before benchmarks.seeds kept "
                                     f"one): name one of its table columns as {name}:COLUMN")
        return [summary_cell(figures["summary"].get(label)) for _, label, _ in PANEL_ROWS]
    for table in figures.get("tables", {}).values():
        if column in table["columns"]:
            index = table["columns"].index(column)
            by_title = {_bare(row[0]): row[index] for row in table["rows"]}
            return [by_title.get(_bare(title), "n/a") for title, _, _ in PANEL_ROWS]
    raise VariantSourceError(f"no table of {name}.json has a column {column!r}")


def variants_table(columns: list[tuple[str, str]], title: str, *, split: str = "official", goals: bool = True,
                   directory: Path = RESULTS_DIR) -> dict:
    """The table {"title", "columns", "rows"} of the (label, source) columns over PANEL_ROWS."""
    cells = [column_cells(source, directory) for _, source in columns]
    titles = [f"{title_} ({split} split)" if label == "test AUC" else title_ for title_, label, _ in PANEL_ROWS]
    rows = [[titles[index]] + [column[index] for column in cells] + ([goal] if goals else [])
            for index, (_, _, goal) in enumerate(PANEL_ROWS)]
    return {"title": title, "columns": ["figure"] + [label for label, _ in columns] + (["goal"] if goals else []),
            "rows": rows}


def parse_column(text: str) -> tuple[str, str]:
    label, sep, source = text.partition("=")
    if not sep or not label.strip() or not source.strip():
        raise argparse.ArgumentTypeError(f"--column {text!r}: expected LABEL=RESULTS or LABEL=RESULTS:COLUMN")
    return label.strip(), source.strip()


def main(argv: list[str] | None = None, directory: Path = RESULTS_DIR) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the results file to write, docs/results/NAME.json")
    parser.add_argument("--title", required=True, help="the table's title (its caption)")
    parser.add_argument("--table", default="official", metavar="ID", help="the table's id (default official)")
    parser.add_argument("--column", dest="columns", action="append", type=parse_column, required=True,
                        metavar="LABEL=SOURCE", help="a column: RESULTS or RESULTS:COLUMN (repeatable)")
    parser.add_argument("--split", default="official", help="the split the runs tested on, named in the test AUC "
                                                                "row (default official)")
    parser.add_argument("--no-goals", dest="goals", action="store_false", help="leave out the goal column")
    args = parser.parse_args(argv)
    table = variants_table(args.columns, args.title, split=args.split, goals=args.goals, directory=directory)
    table["provenance"] = provenance(argv)
    path = Path(directory) / f"{args.name}.json"
    existing = json.loads(path.read_text()) if path.is_file() else None
    result = existing or {"schema_version": 1, "provenance": table["provenance"], "figures": {}}
    result["figures"].setdefault("tables", {})[args.table] = table
    write_json(path, result)
    print(f"written: {path} (table {args.table}, {len(args.columns)} columns)")
    return path


if __name__ == "__main__":
    main()
