"""The pretraining entry points under their first name; the code lives in :mod:`sslvit.training`.

Tests, benchmarks and the demo import ``pretrain``, ``build_objective``, ``make_optimizer``, ... from here.
"""

from sslvit.training.loop import optimisation_step
from sslvit.training.pretrain import _open_data, build_objective, make_optimizer, prefer_math_attention, pretrain
from sslvit.training.schedules import warmup_cosine
from sslvit.training.state import LoopCallback

__all__ = [
    "LoopCallback",
    "_open_data",
    "build_objective",
    "make_optimizer",
    "optimisation_step",
    "prefer_math_attention",
    "pretrain",
    "warmup_cosine",
]
