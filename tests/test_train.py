"""The training loop: a step changes weights, the run folder, TensorBoard, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.backbone import build_vit
from sslvit.checkpoint import complete_checkpoints, read_trainer_state
from sslvit.errors import DataError, RecipeError
from sslvit.objectives import MAE
from sslvit.train import pretrain, warmup_cosine
from tests.conftest import TINY_MODEL, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_warmup_cosine_matches_the_official_mae_schedule():
    # facebookresearch/mae util/lr_sched.py: lr * epoch / warmup, then half-cycle cosine to min_lr
    assert warmup_cosine(0, 100, 10, 1.0, 0.0) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_a_run_trains_logs_checkpoints_and_exports(tmp_path):
    recipe = tiny_recipe("quickstart", "train.max_steps=3", "train.checkpoint_every=2")
    summary = pretrain(recipe, tmp_path / "run")
    run = tmp_path / "run"
    assert summary["steps"] == 3 and summary["final_loss"] > 0
    assert {p.name for p in run.iterdir()} >= {"config.json", "tensorboard", "checkpoints", "encoder"}
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_00000002", "step_00000003"]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/weight_decay", "train/images_per_s", "train/grad_norm"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert "mae/reconstructions" in events.Tags()["images"]


def test_one_step_changes_the_encoder_weights(tmp_path):
    recipe = tiny_recipe("quickstart", "train.max_steps=1", "train.checkpoint_every=1", "optim.base_lr=1e-2")
    pretrain(recipe, tmp_path / "a")
    trained = load_file(str(tmp_path / "a" / "encoder" / "model.safetensors"))
    torch.manual_seed(recipe.train.seed)  # pretrain seeds the same way before building the model
    initial = MAE(build_vit(recipe.model), recipe.objective).encoder_for_export().state_dict()
    changed = [k for k in trained if not torch.equal(trained[k], initial[k])]
    assert "blocks.0.attn.qkv.weight" in changed and "patch_embed.proj.weight" in changed
    assert "pos_embed" not in changed  # fixed sin-cos


def test_rerunning_resumes_from_the_newest_checkpoint(tmp_path, caplog):
    caplog.set_level("INFO", logger="sslvit")
    pretrain(tiny_recipe("quickstart", "train.max_steps=2", "train.checkpoint_every=1"), tmp_path)
    summary = pretrain(tiny_recipe("quickstart", "train.max_steps=4", "train.checkpoint_every=1"), tmp_path)
    assert summary["steps"] == 4
    assert any("resuming from" in r.message and "step_00000002" in r.message for r in caplog.records)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")][-2:] == [3, 4]


def test_killed_run_resumes_when_the_same_command_runs_again(tmp_path):
    batch = ["train.global_batch_size=16", "train.batch_size_per_device=16", "data.num_workers=0"]
    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--recipe", "quickstart", "--output-dir", str(tmp_path),
           "--set", *TINY_MODEL, *batch, "train.max_steps=400", "train.checkpoint_every=2", "log.image_every=0",
           "objective.decoder_depth=1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while not complete_checkpoints(tmp_path / "checkpoints") and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = complete_checkpoints(tmp_path / "checkpoints")
    assert saved, "the run never wrote a checkpoint"
    step = read_trainer_state(saved[-1])["step"]
    assert step < 400, "the run finished before it could be killed"
    rerun = subprocess.run([*cmd[:-4], "train.max_steps=" + str(step + 2), *cmd[-3:]],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resuming from {saved[-1]} (step {step})" in rerun.stderr
    assert read_trainer_state(complete_checkpoints(tmp_path / "checkpoints")[-1])["step"] == step + 2


def test_too_little_data_for_one_batch_is_a_clear_error(tmp_path):

    recipe = tiny_recipe("quickstart", "train.global_batch_size=4096", "train.batch_size_per_device=16")
    with pytest.raises(DataError, match="fewer than one global batch of 4096"):
        pretrain(recipe, tmp_path)


def test_streaming_parquet_trains_for_max_steps(tmp_path):
    from tests.test_data import _write_parquet

    _write_parquet(tmp_path / "data", "train", [_png(i) for i in range(40)], [i % 3 for i in range(40)])
    recipe = tiny_recipe("quickstart", f"data.path={tmp_path / 'data'}", "data.streaming=true", "train.max_steps=3")
    summary = pretrain(recipe, tmp_path / "run")
    assert summary["steps"] == 3 and (tmp_path / "run" / "encoder" / "model.safetensors").is_file()
    with pytest.raises(RecipeError, match="set train.max_steps"):
        pretrain(tiny_recipe("quickstart", f"data.path={tmp_path / 'data'}", "data.streaming=true",
                             "train.max_steps=0"), tmp_path / "run2")  # fmt: skip


def _png(seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_online_knn_monitor_logs_top1_during_pretraining(tmp_path, caplog):
    caplog.set_level("INFO", logger="sslvit")
    recipe = tiny_recipe("quickstart", "train.max_steps=2", "eval.knn_every=1", "eval.data=digits",
                         "eval.limit_train=100", "eval.limit_test=50", "log.image_every=0")  # fmt: skip
    summary = pretrain(recipe, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("knn/top1")] == [1, 2]
    assert 0 <= summary["knn_top1"] <= 100 and summary["knn_top1"] == events.Scalars("knn/top1")[-1].value
    assert any("k-NN (k=20) top1" in r.message for r in caplog.records)


def test_online_knn_monitor_needs_labelled_data_before_any_work(tmp_path):
    from PIL import Image

    (tmp_path / "flat").mkdir()
    for i in range(20):
        Image.new("RGB", (32, 32), (i * 10, 0, 0)).save(tmp_path / "flat" / f"{i}.png")
    recipe = tiny_recipe("quickstart", "eval.knn_every=1", f"eval.data={tmp_path / 'flat'}")
    with pytest.raises(DataError, match="evaluation needs labels"):
        pretrain(recipe, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
