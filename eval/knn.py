"""k-NN classification (DINO protocol) of a frozen encoder.

``accelerate launch eval/knn.py --encoder runs/mae_vit_b --data /data/imagenet``.

Also runs as plain ``python eval/knn.py ...`` (one process). All logic lives in :mod:`sslvit.evaluation`.
"""

import sys

from sslvit.cli import guarded
from sslvit.evaluation.cli import run_knn

if __name__ == "__main__":
    sys.exit(guarded(run_knn))
