"""iBOT ViT-S/16 pretraining on ImageNet-1k: the README's ViT-S/16 command of bytedance/ibot.

Reproduces: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer" (ICLR 2022), the command the README
of bytedance/ibot (commit 2cd42846b0d93b76848b5897eeff0d38c5bfef6d) gives for ViT-S/16 on two nodes of 8 GPUs:
``./run.sh imagenet_pretrain $JOB_NAME vit_small teacher 16 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
--norm_last_layer false --epochs 800 --batch_size_per_gpu 64 --shared_head true --out_dim 8192
--local_crops_number 10 --global_crops_scale 0.25 1 --local_crops_scale 0.05 0.25 --pred_ratio 0 0.3
--pred_ratio_var 0 0.2``. ``--shared_head true`` with main_ibot.py's default ``--shared_head_teacher true`` is one
head for the CLS and patch tokens in the student and the teacher: ``patch_head="shared"`` (not ``"shared_mlp"``,
main_ibot.py's own ``--shared_head`` default). Every other value is the default of main_ibot.py (commit
564f363d52830fecb416e472ca371e35ea1b5869): patch 16, warmup_teacher_temp 0.04, patch temperatures 0.04 -> 0.07,
student temp 0.1, centre momenta 0.9, momentum_teacher 0.996 (cosine to 1), freeze_last_layer 1 epoch,
lambda1 = lambda2 = 1, block masks with aspect ratio (0.3, 1/0.3) from epoch 0, lr 0.0005 x batch / 256 with 10
warmup epochs then cosine to min_lr 1e-6, weight decay cosine 0.04 -> 0.4, clip_grad 3.0, drop path 0.1, AdamW,
2 global crops 224 px + 10 local crops 96 px, batch 64 per GPU x 16 GPUs = 1024.
Hardware: 16 GPUs in the README; any number here (accumulation makes up 1024).
Expected: 75.2% k-NN, 77.9% linear probe and 82.3% fine-tuning top-1 on ImageNet (README).
Deviations: bf16 autocast instead of fp16 + grad scaler; global-norm gradient clipping; see
sslvit/objectives/ibot.py and dino.py for the rest.

Launch:
    accelerate launch pretrain.py --recipe ibot_vit_s16 --set data.path=/data/imagenet/train
"""

from sslvit.objectives.ibot import IBOTConfig
from sslvit.recipe import DataConfig, ModelConfig, OptimConfig, Recipe, ScheduleConfig, TrainConfig

RECIPE = Recipe(
    objective=IBOTConfig(
        out_dim=8192, patch_out_dim=None, patch_head="shared", hidden_dim=2048, bottleneck_dim=256,
        norm_last_layer=False, freeze_last_layer=1, momentum_teacher=0.996, warmup_teacher_temp=0.04,
        teacher_temp=0.07, warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07, warmup_teacher_temp_epochs=30,
        student_temp=0.1, center_momentum=0.9, lambda1=1.0, lambda2=1.0, pred_ratio=(0.0, 0.3),
        pred_ratio_var=(0.0, 0.2), pred_aspect_ratio=(0.3, 1 / 0.3), pred_shape="block", pred_start_epoch=0,
        global_crop_size=224, global_crops_scale=(0.25, 1.0), local_crop_size=96, local_crops_scale=(0.05, 0.25),
        local_crops_number=10,
    ),
    model=ModelConfig(name="vit_small_patch16_224", img_size=224, patch_size=16, drop_path_rate=0.1),
    data=DataConfig(path=""),  # required: --set data.path=...
    optim=OptimConfig(base_lr=5e-4, min_lr=1e-6, warmup_start_lr=0.0, weight_decay=0.04, weight_decay_end=0.4,
                      betas=(0.9, 0.999), clip_grad=3.0),
    schedule=ScheduleConfig(epochs=800, warmup_epochs=10),
    train=TrainConfig(global_batch_size=1024, batch_size_per_device=64, precision="bf16", checkpoint_every=1000),
)  # fmt: skip
