"""Routes out of a run: the export rewritten from the newest checkpoint, the Hub folder loads in timm, ONNX matches
PyTorch, no network is a clear error."""

from __future__ import annotations

import pytest
import timm
import torch

from sslvit.cli import main
from sslvit.errors import CheckpointError
from sslvit.export import export_onnx, export_run, push_to_hub, run_encoder
from sslvit.train import pretrain
from tests.conftest import tiny_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    pretrain(tiny_recipe("quickstart", "train.max_steps=1", "log.image_every=0"), run)
    (run / "eval").mkdir()
    (run / "eval" / "knn.json").write_text('{"metrics": {"top1": 0.5, "top5": 0.9}}')
    return run


def test_export_command_rewrites_the_encoder_from_the_newest_checkpoint(run, capsys):
    before = (run / "encoder" / "model.safetensors").read_bytes()
    assert main(["export", str(run)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert (run / "encoder" / "model.safetensors").read_bytes() == before
    assert not any(p.name.startswith(".tmp") for p in run.iterdir())


def test_export_of_a_folder_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        export_run(tmp_path)


def test_hub_dir_is_a_timm_loadable_folder_with_a_model_card(run, tmp_path, capsys):
    assert main(["export", str(run), "--hub-dir", str(tmp_path / "hub")]) == 0
    hub = tmp_path / "hub"
    assert {p.name for p in hub.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    card = (hub / "README.md").read_text()
    assert "quickstart" in card and "mae" in card and "top1=0.5" in card and "**Steps:** 1" in card
    loaded = timm.create_model(f"local-dir:{hub}", pretrained=True).eval()
    encoder, _ = run_encoder(run)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), encoder(images))


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(run, tmp_path):
    pytest.importorskip("onnxruntime")
    result = export_onnx(run, tmp_path / "encoder.onnx")
    assert result["max_abs_diff"] < 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": torch.randn(7, 3, 32, 32).numpy()})[0].shape == (7, 1 + 64, 64)


def test_pushing_without_network_says_so(run, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(run), "--hub-repo", "someone/encoder"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not push to the Hugging Face Hub repo someone/encoder") and "--hub-dir" in err
    with pytest.raises(Exception, match="--hub-dir"):
        push_to_hub(run, "someone/encoder")
