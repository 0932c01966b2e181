"""The feature-distance domain check as the predictor, the service, the CLI's CSV and the export formats give it."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from chestct.feature_domain import DOMAIN_FILE
from chestct.imaging.errors import OutOfDomainError
from chestct.serving.predictor import ModelUnavailableError, Predictor
from tests.serving_support import phantom_images, png_bytes


@pytest.fixture(scope="module")
def scans() -> list[tuple[str, bytes]]:
    return [(f"phantom{index}.png", png_bytes(gray)) for index, (_, gray) in enumerate(phantom_images(4, seed=5))]


@pytest.fixture()
def strict_cut():
    """Lower a loaded predictor's cut below every distance for one test (every image then unlike training);
    its cut and its refusal setting are restored after the test."""
    changed = []

    def lower(predictor: Predictor) -> Predictor:
        changed.append((predictor, predictor.domain, predictor.refuse_out_of_domain))
        predictor.domain = dataclasses.replace(predictor.domain, cut=0.0)
        return predictor

    yield lower
    for predictor, domain, refuse in changed:
        predictor.domain, predictor.refuse_out_of_domain = domain, refuse


def test_an_image_unlike_training_is_answered_with_its_distance_or_refused(client, scans, strict_cut):
    predictor = strict_cut(client.app.state.predictor)
    (answer,) = predictor.predict(scans[:1])
    assert answer.in_domain is False
    assert answer.domain_reason.startswith("unlike the training images (distance ")
    assert "> 0.0, the 0.99 quantile of 12 validation images" in answer.domain_reason
    assert answer.diagnosis in ("Normal", "Cancer")  # the decision is still given
    predictor.refuse_out_of_domain = True
    with pytest.raises(OutOfDomainError, match=r"phantom0.png: not scored, unlike the training images"):
        predictor.predict(scans[:1])


def test_the_service_answers_with_the_feature_verdict(client, scans, strict_cut):
    predictor = client.app.state.predictor
    # the model's metadata, its model card and /model-info say what the cut is a quantile of
    assert predictor.metadata.domain.cut_basis == predictor.domain.cut_basis == "12 validation images"
    assert "(the 0.99 quantile of 12 validation images)" in (predictor.export_dir / "MODEL_CARD.md").read_text()
    assert "the 0.99 quantile of 12 validation images" in client.get("/model-info").json()["domain"]["feature_distance"]
    response = client.post("/predict", files=[("files", (name, data, "image/png")) for name, data in scans[:2]])
    assert [result["in_domain"] for result in response.json()["results"]] == [True, True]
    strict_cut(predictor)
    response = client.post("/predict", files=[("files", (name, data, "image/png")) for name, data in scans[:2]])
    assert all(result["domain_reason"].startswith("unlike the training images")
               for result in response.json()["results"])


def test_the_batch_csv_carries_the_feature_verdict(client, scans, strict_cut, tmp_path):
    from chestct.external.batch import list_inputs, score_inputs

    for name, data in scans:
        (tmp_path / name).write_bytes(data)
    predictor = strict_cut(client.app.state.predictor)
    rows = score_inputs(predictor, list_inputs([tmp_path]), batch_size=3, progress=False)
    assert [row["in_domain"] for row in rows] == [False] * len(scans)
    assert all(row["domain_reason"].startswith("unlike the training images") for row in rows)
    predictor.refuse_out_of_domain = True
    refused = score_inputs(predictor, list_inputs([tmp_path]), batch_size=3, progress=False)
    assert all(row["error"].startswith("not scored, unlike the training images") and row["probability"] == ""
               for row in refused)


def test_a_changed_or_missing_domain_file_is_refused_naming_it(tiny_export, tmp_path):
    export = shutil.copytree(tiny_export, tmp_path / "export")
    with open(export / DOMAIN_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelUnavailableError, match=f"sha256 of {DOMAIN_FILE} differs from metadata.json"):
        Predictor(export)
    (export / DOMAIN_FILE).unlink()
    with pytest.raises(ModelUnavailableError, match=f"{DOMAIN_FILE} not found, but metadata.json names it"):
        Predictor(export)


def test_phantoms_stored_another_way_are_caught_more_often_than_held_out_phantoms(client):
    """The issue's probe: phantoms shifted in storage (another window and noise) are farther from the training
    phantoms in the model's own features than held-out phantoms stored as in training."""
    from chestct.evaluation.domain import fit_feature_domain

    predictor = client.app.state.predictor  # the tiny export's model (random DenseNet121 at 64 px)

    def features(pairs, restore=lambda gray, rng: gray):
        rng = np.random.default_rng(11)
        images = np.stack([predictor.prepare_decoded(restore(gray, rng)) for _, gray in pairs])
        return predictor.outputs(images).features, np.array([label for label, _ in pairs])

    def stored_another_way(gray, rng):  # a narrower window (contrast stretched about mid-grey) and noise
        stretched = (gray.astype(np.float64) - 128.0) * 1.8 + 150.0
        return np.clip(stretched + rng.normal(0, 12, gray.shape), 0, 255).astype(np.uint8)

    train, train_labels = features(phantom_images(24, seed=1))
    valid, _ = features(phantom_images(12, seed=2))
    domain = fit_feature_domain(train, train_labels, valid, 0.9)
    held_out, _ = features(phantom_images(16, seed=3))
    shifted, _ = features(phantom_images(16, seed=3), stored_another_way)
    flagged_held_out = np.mean(domain.distances(held_out) > domain.cut)
    flagged_shifted = np.mean(domain.distances(shifted) > domain.cut)
    assert flagged_shifted > flagged_held_out
    assert flagged_shifted >= 0.5
