"""MAE's end-to-end fine-tuning protocol: the default recipe of ``sslvit finetune``.

Reproduces: He et al., "Masked Autoencoders Are Scalable Vision Learners" (CVPR 2022), A.1 and FINETUNE.md of
facebookresearch/mae (commit 6a2ba402291005b003a70e99f7c87d1a2c376b0d): main_finetune.py with ``--blr 5e-4
--layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 --cutmix 1.0 --epochs 100``,
5 warmup epochs, AdamW betas (0.9, 0.999), label smoothing 0.1, RandAugment ``rand-m9-mstd0.5-inc1``, global
average pooling with ``fc_norm``; lr = blr x global batch / 256 (base_lr here), global batch 1024.
Hardware: 32 V100s in the paper; here ``accum_steps`` makes up the 1024 on fewer devices.
Expected: 83.6% ImageNet top-1 for ViT-B/16 after 1600 pretraining epochs (paper, Table 3).
Deviations: the warmup and cosine are per step (MAE: per step too, fractional epochs); no EMA (MAE: none).

Launch:
    accelerate launch eval/finetune.py --recipe finetune_mae --encoder runs/mae_vit_b --data /data/imagenet \
        --set accum_steps=2
"""

from sslvit.evaluation.finetune import FinetuneConfig

RECIPE = FinetuneConfig()  # FinetuneConfig's defaults are MAE's ViT-B protocol; layer_decay=0.75 for ViT-L/H
