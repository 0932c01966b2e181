"""The second layer of the domain check: the feature-distance fit, its file, its verdicts and what abstaining buys."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.evaluation.domain import fit_feature_domain, selective_figures, split_domain_figures
from chestct.export.parity import parity_report
from chestct.feature_domain import FeatureDomainError, load_feature_domain, save_disabled

DIM = 48


def _features(rng, count: int, label: int, shift: float = 0.0) -> np.ndarray:
    """Two classes a little apart along the first axes, correlated features (as a network's are)."""
    mixing = np.random.default_rng(7).normal(size=(DIM, DIM)) / np.sqrt(DIM)
    centre = np.zeros(DIM)
    centre[:4] = 1.5 * label
    return (rng.normal(size=(count, DIM)) + centre) @ mixing + shift


def _fitted(quantile: float = 0.95):
    rng = np.random.default_rng(0)
    train = np.concatenate([_features(rng, 60, 0), _features(rng, 60, 1)])
    labels = np.repeat([0, 1], 60)
    valid = np.concatenate([_features(rng, 40, 0), _features(rng, 40, 1)])
    return fit_feature_domain(train, labels, valid, quantile), rng, valid


def test_the_cut_is_the_declared_quantile_of_validation_and_a_shifted_set_is_flagged():
    domain, rng, valid = _fitted(0.95)
    assert np.mean(domain.distances(valid) > domain.cut) == pytest.approx(0.05, abs=0.02)
    held_out = np.concatenate([_features(rng, 100, 0), _features(rng, 100, 1)])
    shifted = np.concatenate([_features(rng, 100, 0, shift=0.8), _features(rng, 100, 1, shift=0.8)])
    flagged_held_out = np.mean(domain.distances(held_out) > domain.cut)
    flagged_shifted = np.mean(domain.distances(shifted) > domain.cut)
    assert flagged_held_out <= 0.12
    assert flagged_shifted >= 0.8


def test_a_cross_fitted_cut_is_steadier_than_one_set_on_a_small_validation_split():
    # The official validation split is 72 images: its 0.99 quantile is about its maximum. Pooling the training
    # images' cross-fitted distances puts the cut where the declared share of new in-domain images is flagged.
    rng = np.random.default_rng(1)
    train = np.concatenate([_features(rng, 200, 0), _features(rng, 200, 1)])
    labels = np.repeat([0, 1], 200)
    held_out = np.concatenate([_features(rng, 1000, 0), _features(rng, 1000, 1)])
    errors = {"valid": [], "cross_fitted": []}
    for draw in range(5):
        valid = np.concatenate([_features(rng, 6, 0), _features(rng, 6, 1)])
        for cut_on in errors:
            domain = fit_feature_domain(train, labels, valid, 0.9, cut_on=cut_on, folds=5, seed=draw)
            errors[cut_on].append(abs(np.mean(domain.distances(held_out) > domain.cut) - 0.1))
    assert max(errors["cross_fitted"]) < 0.04
    assert np.mean(errors["cross_fitted"]) < np.mean(errors["valid"])


def test_the_cut_says_what_it_is_a_quantile_of_and_bad_settings_are_named(tmp_path):
    rng = np.random.default_rng(2)
    train = np.concatenate([_features(rng, 30, 0), _features(rng, 4, 1)])
    labels = np.repeat([0, 1], [30, 4])
    valid = _features(rng, 10, 0)
    assert fit_feature_domain(train, labels, valid, 0.9).cut_basis == "10 validation images"
    domain = fit_feature_domain(train, labels, valid, 0.9, cut_on="cross_fitted", folds=4)
    assert domain.cut_basis == "10 validation and 34 cross-fitted training images"
    assert "the 0.9 quantile of 10 validation and 34 cross-fitted training images" in domain.reason(domain.cut + 1)
    domain.save(tmp_path / "domain.npz")
    assert load_feature_domain(tmp_path / "domain.npz").cut_basis == domain.cut_basis
    with pytest.raises(FeatureDomainError, match="evaluate.domain.folds is 5, but a class has only 4 training"):
        fit_feature_domain(train, labels, valid, 0.9, cut_on="cross_fitted", folds=5)
    with pytest.raises(ValueError, match="evaluate.domain.cut_on is 'test'"):
        fit_feature_domain(train, labels, valid, 0.9, cut_on="test")


def test_a_file_written_before_the_cut_basis_existed_reads_as_set_on_validation(tmp_path):
    domain, _, _ = _fitted()
    fields = {"means": domain.means, "whitening": domain.whitening, "cut": domain.cut, "quantile": domain.quantile,
              "fitted_images": 120, "validation_images": 80}
    np.savez(tmp_path / "old.npz", **fields)
    old = load_feature_domain(tmp_path / "old.npz")
    assert old.cut_basis == "the validation images" and old.cut == domain.cut


def test_the_distance_is_to_the_nearer_class_and_a_class_mean_is_at_zero():
    domain, _, _ = _fitted()
    assert domain.distances(domain.means) == pytest.approx([0.0, 0.0], abs=1e-9)
    between = domain.means.mean(axis=0, keepdims=True)
    assert domain.distances(between)[0] > 0


def test_the_reason_names_the_distance_and_the_cut():
    domain, _, _ = _fitted()
    assert domain.reason(domain.cut) is None
    reason = domain.reason(domain.cut + 10)
    assert reason.startswith(f"unlike the training images (distance {domain.cut + 10:.1f} > {domain.cut:.1f}")


def test_the_file_round_trips_and_a_disabled_or_broken_file_says_so(tmp_path):
    domain, _, valid = _fitted()
    domain.save(tmp_path / "domain.npz")
    loaded = load_feature_domain(tmp_path / "domain.npz")
    assert np.array_equal(loaded.distances(valid), domain.distances(valid))
    assert (loaded.cut, loaded.quantile, loaded.fitted_images, loaded.validation_images) == (
        domain.cut, domain.quantile, 120, 80)
    save_disabled(tmp_path / "off.npz", "evaluate.domain.enabled is false")
    assert load_feature_domain(tmp_path / "off.npz") is None
    (tmp_path / "broken.npz").write_bytes(b"not a numpy file")
    with pytest.raises(FeatureDomainError, match="broken.npz: not a readable feature-domain file"):
        load_feature_domain(tmp_path / "broken.npz")
    with pytest.raises(FeatureDomainError, match=f"gives 3 features, the domain fit expects {DIM}"):
        domain.distances(np.zeros((2, 3)))


def test_selective_figures_are_the_metrics_of_the_images_left_in_domain():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.3])
    covered = np.array([True, True, False, True, True, False])  # the two errors are abstained on
    figures = selective_figures(labels, scores, 0.5, covered, 0.95, 200, 0)
    assert figures["coverage"] == pytest.approx(4 / 6, abs=1e-4)
    assert (figures["n"], figures["covered"]) == (6, 4)
    assert figures["auc"] == 1.0 and figures["sensitivity"] == 1.0 and figures["specificity"] == 1.0
    nothing = selective_figures(labels, scores, 0.5, np.zeros(6, bool), 0.95, 200, 0)
    assert nothing["coverage"] == 0.0 and nothing["auc"] is None and nothing["specificity"] is None


def test_a_split_is_out_of_domain_when_either_layer_says_so():
    not_chest = np.array([True, False, False, False])
    distances = np.array([1.0, 5.0, 1.0, 2.0])
    figures, in_domain = split_domain_figures(not_chest, distances, cut=3.0)
    assert list(in_domain) == [False, False, True, True]
    assert figures["out_of_domain_share"] == 0.5
    assert figures["not_chest_share"] == 0.25 and figures["unlike_training_share"] == 0.25
    first_layer_only, _ = split_domain_figures(not_chest, None, None)
    assert first_layer_only["out_of_domain_share"] == 0.25 and first_layer_only["unlike_training_share"] is None


def test_export_parity_compares_the_domain_distances_of_every_format(default_params):
    domain, rng, _ = _fitted()
    reference = np.concatenate([_features(rng, 10, 0), _features(rng, 10, 1)])
    scores = np.linspace(0.05, 0.95, len(reference))

    def report(name, features):
        return parity_report(scores, scores, 0.5, name, default_params.export, domain=domain,
                             reference_features=reference, features=features)

    assert report("savedmodel", reference + 1e-7)["passed"]
    drifted = report("tflite_float32", reference + 0.5)
    assert not drifted["passed"] and "max |distance - distance_keras|" in drifted["reason"]
    missing = report("savedmodel", None)
    assert not missing["passed"] and "pooled-feature output is missing" in missing["reason"]
    # A quantized format is judged on its verdicts, as on its decisions.
    assert report("tflite_dynamic", reference + 0.01)["domain_agreement"] == 1.0
    assert report("tflite_dynamic", reference + 0.01)["passed"]


def test_an_export_record_written_before_schema_2_6_reads_its_cut_as_set_on_validation():
    from chestct.export.metadata import DomainRecord

    record = {"file": "domain.npz", "sha256": "0" * 64, "bytes": 10, "cut": 12.0, "quantile": 0.99,
              "fitted_images": 613, "validation_images": 72,
              "features": {"name": "features", "dtype": "float32", "shape": [576], "value_range": [-1.0, 1.0],
                           "meaning": "pooled features"}}
    assert DomainRecord.model_validate(record).cut_basis == "the validation images"
    assert DomainRecord.model_validate(record | {"cut_basis": "72 validation images"}).cut_basis == (
        "72 validation images")
