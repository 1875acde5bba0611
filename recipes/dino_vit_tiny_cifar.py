"""DINO on CIFAR-sized images (32 px) for small compute: ViT-Tiny, 4 px patches. NOT an official DINO recipe.

What it is: DINO (dino_vit_s16, facebookresearch/dino main_dino.py at cc72fe982d650ff28e974d0f5a7c974fecb56209)
changed where measurement said the scaled-down official values do not learn on a CPU-hour budget (docs/quality.md):
batch 128 instead of 512 (4x the steps), 4 local crops of 16 px instead of 8, a 1024-way head with a 512-wide
MLP instead of 4096/2048 (the head would outweigh the 5.5M-parameter backbone), DINOv2's KoLeo regulariser on the
student's features (weight 0.1: without it the features collapse and the teacher's targets go uniform), no frozen
last layer, teacher temperature 0.02 throughout, momentum 0.99 -> 1, base lr 1e-3. Kept from [DINO]: 2 global
crops of 32 px, scale (0.4, 1), local crops scale (0.05, 0.4), DINO's photometric augmentations, AdamW
(0.9, 0.999), weight decay 0.04 -> 0.4, clip 3.0, drop path 0.1, student temp 0.1, centre momentum 0.9,
5% warmup then cosine to 1e-6.
Hardware: a 2-core CPU for 15 minutes to a few hours (``train.budget_minutes``), or one GPU.
Expected: see BENCHMARKS.md "Quality per compute" for the measured k-NN at 15 minutes on this project's 2-core CPU.

Launch:
    python pretrain.py --recipe dino_vit_tiny_cifar --set data.path=../shared/data/cifar10 train.budget_minutes=15
    accelerate launch pretrain.py --recipe dino_vit_tiny_cifar --set data.path=../shared/data/cifar10
"""

from dataclasses import replace

from sslvit.recipes.dino_vit_s16 import RECIPE as DINO_VIT_S16

from sslvit.recipe import DataConfig, ModelConfig, ScheduleConfig, TrainConfig

RECIPE = replace(
    DINO_VIT_S16,
    objective=replace(
        DINO_VIT_S16.objective, out_dim=1024, hidden_dim=512, norm_last_layer=True, global_crop_size=32,
        local_crop_size=16, local_crops_number=4, freeze_last_layer=0, momentum_teacher=0.99,
        warmup_teacher_temp=0.02, teacher_temp=0.02, warmup_teacher_temp_epochs=0, koleo_weight=0.1,
    ),
    model=ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, drop_path_rate=0.1),
    data=DataConfig(path="", split="train", decode_cache_mb=256),  # CIFAR-10 decoded once: 147 MiB (BENCHMARKS.md)
    optim=replace(DINO_VIT_S16.optim, base_lr=1e-3),
    schedule=ScheduleConfig(epochs=100, warmup_epochs=5),
    train=TrainConfig(global_batch_size=128, batch_size_per_device=128, precision="bf16", checkpoint_every=500),
)  # fmt: skip
