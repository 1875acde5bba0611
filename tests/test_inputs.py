"""Issue 14: every user mistake in an input is one ``error:`` line and exit code 2 (weights files, recipe values,
evaluation options, --json-out), a damaged newest checkpoint falls back to the newest readable one, and Hub exports
carry sslvit's own provenance."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sslvit.cli import guarded, main
from sslvit.errors import CheckpointError
from sslvit.evaluation import features
from sslvit.evaluation.cli import run_knn
from sslvit.export import export_run
from sslvit.weights import init_weights, resolve

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_ARGS = ["img_size=32", "patch_size=8", "depth=1", "embed_dim=32", "num_heads=2"]
RANDOM_TINY = ["--encoder", "vit_tiny_patch16_224", "--weights", "random", "--model-args", *MODEL_ARGS]
DIGITS = ["--data", "digits", "--num-workers", "0", "--no-cache"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


class _Pickled:
    """Not a tensor: torch.load(weights_only=True) must refuse it."""


# item 5 (and 2): unreadable weights --------------------------------------------------------------------------


def test_unreadable_weights_files_are_one_error_line_naming_the_file(tmp_path, capsys):
    files = {
        "notes.txt": b"some notes\n",
        "empty.safetensors": b"",
        "text.safetensors": b"not a safetensors file\n",
        "passwd": b"root:x:0:0:root:/root:/bin/bash\n",  # model.init=/etc/passwd gave an IndexError
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"model": {"x": torch.zeros(1)}, "hook": _Pickled()}, tmp_path / "evil.pth")
    for name in [*files, "evil.pth"]:
        assert guarded(run_knn, ["--encoder", str(tmp_path / name), *DIGITS]) == 2, name
        err = one_error_line(capsys)
        assert str(tmp_path / name) in err and "cannot be read" in err, err
    assert guarded(run_knn, ["--encoder", str(tmp_path / "evil.pth"), *DIGITS]) == 2
    err = one_error_line(capsys)
    assert "pickled Python objects" in err and "Re-running" not in err and "weights_only set to False" not in err
    assert "the file is empty" in _message(tmp_path / "empty.safetensors")


def _message(path: Path) -> str:
    with pytest.raises(CheckpointError) as err:
        resolve(str(path))
    return str(err.value)


def test_model_init_and_a_bad_pos_embed_are_one_clear_error(tmp_path):
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    args = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 0}
    encoder = timm.create_model("vit_tiny_patch16_224", **args)
    with pytest.raises(CheckpointError, match=r"^model.init=.*passwd.* cannot be read"):
        init_weights(str(tmp_path / "passwd"), encoder, encoder)
    state = {**encoder.state_dict(), "pos_embed": torch.zeros(1, 1, 32)}  # one position: nothing to resample from
    save_file(state, str(tmp_path / "one_position.safetensors"))
    weights = resolve("vit_tiny_patch16_224", str(tmp_path / "one_position.safetensors"), dict(args))
    with pytest.raises(CheckpointError, match="cannot resample"):
        weights.build()


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_readable_one(mae_run, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    shutil.copytree(mae_run, run)
    shutil.rmtree(run / "encoder")
    old = next((run / "checkpoints").iterdir())
    newer = run / "checkpoints" / "step_00000009"
    shutil.copytree(old, newer)
    state = json.loads((newer / "trainer_state.json").read_text())
    (newer / "trainer_state.json").write_text(json.dumps({**state, "step": 9}))
    os.truncate(newer / "model.safetensors", 1000)
    with caplog.at_level(logging.WARNING, logger="sslvit.weights"):
        assert resolve(str(run)).path == old
        assert export_run(run) == run / "encoder"
    assert "step_00000009" in caplog.text and "truncated" in caplog.text
    assert load_file(str(run / "encoder" / "model.safetensors")).keys() == resolve(str(old)).state.keys()
    (old / "trainer_state.json").write_text("")  # now nothing is readable: one line naming both
    assert main(["export", str(run)]) == 2
    err = one_error_line(capsys)
    assert "step_00000009" in err and old.name in err and "empty" in err


# item 6: recipe values ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.num_heads=0", "model.num_heads=0 is a size"),
        ("model.depth=-2", "model.depth=-2"),
        ("model.depth=0", "model.depth=0"),
        ("model.embed_dim=-128", "model.embed_dim=-128"),
        ("objective.decoder_num_heads=0", "objective.decoder_num_heads=0"),
        ("train.seed=-1", "train.seed=-1 must be between 0 and 2**32 - 1"),
        ("train.seed=99999999999", "train.seed=99999999999"),
        ("model.img_size=100000", "GiB"),
    ],
)
def test_out_of_bounds_recipe_values_are_one_line_even_under_print_config(override, expected, capsys):
    assert main(["pretrain", "--recipe", "quickstart", "--print-config", "--set", override]) == 2
    assert expected in one_error_line(capsys)


def test_a_recipe_file_with_a_wrong_type_is_one_line(tmp_path, capsys):
    header = "from sslvit.recipe import Recipe, ModelConfig\nfrom sslvit.objectives.mae import MAEConfig\n"
    recipe = "RECIPE = Recipe(objective=MAEConfig(), model=ModelConfig({}))\n"
    (tmp_path / "typed.py").write_text(header + recipe.format('img_size="32"'))
    (tmp_path / "typo.py").write_text(header + recipe.format("imgsize=32"))
    assert main(["pretrain", "--recipe", str(tmp_path / "typed.py"), "--print-config"]) == 2
    assert "model.img_size holds '32' (str), not int" in one_error_line(capsys)
    assert main(["pretrain", "--recipe", str(tmp_path / "typo.py"), "--print-config"]) == 2
    assert "imgsize" in (err := one_error_line(capsys)) and "(line 3)" in err


# items 7 and 9: evaluation options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ["--temperature", "nan"],
        ["--temperature", "0"],
        ["--temperature", "-1"],
        ["--limit-train", "-5"],
        ["--batch-size", "0"],
        ["--img-size", "0"],
        ["--crop-pct", "-1"],
        ["--holdout", "1.5"],
        ["--json-out", "."],
    ],
)
def test_impossible_evaluation_options_are_refused_before_any_work(option, monkeypatch, capsys):
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("features were extracted"))
    assert guarded(run_knn, [*RANDOM_TINY, *DIGITS, *option]) == 2
    assert option[0] in one_error_line(capsys)


def test_default_k_is_clamped_to_a_small_train_set_and_a_plain_folder_takes_a_holdout(tmp_path, caplog):
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "plain" / f"c{c}").mkdir(parents=True)
        for i in range(10):
            image = (rng.integers(0, 60, (16, 16, 3)) + 80 * c).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / "plain" / f"c{c}" / f"{i}.png")
    out = tmp_path / "knn.json"
    argv = [*RANDOM_TINY, *DIGITS[2:], "--data", str(tmp_path / "plain"), "--json-out", str(out)]
    assert guarded(run_knn, argv) == 2  # no train/test splits: refused, as before
    with caplog.at_level(logging.WARNING, logger="sslvit.evaluation"):
        assert guarded(run_knn, [*argv, "--holdout", "0.2", "--seed", "0"]) == 0
    report = json.loads(out.read_text())
    assert (report["data"]["train_size"], report["data"]["test_size"]) == (24, 6)  # 2 of each class's 10 held out
    assert report["data"]["holdout"] == {"fraction": 0.2, "seed": 0}
    assert report["hyperparameters"]["k"] == [10, 20, 24] and "default --k 10 20 100 200" in caplog.text
    first = report["metrics"]
    assert guarded(run_knn, [*argv, "--holdout", "0.2", "--seed", "0"]) == 0
    assert json.loads(out.read_text())["metrics"] == first  # the seeded split is the same every time


# item 10: exports ------------------------------------------------------------------------------------------------


def test_hub_folder_carries_sslvit_provenance_and_keeps_foreign_files(mae_run, tmp_path, capsys):
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "README.md").write_text("my own notes\n")
    assert main(["export", str(mae_run), "--hub-dir", str(hub)]) == 2
    assert "README.md" in one_error_line(capsys) and (hub / "README.md").read_text() == "my own notes\n"
    old = os.umask(0o022)
    try:
        assert main(["export", str(mae_run), "--hub-dir", str(hub), "--force"]) == 0
    finally:
        os.umask(old)
    config, card = json.loads((hub / "config.json").read_text()), (hub / "README.md").read_text()
    assert config["pretrained_cfg"]["tag"] == "sslvit-mae" and "license" not in config["pretrained_cfg"]
    assert "augreg" not in json.dumps(config) and "license:" not in card and "apache" not in card
    assert {(hub / n).stat().st_mode & 0o777 for n in ("config.json", "model.safetensors", "README.md")} == {0o644}
    assert not any(p.name.startswith(".sslvit-hub") for p in hub.iterdir())
    # a folder sslvit wrote is rewritten without --force; a license only when given
    assert main(["export", str(mae_run), "--hub-dir", str(hub), "--license", "cc-by-4.0"]) == 0
    assert json.loads((hub / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"
    assert "license: cc-by-4.0" in (hub / "README.md").read_text()


def test_the_card_describes_local_data_without_its_absolute_path():
    from sslvit.export import describe_data

    assert describe_data("/home/me/data/imagenet/train") == "local files: imagenet/train"
    assert describe_data("digits") == "digits" and describe_data("uoft-cs/cifar10") == "uoft-cs/cifar10"
