"""FSDP2 through Accelerate on two CPU processes (gloo): sharded DINO trains exactly like unsharded DDP.

One launch of tests/fsdp_check.py with recipes/accelerate/fsdp_cpu_2proc.yaml runs three tiny DINO pretrainings
(sharded, DDP, sharded resumed from a checkpoint) and records every step; the tests compare the records and the
exports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_dino import _free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "recipes" / "accelerate" / "fsdp_cpu_2proc.yaml"


def _fsdp2_missing() -> str | None:
    """Why FSDP2 cannot run on this platform's CPU, or None."""
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available on this platform"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2)"
    return None


pytestmark = pytest.mark.skipif(_fsdp2_missing() is not None, reason=_fsdp2_missing() or "")


@pytest.fixture(scope="module")
def check(tmp_path_factory) -> tuple[Path, dict, dict, str]:
    """The launch's folder, the records of rank 0 and rank 1, and its log."""
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
           "--main_process_port", str(_free_port()), str(ROOT / "tests" / "fsdp_check.py"), str(out)]  # fmt: skip
    # CPU processes even on a GPU host: the point is gloo and make_accelerator's CPU promotion
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    errors = [line for line in log.splitlines() if "Error" in line or "error:" in line]
    assert result.returncode == 0, "\n".join(errors[:30]) + result.stderr[-2000:]
    assert result.stdout.count("fsdp_check: ok") == 2, result.stdout[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks[0], ranks[1], log


def test_student_and_teacher_are_sharded_alike_per_block(check):
    _, *ranks, _ = check
    for records in ranks:
        for step in records["fsdp"] + records["resumed"]:
            for model in ("student", "teacher"):
                held = step[model]
                assert held["dtensors"] == held["params"] > 30, held  # every parameter is a shard
                assert held["placements"] == ["(Shard(dim=0),)"]
                assert held["local_numel"] < 0.6 * held["full_numel"]
            assert step["same_placements"]  # the EMA pairs shards that hold the same rows
        assert all(step["student"]["dtensors"] == 0 for step in records["ddp"])
    full = ranks[0]["fsdp"][0]["student"]["full_numel"]
    assert sum(r["fsdp"][0]["student"]["local_numel"] for r in ranks) == full  # the two halves make the whole


def test_sharded_training_equals_unsharded_ddp(check):
    _, *ranks, _ = check
    for records in ranks:
        fsdp, ddp = records["fsdp"], records["ddp"]
        assert [s["step"] for s in fsdp] == [s["step"] for s in ddp] == [0, 1, 2]
        for name in ("loss", "center", "teacher_norms"):  # float32 rounding of reduce-scatter vs all-reduce at most
            np.testing.assert_allclose([s[name] for s in fsdp], [s[name] for s in ddp], rtol=1e-5, atol=1e-7)
        norms = np.array([s["teacher_norms"] for s in fsdp])
        assert np.abs(norms[2] - norms[0]).max() > 1e-4  # the EMA moved the (sharded) teacher
    assert ranks[0]["fsdp"][2]["loss"] != ranks[1]["fsdp"][2]["loss"]  # the ranks saw different images
    # the centre is all-reduced: one value on both ranks, and it moved
    centres = [np.array([s["center"] for s in r["fsdp"]]) for r in ranks]
    np.testing.assert_array_equal(centres[0], centres[1])
    assert np.abs(centres[0][-1]).sum() > 0


def test_images_and_knn_run_on_the_sharded_model_and_match_ddp(check):
    out, *_, log = check
    knn = [line for line in log.splitlines() if "step 3: k-NN" in line]
    assert len(knn) == 3 and len(set(knn)) == 1, knn  # fsdp, ddp, resumed: the same top-1 and top-5
    pngs = []
    for run in ("fsdp", "ddp"):
        events = EventAccumulator(str(out / run / "tensorboard"), size_guidance={"images": 0}).Reload()
        pngs.append([image.encoded_image_string for image in events.Images("dino/teacher_attention")])
    assert len(pngs[0]) == 1 and pngs[0] == pngs[1]  # the teacher's attention maps at step 3, as under DDP


def test_a_sharded_checkpoint_resumes_exactly(check):
    out, *ranks, log = check
    checkpoint = out / "fsdp" / "checkpoints" / "step_00000002"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: one file per rank
        assert sorted(p.name for p in (checkpoint / folder).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert f"resuming from {out / 'resumed' / 'checkpoints' / 'step_00000002'} (step 2)" in log
    for records in ranks:
        assert [s["step"] for s in records["resumed"]] == [2]
        assert records["resumed"][0] == records["fsdp"][2]  # bit-identical: loss, centre, teacher


def test_the_export_is_the_gathered_teacher_and_loads_into_timm(check):
    out, rank0, _, _ = check
    model = timm.create_model(f"local-dir:{out / 'fsdp' / 'encoder'}", pretrained=True)  # strict load
    exported = model.state_dict()
    assert exported["pos_embed"].shape == (1, 65, 64) and exported["blocks.1.mlp.fc1.weight"].shape == (256, 64)
    reference = load_file(out / "ddp" / "encoder" / "model.safetensors")
    assert exported.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(exported[key], value, rtol=1e-5, atol=1e-7)
    # the teacher's backbone comes first among the recorded teacher parameters: the final step's full norms
    norms = [float(p.detach().norm()) for p in model.parameters()]
    np.testing.assert_allclose(norms, rank0["fsdp"][-1]["teacher_norms"][: len(norms)], rtol=1e-6)
    resumed = load_file(out / "resumed" / "encoder" / "model.safetensors")
    assert all(torch.equal(resumed[key], value) for key, value in exported.items())
