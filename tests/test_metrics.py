import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from fedunlearn.metrics import hit_ratio, ndcg, rank_of_target, ranking_metrics


def test_rank_counts_ties_against_the_target():
    assert rank_of_target(0.5, np.array([0.1, 0.9, 0.5, 0.2])) == 2
    assert rank_of_target(1.0, np.zeros(99)) == 0
    assert rank_of_target(0.0, np.zeros(99)) == 99  # a constant model gets no credit


def test_hit_ratio_and_ndcg_by_hand():
    ranks = np.array([0, 3, 9, 10, 50])
    assert hit_ratio(ranks, 1) == pytest.approx(1 / 5)
    assert hit_ratio(ranks, 10) == pytest.approx(3 / 5)
    assert hit_ratio(ranks, 20) == pytest.approx(4 / 5)
    expected = (1 / np.log2(2) + 1 / np.log2(5) + 1 / np.log2(11)) / 5
    assert ndcg(ranks, 10) == pytest.approx(expected)
    assert ndcg(np.array([1]), 5) == pytest.approx(1 / np.log2(3))


def test_hr_never_falls_as_k_grows():
    ranks = np.random.default_rng(0).integers(0, 100, 500)
    metrics = ranking_metrics(ranks, [5, 10, 20])
    assert metrics["HR@5"] <= metrics["HR@10"] <= metrics["HR@20"]
    assert metrics["NDCG@5"] <= metrics["NDCG@10"] <= metrics["NDCG@20"]


def test_ndcg_matches_scikit_learn():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(200, 100))  # column 0 is the test item
    ranks = np.array([rank_of_target(row[0], row[1:]) for row in scores])
    relevance = np.zeros_like(scores)
    relevance[:, 0] = 1
    for k in (5, 10, 20):
        assert ndcg(ranks, k) == pytest.approx(ndcg_score(relevance, scores, k=k))


def test_best_valid_selection_picks_by_validation_not_test():
    from fedunlearn.fl.rounds import select_final

    rows = [
        {"round": 5, "valid_HR@10": 0.5, "HR@10": 0.9},
        {"round": 10, "valid_HR@10": 0.7, "HR@10": 0.6},
        {"round": 15, "valid_HR@10": 0.7, "HR@10": 0.8},
        {"round": 20, "valid_HR@10": 0.6, "HR@10": 0.7},
    ]
    assert select_final(rows, "best_valid")["round"] == 10  # earliest of the best, whatever HR@10 says
    assert select_final(rows, "last")["round"] == 20
    # a drop event before round 15: round 10's model still held the leaving clients
    assert select_final(rows, "best_valid", unlearned_at=15)["round"] == 15
    assert select_final(rows, "best_valid", unlearned_at=16)["round"] == 20


def test_er_counts_the_honest_users_only():
    """An attacker still present (it leaves at a later event) trained the target as a positive: its
    top 10 is the attack itself, not exposure of the retained users."""
    from fedunlearn.fl.rounds import evaluation_metrics
    from fedunlearn.fl.updates import ClientEvaluation

    evaluations = [ClientEvaluation(str(i), rank=0, valid_rank=0, full_rank=-1, target_rank=r)
                   for i, r in enumerate([0, 50, 50, 3, -1])]  # fmt: skip
    assert evaluation_metrics(evaluations, [10], False)["ER@10"] == pytest.approx(0.5)
    assert evaluation_metrics(evaluations, [10], False, attackers={"0", "3"})["ER@10"] == 0.0
    assert evaluation_metrics(evaluations, [10], False, attackers={"1"})["HR@10"] == 1.0  # HR over everyone
