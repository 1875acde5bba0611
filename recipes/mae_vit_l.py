"""MAE ViT-L/16 pretraining on ImageNet-1k: the official recipe.

Reproduces: facebookresearch/mae PRETRAIN.md (commit efb2a8062c206524e35e47d04501ed4f544c0ae8), the example
command ``--model mae_vit_large_patch16 --norm_pix_loss --mask_ratio 0.75 --epochs 800 --warmup_epochs 40
--blr 1.5e-4 --weight_decay 0.05``, batch 4096. Everything else as mae_vit_b (the same decoder: 8 x 512 x 16).
Hardware: 64 V100-32GB in the paper.
Expected: 85.9% top-1 after fine-tuning for 1600 epochs (paper Table 3); ~85.4% at 800 epochs.

Launch:
    accelerate launch pretrain.py --recipe mae_vit_l --set data.path=/data/imagenet/train
"""

from dataclasses import replace

from sslvit.recipes.mae_vit_b import RECIPE as MAE_VIT_B

from sslvit.recipe import ModelConfig

RECIPE = replace(MAE_VIT_B, model=ModelConfig(name="vit_large_patch16_224", img_size=224, patch_size=16))
