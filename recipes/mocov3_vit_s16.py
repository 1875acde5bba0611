"""MoCo v3 ViT-S/16 pretraining on ImageNet-1k: the official 300-epoch ViT-Small run.

Reproduces: Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers" (ICCV 2021), the
"ViT-Small, 4-node (32-GPU) pre-training" command of facebookresearch/moco-v3 CONFIG.md (commit
38aae447f5e8f5a6221dbff0d8db40012512fe32): ``main_moco.py -a vit_small --optimizer=adamw --lr=1.5e-4
--weight-decay=.1 --epochs=300 --warmup-epochs=40 --stop-grad-conv1 --moco-m-cos --moco-t=.2``, every other value
the default of main_moco.py (commit 7074f47f0d1f59351c2f70a1ca697927c7bf9fb7): batch 4096 (CONFIG.md's table is
"batch 4096"), lr 1.5e-4 x batch / 256 with a linear warmup per iteration then a half cosine to 0, moco-m 0.99
(cosine to 1), moco-dim 256, moco-mlp-dim 4096, crop-min 0.08, torch's AdamW betas (0.9, 0.999), no gradient
clipping, no stochastic depth, 224 px BYOL-style views (blur 1.0 / 0.1, solarisation 0 / 0.2), fixed sin-cos
position embedding, frozen random patch projection.
Hardware: 32 V100 GPUs (4 nodes) in CONFIG.md, 128 images each; any number of GPUs here (accumulation makes 4096).
Expected: 73.2% linear top-1 on ImageNet (CONFIG.md's ViT-Small row, 300 epochs).
Deviations: bf16 autocast instead of fp16 + grad scaler; per-process BatchNorm; no weight decay on biases, norms and
tokens; see sslvit/objectives/mocov3.py for the rest.

Launch:
    accelerate launch pretrain.py --recipe mocov3_vit_s16 --set data.path=/data/imagenet/train
"""

from sslvit.objectives.mocov3 import MoCoV3Config
from sslvit.recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, TrainConfig

RECIPE = Recipe(
    objective=MoCoV3Config(
        out_dim=256, mlp_dim=4096, momentum=0.99, momentum_cosine=True, temperature=0.2, stop_grad_patch_embed=True,
        sincos_pos_embed=True, crop_size=224, crop_min_scale=0.08, optimizer="adamw",
    ),
    model=ModelConfig(name="vit_small_patch16_224", img_size=224, patch_size=16, drop_path_rate=0.0),
    data=DataConfig(path=""),  # required: --set data.path=...
    optim=OptimConfig(base_lr=1.5e-4, min_lr=0.0, warmup_start_lr=0.0, weight_decay=0.1, betas=(0.9, 0.999),
                      clip_grad=0.0),
    schedule=ScheduleConfig(epochs=300, warmup_epochs=40),
    train=TrainConfig(global_batch_size=4096, batch_size_per_device=128, precision="bf16", checkpoint_every=1000),
)  # fmt: skip
