"""End-to-end tests of eval/knn.py and eval/linear_probe.py: the JSON report, the cache, defaults and user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from sslvit.checkpoint import export_encoder
from sslvit.cli import guarded
from sslvit.evaluation import features
from sslvit.evaluation.cli import run_knn, run_linear_probe
from tests.conftest import flags

ROOT = Path(__file__).parents[1]
MODEL_ARGS = ["img_size=32", "patch_size=8", "depth=2", "embed_dim=32", "num_heads=2"]
RANDOM_TINY = ["--encoder", "vit_tiny_patch16_224", "--weights", "random", "--model-args", *MODEL_ARGS]
DIGITS = ["--data", "digits", "--limit-train", "300", "--limit-test", "100", "--num-workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_knn_writes_the_report_and_a_second_run_extracts_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "knn.json"
    argv = [*RANDOM_TINY, *DIGITS, "--k", "5", "20", "--cache-dir", str(tmp_path / "cache"), "--json-out", str(out)]
    assert guarded(run_knn, argv) == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "dino-knn" and report["encoder"]["kind"] == "random"
    assert len(report["encoder"]["sha256"]) == 16 and report["data"]["train_size"] == 300
    assert report["hyperparameters"]["temperature"] == 0.07 and report["hyperparameters"]["k"] == [5, 20]
    assert set(report["metrics"]["per_k"]) == {"5", "20"} and report["metrics"]["top1"] > 20  # chance is 10
    assert report["wall_time_s"] > 0 and report["data"]["feature_cache"]["train"] == "extracted"
    assert "top1" in capsys.readouterr().out

    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("extracted again"))
    assert guarded(run_knn, argv) == 0
    again = json.loads(out.read_text())
    assert again["data"]["feature_cache"] == {**report["data"]["feature_cache"], "train": "hit", "test": "hit"}
    assert again["metrics"] == report["metrics"]

    # the linear probe reuses the same cached features
    probe = tmp_path / "probe.json"
    argv = [*RANDOM_TINY, *DIGITS, "--cache-dir", str(tmp_path / "cache"), "--json-out", str(probe), "--epochs", "10"]
    assert guarded(run_linear_probe, [*argv, "--protocol", "dino", "--set", "lr_grid=1,10"]) == 0
    report = json.loads(probe.read_text())
    assert report["protocol"] == "dino-linear" and "held-out" in report["selection"]["rule"]
    assert report["hyperparameters"]["epochs"] == 10 and report["hyperparameters"]["lr_grid"] == [1.0, 10.0]
    assert report["metrics"]["top1"] > 20


def test_json_goes_into_the_run_folder_by_default(tmp_path):
    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 0}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    export_encoder(timm.create_model("vit_tiny_patch16_224", **args), "vit_tiny_patch16_224", args, run / "encoder")
    assert guarded(run_knn, ["--encoder", str(run), *DIGITS, "--k", "10", "--no-cache"]) == 0
    assert json.loads((run / "eval" / "knn.json").read_text())["data"]["feature_cache"]["train"] == "off"


def test_linear_probe_augment_mode_trains_through_the_encoder(tmp_path):
    out = tmp_path / "probe.json"
    argv = [
        *RANDOM_TINY,
        *DIGITS,
        *flags(cache_dir=str(tmp_path), json_out=str(out), epochs=2, augment=True, batch_size=64, set="lr_grid=10"),
    ]
    assert guarded(run_linear_probe, argv) == 0
    report = json.loads(out.read_text())
    assert report["protocol"] == "mae-linear-augment" and report["hyperparameters"]["augment"] is True
    assert report["hyperparameters"]["steps"] == 2 * (270 // 64)  # 90% of 300 after the held-out part


def test_unlabelled_data_and_bad_encoders_are_one_line_errors(tmp_path, capsys):
    for split in ("train", "test"):
        (tmp_path / "flat" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "flat" / split / "a.png")
    assert guarded(run_knn, [*RANDOM_TINY, "--data", str(tmp_path / "flat")]) == 2
    assert "evaluation needs labels" in capsys.readouterr().err
    assert guarded(run_knn, ["--encoder", str(tmp_path / "nothing"), "--data", "digits"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert guarded(run_knn, [*RANDOM_TINY, "--data", "digits", "--limit-train", "50", "--k", "200"]) == 2
    assert "--k 200" in capsys.readouterr().err


def test_entry_point_runs_as_a_script(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "eval/knn.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--temperature" in done.stdout and "--limit-train" in done.stdout


def test_knn_on_cifar10_parquet(tmp_path, cifar10):
    out = tmp_path / "knn.json"
    argv = [
        *RANDOM_TINY,
        *flags(
            data=str(cifar10), limit_train=200, limit_test=50, num_workers=0, k=10, no_cache=True, json_out=str(out)
        ),
    ]
    assert guarded(run_knn, argv) == 0
    report = json.loads(out.read_text())
    assert report["data"]["num_classes"] == 10 and report["data"]["test_size"] == 50
    assert "parquet" in report["data"]["train"] and 0 <= report["metrics"]["top1"] <= 100


def test_two_processes_give_the_same_features_without_duplicates(tmp_path):
    # odd sizes: the last batch of each process is padded, and gather_for_metrics must drop exactly the padding
    argv = [
        *RANDOM_TINY,
        *flags(data="digits", limit_train=301, limit_test=97, batch_size=32, num_workers=0, no_cache=True, k=[10, 20]),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # Accelerate needs it for gloo on CPU
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "eval/knn.py")]
    done = subprocess.run(
        [*launch, *argv, "--json-out", str(tmp_path / "two.json")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert guarded(run_knn, [*argv, "--json-out", str(tmp_path / "one.json")]) == 0
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert (two["data"]["train_size"], two["data"]["test_size"]) == (301, 97)
    assert two["metrics"] == one["metrics"]
