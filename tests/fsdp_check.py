"""Two-process FSDP2 check, launched by tests/test_fsdp.py (not collected by pytest):

    accelerate launch --config_file recipes/accelerate/fsdp_cpu_2proc.yaml tests/fsdp_check.py OUT_DIR

With no GPU this runs two gloo processes on the CPU, and ``sslvit.accel.make_accelerator`` turns the config's FSDP
launch into FSDP2. One launch does three tiny DINO pretrainings on digits (imports cost more than the steps):

1. ``fsdp``: 3 steps sharded by the config (one FSDP unit per timm Block, student and teacher alike), checkpoints
   at steps 2 and 3, the teacher's attention maps and the online k-NN at step 3, the gathered teacher export;
2. ``ddp``: the same run with FSDP switched off: DDP, unsharded parameters (the 2-process path that
   tests/test_distributed.py checks against one process), the reference;
3. ``resumed``: a copy of run 1 without its step-3 checkpoint and export, resumed from the step-2 checkpoint.

After every step each rank records its local loss, the DINO centre, the L2 norm of every full (gathered) teacher
parameter and how the student and teacher parameters are stored (DTensor placements, local and full sizes), and
writes them to ``OUT_DIR/rank{R}.json``; test_fsdp.py compares the runs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate.state import AcceleratorState, GradientState, PartialState
from torch.distributed.tensor import DTensor

from sslvit.accel import plain_tensor
from sslvit.objectives import DINO, OBJECTIVES
from sslvit.train import pretrain
from tests.conftest import tiny_recipe
from tests.test_dino import TINY_DINO

SETTINGS = [
    *TINY_DINO,
    "train.max_steps=3",
    "train.checkpoint_every=2",
    "train.global_batch_size=16",
    "train.batch_size_per_device=8",
    "log.image_every=3",  # the teacher's attention maps at the end: forwards outside the training step
    "log.num_images=2",
    "eval.knn_every=3",
    "eval.limit_train=200",
    "eval.limit_test=100",
    "optim.base_lr=0.01",  # with a faster teacher than the recipe's: the EMA moves it visibly in 3 steps
    "objective.momentum_teacher=0.9",
]


def storage(params: list[torch.Tensor]) -> dict[str, Any]:
    """How parameters are held: how many are DTensors, their placements, local and full element counts."""
    dtensors = [p for p in params if isinstance(p, DTensor)]
    return {
        "params": len(params),
        "dtensors": len(dtensors),
        "placements": sorted({str(p.placements) for p in dtensors}),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
    }


class Recording(DINO):
    """DINO that records, after every optimisation step, what test_fsdp.py compares between the runs."""

    steps: list[dict[str, Any]] = []

    def after_step(self, progress):
        logged = super().after_step(progress)
        teacher = [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]
        student = [*self.student_backbone.parameters(), *self.student_head.parameters()]
        type(self).steps.append(
            {
                "step": progress.step,
                "loss": self.last_loss,
                "center": self.dino_loss.center.flatten().tolist(),
                "teacher_norms": [float(plain_tensor(p.detach()).norm()) for p in teacher],  # collective if sharded
                "student": storage(student),
                "teacher": storage(teacher),
                "same_placements": [str(getattr(t, "placements", None)) for t in teacher]
                == [str(getattr(s, "placements", None)) for s in student],
            }
        )
        return logged

    def forward(self, batch):
        out = super().forward(batch)
        self.last_loss = float(out["loss"].detach())
        return out


def run(name: str, out_dir: Path, fsdp: bool) -> list[dict[str, Any]]:
    """One pretraining in this process pair; Accelerate's process-wide state is reset first, as for a new launch.

    The gloo group stays (``PartialState`` joins an initialised one): the runs share one rendezvous.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    os.environ["ACCELERATE_USE_FSDP"] = "true" if fsdp else "false"
    Recording.steps = []
    pretrain(tiny_recipe("quickstart_dino", *SETTINGS), out_dir / name)
    return Recording.steps


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "launch with recipes/accelerate/fsdp_cpu_2proc.yaml"
    OBJECTIVES["dino"] = Recording
    PartialState.destroy_process_group = lambda self, group=None: None  # pretrain's end would destroy it
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # the log lines test_fsdp.py reads
    records = {"fsdp": run("fsdp", out_dir, fsdp=True)}
    if rank == 0:
        shutil.copytree(out_dir / "fsdp", out_dir / "resumed")
        shutil.rmtree(out_dir / "resumed" / "checkpoints" / "step_00000003")
        shutil.rmtree(out_dir / "resumed" / "encoder")
    dist.barrier()
    records["ddp"] = run("ddp", out_dir, fsdp=False)
    records["resumed"] = run("resumed", out_dir, fsdp=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()
    print(f"fsdp_check: ok (rank {rank})", flush=True)
