"""Out-of-fold thresholds (evaluate.threshold.chosen_on: out_of_fold): the folds, the scores file, the choice."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from chestct.evaluation.out_of_fold import OutOfFoldError, choose_out_of_fold_threshold, read_scores
from chestct.evaluation.thresholds import choose_threshold
from chestct.imaging.processed import SplitArrays
from chestct.params import ParamsError, ThresholdParams, parse_params
from chestct.training.folds import FoldError, fold_rows, pool

YOUDEN_PRIOR = ThresholdParams(method="youden_prior", sensitivity=0.97, fixed=0.5, prior=0.5,
                               chosen_on="out_of_fold", folds=3)


def _groups_and_labels():
    """12 Normal slices (3 images each, like the real data's copies) and 20 Cancer slices (2 each)."""
    groups = [f"n{slice_}" for slice_ in range(12) for _ in range(3)] + [f"c{slice_}" for slice_ in range(20)
                                                                          for _ in range(2)]
    labels = [0] * 36 + [1] * 40
    return np.array(groups), np.array(labels)


def test_every_image_is_held_out_once_and_a_slice_never_on_both_sides():
    groups, labels = _groups_and_labels()
    cuts = fold_rows(labels, groups, folds=3, seed=7)
    held = np.concatenate([held for _, held in cuts])
    assert len(cuts) == 3 and sorted(held.tolist()) == list(range(len(labels)))
    for train, held_rows in cuts:
        assert set(groups[train]).isdisjoint(groups[held_rows])
        assert set(labels[held_rows]) == {0, 1}  # both classes in every held-out fold
        assert len(set(train) | set(held_rows)) == len(labels)
    assert [held.tolist() for _, held in fold_rows(labels, groups, 3, seed=7)] == [h.tolist() for _, h in cuts]


def test_more_folds_than_distinct_normal_slices_is_refused_naming_the_key():
    groups, labels = _groups_and_labels()
    with pytest.raises(FoldError, match=r"12 distinct Normal slices.*evaluate\.threshold\.folds \(13\)"):
        fold_rows(labels, groups, folds=13, seed=7)


def test_pool_puts_the_first_split_first_and_keeps_the_unstandardised_images():
    def split(count, label, prefix):
        return SplitArrays(images=np.full((count, 4, 4, 1), label, np.uint8), labels=np.full(count, label),
                           subtypes=np.array(["x"] * count), ids=np.array([f"{prefix}{i}" for i in range(count)]),
                           unstandardised=np.zeros((count, 4, 4), np.uint8))
    pooled = pool(split(2, 0, "t"), split(3, 1, "v"))
    assert pooled.ids.tolist() == ["t0", "t1", "v0", "v1", "v2"] and pooled.labels.tolist() == [0, 0, 1, 1, 1]
    assert pooled.unstandardised.shape == (5, 4, 4) and pooled.images[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 1]


def _scores_file(tmp_path, rows):
    path = tmp_path / "scores.csv"
    pd.DataFrame(rows, columns=["id", "label", "fold", "score"]).to_csv(path, index=False)
    return path


ROWS = [("a.png", 0, 1, 0.1), ("b.png", 0, 2, 0.3), ("c.png", 1, 1, 0.8), ("d.png", 1, 2, 0.6)]


def test_the_scores_file_must_cover_train_and_valid_exactly(tmp_path):
    ids = {"a.png", "b.png", "c.png", "d.png"}
    table = read_scores(_scores_file(tmp_path, ROWS), ids)
    assert table["score"].tolist() == [0.1, 0.3, 0.8, 0.6]
    with pytest.raises(OutOfFoldError, match=r"not found; rerun `dvc repro out_of_fold`"):
        read_scores(tmp_path / "missing.csv", ids)
    with pytest.raises(OutOfFoldError, match="is empty: it was written with chosen_on valid"):
        read_scores(_scores_file(tmp_path, []), ids)
    with pytest.raises(OutOfFoldError, match=r"\(4 rows for 5 images\): it is stale"):
        read_scores(_scores_file(tmp_path, ROWS), ids | {"e.png"})
    with pytest.raises(OutOfFoldError, match="it is stale"):
        read_scores(_scores_file(tmp_path, ROWS + [ROWS[0]]), ids)
    with pytest.raises(OutOfFoldError, match=r"a probability in \[0, 1\]"):
        read_scores(_scores_file(tmp_path, ROWS[:3] + [("d.png", 1, 2, float("nan"))]), ids)
    (tmp_path / "bad.csv").write_text("id,score\na.png,0.1\n")
    with pytest.raises(OutOfFoldError, match=r"missing columns \['fold', 'label'\]"):
        read_scores(tmp_path / "bad.csv", ids)


def test_the_threshold_is_chosen_on_the_pooled_scores_and_says_so(tmp_path):
    rows = ROWS + [("e.png", 0, 3, 0.7), ("f.png", 1, 3, 0.9)]
    table = read_scores(_scores_file(tmp_path, rows), {row[0] for row in rows})
    groups = pd.Series(["g1", "g1", "g2", "g3", "g4", "g5"], index=[row[0] for row in rows])
    choice = choose_out_of_fold_threshold(table, groups, YOUDEN_PRIOR)
    expected = choose_threshold(table["label"], table["score"], YOUDEN_PRIOR)
    assert choice["threshold"] == expected["threshold"] and choice["interval"] == expected["interval"]
    assert choice["out_of_fold_sensitivity"] == expected["valid_sensitivity"]
    assert not any(key.startswith("valid_") for key in choice)
    assert choice["chosen_on"] == "out_of_fold"
    assert choice["out_of_fold"] == {"images": 6, "normal_images": 3, "normal_slices": 2, "folds": 3,
                                     "auc": pytest.approx(8 / 9)}


def test_chosen_on_and_folds_are_validated(default_params):
    raw = json.loads(default_params.model_dump_json())
    assert default_params.evaluate.threshold.chosen_on == "valid"
    raw["evaluate"]["threshold"]["chosen_on"] = "test"
    with pytest.raises(ParamsError, match=r"evaluate\.threshold\.chosen_on"):
        parse_params(raw)
    raw["evaluate"]["threshold"].update(chosen_on="out_of_fold", folds=1)
    with pytest.raises(ParamsError, match=r"evaluate\.threshold\.folds"):
        parse_params(raw)


@pytest.mark.e2e
def test_the_pipeline_chooses_the_threshold_on_out_of_fold_scores(in_process_pipeline):
    """On the tiny pipeline the params contract runs (tests/in_process_pipeline.py): two folds of train + valid,
    each trained in both phases, score every pooled image once; evaluate chooses the threshold on those scores."""
    repo, printed = in_process_pipeline.repo, in_process_pipeline.printed
    assert "out_of_fold: fold 2/2: trained on" in printed and "fold 2 phase2 epoch 1/1" in printed
    manifest = pd.read_csv(repo / "data/split/manifest.csv", keep_default_na=False)
    scores = pd.read_csv(repo / "data/out_of_fold/scores.csv", keep_default_na=False)
    pooled = manifest.loc[manifest["split"].isin(["train", "valid"])]
    assert sorted(scores["id"]) == sorted(pooled["id"]) and set(scores["fold"]) == {1, 2}
    labels = pooled.set_index("id").loc[scores["id"], "label"]
    assert scores["label"].tolist() == labels.astype(int).tolist()
    threshold = json.loads((repo / "models/threshold.json").read_text())
    expected = choose_threshold(scores["label"], scores["score"], YOUDEN_PRIOR)
    assert threshold["chosen_on"] == "out_of_fold" and threshold["threshold"] == expected["threshold"]
    assert threshold["out_of_fold"]["images"] == len(pooled) and threshold["out_of_fold"]["folds"] == 2
    assert "chosen on the out-of-fold scores of" in printed
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert metrics["test"]["threshold"] == threshold["threshold"]
