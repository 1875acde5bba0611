"""iBOT on CIFAR-10 for a CPU budget: quickstart_ibot's 4-block, 128-wide ViT with 8 px patches. NOT an official recipe.

What it is: ``quickstart_ibot`` (DINO's CLS loss + bytedance/ibot's masked-patch loss, one shared 1024-way head,
half of the global crops block-masked at 0.1-0.5, KoLeo 0.1, base lr 1e-3, momentum 0.99 -> 1, 2 local crops of
16 px, DINO's own views) on CIFAR-10 in bf16 with the decode cache: the iBOT counterpart of ``dino_cifar_cpu``
(the same backbone and batch). Not tuned for iBOT on its own. iBOT makes its views with PIL (its masks are drawn
with the views; there is no tensor path), so a step costs more per image than ``dino_cifar_cpu``'s.
Hardware: a 2-core CPU, with ``train.budget_minutes``.
Measured (this project's 2-core Xeon, one pinned core, the other running another benchmark; 10k bank / 2k test):
300 steps x 64 (226 s of training): CIFAR-10 k-NN 29.3% against 27.9% at random init (``dino_cifar_cpu`` at the
same steps: 30.6% in 140 s). Not measured at a 15-minute budget.

Launch:
    python pretrain.py --recipe ibot_cifar_cpu --set data.path=../shared/data/cifar10 train.budget_minutes=15
"""

from dataclasses import replace

from sslvit.recipes.quickstart_ibot import RECIPE as QUICKSTART_IBOT

from sslvit.recipe import DataConfig, EvalConfig

RECIPE = replace(
    QUICKSTART_IBOT,
    data=DataConfig(path="", split="train", decode_cache_mb=256),  # CIFAR-10 decoded once: 147 MiB
    train=replace(QUICKSTART_IBOT.train, precision="bf16", checkpoint_every=1000),
    eval=EvalConfig(),  # the quickstart's online k-NN on digits does not apply
)
