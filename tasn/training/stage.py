"""`train`: the training stage, from a prepared dataset to model.pt, metrics and an MLflow run.

`_train` reads top to bottom like torchvision's references/classification `main`: determinism and
seeds, data, model, optimizer and schedule, resume, wrap for DDP, start tracking, then the epochs
(train, end of epoch) and the outputs.

Resuming: what killed checkpoint writes left is swept first; the checkpoint is the newest readable
one (or `--resume`'s), and only one whose fingerprint (model, loss, train and preprocess settings,
the data version preprocess recorded) is this run's own, unless `train.force_resume`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from tasn import checkpoint, distributed, lineage, storage, tracking
from tasn.config import Config, check
from tasn.data.preprocess import SUMMARY
from tasn.errors import ConfigError, DataError, TASNError
from tasn.io import check_apart, output_lock
from tasn.model import build_loss, build_model
from tasn.model.sampler import implementation as sampler_implementation
from tasn.training import batch
from tasn.training.diagnose import TAG, ChanceWatch
from tasn.training.loop import Loop
from tasn.training.modes import configure_determinism, place
from tasn.training.optim import build_optimizer, build_scheduler, plan_budget
from tasn.training.outputs import CHECKPOINTS, TrainResult, write_outputs
from tasn.training.sampling import load_data, seed_everything

log = logging.getLogger(__name__)


def train(cfg: Config, data_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
          resume: str | None = None) -> TrainResult:
    """Train `cfg.model` on the prepared data at `data_dir`; write the outputs to `out_dir`.

    `resume`: None = `cfg.train.resume`; "auto" = the newest checkpoint in the checkpoint folder
    (what an elastic torchrun restart wants); "never"; or a checkpoint path / s3:// URI.
    Returns the result on every rank; only rank 0 writes files.
    """
    check(cfg)
    data, out = Path(data_dir), Path(out_dir)
    if not data.is_dir():
        raise DataError(f"--data {data}: no such directory (run `tasn preprocess` first)")
    check_apart(data, out, DataError, "--out")
    if cfg.train.checkpoint_dir and not storage.is_s3(cfg.train.checkpoint_dir):
        check_apart(data, cfg.train.checkpoint_dir, ConfigError, "train.checkpoint_dir")
    ctx = distributed.init()
    if not ctx.is_main:
        logging.getLogger("tasn").setLevel(logging.WARNING)
    try:  # rank 0 holds --out: a second `tasn train` into it refuses, naming this one
        with output_lock(out) if ctx.is_main else contextlib.nullcontext():
            if ctx.is_main and cfg.tracking.enabled:
                tracking.setup(cfg.tracking)  # fail fast, before any data or model work
            return _train(cfg, data, out, resume or cfg.train.resume, ctx)
    finally:
        distributed.cleanup()


def _train(cfg: Config, data_dir: Path, out_dir: Path, resume: str, ctx: distributed.Context) -> TrainResult:
    configured = cfg  # what a checkpoint must match; `cfg` is what runs, its global batch on ctx.world_size
    cfg = dataclasses.replace(cfg, train=batch.for_world_size(cfg.train, ctx.world_size))
    t = cfg.train
    configure_determinism(t.deterministic)
    seed_everything(t.seed)
    data = load_data(cfg, data_dir, ctx)
    steps_per_epoch = math.ceil(data.batches_per_epoch / t.accum_steps)
    cfg = with_budget(cfg, steps_per_epoch)
    t = cfg.train
    model = place(build_model(cfg.model, len(data.classes)), t, ctx)  # identical on every rank: same seed
    seed_everything(t.seed + 1000 * ctx.rank)  # ranks draw independent random numbers from here
    optimizer = build_optimizer(model.parameters(), t)
    scheduler = build_scheduler(optimizer, t, steps_per_epoch=steps_per_epoch)
    loss_fn = build_loss(cfg.model, cfg.loss, t.label_smoothing).to(ctx.device)
    data_version = lineage.recorded_data_version(data_dir / SUMMARY)
    budget = t.epochs * steps_per_epoch if not t.max_steps else min(t.max_steps, t.epochs * steps_per_epoch)
    loop = Loop(cfg, ctx, model, loss_fn, optimizer, scheduler, data.classes,
                ckpt_dir=t.checkpoint_dir or str(out_dir / CHECKPOINTS),
                fingerprint=checkpoint.fingerprint(configured, data_version), budget=budget)
    resume_from(loop, resume)
    if ctx.distributed:
        loop.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    if ctx.is_main and cfg.tracking.enabled:
        loop.run = start_run(cfg, data_dir, data_version, ctx, loop.run_id)
        loop.run_id = loop.run.run_id
    pictures = data.pictures(t.picture_images) if ctx.is_main else None
    watch = ChanceWatch(cfg, len(data.classes), max(1, budget), gated_steps=loop.attention_first_steps(),
                        epoch_start=loop.pos.step)

    status = "FAILED"
    try:
        metrics: dict[str, float] = {}
        train_loss = math.nan
        while not loop.done():
            train_loss = loop.train_epoch(data.epoch_loader(loop.pos.epoch, loop.pos.batch), data.batches_per_epoch)
            metrics = loop.end_epoch(train_loss, data.test_loader, data.batches_per_epoch, pictures, out_dir)
            warn(loop, watch.after_epoch(loop.pos.step, len(loop.history), train_loss))
        if metrics:
            warn(loop, watch.at_end(train_loss, metrics.get(f"{loop.net.primary_head}_top1")))
        else:  # resumed a finished run: nothing trained, evaluate what there is
            metrics = loop.evaluate(data.test_loader)
            train_loss = loop.history[-1]["train_loss"] if loop.history else math.nan
        result = None
        if ctx.is_main:
            result = write_outputs(out_dir, loop.net, cfg, data.classes, metrics, train_loss, loop.history,
                                   loop.steps, loop.pos.step, loop.run)
        status = "FINISHED"
        distributed.barrier()
        final = distributed.broadcast_object(result)  # rank 0's, on every rank
        assert final is not None
        return final
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if loop.run is not None:
            loop.run.end(status)


def with_budget(cfg: Config, steps_per_epoch: int) -> Config:
    """`cfg` with the epochs `train.min_steps` asks for on this data (tasn.training.optim.plan_budget)."""
    t = cfg.train
    planned = plan_budget(t, steps_per_epoch)
    if planned.epochs == t.epochs:
        return cfg
    log.info("train.min_steps %d: %d epochs of %d optimizer steps are %d; training %d epochs (%d steps)",
             t.min_steps, t.epochs, steps_per_epoch, t.epochs * steps_per_epoch, planned.epochs,
             planned.epochs * steps_per_epoch)
    return dataclasses.replace(cfg, train=planned)


def warn(loop: Loop, message: str | None) -> None:
    """A ChanceWatch warning: logged on rank 0 and set as a tag of the MLflow run."""
    if message and loop.ctx.is_main:
        log.warning("train: %s", message)
        if loop.run is not None:
            loop.run.set_tags({TAG: message})


def resume_from(loop: Loop, resume: str) -> None:
    """Continue from the checkpoint `resume` picks (tasn.checkpoint.resume_source), if its
    fingerprint is this run's (or `train.force_resume`); `never` starts afresh and clears the
    checkpoint folder of an earlier run's. Rank 0 picks it; every rank loads it and checks the
    fingerprint, so a refusal stops every rank, not only the first."""
    ctx = loop.ctx
    if ctx.is_main:
        checkpoint.sweep_temporaries(loop.ckpt_dir)
        if resume == "never":
            checkpoint.clear_checkpoints(loop.ckpt_dir, loop.endpoint)
    picked = checkpoint.resume_source(resume, loop.ckpt_dir, loop.endpoint) if ctx.is_main else None
    source = distributed.broadcast_object(picked[0] if picked else None)
    if not source:
        return
    state = picked[1] if picked else checkpoint.load_checkpoint(source, loop.endpoint)
    diffs = checkpoint.check_fingerprint(source, state, loop.fingerprint, loop.cfg.train.force_resume)
    if diffs:
        log.warning("train.force_resume: continuing %s although %s", source, "; ".join(diffs))
    try:
        loop.restore(state)
    except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict of another model, a foreign state
        raise TASNError(f"cannot resume from {source}: {exc}"[:2000]) from exc
    log.info("resuming from %s at epoch %d, batch %d, step %d", source, loop.pos.epoch + 1, loop.pos.batch,
             loop.pos.step)


def start_run(cfg: Config, data_dir: Path, data_version: str | None, ctx: distributed.Context,
              run_id: str | None) -> tracking.Run:
    """The MLflow run (continued when a checkpoint names one): lineage and context tags, the whole
    config, the data as a dataset input. `data.version` is set only when known (the registry reads
    a missing one as unknown)."""
    tags = {
        tracking.GIT_COMMIT_TAG: lineage.git_commit(),
        tracking.DATA_VERSION_TAG: data_version,
        "data.path": str(data_dir),
        "model.kind": cfg.model.kind,
        "world_size": str(ctx.world_size),
        "device": str(ctx.device.type),
        **machine_tags(ctx),
        **tracking.context_tags(),
    }
    if cfg.model.kind == "tasn":  # the fused CUDA op, or the reference (CPU; a GPU without the op)
        tags["sampler"] = sampler_implementation(ctx.device)
    m = cfg.model
    run = tracking.Run(cfg.tracking, tags, run_id=run_id, run_name=tracking.run_name(m.kind, m.backbone, m.out_size))
    run.log_params(run_params(cfg, ctx.world_size))
    run.log_dataset(str(data_dir.resolve()), tags[tracking.DATA_VERSION_TAG])
    return run


def machine_tags(ctx: distributed.Context) -> dict[str, str]:
    """What a run's numbers depend on besides its settings and seed: the same seed gives the same
    weights on one machine and thread count, but another CPU's kernels (instruction set, cache
    blocking) or thread count round differently, and a few hundred steps make that a different
    model (README, "Same seed, same result"). Tagged so two runs can be told apart in the UI."""
    tags = {"machine.cpu": lineage.cpu_model(), "machine.threads": str(torch.get_num_threads()),
            "machine.cpu_kernels": str(torch.backends.cpu.get_cpu_capability())}
    if ctx.device.type == "cuda":
        tags["machine.gpu"] = torch.cuda.get_device_name(ctx.device)
    return tags


def run_params(cfg: Config, world_size: int) -> dict[str, object]:
    """The run's MLflow params: the settings its weights depend on (the checkpoint fingerprint's
    keys: model, loss, train and preprocess, less where it saves and what it logs), where it was
    told to stop (`train.max_steps`) and how many processes shared a step. The other stages'
    knobs, the data generators' and the tracking settings are no part of what this run trained,
    and the data is the run's dataset input and tags."""
    weights = checkpoint.fingerprint(cfg, None)
    weights.pop(checkpoint.DATA_VERSION)
    return {**weights, "train.max_steps": cfg.train.max_steps, "world_size": world_size}
