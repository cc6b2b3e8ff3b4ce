"""The global batch: a recipe's "batch 96" on whatever number of processes runs it.

`train.batch_size` is per process: one forward pass, and the batch BatchNorm takes its statistics
over. The loss is a mean over it and DistributedDataParallel averages the gradients over processes,
so an optimizer step's gradient is the mean over `batch_size x accum_steps x processes` images, and
a learning rate tuned for one global batch is wrong for another (the authors' note: "lr is supposed
to be tuned if you use less gpus").

A recipe that states its global batch (`train.global_batch_size`; the `cub` profiles: 96, the
authors' 8 GPUs x 12) keeps it on any number of processes by gradient accumulation:
`accum_steps = global / (batch_size x processes)`. One GPU then accumulates 8 micro-batches of 12,
and trains as the authors' 8 GPUs did: the same gradient over 96 images per step at lr 0.1, and
BatchNorm over 12 images at a time (MXNet's BatchNorm was per GPU). Where the global batch is not a
multiple of `batch_size x processes`, the nearest accumulation is used and the learning rate is
scaled with the batch actually used (the linear scaling rule, Goyal et al. 2017), with a warning.
Without a global batch, a run on several processes warns that its global batch grew with them.
"""

from __future__ import annotations

import dataclasses
import logging

from tasn.config import TrainConfig

log = logging.getLogger(__name__)


def for_world_size(train: TrainConfig, world_size: int) -> TrainConfig:
    """`train` with `accum_steps` (and, where the batch cannot be met exactly, `lr`) set for
    `world_size` processes; unchanged without `global_batch_size`."""
    per_pass = train.batch_size * world_size
    target = train.global_batch_size
    if not target:
        if world_size > 1:
            log.warning("train.global_batch_size is not set: each step averages %d x %d x %d processes = %d images at "
                        "lr %g; set it to keep a recipe's global batch on any number of processes",
                        train.batch_size, train.accum_steps, world_size, per_pass * train.accum_steps, train.lr)
        return train
    accum = max(1, round(target / per_pass))
    used = accum * per_pass
    lr = train.lr * used / target
    if used != target:
        log.warning("train.global_batch_size %d is not a multiple of train.batch_size %d x %d processes: "
                    "accumulating %d micro-batches gives %d images per step, so the learning rate is scaled with "
                    "it, %g -> %g", target, train.batch_size, world_size, accum, used, train.lr, lr)
    else:
        log.info("global batch %d = %d per process x %d processes x %d accumulated micro-batches, lr %g",
                 target, train.batch_size, world_size, accum, lr)
    return dataclasses.replace(train, accum_steps=accum, lr=lr)
