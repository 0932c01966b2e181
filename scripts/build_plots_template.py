"""Build the offline HTML template for `dvc plots show` / `dvc plots diff`.

dvc-render's default page loads vega, vega-lite and vega-embed from cdn.jsdelivr.net, so the charts stay blank
without internet. This script fetches the pinned npm packages with `npm pack` (the registry is the only network it
needs), checks each tarball against the sha512 integrity pinned below, and writes one self-contained HTML template
with the three minified UMD builds inlined. `.dvc/config` points `plots.html_template` at it.

    python scripts/build_plots_template.py          # (re)write .dvc/plots/offline.html if it changed
    python scripts/build_plots_template.py --check  # exit 1 if the committed file differs from a fresh build

Standard library only; needs `npm` on PATH. The output is deterministic, so rerunning it is a no-op.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / ".dvc" / "plots" / "offline.html"


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    integrity: str  # npm's dist.integrity for name@version (sha512 of the tarball, base64)
    file: str  # the minified UMD build inside the tarball: what jsdelivr serves for the bare package URL
    global_name: str  # what the UMD build defines on `window`


# Same major versions as the CDN scripts of dvc-render 1.0.2 (dvc 3.67.1): vega@5.20.2, vega-lite@5.2.0 and
# vega-embed@6.18.2; pinned here to the newest release of each of those majors. Order matters: vega-lite needs
# `vega`, vega-embed needs both.
PACKAGES = (
    Package(
        "vega",
        "5.33.1",
        "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
        "build/vega.min.js",
        "vega",
    ),
    Package(
        "vega-lite",
        "5.23.0",
        "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
        "build/vega-lite.min.js",
        "vegaLite",
    ),
    Package(
        "vega-embed",
        "6.29.0",
        "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
        "build/vega-embed.min.js",
        "vegaEmbed",
    ),
)

# dvc-render fills a template with str.replace on these; the page must have exactly one plot placeholder and must
# NOT have the scripts placeholder (that is where dvc-render would put its CDN <script src=...> tags).
PLOTS_PLACEHOLDER = "{plot_divs}"
SCRIPTS_PLACEHOLDER = "{scripts}"
REFRESH_PLACEHOLDER = "{refresh_tag}"
DVC_PLACEHOLDERS = (PLOTS_PLACEHOLDER, SCRIPTS_PLACEHOLDER, REFRESH_PLACEHOLDER)


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class Fetched:
    package: Package
    script: str
    license_id: str
    license_text: str | None


def sri_sha512(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


def npm_pack(packages: tuple[Package, ...], destination: Path) -> dict[str, Path]:
    """`npm pack` every package into `destination`; returns the tarball of each name, integrity checked."""
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("npm is not on PATH (install Node.js; only the npm registry needs to be reachable)")
    specs = [f"{p.name}@{p.version}" for p in packages]
    command = [npm, "pack", *specs, "--json", "--ignore-scripts", "--pack-destination", str(destination)]
    print(f"$ npm pack {' '.join(specs)}")
    result = subprocess.run(command, cwd=destination, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"npm pack failed ({result.returncode}):\n{result.stderr.strip()}")
    packed = {entry["name"]: entry for entry in json.loads(result.stdout)}
    tarballs = {}
    for package in packages:
        entry = packed.get(package.name)
        if entry is None or entry["version"] != package.version:
            raise BuildError(f"npm pack did not return {package.name}@{package.version}: {entry}")
        tarball = destination / entry["filename"]
        actual = sri_sha512(tarball.read_bytes())
        if actual != package.integrity or entry["integrity"] != package.integrity:
            raise BuildError(
                f"{package.name}@{package.version}: integrity mismatch\n"
                f"  pinned:   {package.integrity}\n  npm:      {entry['integrity']}\n  computed: {actual}"
            )
        print(f"  {package.name}@{package.version}: {tarball.name}, {tarball.stat().st_size:,} bytes, integrity ok")
        tarballs[package.name] = tarball
    return tarballs


def _member_text(archive: tarfile.TarFile, name: str) -> str | None:
    try:
        member = archive.getmember(name)
    except KeyError:
        return None
    handle = archive.extractfile(member)
    if handle is None:
        return None
    return handle.read().decode("utf-8")


def extract(package: Package, tarball: Path) -> Fetched:
    """Read the UMD build, package.json and LICENSE from the tarball (members are read, never written to disk)."""
    with tarfile.open(tarball, "r:gz") as archive:
        manifest_text = _member_text(archive, "package/package.json")
        script = _member_text(archive, f"package/{package.file}")
        license_text = _member_text(archive, "package/LICENSE")
    if manifest_text is None or script is None:
        raise BuildError(f"{tarball.name}: package/package.json or package/{package.file} is missing")
    manifest = json.loads(manifest_text)
    if (manifest.get("name"), manifest.get("version")) != (package.name, package.version):
        raise BuildError(f"{tarball.name}: package.json says {manifest.get('name')}@{manifest.get('version')}")
    cdn_file = manifest.get("jsdelivr") or manifest.get("unpkg")
    if cdn_file and cdn_file.removeprefix("./") != package.file:
        raise BuildError(f"{package.name}: the CDN serves {cdn_file}, the script inlines {package.file}")
    return Fetched(package, script, str(manifest.get("license", "unknown")), license_text)


def inline_script(fetched: Fetched) -> str:
    """The build as the body of an inline <script>, safe for the HTML parser and for dvc-render's str.replace."""
    js = fetched.script
    label = f"{fetched.package.name}@{fetched.package.version}"
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in js:
            raise BuildError(f"{label}: contains {placeholder}, which dvc-render would replace")
    if "<!--" in js:
        # `<!--` inside a script can switch the HTML tokenizer into its escaped states; none of the pinned builds
        # has one, so refuse rather than guess an escape that is valid in every JS context.
        raise BuildError(f"{label}: contains '<!--'; inlining it needs an escape this script does not implement")
    # `</script` would end the element early. `<\/script` means the same inside JS strings, regexes and comments,
    # the only places the sequence can occur in valid JS.
    escaped, count = re.subn(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    if count:
        print(f"  {label}: escaped {count} '</script' sequence(s)")
    return escaped.strip()


def render(fetched: list[Fetched]) -> str:
    listing = "\n".join(
        f"    {f.package.name}@{f.package.version} {f.package.integrity} {f.package.file}" for f in fetched
    )
    scripts = "\n".join(
        f"    <!-- {f.package.name}@{f.package.version} {f.package.file} ({f.license_id}),"
        f" defines window.{f.package.global_name} -->\n"
        f"    <script>\n{inline_script(f)}\n    </script>"
        for f in fetched
    )
    licenses = "\n\n".join(
        f"{f.package.name}@{f.package.version} ({f.license_id}):\n\n{f.license_text.strip()}"
        if f.license_text
        else f"{f.package.name}@{f.package.version} ({f.license_id}): the npm tarball ships no LICENSE file."
        for f in fetched
    )
    page = f"""<!DOCTYPE html>
<!--
  Offline HTML template for `dvc plots show` and `dvc plots diff` (configured in .dvc/config: plots.html_template).
  GENERATED by scripts/build_plots_template.py: do not edit, rerun the script.
  dvc-render's default page loads these libraries from cdn.jsdelivr.net; this one inlines them, so the charts
  render without network access. dvc-render puts the plot divs in place of the placeholder in <body>; this page
  deliberately has no scripts placeholder, so none of dvc-render's CDN <script src> tags are added.
  npm packages (name@version integrity file):
{listing}
-->
<html>
<head>
    <meta charset="utf-8">
    {REFRESH_PLACEHOLDER}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {PLOTS_PLACEHOLDER}
</body>
<!--
Licenses of the inlined libraries:

{licenses}
-->
</html>
"""
    if page.count(PLOTS_PLACEHOLDER) != 1 or SCRIPTS_PLACEHOLDER in page:
        raise BuildError("the page must contain the plot placeholder exactly once and no scripts placeholder")
    if "-->" in licenses or "--" in listing:
        raise BuildError("a license text or the package listing would end an HTML comment early")
    return page


def build() -> str:
    with tempfile.TemporaryDirectory(prefix="plots-template-") as tmp:
        tarballs = npm_pack(PACKAGES, Path(tmp))
        fetched = [extract(p, tarballs[p.name]) for p in PACKAGES]
    return render(fetched)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: %(default)s")
    parser.add_argument("--check", action="store_true", help="only compare a fresh build with --output")
    args = parser.parse_args(argv)
    output: Path = args.output
    try:
        page = build()
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    current = output.read_text(encoding="utf-8") if output.is_file() else None
    size = len(page.encode("utf-8"))
    if current == page:
        print(f"{output}: up to date ({size:,} bytes)")
        return 0
    if args.check:
        state = "differs from" if current is not None else "is missing, expected"
        print(f"{output}: {state} a fresh build (rerun without --check)", file=sys.stderr)
        return 1
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    print(f"{output}: {'rewrote' if current is not None else 'wrote'} ({size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
