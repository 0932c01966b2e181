"""A soak of `chestct serve`: minutes of mixed load at the concurrency limit, with the process watched every second.

    python -m benchmarks.serve_soak --export-dir models/export [--minutes 5] [--clients N] [--image scan.png]
                                    [--out reports/serve_soak.json] [--no-results]

It starts `chestct serve` on the export in its own process, and `--clients` threads (default: twice the export's
serve.max_concurrent, so requests also queue for a slot) send, each at random: a valid scan to /predict (the
--image, else a phantom), a v2 infer of the prepared input, a file of the bad-input corpus that the service must
refuse (tests/bad_input_corpus.py), a slow client (headers, half the body, a pause, the rest) and a client that
disconnects mid-body. Every second it samples the server's RSS, open file descriptors and threads, and the latency
percentiles of the requests that finished in that second. At the end it stops the server with SIGTERM and reads its
log.

Report: requests by route and status, p50/p95/p99 latency per route, RSS and open fds over the first minute and
the last (means), whether each is flat (the last minute's no more than 10% above the first minute's), the
server's exit status, and the tracebacks in its log. Nothing is asserted: a soak is read, not passed. Answers
that say the server is busy (503 with Retry-After, serve.max_concurrent) are expected at this load and counted.
The tables of the documentation's Serving page (routes, process) go to docs/results/serve_soak.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import psutil

from benchmarks.results import write_result
from tests.bad_input_corpus import CORPUS
from tests.serving_support import free_port, phantom_images, png_bytes

ROUTES = ("predict", "v2_infer", "bad_input", "slow_client", "disconnect")
WEIGHTS = (0.4, 0.2, 0.2, 0.1, 0.1)
FLAT = 0.10  # the end within 10% of the first minute's
# How the documentation's table names each route.
ROUTE_LABELS = {"predict": "`/predict`, a valid scan", "v2_infer": "v2 infer",
                "bad_input": "`/predict`, a file of the bad-input corpus",
                "slow_client": "slow client (half the body, 2 s pause, the rest)", "disconnect": "disconnect mid-body"}


def _multipart(name: str, data: bytes, boundary: str = "soak-boundary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _raw_upload(port: int, body: bytes, content_type: str, pause_s: float, finish: bool) -> str:
    """POST /predict by hand: the headers and half the body, a pause, then the rest (or a disconnect)."""
    head = (f"POST /predict HTTP/1.1\r\nHost: soak\r\nConnection: close\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + body[:len(body) // 2])
        time.sleep(pause_s)
        if not finish:
            return "disconnected"
        sock.sendall(body[len(body) // 2:])
        answer = sock.recv(64)
    return answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"


class Load:
    """The client threads and what they saw: (route, status) counts and latencies per route."""

    def __init__(self, port: int, scan: bytes, v2_body: dict, until: float, seed: int):
        self.port, self.scan, self.v2_body, self.until = port, scan, v2_body, until
        self.statuses: Counter[tuple[str, str]] = Counter()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.finished: list[tuple[float, float]] = []  # (when, latency ms) of every request, for the per-second view
        # The files no entry point accepts (the corpus's size cases are sized for its own tiny export's limits).
        self.bad = [entry for entry in CORPUS if not entry.accepted_by]
        self._lock, self._seed = threading.Lock(), seed

    def run(self, index: int) -> None:
        rng = random.Random(self._seed + index)
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120) as client:
            while time.monotonic() < self.until:
                route = rng.choices(ROUTES, WEIGHTS)[0]
                started = time.perf_counter()
                try:
                    status = self._one(client, route, rng)
                except (httpx.TransportError, OSError) as exc:
                    status = f"error:{type(exc).__name__}"
                elapsed_ms = (time.perf_counter() - started) * 1000
                with self._lock:
                    self.statuses[(route, status)] += 1
                    self.latencies[route].append(elapsed_ms)
                    self.finished.append((time.monotonic(), elapsed_ms))

    def latencies_since(self, moment: float) -> list[float]:
        with self._lock:
            return [latency for when, latency in self.finished[-2000:] if when >= moment]

    def _one(self, client: httpx.Client, route: str, rng: random.Random) -> str:
        if route == "predict":
            return str(client.post("/predict", files=[("files", ("scan.png", self.scan, "image/png"))]).status_code)
        if route == "v2_infer":
            return str(client.post("/v2/models/chestct/infer", json=self.v2_body).status_code)
        if route == "bad_input":
            entry = rng.choice(self.bad)
            return str(client.post("/predict", files=[("files", (entry.name, entry.data(), "image/png"))]).status_code)
        body, content_type = _multipart("scan.png", self.scan)
        if route == "slow_client":
            return _raw_upload(self.port, body, content_type, pause_s=2.0, finish=True)
        return _raw_upload(self.port, body, content_type, pause_s=0.2, finish=False)


def _sample(process: psutil.Process, load: Load, samples: list[dict], stop: threading.Event,
            started: float) -> None:
    """Every second: the server's RSS, open fds and threads, and the latency percentiles of the requests that
    finished in that second (every route)."""
    while not stop.wait(1.0):
        recent = load.latencies_since(time.monotonic() - 1.0)
        with contextlib.suppress(psutil.Error):
            samples.append({"t": round(time.monotonic() - started, 1), "rss_mb": process.memory_info().rss / 2**20,
                            "fds": process.num_fds(), "threads": process.num_threads(), "requests": len(recent),
                            "p50_ms": round(float(np.percentile(recent, 50)), 1) if recent else None,
                            "p95_ms": round(float(np.percentile(recent, 95)), 1) if recent else None})


def _flatness(samples: list[dict], key: str) -> dict:
    """The first minute's mean against the last minute's: flat when the end has not grown beyond FLAT (a drop,
    as connections close when the load stops, is no leak)."""
    last = samples[-1]["t"]
    first = [sample[key] for sample in samples if sample["t"] <= 60]
    final = [sample[key] for sample in samples if sample["t"] >= last - 60]
    start, end = float(np.mean(first)), float(np.mean(final))
    return {"first_minute": round(start, 1), "last_minute": round(end, 1), "flat": end <= (1 + FLAT) * start}


def _wait_ready(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200:
                return
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("chestct serve did not become ready; see its log")
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export-dir", type=Path, default=Path("models/export"))
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=None, help="client threads (default: 2 x serve.max_concurrent)")
    parser.add_argument("--image", type=Path, default=None, help="the valid scan (default: a phantom)")
    parser.add_argument("--out", type=Path, default=Path("reports/serve_soak.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-results", action="store_true",
                        help="do not write docs/results/serve_soak.json (the documentation's tables)")
    args = parser.parse_args()

    metadata = json.loads((args.export_dir / "metadata.json").read_text())
    clients = args.clients or 2 * metadata["serve"]["max_concurrent"]
    scan = args.image.read_bytes() if args.image else png_bytes(phantom_images(count=1)[0][1])
    size = metadata["input"]["shape"][0]
    v2_body = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, size, size, 1],
                           "data": np.random.default_rng(args.seed).integers(0, 256, size * size).tolist()}]}
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        log_path = Path(scratch) / "serve.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen([sys.executable, "-m", "chestct.cli", "serve", "--export-dir",
                                       str(args.export_dir), "--port", str(port)], stdout=log, stderr=log)
        try:
            _wait_ready(port, server)
            started = time.monotonic()
            print(f"soak: {args.minutes:g} min, {clients} clients against {metadata['backbone']} "
                  f"({args.export_dir}), port {port}", flush=True)
            samples, stop = [], threading.Event()
            load = Load(port, scan, v2_body, started + args.minutes * 60, args.seed)
            sampler = threading.Thread(target=_sample, args=(psutil.Process(server.pid), load, samples, stop,
                                                             started))
            sampler.start()
            threads = [threading.Thread(target=load.run, args=(index,)) for index in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            stop.set()
            sampler.join()
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                exit_status = server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_status = "killed after 120 s"
        log_text = log_path.read_text(errors="replace")

    report = {
        "minutes": args.minutes, "clients": clients, "export": str(args.export_dir), "backbone": metadata["backbone"],
        "requests": {f"{route} {status}": count for (route, status), count in sorted(load.statuses.items())},
        "latency_ms": {route: {f"p{q}": round(float(np.percentile(values, q)), 1) for q in (50, 95, 99)}
                       | {"n": len(values)} for route, values in sorted(load.latencies.items())},
        "rss_mb": _flatness(samples, "rss_mb"), "open_fds": _flatness(samples, "fds"),
        "threads": _flatness(samples, "threads"),
        "server_5xx_not_busy": sum(count for (route, status), count in load.statuses.items()
                                   if status.startswith("5") and status != "503"),
        "busy_503": sum(count for (_, status), count in load.statuses.items() if status == "503"),
        "tracebacks": log_text.count("Traceback"), "exit_status": exit_status, "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'route':<12}{'n':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    for route, figures in report["latency_ms"].items():
        print(f"{route:<12}{figures['n']:>7}{figures['p50']:>10.1f}{figures['p95']:>10.1f}{figures['p99']:>10.1f}")
    counts = ", ".join(f"{key}: {count}" for key, count in report["requests"].items())
    print(f"\nrequests by route and status: {counts}")
    for key in ("rss_mb", "open_fds", "threads"):
        figures = report[key]
        print(f"{key}: first minute {figures['first_minute']}, last minute {figures['last_minute']} "
              f"({'flat' if figures['flat'] else 'NOT flat'})")
    print(f"5xx other than 503 busy: {report['server_5xx_not_busy']}; 503 busy: {report['busy_503']}; tracebacks in "
          f"the log: {report['tracebacks']}; exit status {exit_status}")
    print(f"written: {args.out}")
    if not args.no_results:
        figures = {key: value for key, value in report.items() if key != "samples"}
        print(f"written: {write_result('serve_soak', {'tables': soak_tables(report), **figures})}")


def _answers(requests: dict, route: str) -> str:
    """'all 200', or the count per status ('400: 51, 413: 100'); a client that left has no answer."""
    statuses = {key.split(" ", 1)[1]: count for key, count in requests.items() if key.split(" ", 1)[0] == route}
    if route == "disconnect" and set(statuses) <= {"disconnected"}:
        return "(the client left)"
    if len(statuses) == 1:
        return f"all {next(iter(statuses))}"
    return ", ".join(f"{status}: {count:,}" for status, count in sorted(statuses.items()))


def soak_tables(report: dict) -> dict:
    """The documentation's two tables: requests, answers and latency per route; the process's first and last
    minute."""
    routes = []
    for route in ROUTES:
        count = sum(n for key, n in report["requests"].items() if key.split(" ", 1)[0] == route)
        if not count:
            continue
        latency = report["latency_ms"].get(route, {})
        percentiles = ("" if route == "disconnect" or not latency else
                       " / ".join(f"{latency[f'p{q}']:,.1f}" if latency[f"p{q}"] < 1000 else f"{latency[f'p{q}']:,.0f}"
                                  for q in (50, 95, 99)))
        routes.append([ROUTE_LABELS[route], f"{count:,}", _answers(report["requests"], route), percentiles])

    def minute(key: str, unit: str = "") -> list:
        figures = report[key]
        return [f"{figures['first_minute']:,}{unit}",
                f"{figures['last_minute']:,}{unit}" + (" (flat)" if figures["flat"] else " (NOT flat)")]

    process = [["RSS", *minute("rss_mb", " MB")], ["open file descriptors", *minute("open_fds")],
               ["threads", *minute("threads")]]
    minutes = f"{report['minutes']:g} minute{'s' if report['minutes'] != 1 else ''}"
    return {"routes": {"title": f"{minutes} of mixed load, per route ({report['clients']} clients)",
                       "columns": ["route", "requests", "answers", "p50 / p95 / p99 ms"], "rows": routes,
                       "notes": f"5xx other than 503 busy: {report['server_5xx_not_busy']}; 503 busy: "
                                f"{report['busy_503']}; tracebacks in the log: {report['tracebacks']}; exit status "
                                f"after SIGTERM: {report['exit_status']}."},
            "process": {"title": f"The server process over the {minutes}",
                        "columns": ["process", "first minute", "last minute"], "rows": process}}


if __name__ == "__main__":
    main()
