"""Tests for sslvit.data: every source, the robust decode, skipping bad files, symlinks followed once, explicit
splits in globs, rows without a label, streaming and the loader."""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Value
from lightly.transforms import MAETransform
from PIL import Image

from sslvit import data
from sslvit.data import locate
from sslvit.errors import DataError
from sslvit.recipe import DataConfig

CIFAR10 = Path(__file__).parents[2] / "shared/data/cifar10"
SIZE = (10, 12)  # (width, height): not square, so a transposed image would show


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    # datasets converts parquet into an Arrow cache; keep it out of the user's ~/.cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _solid(value: int, size: tuple[int, int] = SIZE) -> bytes:
    return _encode(Image.new("RGB", size, (value, 255 - value, 7)))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    # module level, so DataLoader workers can pickle it
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)


def _red_channel(img: Image.Image) -> int:
    return img.getpixel((0, 0))[0]


def _good_images() -> dict[str, bytes]:
    """One image per awkward mode, named by what it tests."""
    rgba = Image.new("RGBA", SIZE, (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    pal = Image.new("P", SIZE, 1)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display
    return {
        "L.png": _encode(Image.new("L", SIZE, 128)),
        "LA.png": _encode(Image.new("LA", SIZE, (0, 0))),
        "RGBA.png": _encode(rgba),
        "P.png": _encode(pal, transparency=0),
        "CMYK.jpg": _encode(Image.new("CMYK", SIZE, (0, 0, 0, 0)), "JPEG"),
        "I16.png": _encode(Image.fromarray(np.full(SIZE[::-1], 0xABCD, dtype=np.uint16))),
        "1.png": _encode(Image.new("1", SIZE, 1)),
        "rotated.jpg": _encode(Image.new("RGB", SIZE, (0, 200, 0)), "JPEG", exif=exif),
    }


def _bad_images() -> dict[str, bytes]:
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    png = _encode(Image.fromarray(noise))
    return {"empty.jpg": b"", "truncated.png": png[: len(png) // 2], "garbage.jpg": b"this is not an image\n" * 20}


BAD_REASONS = {"empty.jpg": "empty file", "truncated.png": "truncated image", "garbage.jpg": "not an image"}


@pytest.fixture
def class_folder(tmp_path) -> Path:
    """root/cat: the good images (one nested deeper); root/dog: two good, the bad ones and a readme."""
    root = tmp_path / "pets"
    for name, content in _good_images().items():
        (root / "cat" / "nested").mkdir(parents=True, exist_ok=True)
        (root / "cat" / ("nested" if name == "L.png" else "") / name).write_bytes(content)
    (root / "dog").mkdir()
    for name, content in {**_bad_images(), "ok1.png": _solid(10), "ok2.jpg": _solid(20)}.items():
        (root / "dog" / name).write_bytes(content)
    (root / "dog" / "readme.txt").write_text("not an image")
    return root


def _write_parquet(
    folder: Path, split: str, rows: list[bytes], labels: list[int] | None = None, shard: int = 0, shards: int = 1
) -> None:
    columns = {"img": [{"bytes": b, "path": None} for b in rows]}
    if labels is not None:
        columns["label"] = labels
    ds = Dataset.from_dict(columns).cast_column("img", datasets.Image())
    if labels is not None:
        ds = ds.cast_column("label", ClassLabel(names=["zero", "one", "two"]))
    folder.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / f"{split}-{shard:05d}-of-{shards:05d}.parquet"))


def test_digits_splits_are_32px_rgb_disjoint_and_labelled():
    train, test = data.open_source(DataConfig(path="digits")), data.open_source(DataConfig(path="digits"), "test")
    assert (len(train), len(test)) == (1437, 360)
    assert data.count_samples(DataConfig(path="digits"), "test") == 360
    img, label = train.load(0)
    assert img.mode == "RGB" and img.size == (32, 32) and 0 <= label <= 9
    assert train.class_names == [str(i) for i in range(10)] and set(train.labels) == set(range(10))
    assert train.description == "digits [train] 1437 images, 10 classes"
    seen = {train.load(i)[0].tobytes() for i in range(len(train))}
    assert not any(test.load(i)[0].tobytes() in seen for i in range(len(test)))
    with pytest.raises(DataError, match="valid splits: train, test"):
        data.open_source(DataConfig(path="digits"), "val")


def test_class_folder_decodes_every_mode_to_rgb_and_skips_bad_files(class_folder):
    source = data.open_source(DataConfig(path=str(class_folder)))
    assert source.class_names == ["cat", "dog"]
    assert len(source) == 13 and data.count_samples(DataConfig(path=str(class_folder))) == 13
    assert "13 images, 2 classes (1 other files ignored)" in source.description
    names = {Path(f).name: i for i, f in enumerate(source.files)}
    assert "readme.txt" not in names and "L.png" in names  # the nested file was found
    assert source.labels[names["RGBA.png"]] == 0 and source.labels[names["ok1.png"]] == 1

    items = data.TransformedImages(source, lambda img: img)
    for name in _good_images():
        img, label = items[names[name]]
        assert img.mode == "RGB", name
        assert img.size == (SIZE[::-1] if name == "rotated.jpg" else SIZE), name
        assert label == 0
    pixel = {name: items[names[name]][0].getpixel((0, 0)) for name in _good_images()}
    assert pixel["RGBA.png"] == pixel["LA.png"] == pixel["P.png"] == (255, 255, 255)  # transparent -> white
    assert items[names["RGBA.png"]][0].getpixel((1, 1)) == (255, 0, 0)
    assert items[names["P.png"]][0].getpixel((1, 1)) == (0, 0, 255)
    assert pixel["I16.png"] == (0xAB, 0xAB, 0xAB) and pixel["L.png"] == (128, 128, 128)
    assert pixel["1.png"] == (255, 255, 255) and min(pixel["CMYK.jpg"]) > 240
    for name, reason in BAD_REASONS.items():
        assert items[names[name]] == data.Skipped(reason)
        with pytest.raises(data.BadSample, match=reason):
            source.load(names[name])


def test_split_subfolder_is_used_and_a_missing_split_is_named(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(_solid(1))
    assert len(data.open_source(DataConfig(path=str(tmp_path), split="train"))) == 1
    with pytest.raises(DataError, match="no 'val' folder; splits found: train"):
        data.open_source(DataConfig(path=str(tmp_path)), "val")


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(_solid(i))
    source = data.open_source(DataConfig(path=str(tmp_path)))
    assert source.class_names is None and source.labels is None
    assert source.load(2)[1] == -1 and len(source) == 3
    assert source.description.endswith("3 images, unlabeled")


def test_symlinks_are_followed_once_and_each_real_image_counted_once(tmp_path, caplog):
    outside = tmp_path / "elsewhere"  # a class folder kept on another disk: followed
    outside.mkdir()
    for i in range(3):
        (outside / f"o{i}.png").write_bytes(_solid(i))
    root = tmp_path / "pets"
    for cls, n in (("cat", 5), ("dog", 2)):
        (root / cls / "deep").mkdir(parents=True)
        for i in range(n):
            (root / cls / ("deep" if i == 0 else "") / f"{cls}{i}.png").write_bytes(_solid(10 * i))
    os.symlink(root / "cat", root / "cat" / "deep" / "loop")  # a loop: would be walked ~40 times deep
    os.symlink(tmp_path, root / "cat" / "up")  # a folder that holds the data set: a loop too
    os.symlink(root / "cat", root / "dog" / "cats")  # another class's folder: its images stay cats
    os.symlink(root / "cat" / "cat1.png", root / "dog" / "same.png")  # an image counted already
    (tmp_path / "loose.png").write_bytes(_solid(99))
    os.symlink(tmp_path / "loose.png", root / "dog" / "linked.png")  # an image from outside: counted, once
    os.symlink(tmp_path / "loose.png", root / "dog" / "linked_again.png")
    os.symlink(outside, root / "fox")
    cfg = DataConfig(path=str(root))
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        source = data.open_source(cfg)
    names = sorted(Path(f).name for f in source.files)
    assert names == ["cat0.png", "cat1.png", "cat2.png", "cat3.png", "cat4.png", "dog0.png", "dog1.png"] + [
        "linked.png",
        "o0.png",
        "o1.png",
        "o2.png",
    ]
    assert len(source) == data.count_samples(cfg) == 11
    labels = dict(zip((Path(f).name for f in source.files), source.labels.tolist()))
    assert labels["cat4.png"] == 0 and labels["linked.png"] == 1 and labels["o0.png"] == 2  # fox
    assert "11 images, 3 classes (5 symlinks to images or folders already counted not followed)" in source.description
    assert "5 symlink(s) lead to a folder or an image already counted" in caplog.text
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes(_solid(1))
    os.symlink(flat, flat / "again")  # the only folder in it: a loop, not a class
    source = data.open_source(DataConfig(path=str(flat)))
    assert len(source) == 1 and source.class_names is None and "(1 symlinks" in source.description
    (root / "all").symlink_to(root)  # beside class folders: a loop, not a fourth class
    assert data.open_source(cfg).class_names == ["cat", "dog", "fox"]


def test_a_glob_over_several_splits_is_an_error_unless_asked_for(tmp_path):
    _write_parquet(tmp_path, "train", [_solid(1), _solid(2), _solid(3)], [0, 1, 2])
    _write_parquet(tmp_path, "test", [_solid(4)], [0])
    with pytest.raises(DataError, match=r"matches the files of 2 splits \(test: 1 .*train: 1 .*data.mix_splits=true"):
        data.open_source(DataConfig(path=str(tmp_path / "*.parquet")))
    with pytest.raises(DataError, match="2 splits"):
        data.count_samples(DataConfig(path=str(tmp_path / "*.parquet")))  # --print-config says it too
    assert len(data.open_source(DataConfig(path=str(tmp_path / "train-*.parquet")))) == 3
    assert len(data.open_source(DataConfig(path=str(tmp_path / "*.parquet"), mix_splits=True))) == 4
    for split in ("train", "val"):  # split folders: the same rule
        _write_parquet(tmp_path / "tables" / split, "part", [_solid(5)], [1])
    with pytest.raises(DataError, match="2 splits"):
        data.open_source(DataConfig(path=str(tmp_path / "tables" / "*" / "*.parquet")))
    _write_parquet(tmp_path / "tables" / "val", "extra", [_solid(6)], [1])  # one split and unnamed files: fine
    assert len(data.open_source(DataConfig(path=str(tmp_path / "tables" / "val" / "*.parquet")))) == 2


@pytest.mark.parametrize("kind", ["classlabel", "int", "str"])
def test_rows_without_a_label_are_counted_and_reported(tmp_path, caplog, kind):
    labels = {"classlabel": [0, None, 2, -1, 1], "int": [3, None, 1, None, 0], "str": ["b", None, "a", "b", None]}
    ds = Dataset.from_dict({"img": [{"bytes": _solid(v), "path": None} for v in range(5)], "label": labels[kind]})
    ds = ds.cast_column("img", datasets.Image())
    if kind == "classlabel":
        ds = ds.cast_column("label", ClassLabel(names=["zero", "one", "two"]))
    ds.to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        source = data.open_source(DataConfig(path=str(tmp_path)))
    expected = {"classlabel": [0, -1, 2, -1, 1], "int": [3, -1, 1, -1, 0], "str": [1, -1, 0, 1, -1]}[kind]
    assert source.labels.tolist() == expected and source.unlabeled_rows == 2
    names = {"classlabel": ["zero", "one", "two"], "int": ["0", "1", "2", "3"], "str": ["a", "b"]}[kind]
    assert source.class_names == names  # no "nan" or "None" class
    assert source.description.endswith("5 images, " + f"{len(names)} classes (2 rows without a label in 'label')")
    assert "2 of 5 rows have no label in column 'label'" in caplog.text


def test_missing_path_empty_folder_and_unreachable_hub_are_data_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"data.path /no/such/dir does not exist"):
        data.open_source(DataConfig(path="/no/such/dir"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images in .*empty; accepted extensions: .jpg"):
        data.open_source(DataConfig(path=str(tmp_path / "empty")))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(locate, "load_dataset", offline)  # no network here; don't wait for retries
    with pytest.raises(DataError, match="'someone/pets' .*Hub dataset id.*network"):
        data.open_source(DataConfig(path="someone/pets"))


def test_parquet_folder_detects_image_and_label_columns(tmp_path):
    rows = [_solid(v) for v in (0, 50, 100)] + [b"garbage"]
    _write_parquet(tmp_path / "data", "train", rows, [0, 1, 2, 1])
    _write_parquet(tmp_path / "data", "test", rows[:2], [2, 0])
    cfg = DataConfig(path=str(tmp_path))
    source = data.open_source(cfg)
    assert source.class_names == ["zero", "one", "two"] and source.labels.tolist() == [0, 1, 2, 1]
    assert source.description == f"parquet:{tmp_path}/data/train-*.parquet [train] 4 images, 3 classes"
    img, label = source.load(1)
    assert img.mode == "RGB" and img.size == SIZE and img.getpixel((0, 0))[0] == 50 and label == 1
    assert data.TransformedImages(source, _red_channel)[3] == data.Skipped("not an image")
    assert len(data.open_source(cfg, "test")) == 2 and data.count_samples(cfg, "test") == 2
    with pytest.raises(DataError, match="no split 'val'; splits found: test, train"):
        data.open_source(cfg, "val")


def test_parquet_glob_with_plain_int_label_column(tmp_path):
    ds = Dataset.from_dict({"picture": [{"bytes": _solid(9), "path": None}] * 2, "fine_label": [3, 1]})
    ds.cast_column("picture", datasets.Image()).to_parquet(str(tmp_path / "part-0.parquet"))
    source = data.open_source(DataConfig(path=str(tmp_path / "*.parquet")))
    assert source.image_column == "picture" and source.labels.tolist() == [3, 1]
    assert source.class_names == ["0", "1", "2", "3"]


def test_parquet_without_image_column_asks_for_data_image_column(tmp_path):
    Dataset.from_dict({"pixels": [b"abc"], "label": [0]}).cast_column("label", Value("int64")).to_parquet(
        str(tmp_path / "train-00000-of-00001.parquet")
    )
    with pytest.raises(DataError, match=r"columns: pixels, label\); set data.image_column"):
        data.open_source(DataConfig(path=str(tmp_path)))


def test_real_cifar10_copy():
    if not CIFAR10.is_dir():
        pytest.skip(f"{CIFAR10} not present")
    cfg = DataConfig(path=str(CIFAR10))
    assert data.count_samples(cfg, "train") == 50_000  # from parquet footers, nothing decoded
    test = data.open_source(cfg, "test")
    assert test.description.endswith("[test] 10000 images, 10 classes")
    assert test.class_names[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(test.labels).tolist() == [1000] * 10
    for i in range(3):
        img, label = test.load(i)
        assert img.mode == "RGB" and img.size == (32, 32) and label == test.labels[i]


STREAMED = [*range(0, 70, 10), *range(100, 150, 10)]  # the red value of every good row in _stream_folder


def _stream_folder(tmp_path: Path) -> Path:
    # two files, so that ranks can split by shard; one corrupt row to show that streams skip too
    _write_parquet(tmp_path, "train", [_solid(v) for v in STREAMED[:7]] + [b"junk"], [0, 1, 2, 0, 1, 2, 0, 1], 0, 2)
    _write_parquet(tmp_path, "train", [_solid(v) for v in STREAMED[7:]], [2] * 5, 1, 2)
    return tmp_path


@pytest.mark.parametrize("world_size", [2, 3])  # 2: whole files per rank; 3: rows dealt out within files
def test_streaming_splits_rows_across_ranks_exactly_once(tmp_path, world_size):
    cfg = DataConfig(path=str(_stream_folder(tmp_path)), streaming=True)
    with pytest.raises(DataError, match="data.streaming=false"):
        data.open_source(cfg)
    per_rank = [list(data.open_stream(cfg, None, _red_channel, rank, world_size)) for rank in range(world_size)]
    assert all(per_rank)
    everything = [item for items in per_rank for item in items]
    assert sorted(v for v, _ in (x for x in everything if not isinstance(x, data.Skipped))) == STREAMED
    assert everything.count(data.Skipped("not an image")) == 1 and (20, 2) in everything
    shuffled = data.open_stream(cfg, None, _red_channel, 0, 1, shuffle_buffer=4, seed=0)
    orders = []
    for epoch in (0, 1, 0):
        shuffled.set_epoch(epoch)
        orders.append([v for v, _ in (x for x in shuffled if not isinstance(x, data.Skipped))])
    assert orders[0] != orders[1] and orders[0] == orders[2] and sorted(orders[1]) == STREAMED
    # inside DataLoader workers each row still comes out once
    stream = data.open_stream(cfg, None, _red_channel, 0, 1)
    batches = list(data.make_loader(stream, 4, shuffle=True, drop_last=False, cfg=DataConfig(num_workers=2), seed=0))
    assert sorted(torch.cat([b["views"] for b in batches]).tolist()) == STREAMED
    assert sum(b["skipped"].get("not an image", 0) for b in batches) == 1


def test_collate_skipping_drops_and_counts():
    view = torch.zeros(3, 4, 4)
    batch = data.collate_skipping([(view, 1), data.Skipped("empty file"), (view, 2), data.Skipped("not an image")])
    assert batch["views"].shape == (2, 3, 4, 4) and batch["labels"].tolist() == [1, 2]
    assert batch["skipped"] == {"empty file": 1, "not an image": 1}
    crops = data.collate_skipping([([view, view[:, :2, :2]], 0)] * 3)
    assert [c.shape for c in crops["views"]] == [(3, 3, 4, 4), (3, 3, 2, 2)]
    empty = data.collate_skipping([data.Skipped("empty file")] * 2)
    assert empty["views"] is None and empty["labels"].numel() == 0 and empty["skipped"] == {"empty file": 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_make_loader_end_to_end_skips_corrupt_files(class_folder, workers):
    cfg = DataConfig(path=str(class_folder), num_workers=workers)
    source = data.open_source(cfg)
    images = data.TransformedImages(source, _to_tensor)
    batches = list(data.make_loader(images, 4, shuffle=True, drop_last=False, cfg=cfg, seed=0))
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    skipped = sum((Counter(b["skipped"]) for b in batches), Counter())
    assert skipped == Counter(BAD_REASONS.values())
    assert Counter(labels) == {0: len(_good_images()), 1: 2}
    assert all(b["views"].shape[1:] == (3, 8, 8) for b in batches if b["views"] is not None)
    again = data.make_loader(images, 4, shuffle=True, drop_last=False, cfg=cfg, seed=0)
    assert torch.cat([b["labels"] for b in again]).tolist() == labels  # same seed, same order


def test_resolve_num_workers_auto():
    assert data.resolve_num_workers(DataConfig(num_workers=3)) == 3
    assert 1 <= data.resolve_num_workers(DataConfig(num_workers=-1)) <= 8
    cores = data.resolve_num_workers(DataConfig(num_workers=-1))
    assert data.resolve_num_workers(DataConfig(num_workers=-1), torch.device("cpu")) == cores - 1
    assert data.resolve_num_workers(DataConfig(num_workers=2), torch.device("cpu")) == 2


def test_worker_augmentations_equal_the_main_process_ones_and_main_rng_is_restored(one_thread):
    # in workers seeded_rng skips restoring the RNGs (it reseeds them per sample): the draws must not change
    transform = MAETransform(input_size=32)  # torchvision draws from torch's RNG
    dataset = data.TransformedImages(data.open_source(DataConfig(path="digits")), transform, seed=3)
    batches = {}
    for workers in (0, 2):
        loader = data.make_loader(dataset, 8, shuffle=True, drop_last=True, cfg=DataConfig(num_workers=workers), seed=1)
        batches[workers] = [b["views"][0] for _, b in zip(range(3), loader)]
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    dataset[0]  # the main process: its RNG is put back
    assert torch.equal(torch.rand(3), expected)
