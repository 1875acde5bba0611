"""DINO on CIFAR-10 for a CPU budget: quickstart_dino's 4-block, 128-wide ViT with 8 px patches. NOT an official recipe.

What it is: ``quickstart_dino``'s values (KoLeo 0.1, base lr 1e-3, no frozen last layer, 2 local crops of 16 px,
teacher temperature 0.02, momentum 0.98 -> 1, 1024-way head with a 512-wide MLP) on CIFAR-10 at batch 64 in
bf16, with DINO's own photometric augmentations (flip, blur, solarisation: natural images, unlike digits). Found by
measurement (docs/quality.md): on a CPU, images seen decide the k-NN, and 8 px patches (16 tokens) plus the
batched tensor views (``data.augment_on=auto``) make a DINO step ~3x cheaper per image than the 4 px ViT with PIL
views (~150-200 against ~55 images/s on one core); batch 32 for the same images gave no gain (35.5% vs 36.1%).
Hardware: a 2-core CPU, with ``train.budget_minutes`` (the schedule is fitted to the budget at start).
Measured (this project's 2-core Xeon, one pinned core, the other running other benchmarks): 1500 steps x 64
(595 s of training): CIFAR-10 k-NN 36.1% (CLS) against 27.9% for its random init (10k train bank / 2k test);
``--minutes 15`` (full 50k bank / 10k test): 2146 steps x 64, k-NN 42.0% against 28.8% at random init, linear
43.3%; on both cores with nothing else running 2366 steps, 42.0% (docs/quality.md "Fourth round").
``--minutes 60`` (2026-12-02, an AMD EPYC 2-core machine, one pinned core, the other running mae_cifar_cpu):
10667 steps x 64, k-NN 50.2% (CLS) / 40.7% (patch mean), linear 49.4%.

Launch:
    python pretrain.py --recipe dino_cifar_cpu --set data.path=../shared/data/cifar10 train.budget_minutes=15
"""

from dataclasses import replace

from sslvit.recipes.quickstart_dino import RECIPE as QUICKSTART_DINO

from sslvit.recipe import DataConfig, EvalConfig

RECIPE = replace(
    QUICKSTART_DINO,
    objective=replace(  # DINO's own views, pinned here: quickstart_dino drops some for grey digits
        QUICKSTART_DINO.objective, hflip_prob=0.5, blur_probs=(1.0, 0.1, 0.5), solarization_prob=0.2,
        teacher_temp=0.02, warmup_teacher_temp=0.02,
    ),
    data=DataConfig(path="", split="train", decode_cache_mb=256),  # CIFAR-10 decoded once: 147 MiB
    train=replace(QUICKSTART_DINO.train, global_batch_size=64, batch_size_per_device=64, precision="bf16",
                  checkpoint_every=1000),
    eval=EvalConfig(),  # the quickstart's online k-NN on digits does not apply
)  # fmt: skip
