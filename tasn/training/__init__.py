"""The training stage: one process on a laptop CPU, or many under `torchrun` on many GPUs.

Plain on purpose, in the shape of torchvision's references/classification. By role:

- `stage`: `train(cfg, data_dir, out_dir)`, the orchestration that reads top to bottom.
- `sampling`: sharding (`ResumableSampler`, a DistributedSampler that can start mid-epoch) and
  reproducible augmentation (seeded per (seed, epoch, sample index)), the loaders.
- `modes`: determinism, precision (bf16 autocast on CUDA, fp32 on CPU), channels-last, BatchNorm.
- `optim`: the optimizer and learning-rate schedule from `train.*` (stepped per optimizer step).
- `batch`: a stated global batch (`train.global_batch_size`) kept on any number of processes.
- `loop`: `Loop`, one epoch of optimizer steps (gradient accumulation, DDP no-sync, logging and
  checkpoint cadence, `max_steps`) and the one `end_epoch` step; its state is the checkpoint.
- `meter`: `MetricLogger`, the running means of the loss terms and the throughput.
- `progress`: `EpochProgress`, a bar on a terminal, a few lines per epoch in a log.
- `outputs`: the output file names and what rank 0 writes at the end.

Checkpoints (tasn.checkpoint) every `checkpoint_every` optimizer steps and at each epoch end hold
the sampler position: a run killed mid-epoch and resumed sees the same batches, in the same order,
with the same random state, and ends with the same weights. Tracking (tasn.tracking) is checked
before any work and retried during it.
"""

from tasn.training.outputs import TrainResult
from tasn.training.stage import train

__all__ = ["TrainResult", "train"]
