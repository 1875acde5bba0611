"""DINOv2-style ViT-S/14 pretraining on ImageNet-1k: facebookresearch/dinov2's default training config at ViT-S/14.

Reproduces the training of Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision" (2023) as
facebookresearch/dinov2 (commit b8931f7bf91576930313be2c6d6af376033b35f0) configures it, without its data
pipeline (LVD-142M curation) or FSDP: DINO's CLS-token loss + iBOT's masked-patch loss (one shared head) + KoLeo,
Sinkhorn-Knopp teacher targets. dinov2 has no ViT-S/14 training config (its released ViT-S/14 is distilled from
ViT-g/14), so the values are those of dinov2/configs/ssl_default_config.yaml (last changed in 9c7e324) with the
architecture of configs/eval/vits14_pretrain.yaml, each cited below; [default] = ssl_default_config.yaml.
- heads: 65536 prototypes, hidden 2048, bottleneck 256, 3 layers [default dino.head_*]; one head for CLS and
  patches [default ibot.separate_head: false]; the last layer's norms are trained (dinov2/layers/dino_head.py has
  no norm_last_layer): norm_last_layer=False; frozen for 1 epoch [default optim.freeze_last_layer_epochs].
- losses: dino.loss_weight 1, ibot.loss_weight 1, koleo_loss_weight 0.1 [default]; student temperature 0.1 (the
  DINOLoss / iBOTPatchLoss defaults, dinov2/loss/); teacher temperature 0.04 -> 0.07 over 30 epochs
  [default teacher.*], the same for the patches (dinov2 has one teacher temperature).
- centring: Sinkhorn-Knopp (train.centering: sinkhorn_knopp of configs/train/vitl14.yaml and vitg14.yaml, the
  configs of its released models; [default] says "centering", the EMA centre). Chosen because sslvit's EMA patch
  centre follows bytedance/ibot (all patches) where dinov2 centres the masked ones; with Sinkhorn-Knopp the patch
  targets are dinov2's own (tests/reference/test_dinov2_reference.py).
- masking: half of the global crops masked at a ratio in (0.1, 0.5) [default ibot.mask_sample_probability 0.5,
  mask_ratio_min_max (0.1, 0.5)]: pred_ratio (0, 0.3) +- (0, 0.2); block aspect ratio (0.3, 1/0.3)
  (dinov2/data/masking.py ``MaskingGenerator`` defaults).
- teacher momentum 0.992, cosine to 1 [default teacher.momentum_teacher, final_momentum_teacher].
- optimisation: 100 epochs, AdamW (0.9, 0.999), weight decay cosine 0.04 -> 0.4, lr 10 warmup epochs then cosine
  to min_lr 1e-6, gradient clipping 3.0 [default optim.*]; base_lr 0.004 per 1024 images, sqrt-scaled
  (scaling_rule sqrt_wrt_1024): 0.004 at the global batch 1024 set here (64 per GPU [default
  train.batch_size_per_gpu] x 16 GPUs), which sslvit's per-256 linear rule gives with base_lr 0.001.
- model: ViT-S/14 (configs/eval/vits14_pretrain.yaml: vit_small, patch 14) as timm's vit_small_patch14_dinov2,
  which has dinov2's LayerScale 1e-5 [default student.layerscale], biases and MLP, no registers; drop path 0.3
  [default student.drop_path_rate].
- crops: 2 global crops 224 px, scale (0.32, 1) [default crops.*]; 8 local crops, scale (0.05, 0.32) [default],
  98 px (configs/eval/vits14_pretrain.yaml and train/vitl14.yaml: 96 px is not a multiple of 14);
  dinov2/data/augmentations.py's colour jitter, grey and solarisation (DINO's), and its blur as it runs: its
  ``GaussianBlur`` hands ``1 - p`` to torchvision's ``RandomApply``, so the first global crop is never blurred, the
  second 90% of the time, local crops 50% (facebookresearch/dinov2 PR #411; kept as trained: dinov3 PR #342).
Deviations (values sslvit cannot express, or does differently):
- lr scaling: base_lr is per 256 images and linear; a different train.global_batch_size is not sqrt-scaled:
  for a global batch B set optim.base_lr = 0.004 * sqrt(B / 1024) * 256 / B.
- an "epoch" of dinov2 is 1250 iterations (train.OFFICIAL_EPOCH_LENGTH), here one pass over the data: at 1024 per
  step one ImageNet-1k pass is 1251 steps, so the schedules match; the README's "fast setup" (ViT-L/16, 32 GPUs,
  2048 per step) makes each dinov2 epoch two passes.
- no layer-wise lr decay (optim.layerwise_decay 0.9) and no patch-embedding lr multiplier (patch_embed_lr_mult
  0.2): sslvit's optimiser has neither knob. dinov2 decays the class token, position embedding and mask token;
  sslvit does not (biases, norms and LayerScale are undecayed on both).
- drop path: dinov2's is uniform over blocks (drop_path_uniform: true), timm's rises linearly to 0.3.
- gradients are clipped by their global norm, not per student module (backbone, head) as dinov2's train.py does.
- the last layer's gradients are dropped in the first epoch (DINO's way); dinov2 sets its lr to 0 instead, so its
  AdamW moments accumulate meanwhile.
- the teacher temperature warms up per epoch (DINO's), dinov2's per iteration.
- block masks: bytedance/ibot's generator (smallest block (16 // 3)^2 = 25 patches, fractional targets, a ratio
  drawn per crop) where dinov2's has blocks of 4 to 0.5 x 256 patches, integer targets and the ratios spread by
  ``linspace`` over exactly half the batch's crops.
- the blur is lightly's PIL Gaussian blur, sigma 0.1-2, not torchvision's with a 9 px kernel; timm's init and
  position-embedding resampling for the 98 px crops; bf16 autocast instead of fp16 + grad scaler.
Hardware: 16 GPUs (64 images each) as set; any number here (accumulation makes up 1024).
Expected: no published figure for this run (dinov2's ViT-S/14 figures are of the distilled model; its ViT-L/16
short run of the same default config reaches 81.6% k-NN / 82.9% linear on ImageNet-1k, README).

Launch:
    accelerate launch pretrain.py --recipe dinov2_vit_s14 --set data.path=/data/imagenet/train
"""

from sslvit.objectives.ibot import IBOTConfig
from sslvit.recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, TrainConfig

RECIPE = Recipe(
    objective=IBOTConfig(
        out_dim=65536, patch_out_dim=None, shared_head=True, hidden_dim=2048, bottleneck_dim=256,
        norm_last_layer=False, freeze_last_layer=1, momentum_teacher=0.992, warmup_teacher_temp=0.04,
        teacher_temp=0.07, warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07, warmup_teacher_temp_epochs=30,
        student_temp=0.1, centering="sinkhorn_knopp", koleo_weight=0.1, lambda1=1.0, lambda2=1.0,
        pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.2), pred_aspect_ratio=(0.3, 1 / 0.3), pred_shape="block",
        pred_start_epoch=0, global_crop_size=224, global_crops_scale=(0.32, 1.0), local_crop_size=98,
        local_crops_scale=(0.05, 0.32), local_crops_number=8, blur_probs=(0.0, 0.9, 0.5),
    ),
    model=ModelConfig(name="vit_small_patch14_dinov2", img_size=224, patch_size=14, drop_path_rate=0.3),
    data=DataConfig(path=""),  # required: --set data.path=...
    optim=OptimConfig(base_lr=1e-3, min_lr=1e-6, warmup_start_lr=0.0, weight_decay=0.04, weight_decay_end=0.4,
                      betas=(0.9, 0.999), clip_grad=3.0),
    schedule=ScheduleConfig(epochs=100, warmup_epochs=10),
    train=TrainConfig(global_batch_size=1024, batch_size_per_device=64, precision="bf16", checkpoint_every=1000),
)  # fmt: skip
