"""sslvit.weights.run: a run folder as one object; a half-written checkpoint is never picked."""

from __future__ import annotations

import json

from sslvit.weights import RunFolder, latest_checkpoint
from sslvit.weights.run import TRAINER_STATE, checkpoint_name


def _checkpoint(root, step: int, complete: bool = True):
    folder = root / "checkpoints" / checkpoint_name(step)
    folder.mkdir(parents=True)
    if complete:
        (folder / TRAINER_STATE).write_text(json.dumps({"step": step}))
    return folder


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 10, complete=False)  # no trainer_state.json: incomplete
    (tmp_path / "checkpoints" / ".tmp-step_00000009").mkdir()
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert RunFolder(tmp_path).trainer_state() == {"step": 2}


def test_newest_is_by_step_not_by_name_and_a_fresh_folder_has_none(tmp_path):
    run = RunFolder(tmp_path)
    assert run.latest_checkpoint() is None and run.trainer_state() is None and run.recipe() == {}
    for step in (99_999_999, 100_000_000):  # past 8 digits the names no longer sort as the steps do
        _checkpoint(tmp_path, step)
    assert run.trainer_state() == {"step": 100_000_000}


def test_a_checkpoint_or_an_export_knows_the_run_it_lives_in(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"name": "quickstart"}))
    checkpoint = _checkpoint(tmp_path, 3)
    (tmp_path / "encoder").mkdir()
    assert RunFolder.of(checkpoint) == RunFolder.of(tmp_path / "encoder") == RunFolder(tmp_path)
    assert RunFolder.of(checkpoint).recipe() == {"name": "quickstart"}
    loose = tmp_path / "elsewhere" / "encoder"
    loose.mkdir(parents=True)
    assert RunFolder.of(loose) is None  # an export copied out of its run
