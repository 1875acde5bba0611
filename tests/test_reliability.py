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
        sys.executable,
        str(ROOT / "pretrain.py"),
        "--recipe",
        recipe,
        "--output-dir",
        str(out),
        "--set",
        *TINY_MODEL,
        "data.num_workers=2",
        "train.global_batch_size=32",
        "train.batch_size_per_device=16",
        "train.precision=no",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
        "log.every=1",
        "log.image_every=0",
        *extra,
    ]


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


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("quickstart", ["objective.decoder_depth=1"]),
        ("quickstart_dino", ["objective.out_dim=64", "objective.local_crops_number=2", "model.drop_path_rate=0.1"]),
    ],
)
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
    recipe = tiny_recipe(
        "quickstart", "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=10", "log.image_every=0"
    )
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
    recipe = tiny_recipe(
        "quickstart", "train.max_steps=10", "train.checkpoint_every=1", "train.max_bad_steps=3", "log.image_every=0"
    )
    with pytest.raises(TrainingDiverged) as err:
        pretrain(recipe, tmp_path)
    message = str(err.value)
    assert message.startswith("step 3: 3 steps in a row had a non-finite loss or gradient")
    assert f"{tmp_path / 'checkpoints' / 'step_00000003'}" in message
    assert "train.precision=bf16" in message and "optim.clip_grad" in message


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from accelerate import Accelerator

    from sslvit.errors import CheckpointError
    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    original, calls = Accelerator.save_state, [0]

    def save_state(self, output_dir, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint: half written, then the disk is full
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    recipe = tiny_recipe("quickstart", "train.max_steps=3", "train.checkpoint_every=1", "log.image_every=0")
    with pytest.raises(CheckpointError, match="No space left on device; the previous checkpoint .*step_00000001 is"):
        pretrain(recipe, tmp_path)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]
    monkeypatch.setattr(Accelerator, "save_state", original)
    assert pretrain(recipe, tmp_path)["steps_this_run"] == 2  # resumed from step 1 once there is space


KILL_IN_SAVE = """
import sys, time
from accelerate import Accelerator
original = Accelerator.save_state
def save_state(self, output_dir, **kwargs):
    result = original(self, output_dir, **kwargs)
    if output_dir.endswith("step_00000002"):
        print("SAVING", flush=True)
        time.sleep(60)  # killed here: the state is written, the folder not yet renamed
    return result
Accelerator.save_state = save_state
from sslvit.cli import pretrain_main
sys.argv = ["pretrain.py", *sys.argv[1:]]
sys.exit(pretrain_main())
"""


def test_a_kill_inside_a_save_leaves_the_previous_checkpoint_and_resume_uses_it(tmp_path):
    cmd = _command("quickstart", tmp_path, "objective.decoder_depth=1")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_IN_SAVE, *cmd[2:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "SAVING"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [".tmp-step_00000002", "step_00000001"]
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "step_00000001 (step 1)" in rerun.stderr


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_crafted_to_run_code_is_refused_and_not_run(tmp_path):
    import torch

    from sslvit.errors import CheckpointError
    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe("quickstart", "train.max_steps=1", "train.checkpoint_every=1", "log.image_every=0")
    pretrain(recipe, tmp_path)
    exploit = _Exploit()
    exploit.marker = tmp_path / "pwned"
    checkpoint = complete_checkpoints(tmp_path / "checkpoints")[-1]
    torch.save({"state": exploit}, checkpoint / "optimizer.bin")
    recipe = tiny_recipe("quickstart", "train.max_steps=2", "train.checkpoint_every=1", "log.image_every=0")
    with pytest.raises(CheckpointError, match=f"cannot resume from {checkpoint}"):
        pretrain(recipe, tmp_path)
    assert not exploit.marker.exists(), "unpickling ran the attacker's code"


def test_corrupt_images_are_skipped_counted_and_logged_during_pretraining(tmp_path, caplog):
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    (folder / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[:60])
    (folder / "notes.txt").write_text("not an image")
    caplog.set_level("WARNING", logger="sslvit")
    recipe = tiny_recipe(
        "quickstart",
        f"data.path={folder}",
        "train.max_steps=2",
        "train.global_batch_size=16",
        "log.image_every=0",
        "schedule.epochs=1",
        "schedule.warmup_epochs=0",
    )
    assert pretrain(recipe, tmp_path / "run")["steps"] == 2  # 32 images = 2 steps, then the epoch ends
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("data/skipped")] == [2]
    assert any("skipped 2 undecodable sample(s)" in r.message for r in caplog.records)


def _image_folder(folder: Path, good: int, bad: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    for i in range(good):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    for i in range(bad):
        (folder / f"bad{i}.png").write_bytes(b"not a png " * i)
    return folder


def test_skip_counts_are_per_epoch_with_a_running_total(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    folder = _image_folder(tmp_path / "images", 29, 3)  # 32 files = 2 steps of 16 per epoch, 3 bad in each epoch
    caplog.set_level("WARNING", logger="sslvit")
    recipe = tiny_recipe("quickstart", f"data.path={folder}", "train.max_steps=6", "log.image_every=0",
                         "train.checkpoint_every=3", "schedule.epochs=3", "schedule.warmup_epochs=0")  # fmt: skip
    pretrain(recipe, tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("data/skipped")] == [3, 3, 3]
    assert [e.value for e in events.Scalars("data/skipped_total")] == [3, 6, 9]
    lines = [r.message for r in caplog.records if "undecodable" in r.message]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    assert lines[-1].endswith("9 in all so far") and "skipped 3 undecodable sample(s)" in lines[-1]


def test_a_resume_in_the_middle_of_an_epoch_keeps_that_epochs_count(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    folder = _image_folder(tmp_path / "images", 29, 3)
    base = [
        f"data.path={folder}",
        "log.image_every=0",
        "train.checkpoint_every=1",
        "schedule.epochs=2",
        "schedule.warmup_epochs=0",
    ]
    pretrain(tiny_recipe("quickstart", *base, "train.max_steps=3"), tmp_path / "run")  # stops mid epoch 2
    pretrain(tiny_recipe("quickstart", *base, "train.max_steps=4"), tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    by_step = {e.step: e.value for e in events.Scalars("data/skipped_total")}
    assert by_step[4] == 6  # epoch 2's skips before the resume are not lost


def test_a_batch_in_which_every_image_fails_names_the_counts(tmp_path):
    from sslvit.errors import DataError
    from sslvit.train import pretrain
    from tests.conftest import tiny_recipe

    folder = _image_folder(tmp_path / "images", 0, 16)
    recipe = tiny_recipe("quickstart", f"data.path={folder}", "train.max_steps=1", "log.image_every=0")
    with pytest.raises(
        DataError,
        match=r"every image of a batch failed to decode \(16 skipped: not an image: 15, empty file: 1\); check",
    ):
        pretrain(recipe, tmp_path / "run")
