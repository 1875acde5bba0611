"""The pretraining loop on Hugging Face Accelerate, the same for every objective.

One code path from a laptop CPU to many GPUs: Accelerate handles devices, DDP/FSDP, mixed precision,
gradient accumulation, checkpoint state and the TensorBoard tracker. The loop reads top to bottom:
build -> resume -> for each step: schedules, forward/backward, optimizer, objective hooks, log, checkpoint
-> export the encoder.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    broadcast_object_list,
    send_to_device,
    set_seed,
)
from tqdm.auto import tqdm

from sslvit import budget, data
from sslvit.accel import launched_world_size, make_accelerator
from sslvit.backbone import build_backbone, model_args, set_fused_attention
from sslvit.cache import maybe_decoded
from sslvit.checkpoint import export_encoder, latest_checkpoint, load_checkpoint, save_checkpoint
from sslvit.errors import DataError, RecipeError, TrainingDiverged
from sslvit.objectives import OBJECTIVES, Objective, Progress
from sslvit.recipe import Derived, Recipe, derive, resolved_json
from sslvit.weights import describe_init, init_weights

log = logging.getLogger("sslvit")

STREAM_SHUFFLE_BUFFER = 10_000  # images held for shuffling a streamed dataset (the usual webdataset-style size)


def warmup_cosine(
    step: int, total: int, warmup: int, base: float, final: float, start: float = 0.0, inclusive: bool = False
) -> float:
    """Linear warmup from ``start`` to ``base`` over ``warmup`` steps, then a half-cycle cosine to ``final``.

    The per-iteration schedules of facebookresearch/mae (util/lr_sched.py: ``base * step / warmup``, the base rate
    at step ``warmup``) and, with ``inclusive``, of facebookresearch/dino (utils.cosine_scheduler: the warmup is
    ``np.linspace(start, base, warmup)``, the base rate at step ``warmup - 1``). Both then run the cosine over
    steps ``warmup .. total - 1`` as ``(step - warmup) / (total - warmup)``. lightly's ``cosine_warmup_schedule``
    starts warmup at ``(step + 1) / warmup`` and ends the cosine one step early, so it is not used here.
    """
    if step < warmup:
        if inclusive:
            return start if warmup == 1 else start + (base - start) * step / (warmup - 1)
        return start + (base - start) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(recipe: Recipe, run_dir: Path, started: float | None = None) -> dict[str, Any]:
    """Pretrain ``recipe`` into ``run_dir``; resume from its newest checkpoint if there is one.

    Args:
        started: when the run began (``time.time()``), for ``train.budget_minutes``: the command line passes the
            process's start, so that imports count against the budget too. None = now.

    Returns:
        A summary: steps, images/s, final loss, the run folder and the export folder, ``timing`` (seconds of
        startup, training and the final export) and, with a budget, the ``budget`` plan.
    """
    started = time.time() if started is None else started
    recipe.validate()
    derive(recipe, launched_world_size(), None)  # a batch that does not split over the processes fails before any work
    accelerator = make_accelerator(
        mixed_precision=recipe.train.precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        log_with="tensorboard",
    )
    set_seed(recipe.train.seed)
    objective, encoder = build_objective(recipe)
    # model.init: at a fresh start only, after the objective (which may re-initialise the encoder it wraps)
    fresh = latest_checkpoint(run_dir / "checkpoints") is None
    init = init_weights(recipe.model.init, encoder, objective) if recipe.model.init and fresh else None
    dataset, description, num_samples = _open_data(recipe, objective, accelerator)
    derived = derive(recipe, accelerator.num_processes, num_samples)
    if num_samples is not None and not derived.steps_per_epoch:
        raise DataError(
            f"data.path={recipe.data.path} has {num_samples} images, fewer than one global batch of "
            f"{derived.global_batch_size}; lower train.global_batch_size / train.batch_size_per_device"
        )
    _start_run_folder(accelerator, recipe, derived, run_dir, description)
    loader = data.make_loader(
        dataset,
        derived.batch_size_per_device,
        shuffle=not recipe.data.streaming,  # a stream is shuffled in its own buffer
        drop_last=True,
        cfg=recipe.data,
        seed=recipe.train.seed,
    )
    optimizer = make_optimizer(objective, recipe, derived)
    prefer_math_attention(objective, accelerator.device, recipe.train.precision)
    if recipe.data.streaming:  # already split over processes by the stream itself: Accelerate must not re-shard it
        model, optimizer = accelerator.prepare(objective, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    accelerator.init_trackers("tensorboard", config=_hparams(recipe, derived))
    resumed = _resume(accelerator, run_dir)
    resumed.setdefault("init", init)  # recorded in every checkpoint's trainer_state.json
    if recipe.model.init and accelerator.is_main_process:
        for line in describe_init(recipe.model.init, init):
            log.info(line)
    vis_batch = _fixed_batch(dataset, recipe.log.num_images, accelerator.device, recipe.data.streaming)
    monitor = _knn_monitor(recipe, accelerator)
    if recipe.train.budget_minutes:
        plan = _budget_plan(accelerator, model, optimizer, loader, recipe, derived, resumed, started, monitor)
        resumed["budget"] = plan.to_dict()  # stored in every checkpoint: a resumed run keeps this total
        derived = derive(recipe, accelerator.num_processes, num_samples, plan.total_steps)
        if accelerator.is_main_process:
            (run_dir / "config.json").write_text(resolved_json(recipe, derived) + "\n")
    training_began = time.time()
    summary = _train_loop(accelerator, model, optimizer, loader, recipe, derived, run_dir, resumed, vis_batch, monitor)
    training_ended = time.time()
    unwrapped: Objective = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        info = _encoder_info(unwrapped, recipe)
        export_encoder(unwrapped.encoder_for_export(), info["architecture"], info["model_args"], run_dir / "encoder")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    timing = {"startup_s": training_began - started, "train_s": training_ended - training_began,
              "export_s": time.time() - training_ended, "total_s": time.time() - started}  # fmt: skip
    extra = {"budget": resumed["budget"]} if "budget" in resumed else {}
    return {**summary, "run_dir": str(run_dir), "encoder": str(run_dir / "encoder"), "timing": timing, **extra}


def _budget_plan(
    accelerator, model, optimizer, loader, recipe, derived, resumed, started, monitor
) -> budget.BudgetPlan:
    """The total steps for ``train.budget_minutes``: the checkpoint's when resuming, else measured now.

    Every process runs the probe (its steps hold collectives); the main process's decision is broadcast.
    """
    if resumed["step"] and "budget" not in resumed:
        raise RecipeError(
            "train.budget_minutes: this run folder holds a run started without a time budget, so its "
            "schedule is fixed already; resume it without train.budget_minutes (or use a new --output-dir)"
        )
    if "budget" in resumed:
        plan = budget.BudgetPlan(**resumed["budget"])
        if accelerator.is_main_process:
            log.info("train.budget_minutes: keeping the total chosen at the start of this run, %d steps (%s)",
                     plan.total_steps, budget.describe(plan))  # fmt: skip
        return plan
    provisional = replace(derived, total_steps=1 << 30, warmup_steps=1 << 29)  # any schedule: the probe is undone
    objective: Objective = accelerator.unwrap_model(model)
    spe = derived.steps_per_epoch or provisional.total_steps
    accum = derived.grad_accum_steps
    batches = _micro_batches(accelerator, loader, recipe.data.streaming, 0, 0, spe * accum)

    def step(i: int) -> None:
        optimisation_step(accelerator, model, optimizer, batches, recipe, provisional, i, Counter())

    def sync() -> None:
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)

    def knn() -> None:
        monitor(objective.encoder_for_export(), 0, log_it=False)

    plan = budget.plan_budget(
        recipe.train.budget_minutes, started, step,
        lambda: budget.training_restore_point(objective, optimizer, accelerator.scaler), sync,
        knn if monitor is not None else None, recipe.eval.knn_every,
    )  # fmt: skip
    if accelerator.num_processes > 1:
        plan = broadcast_object_list([plan], from_process=0)[0]
    if accelerator.is_main_process:
        log.info(budget.describe(plan))
    return plan


def build_objective(recipe: Recipe) -> tuple[Objective, torch.nn.Module]:
    """The recipe's objective around a fresh backbone -> ``(objective, that backbone)`` (benchmarks use it too)."""
    objective_cls = OBJECTIVES[recipe.objective.name]
    encoder = build_backbone(recipe.model, **objective_cls.backbone_kwargs(recipe.objective))
    return objective_cls(encoder, recipe.objective), encoder


def _open_data(recipe: Recipe, objective: Objective, accelerator: Accelerator) -> tuple[Any, str, int | None]:
    """The training images with the objective's views -> (dataset, description, images per epoch or None)."""
    if not recipe.data.streaming:
        source = maybe_decoded(data.open_source(recipe.data), recipe.data.decode_cache_mb)
        dataset = data.TransformedImages(source, objective.views(), seed=recipe.train.seed)
        return dataset, dataset.source.description, len(dataset)
    if not (recipe.train.max_steps or recipe.train.budget_minutes):
        raise RecipeError("data.streaming=true gives no epoch length: set train.max_steps or train.budget_minutes")
    stream = data.open_stream(
        recipe.data, None, objective.views(), accelerator.process_index, accelerator.num_processes,
        shuffle_buffer=STREAM_SHUFFLE_BUFFER, seed=recipe.train.seed,
    )  # fmt: skip
    return stream, stream.description, None


def _start_run_folder(accelerator: Accelerator, recipe: Recipe, derived: Derived, run_dir: Path, data_desc) -> None:
    """Write config.json (warn when it differs from an earlier run's) and log the derived values."""
    if not accelerator.is_main_process:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.json"
    text = resolved_json(recipe, derived)
    if config_file.is_file():
        old, new = json.loads(config_file.read_text()), json.loads(text)
        changed = sorted(k for k in {**old, **new} if old.get(k) != new.get(k) and k != "derived")
        if changed:
            log.warning("this run folder was started with a different recipe; sections changed: %s", changed)
    config_file.write_text(text + "\n")
    log.info("data: %s", data_desc)
    steps = (
        f"{derived.total_steps} steps in all ({derived.warmup_steps} warmup)"
        if derived.total_steps is not None
        else f"the total number of steps is decided at start (train.budget_minutes={recipe.train.budget_minutes:g})"
    )
    log.info(
        "%d process(es) x %d images x %d accumulation = global batch %d; lr %.3g (base_lr %.3g x %d / 256); "
        "%s steps/epoch, %s",
        derived.world_size, derived.batch_size_per_device, derived.grad_accum_steps, derived.global_batch_size,
        derived.lr, recipe.optim.base_lr, derived.global_batch_size, derived.steps_per_epoch, steps,
    )  # fmt: skip


def _hparams(recipe: Recipe, derived: Derived) -> dict[str, Any]:
    """Flat scalar hyperparameters for TensorBoard's HPARAMS tab."""
    flat: dict[str, Any] = {}
    for section, values in {**recipe.to_dict(), "derived": asdict(derived)}.items():
        for key, value in values.items() if isinstance(values, dict) else [(section, values)]:
            name = f"{section}.{key}" if isinstance(values, dict) else section
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def _resume(accelerator: Accelerator, run_dir: Path) -> dict[str, Any]:
    """Load the newest complete checkpoint, if any; return its trainer state (``step`` = steps already done)."""
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        return {"step": 0}
    state = load_checkpoint(accelerator, checkpoint)
    if accelerator.is_main_process:
        log.info("resuming from %s (step %d)", checkpoint, state["step"])
        written_by = state.get("world_size", accelerator.num_processes)
        if written_by != accelerator.num_processes:
            log.warning(
                "the checkpoint was written by %d process(es) and resumes on %d: weights, optimizer and schedules "
                "are restored, but the data order (and the random masks) change from here on",
                written_by, accelerator.num_processes,
            )  # fmt: skip
    return state


def _fixed_batch(dataset: Any, n: int, device: torch.device, streaming: bool) -> dict[str, Any] | None:
    """The same few images for every visualisation, so TensorBoard shows progress on fixed inputs."""
    items = list(itertools.islice(dataset, n)) if streaming else [dataset[i] for i in range(min(n, len(dataset)))]
    batch = data.collate_skipping(items)
    if batch["views"] is None:
        return None
    views = batch["views"]
    batch["views"] = [v.to(device) for v in views] if isinstance(views, list) else views.to(device)
    return batch


def make_optimizer(objective: Objective, recipe: Recipe, derived: Derived) -> torch.optim.Optimizer:
    """AdamW over the objective's parameter groups at the derived learning rate (benchmarks build it here too).

    ``fused=True``: one kernel over all parameters; on a CPU the default per-parameter loop takes ~3x longer.
    """
    groups = objective.param_groups(recipe.optim.weight_decay)
    return torch.optim.AdamW(groups, lr=derived.lr, betas=recipe.optim.betas, fused=True)


def prefer_math_attention(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """bf16 on a CPU: train on timm's math attention, as the fused SDPA backward is ~1.8x slower (BENCHMARKS.md)."""
    if device.type == "cpu" and precision == "bf16":
        set_fused_attention(model, False)


def _apply_schedules(
    optimizer: torch.optim.Optimizer, recipe: Recipe, derived: Derived, step: int, inclusive_warmup: bool = False
) -> dict[str, float]:
    """Set this step's learning rate and weight decay on every parameter group; return them for logging.

    ``inclusive_warmup``: the objective's warmup convention (:attr:`Objective.warmup_reaches_base_at_last_step`).
    """
    lr = warmup_cosine(step, derived.total_steps, derived.warmup_steps, derived.lr, recipe.optim.min_lr,
                       recipe.optim.warmup_start_lr, inclusive_warmup)  # fmt: skip
    wd = recipe.optim.weight_decay
    if recipe.optim.weight_decay_end is not None:
        wd = warmup_cosine(step, derived.total_steps, 0, wd, recipe.optim.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if group["weight_decay"] > 0:  # groups without decay (biases, norms, tokens) stay at 0
            group["weight_decay"] = wd
    return {"lr": lr, "weight_decay": wd}


def _train_loop(accelerator, model, optimizer, loader, recipe, derived, run_dir, resumed, vis_batch, monitor):
    objective: Objective = accelerator.unwrap_model(model)
    encoder_info = _encoder_info(objective, recipe)
    total, accum = derived.total_steps, derived.grad_accum_steps
    spe = derived.steps_per_epoch or total  # a stream has no epochs: it restarts whenever it ends
    step = first_step = resumed["step"]
    epoch = step // spe
    batches = _micro_batches(accelerator, loader, recipe.data.streaming, epoch, (step % spe) * accum, spe * accum)
    window = _Window(accelerator, recipe, derived, step, resumed.get("last_log", {}))
    skipped: Counter[str] = Counter()
    bad_in_a_row = 0
    model.train()
    while step < total:
        batch_epoch, out, grad_norm, finite, scheduled = optimisation_step(accelerator, model, optimizer, batches,
                                                                           recipe, derived, step, skipped)  # fmt: skip
        if batch_epoch != epoch:  # the first micro-batch of a new epoch: report the one that ended
            _report_skipped(accelerator, skipped, epoch, step)
            epoch = batch_epoch
        if finite:
            bad_in_a_row = 0
        else:
            bad_in_a_row += 1
            _handle_bad_step(accelerator, recipe, run_dir, step, bad_in_a_row)
        step += 1
        window.add(step, out, scheduled, grad_norm, finite)
        if recipe.log.image_every and vis_batch is not None and (step % recipe.log.image_every == 0 or step == total):
            _log_images(accelerator, objective, vis_batch, step)
        if monitor is not None and (step % recipe.eval.knn_every == 0 or step == total):
            window.last.update(monitor(objective.encoder_for_export(), step))
        if step % recipe.train.checkpoint_every == 0 or step == total:
            state = {"step": step, "epoch": epoch, "recipe": recipe.name, "world_size": accelerator.num_processes,
                     "last_log": window.last, "init": resumed["init"], **encoder_info,
                     **{k: resumed[k] for k in ("budget",) if k in resumed}}  # fmt: skip
            save_checkpoint(accelerator, run_dir / "checkpoints", step, recipe.train.keep_checkpoints, state)
    _report_skipped(accelerator, skipped, epoch, step)
    return window.close(step, step - first_step)


def _knn_monitor(recipe: Recipe, accelerator: Accelerator) -> Callable | None:
    """The online k-NN monitor (``eval.knn_every``), its data opened now so a mistake fails before training."""
    if not recipe.eval.knn_every:
        return None
    from sslvit.evaluation.features import open_labelled
    from sslvit.evaluation.knn import knn_eval

    cfg = replace(recipe.data, path=recipe.eval.data or recipe.data.path, streaming=False, num_workers=0)
    train, test, _ = open_labelled(cfg, recipe.eval.train_split, recipe.eval.test_split or None)
    limits = {"limit_train": recipe.eval.limit_train, "limit_test": recipe.eval.limit_test}

    def run(encoder: torch.nn.Module, step: int, log_it: bool = True) -> dict[str, float]:
        result = knn_eval(encoder, train, test, ks=(recipe.eval.k,), accelerator=accelerator, data_cfg=cfg, **limits)
        if not log_it:  # timed by the budget probe
            return {}
        accelerator.log({"knn/top1": result["top1"], "knn/top5": result["top5"]}, step=step)
        if accelerator.is_main_process:
            log.info("step %d: k-NN (k=%d) top1 %.2f%%, top5 %.2f%%", step, result["k"], result["top1"], result["top5"])
        return {"knn_top1": result["top1"], "knn_top5": result["top5"]}

    return run


def optimisation_step(accelerator, model, optimizer, batches, recipe, derived, step, skipped):
    """Step ``step``: schedules, the objective's hooks and :func:`_train_step` (benchmarks time this very function).

    Returns:
        ``(epoch of the batches, outputs, grad norm, all finite, scheduled values to log)``; ``after_step`` (EMA,
        centre) runs only when the step was finite.
    """
    objective: Objective = accelerator.unwrap_model(model)
    progress = Progress(step, derived.total_steps, recipe.schedule.epochs)
    scheduled = _apply_schedules(optimizer, recipe, derived, step, objective.warmup_reaches_base_at_last_step)
    objective.before_step(progress)
    epoch, out, grad_norm, finite = _train_step(accelerator, model, optimizer, batches, derived.grad_accum_steps,
                                                progress, recipe.optim.clip_grad, skipped)  # fmt: skip
    if finite:
        scheduled.update(objective.after_step(progress))
    return epoch, out, grad_norm, finite, scheduled


def _train_step(accelerator, model, optimizer, batches, accum, progress, clip_grad, skipped):
    """One optimisation step over ``accum`` micro-batches -> (epoch, outputs, grad norm, all finite).

    Gradients are synchronised across processes only on the last micro-batch. A step whose loss or gradient
    norm is NaN/Inf leaves the weights untouched (under fp16 the gradient scaler still sees it and backs off).
    """
    sums: dict[str, torch.Tensor] = {}
    for i in range(accum):
        epoch, batch = next(batches)
        if batch["views"] is None:
            raise DataError("every image of a batch failed to decode; check the data (see the skipped counts)")
        skipped.update(batch["skipped"])
        sync = i == accum - 1 or accelerator.num_processes == 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model(batch)
            accelerator.backward(out["loss"] / accum)
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
    accelerator.unwrap_model(model).after_backward(progress)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
    finite = torch.isfinite(grad_norm) & torch.isfinite(sums["loss"])
    if accelerator.num_processes > 1:  # every process must take the same decision
        finite = accelerator.reduce(finite.float(), reduction="sum") == accelerator.num_processes
    finite = bool(finite)  # the one host sync per step: the guard against NaN/Inf needs it
    if finite or accelerator.scaler is not None:
        optimizer.step()
        finite = finite and not optimizer.step_was_skipped
    optimizer.zero_grad(set_to_none=True)
    return epoch, sums, grad_norm, finite


def _handle_bad_step(accelerator: Accelerator, recipe: Recipe, run_dir: Path, step: int, in_a_row: int) -> None:
    """Warn about a skipped non-finite step; stop the run after ``train.max_bad_steps`` of them in a row."""
    if accelerator.is_main_process:
        log.warning("step %d: non-finite loss or gradient norm; the step was skipped (%d in a row)", step, in_a_row)
    if in_a_row < recipe.train.max_bad_steps:
        return
    good = latest_checkpoint(run_dir / "checkpoints")
    raise TrainingDiverged(
        f"step {step}: {in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps="
        f"{recipe.train.max_bad_steps}); the last good checkpoint is {good or 'none (no checkpoint yet)'}. "
        "Usual remedies: train.precision=bf16 instead of fp16, a lower optim.base_lr, gradient clipping "
        "(optim.clip_grad=1.0), a longer schedule.warmup_epochs"
    )


def _micro_batches(accelerator, loader, streaming: bool, epoch: int, skip: int, per_epoch: int):
    """Yield (epoch, micro-batch) from position (epoch, skip) on, epochs chained; the loop stops at total steps."""
    while True:
        for batch in _epoch_batches(accelerator, loader, epoch, skip, per_epoch, streaming):
            yield epoch, batch
        epoch, skip = epoch + 1, 0


def _epoch_batches(accelerator: Accelerator, loader, epoch: int, skip: int, per_epoch: int, streaming: bool):
    """The micro-batches of one epoch on the training device, the first ``skip`` left out (resume mid-epoch).

    A map-style epoch is cut at ``per_epoch`` micro-batches so that it ends on a whole optimisation step.
    """
    if streaming:  # not prepared by Accelerate (see pretrain): skip by reading, move to the device here
        loader.dataset.set_epoch(epoch)
        return (send_to_device(b, accelerator.device) for b in itertools.islice(loader, skip, None))
    loader.set_epoch(epoch)  # the sampler's order
    loader.dataset.set_epoch(epoch)  # the augmentations
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    return itertools.islice(batches, per_epoch - skip)


class _Window:
    """Logging between two log steps: sums on device (no host sync per step), the progress bar, images/s."""

    def __init__(self, accelerator: Accelerator, recipe: Recipe, derived: Derived, step: int, last: dict) -> None:
        self.accelerator, self.every, self.total = accelerator, recipe.log.every, derived.total_steps
        self.global_batch = derived.global_batch_size
        # the bar redraws in place: on a terminal only; a log file gets one line every log.every steps instead
        self.lines = accelerator.is_local_main_process and not sys.stderr.isatty()
        self.bar = tqdm(total=self.total, initial=step, disable=not accelerator.is_local_main_process or self.lines,
                        desc="pretrain")  # fmt: skip
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.bad, self.last = 0, 0, last
        self.started = self.since = time.perf_counter()

    def add(self, step: int, out: dict, scheduled: dict, grad_norm: torch.Tensor, finite: bool) -> None:
        if finite:
            for key, value in out.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
            self.steps += 1
        self.bad += not finite
        self.bar.update(1)
        if step % self.every == 0 or step == self.total:
            self._log(step, scheduled, grad_norm)

    def _log(self, step: int, scheduled: dict, grad_norm: torch.Tensor) -> None:
        """Average over the window's good steps and over processes, then log: one host sync per log step."""
        now = time.perf_counter()
        values = {"train/images_per_s": (self.steps + self.bad) * self.global_batch / (now - self.since)}
        if self.sums:
            keys = sorted(self.sums)
            means = self.accelerator.reduce(torch.stack([self.sums[k] for k in keys]) / self.steps, reduction="mean")
            values.update({f"train/{k}": v for k, v in zip(keys, means.tolist())})
        values.update({f"train/{k}": v for k, v in scheduled.items()})
        values.update({"train/grad_norm": float(grad_norm), "train/bad_steps": self.bad})
        self.accelerator.log(values, step=step)
        self.last = {k.removeprefix("train/"): v for k, v in values.items()}
        if "loss" in self.last:
            self.bar.set_postfix(loss=f"{self.last['loss']:.4f}", img_s=f"{self.last['images_per_s']:.0f}")
        if self.lines:
            loss = f"loss {self.last['loss']:.4f}, " if "loss" in self.last else ""
            log.info("step %d/%d: %slr %.3g, %.0f images/s", step, self.total, loss, self.last["lr"],
                     self.last["images_per_s"])  # fmt: skip
        self.sums, self.steps, self.bad, self.since = {}, 0, 0, now

    def close(self, step: int, ran: int) -> dict[str, Any]:
        """Summary of this invocation: ``ran`` steps (0 when the run was already complete)."""
        self.bar.close()
        images_per_s = ran * self.global_batch / (time.perf_counter() - self.started) if ran else None
        return {"steps": step, "steps_this_run": ran, "final_loss": self.last.get("loss"),
                "images_per_s": images_per_s, "knn_top1": self.last.get("knn_top1")}  # fmt: skip


def _encoder_info(objective: Objective, recipe: Recipe) -> dict[str, Any]:
    """What evaluation needs to rebuild the exported encoder from a training checkpoint, objective-free."""
    encoder = objective.encoder_for_export()
    prefix = next(name for name, module in objective.named_modules() if module is encoder)
    return {
        "architecture": recipe.model.name,
        "model_args": model_args(recipe.model, **type(objective).backbone_kwargs(recipe.objective)),
        "encoder_prefix": f"{prefix}.",
        "input_size": [3, recipe.model.img_size, recipe.model.img_size],  # a CNN's model_args cannot hold it
    }


def _log_images(accelerator: Accelerator, objective: Objective, batch: dict[str, Any], step: int) -> None:
    """Log the objective's visualisations of the fixed batch (main process only, eval mode, no grad)."""
    if not accelerator.is_main_process:
        return
    objective.eval()
    with torch.no_grad(), accelerator.autocast():
        images = objective.visualize(batch)
    objective.train()
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    for tag, image in images.items():
        writer.add_image(tag, image.float().clamp(0, 1).cpu(), step)


def _report_skipped(accelerator: Accelerator, skipped: Counter, epoch: int, step: int) -> None:
    """Say how many samples were skipped this epoch (all processes) and why (main process's reasons)."""
    total = int(accelerator.reduce(torch.tensor(sum(skipped.values()), device=accelerator.device), "sum"))
    accelerator.log({"data/skipped": total}, step=step)
    if total and accelerator.is_main_process:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in skipped.most_common())
        log.warning("epoch %d: skipped %d undecodable sample(s) (%s on the main process)", epoch, total, reasons)
