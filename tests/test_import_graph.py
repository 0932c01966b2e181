"""tests/import_graph.py on small hand-made package trees: what counts as an import, a loaded file, a cycle."""

from __future__ import annotations

import textwrap
from pathlib import Path

from tests.import_graph import ImportGraph


def _tree(root: Path, files: dict[str, str]) -> ImportGraph:
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return ImportGraph(root, packages=("lib", "stages"))


def test_every_import_form_resolves_to_the_project_module(tmp_path):
    graph = _tree(tmp_path, {
        "lib/__init__.py": "",
        "lib/a.py": "",
        "lib/b.py": "",
        "lib/c.py": "",
        "lib/sub/__init__.py": "from .d import VALUE\n",
        "lib/sub/d.py": "VALUE = 1\n",
        "lib/sub/e.py": """
            from typing import TYPE_CHECKING

            import numpy as np
            import lib.a
            from .. import b
            from ..c import thing
            from . import d

            if TYPE_CHECKING:
                from lib.x import Never
            else:
                import json

            def later():
                from lib.sub import VALUE
        """,
    })
    assert set(graph.modules) == {"lib", "lib.a", "lib.b", "lib.c", "lib.sub", "lib.sub.d", "lib.sub.e"}
    assert graph.imports_of("lib.sub.e") == {"lib.a", "lib.b", "lib.c", "lib.sub.d", "lib.sub"}
    assert graph.imports_of("lib.sub.e", include_deferred=False) == {"lib.a", "lib.b", "lib.c", "lib.sub.d"}
    assert graph.imports_of("lib.sub") == {"lib.sub.d"}  # relative import inside a package's __init__
    assert graph.module_level_imports("lib.sub.e") == {"typing", "numpy", "lib.a", "lib.b", "lib.c", "lib.sub.d",
                                                       "json"}


def test_loaded_files_include_parent_packages_and_modules_run_with_dash_m(tmp_path):
    graph = _tree(tmp_path, {
        "lib/__init__.py": "",
        "lib/deep/__init__.py": "",
        "lib/deep/leaf.py": "",
        "lib/check.py": "",
        "lib/unused.py": "",
        "stages/__init__.py": "",
        "stages/run.py": """
            import subprocess, sys

            def main():
                from lib.deep.leaf import x
                subprocess.run([sys.executable, "-m", "lib.check", "--flag"])
        """,
    })
    assert graph.transitive_files("stages.run") == {
        "stages/__init__.py", "stages/run.py", "lib/__init__.py", "lib/deep/__init__.py", "lib/deep/leaf.py",
        "lib/check.py"}


def test_cycles_include_deferred_imports_but_not_empty_parent_packages(tmp_path):
    graph = _tree(tmp_path, {
        "lib/__init__.py": "",  # loaded before every lib module, but imports nothing: no cycle through it
        "lib/a.py": "from lib.b import f\n",
        "lib/b.py": "def f():\n    from lib import a\n",
        "lib/c.py": "import lib.d\n",
        "lib/d.py": "",
    })
    assert graph.find_cycles() == [["lib.a", "lib.b", "lib.a"]]


def test_a_package_init_that_imports_its_modules_can_close_a_cycle(tmp_path):
    graph = _tree(tmp_path, {
        "lib/__init__.py": "",
        "lib/pkg/__init__.py": "from lib.pkg.x import X\n",
        "lib/pkg/x.py": "from lib.pkg.y import Y\nX = 1\n",
        "lib/pkg/y.py": "Y = 1\n",
    })
    # importing lib.pkg.y loads lib/pkg/__init__.py first, which imports x again
    assert graph.find_cycles() == [["lib.pkg", "lib.pkg.x", "lib.pkg"]]
