"""Typed recipes: the dataclasses, loading a recipe by name or path, and validation.

``--set`` overrides live in :mod:`sslvit.overrides` (``apply_overrides`` is re-exported here).

A recipe is one Python file in ``recipes/`` that defines ``RECIPE = Recipe(...)``; variants are made with
``dataclasses.replace`` from a base recipe. What a recipe works out to at a launch (absolute lr, global batch,
total steps) is :func:`sslvit.training.derived.derive`'s, logged and never written back into the recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sslvit.errors import RecipeError
from sslvit.overrides import apply_overrides as apply_overrides  # re-exported: sslvit.recipe.apply_overrides
from sslvit.overrides import check_bounds, check_types


@dataclass
class ModelConfig:
    """The shared timm backbone: a ViT, or for DINO any timm model with a pooled feature (CNN, Swin, ...).

    ``name`` is an exact timm model name; ``patch_size``, ``depth``, ``embed_dim`` and ``num_heads`` shape ViTs
    only: they override the architecture's own values when set (tiny test models), and are kept in the export so
    timm rebuilds it. Other families keep the shape their name gives and get ``img_size`` if they take one.
    ``init`` starts a fresh run from existing weights (continued pretraining): an sslvit run folder, an
    ``encoder/`` export (also ``local-dir:PATH``), a checkpoint folder or a ``.safetensors``/``.pth`` file;
    position embeddings are resampled when the patch grid differs. "" = random init.
    """

    name: str = "vit_base_patch16_224"
    img_size: int = 224
    patch_size: int = 16
    drop_path_rate: float = 0.0
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None
    init: str = ""

    def validate(self) -> None:
        _check(self.img_size > 0 and self.patch_size > 0, "model.img_size and model.patch_size must be positive")
        for key in ("depth", "embed_dim", "num_heads"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"model.{key}={value} must be >= 1 (or None: the architecture's own)")
        _check_patches(self.img_size, self.patch_size, self.embed_dim)
        _check(
            not self.init.startswith(("hf-hub:", "hf_hub:", "timm/")),
            f"model.init={self.init} needs the network; download the weights file and set model.init to its path",
        )
        _check(self.init.strip() != "local-dir:", "model.init=local-dir: needs a path, e.g. local-dir:runs/a/encoder")
        _check(
            self.img_size % self.patch_size == 0,
            f"model.img_size={self.img_size} is not divisible by model.patch_size={self.patch_size}; "
            "pick an image size that is a multiple of the patch size",
        )
        _check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate must be in [0, 1)")
        if self.embed_dim is not None and self.num_heads is not None:
            _check(
                self.embed_dim % self.num_heads == 0,
                f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}",
            )


MAX_PATCHES = 65536  # a 256 x 256 patch grid: 4096 px at patch 16; far beyond any published ViT recipe


def _check_patches(img_size: int, patch_size: int, embed_dim: int | None) -> None:
    """An image-size ceiling: an absurd model.img_size would otherwise try to allocate hundreds of GB in timm."""
    side = img_size // patch_size
    patches = side * side
    if patches <= MAX_PATCHES:
        return
    width = embed_dim or 768  # ViT-B's width when the architecture's own is kept
    pos_embed = (patches + 1) * width * 4  # bytes, fp32
    attention = patches * patches * 4  # bytes of one head's attention map for one image, fp32
    raise RecipeError(
        f"model.img_size={img_size} at model.patch_size={patch_size} makes {side}x{side} = {patches:,} patches per "
        f"image, above the ceiling of {MAX_PATCHES:,} (e.g. {int(MAX_PATCHES**0.5) * patch_size} px at this patch "
        f"size): the position embedding alone would take {_bytes(pos_embed)} (width {width}, fp32) and one attention "
        f"map {_bytes(attention)} per head and image; use a smaller model.img_size or a larger model.patch_size"
    )


def _bytes(n: float) -> str:
    """``3.2e11`` -> ``"298 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PiB"


@dataclass
class DataConfig:
    """Where the images come from and how they are loaded.

    ``path`` is ``digits`` (built in), a folder of images, a folder or glob of parquet/arrow files in the
    Hugging Face layout, or a Hub dataset id. Empty means the recipe expects the user to set it.
    """

    path: str = "digits"
    split: str = "train"
    mix_splits: bool = False  # True: a data.path glob may match several splits' files (train-*, test-*)
    image_column: str = ""  # "" = the first Image feature of the dataset
    label_column: str = ""  # "" = the first ClassLabel feature, else a column named label/labels
    streaming: bool = False
    num_workers: int = -1  # -1 = min(8, CPU cores available to this process)
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    decode_cache_mb: int = 0  # > 0: decode every image once, kept in memory if it fits in this many MiB (CIFAR: 147)
    augment_on: str = "auto"  # worker: PIL views in loader workers; device: batched tensor views; auto: per device

    def validate(self) -> None:
        _check(self.num_workers >= -1, "data.num_workers must be -1 (auto) or >= 0")
        _check(self.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")
        _check(
            self.augment_on in ("auto", "worker", "device"),
            f"data.augment_on must be auto, worker or device (got {self.augment_on!r})",
        )
        _check(self.decode_cache_mb >= 0, "data.decode_cache_mb must be >= 0 (0 = decode every epoch)")
        _check(
            not (self.streaming and self.decode_cache_mb),
            "data.decode_cache_mb needs random access to the images: set data.streaming=false or decode_cache_mb=0",
        )


@dataclass
class OptimConfig:
    """AdamW with per-step warmup + cosine learning rate and an optional cosine weight-decay schedule.

    ``base_lr`` is the rate per 256 images: the absolute lr is ``base_lr * global_batch / 256``.
    """

    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    warmup_start_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # None = constant weight decay
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 0.0  # max global grad norm; 0 = no clipping

    def validate(self) -> None:
        _check(self.base_lr > 0, "optim.base_lr must be positive")
        _check(self.min_lr >= 0 and self.warmup_start_lr >= 0, "optim.min_lr and optim.warmup_start_lr must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.weight_decay_end is None or self.weight_decay_end >= 0, "optim.weight_decay_end must be >= 0")
        _check(all(0.0 <= b < 1.0 for b in self.betas), "optim.betas must both be in [0, 1)")
        _check(self.clip_grad >= 0, "optim.clip_grad must be >= 0 (0 disables clipping)")


@dataclass
class ScheduleConfig:
    """Length of training in epochs; schedules run per optimisation step."""

    epochs: int = 800
    warmup_epochs: float = 40

    def validate(self) -> None:
        _check(self.epochs > 0, "schedule.epochs must be positive")
        _check(
            0 <= self.warmup_epochs <= self.epochs,
            f"schedule.warmup_epochs={self.warmup_epochs} must be between 0 and schedule.epochs={self.epochs}",
        )


MAX_SEED = 2**32 - 1  # numpy's seeds (and so the data order) take 32 bits


@dataclass
class TrainConfig:
    """Batching, precision, checkpointing and the seed.

    ``global_batch_size`` is the number of images per optimisation step over all processes; gradient
    accumulation is derived from it. 0 means "no accumulation": world size x ``batch_size_per_device``.
    """

    global_batch_size: int = 4096
    batch_size_per_device: int = 64
    precision: Literal["no", "fp16", "bf16"] = "bf16"
    max_steps: int = 0  # > 0: train this many optimisation steps, schedules compressed to fit (quick runs)
    budget_minutes: float = 0.0  # > 0: as many steps as fit in this wall time, startup included (decided at start)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 20  # stop after this many non-finite steps in a row (each is skipped)
    seed: int = 0
    # these signals stop the run after the current step with a checkpoint, exit code 75 (sslvit.training.signals)
    stop_signals: str = "SIGTERM,SIGUSR1,SIGINT"
    # torch.compile of the backbone's transformer blocks (sslvit.accel.compile_blocks); a failure falls back to eager
    compile: bool = False
    compile_backend: str = "inductor"  # any torch.compile backend; "aot_eager" or "eager" compile fast (tests)

    def validate(self) -> None:
        _check(bool(self.compile_backend), "train.compile_backend must name a torch.compile backend (e.g. inductor)")
        _check(self.batch_size_per_device > 0, "train.batch_size_per_device must be positive")
        _check(self.global_batch_size >= 0, "train.global_batch_size must be >= 0 (0 = no accumulation)")
        _check(self.max_steps >= 0, "train.max_steps must be >= 0 (0 = the whole schedule)")
        _check(self.budget_minutes >= 0, "train.budget_minutes must be >= 0 (0 = no time budget)")
        _check(
            not (self.max_steps and self.budget_minutes),
            f"train.max_steps={self.max_steps} and train.budget_minutes={self.budget_minutes} both fix the length of "
            "the run: set only one of them (the other to 0)",
        )
        _check(self.checkpoint_every > 0, "train.checkpoint_every must be positive")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps must be >= 1")
        _check(0 <= self.seed <= MAX_SEED, f"train.seed={self.seed} must be between 0 and 2**32 - 1 = {MAX_SEED}")


@dataclass
class LogConfig:
    """TensorBoard: scalars every ``every`` steps; images every ``image_every`` steps and at the end (0: never)."""

    every: int = 20
    image_every: int = 1000
    num_images: int = 8

    def validate(self) -> None:
        _check(self.every > 0, "log.every must be positive")
        _check(self.image_every >= 0, "log.image_every must be >= 0 (0 = never)")
        _check(self.num_images > 0, "log.num_images must be positive")


@dataclass
class EvalConfig:
    """The online k-NN monitor: every ``knn_every`` steps, a quick k-NN of the encoder on labelled data.

    It logs ``knn/top1`` and ``knn/top5`` to TensorBoard, so a run shows whether its representation improves
    long before it ends. ``data`` is any labelled source ``data.path`` accepts ("" = ``data.path`` itself).
    """

    knn_every: int = 0  # 0 = off
    data: str = ""
    train_split: str = "train"
    test_split: str = ""  # "" = the first of test, val, validation that exists
    limit_train: int = 5000  # class-balanced subsets keep the monitor cheap
    limit_test: int = 1000
    k: int = 20

    def validate(self) -> None:
        _check(self.knn_every >= 0, "eval.knn_every must be >= 0 (0 = off)")
        _check(self.limit_train > 0 and self.limit_test > 0, "eval.limit_train and eval.limit_test must be positive")
        _check(self.k > 0, "eval.k must be positive")


@dataclass
class Recipe:
    """A whole pretraining recipe. ``objective`` is the config dataclass of one objective (it has a ``name``)."""

    objective: Any
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = ""

    def validate(self) -> None:
        """Raise :class:`RecipeError` naming the first field that holds an impossible value.

        One pass over the whole recipe: every field's type first (a recipe file is Python, so ``img_size="32"``
        gets this far), then the bounds every section shares by naming convention (sizes are positive, heads
        divide widths, numbers are finite: :func:`~sslvit.overrides.check_bounds`), then each section's own checks.
        """
        check_types(self)
        check_bounds(self)
        sections = (self.model, self.objective, self.data, self.optim, self.schedule, self.train, self.log, self.eval)
        for section in sections:
            section.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise RecipeError(message)


# ---------------------------------------------------------------------------------------------- loading

RECIPE_PACKAGE = "sslvit.recipes"  # recipes/ is installed as this package (see pyproject.toml)


def list_recipes() -> list[str]:
    """Names of the pretraining recipes that ship with sslvit, sorted."""
    package = importlib.import_module(RECIPE_PACKAGE)
    # recipes/finetune_*.py are fine-tuning recipes (sslvit.training.finetune.list_finetune_recipes)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith(("_", "finetune_")))


def load_recipe(name_or_path: str) -> Recipe:
    """Load a pretraining recipe by name (a file in ``recipes/``) or by path to a recipe file.

    Raises:
        RecipeError: the name is unknown, or the file defines no ``RECIPE = Recipe(...)``.
    """
    name, recipe = load_recipe_file(name_or_path, Recipe, list_recipes(), "recipe")
    return dataclasses.replace(recipe, name=name)


def load_recipe_file(name_or_path: str, kind: type, known: list[str], what: str) -> tuple[str, Any]:
    """The ``RECIPE`` of a recipe file: a name among ``known`` (in ``recipes/``) or a path to a ``.py`` file.

    Pretraining (:func:`load_recipe`) and fine-tuning (``load_finetune_recipe``) recipes load through this one
    function.

    Args:
        kind: the type ``RECIPE`` must have (:class:`Recipe`, ``FinetuneConfig``).
        what: the recipe kind for messages ("recipe", "fine-tuning recipe").

    Returns:
        ``(name, a deep copy of RECIPE)``: ``--set`` overrides never leak into the module-level object that other
        recipes derive from.

    Raises:
        RecipeError: the name is unknown, the file is missing, or it defines no ``RECIPE`` of type ``kind``.
    """
    path = Path(name_or_path)
    if path.suffix == ".py" or "/" in name_or_path or os.sep in name_or_path:
        if not path.is_file():
            raise RecipeError(f"{what} file {name_or_path} does not exist")
        spec = importlib.util.spec_from_file_location(f"sslvit_user_recipe_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the user's own Python: any error in it is a mistake in that file
            raise RecipeError(f"{what} file {name_or_path} failed to load: {_where(err, path)}") from err
    else:
        if name_or_path not in known:
            raise RecipeError(f"unknown {what} {name_or_path!r}; known: {', '.join(known)}")
        module = importlib.import_module(f"{RECIPE_PACKAGE}.{name_or_path}")
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, kind):
        raise RecipeError(f"{what} file {module.__file__} must define RECIPE = {kind.__name__}(...)")
    return path.stem, copy.deepcopy(recipe)


def _where(err: Exception, path: Path) -> str:
    """``TypeError: ... (line 12)``: the error and the line of ``path`` it came from."""
    line = getattr(err, "lineno", None)  # a SyntaxError knows its line
    tb = err.__traceback__
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"{type(err).__name__}: {str(err).strip()[:200]}" + (f" (line {line})" if line else "")
