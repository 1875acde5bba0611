"""Smoke test of benchmarks/eval_speed.py: its DINO reference agrees with sslvit's k-NN, its JSON has every field."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from sslvit.evaluation import knn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import eval_speed  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sslvit_predicts_what_the_dino_reference_predicts():
    problem = eval_speed.knn_problem(n_train=3000, n_test=400, dim=48, classes=10)
    assert knn.is_unit(problem["train"]) and knn.is_unit(problem["test"])
    ours, ours_times = eval_speed.run_sslvit(problem, [10, 20, 100])
    ref, ref_times = eval_speed.run_dino(problem, [10, 20, 100])
    assert eval_speed.agreement(ours, ref) == {
        k: {"top1_pct": 100.0, "top5_ranking_pct": 100.0} for k in ("10", "20", "100")
    }
    accuracy = eval_speed.accuracy(ours, problem["test_labels"])
    assert 20 < accuracy[20]["top1"] < 100  # the synthetic problem is neither hopeless nor trivial
    assert set(ours_times) == {"all_ks", "k20"} and set(ref_times) == {"k10", "k20", "k100", "all_ks"}


def test_a_bank_that_is_not_unit_norm_is_searched_block_by_block(monkeypatch):
    """Several blocks normalised on the fly give the reference's predictions on the normalised features."""
    problem = eval_speed.knn_problem(n_train=2000, n_test=300, dim=32, classes=10)
    scaled = problem["train"] * torch.linspace(0.5, 3.0, 2000).view(-1, 1)  # rows of different norms
    monkeypatch.setattr(knn, "BLOCK_BYTES", 4 * 32 * 700)  # 700-row blocks: three of them, the last short
    ours = knn.knn_predict(scaled, problem["train_labels"], problem["test"] * 2, [5, 20], num_classes=10)
    ref = {}
    for k in (5, 20):
        chunks = []
        eval_speed.dino_knn_classifier(
            problem["train"], problem["train_labels"], problem["test"], problem["test_labels"], k, 0.07, 10, chunks
        )
        ref[k] = torch.cat(chunks)
    assert eval_speed.agreement(ours, ref) == {k: {"top1_pct": 100.0, "top5_ranking_pct": 100.0} for k in ("5", "20")}


def test_knn_measurement_reports_time_memory_and_agreement():
    result = eval_speed.bench_knn(dim=16, n_train=1000, n_test=200, classes=5, ks=[10, 20], threads=1)
    for method in ("sslvit", "dino_reference"):
        assert result[method]["peak_rss_mib"] >= result[method]["rss_before_mib"] > 0
        assert set(result[method]["accuracy"]) == {"10", "20"}
    assert result["agreement"]["20"]["top1_pct"] == 100.0
    assert result["speedup_all_ks"] > 0 and result["speedup_k20_alone"] > 0
