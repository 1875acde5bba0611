"""MAE ViT-H/14 pretraining on ImageNet-1k: the official recipe.

Reproduces: facebookresearch/mae PRETRAIN.md (commit efb2a8062c206524e35e47d04501ed4f544c0ae8) with
``--model mae_vit_huge_patch14`` (embed 1280, depth 32, 16 heads, patch 14) and the same hyperparameters as
ViT-B/L: mask 0.75, norm_pix_loss, 800 epochs, 40 warmup, blr 1.5e-4, wd 0.05, batch 4096, decoder 8 x 512 x 16.
Hardware: 128 TPU-v3 cores in the paper.
Expected: 86.9% top-1 after fine-tuning at 224 px (paper Table 3, 1600 epochs).

Launch:
    accelerate launch pretrain.py --recipe mae_vit_h --set data.path=/data/imagenet/train
"""

from dataclasses import replace

from sslvit.recipes.mae_vit_b import RECIPE as MAE_VIT_B

from sslvit.recipe import ModelConfig

RECIPE = replace(MAE_VIT_B, model=ModelConfig(name="vit_huge_patch14_224", img_size=224, patch_size=14))
