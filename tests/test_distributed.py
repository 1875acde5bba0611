"""Two CPU processes (gloo) train like one process with the same global batch, and checkpoints move between them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "model.depth=2",
    "model.embed_dim=64",
    "model.num_heads=2",
    "data.num_workers=0",
    "train.global_batch_size=32",
    "train.batch_size_per_device=16",
    "train.max_steps=20",
    "train.checkpoint_every=10",
    "log.every=1",
    "log.image_every=0",
    "objective.decoder_depth=1",
    "train.precision=no",
]


def _pretrain(out: Path, processes: int) -> subprocess.CompletedProcess:
    # `accelerate launch --cpu --num_processes 2` would start one process; --multi_gpu without a GPU starts two on gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch = launcher if processes == 2 else [sys.executable]
    cmd = [*launch, str(ROOT / "pretrain.py"), "--recipe", "quickstart", "--output-dir", str(out), "--set", *SETTINGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(run: Path) -> np.ndarray:
    return np.array([e.value for e in EventAccumulator(str(run / "tensorboard")).Reload().Scalars("train/loss")])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    one, two = _pretrain(root / "one", 1), _pretrain(root / "two", 2)
    assert "2 process(es) x 16 images x 1 accumulation = global batch 32" in two.stderr
    assert "1 process(es) x 16 images x 2 accumulation = global batch 32" in one.stderr
    return root


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    one, two = _losses(runs / "one"), _losses(runs / "two")
    assert len(one) == len(two) == 20
    assert one[-1] < one[0] * 0.8  # it trains
    # Same images per step (per-sample augmentation seeds); only the random masks differ between the layouts.
    np.testing.assert_allclose(two, one, rtol=0.02)


@pytest.mark.parametrize(("written_by", "resumes_on"), [("two", 1), ("one", 2)])
def test_a_checkpoint_resumes_on_a_different_number_of_processes(runs, tmp_path, written_by, resumes_on):
    run = tmp_path / "run"
    shutil.copytree(runs / written_by, run)
    shutil.rmtree(run / "checkpoints" / "step_00000020")
    shutil.rmtree(run / "encoder")
    proc = _pretrain(run, resumes_on)
    assert "(step 10)" in proc.stderr and "the data order (and the random masks) change" in proc.stderr
    assert (run / "encoder" / "model.safetensors").is_file()
    np.testing.assert_allclose(_losses(run)[-10:], _losses(runs / written_by)[-10:], rtol=0.05)


@pytest.mark.parametrize("fails", [False, True])
def test_a_command_leaves_the_process_group_before_it_returns(monkeypatch, fails):
    # a rank that exits with gloo's threads alive can abort ("terminate called without an active exception")
    import torch.distributed as dist

    from sslvit.cli import guarded
    from sslvit.errors import UserError

    for key, value in {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29581 + fails),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }.items():
        monkeypatch.setenv(key, value)
    seen = []

    def command(argv):
        dist.init_process_group("gloo")
        seen.append(dist.is_initialized())
        if fails:
            raise UserError("a user mistake")
        return 0

    assert guarded(command, []) == (2 if fails else 0)
    assert seen == [True] and not dist.is_initialized()
