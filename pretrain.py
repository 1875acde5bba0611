"""Pretrain a ViT encoder: ``accelerate launch pretrain.py --recipe mae_vit_b --set data.path=/data/train``.

Also runs as plain ``python pretrain.py ...`` (one process). All logic lives in :mod:`sslvit`.
"""

import sys

from sslvit.cli import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
