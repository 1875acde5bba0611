"""I-JEPA ViT-H/14 pretraining on ImageNet-1k: the official 300-epoch run.

Reproduces: Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture"
(CVPR 2023), facebookresearch/ijepa configs/in1k_vith14_ep300.yaml (commit 52c1ae95d05f743e000e8f10a1f3a79b10cff048):
vit_huge, patch 14, 224 px crops of scale (0.3, 1.0), no flip/colour/blur; 4 target blocks of scale (0.15, 0.2),
aspect (0.75, 1.5); 1 context block of scale (0.85, 1.0); min_keep 10; predictor depth 12, width 384; EMA
0.996 -> 1.0; AdamW (torch's betas), lr 2e-4 -> 1e-3 over 40 warmup epochs, cosine to 1e-6; weight decay cosine
0.04 -> 0.4; 300 epochs; bf16. Batch 128 per GPU; the config's log folder says "bs.2048" (16 GPUs): [1]'s lr is
absolute, so base_lr = 1e-3 x 256 / 2048 = 1.25e-4 gives it back at 2048 images.
Hardware: 16 A100 80GB in [1]; any number of GPUs here (accumulation makes 2048).
Expected: 79.3% linear top-1 on ImageNet (paper, Table 1, ViT-H/14, 300 epochs); not measured here.
Deviations: see sslvit/objectives/ijepa.py.

Launch:
    accelerate launch pretrain.py --recipe ijepa_vit_h14 --set data.path=/data/imagenet/train
"""

from sslvit.objectives.ijepa import IJEPAConfig
from sslvit.recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, TrainConfig

RECIPE = Recipe(
    objective=IJEPAConfig(
        predictor_embed_dim=384, predictor_depth=12, num_pred_masks=4, pred_mask_scale=(0.15, 0.2),
        aspect_ratio=(0.75, 1.5), num_enc_masks=1, enc_mask_scale=(0.85, 1.0), min_keep=10, allow_overlap=False,
        ema=(0.996, 1.0), crop_size=224, crop_scale=(0.3, 1.0), hflip_prob=0.0,
    ),
    model=ModelConfig(name="vit_huge_patch14_224", img_size=224, patch_size=14, drop_path_rate=0.0),
    data=DataConfig(path=""),  # required: --set data.path=...
    optim=OptimConfig(base_lr=1.25e-4, min_lr=1e-6, warmup_start_lr=2e-4, weight_decay=0.04, weight_decay_end=0.4,
                      betas=(0.9, 0.999), clip_grad=0.0),
    schedule=ScheduleConfig(epochs=300, warmup_epochs=40),
    train=TrainConfig(global_batch_size=2048, batch_size_per_device=128, precision="bf16", checkpoint_every=1000),
)  # fmt: skip
