"""Tests for sslvit.evaluation.features: what is extracted, balanced limits, bad images, labels, and the cache."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from sslvit.errors import DataError
from sslvit.evaluation import features as F
from sslvit.recipe import DataConfig

DIGITS = DataConfig(path="digits", num_workers=0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=0
    ).eval()


@pytest.fixture(scope="module")
def identity(encoder):
    from sslvit.weights import state_sha256

    return {"sha256": state_sha256(encoder.state_dict()), "img_size": 32}


def test_encode_returns_what_the_probes_need(encoder):
    images = torch.randn(5, 3, 32, 32)
    out = F.encode(encoder, images)
    assert out["cls"].shape == (5, 32) and out["patch_mean"].shape == (5, 32)
    assert out["cls_blocks"].shape == (5, 3, 32)  # depth 3 < 4: every block
    with torch.no_grad():
        assert torch.allclose(out["cls"], encoder(images), atol=1e-5)  # timm's own pooled output
        assert torch.allclose(out["cls_blocks"][:, -1], out["cls"], atol=1e-5)


def test_balanced_subset_is_balanced_deterministic_and_skips_unlabelled():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 5 + [-1] * 10)
    subset = F.balanced_subset(labels, 30)
    assert np.array_equal(subset, F.balanced_subset(labels, 30)) and np.all(np.diff(subset) > 0)
    assert np.bincount(labels[F.balanced_subset(labels, 9)]).tolist() == [3, 3, 3]
    assert np.bincount(labels[subset]).tolist() == [13, 12, 5]  # a small class gives all it has, the rest share
    assert len(F.balanced_subset(labels, None)) == 85


def test_second_request_reads_the_cache_and_extracts_nothing(tmp_path, encoder, identity, monkeypatch):
    source = F.open_labelled(DIGITS, "train", None)[0]
    kwargs = {"limit": 40, "crop_pct": 1.0, "batch_size": 16, "cfg": DIGITS, "accelerator": None, "cache_dir": tmp_path}
    first, info = F.cached_features(encoder, identity, source, "train", **kwargs)
    assert info["cache"] == "extracted" and len(first) == 40
    assert np.bincount(first.labels.numpy()).tolist() == [4] * 10

    def no_extraction(*args, **kw):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(F, "extract_features", no_extraction)
    again, info = F.cached_features(encoder, identity, source, "train", **kwargs)
    assert info["cache"] == "hit" and torch.equal(again.cls_blocks, first.cls_blocks)
    with pytest.raises(AssertionError, match="extracted again"):  # another limit is another key
        F.cached_features(encoder, identity, source, "train", **{**kwargs, "limit": 30})


def test_cache_key_changes_with_encoder_data_and_transform():
    data = {"description": "digits [train]", "split": "train", "limit": None}
    base = F.feature_key("a" * 16, data, 32, 1.0, 4)
    assert (
        len(
            {
                base,
                F.feature_key("b" * 16, data, 32, 1.0, 4),
                F.feature_key("a" * 16, data, 48, 1.0, 4),
                F.feature_key("a" * 16, data, 32, 0.875, 4),
                F.feature_key("a" * 16, {**data, "split": "test"}, 32, 1.0, 4),
            }
        )
        == 5
    )


def _image_folder(root, labelled: bool, corrupt: bool = False):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog") if labelled else ("",):
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if corrupt:
        (root / "train" / "cat" / "bad.png").write_bytes(b"not a png")
    return root


def test_unlabelled_data_is_one_clear_error(tmp_path):
    root = _image_folder(tmp_path / "flat", labelled=False)
    with pytest.raises(DataError, match="evaluation needs labels"):
        F.open_labelled(DataConfig(path=str(root)), "train", None)


def test_a_folder_without_splits_is_refused(tmp_path):
    root = _image_folder(tmp_path / "classes", labelled=True) / "train"  # cat/ and dog/ only: no test split
    with pytest.raises(DataError, match="same images"):
        F.open_labelled(DataConfig(path=str(root)), "train", None)


def test_undecodable_images_are_left_out_and_counted(tmp_path, encoder, identity):
    cfg = DataConfig(path=str(_image_folder(tmp_path / "data", labelled=True, corrupt=True)), num_workers=0)
    train, test, split = F.open_labelled(cfg, "train", None)
    feats, skipped = F.extract_features(
        encoder, train, np.arange(len(train)), img_size=32, crop_pct=1.0, batch_size=3, cfg=cfg
    )
    assert (split, skipped, len(feats), len(train)) == ("test", 1, 8, 9)
    assert torch.equal(feats.labels, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
