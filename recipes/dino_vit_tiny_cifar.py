"""DINO on CIFAR-sized images (32 px): ViT-Tiny with 4 px patches. NOT an official DINO recipe.

What it is: the official ViT-S/16 recipe (dino_vit_s16, facebookresearch/dino main_dino.py at commit
cc72fe982d650ff28e974d0f5a7c974fecb56209) scaled to 32 px images: 2 global crops of 32 px, scale (0.4, 1), and
8 local crops of 16 px, scale (0.05, 0.4), with DINO's photometric augmentations; the same optimiser and
schedules (AdamW (0.9, 0.999), base lr 5e-4 x batch / 256 with 10 warmup epochs then cosine to 1e-6, weight
decay 0.04 -> 0.4, clip 3.0, drop path 0.1), student temp 0.1, centre momentum 0.9, teacher temp 0.04 -> 0.07
over 30 epochs, momentum_teacher 0.996, last layer frozen for 1 epoch. Not official: a normalised last layer
(the stabler choice), out_dim 4096 instead of 65536 (the head would otherwise outweigh the 5.5M-parameter
backbone), batch 512, 200 epochs. No published accuracy is claimed.
Hardware: one GPU (several hours for 200 epochs); runs for a few steps on a laptop CPU.
Expected: a k-NN top-1 well above a random encoder's on CIFAR-10 after 100+ epochs.

Launch:
    accelerate launch pretrain.py --recipe dino_vit_tiny_cifar --set data.path=../shared/data/cifar10
    python pretrain.py --recipe dino_vit_tiny_cifar --set data.path=../shared/data/cifar10 train.max_steps=20
"""

from dataclasses import replace

from sslvit.recipes.dino_vit_s16 import RECIPE as DINO_VIT_S16

from sslvit.recipe import DataConfig, ModelConfig, ScheduleConfig, TrainConfig

RECIPE = replace(
    DINO_VIT_S16,
    objective=replace(
        DINO_VIT_S16.objective, out_dim=4096, norm_last_layer=True, global_crop_size=32, local_crop_size=16,
    ),
    model=ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, drop_path_rate=0.1),
    data=DataConfig(path="", split="train", decode_cache_mb=256),  # CIFAR-10 decoded once: 147 MiB (BENCHMARKS.md)
    schedule=ScheduleConfig(epochs=200, warmup_epochs=10),
    train=TrainConfig(global_batch_size=512, batch_size_per_device=128, precision="bf16", checkpoint_every=500),
)  # fmt: skip
