"""Which params keys code actually reads, and how that compares with a dvc.yaml stage's `params:` list.

`ParamsTracker.install` patches `chestct.params` for one test (through pytest's monkeypatch, so it is undone
afterwards): every params tree `parse_params` returns (and so every `load_params` call) is annotated with the
dotted path of each section, and reading a leaf field of an annotated section, or dumping or iterating one,
records the leaf keys. The Section class itself is patched rather than the objects wrapped in proxies, so
isinstance, equality, pickling and pydantic validation see the real objects.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import chestct.params as params_module
from chestct.params import Section


@cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(cls.model_fields)


class ParamsTracker:
    """Records the dotted params keys read from annotated params trees into `self.read`."""

    def __init__(self) -> None:
        # id(section) -> (section, dotted path). The section is kept alive so its id cannot be reused by another
        # object, which would then be mistaken for it.
        self._paths: dict[int, tuple[Section, str]] = {}
        self.read: set[str] = set()

    def reset(self) -> None:
        self.read = set()

    def path_of(self, section: Section) -> str | None:
        entry = self._paths.get(id(section))
        return entry[1] if entry is not None and entry[0] is section else None

    def annotate(self, section: Section, path: str = "") -> Section:
        """Remember the dotted path of `section` and every section below it; returns `section`."""
        self._paths[id(section)] = (section, path)
        values = object.__getattribute__(section, "__dict__")  # plain reads: recording nothing while walking
        for name in _field_names(type(section)):
            if isinstance(values[name], Section):
                self.annotate(values[name], f"{path}.{name}" if path else name)
        return section

    def _record_field(self, section: Section, name: str, value: object) -> None:
        if isinstance(value, Section) or name not in _field_names(type(section)):
            return  # a sub-section is not a read by itself: only the leaves reached through it are
        path = self.path_of(section)
        if path is not None:
            self.read.add(f"{path}.{name}" if path else name)

    def _record_leaves(self, section: Section) -> None:
        path = self.path_of(section)
        if path is None:
            return
        values = object.__getattribute__(section, "__dict__")
        for name in _field_names(type(section)):
            if isinstance(values[name], Section):
                self._record_leaves(values[name])
            else:
                self.read.add(f"{path}.{name}" if path else name)

    def install(self, monkeypatch) -> ParamsTracker:
        """Patch chestct.params for the rest of the test (monkeypatch undoes it)."""
        tracker = self
        parse_params = params_module.parse_params
        model_dump, model_dump_json, iterate = Section.model_dump, Section.model_dump_json, Section.__iter__

        def tracked_parse_params(*args, **kwargs):
            return tracker.annotate(parse_params(*args, **kwargs))

        def tracked_getattribute(section, name):
            value = object.__getattribute__(section, name)
            if not name.startswith("_"):  # private and dunder lookups (pydantic's own) are never fields
                tracker._record_field(section, name, value)
            return value

        def tracked_model_dump(section, *args, **kwargs):
            tracker._record_leaves(section)
            return model_dump(section, *args, **kwargs)

        def tracked_model_dump_json(section, *args, **kwargs):
            tracker._record_leaves(section)
            return model_dump_json(section, *args, **kwargs)

        def tracked_iter(section):  # dict(section) and `for name, value in section` skip __getattribute__
            tracker._record_leaves(section)
            return iterate(section)

        # load_params looks parse_params up in its module when called, so this covers every load_params too,
        # including the references the stages imported before the patch.
        monkeypatch.setattr(params_module, "parse_params", tracked_parse_params)
        monkeypatch.setattr(Section, "__getattribute__", tracked_getattribute)
        monkeypatch.setattr(Section, "model_dump", tracked_model_dump)
        monkeypatch.setattr(Section, "model_dump_json", tracked_model_dump_json)
        monkeypatch.setattr(Section, "__iter__", tracked_iter)
        return self


WHOLE_FILE = ""  # the declared "key" of `- params.yaml:` (every param of the file): it covers every key


def declared_keys(stage: str, entries: Iterable) -> list[str]:
    """The dotted keys of a dvc.yaml stage's `params:` list: plain keys of params.yaml, `{params.yaml: [keys]}`,
    or `params.yaml:` with no keys, which declares every param of the file (WHOLE_FILE)."""
    keys = []
    for entry in entries:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict) and set(entry) == {"params.yaml"}:
            listed = entry["params.yaml"]
            keys += [WHOLE_FILE] if not listed else list(listed)
        else:
            # `{other.yaml: [keys]}` names another params file: this check reads params.yaml only
            raise ValueError(f"{stage}: params entry {entry!r} is not a plain key of params.yaml")
    return keys


def leaf_keys(section: Section, path: str = "") -> set[str]:
    """Every dotted leaf key of a params tree (read without recording: plain __dict__ access)."""
    keys = set()
    values = object.__getattribute__(section, "__dict__")
    for name in _field_names(type(section)):
        key = f"{path}.{name}" if path else name
        keys |= leaf_keys(values[name], key) if isinstance(values[name], Section) else {key}
    return keys


def _covers(declared: str, key: str) -> bool:
    return declared == WHOLE_FILE or key == declared or key.startswith(f"{declared}.")


def _ancestors(key: str) -> list[str]:
    """a, a.b, a.b.c for a.b.c: the shortest first."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _undeclared_reads(keys: list[str], read: set[str], leaves: set[str]) -> list[str]:
    """Reads outside every declared key, each whole section read in full (and declared nowhere) as one key."""
    found = set()
    for key in sorted(read):
        if any(_covers(entry, key) for entry in keys):
            continue
        for candidate in _ancestors(key) if leaves else [key]:  # without the tree, no section is known in full
            under = {leaf for leaf in leaves | {key} if _covers(candidate, leaf)}
            if under <= read and not any(_covers(candidate, entry) for entry in keys):
                found.add(candidate)
                break
    return sorted(found)


def params_drift(stage: str, declared: Iterable, read: Iterable[str], leaves: Iterable[str] = ()) -> list[str]:
    """Problems, one a line: keys read but not declared, and declared keys nothing was read under.

    With `leaves` (every leaf key of the params tree), an undeclared section whose every key was read is named
    once, as the section, instead of key by key.
    """
    keys = declared_keys(stage, declared)
    read = set(read)
    problems = [f"{stage}: reads {key if key in read else f'every key of {key}'} but does not declare it"
                for key in _undeclared_reads(keys, read, set(leaves))]
    problems += [f"{stage}: declares {entry or 'the whole params file'} but reads nothing under it"
                 for entry in keys if not any(_covers(entry, key) for key in read)]
    return problems
