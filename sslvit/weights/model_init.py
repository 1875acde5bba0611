"""Continued pretraining (``model.init``): a fresh run starts its encoder, and every copy of it, from saved weights.

The weights come through the one resolver (:func:`sslvit.weights.sources.resolve`) and the one fit
(:func:`sslvit.weights.fit.fit_state_dict`); the log and every checkpoint's ``trainer_state.json`` say what was
loaded, resampled, copied into an EMA teacher, newly initialised and ignored.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch

from sslvit.errors import CheckpointError
from sslvit.weights.fit import fit_state_dict, shape_hint
from sslvit.weights.sources import DROPPED_PREFIXES, resolve


def init_weights(spec: str, encoder: torch.nn.Module, owner: torch.nn.Module) -> dict[str, Any]:
    """Start ``encoder``, and every copy of it inside ``owner`` (an EMA teacher), from the weights ``spec`` names.

    Call it once the objective (``owner``) is built: an objective may re-initialise the encoder it wraps (lightly's
    MAE wrapper does), and a copy of the encoder is recognised by being equal to it right after construction.
    The objective's own parts (MAE decoder, DINO heads) stay newly initialised.

    Returns:
        A JSON-friendly record: ``spec``, ``path``, ``kind``, ``sha256``, ``loaded``, ``resampled``, ``copied_to``,
        ``new`` (the objective's tensors not from the source) and ``ignored`` (the source's tensors not used).

    Raises:
        CheckpointError: the spec names nothing loadable, or its weights do not fit the encoder.
    """
    try:
        weights = resolve(spec, key="model.init")
    except CheckpointError as err:  # say which recipe field named the file
        raise CheckpointError(str(err) if str(err).startswith("model.init") else f"model.init={spec}: {err}") from err
    copies = [m for m in owner.modules() if m is not encoder and _is_copy(m, encoder)]
    target = f"the recipe's model{shape_hint(encoder.state_dict())}"
    fit = fit_state_dict(encoder, weights.state, f"model.init={spec}", target, ignore_ok=DROPPED_PREFIXES)
    for module in copies:
        module.load_state_dict(encoder.state_dict())
    names = {id(m): name for name, m in owner.named_modules()}
    inside = {id(t) for m in (encoder, *copies) for t in itertools.chain(m.parameters(), m.buffers())}
    new = [n for n, t in itertools.chain(owner.named_parameters(), owner.named_buffers()) if id(t) not in inside]
    return {
        "spec": spec,
        "path": str(weights.path.resolve()),
        "kind": weights.kind,
        "sha256": weights.sha256,
        "loaded": fit.loaded,
        "resampled": fit.resampled,
        "copied_to": [names[id(m)] for m in copies],
        "new": group_keys(new),
        "ignored": group_keys([*weights.ignored, *fit.ignored]),
    }


def _is_copy(module: torch.nn.Module, encoder: torch.nn.Module) -> bool:
    """Same class and exactly the same tensors as ``encoder`` (a deep copy made at construction)."""
    if type(module) is not type(encoder):
        return False
    mine, theirs = module.state_dict(), encoder.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine
    )


def describe_init(spec: str, record: dict[str, Any] | None) -> list[str]:
    """Log lines for :func:`init_weights`'s record (None: a resumed run, which restores its checkpoint instead)."""
    if record is None:
        return [f"model.init={spec} not applied: this run resumes from its own checkpoint"]
    source = f"{record['path']} ({record['kind']}, sha256 {record['sha256']})"
    lines = [f"model.init: loaded {record['loaded']} encoder tensors from {source}"]
    lines += [f"model.init: resampled {note}" for note in record["resampled"]]
    if record["copied_to"]:
        lines.append(f"model.init: copied into {', '.join(record['copied_to'])} too (starts equal to the encoder)")
    lines.append(f"model.init: newly initialised (not from the source): {', '.join(record['new']) or 'nothing'}")
    lines.append(f"model.init: ignored from the source: {', '.join(record['ignored']) or 'nothing'}")
    return lines


def group_keys(keys: Iterable[str]) -> list[str]:
    """Tensor names grouped by their first component: ``decoder.* (14)``; a lone tensor keeps its full name."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return [names[0] if len(names) == 1 else f"{head}.* ({len(names)})" for head, names in groups.items()]
