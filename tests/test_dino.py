"""DINO: the EMA teacher, the frozen last layer, multi-crop views, attention maps, the teacher export, a short run,
resume, and two processes agreeing (the loss, centre, teacher update and schedules against the authors' code are in
tests/reference/test_dino_reference.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.backbone import build_vit, model_args
from sslvit.checkpoint import complete_checkpoints, export_encoder
from sslvit.objectives import DINO, OBJECTIVES, DINOConfig, Progress
from sslvit.objectives.dino import teacher_momentum
from sslvit.recipe import ModelConfig, load_recipe
from sslvit.train import pretrain
from sslvit.viz import cls_attention_maps
from tests.conftest import crops_batch, tiny_recipe
from tests.reference.dino_reference import DINOLoss

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2,
                   drop_path_rate=0.1)  # fmt: skip
CFG = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crop_size=16, local_crops_number=3,
                 warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)  # fmt: skip
TINY_DINO = ["objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16",
             "objective.local_crops_number=2"]  # fmt: skip


def make_dino(cfg: DINOConfig = CFG) -> DINO:
    torch.manual_seed(0)
    return DINO(build_vit(TINY, **DINO.backbone_kwargs(cfg)), cfg)


def official_dino_loss(student_output, teacher_output, center, ncrops, temp, all_teacher_outputs=None):
    """The authors' ``DINOLoss`` (restated in tests/reference/dino_reference.py) at teacher temperature ``temp``,
    from centre ``center`` -> the loss and the new centre.

    ``all_teacher_outputs``: the teacher outputs of every process (equal batch sizes; default: this one). Their
    ``dist.all_reduce``-summed batch centre is the batch centre of their concatenation.
    """
    loss_fn = DINOLoss(center.shape[1], ncrops, temp, temp, 0, 1)
    loss_fn.center = center.clone()
    loss = loss_fn(student_output, teacher_output, 0)
    if all_teacher_outputs is not None:
        loss_fn.center = center.clone()
        loss_fn.update_center(torch.cat(all_teacher_outputs))
    return loss, loss_fn.center


def test_the_teacher_gets_no_gradient_and_moves_toward_the_student_by_the_momentum():
    dino = make_dino()
    dino(crops_batch(dino))["loss"].backward()
    teacher = [*dino.teacher_backbone.parameters(), *dino.teacher_head.parameters()]
    student = [*dino.student_backbone.parameters(), *dino.student_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert dino.student_backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    torch.optim.SGD([p for p in student if p.requires_grad], lr=1.0).step()
    before = [p.detach().clone() for p in teacher]
    logged = dino.after_step(Progress(step=30, total_steps=100, epochs=10))
    m = teacher_momentum(CFG.momentum_teacher, 30, 100)
    assert logged["momentum"] == pytest.approx(m) and 0.996 < m < 1
    for new, old, s in zip(teacher, before, student):
        torch.testing.assert_close(new, m * old + (1 - m) * s)
    gap = lambda ps: sum((t - s).norm() for t, s in zip(ps, student))  # noqa: E731
    assert gap(teacher) < gap(before)


@pytest.mark.parametrize(("step", "cancelled"), [(0, True), (19, True), (20, False), (70, False)])
def test_the_last_layer_gets_no_update_during_the_first_epoch_only(step, cancelled):
    dino = make_dino()  # freeze_last_layer=1 epoch; 10 epochs of 20 steps
    dino(crops_batch(dino))["loss"].backward()
    dino.after_backward(Progress(step=step, total_steps=200, epochs=10))
    last = dino.student_head.last_layer
    assert (last.weight_v.grad is None) == cancelled
    assert dino.student_head.layers[0].weight.grad is not None  # the rest of the head always learns


def test_views_are_two_global_and_n_local_crops_and_each_size_is_one_backbone_batch():
    dino = make_dino()
    batch = crops_batch(dino, n=4)
    assert [tuple(v.shape) for v in batch["views"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    calls = {"student": [], "teacher": []}
    for name in calls:
        backbone = getattr(dino, f"{name}_backbone")
        backbone.register_forward_hook(lambda m, args, out, name=name: calls[name].append(tuple(args[0].shape)))
    out = dino(batch)
    assert calls == {"student": [(8, 3, 32, 32), (12, 3, 16, 16)], "teacher": [(8, 3, 32, 32)]}
    assert out["loss"].requires_grad and all(not v.requires_grad for k, v in out.items() if k != "loss")
    assert set(out) == {"loss", "teacher_batch_entropy", "teacher_sample_entropy", "student_feature_std"}


@pytest.mark.parametrize(("dynamic", "size"), [(True, 32), (True, 16), (False, 32)])
def test_attention_maps_equal_the_weights_of_timms_unfused_attention(dynamic, size):
    torch.manual_seed(0)
    vit = build_vit(TINY, **({"dynamic_img_size": True} if dynamic else {})).eval()
    attn = vit.blocks[-1].attn
    attn.fused_attn = False
    seen = []
    attn.attn_drop.register_forward_hook(lambda m, args, out: seen.append(out))  # sees the softmax weights
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        vit(images)
    maps = cls_attention_maps(vit, images)
    grid = size // 4
    assert maps.shape == (3, 2, grid, grid)
    torch.testing.assert_close(maps, seen[0][:, :, 0, 1:].reshape(3, 2, grid, grid))


def test_visualize_logs_one_row_per_image_with_one_panel_per_head():
    dino = make_dino().eval()
    images = crops_batch(dino, n=3)["views"][0]
    grid = dino.visualize({"views": [images]})["dino/teacher_attention"]
    assert grid.shape == (3, 3 * 33 + 1, 3 * 33 + 1)  # 3 rows x (image + 2 heads) of 32 px, 1 px padding
    assert grid.min() >= 0 and grid.max() <= 1


def test_the_export_is_the_teacher_and_loads_strictly_into_timm(tmp_path):
    dino = make_dino()
    dino.student_backbone.patch_embed.proj.weight.data.add_(1.0)  # student != teacher, so a mix-up shows
    dino.update_teacher(0.5)
    out = export_encoder(dino.encoder_for_export(), TINY.name, model_args(TINY, **DINO.backbone_kwargs(CFG)),
                         tmp_path / "encoder")  # fmt: skip
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert set(loaded.state_dict()) == set(dino.teacher_backbone.state_dict())
    dino.eval()
    for size in (32, 16):  # dynamic_img_size travels with the export
        images = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), dino.teacher_backbone(images))
            assert not torch.allclose(loaded(images), dino.student_backbone(images))


def test_the_shipped_dino_recipes_hold_the_official_values():
    s16 = load_recipe("dino_vit_s16")
    assert (s16.objective.out_dim, s16.objective.teacher_temp, s16.objective.warmup_teacher_temp_epochs) == (
        65536, 0.07, 30)  # fmt: skip
    assert (s16.optim.base_lr, s16.optim.min_lr, s16.optim.weight_decay, s16.optim.weight_decay_end) == (
        5e-4, 1e-6, 0.04, 0.4)  # fmt: skip
    assert (s16.optim.betas, s16.optim.clip_grad, s16.model.drop_path_rate) == ((0.9, 0.999), 3.0, 0.1)
    assert (s16.train.global_batch_size, s16.schedule.epochs, s16.schedule.warmup_epochs) == (1024, 300, 10)
    for name in ("dino_vit_s16", "dino_vit_s8", "dino_vit_b16", "dino_vit_b8", "dino_vit_tiny_cifar",
                 "quickstart_dino"):  # fmt: skip
        recipe = load_recipe(name)
        recipe.validate()
        assert recipe.objective.name == "dino" and recipe.model.img_size % recipe.model.patch_size == 0


def test_a_short_quickstart_dino_run_logs_attention_maps_and_collapse_signals(tmp_path):
    summary = pretrain(tiny_recipe("quickstart_dino", *TINY_DINO, "train.max_steps=3"), tmp_path)
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    expected = {"loss", "teacher_batch_entropy", "teacher_sample_entropy", "student_feature_std", "momentum",
                "teacher_temp", "lr", "weight_decay"}  # fmt: skip
    assert {f"train/{k}" for k in expected} <= set(events.Tags()["scalars"])
    assert "dino/teacher_attention" in events.Tags()["images"]
    exported = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    checkpoint = load_file(str(complete_checkpoints(tmp_path / "checkpoints")[-1] / "model.safetensors"))
    for key, value in exported.items():
        torch.testing.assert_close(value, checkpoint[f"teacher_backbone.{key}"])


def test_rerunning_resumes_with_the_teacher_and_centre_restored(tmp_path, monkeypatch):
    class FirstStateRecorder(DINO):
        first_state: dict | None = None

        def before_step(self, progress):
            if type(self).first_state is None:
                type(self).first_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            super().before_step(progress)

    monkeypatch.setitem(OBJECTIVES, "dino", FirstStateRecorder)
    pretrain(tiny_recipe("quickstart_dino", *TINY_DINO, "train.max_steps=2", "train.checkpoint_every=1"), tmp_path)
    FirstStateRecorder.first_state = None
    summary = pretrain(tiny_recipe("quickstart_dino", *TINY_DINO, "train.max_steps=4", "train.checkpoint_every=1"),
                       tmp_path)  # fmt: skip
    assert summary["steps"] == 4
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    resumed = FirstStateRecorder.first_state
    assert saved["dino_loss.center"].abs().sum() > 0
    assert not torch.equal(saved["teacher_backbone.pos_embed"], saved["student_backbone.pos_embed"])
    for key in saved:  # teacher, centre and student as saved after step 2
        torch.testing.assert_close(resumed[key], saved[key], rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_the_centre_and_keep_the_teacher_identical(tmp_path):
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "tests" / "dist_dino_check.py"), str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[:30]) + result.stderr[-2000:]  # every rank's error first
    assert result.stdout.count("dist_dino_check: ok") == 2, result.stdout[-3000:]


def test_a_skipped_non_finite_step_moves_neither_the_centre_nor_the_teacher(tmp_path, monkeypatch):
    original, calls = DINO.forward, [0]

    def forward(self, batch):
        out = original(self, batch)
        if self.training:
            out["loss"] = out["loss"] * (float("nan") if calls[0] == 1 else 1.0)
            calls[0] += 1
        return out

    monkeypatch.setattr(DINO, "forward", forward)
    recipe = tiny_recipe("quickstart_dino", "objective.out_dim=64", "objective.local_crops_number=2",
                         "train.max_steps=3", "train.checkpoint_every=1", "log.image_every=0")  # fmt: skip
    pretrain(recipe, tmp_path)
    first, second, third = (
        load_file(str(c / "model.safetensors")) for c in complete_checkpoints(tmp_path / "checkpoints")
    )
    assert all(torch.equal(first[k], second[k]) for k in first)  # step 2 was skipped: nothing moved
    assert not torch.equal(second["dino_loss.center"], third["dino_loss.center"])
    assert not torch.equal(second["teacher_backbone.blocks.0.attn.qkv.weight"],
                           third["teacher_backbone.blocks.0.attn.qkv.weight"])  # fmt: skip
