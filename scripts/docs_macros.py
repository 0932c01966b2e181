"""The documentation site's macros (mkdocs-macros-plugin, `module_name: scripts/docs_macros` in mkdocs.yml).

Pages call them in Jinja braces; each one renders Markdown at build time from files in the repository, so a page
cannot drift from what it describes:

- `results_table("scaling", "cost")`: the table `cost` of docs/results/scaling.json (written by a benchmark with
  benchmarks.results.write_result, or transcribed from a past README with its commit), followed by a caption
  naming the command, the commit, the CPU, its cores and the date it came from.
- `params_reference()`: every key of params.yaml, its default, what it may hold (from the pydantic models of
  chestct/params.py) and what it does (its comment in params.yaml, and the models' own comments and docstrings).
- `readme_section("Install")`: a section of README.md, its links rewritten for a page under docs/, so the README
  and the site say the same thing from one source.
- `run_figures("eval")`: the figures scripts/docs_figures.py copied from a pipeline run into docs/figures/<name>/,
  with the run they came from.

A missing results file, table, README section or figure folder raises, and mkdocs.yml sets the plugin's
`on_error_fail`, so `mkdocs build` fails instead of rendering a stale or empty page. Nothing here imports
TensorFlow: the site builds in seconds on a machine without it.
"""

from __future__ import annotations

import ast
import io
import json
import posixpath
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"
FIGURES = DOCS / "figures"
PARAMS_FILE = ROOT / "params.yaml"
PARAMS_SOURCE = ROOT / "chestct" / "params.py"
DVC_YAML = ROOT / "dvc.yaml"
README = ROOT / "README.md"
PROVENANCE_FIELDS = ("command", "commit", "dirty", "cpu", "cpu_features", "cores", "date")
if str(ROOT) not in sys.path:  # chestct.params from this checkout, installed or not (`mkdocs` runs from its bin/)
    sys.path.insert(0, str(ROOT))


class DocsError(Exception):
    """A page refers to something that does not exist (a results file, a table, a README section)."""


# --- results tables -------------------------------------------------------------------------------------------


def load_result(name: str, directory: Path = RESULTS) -> dict:
    """docs/results/<name>.json, checked to hold provenance and figures."""
    path = directory / f"{name}.json"
    if not path.is_file():
        raise DocsError(f"docs/results/{name}.json does not exist (a page asks for it): run the benchmark that "
                        f"writes it, or correct the name")
    result = json.loads(path.read_text())
    missing = [field for field in PROVENANCE_FIELDS if field not in result.get("provenance", {})]
    if missing or "figures" not in result:
        raise DocsError(f"docs/results/{name}.json lacks {', '.join(missing) or 'figures'}: write it with "
                        f"benchmarks.results.write_result")
    return result


def result_table(result: dict, name: str, table_id: str) -> dict:
    tables = result["figures"].get("tables", {})
    if table_id not in tables:
        raise DocsError(f"docs/results/{name}.json has no table {table_id!r} (it has: "
                        f"{', '.join(sorted(tables)) or 'none'})")
    table = tables[table_id]
    for row in table["rows"]:
        if len(row) != len(table["columns"]):
            raise DocsError(f"docs/results/{name}.json, table {table_id!r}: a row has {len(row)} cells for "
                            f"{len(table['columns'])} columns: {row}")
    return table


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        value = f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: list, rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(column) for column in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def caption(provenance: dict, link: str | None = None) -> str:
    """One line: how, where and when the figures were made (and, when transcribed, from which README)."""
    commit = provenance.get("commit") or "unknown commit"
    commit = f"`{commit[:7]}`" + (" + uncommitted changes" if provenance.get("dirty") else "")
    cores = provenance.get("cores")
    machine = provenance.get("cpu") or "an unrecorded CPU"
    if cores:
        machine += f", {cores} cores"
    date = str(provenance.get("date") or "an unrecorded date")[:10]
    text = f"`{provenance.get('command') or 'unrecorded command'}` at commit {commit} on {machine}, {date}"
    if provenance.get("transcribed_from"):
        text = f"Transcribed from {provenance['transcribed_from']}: {text}"
    else:
        text = f"Measured by {text}"
    if link:
        text += f" ([{link.rsplit('/', 1)[-1]}]({link}))"
    return f"*{text}.*"


def render_results_table(name: str, table_id: str, page_path: str = "index.md", directory: Path = RESULTS) -> str:
    """The Markdown of one results table with its notes and caption; `page_path` (relative to docs/) places the
    link to the JSON file."""
    result = load_result(name, directory)
    table = result_table(result, name, table_id)
    provenance = {**result["provenance"], **table.get("provenance", {})}
    link = posixpath.relpath(f"results/{name}.json", posixpath.dirname(page_path) or ".")
    title = table.get("title", "").rstrip(".")
    parts = [markdown_table(table["columns"], table["rows"]), "",
             (f"*{title}.* " if title else "") + caption(provenance, link)]
    if table.get("notes"):
        parts += ["", table["notes"]]
    return "\n".join(parts)


# --- the params reference -------------------------------------------------------------------------------------


class ParamRow:
    """One key of the reference. (A plain class: mkdocs-macros loads this file outside sys.modules, where
    dataclasses cannot resolve their annotations.)"""

    def __init__(self, key: str, default: str, allowed: str, doc: str, stages: str = "") -> None:
        self.key = key  # dotted; entries of a list of sections as `external.sets[].name`
        self.default = default  # params.yaml's value, as YAML; empty for keys params.yaml does not set
        self.allowed = allowed  # what the model accepts
        self.doc = doc  # params.yaml's comment, then the models' own comments and docstrings
        self.stages = stages  # the dvc.yaml stages that declare the key, a section above it or a key below it


def _yaml_value(value) -> str:
    if isinstance(value, dict | list):
        return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()


def yaml_comments(text: str) -> dict[str, str]:
    """{dotted key: its comment} from params.yaml's lines: the comment after the key, prefixed by comment lines
    standing just above it (the file's opening comment excepted). Keys inside a flow mapping share its line."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    seen_key = False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            pending = []
            continue
        if stripped.startswith("#"):
            if seen_key:
                pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z0-9_]+):(.*)$", line)
        if not match:
            continue
        seen_key = True
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(name for _, name in stack), key])
        comment = rest.split(" #", 1)[1].strip() if " #" in rest else ""
        comments[dotted] = " ".join([*pending, comment]).strip()
        pending = []
        stack.append((indent, key))
    return comments


def _field_comments(source: str) -> dict[tuple[str, str], str]:
    """{(class, field): its comments in chestct/params.py}: comment lines just above the field, then the one at
    the end of its line."""
    comments_by_line = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments_by_line[token.start[0]] = (token.string.lstrip("#").strip(), token.line.strip().startswith("#"))
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                above, line = [], statement.lineno - 1
                while line in comments_by_line and comments_by_line[line][1]:
                    above.insert(0, comments_by_line[line][0])
                    line -= 1
                trailing = comments_by_line.get(statement.end_lineno)
                parts = above + ([trailing[0]] if trailing and not trailing[1] else [])
                if parts:
                    found[(node.name, statement.target.id)] = " ".join(parts)
    return found


def _constraints(metadata) -> list[str]:
    words = []
    for item in metadata:
        for attribute, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, attribute, None) is not None:
                words.append(f"{symbol} {getattr(item, attribute)}")
        if getattr(item, "min_length", None) is not None:
            words.append(f"length ≥ {item.min_length}")
        if getattr(item, "max_length", None) is not None:
            words.append(f"length ≤ {item.max_length}")
        if getattr(item, "pattern", None) is not None:
            words.append(f"matching `{item.pattern}`")
        words += _constraints(getattr(item, "metadata", []) or [])
    return words


def describe_type(annotation, metadata=()) -> str:
    """A short English description of what a field accepts."""
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return describe_type(args[0], [*args[1:], *metadata])
    limits = _constraints(metadata)
    suffix = (" " + ", ".join(limits)) if limits else ""
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{_yaml_value(value)}`" for value in args)
    if origin in (typing.Union, types.UnionType):
        kinds = [describe_type(arg) for arg in args if arg is not type(None)]
        return " or ".join(kinds) + (", or `null`" if type(None) in args else "") + suffix
    if origin is tuple:
        return "[" + ", ".join(describe_type(arg) for arg in args) + "]"
    if origin is list:
        return f"list of ({describe_type(args[0])}){suffix}"
    if origin is dict:
        return f"mapping of {describe_type(args[0])} to {describe_type(args[1])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {bool: "`true` or `false`", int: "integer", float: "number", str: "text"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation))) + suffix


def _section_class(annotation):
    from pydantic import BaseModel

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _section_class(args[0])
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    if origin is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], True
    return None, False


def params_rows(params_file: Path = PARAMS_FILE, source_file: Path = PARAMS_SOURCE,
                dvc_file: Path = DVC_YAML) -> list[ParamRow]:
    """One row per key: every key params.yaml sets, and every key the models accept, in params.yaml's order."""
    from chestct.params import Params

    text = params_file.read_text()
    values = yaml.safe_load(text)
    comments = yaml_comments(text)
    field_notes = _field_comments(source_file.read_text())
    rows: list[ParamRow] = []

    def add(model, data, prefix: str) -> None:
        names = list(data) if isinstance(data, dict) else []
        names += [name for name in model.model_fields if name not in names]
        for name in names:
            key = f"{prefix}{name}"
            field = model.model_fields.get(name)
            if field is None:
                raise DocsError(f"params.yaml sets {key}, which chestct/params.py does not define")
            notes = [comments.get(key, ""), field_notes.get((model.__name__, name), "")]
            section, is_list = _section_class(field.annotation)
            present = isinstance(data, dict) and name in data
            value = data[name] if present else None
            if section is not None and section.__doc__:
                doc = " ".join(section.__doc__.strip().split("\n\n")[0].split())
                notes.append(doc.removeprefix(f"{key}:").strip())
            default = _yaml_value(value) if present and section is None else ""
            if section is not None and is_list and present:
                default = _yaml_value(value)
            if not present and not field.is_required():
                default = f"{_yaml_value(field.default)} (not in params.yaml: the model's default)" \
                    if section is None else ""
            allowed = describe_type(field.annotation, field.metadata)
            if is_list:
                allowed = "list of sections (below)"
            rows.append(ParamRow(key, default, allowed, " — ".join(part for part in notes if part).strip()))
            if section is not None and not is_list:
                add(section, value if isinstance(value, dict) else {}, f"{key}.")
            elif section is not None:
                add(section, {}, f"{key}[].")
            elif isinstance(value, dict):  # a mapping key (model.unfreeze): its entries, documented by the parent
                for entry, inner in value.items():
                    rows.append(ParamRow(f"{key}.{entry}", _yaml_value(inner), "", ""))

    add(Params, values, "")
    declared = stage_params(dvc_file)
    for row in rows:
        key = row.key.replace("[]", "")
        row.stages = ", ".join(stage for stage, keys in declared.items()
                               if any(entry == "*" or key == entry or key.startswith(f"{entry}.")
                                      or entry.startswith(f"{key}.") for entry in keys))
    return rows


def stage_params(dvc_file: Path = DVC_YAML) -> dict[str, list[str]]:
    """{stage: the params keys dvc.yaml declares for it}, in dvc.yaml's order (params.yaml's keys only)."""
    declared = {}
    for name, stage in yaml.safe_load(dvc_file.read_text())["stages"].items():
        keys = []
        for entry in stage.get("params", []):
            if isinstance(entry, dict):  # {params.yaml: [keys]} or {params.yaml: null}, the whole file
                for file, inner in entry.items():
                    if Path(file).name == "params.yaml":
                        keys += list(inner) if inner else [""]
            else:
                keys.append(str(entry))
        declared[name] = ["*" if key == "" else key for key in keys]
    return declared


def params_yaml_keys(params_file: Path = PARAMS_FILE) -> list[str]:
    """Every dotted key params.yaml sets, mappings walked down to their leaves."""
    keys = []

    def walk(data, prefix: str) -> None:
        for name, value in data.items():
            keys.append(f"{prefix}{name}")
            if isinstance(value, dict):
                walk(value, f"{prefix}{name}.")

    walk(yaml.safe_load(params_file.read_text()), "")
    return keys


def render_params_reference(params_file: Path = PARAMS_FILE, source_file: Path = PARAMS_SOURCE) -> str:
    """The reference as Markdown: one table per top-level section of params.yaml."""
    rows = params_rows(params_file, source_file)
    groups: dict[str, list[ParamRow]] = {}
    for row in rows:
        groups.setdefault(row.key.split(".")[0].split("[")[0], []).append(row)
    parts = []
    for section, members in groups.items():
        parts += [f"### `{section}`", "",
                  markdown_table(["key", "default (params.yaml)", "accepts", "what it does", "stages that read it"],
                                 [[f"`{row.key}`", f"`{row.default}`" if row.default else "", row.allowed, row.doc,
                                   row.stages] for row in members]), ""]
    return "\n".join(parts)


# --- README sections and run figures --------------------------------------------------------------------------


def readme_section(title: str, readme: Path = README, level: int = 2, heading: bool = False) -> str:
    """The body of the README section `title` (up to the next heading of the same or a higher level), its
    links to docs/ pages rewritten for a page in docs/."""
    lines = readme.read_text().splitlines()
    marker = "#" * level + " " + title
    in_code = False
    start = None
    for number, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        if start is None and line.strip() == marker:
            start = number
        elif start is not None and re.match(rf"^#{{1,{level}}} ", line):
            body = lines[start + (0 if heading else 1):number]
            break
    else:
        if start is None:
            raise DocsError(f"README.md has no section {marker!r}")
        body = lines[start + (0 if heading else 1):]
    text = "\n".join(body).strip("\n")
    return re.sub(r"\]\(docs/", "](", text)


def run_figures(name: str, page_path: str = "index.md", figures: Path = FIGURES) -> str:
    """The images scripts/docs_figures.py put in docs/figures/<name>/, with the run they came from."""
    folder = figures / name
    source = folder / "SOURCE.json"
    if not source.is_file():  # said on the page, not hidden: no run's pictures have been committed yet
        guide = posixpath.relpath("figures.md", posixpath.dirname(page_path) or ".")
        return (f'!!! note "No run\'s pictures yet"\n    docs/figures/{name}/ holds none: '
                f"`python scripts/docs_figures.py run --run RUN` puts a run's plots there, with the run they came "
                f"from ([Documentation figures]({guide})).")
    about = json.loads(source.read_text())
    relative = posixpath.relpath(f"figures/{name}", posixpath.dirname(page_path) or ".")
    parts = []
    for entry in about["figures"]:
        if not (folder / entry["file"]).is_file():
            raise DocsError(f"docs/figures/{name}/{entry['file']} is listed in SOURCE.json but missing")
        parts += [f"![{entry['title']}]({relative}/{entry['file']})", "", f"*{entry['title']}*", ""]
    parts.append(f"*{about['description']}*")
    return "\n".join(parts)


def define_env(env) -> None:
    """mkdocs-macros' entry point."""

    def page_path() -> str:
        page = env.page
        return page.file.src_uri if page is not None else "index.md"

    @env.macro
    def results_table(name: str, table_id: str) -> str:
        return render_results_table(name, table_id, page_path())

    @env.macro
    def params_reference() -> str:
        return render_params_reference()

    @env.macro
    def readme(title: str, level: int = 2) -> str:
        return readme_section(title, level=level)

    @env.macro
    def figures_from_run(name: str) -> str:
        return run_figures(name, page_path())
