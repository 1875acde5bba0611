"""Quickstart: MAE on the built-in digits data with a tiny ViT, in about a minute on a laptop CPU.

What it is: what ``make demo`` runs, to show the whole path (data -> pretraining -> TensorBoard -> export)
without downloading anything. scikit-learn's 8x8 digits (1437 train images) upsampled to 32 px; a 4-block,
128-wide ViT with 4 px patches; MAE with the official mask ratio and loss, a larger base lr. Not a benchmark.
Hardware: 2 CPU cores. Expected: the MAE loss falls from ~1.0 to ~0.5 in 30 epochs.

Launch:
    python pretrain.py --recipe quickstart
"""

from dataclasses import replace

from sslvit.recipes.mae_vit_b import RECIPE as MAE_VIT_B

from sslvit.objectives.mae import MAEConfig
from sslvit.recipe import DataConfig, EvalConfig, LogConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig

RECIPE = replace(
    MAE_VIT_B,
    objective=MAEConfig(mask_ratio=0.75, norm_pix_loss=True, decoder_embed_dim=64, decoder_depth=2,
                        decoder_num_heads=4),
    model=ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=128,
                      num_heads=4),
    data=DataConfig(path="digits", num_workers=0),
    # 10x the official base lr: at batch 64 the official 1.5e-4 x 64 / 256 barely moves a tiny model in 30 epochs.
    optim=OptimConfig(base_lr=1.5e-3, weight_decay=0.05, betas=(0.9, 0.95)),
    schedule=ScheduleConfig(epochs=30, warmup_epochs=3),
    train=TrainConfig(global_batch_size=64, batch_size_per_device=64, precision="no", checkpoint_every=200),
    log=LogConfig(every=10, image_every=100),
    eval=EvalConfig(knn_every=220, data="digits", limit_train=1437, limit_test=360),  # online k-NN, all of digits
)  # fmt: skip
