"""Reliability: a run killed at an arbitrary step and restarted ends bit-for-bit where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sslvit.checkpoint import complete_checkpoints
from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


def _command(recipe: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "pretrain.py"), "--recipe", recipe, "--output-dir", str(out), "--set", *TINY_MODEL,
        "data.num_workers=2", "train.global_batch_size=32", "train.batch_size_per_device=16", "train.precision=no",
        f"train.max_steps={STEPS}", "train.checkpoint_every=1", "train.keep_checkpoints=2", "log.every=1",
        "log.image_every=0", *extra,
    ]  # fmt: skip


def _kill_at_random_step(cmd: list[str], out: Path, rng: random.Random) -> int:
    """Start ``cmd``, SIGKILL it right after checkpoint ``k`` (random) appears; return the newest saved step."""
    kill_after = rng.randint(2, STEPS - 3)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        saved = complete_checkpoints(out / "checkpoints")
        if saved and int(saved[-1].name.split("_")[1]) >= kill_after:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = complete_checkpoints(out / "checkpoints")
    assert saved, "no checkpoint was written before the kill"
    return int(saved[-1].name.split("_")[1])


@pytest.mark.parametrize(("recipe", "extra"), [("quickstart", ["objective.decoder_depth=1"])])
def test_sigkill_and_rerun_is_bit_identical_to_an_uninterrupted_run(tmp_path, recipe, extra):
    reference = subprocess.run(_command(recipe, tmp_path / "ref", *extra), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr[-3000:]
    cmd = _command(recipe, tmp_path / "run", *extra)
    killed_at = _kill_at_random_step(cmd, tmp_path / "run", random.Random(os.getpid()))
    assert killed_at < STEPS, "the run finished before it was killed"
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(step {killed_at})" in rerun.stderr
    ours = load_file(str(tmp_path / "run" / "encoder" / "model.safetensors"))
    expected = load_file(str(tmp_path / "ref" / "encoder" / "model.safetensors"))
    different = [k for k in expected if not (ours[k] == expected[k]).all()]
    assert not different, f"killed at step {killed_at}: {len(different)} tensors differ, e.g. {different[:3]}"


def _inject_nan(monkeypatch, bad_calls: set[int]) -> None:
    """Make MAE's loss NaN on the given forward calls (0-based), as an fp16 overflow would."""
    from sslvit.objectives.mae import MAE

    original, calls = MAE.forward, [0]

    def forward(self, batch):
        out = original(self, batch)
        if self.training:
            if calls[0] in bad_calls:
                out["loss"] = out["loss"] * float("nan")
            calls[0] += 1
        return out

    monkeypatch.setattr(MAE, "forward", forward)


def test_non_finite_steps_are_skipped_counted_and_leave_the_weights_alone(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    _inject_nan(monkeypatch, {1, 2})
    recipe = tiny_recipe("quickstart", "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=10",
                         "log.image_every=0")  # fmt: skip
    summary = pretrain(recipe, tmp_path)
    assert summary["steps"] == 4
    weights = [load_file(str(c / "model.safetensors")) for c in complete_checkpoints(tmp_path / "checkpoints")]
    assert all((weights[0][k] == weights[2][k]).all() for k in weights[0])  # steps 2 and 3 changed nothing
    assert not all((weights[0][k] == weights[3][k]).all() for k in weights[0])  # step 4 trained again
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/bad_steps")] == [0, 1, 1, 0]
    assert all(e.value == e.value for e in events.Scalars("train/loss"))  # NaN never reaches the logged loss


def test_too_many_bad_steps_in_a_row_stop_the_run_with_remedies(tmp_path, monkeypatch):
    from sslvit.errors import TrainingDiverged
    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    _inject_nan(monkeypatch, set(range(1, 100)))
    recipe = tiny_recipe("quickstart", "train.max_steps=10", "train.checkpoint_every=1", "train.max_bad_steps=3",
                         "log.image_every=0")  # fmt: skip
    with pytest.raises(TrainingDiverged) as err:
        pretrain(recipe, tmp_path)
    message = str(err.value)
    assert message.startswith("step 3: 3 steps in a row had a non-finite loss or gradient")
    assert f"{tmp_path / 'checkpoints' / 'step_00000003'}" in message
    assert "train.precision=bf16" in message and "optim.clip_grad" in message
