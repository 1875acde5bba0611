"""DINO ViT-B/8 pretraining on ImageNet-1k: the released ViT-B/8 run.

Reproduces: the ViT-B/8 row of the facebookresearch/dino README table (commit
7064315296736d16ae72c08194e9beb0d4b1c0fa): 77.4% k-NN, 80.1% linear. Its arguments are the row's args.txt
(dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/args.txt, outside the git repository; not reachable from
here, read from its verbatim transcription in the DyT paper's DINO reproduction guide). It differs from
dino_vit_b16 by: patch 8, warmup_teacher_temp 0.03, 300 epochs, lr 0.0005 x batch / 256, clip_grad 3.0, and
6 images per GPU on 176 GPUs = a global batch of 1056. Unchanged: out_dim 65536, norm_last_layer true,
momentum_teacher 0.996, teacher temp -> 0.07 over 50 epochs, freeze_last_layer 3, 10 warmup epochs, min_lr 2e-6,
weight decay 0.04 -> 0.4, drop path 0.1, fp32, crops (0.25, 1) x 2 + (0.05, 0.25) x 10.
Hardware: 176 GPUs in the original; any number dividing 176 here (accumulation makes up 1056).
Expected: 77.4% k-NN and 80.1% linear top-1 on ImageNet (README table).
Deviations: global-norm gradient clipping (see sslvit/objectives/dino.py).

Launch:
    accelerate launch pretrain.py --recipe dino_vit_b8 --set data.path=/data/imagenet/train
"""

from dataclasses import replace

from sslvit.recipes.dino_vit_b16 import RECIPE as DINO_VIT_B16

from sslvit.recipe import ModelConfig, ScheduleConfig, TrainConfig

RECIPE = replace(
    DINO_VIT_B16,
    objective=replace(DINO_VIT_B16.objective, warmup_teacher_temp=0.03),
    model=ModelConfig(name="vit_base_patch8_224", img_size=224, patch_size=8, drop_path_rate=0.1),
    optim=replace(DINO_VIT_B16.optim, base_lr=5e-4, clip_grad=3.0),
    schedule=ScheduleConfig(epochs=300, warmup_epochs=10),
    train=TrainConfig(global_batch_size=1056, batch_size_per_device=6, precision="no", checkpoint_every=1000),
)
