"""MAE on CIFAR-10 for a CPU budget: a 4-block, 128-wide ViT with 4 px patches. NOT an official MAE recipe.

What it is: MAE (mask ratio 0.75, norm_pix_loss, AdamW (0.9, 0.95), wd 0.05, per-step warmup + cosine, crop scale
0.2-1 + flip: the official recipe's method) with the quickstart's small shapes instead of ViT-Tiny: encoder 4 x 128
(4 heads), decoder 2 x 64, batch 64, base lr 1.5e-3 (10x official), bf16. Found by measurement (docs/quality.md):
at a CPU budget the number of images seen decides the k-NN, and this ViT is ~5x cheaper per image than
``mae_vit_tiny_cifar`` (263 vs ~50 images/s on one core), so 15 minutes buy 4.3 epochs instead of ~1.
Hardware: a 2-core CPU, with ``train.budget_minutes`` (the schedule is fitted to the budget at start).
Measured (this project's 2-core Xeon, ONE pinned core, the other busy with tests; benchmarks/quality.py
--minutes 15, full 50k bank / 10k test): 3390 steps x 64 in 860 s, CIFAR-10 k-NN 44.05% (CLS) / 45.96% (mean of
patch tokens), linear 49.8%, against 29.6% / 29.3% / 34.9% for the same ViT at random init. ``--minutes 60``
(2026-12-02, an AMD EPYC 2-core machine, one pinned core, the other running dino_cifar_cpu): 22688 steps x 64,
k-NN 48.0% (CLS) / 47.0% (patch mean), linear 55.0%.

Launch:
    python pretrain.py --recipe mae_cifar_cpu --set data.path=../shared/data/cifar10 train.budget_minutes=15
"""

from dataclasses import replace

from sslvit.recipes.quickstart import RECIPE as QUICKSTART

from sslvit.recipe import DataConfig, EvalConfig

RECIPE = replace(
    QUICKSTART,
    data=DataConfig(path="", split="train", decode_cache_mb=256, num_workers=1),  # CIFAR-10 decoded once: 147 MiB
    train=replace(QUICKSTART.train, precision="bf16", checkpoint_every=1000),
    eval=EvalConfig(),  # the quickstart's online k-NN on digits does not apply
)
