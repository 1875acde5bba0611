"""Mean attention distance per head and layer (the ViT paper's Figure 7) and class-token attention maps.

``python eval/attention_distance.py --encoder runs/quickstart --data digits`` writes a JSON table, a PNG plot
(layer on x, distance on y, one dot per head), a PNG of attention maps and TensorBoard scalars/images.
All logic lives in :mod:`sslvit.evaluation.attention`.
"""

import sys

from sslvit.cli import guarded
from sslvit.evaluation.attention import run_attention_distance

if __name__ == "__main__":
    sys.exit(guarded(run_attention_distance))
