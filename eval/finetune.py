"""Full fine-tuning (MAE protocol) of an encoder; run again to resume.

``accelerate launch eval/finetune.py --encoder runs/mae_vit_b --data /data/imagenet --set epochs=100``.

Also runs as plain ``python eval/finetune.py ...`` (one process). All logic lives in :mod:`sslvit.evaluation`.
"""

import sys

from sslvit.cli import guarded
from sslvit.evaluation.cli import run_finetune

if __name__ == "__main__":
    sys.exit(guarded(run_finetune))
