"""``--set key=value`` overrides: dotted paths into a recipe's nested dataclasses, parsed by the field's type.

Unknown keys and values of the wrong type raise a :class:`~sslvit.errors.RecipeError` that names the key and the
keys there are (nanoGPT's configurator raises on unknown overrides too).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

from sslvit.errors import RecipeError


def apply_overrides(recipe: Any, overrides: list[str]) -> Any:
    """Apply ``key=value`` overrides by dotted path, e.g. ``optim.base_lr=1e-4``, to any nested dataclass.

    ``objective.name=NAME`` (applied before the others) switches a pretraining recipe to that objective with its
    ``Config`` defaults; the other sections are kept.

    Raises:
        RecipeError: the key is unknown, the value has the wrong type, or the override is malformed.
    """
    # objective.name first: it replaces the objective section, which the objective.* overrides then edit
    switches = [item for item in overrides if item.partition("=")[0].strip() == "objective.name"]
    for item in [*switches, *(item for item in overrides if item not in switches)]:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like section.field=value, e.g. optim.base_lr=1e-4")
        parts = key.split(".")
        target: Any = recipe
        for depth, part in enumerate(parts[:-1]):
            target = getattr(target, part, None) if dataclasses.is_dataclass(target) else None
            if not dataclasses.is_dataclass(target):
                raise RecipeError(
                    f"unknown recipe key {'.'.join(parts[: depth + 1])!r} in --set {item}; {_known(recipe)}"
                )
        leaf = parts[-1]
        fields = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in fields or (target is recipe and leaf == "name"):
            raise RecipeError(f"unknown recipe key {key!r} in --set {item}; {_known(recipe)}")
        if target is getattr(recipe, "objective", None) and leaf == "name":
            recipe.objective = _switch_objective(recipe.objective, raw.strip())
            continue
        hint = typing.get_type_hints(type(target))[leaf]
        setattr(target, leaf, _parse_value(key, raw.strip(), hint))
    return recipe


def _known(recipe: Any) -> str:
    keys = [k for k in _flatten(dataclasses.asdict(recipe)) if k != "name"]
    return "known keys: " + ", ".join(keys)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_value(key: str, raw: str, hint: Any) -> Any:
    """Parse ``raw`` as the annotated type ``hint``; raise RecipeError naming ``key`` when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null"):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _parse_value(key, raw, arg)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0])
    if origin is Literal:
        if raw not in args:
            raise RecipeError(f"{key}={raw!r} is not allowed; choose one of {', '.join(map(str, args))}")
        return raw
    if origin is tuple:
        items = [s for s in raw.strip("()[] ").split(",") if s.strip()]
        if len(items) != len(args):
            raise RecipeError(f"{key} needs {len(args)} comma-separated values, got {raw!r}")
        return tuple(_parse_value(key, s.strip(), a) for s, a in zip(items, args))
    if hint is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise RecipeError(f"{key} needs true or false, got {raw!r}")
    if hint in (int, float):
        try:
            value = hint(raw) if hint is float else int(raw)
        except ValueError:
            raise RecipeError(f"{key} needs {'an integer' if hint is int else 'a number'}, got {raw!r}") from None
        if hint is float and not math.isfinite(value):
            raise RecipeError(f"{key} needs a finite number, got {raw!r}")
        return value
    if hint is str:
        return raw
    raise RecipeError(f"{key} cannot be set from the command line (type {hint})")


def _switch_objective(current: Any, name: str) -> Any:
    """The config of objective ``name`` with its defaults (``current`` when it is that objective already)."""
    from sslvit.objectives import OBJECTIVES  # the objectives import the recipe module: not at import time

    if name not in OBJECTIVES:
        raise RecipeError(f"objective.name={name!r} is not an objective; known objectives: {', '.join(OBJECTIVES)}")
    return current if current.name == name else OBJECTIVES[name].Config()


# ------------------------------------------------------------------------------------ the whole-recipe checks

# An int field named like these is a size (a width, a depth, a head count, an image or crop side): it must be >= 1.
SIZE_FIELD = re.compile(r"(^|_)(dim|depth|num_heads|img_size|patch_size|crop_size)$")


def check_types(config: Any, prefix: str = "") -> None:
    """Check that every field of a (nested) dataclass holds a value of its annotated type.

    ``--set`` parses values by type already; a recipe file is Python and can hold anything (``img_size="32"``).

    Raises:
        RecipeError: naming the first field whose value has the wrong type.
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        key, value = f"{prefix}{f.name}", getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_types(value, f"{key}.")
            continue
        if not _fits(value, hints.get(f.name, Any)):
            raise RecipeError(
                f"recipe field {key} holds {value!r} ({type(value).__name__}), not {_type_name(hints[f.name])}"
            )


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (an int passes for a float; a bool is no number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this check does not know: left to the section's own validate


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_bounds(config: Any, prefix: str = "") -> None:
    """The bounds every section shares, by naming convention, so that a new objective's fields get them too.

    - an int field named ``*_dim``, ``*depth``, ``*num_heads``, ``*img_size``, ``*patch_size`` or ``*crop_size`` is a
      size: >= 1 (None, where allowed, keeps a default);
    - ``P_num_heads`` divides ``P_embed_dim`` (``num_heads``/``embed_dim``, ``decoder_num_heads``/...);
    - every float is finite.

    Raises:
        RecipeError: naming the first field out of bounds.
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_bounds(value, f"{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{key}={value} must be a finite number")
        elif SIZE_FIELD.search(name) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise RecipeError(f"{key}={value} is a size and must be >= 1")
    for name, heads in values.items():
        width = values.get(name.removesuffix("num_heads") + "embed_dim")
        if name.endswith("num_heads") and isinstance(heads, int) and isinstance(width, int) and width % heads:
            stem = f"{prefix}{name.removesuffix('num_heads')}"
            raise RecipeError(f"{stem}embed_dim={width} is not divisible by {stem}num_heads={heads}")
