"""What each rank reads, in which order, with which random numbers.

- `ResumableSampler` shards an epoch's seeded permutation over the ranks and can start mid-epoch,
  so a resumed run sees exactly the batches it would have seen.
- `EpochSeeded` makes augmentation a function of (seed, epoch, sample index): an image is augmented
  identically whichever rank or worker loads it and whether or not the run was interrupted.
- Loaders take their own generator (and seed their workers from it), so they never draw from the
  global RNG that the model's own randomness (the detail-map channel picks) uses.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from tasn.config import Config
from tasn.data.dataset import PreparedDataset
from tasn.data.transforms import eval_transform, train_transform
from tasn.distributed import Context
from tasn.errors import DataError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed torch (CPU) and python seed, then restore both generators."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSeeded(Dataset):
    """Augmentation as a function of (seed, epoch, index): the same sample gets the same random
    crop/flip/jitter no matter which rank, worker or resumed process loads it."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(_sized(self.dataset))

    def __getitem__(self, index: int) -> Any:
        with seeded(sample_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can skip the first `consumed` samples (global count) of an epoch.

    The epoch's global order is the seeded permutation; what is left after `consumed` is dealt
    round-robin to the ranks. With consumed = 0 this is exactly DistributedSampler's sharding, and
    one process with batch 2b reads, step by step, the union of what two processes with batch b
    read, which is what makes 1-process and N-process runs comparable.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.consumed = 0

    def set_position(self, epoch: int, consumed: int = 0) -> None:
        self.set_epoch(epoch)
        self.consumed = consumed

    def _remaining(self) -> list[int]:
        n = len(_sized(self.dataset))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        rest = order[self.consumed:]
        pad = (-len(rest)) % self.num_replicas
        return rest + (order * math.ceil(pad / max(n, 1)))[:pad]

    def __iter__(self) -> Iterator[int]:
        return iter(self._remaining()[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(max(len(_sized(self.dataset)) - self.consumed, 0) / self.num_replicas)


def _sized(dataset: Dataset) -> Sized:
    """Map-style datasets have a length; torch's `Dataset` type does not say so."""
    assert isinstance(dataset, Sized), f"{type(dataset).__name__} has no len()"
    return dataset


def seed_worker(worker_id: int) -> None:
    """numpy and python in a loader worker follow torch's per-worker seed (itself from the
    loader's own generator), so workers are reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, sampler: ResumableSampler | None, workers: int,
                device: torch.device, seed: int, drop_last: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class TrainData:
    """The prepared splits as one rank reads them: the augmented, sharded, resumable train split
    and this rank's shard of the test split."""

    train_set: EpochSeeded
    test_set: PreparedDataset  # the whole test split (pictures are drawn from it on rank 0)
    sampler: ResumableSampler
    test_loader: DataLoader
    classes: list[str]
    batches_per_epoch: int  # per rank
    cfg: Config
    device: torch.device

    def epoch_loader(self, epoch: int, batch: int) -> DataLoader:
        """The train loader of `epoch`, starting after `batch` micro-batches (per rank) were read."""
        t = self.cfg.train
        self.train_set.epoch = epoch
        self.sampler.set_position(epoch, batch * t.batch_size * self.sampler.num_replicas)
        return make_loader(self.train_set, t.batch_size, self.sampler, t.workers, self.device,
                           t.seed + epoch, drop_last=True)

    def pictures(self, count: int) -> tuple[torch.Tensor, list[int]] | None:
        """A fixed, evenly spread set of test images (the same every epoch) with their labels."""
        if count <= 0:
            return None
        n = len(self.test_set)
        idx = sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})
        items = [self.test_set[i] for i in idx]
        return torch.stack([x for x, _ in items]), [int(y) for _, y in items]


def load_data(cfg: Config, data_dir: Path, ctx: Context) -> TrainData:
    """The train split with augmentation, the test split with the eval crop, sharded for `ctx`."""
    t, m = cfg.train, cfg.model
    train_set = PreparedDataset(data_dir, "train", train_transform(m.input_size, t.jitter, t.rotation, t.lighting))
    test_set = PreparedDataset(data_dir, "test", eval_transform(m.input_size))
    if len(train_set) == 0 or len(test_set) == 0:
        raise DataError(f"{data_dir}: the train and test splits must both be non-empty "
                        f"(train {len(train_set)}, test {len(test_set)} images)")
    batches = len(train_set) // ctx.world_size // t.batch_size
    if batches == 0:
        raise DataError(f"{data_dir}: {len(train_set)} training images are fewer than one batch of "
                        f"{t.batch_size} per process x {ctx.world_size} processes")
    augmented = EpochSeeded(train_set, t.seed)
    shard = Subset(test_set, range(ctx.rank, len(test_set), ctx.world_size))
    return TrainData(
        train_set=augmented,
        test_set=test_set,
        sampler=ResumableSampler(augmented, ctx.world_size, ctx.rank, shuffle=True, seed=t.seed),
        test_loader=make_loader(shard, cfg.evaluate.batch_size, None, t.workers, ctx.device, t.seed,
                                drop_last=False),
        classes=list(train_set.classes),
        batches_per_epoch=batches,
        cfg=cfg,
        device=ctx.device,
    )
