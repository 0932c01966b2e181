"""`dvc plots show` renders without a CDN: .dvc/config points plots.html_template at a committed page that inlines
vega, vega-lite and vega-embed (built by scripts/build_plots_template.py)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

BUILD_SCRIPT = PROJECT_ROOT / "scripts" / "build_plots_template.py"
CHROMIUM = Path("/usr/bin/chromium")
REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc\s*=\s*[\"']?\s*(?:https?:)?//", re.IGNORECASE)

ROC_CSV = "fpr,tpr\n0.0,0.0\n0.0625,0.4375\n0.125,0.8125\n0.375,0.9375\n1.0,1.0\n"
CONFUSION_CSV = "actual,predicted\nCancer,Cancer\nCancer,Cancer\nCancer,Normal\nNormal,Normal\nNormal,Cancer\n"
DVC_YAML = """\
plots:
  - Offline ROC check:
      template: simple
      x: fpr
      y:
        eval/roc.csv: tpr
  - Offline confusion check:
      template: confusion
      x: predicted
      y:
        eval/confusion.csv: actual
"""
PLOT_COUNT = 2


def _build_module():
    spec = importlib.util.spec_from_file_location("build_plots_template", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class body runs
    spec.loader.exec_module(module)
    return module


build = _build_module()


def configured_template() -> Path:
    """The file `dvc plots show` uses: DVC resolves a relative plots.html_template against the .dvc/ directory."""
    from configobj import ConfigObj

    value = ConfigObj(str(PROJECT_ROOT / ".dvc" / "config")).get("plots", {}).get("html_template")
    assert value, ".dvc/config has no plots.html_template"
    return (PROJECT_ROOT / ".dvc" / value).resolve()


def test_config_points_at_the_built_template():
    assert configured_template() == build.DEFAULT_OUTPUT.resolve()
    assert build.DEFAULT_OUTPUT.is_file(), "run: python scripts/build_plots_template.py"


def test_template_records_the_pinned_packages_and_inlines_them():
    page = build.DEFAULT_OUTPUT.read_text(encoding="utf-8")
    header = page.split("-->", 1)[0]
    recorded = re.findall(r"^\s+(\S+)@(\S+) (sha512-[A-Za-z0-9+/=]+) (\S+)$", header, flags=re.MULTILINE)
    assert recorded == [(p.name, p.version, p.integrity, p.file) for p in build.PACKAGES], (
        "the committed template is stale: rerun python scripts/build_plots_template.py"
    )
    for package in build.PACKAGES:
        assert f'"{package.version}"' in page, f"{package.name}@{package.version} is not the inlined build"
    assert page.count(build.PLOTS_PLACEHOLDER) == 1
    assert build.SCRIPTS_PLACEHOLDER not in page  # dvc-render would put its CDN <script src> tags there
    assert len(re.findall(r"<script>", page)) == len(build.PACKAGES)
    assert not REMOTE_SCRIPT.search(page)


def test_pins_keep_the_major_versions_dvc_render_loads_from_its_cdn():
    from dvc_render.vega import VegaRenderer

    cdn = dict(re.findall(r"/npm/(vega(?:-lite|-embed)?)@(\d+)\.", VegaRenderer.SCRIPTS))
    assert set(cdn) == {p.name for p in build.PACKAGES}
    assert {p.name: p.version.split(".")[0] for p in build.PACKAGES} == cdn


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    """A tmp git+dvc repo with the project's .dvc/config and template, two plots, rendered by a plain
    `dvc plots show` (no --html-template: the config has to do it); returns the index.html."""
    repo = tmp_path_factory.mktemp("offline_plots")
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "ci@example.com"], repo)
    _run(["git", "config", "user.name", "CI"], repo)
    _run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    shutil.copy2(PROJECT_ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    template = repo / ".dvc" / configured_template().relative_to(PROJECT_ROOT / ".dvc")
    template.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(configured_template(), template)
    (repo / "eval").mkdir()
    (repo / "eval" / "roc.csv").write_text(ROC_CSV)
    (repo / "eval" / "confusion.csv").write_text(CONFUSION_CSV)
    (repo / "dvc.yaml").write_text(DVC_YAML)
    _run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out"], repo)
    index = repo / "out" / "index.html"
    assert index.is_file()
    return index


def test_plots_show_writes_a_page_without_remote_scripts(rendered):
    page = rendered.read_text(encoding="utf-8")
    assert not REMOTE_SCRIPT.search(page), REMOTE_SCRIPT.search(page)
    assert "cdn.jsdelivr.net/npm" not in page
    assert ").vegaEmbed=" in page  # the inlined vega-embed UMD build
    assert page.count("vegaEmbed('#") == PLOT_COUNT  # one embed call per plot div
    assert "Offline ROC check" in page and "0.8125" in page  # the spec and its data
    assert "Offline confusion check" in page and '"Normal"' in page
    assert "{plot_divs}" not in page and "{refresh_tag}" not in page


def _browser_unavailable() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed"
    if importlib.util.find_spec("playwright") is None:
        return "playwright (Python) is not installed"
    return None


@pytest.mark.skipif(_browser_unavailable() is not None, reason=f"browser check: {_browser_unavailable()}")
def test_page_draws_the_charts_in_headless_chromium_with_the_network_blocked(rendered, tmp_path):
    from playwright.sync_api import sync_playwright

    blocked: list[str] = []
    errors: list[str] = []

    def only_local(route):
        if route.request.url.startswith(("file:", "data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.route("**/*", only_local)
            page.goto(rendered.as_uri())
            page.wait_for_function(
                f"document.querySelectorAll('.vega-embed canvas').length >= {PLOT_COUNT}", timeout=15_000
            )
            # Each canvas has drawn marks: count pixels that are neither transparent nor near-white.
            inked = page.evaluate(
                """() => Array.from(document.querySelectorAll('.vega-embed canvas')).map(canvas => {
                    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                    let count = 0;
                    for (let i = 0; i < data.length; i += 4) {
                        if (data[i + 3] > 0 && Math.min(data[i], data[i + 1], data[i + 2]) < 200) count++;
                    }
                    return count;
                })"""
            )
            page.screenshot(path=str(tmp_path / "offline_plots.png"), full_page=True)
        finally:
            browser.close()
    assert not blocked, f"the page tried to load {blocked}"
    assert not errors, errors
    assert len(inked) == PLOT_COUNT and all(count > 500 for count in inked), inked
