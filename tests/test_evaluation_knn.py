"""Tests for sslvit.evaluation.knn: equal to DINO's own k-NN classifier, for every k, from one chunked search."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

from sslvit.data import open_source
from sslvit.evaluation.knn import knn_classify, knn_eval
from sslvit.recipe import DataConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from eval_speed import dino_knn_classifier  # noqa: E402  (the one transcription of DINO's knn_classifier)

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_problem(n_train=500, n_test=130, dim=32, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    train_labels = torch.randint(0, classes, (n_train,), generator=g)
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    train = centers[train_labels] + 1.5 * torch.randn(n_train, dim, generator=g)
    test = centers[test_labels] + 1.5 * torch.randn(n_test, dim, generator=g)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_dino_reference_for_every_k(temperature):
    train, train_labels, test, test_labels = _random_problem()
    ks = [1, 3, 10, 20, 100]
    ours = knn_classify(train, train_labels, test, test_labels, ks, temperature, num_classes=10, chunk_size=37)
    normalize = torch.nn.functional.normalize
    for k in ks:
        top1, top5 = dino_knn_classifier(
            normalize(train, dim=1), train_labels, normalize(test, dim=1), test_labels, k, temperature, 10
        )
        assert ours[k]["top1"] == pytest.approx(top1) and ours[k]["top5"] == pytest.approx(top5), k
    assert 30 < ours[20]["top1"] < 100  # the problem is neither trivial nor hopeless


def test_chunking_does_not_change_the_result():
    train, train_labels, test, test_labels = _random_problem(seed=1)
    whole = knn_classify(train, train_labels, test, test_labels, [5, 20], chunk_size=10_000)
    chunked = knn_classify(train, train_labels, test, test_labels, [20, 5], chunk_size=7)
    assert whole == chunked


def test_k_larger_than_the_bank_is_refused():
    train, train_labels, test, test_labels = _random_problem(n_train=50)
    with pytest.raises(ValueError, match="number of training features"):
        knn_classify(train, train_labels, test, test_labels, [200])


def test_online_monitor_is_cheap_and_leaves_the_encoder_training():
    torch.manual_seed(0)
    encoder = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=0
    ).train()
    digits = DataConfig(path="digits", num_workers=0)
    result = knn_eval(
        encoder, open_source(digits, "train"), open_source(digits, "test"), ks=(20, 5), limit_train=200, limit_test=50
    )
    assert (result["k"], result["num_train"], result["num_test"]) == (20, 200, 50)
    assert set(result["per_k"]) == {5, 20} and 10 < result["top1"] <= 100  # above chance (10%) even at random init
    assert encoder.training
