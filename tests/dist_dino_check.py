"""Two-process DINO check, launched by tests/test_dino.py (not collected by pytest):

    accelerate launch --multi_gpu --num_processes 2 tests/dist_dino_check.py OUT_DIR

With no GPU this runs two gloo processes on the CPU. Each rank (1) runs ``sslvit.train.pretrain`` for a few steps
of a tiny DINO on digits (different images on each rank), then checks through ``torch.distributed`` that every
rank holds the same centre and the same teacher weights; and (2) feeds rank-specific teacher outputs to the
loss and checks the centre equals the official formula over the teacher outputs of *both* ranks.
Prints ``dist_dino_check: ok`` on each rank that passed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from sslvit.objectives import DINO, OBJECTIVES, Progress
from sslvit.train import pretrain
from tests.conftest import tiny_recipe
from tests.test_dino import CFG, TINY_DINO, make_dino, official_dino_loss


def all_equal(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


class CompareAcrossRanks(DINO):
    """DINO that, after every optimisation step, compares its centre and teacher with the other ranks'."""

    steps: list[tuple[bool, bool, bool]] = []  # (world size 2, same centre, same teacher) per step

    def after_step(self, progress):
        logged = super().after_step(progress)
        teacher = [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]
        center = self.dino_loss.center.flatten()
        same_teacher = all_equal(torch.cat([p.detach().flatten() for p in teacher]))
        type(self).steps.append(
            (dist.get_world_size() == 2, all_equal(center) and center.abs().sum() > 0, same_teacher)
        )
        return logged


def check_training_agrees(out_dir: Path) -> None:
    OBJECTIVES["dino"] = CompareAcrossRanks
    recipe = tiny_recipe(
        "quickstart_dino",
        *TINY_DINO,
        "train.max_steps=3",
        "log.image_every=0",
        "train.global_batch_size=16",
        "train.batch_size_per_device=8",
    )
    pretrain(recipe, out_dir)  # ends by destroying its process group
    assert CompareAcrossRanks.steps == [(True, True, True)] * 3, (
        f"(2 ranks, centre, teacher): {CompareAcrossRanks.steps}"
    )


def check_centre_formula() -> None:
    rank, world, batch, crops, k = dist.get_rank(), dist.get_world_size(), 4, 2 + CFG.local_crops_number, CFG.out_dim
    outputs = []
    for r in range(world):  # every rank can rebuild every rank's outputs from the seed
        generator = torch.Generator().manual_seed(100 + r)
        outputs.append(
            (torch.randn(crops * batch, k, generator=generator), torch.randn(2 * batch, k, generator=generator))
        )
    dino = make_dino()
    student, teacher = outputs[rank]
    loss = dino.compute_loss(student, teacher)
    expected_loss, expected_center = official_dino_loss(
        student, teacher, torch.zeros(1, k), crops, dino.teacher_temp, all_teacher_outputs=[t for _, t in outputs]
    )
    torch.testing.assert_close(loss, expected_loss)
    dino.after_step(Progress(step=0, total_steps=10, epochs=1))  # the centre moves after the optimizer step
    torch.testing.assert_close(dino.dino_loss.center.view(1, k), expected_center)
    local_only = official_dino_loss(student, teacher, torch.zeros(1, k), crops, dino.teacher_temp)[1]
    assert not torch.allclose(local_only, expected_center), "the ranks' batches must differ for this check to bite"


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    check_training_agrees(out_dir)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir / 'process_group'}",
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    check_centre_formula()
    dist.barrier()
    print(f"dist_dino_check: ok (rank {dist.get_rank()})", flush=True)
    dist.destroy_process_group()
