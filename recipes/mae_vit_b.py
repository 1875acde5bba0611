"""MAE ViT-B/16 pretraining on ImageNet-1k: the official recipe.

Reproduces: He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022), Table 1 / PRETRAIN.md
of facebookresearch/mae (commit efb2a8062c206524e35e47d04501ed4f544c0ae8): main_pretrain.py with
``--model mae_vit_base_patch16 --norm_pix_loss --mask_ratio 0.75 --epochs 800 --warmup_epochs 40
--blr 1.5e-4 --weight_decay 0.05``, effective batch 4096 (64 per GPU x 64 V100s), AdamW betas (0.9, 0.95),
half-cycle cosine lr per iteration to 0, RandomResizedCrop(224, scale 0.2-1, bicubic) + horizontal flip,
decoder 8 blocks x 512 wide x 16 heads, fixed 2-D sin-cos position embeddings.
Hardware: 64 V100-32GB for the paper; here any number of GPUs, gradient accumulation makes up the 4096.
Expected: 83.6% top-1 after MAE fine-tuning (paper, ViT-B, 1600 epochs; 800 epochs is within ~0.5%).
Deviations: bf16 autocast instead of fp16 + loss scaler (set train.precision=fp16 for the original);
the class and mask tokens get no weight decay (see sslvit/objectives/mae.py).

Launch:
    accelerate launch pretrain.py --recipe mae_vit_b --set data.path=/data/imagenet/train
"""

from sslvit.objectives.mae import MAEConfig
from sslvit.recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, TrainConfig

RECIPE = Recipe(
    objective=MAEConfig(
        mask_ratio=0.75, norm_pix_loss=True, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
        min_crop_scale=0.2,
    ),
    model=ModelConfig(name="vit_base_patch16_224", img_size=224, patch_size=16, drop_path_rate=0.0),
    data=DataConfig(path=""),  # required: --set data.path=...
    optim=OptimConfig(base_lr=1.5e-4, min_lr=0.0, weight_decay=0.05, betas=(0.9, 0.95), clip_grad=0.0),
    schedule=ScheduleConfig(epochs=800, warmup_epochs=40),
    train=TrainConfig(global_batch_size=4096, batch_size_per_device=64, precision="bf16", checkpoint_every=1000),
)  # fmt: skip
