"""Fault injection: runs that are signalled, whose checkpoints are damaged, that race for one folder, or that are
pointed at the wrong place; each ends in a checkpoint, an exact resume or one ``error:`` line (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslvit.checkpoint import complete_checkpoints, read_trainer_state
from sslvit.errors import CheckpointError, UserError
from sslvit.runlock import RunFolderLocked
from sslvit.train import LoopCallback, pretrain
from sslvit.training.signals import STOPPED_EXIT_CODE, RunStopped
from tests.conftest import TINY_MODEL, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # long enough to be signalled in the middle


def _command(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "pretrain.py"),
        "--recipe",
        "quickstart",
        "--output-dir",
        str(out),
        "--set",
        *TINY_MODEL,
        "objective.decoder_depth=1",
        "data.num_workers=1",  # a loader worker: a signal to the process group must not kill it
        "train.global_batch_size=16",
        "train.batch_size_per_device=16",
        "train.precision=no",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=1000",
        "log.every=1",
        "log.image_every=0",
        *extra,
    ]


def _encoder(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "encoder" / "model.safetensors"))


def _assert_same_weights(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(ours[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The encoder of the uninterrupted subprocess run."""
    out = tmp_path_factory.mktemp("faults") / "ref"
    proc = subprocess.run(_command(out), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _encoder(out)


def _signal_after_step(cmd: list[str], sig: signal.Signals, after: int = 2) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` to its process group (the run and its loader workers, as Ctrl-C, ``kill -TERM
    -PGID`` and SLURM do) once step ``after`` is logged; return (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith(f"sslvit: step {after}/"):
            os.killpg(proc.pid, sig)
            break
    lines += proc.stderr.readlines()
    return proc.wait(timeout=120), "".join(lines)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_after_the_step_and_the_rerun_is_bit_identical(tmp_path, reference, sig):
    cmd = _command(tmp_path / "run")
    code, stderr = _signal_after_step(cmd, sig)
    assert code == STOPPED_EXIT_CODE, stderr[-3000:]
    assert "Traceback" not in stderr
    saved = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(saved) == 1, "the stop wrote its own checkpoint (checkpoint_every is 1000)"
    step = read_trainer_state(saved[0])["step"]
    assert 2 < step < STEPS
    stop_lines = [line for line in stderr.splitlines() if f"stopped after step {step} and saved" in line]
    assert len(stop_lines) == 1 and stop_lines[0].startswith(f"sslvit: {sig.name}:"), stderr[-2000:]
    assert not (tmp_path / "run" / "encoder").exists(), "an unfinished run exports nothing"
    assert not (tmp_path / "run" / "run.lock").exists(), "the lock is released"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {saved[0]} (step {step})" in rerun.stderr
    _assert_same_weights(_encoder(tmp_path / "run"), reference)


class _SignalAt(LoopCallback):
    def __init__(self, step: int, sig: signal.Signals) -> None:
        self.step, self.sig = step, sig

    def on_step_start(self, step: int) -> None:
        if step == self.step:
            os.kill(os.getpid(), self.sig)


def test_the_stop_signals_are_a_recipe_field(tmp_path, caplog):
    recipe = tiny_recipe("quickstart", "train.max_steps=6", "train.checkpoint_every=4", "log.image_every=0")
    expected = pretrain(recipe, tmp_path / "ref") and _encoder(tmp_path / "ref")
    with pytest.raises(RunStopped) as stopped:  # SIGUSR1 (in the defaults) during step index 2: saved after step 3
        pretrain(recipe, tmp_path / "run", callback=_SignalAt(2, signal.SIGUSR1))
    assert stopped.value.code == STOPPED_EXIT_CODE and "SIGUSR1: stopped after step 3" in stopped.value.message
    assert [read_trainer_state(c)["step"] for c in complete_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    assert pretrain(recipe, tmp_path / "run")["steps_this_run"] == 3
    _assert_same_weights(_encoder(tmp_path / "run"), expected)
    # a signal left out of train.stop_signals keeps its usual effect (here: the handler the test installs)
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: seen.append(1))
    try:
        only_term = tiny_recipe("quickstart", "train.max_steps=2", "log.image_every=0", "train.stop_signals=SIGTERM")
        assert pretrain(only_term, tmp_path / "other", callback=_SignalAt(0, signal.SIGUSR1))["steps"] == 2
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [1]
    with pytest.raises(UserError, match="train.stop_signals: SIGNOPE is not a signal"):
        pretrain(tiny_recipe("quickstart", "train.stop_signals=SIGTERM,SIGNOPE"), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


class _SignalTwiceAt(_SignalAt):
    def on_step_start(self, step: int) -> None:
        if step == self.step:
            # two separate deliveries, each handled before the next: identical signals pending at once coalesce into
            # one (CPython keeps one "tripped" flag per signal), which happened in the full suite once another test
            # had left threads that the kernel can deliver a process-wide os.kill to
            for _ in range(2):
                signal.pthread_kill(threading.main_thread().ident, self.sig)
                time.sleep(0.05)  # the main thread runs the handler here


@pytest.fixture
def usual_ctrl_c():
    """Python's own Ctrl-C handler for this test: a second SIGINT hands over to whatever handler was there before the
    run, and an earlier test in the same process may have left another one installed."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_stops_at_once_as_one_line_and_keeps_the_checkpoints(tmp_path, usual_ctrl_c):
    recipe = tiny_recipe("quickstart", "train.max_steps=6", "train.checkpoint_every=1", "log.image_every=0")
    with pytest.raises(RunStopped) as stopped:
        pretrain(recipe, tmp_path / "run", callback=_SignalTwiceAt(2, signal.SIGINT))
    assert stopped.value.code == 130 and stopped.value.message == (
        f"interrupted: stopped at once; the newest checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step_00000002'}"
    )
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual Ctrl-C again
    assert not (tmp_path / "run" / "run.lock").exists()
    assert pretrain(recipe, tmp_path / "run")["steps_this_run"] == 4


# ------------------------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture
def three_checkpoints(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A finished 3-step run with a checkpoint after every step, its export removed, and its export's weights."""
    run = tmp_path / "run"
    pretrain(_three_steps(), run)
    weights = _encoder(run)
    for part in (run / "encoder").iterdir():
        part.unlink()
    (run / "encoder").rmdir()
    return run, weights


def _three_steps():
    return tiny_recipe("quickstart", "train.max_steps=3", "train.checkpoint_every=1", "log.image_every=0")


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (lambda c: os.truncate(c / "model.safetensors", 1000), "model.safetensors is damaged"),
        (lambda c: os.truncate(c / "optimizer.bin", 1000), "optimizer.bin is damaged"),
        (lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json is unreadable"),
        (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl missing"),
    ],
    ids=["truncated-weights", "truncated-optimizer", "empty-trainer-state", "missing-rng"],
)
def test_resume_walks_back_past_a_damaged_newest_checkpoint(three_checkpoints, caplog, damage, why):
    run, expected = three_checkpoints
    newest = complete_checkpoints(run / "checkpoints")[-1]
    damage(newest)
    caplog.set_level("INFO", logger="sslvit")
    assert pretrain(_three_steps(), run)["steps_this_run"] == 1
    skipped = [r.message for r in caplog.records if r.levelname == "WARNING" and str(newest) in r.message]
    assert len(skipped) == 1 and why in skipped[0] and "skipped" in skipped[0], skipped
    assert any(f"resuming from {run / 'checkpoints' / 'step_00000002'} (step 2)" in r.message for r in caplog.records)
    _assert_same_weights(_encoder(run), expected)  # exact: the older checkpoint holds the whole state


def test_when_no_checkpoint_loads_the_run_stops_and_deletes_nothing(three_checkpoints):
    run, _ = three_checkpoints
    saved = complete_checkpoints(run / "checkpoints")
    for checkpoint in saved:
        os.truncate(checkpoint / "model.safetensors", 100)
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed from .*step_00000003: model"):
        pretrain(_three_steps(), run)
    assert complete_checkpoints(run / "checkpoints") == saved and not (run / "encoder").exists()


def test_a_checkpoint_of_another_model_is_refused_before_the_folder_changes(mae_run_copy):
    run = mae_run_copy
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    dino = tiny_recipe("quickstart_dino", "objective.out_dim=64", "objective.local_crops_number=2", "log.image_every=0")
    with pytest.raises(CheckpointError) as err:
        pretrain(dino, run)
    message = str(err.value)
    assert "holds a run of another model (recipe 'quickstart')" in message and "objective.name ('mae' there" in message
    assert "delete" not in message and "\n" not in message
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    wider = tiny_recipe("quickstart", "model.embed_dim=96", "model.num_heads=2", "log.image_every=0")
    with pytest.raises(CheckpointError, match=r"differing keys: model.embed_dim \(64 there, 96 here\)"):
        pretrain(wider, run)


@pytest.fixture
def mae_run_copy(mae_run, tmp_path) -> Path:
    import shutil

    shutil.copytree(mae_run, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------------------------------- the run lock


def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(tmp_path):
    first = subprocess.Popen(
        _command(tmp_path / "run", "train.max_steps=100000"),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        for line in first.stderr:  # training has begun: the folder is locked
            if line.startswith("sslvit: step 1/"):
                break
        holder = json.loads((tmp_path / "run" / "run.lock").read_text())
        assert holder["pid"] == first.pid
        second = subprocess.run(_command(tmp_path / "run"), capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"in use by pid {first.pid} on host" in errors[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr


def test_a_lock_held_by_a_live_process_refuses_and_a_stale_one_is_taken_over(tmp_path, caplog):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    lock = run / "run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "since": "then"}))
    recipe = tiny_recipe("quickstart", "train.max_steps=1", "log.image_every=0")
    with pytest.raises(RunFolderLocked, match=f"in use by pid {os.getppid()} on host"):
        pretrain(recipe, run)
    assert lock.exists() and not (run / "config.json").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    caplog.set_level("WARNING", logger="sslvit")
    assert pretrain(recipe, run)["steps"] == 1
    assert any(f"took over the lock of pid {dead.pid}" in r.message and "no longer running" in r.message
               for r in caplog.records)  # fmt: skip
    assert not lock.exists()


# ----------------------------------------------------------------------------------------------- output paths


def _cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    from sslvit.cli import guarded, run_pretrain

    code = guarded(run_pretrain, argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def _argv(out: Path) -> list[str]:
    return ["--recipe", "quickstart", "--output-dir", str(out), "--set", *TINY_MODEL, "train.max_steps=1"]


def test_an_output_dir_that_is_a_file_or_unwritable_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    import sslvit.training.pretrain as core

    monkeypatch.setattr(core, "build_objective", lambda *a: pytest.fail("the model was built"))
    (tmp_path / "notes.txt").write_text("not a folder")
    code, errors = _cli(_argv(tmp_path / "notes.txt"), capsys)
    assert code == 2 and errors == [f"error: --output-dir {tmp_path / 'notes.txt'} is a file, not a folder: give a "
                                    "folder for the run (or a new path)"]  # fmt: skip
    code, errors = _cli(_argv(tmp_path / "notes.txt" / "run"), capsys)
    assert code == 2 and len(errors) == 1 and "is a file, so no folder can be made under it" in errors[0]
    code, errors = _cli(_argv(Path("/proc/sslvit-test/run")), capsys)  # not writable, not even by root
    assert code == 2 and len(errors) == 1 and "cannot write the run folder /proc/sslvit-test/run" in errors[0]
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        code, errors = _cli(_argv(tmp_path / "ro" / "run"), capsys)
        assert code == 2 and len(errors) == 1 and "is not writable" in errors[0]


# ------------------------------------------------------------------------------------------ two processes (gloo)


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "pretrain.py" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} never started")


def test_two_processes_stop_together_when_only_one_is_signalled_and_resume(tmp_path):
    from tests.test_distributed import SETTINGS

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    out = tmp_path / "run"
    cmd = [*launch, str(ROOT / "pretrain.py"), "--recipe", "quickstart", "--output-dir", str(out), "--set", *SETTINGS,
           "train.max_steps=40", "train.checkpoint_every=1000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    rank1 = _rank_pid(proc, 1)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("sslvit: step 2/"):  # the main process logs; only rank 1 is told to stop
            os.kill(rank1, signal.SIGTERM)
            break
    lines += proc.stderr.readlines()
    proc.wait(timeout=120)
    stderr = "".join(lines)
    saved = complete_checkpoints(out / "checkpoints")
    assert len(saved) == 1, stderr[-3000:]
    step = read_trainer_state(saved[0])["step"]
    assert 2 < step < 40 and (saved[0] / "random_states_1.pkl").is_file()
    assert f"a stop signal to another process: stopped after step {step}" in stderr  # rank 0 learnt it in the reduce
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {saved[0]} (step {step})" in rerun.stderr
    assert read_trainer_state(complete_checkpoints(out / "checkpoints")[-1])["step"] == 40
