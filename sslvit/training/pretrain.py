"""The pretraining loop on Hugging Face Accelerate, the same for every objective.

One code path from a laptop CPU to many GPUs: Accelerate handles devices, DDP/FSDP, mixed precision, checkpoint
state and the TensorBoard tracker. :func:`pretrain` reads top to bottom: build -> resume -> (time budget) -> the
loop (for each step: schedules, forward/backward, optimizer, objective hooks, log, checkpoint) -> export. The run
folder's lock (:mod:`sslvit.runlock`), the choice of checkpoint (:mod:`~sslvit.training.resume`) and stopping on a
signal (:mod:`~sslvit.training.signals`) live in their own modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed

from sslvit import budget, data
from sslvit.accel import compile_blocks, launched_world_size, make_accelerator, unsharded, whole_weights
from sslvit.backbone import build_backbone, model_args, set_fused_attention
from sslvit.cache import maybe_decoded
from sslvit.checkpoint import export_encoder, save_checkpoint
from sslvit.data.augment import views_for
from sslvit.errors import DataError, RecipeError
from sslvit.objectives import OBJECTIVES, Objective
from sslvit.recipe import Recipe
from sslvit.runlock import check_output_dir, hold_run_folder
from sslvit.training.derived import Derived, derive, resolved_json
from sslvit.training.loop import LogWindow, handle_bad_step, micro_batches, optimisation_step, report_skipped
from sslvit.training.monitoring import Monitor, fixed_batch, knn_monitor, log_images
from sslvit.training.resume import refuse_another_model, resumable_checkpoints, resume
from sslvit.training.signals import (
    INTERRUPTED_EXIT_CODE,
    STOPPED_EXIT_CODE,
    RunStopped,
    ignore_in_workers,
    parse_stop_signals,
    stop_on_signals,
    stop_requested,
)
from sslvit.training.state import LoopCallback, Trainer, TrainState
from sslvit.weights import RunFolder, describe_init, init_weights

log = logging.getLogger("sslvit")

STREAM_SHUFFLE_BUFFER = 10_000  # images held for shuffling a streamed dataset (the usual webdataset-style size)


def pretrain(
    recipe: Recipe, run_dir: Path, started: float | None = None, callback: LoopCallback | None = None
) -> dict[str, Any]:
    """Pretrain ``recipe`` into ``run_dir``; resume from its newest checkpoint that loads, if there is one.

    The main process holds the run folder's lock (:mod:`sslvit.runlock`) until the end. A signal named in
    ``train.stop_signals`` stops the run after the current step with a checkpoint (:mod:`sslvit.training.signals`).

    Args:
        started: when the run began (``time.time()``), for ``train.budget_minutes``: the command line passes the
            process's start, so that imports count against the budget too. None = now.
        callback: observes the loop (benchmarks time its steps through it); None = no hooks.

    Returns:
        A summary: steps, images/s, final loss, the run folder and the export folder, ``timing`` (seconds of
        startup, training and the final export) and, with a budget, the ``budget`` plan.

    Raises:
        RunStopped: a stop signal arrived (a ``SystemExit``: exit code 75 after a checkpoint, 130 after a second
            Ctrl-C).
    """
    started = time.time() if started is None else started
    recipe.validate()
    stop_signals = parse_stop_signals(recipe.train.stop_signals)
    derive(recipe, launched_world_size(), None)  # a batch that does not split over the processes fails before any work
    check_output_dir(run_dir)  # a file, or a folder that cannot be written: before the model and the data
    accelerator = make_accelerator(
        mixed_precision=recipe.train.precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=recipe.train.seed),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        log_with="tensorboard",
    )
    with hold_run_folder(accelerator, run_dir), stop_on_signals(stop_signals, accelerator.is_main_process):
        try:
            return _pretrain(recipe, accelerator, RunFolder(run_dir), started, callback or LoopCallback(), stop_signals)
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, as one line
            newest = RunFolder(run_dir).latest_checkpoint()
            message = f"interrupted: stopped at once; the newest checkpoint is {newest or 'none (none written yet)'}"
            if accelerator.is_main_process:
                log.warning(message)
            raise RunStopped(INTERRUPTED_EXIT_CODE, message) from None


def _pretrain(
    recipe: Recipe,
    accelerator: Accelerator,
    run: RunFolder,
    started: float,
    callback: LoopCallback,
    stop_signals: list[signal.Signals],
) -> dict[str, Any]:
    """:func:`pretrain` once the run folder is locked: build -> resume -> (time budget) -> the loop -> export."""
    set_seed(recipe.train.seed)
    checkpoints = resumable_checkpoints(accelerator, run)  # looked up once: fresh start or resume
    objective, encoder = build_objective(recipe)
    if checkpoints:  # another model's checkpoint is refused before anything in the folder is written
        refuse_another_model(run, checkpoints[0], recipe, objective)
    # model.init: at a fresh start only, after the objective (which may re-initialise the encoder it wraps)
    init = init_weights(recipe.model.init, encoder, objective) if recipe.model.init and not checkpoints else None
    if recipe.train.compile:  # before prepare: the wrappers (DDP, autocast) then call the compiled blocks
        compiled = compile_blocks(objective, encoder, recipe.train.compile_backend, accelerator.is_main_process)
        if compiled and accelerator.is_main_process:
            log.info(
                "train.compile: %d transformer blocks compiled (backend %s)", compiled, recipe.train.compile_backend
            )
    dataset, description, num_samples = _open_data(recipe, objective, accelerator)
    derived = derive(recipe, accelerator.num_processes, num_samples)
    if num_samples is not None and not derived.steps_per_epoch:
        raise DataError(
            f"data.path={recipe.data.path} has {num_samples} images, fewer than one global batch of "
            f"{derived.global_batch_size}; lower train.global_batch_size / train.batch_size_per_device"
        )
    _start_run_folder(accelerator, recipe, derived, run, description)
    loader = data.make_loader(
        dataset,
        derived.batch_size_per_device,
        shuffle=not recipe.data.streaming,  # a stream is shuffled in its own buffer
        drop_last=True,
        cfg=recipe.data,
        seed=recipe.train.seed,
        device=accelerator.device,
    )
    ignore_in_workers(loader, stop_signals)  # a signal to the process group must not kill a loader worker
    optimizer = make_optimizer(objective, recipe, derived)
    prefer_math_attention(objective, accelerator.device, recipe.train.precision)
    if recipe.data.streaming:  # already split over processes by the stream itself: Accelerate must not re-shard it
        model, optimizer = accelerator.prepare(objective, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(objective, optimizer, loader)
    accelerator.init_trackers("tensorboard", config=_hparams(recipe, derived))
    # resume
    state = resume(accelerator, checkpoints, init)
    if recipe.model.init and accelerator.is_main_process:
        for line in describe_init(recipe.model.init, init):  # init is None when resuming: the log says so
            log.info(line)
    vis_batch = fixed_batch(dataset, recipe.log.num_images, accelerator.device, recipe.data.streaming)
    monitor = knn_monitor(recipe, accelerator)
    trainer = Trainer(accelerator, model, optimizer, recipe, derived)
    # time budget: fix the total now (or keep the checkpoint's)
    if recipe.train.budget_minutes:
        plan = _budget_plan(trainer, loader, state, started, monitor)
        state.budget = plan.to_dict()  # stored in every checkpoint: a resumed run keeps this total
        trainer.derived = derive(recipe, accelerator.num_processes, num_samples, plan.total_steps)
        if accelerator.is_main_process:
            run.config_file.write_text(resolved_json(recipe, trainer.derived) + "\n")
    # train
    training_began = time.time()
    summary, stopped = _train_loop(trainer, loader, run, state, vis_batch, monitor, callback)
    training_ended = time.time()
    if stopped is not None:  # a stop signal: the checkpoint is written, no export (the run is not finished)
        accelerator.end_training()
        message = (
            f"{stopped}: stopped after step {state.step} and saved {run.latest_checkpoint()}; run the same command "
            f"to resume (exit code {STOPPED_EXIT_CODE})"
        )
        if accelerator.is_main_process:
            log.warning(message)
        raise RunStopped(STOPPED_EXIT_CODE, message)
    # export the encoder (sharded by FSDP: gathered first, on every process)
    kwargs = type(trainer.objective).backbone_kwargs(recipe.objective)
    encoder = unsharded(
        trainer.objective.encoder_for_export(),
        lambda: build_backbone(recipe.model, **kwargs),
        accelerator.is_main_process,
    )
    if accelerator.is_main_process:
        info = _encoder_info(trainer.objective, recipe)
        export_encoder(encoder, info["architecture"], info["model_args"], run.encoder)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    timing = {
        "startup_s": training_began - started,
        "train_s": training_ended - training_began,
        "export_s": time.time() - training_ended,
        "total_s": time.time() - started,
    }
    extra = {"budget": state.budget} if state.budget is not None else {}
    return {**summary, "run_dir": str(run.root), "encoder": str(run.encoder), "timing": timing, **extra}


def _train_loop(
    trainer: Trainer,
    loader: Any,
    run: RunFolder,
    state: TrainState,
    vis_batch: dict[str, Any] | None,
    monitor: Monitor | None,
    callback: LoopCallback,
) -> tuple[dict[str, Any], str | None]:
    """Steps ``state.step .. total``: one optimisation step, then the log, images, k-NN and checkpoint it is due.

    Returns:
        The summary, and the stop signal's name when one stopped the loop early (after a checkpoint), else None.
    """
    accelerator, recipe, derived, objective = trainer.accelerator, trainer.recipe, trainer.derived, trainer.objective
    encoder_info = _encoder_info(objective, recipe)
    total, accum = derived.total_steps, derived.grad_accum_steps
    spe = derived.steps_per_epoch or total  # a stream has no epochs: it restarts whenever it ends
    first_step = state.step
    state.epoch = state.step // spe
    skip = (state.step % spe) * accum
    batches = micro_batches(accelerator, loader, recipe.data.streaming, state.epoch, skip, spe * accum)
    window = LogWindow(accelerator, recipe, derived, state.step, state.last_log)
    trainer.model.train()
    stopped = None
    while state.step < total and stopped is None:
        callback.on_step_start(state.step)
        began = time.perf_counter()
        result = optimisation_step(trainer, batches, state.step)
        if recipe.train.compile and state.step == first_step and accelerator.is_main_process:
            log.info("train.compile: the first step (compiling) took %.1f s", time.perf_counter() - began)
        if result.epoch != state.epoch:  # the first micro-batch of a new epoch: report the one that ended
            report_skipped(accelerator, state.skipped, state.epoch, state.step, ended=True)
            state.epoch = result.epoch
        state.skipped.add(result.skipped)
        state.bad_in_a_row = 0 if result.finite else state.bad_in_a_row + 1
        if not result.finite:
            handle_bad_step(accelerator, recipe, run.root, state.step, state.bad_in_a_row)
        state.step += 1
        step = state.step
        # log, then the periodic work this step is due for
        window.add(step, result)
        if recipe.log.image_every and vis_batch is not None and (step % recipe.log.image_every == 0 or step == total):
            with _timed(callback, "images"), whole_weights(trainer.model):  # FSDP: gathered on every process
                log_images(accelerator, objective, vis_batch, step)
        if monitor is not None and (step % recipe.eval.knn_every == 0 or step == total):
            with _timed(callback, "knn"), whole_weights(trainer.model):
                window.last.update(monitor(objective.encoder_for_export(), step))
        if result.stop and step < total:  # every process saw the request in this step's all-reduce
            stopped = stop_requested() or "a stop signal to another process"
        if step % recipe.train.checkpoint_every == 0 or step == total or stopped:
            state.last_log = window.last
            saved = state.to_checkpoint(
                recipe.name, accelerator.num_processes, encoder_info, state.skipped.epoch_count(accelerator)
            )
            with _timed(callback, "checkpoint"):
                save_checkpoint(accelerator, run.checkpoints, step, recipe.train.keep_checkpoints, saved)
    if stopped is None:
        report_skipped(accelerator, state.skipped, state.epoch, state.step, ended=state.step % spe == 0)
    return window.close(state.step, state.step - first_step), stopped


@contextlib.contextmanager
def _timed(callback: LoopCallback, what: str) -> Iterator[None]:
    """``with _timed(callback, what):`` reports the block's seconds to ``callback.on_periodic``."""
    start = time.perf_counter()
    yield
    callback.on_periodic(what, time.perf_counter() - start)


def _budget_plan(
    trainer: Trainer, loader: Any, state: TrainState, started: float, monitor: Monitor | None
) -> budget.BudgetPlan:
    """The total steps for ``train.budget_minutes``: the checkpoint's when resuming, else measured now.

    Every process runs the probe (its steps hold collectives); the main process's decision is broadcast.
    """
    accelerator, recipe, derived = trainer.accelerator, trainer.recipe, trainer.derived
    if state.step and state.budget is None:
        raise RecipeError(
            "train.budget_minutes: this run folder holds a run started without a time budget, so its "
            "schedule is fixed already; resume it without train.budget_minutes (or use a new --output-dir)"
        )
    if state.budget is not None:
        plan = budget.BudgetPlan(**state.budget)
        if accelerator.is_main_process:
            total, why = plan.total_steps, budget.describe(plan)
            log.info(
                "train.budget_minutes: keeping the total chosen at the start of this run, %d steps (%s)", total, why
            )
        return plan
    provisional = replace(derived, total_steps=1 << 30, warmup_steps=1 << 29)  # any schedule: the probe is undone
    probe = replace(trainer, derived=provisional)
    objective = trainer.objective
    spe = derived.steps_per_epoch or provisional.total_steps
    batches = micro_batches(accelerator, loader, recipe.data.streaming, 0, 0, spe * derived.grad_accum_steps)

    def sync() -> None:
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)

    def knn() -> None:
        monitor(objective.encoder_for_export(), 0, log_it=False)

    plan = budget.plan_budget(
        recipe.train.budget_minutes,
        started,
        lambda i: optimisation_step(probe, batches, i),
        lambda: budget.training_restore_point(objective, trainer.optimizer, accelerator.scaler),
        sync,
        knn if monitor is not None else None,
        recipe.eval.knn_every,
    )
    if accelerator.num_processes > 1:
        plan = broadcast_object_list([plan], from_process=0)[0]
    if accelerator.is_main_process:
        log.info(budget.describe(plan))
    return plan


def build_objective(recipe: Recipe) -> tuple[Objective, torch.nn.Module]:
    """The recipe's objective around a fresh backbone -> ``(objective, that backbone)`` (benchmarks use it too).

    Raises:
        RecipeError: ``recipe.objective`` is not the named objective's ``Config``.
    """
    objective_cls = OBJECTIVES[recipe.objective.name]
    if not isinstance(recipe.objective, objective_cls.Config):
        raise RecipeError(
            f"objective.name={recipe.objective.name!r} needs a {objective_cls.Config.__name__}, the recipe holds a "
            f"{type(recipe.objective).__name__}; switch objectives with --set objective.name=..."
        )
    encoder = build_backbone(recipe.model, **objective_cls.backbone_kwargs(recipe.objective))
    return objective_cls(encoder, recipe.objective), encoder


def make_optimizer(objective: Objective, recipe: Recipe, derived: Derived) -> torch.optim.Optimizer:
    """The objective's optimizer (:meth:`Objective.make_optimizer`: AdamW by default) at the derived lr."""
    return objective.make_optimizer(derived.lr, recipe.optim)


def prefer_math_attention(model: torch.nn.Module, device: torch.device, precision: str) -> None:
    """bf16 on a CPU: train on timm's math attention, as the fused SDPA backward is ~1.8x slower (BENCHMARKS.md)."""
    if device.type == "cpu" and precision == "bf16":
        set_fused_attention(model, False)


def _open_data(recipe: Recipe, objective: Objective, accelerator: Accelerator) -> tuple[Any, str, int | None]:
    """The training images with the objective's views -> (dataset, description, images per epoch or None)."""
    if not recipe.data.streaming:
        source = maybe_decoded(data.open_source(recipe.data), recipe.data.decode_cache_mb)
        dataset = data.TransformedImages(source, views_for(objective, recipe.data), seed=recipe.train.seed)
        return dataset, dataset.source.description, len(dataset)
    if not (recipe.train.max_steps or recipe.train.budget_minutes):
        raise RecipeError("data.streaming=true gives no epoch length: set train.max_steps or train.budget_minutes")
    stream = data.open_stream(
        recipe.data,
        None,
        views_for(objective, recipe.data),
        accelerator.process_index,
        accelerator.num_processes,
        shuffle_buffer=STREAM_SHUFFLE_BUFFER,
        seed=recipe.train.seed,
    )
    return stream, stream.description, None


def _start_run_folder(accelerator: Accelerator, recipe: Recipe, derived: Derived, run: RunFolder, data_desc) -> None:
    """Write config.json (warn when it differs from an earlier run's) and log the derived values."""
    if not accelerator.is_main_process:
        return
    run.root.mkdir(parents=True, exist_ok=True)
    text = resolved_json(recipe, derived)
    if run.config_file.is_file():
        old, new = json.loads(run.config_file.read_text()), json.loads(text)
        changed = sorted(k for k in {**old, **new} if old.get(k) != new.get(k) and k != "derived")
        if changed:
            log.warning("this run folder was started with a different recipe; sections changed: %s", changed)
    run.config_file.write_text(text + "\n")
    log.info("data: %s", data_desc)
    steps = (
        f"{derived.total_steps} steps in all ({derived.warmup_steps} warmup)"
        if derived.total_steps is not None
        else f"the total number of steps is decided at start (train.budget_minutes={recipe.train.budget_minutes:g})"
    )
    log.info(
        "%d process(es) x %d images x %d accumulation = global batch %d; lr %.3g (base_lr %.3g x %d / 256); "
        "%s steps/epoch, %s",
        derived.world_size,
        derived.batch_size_per_device,
        derived.grad_accum_steps,
        derived.global_batch_size,
        derived.lr,
        recipe.optim.base_lr,
        derived.global_batch_size,
        derived.steps_per_epoch,
        steps,
    )


def _hparams(recipe: Recipe, derived: Derived) -> dict[str, Any]:
    """Flat scalar hyperparameters for TensorBoard's HPARAMS tab."""
    flat: dict[str, Any] = {}
    for section, values in {**recipe.to_dict(), "derived": asdict(derived)}.items():
        for key, value in values.items() if isinstance(values, dict) else [(section, values)]:
            name = f"{section}.{key}" if isinstance(values, dict) else section
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


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
