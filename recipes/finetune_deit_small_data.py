"""DeiT-style fine-tuning for small labelled sets (a few thousand images): finetune_deit, longer.

What it is: DeiT's recipe (finetune_deit: RandAugment, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, repeated
augmentation x3, random erasing 0.25, drop path 0.1, AdamW, warmup from 1e-6, cosine to 1e-5) with two changes,
one from DeiT's authors for small sets and one for few steps per epoch:
- 1000 epochs instead of 300: DeiT's and DINO's fine-tuning on CIFAR-10/100 and Stanford Cars (H. Touvron in
  https://github.com/facebookresearch/deit/issues/45#issuecomment-765213622 and
  https://github.com/facebookresearch/dino/issues/81, /144: batch 768, 1000 epochs, 5 warmup epochs from 1e-6,
  AdamW with DeiT's weight decay 0.05, repeated augmentation, RandAugment, Mixup/CutMix, drop path 0.1).
- a warmup of at least 500 steps: 5 epochs of a few thousand images are ~100 steps; 500 warmup steps is what
  ViT's own fine-tuning uses for every dataset (google-research/vision_transformer, vit_jax/configs/common.py at
  0f6b288d5704b4975325c840be803ace8a42e40b, ``warmup_steps = 500``).
Not taken from those threads: their lr (7.5e-6 / 5e-6 at batch 768, for a ViT-B at 224 px pretrained on all of
ImageNet; at batch 64 that is ~1e-6). It stays DeiT's 5e-4 per 512, a judgement (not measured here) that a small
encoder pretrained on the user's own images must move further; for an ImageNet ViT-B use --set base_lr=3.75e-6.
Hardware: one GPU, or a CPU for 32 px images. Expected: no full-length result yet. Cut to 10 epochs on the
built-in digits with the quickstart encoder it reaches 43.6% top-1 (MAE's protocol cut alike: 47.8%; README):
both recipes are built for hundreds of epochs, and 10 leave the loss near chance.

Launch:
    python eval/finetune.py --recipe finetune_deit_small_data --encoder runs/quickstart --data digits \
        --set hflip=0 scale_min=0.5
"""

from dataclasses import replace

from sslvit.recipes.finetune_deit import RECIPE as FINETUNE_DEIT

RECIPE = replace(FINETUNE_DEIT, epochs=1000, min_warmup_steps=500)
