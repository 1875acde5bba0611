"""MAE on CIFAR-sized images (32 px): ViT-Tiny with 4 px patches. NOT an official MAE recipe.

What it is: the official ImageNet recipe (mae_vit_b) scaled to 32 px images: the same mask ratio (0.75),
norm_pix_loss, AdamW (0.9, 0.95), wd 0.05, base lr 1.5e-4 x batch / 256, per-step warmup + cosine, crop scale
0.2-1 + flip; a smaller decoder (4 blocks x 128 wide x 4 heads) for the 64-token grid, batch 512, 400 epochs
with 20 warmup. The values follow common CIFAR MAE reproductions; no published accuracy is claimed.
Hardware: one GPU (a few hours for 400 epochs); runs for a few steps on a laptop CPU.
Expected: a k-NN top-1 well above a random encoder's on CIFAR-10 after a few hundred epochs.

Launch:
    accelerate launch pretrain.py --recipe mae_vit_tiny_cifar --set data.path=../shared/data/cifar10
    python pretrain.py --recipe mae_vit_tiny_cifar --set data.path=../shared/data/cifar10 train.max_steps=20
"""

from dataclasses import replace

from sslvit.recipes.mae_vit_b import RECIPE as MAE_VIT_B

from sslvit.objectives.mae import MAEConfig
from sslvit.recipe import DataConfig, ModelConfig, ScheduleConfig, TrainConfig

RECIPE = replace(
    MAE_VIT_B,
    objective=MAEConfig(mask_ratio=0.75, norm_pix_loss=True, decoder_embed_dim=128, decoder_depth=4,
                        decoder_num_heads=4),
    model=ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4),
    data=DataConfig(path="", split="train", decode_cache_mb=256),  # CIFAR-10 decoded once: 147 MiB (BENCHMARKS.md)
    schedule=ScheduleConfig(epochs=400, warmup_epochs=20),
    train=TrainConfig(global_batch_size=512, batch_size_per_device=128, precision="bf16", checkpoint_every=500),
)  # fmt: skip
