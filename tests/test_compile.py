"""``train.compile``: compiled blocks train like eager ones, a failed compile falls back to eager with one warning,
and a compiled run resumes bit-identically.

The tests compile with ``aot_eager`` (dynamo + AOT autograd, no C++ codegen): the same tracing and graph capture as
inductor in a few seconds; a real inductor compile of the tiny DINO is measured in docs/training.md.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from sslvit.accel import compile_blocks
from sslvit.train import build_objective, pretrain
from tests.conftest import crops_batch, tiny_recipe

BACKEND = "aot_eager"
DINO = [
    "objective.out_dim=64",
    "objective.hidden_dim=32",
    "objective.bottleneck_dim=16",
    "objective.local_crops_number=2",
]


_BATCHES: dict[str, dict] = {}


def _losses(recipe, compile_with=None, steps: int = 2) -> tuple[list[float], int]:
    """Losses of ``steps`` SGD steps of a freshly seeded objective; compiled with ``compile_with`` unless None."""
    torch.manual_seed(0)
    objective, encoder = build_objective(recipe)
    compiled = compile_blocks(objective, encoder, compile_with) if compile_with else 0
    if recipe.name not in _BATCHES:  # one batch for every run of a recipe (the views draw from several RNGs)
        _BATCHES[recipe.name] = crops_batch(objective, 8)
    batch = _BATCHES[recipe.name]
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.1)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)  # the same masks and drop paths in both runs
        loss = objective(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, compiled


@pytest.mark.parametrize("name", ["quickstart", "quickstart_dino"])
def test_compiled_blocks_give_the_eager_losses(name, one_thread):
    recipe = tiny_recipe(name, *(DINO if name == "quickstart_dino" else []))
    torch._dynamo.reset()
    counters.clear()
    compiled_losses, compiled = _losses(recipe, BACKEND)
    eager_losses, _ = _losses(recipe)
    assert compiled == (4 if name == "quickstart_dino" else 3)  # student + teacher x 2; MAE: encoder 2 + decoder 1
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured graphs
    assert not counters["graph_break"]
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)


def test_a_failed_compile_warns_once_and_trains_eagerly(monkeypatch, caplog, one_thread):
    recipe = tiny_recipe("quickstart_dino", *DINO)
    eager_losses, _ = _losses(recipe)

    def broken(fn, **_):
        def call(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nsecond line")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        losses, compiled = _losses(recipe, "inductor")
    warnings = [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()]
    assert compiled == 4
    assert warnings == [
        "train.compile: torch.compile failed (RuntimeError: no C++ compiler found); training continues eagerly"
    ]
    assert losses == eager_losses

    def refuses(fn, **_):
        raise RuntimeError("backend 'nope' is not registered")

    monkeypatch.setattr(torch, "compile", refuses)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sslvit"):
        assert _losses(recipe, "nope")[1] == 0
    assert len([r for r in caplog.records if "training continues eagerly" in r.getMessage()]) == 1


def test_a_compiled_run_logs_its_first_step_and_resumes_bit_identically(tmp_path, caplog, one_thread):
    recipe = tiny_recipe(
        "quickstart_dino",
        *DINO,
        "train.compile=true",
        f"train.compile_backend={BACKEND}",
        "train.checkpoint_every=1",
        "log.image_every=0",
    )
    with caplog.at_level(logging.INFO, logger="sslvit"):
        pretrain(recipe, tmp_path / "ref")
    messages = [r.getMessage() for r in caplog.records]
    assert "train.compile: 4 transformer blocks compiled (backend aot_eager)" in messages
    assert any(m.startswith("train.compile: the first step (compiling) took ") for m in messages)
    # the run stopped after step 1, then the same command
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "ref" / "config.json", tmp_path / "run" / "config.json")
    step1 = "checkpoints/step_00000001"
    shutil.copytree(tmp_path / "ref" / step1, tmp_path / "run" / step1)
    assert pretrain(recipe, tmp_path / "run")["steps_this_run"] == 1
    expected = load_file(str(tmp_path / "ref" / "encoder" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "run" / "encoder" / "model.safetensors"))
    assert [k for k in expected if not torch.equal(expected[k], resumed[k])] == []
