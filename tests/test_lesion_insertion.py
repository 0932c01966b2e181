"""Lesion insertion into Normal slices, the pool training draws from, and the inserted-lesion check."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from chestct.imaging.preprocess import standardise
from chestct.imaging.standardise import noise_level
from chestct.params import LesionInsertionParams, LesionSupervisionParams
from chestct.training.lesion_bank import bank_digest, read_nodule_bank
from chestct.training.lesion_check import build_lesion_check
from chestct.training.lesion_insertion import insert, placement_region, tissue_level
from chestct.training.lesion_pool import CropPreparation, build_lesion_pool
from tests.lesion_hosts import phantom_split, preprocessed_phantoms
from tests.test_lesion_bank import make_bank

INSERTION = LesionInsertionParams(diameter=(0.12, 0.2), border_margin=0.02, contrast=(1.0, 1.0), variants=2)


@pytest.fixture(scope="module")
def hosts(default_params) -> np.ndarray:
    """Unstandardised Normal phantoms at 64 px: 0 outside what preprocess kept, >= 1 inside."""
    return preprocessed_phantoms(default_params, 6, size=64, seed=3)[1]


def test_the_whole_lesion_lies_inside_the_lung_fields_and_nothing_changes_outside(hosts):
    rng = np.random.default_rng(0)
    for host in hosts:
        region = placement_region(host)
        result = insert(host, rng, INSERTION)
        assert result is not None and result.mask.any()
        assert not (result.mask & ~region).any()  # the target mask is inside the lung fields
        changed = result.image != host
        assert not (changed & ~region).any()  # no pixel outside the lung fields moved
        assert np.all(result.image[host == 0] == 0)  # outside the body stays black
        assert np.all(result.image[host > 0] >= 1)


def test_the_lesion_is_as_dense_as_the_hosts_own_soft_tissue_at_any_window(hosts):
    host = hosts[0]
    kept = host > 0
    dull = np.where(kept, np.clip(host.astype(np.float32) * 0.5 + 20, 1, 255), 0).astype(np.uint8)
    for image in (host, dull):
        result = insert(image, np.random.default_rng(1), INSERTION)
        core = cv2.erode(result.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        level = tissue_level(image, placement_region(image))
        assert abs(float(np.median(result.image[core])) - level) < 0.15 * level + 3


def test_the_hosts_noise_is_added_back_inside_the_lesion(hosts):
    rng = np.random.default_rng(2)
    kept = hosts[1] > 0
    noisy = np.where(kept, np.clip(hosts[1] + rng.normal(0, 8, hosts[1].shape), 1, 255), 0).astype(np.uint8)
    big = LesionInsertionParams(diameter=(0.3, 0.3), border_margin=0.0, contrast=(1.0, 1.0))
    result = insert(noisy, rng, big)
    core = cv2.erode(result.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    inside_lesion = np.where(core, result.image, 0).astype(np.uint8)
    assert noise_level(noisy) * 0.5 < noise_level(inside_lesion) < noise_level(noisy) * 1.6


def test_insertion_is_deterministic_for_a_seed(hosts):
    first = insert(hosts[2], np.random.default_rng(5), INSERTION)
    again = insert(hosts[2], np.random.default_rng(5), INSERTION)
    other = insert(hosts[2], np.random.default_rng(6), INSERTION)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert not np.array_equal(first.mask, other.mask)


def test_no_room_for_a_lesion_gives_none():
    tiny = np.zeros((64, 64), np.uint8)
    tiny[30:34, 30:34] = 40
    assert insert(tiny, np.random.default_rng(0), INSERTION) is None
    assert insert(np.zeros((64, 64), np.uint8), np.random.default_rng(0), INSERTION) is None


def test_bank_nodules_are_cut_along_their_outline_and_sized_by_the_lung_field(hosts, tmp_path):
    bank = read_nodule_bank(make_bank(tmp_path, nodules=2))
    pool = build_lesion_pool(hosts, INSERTION, LesionSupervisionParams(procedural_rate=0.2, bank_rate=0.3), seed=0,
                             bank=bank)
    assert set(pool.images) == {"procedural", "bank"}
    assert pool.rates == {"procedural": 0.2, "bank": 0.3}
    for source in ("procedural", "bank"):
        assert len(pool.images[source]) == len(pool.masks[source]) <= len(hosts) * INSERTION.variants
        assert pool.masks[source].any(axis=(1, 2)).all()
    summary = pool.summary()
    widths = [cv2.boundingRect(placement_region(host).astype(np.uint8))[2] for host in hosts]
    assert 0.12 * min(widths) - 1 <= summary["bank"]["diameter_px_p05"]
    assert summary["bank"]["diameter_px_p95"] <= 0.2 * max(widths) + 1
    assert summary["bank_digest"]


def test_nodule_crops_enter_whole_at_their_own_scale_through_the_slices_preprocessing(hosts, default_params,
                                                                                          tmp_path):
    bank = read_nodule_bank(make_bank(tmp_path, nodules=3, size=32))
    preprocess = default_params.preprocess.model_copy(update={"image_size": 64})
    supervision = LesionSupervisionParams(crop_rate=0.25)
    pools = {restandardised: build_lesion_pool(hosts, INSERTION, supervision, seed=0, bank=bank,
                                               crop_preparation=CropPreparation(preprocess, restandardised))
             for restandardised in (True, False)}
    pool = pools[True]
    assert set(pool.images) == {"crop"} and pool.rates == {"crop": 0.25} and pool.bank_digest == bank_digest(bank)
    assert pool.images["crop"].shape == pool.masks["crop"].shape == (3, 64, 64)
    for image, mask, nodule in zip(pool.images["crop"], pool.masks["crop"], bank, strict=True):
        assert np.all(image >= 1)  # the whole crop is kept: every position outside the outline is a negative
        expected = cv2.resize(nodule.outline.astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST) > 0
        assert (mask != expected).mean() < 0.02  # the outline, scaled as the crop is
        assert image[mask].mean() > image[~mask].mean() + 20  # the nodule is where its outline says
    # Training that redoes the standardisation starts from the unstandardised crop; otherwise from the input.
    for raw, standardised in zip(pool.images["crop"], pools[False].images["crop"], strict=True):
        assert np.array_equal(standardise(raw, preprocess), standardised)
    summary = pool.summary()["crop"]
    assert summary["images"] == 3 and 10 < summary["diameter_px_median"] < 40
    with pytest.raises(ValueError, match="crop_rate > 0 needs the preprocessing"):
        build_lesion_pool(hosts, INSERTION, supervision, seed=0, bank=bank)


def test_no_rate_no_pool_and_no_bank_read(hosts):
    pool = build_lesion_pool(hosts, INSERTION, LesionSupervisionParams(bank_path="/nowhere"), seed=0)
    assert pool.images == {} and pool.summary() == {}


def test_the_check_inserts_before_the_pipelines_standardisation(default_params):
    split = phantom_split(default_params, normals=4, cancers=2, size=64, seed=9)
    # The cached input is the standardisation of the unstandardised image: re-standardising after insertion
    # is the same path a real lesion takes.
    for image, raw in zip(split.images, split.unstandardised, strict=True):
        assert np.array_equal(standardise(raw, default_params.preprocess), image[..., 0])
    check = build_lesion_check(split, INSERTION, default_params.preprocess, seed=0)
    assert len(check) == 4
    assert np.array_equal(check.clean, split.images[:4])
    for clean, inserted, mask in zip(check.clean, check.inserted, check.masks, strict=True):
        assert mask.any()
        assert np.all((inserted[..., 0] == 0) == (clean[..., 0] == 0))  # the same kept region
        # Equalised: the lesion is bright against the lung around it, as a real lesion would be.
        assert inserted[..., 0][mask].mean() > clean[..., 0][mask].mean() + 20


def test_lesion_params_that_need_a_lesion_map_say_so(default_params):
    from chestct.params import ParamsError, parse_params

    raw = default_params.model_dump(mode="json")
    raw["train"]["lesion_supervision"]["procedural_rate"] = 0.3
    with pytest.raises(ParamsError, match="model.lesion_map.enabled: true"):
        parse_params(raw)
    raw["train"]["lesion_supervision"]["procedural_rate"] = 0.0
    raw["train"]["selection"] = "val_auc_lesion"
    with pytest.raises(ParamsError, match="val_auc_lesion selects on the inserted-lesion check"):
        parse_params(raw)
    raw["model"]["lesion_map"]["enabled"] = True
    raw["train"]["lesion_supervision"].update(procedural_rate=0.6, bank_rate=0.6)
    with pytest.raises(ParamsError, match="must not exceed 1"):
        parse_params(raw)
    raw["train"]["lesion_supervision"].update(procedural_rate=0.4, bank_rate=0.3, crop_rate=0.4)
    with pytest.raises(ParamsError, match="bank_rate \\+ crop_rate must not exceed 1"):
        parse_params(raw)
    raw["train"]["lesion_supervision"].update(procedural_rate=0.0, bank_rate=0.0, crop_rate=0.3)
    raw["model"]["lesion_map"]["enabled"] = False
    raw["train"]["selection"] = "val_auc"
    with pytest.raises(ParamsError, match="model.lesion_map.enabled: true"):
        parse_params(raw)
