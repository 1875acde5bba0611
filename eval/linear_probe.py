"""Linear probe (MAE or DINO protocol) of a frozen encoder.

``accelerate launch eval/linear_probe.py --encoder runs/mae_vit_b --data /data/imagenet --protocol mae``.

Also runs as plain ``python eval/linear_probe.py ...`` (one process). All logic lives in :mod:`sslvit.evaluation`.
"""

import sys

from sslvit.cli import guarded
from sslvit.evaluation.cli import run_linear_probe

if __name__ == "__main__":
    sys.exit(guarded(run_linear_probe))
