"""Peak memory of the service under worst-case uploads: 8 concurrent requests, each a 16-bit 6300x6300 PNG.

    python -m benchmarks.serve_memory [--repo DIR] [--requests 8] [--side 6300] [--max-concurrent N]

Such a PNG is ~77 KB on the wire and 40 million pixels decoded (just under serve.max_pixels), so it is the
cheapest upload that makes the decoder work hardest. The script builds a tiny export (random DenseNet121 at
64 px, keras only: tests/serving_support.py) in a temporary folder, starts `chestct serve` on it in its own
process, sends one small warm-up scan (the first prediction builds the model's graph), then measures the
service's resident memory (RSS): idle, and its peak while `--requests` worst-case uploads are in flight at once.

The peak is the larger of RSS sampled every 10 ms (psutil when installed, else /proc/PID/status) and the
kernel's own high-water mark (VmHWM), which is reset after the warm-up by writing 5 to /proc/PID/clear_refs, so a
peak between two samples is not missed.

`--max-concurrent N` overrides the export's serve.max_concurrent (how many requests decode at once), to
separate the effect of that bound from the decoder's own memory use.

`--repo` runs the same measurement on another checkout (its own chestct, params.yaml and test helpers), e.g. the
commit before the hardening:

    git worktree add /tmp/before e700020~1
    python -m benchmarks.serve_memory --repo /tmp/before

Figures are printed, never asserted: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024

# Run inside the measured checkout (cwd and PYTHONPATH = --repo): that checkout's code writes its own export.
BUILD_EXPORT = """
import sys
from pathlib import Path
from chestct.params import load_params
from tests.serving_support import build_tiny_export
build_tiny_export(Path(sys.argv[1]), load_params("params.yaml"), formats=("keras",))
"""


def worst_case_png(side: int) -> bytes:
    """A 16-bit side x side PNG that compresses to almost nothing: near-constant, one small bright square."""
    from PIL import Image

    pixels = np.zeros((side, side), np.uint16)
    pixels[side // 2: side // 2 + 64, side // 2: side // 2 + 64] = 40_000
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def small_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.linspace(0, 255, 256 * 256).reshape(256, 256).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- memory of one process ------------------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes(pid: int) -> int:
    try:
        import psutil
    except ImportError:
        kilobytes = _status_kb(pid, "VmRSS")
        return (kilobytes or 0) * 1024
    return psutil.Process(pid).memory_info().rss


def reset_high_water_mark(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of `pid`; False where that is not possible."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def high_water_mark(pid: int) -> int | None:
    kilobytes = _status_kb(pid, "VmHWM")
    return None if kilobytes is None else kilobytes * 1024


class PeakSampler:
    """Samples the RSS of one process in a background thread until stopped; keeps the largest value."""

    def __init__(self, pid: int, interval_s: float = 0.01):
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


# --- the service in its own process ---------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _checkout_env(repo: Path) -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(repo), "TF_CPP_MIN_LOG_LEVEL": "2"}


def build_export(repo: Path, folder: Path) -> Path:
    built = subprocess.run([sys.executable, "-c", BUILD_EXPORT, str(folder)], cwd=repo, env=_checkout_env(repo),
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"building the export with {repo}'s code failed:\n{built.stderr[-3000:]}")
    return folder


def set_max_concurrent(export_dir: Path, slots: int) -> None:
    metadata_file = export_dir / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    if "max_concurrent" not in metadata["serve"]:
        raise SystemExit("--max-concurrent: this checkout's exports have no serve.max_concurrent")
    metadata["serve"]["max_concurrent"] = slots
    metadata_file.write_text(json.dumps(metadata))


def start_service(repo: Path, export_dir: Path, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "chestct.cli", "serve", "--export-dir", str(export_dir), "--port", str(port),
               "--formats", "keras"]
    with log.open("w") as log_file:
        return subprocess.Popen(command, cwd=repo, env=_checkout_env(repo), stdout=log_file,
                                stderr=subprocess.STDOUT)


def wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the service exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("model_loaded"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the service did not load its model within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def post_scan(url: str, name: str, data: bytes) -> int:
    response = httpx.post(f"{url}/predict", files=[("files", (name, data, "image/png"))], timeout=600)
    return response.status_code


# --- the measurement -----------------------------------------------------------------------------------------


def describe(repo: Path) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                           text=True)
    return f"{repo} @ {commit.stdout.strip() or '?'}{' (+ uncommitted changes)' if dirty.stdout.strip() else ''}"


def measure(repo: Path, requests: int, side: int, max_concurrent: int | None) -> dict:
    scan = worst_case_png(side)
    with tempfile.TemporaryDirectory(prefix="chestct-serve-memory-") as tmp:
        tmp_path = Path(tmp)
        print(f"building a tiny export with {repo}'s code ...", flush=True)
        export_dir = build_export(repo, tmp_path / "export")
        if max_concurrent is not None:
            set_max_concurrent(export_dir, max_concurrent)
        slots = json.loads((export_dir / "metadata.json").read_text())["serve"].get("max_concurrent", "unbounded")
        port, log = _free_port(), tmp_path / "service.log"
        url = f"http://127.0.0.1:{port}"
        process = start_service(repo, export_dir, port, log)
        try:
            wait_until_serving(url, process, log)
            started_rss = rss_bytes(process.pid)
            warm_up = post_scan(url, "warm-up.png", small_png())
            time.sleep(1.0)
            idle_rss = rss_bytes(process.pid)
            hwm_reset = reset_high_water_mark(process.pid)
            print(f"sending {requests} concurrent {side}x{side} 16-bit PNGs ({len(scan) / 1000:.0f} KB each) ...",
                  flush=True)
            started = time.monotonic()
            with PeakSampler(process.pid) as sampler, ThreadPoolExecutor(requests) as pool:
                statuses = list(pool.map(lambda index: post_scan(url, f"worst{index}.png", scan), range(requests)))
            elapsed = time.monotonic() - started
            hwm = high_water_mark(process.pid) if hwm_reset else None
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    peak = max(sampler.peak, hwm or 0)
    return {"checkout": describe(repo), "slots": slots, "upload_kb": len(scan) / 1000, "warm_up_status": warm_up,
            "started_rss": started_rss, "idle_rss": idle_rss, "sampled_peak": sampler.peak, "vmhwm_peak": hwm,
            "peak_rss": peak, "above_idle": peak - idle_rss, "statuses": statuses, "seconds": elapsed}


def print_table(result: dict, requests: int, side: int) -> None:
    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / MB:,.0f} MiB"

    counts = {status: result["statuses"].count(status) for status in sorted(set(result["statuses"]))}
    rows = [
        ("checkout", result["checkout"]),
        ("serve.max_concurrent", str(result["slots"])),
        ("requests", f"{requests} at once, each a {side}x{side} 16-bit PNG of {result['upload_kb']:.0f} KB"),
        ("answers", ", ".join(f"{count} x {status}" for status, count in counts.items())
         + f" in {result['seconds']:.1f} s (warm-up: {result['warm_up_status']})"),
        ("RSS after start", mib(result["started_rss"])),
        ("RSS idle (after warm-up)", mib(result["idle_rss"])),
        ("peak RSS, sampled every 10 ms", mib(result["sampled_peak"])),
        ("peak RSS, kernel VmHWM", mib(result["vmhwm_peak"])),
        ("peak RSS above idle", mib(result["above_idle"])),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose service is measured (default: this)")
    parser.add_argument("--requests", type=int, default=8, help="concurrent worst-case uploads (default 8)")
    parser.add_argument("--side", type=int, default=6300, help="width and height of the 16-bit PNG (default 6300)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="override the export's serve.max_concurrent (default: keep params.yaml's)")
    args = parser.parse_args()
    repo = args.repo.resolve()
    if not (repo / "chestct" / "cli.py").is_file():
        raise SystemExit(f"--repo {repo}: not a chestct checkout (chestct/cli.py not found)")
    print_table(measure(repo, args.requests, args.side, args.max_concurrent), args.requests, args.side)


if __name__ == "__main__":
    main()
