"""Tests for sslvit.evaluation.load: every encoder spec, official MAE/DINO formats, clear errors, 2-D resampling."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from sslvit.checkpoint import TRAINER_STATE, export_encoder
from sslvit.errors import CheckpointError
from sslvit.evaluation.load import load_encoder

# embed_dim 192 = ViT-Tiny's width, so a bare weights file's shape can be read back (depth 2 keeps it small)
ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 192, "num_heads": 3, "num_classes": 0}
NAME = "vit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model(NAME, **ARGS).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def _fake_run(root, vit, with_export: bool):
    """A run folder with one training checkpoint (objective keys under backbone.vit.) and optionally the export."""
    ckpt = root / "checkpoints" / "step_00000010"
    ckpt.mkdir(parents=True)
    tensors = {f"backbone.vit.{k}": v.contiguous() for k, v in vit.state_dict().items()}
    tensors["decoder.weight"] = torch.zeros(3)
    save_file(tensors, str(ckpt / "model.safetensors"))
    state = {"step": 10, "architecture": NAME, "model_args": ARGS, "encoder_prefix": "backbone.vit."}
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    if with_export:
        export_encoder(vit, NAME, ARGS, root / "encoder")
    return root


def test_run_folder_export_and_checkpoint_give_the_same_encoder(tmp_path, vit, images):
    run = _fake_run(tmp_path / "run", vit, with_export=True)
    for spec, kind in [(run, "export"), (run / "encoder", "export"), (run / "checkpoints/step_00000010", "checkpoint")]:
        model, ident = load_encoder(str(spec))
        assert _same(model, vit, images), spec
        assert ident["kind"] == kind and ident["run_dir"] == str(run.resolve())
        assert len(ident["sha256"]) == 16 and ident["architecture"] == NAME


def test_run_without_export_uses_its_newest_checkpoint(tmp_path, vit, images):
    run = _fake_run(tmp_path / "run", vit, with_export=False)
    model, ident = load_encoder(str(run))
    assert ident["kind"] == "checkpoint" and ident["path"].endswith("step_00000010")
    assert _same(model, vit, images)


def test_official_mae_checkpoint_loads_with_decoder_dropped(tmp_path, vit, images):
    state = dict(vit.state_dict())
    decoder = {"decoder_embed.weight": (64, 192), "decoder_pos_embed": (1, 17, 64), "decoder_pred.weight": (192, 64)}
    state.update({"mask_token": torch.zeros(1, 1, 192), **{k: torch.zeros(shape) for k, shape in decoder.items()}})
    file = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": state, "epoch": 799, "args": argparse.Namespace(model="mae_vit_tiny")}, file)
    named, ident = load_encoder(
        NAME, weights=str(file), model_args={k: ARGS[k] for k in ("img_size", "patch_size", "depth")}
    )
    assert ident["kind"] == "mae" and _same(named, vit, images)
    inferred, ident = load_encoder(str(file))  # shape read from the weights: ViT-Tiny width, depth 2, patch 8
    assert ident["model_args"]["depth"] == 2 and _same(inferred, vit, images)


def test_official_dino_checkpoint_loads_the_teacher_backbone(tmp_path, vit, images):
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 192)
    student = {f"module.backbone.{k}": torch.zeros_like(v) for k, v in vit.state_dict().items()}
    file = tmp_path / "checkpoint.pth"
    torch.save(
        {"teacher": teacher, "student": student, "epoch": 100, "args": argparse.Namespace(arch="vit_tiny")}, file
    )
    model, ident = load_encoder(str(file))
    assert ident["kind"] == "dino-teacher" and _same(model, vit, images)
    backbone = tmp_path / "dino_deittiny8_pretrain.pth"  # the released backbone-only files: a plain state dict
    torch.save(dict(vit.state_dict()), backbone)
    model, ident = load_encoder(str(backbone))
    assert ident["kind"] == "plain" and _same(model, vit, images)


def test_wrong_architecture_is_one_error_listing_what_did_not_fit(tmp_path, vit):
    file = tmp_path / "weights.safetensors"
    state = {k: v.contiguous() for k, v in vit.state_dict().items() if not k.startswith("blocks.1.")}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(file))
    with pytest.raises(CheckpointError) as err:
        load_encoder(
            "vit_small_patch16_224", weights=str(file), model_args={"img_size": 32, "patch_size": 8, "depth": 2}
        )
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys [extra.weight]" in message
    assert "shape mismatches (file vs model) [blocks.0.attn.proj.bias: (192,) vs (384,)" in message


def test_a_file_with_python_objects_is_refused_not_unpickled(tmp_path):
    file = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "hook": _Pickled()}, file)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_encoder(NAME, weights=str(file))


class _Pickled:
    pass


def test_unknown_spec_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a run folder"):
        load_encoder("no_such_model_or_path")
    with pytest.raises(CheckpointError, match="--weights"):
        load_encoder(NAME)
    with pytest.raises(CheckpointError, match="holds no encoder"):
        load_encoder(str(tmp_path))


def test_random_init_is_reproducible_and_hashed():
    args = {"img_size": 32, "patch_size": 4, "depth": 1, "embed_dim": 64, "num_heads": 2}
    (a, ident_a), (b, ident_b) = load_encoder(NAME, "random", model_args=args), load_encoder(NAME, "random", None, args)
    assert ident_a["sha256"] == ident_b["sha256"] and torch.equal(a.pos_embed, b.pos_embed)
    _, ident_c = load_encoder(NAME, "random", model_args={**args, "depth": 2})
    assert ident_c["sha256"] != ident_a["sha256"]


def test_position_embeddings_are_resampled_in_2d(tmp_path, vit):
    export_encoder(vit, NAME, ARGS, tmp_path / "encoder")
    grid = torch.linspace(-1, 1, 4)
    with torch.no_grad():  # a position embedding that varies along x only (4 x 4 grid of patches)
        vit.pos_embed[0, 1:] = grid.repeat(4).view(16, 1).expand(16, 192)
    export_encoder(vit, NAME, ARGS, tmp_path / "encoder")
    model, ident = load_encoder(str(tmp_path / "encoder"), img_size=48)
    assert ident["img_size"] == 48 and ident["pretrain_img_size"] == 32
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 192)
    pos = model.pos_embed[0, 1:, 0].view(6, 6)
    assert torch.allclose(pos, pos[:1].expand(6, 6), atol=1e-5), "rows must agree: resampling must be 2-D"
    assert torch.equal(model.pos_embed[0, 0], vit.pos_embed[0, 0]), "the CLS position is not resampled"
