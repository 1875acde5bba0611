"""THE one path for encoder weights: where they live, how they are read, how a timm model is built from them.

- :mod:`~sslvit.weights.run`: a run folder as one object (:class:`RunFolder`) and the checkpoint layout;
- :mod:`~sslvit.weights.sources`: the one resolver (:func:`resolve`): run folder, export, checkpoint, weights file
  or timm name + file -> :class:`EncoderWeights` (tensors in timm's key names + the recorded architecture);
- :mod:`~sslvit.weights.fit`: the one builder (:func:`build_model`) and fit (:func:`fit_state_dict`, which
  resamples position embeddings and the patch kernel);
- :mod:`~sslvit.weights.model_init`: continued pretraining (``model.init``).

Arrows: this package sits below ``train``, ``checkpoint``, ``export`` and ``evaluation`` and knows no objective.
"""

from sslvit.weights.fit import Fit, build_model, create_model, fit_state_dict, resample_pos_embed
from sslvit.weights.model_init import describe_init, init_weights
from sslvit.weights.run import RunFolder, latest_checkpoint, read_trainer_state
from sslvit.weights.sources import EncoderWeights, file_sha256, read_run, resolve, share_by_umask, state_sha256

__all__ = [
    "EncoderWeights",
    "Fit",
    "RunFolder",
    "build_model",
    "create_model",
    "describe_init",
    "file_sha256",
    "fit_state_dict",
    "init_weights",
    "latest_checkpoint",
    "read_run",
    "read_trainer_state",
    "resample_pos_embed",
    "resolve",
    "share_by_umask",
    "state_sha256",
]
