"""PreparedDataset and TASN's transforms, checked against direct decoding and torchvision math."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

from tasn.data.dataset import PreparedDataset
from tasn.data.preprocess import MANIFEST, SHARDS, preprocess
from tasn.data.transforms import EIGVAL, EIGVEC, MEAN, STD, Lighting, denormalize, eval_transform, train_transform
from tasn.errors import DataError
from test_data_support import TINY, TINY_PREP, tiny_synth


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    base = tmp_path_factory.mktemp("ds")
    preprocess(tiny_synth(base / "raw"), base / "prep", TINY_PREP)
    return base / "prep"


def test_dataset_reads_split_with_labels_and_classes(prepared):
    train, test = PreparedDataset(prepared, "train"), PreparedDataset(prepared, "test")
    assert (len(train), len(test)) == (TINY.classes * TINY.train_per_class, TINY.classes * TINY.test_per_class)
    assert train.classes == test.classes and len(train.classes) == TINY.classes
    assert train.labels == sorted(list(range(TINY.classes)) * TINY.train_per_class)
    m = pd.read_parquet(prepared / MANIFEST)
    row = m[m.split == "test"].iloc[1]
    stored = (prepared / row.shard).read_bytes()[row.offset : row.offset + row.length]
    direct = Image.open(io.BytesIO(stored)).convert("RGB")
    assert np.array_equal(np.asarray(test.image(1)), np.asarray(direct))
    x, y = test[1]
    assert y == row.label and x.dtype == torch.float32 and x.shape == (3, row.height, row.width)
    assert torch.allclose(x, torch.from_numpy(np.array(direct)).permute(2, 0, 1).float() / 255)
    with pytest.raises(ValueError, match="split must be one of"):
        PreparedDataset(prepared, "val")
    with pytest.raises(DataError, match=f"{MANIFEST}: missing"):
        PreparedDataset(prepared / SHARDS, "train")


def test_dataset_works_with_loader_workers_and_distributed_sampler(prepared):
    ds = PreparedDataset(prepared, "train", eval_transform(48))
    ds[0]  # opens a shard map in this process; pickling must drop it
    assert pickle.loads(pickle.dumps(ds))._maps == {}
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=1)
        loader = DataLoader(ds, batch_size=3, sampler=sampler, num_workers=1 if rank == 0 else 0)
        for x, y in loader:
            assert x.shape[1:] == (3, 48, 48)
            seen += y.tolist()
    assert sorted(seen) == sorted(ds.labels)


def test_eval_transform_is_a_normalised_centre_crop():
    arr = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    x = eval_transform(40)(Image.fromarray(arr))
    top, left = (60 - 40) // 2, (90 - 40) // 2
    expected = (torch.from_numpy(arr[top : top + 40, left : left + 40]).permute(2, 0, 1).float() / 255
                - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-6)
    unnormalised = expected * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert torch.allclose(denormalize(x), unnormalised, atol=1e-6)
    assert eval_transform(40, resize=50)(Image.fromarray(arr)).shape == (3, 40, 40)  # 60x90 -> 50x75 -> 40x40
    batch = torch.stack([x, x])
    assert torch.equal(denormalize(batch)[1], denormalize(x))


def test_train_transform_crops_pads_and_is_seeded():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    t = train_transform(64, jitter=0.4, rotation=30)
    torch.manual_seed(0)
    a = t(img)
    torch.manual_seed(0)
    b = t(img)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)  # smaller than the crop: padded
    torch.manual_seed(1)
    assert not torch.equal(a, t(img))
    plain = train_transform(40, jitter=0.0, rotation=0.0, lighting=0.0)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = denormalize(plain(img))
        crops = [torch.from_numpy(np.array(img)[r : r + 40, c : c + 40]).permute(2, 0, 1).float() / 255
                 for r in range(11) for c in range(31)]
        match = [i for i, c in enumerate(crops) if torch.allclose(out, c, atol=1e-5)]
        mirrored = [i for i, c in enumerate(crops) if torch.allclose(out, c.flip(-1), atol=1e-5)]
        assert match or mirrored  # without jitter, rotation, lighting: exactly a (possibly flipped) crop
        flips.add(bool(mirrored))
    assert flips == {True, False}


def test_lighting_noise_is_the_pca_shift_of_alexnet_and_mxnet():
    img = torch.rand(3, 5, 7)
    torch.manual_seed(3)
    out = Lighting(0.1)(img)
    torch.manual_seed(3)
    alpha = (torch.randn(3) * 0.1).tolist()
    shift = [sum(EIGVEC[c][j] * alpha[j] * EIGVAL[j] for j in range(3)) for c in range(3)]  # by hand
    for c in range(3):
        assert torch.allclose(out[c] - img[c], torch.full((5, 7), shift[c]), atol=1e-6)


def test_rotation_fills_the_corners_white_as_mxnet_does():
    grey = Image.fromarray(np.full((80, 80, 3), 100, np.uint8))
    t = train_transform(80, jitter=0.0, rotation=30.0, lighting=0.0)
    white_corners = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = denormalize(t(grey))
        assert out.min() > 100 / 255 - 0.02  # nothing darker than the image: no black fill
        white_corners += bool(out[:, 0, 0].min() > 0.98)
    assert white_corners >= 4  # most angles in [-30, 30] move the corner out of the image
