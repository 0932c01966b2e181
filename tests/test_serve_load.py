"""A bounded load test on loopback: several concurrent clients, every answer checked against the Predictor.

Latency figures are printed by benchmarks/serve_latency.py, never asserted here.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from chestct.serving.predictor import Predictor
from tests.serving_support import phantom_images, png_bytes

CLIENTS = 4
REQUESTS_PER_CLIENT = 8


def test_concurrent_clients_all_get_correct_answers(live_server, tiny_export):
    scans = [(f"scan{index}.png", png_bytes(gray)) for index, (_, gray) in enumerate(phantom_images(count=4))]
    expected = {p.filename: p for p in Predictor(tiny_export).predict(scans)}

    def client_session(client_index: int) -> list[tuple[str, int, dict]]:
        answers = []
        with httpx.Client(base_url=live_server, timeout=120) as client:
            for request_index in range(REQUESTS_PER_CLIENT):
                name, data = scans[(client_index + request_index) % len(scans)]
                response = client.post("/predict", files=[("files", (name, data, "image/png"))])
                answers.append((name, response.status_code, response.json()))
        return answers

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [answer for session in pool.map(client_session, range(CLIENTS)) for answer in session]

    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT
    for name, status, body in answers:
        assert status == 200, body
        (result,) = body["results"]
        assert result["filename"] == name
        assert result["diagnosis"] == expected[name].diagnosis
        assert result["cancer_probability"] == pytest.approx(expected[name].cancer_probability, abs=1e-6)
