"""DeiT's ImageNet training recipe, used to fine-tune a pretrained encoder (the base of finetune_deit_small_data).

Reproduces: Touvron et al., "Training data-efficient image transformers & distillation through attention"
(ICML 2021, https://arxiv.org/abs/2012.12877): the defaults of main.py in facebookresearch/deit (commit
100e3cd2a95d4375166952451b7d8ea59f6b9432): AdamW (eps 1e-8, default betas), lr 5e-4 x batch / 512, weight decay
0.05, 300 epochs, cosine to min lr 1e-5 after 5 warmup epochs from 1e-6, drop path 0.1, RandAugment
``rand-m9-mstd0.5-inc1`` with bicubic random-resized crops, random erasing 0.25 (pixel mode, 1 box), Mixup 0.8 /
CutMix 1.0 (probability 1, switch 0.5, per batch) with label smoothing 0.1, no gradient clipping, no layer decay,
and repeated augmentation x3 (samplers.py RASampler at 0c4b8f60bdbe6acb438bc7f4805a331ddd19e017, which is timm's
``RepeatAugSampler``). Its ``--color-jitter 0.4`` never acts: timm turns colour jitter off when RandAugment is on.
Hardware: DeiT-B on 2 nodes x 8 GPUs, 64 images each = global batch 1024 (README_deit.md); here any device count.
Expected: DeiT-B trained this way from random weights reaches 81.8% ImageNet top-1 (paper); a pretrained
encoder should start above that.
Deviations: the head reads the average of the patch tokens (``global_pool="avg"``, MAE's default), not DeiT's CLS
token, because an MAE encoder's CLS token is never trained (set ``global_pool=token`` for DeiT exactly); warmup and
cosine are per step, not per epoch; DeiT's model EMA (on by default, not what its paper reports) is not kept.

Launch:
    accelerate launch eval/finetune.py --recipe finetune_deit --encoder runs/mae_vit_b --data /data/imagenet \
        --set accum_steps=2
"""

from sslvit.evaluation.finetune import FinetuneConfig

RECIPE = FinetuneConfig(
    epochs=300, warmup_epochs=5.0, warmup_lr=1e-6, min_lr=1e-5,
    batch_size_per_device=64, accum_steps=1,
    base_lr=2.5e-4,  # per 256 images: DeiT's 5e-4 per 512
    weight_decay=0.05, layer_decay=1.0, betas=(0.9, 0.999), drop_path_rate=0.1, global_pool="avg",
    scale_min=0.08, hflip=0.5, auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, repeated_aug=3,
    mixup=0.8, cutmix=1.0, smoothing=0.1, clip_grad=0.0,
)  # fmt: skip
