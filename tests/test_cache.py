"""Tests for sslvit.cache: the decode-once cache gives the loader's pixels, labels and skips, and trains
bit-identically; a cap too small falls back to decoding every epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sslvit import data
from sslvit.cache import DecodedSource, maybe_decoded
from sslvit.errors import DataError, RecipeError
from sslvit.recipe import DataConfig
from sslvit.train import pretrain
from tests.conftest import tiny_recipe


def _png_folder(root: Path, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20 + i % 3, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_decoded_source_returns_the_same_pixels_labels_and_skips(tmp_path):
    source = data.open_source(DataConfig(path=str(_png_folder(tmp_path))))
    cached = DecodedSource(source, limit_mb=1)
    assert len(cached) == len(source) == 25
    for index in range(len(source)):
        try:
            image, label = source.load(index)
        except data.BadSample as e:
            with pytest.raises(data.BadSample, match=e.reason):
                cached.load(index)
            continue
        again, same_label = cached.load(index)
        assert same_label == label and again.mode == "RGB"
        assert np.array_equal(np.asarray(again), np.asarray(image))


def test_decode_cache_too_small_falls_back_and_with_streaming_is_one_clear_error(tmp_path, caplog):
    source = data.open_source(DataConfig(path=str(_png_folder(tmp_path))))
    with pytest.raises(DataError, match="data.decode_cache_mb=0"):
        DecodedSource(source, limit_mb=0)  # maybe_decoded never asks for 0; a too-small limit reads the same
    assert maybe_decoded(source, limit_mb=0) is source  # 0 = off
    big = tmp_path / "big" / "class0"
    big.mkdir(parents=True)
    for i in range(2):  # 2 x 3 MiB of pixels: more than a 4 MiB cap
        Image.fromarray(np.zeros((1024, 1024, 3), dtype=np.uint8)).save(big / f"{i}.png")
    big_source = data.open_source(DataConfig(path=str(big.parent)))
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        assert maybe_decoded(big_source, limit_mb=4) is big_source  # a cap, not a demand: decoded every epoch
    assert "more than data.decode_cache_mb=4" in caplog.text and "decoding every epoch instead" in caplog.text
    with pytest.raises(RecipeError, match="data.decode_cache_mb"):
        tiny_recipe("quickstart", "data.streaming=true", "data.decode_cache_mb=64")


def test_decode_cache_trains_bit_identically(tmp_path, one_thread):
    folder = str(_png_folder(tmp_path / "images", 32))
    runs = {}
    for cache in (0, 16):
        recipe = tiny_recipe("quickstart", f"data.path={folder}", f"data.decode_cache_mb={cache}", "log.image_every=0")
        pretrain(recipe, tmp_path / f"cache{cache}")
        runs[cache] = load_file(str(tmp_path / f"cache{cache}" / "encoder" / "model.safetensors"))
    assert runs[0].keys() == runs[16].keys()
    assert all(torch.equal(runs[0][k], runs[16][k]) for k in runs[0])
