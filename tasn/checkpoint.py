"""Training checkpoints and the final `model.pt`, on a local path or an s3:// URI.

Everything is stored as tensors and plain containers, so it loads with
`torch.load(weights_only=True)`: a checkpoint from an untrusted bucket cannot run code. A training
checkpoint holds what an interrupted run needs to continue bit for bit: model, optimizer,
scheduler, grad scaler, the random states (python, numpy, torch, cuda), epoch, optimizer step and
the sampler position inside the epoch. Files are named `ckpt-<step>.pt` with the step zero-padded,
so the newest is the last in name order; each is written atomically, so a kill mid-write leaves the
previous one intact.
"""

from __future__ import annotations

import io
import logging
import random
import re
from typing import Any

import numpy as np
import torch

from tasn import storage
from tasn.config import ModelConfig
from tasn.errors import TASNError
from tasn.model import build_model
from tasn.model.network import Network

log = logging.getLogger(__name__)

_NAME = re.compile(r"ckpt-(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.pt"


def to_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def from_bytes(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: name it
        raise ValueError(f"{where} is not a readable checkpoint: {exc}") from exc


# -- random states ---------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA generator states as tensors and plain containers."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    return {
        "python": random.getstate(),
        "numpy": np_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"], key=np_state["state"]["key"].numpy().astype(np.uint32))
    np.random.set_state(np_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- training checkpoints --------------------------------------------------------------------

def save_checkpoint(state: dict[str, Any], directory: str, step: int, keep: int = 2,
                    endpoint: str | None = None) -> str:
    """Write `state` as `<directory>/ckpt-<step>.pt` and delete all but the `keep` newest."""
    uri = storage.join(directory, checkpoint_name(step))
    storage.write_bytes(uri, to_bytes(state), endpoint=endpoint)
    if keep > 0:
        for old in list_checkpoints(directory, endpoint)[:-keep]:
            storage.delete(old, endpoint=endpoint)
    return uri


def list_checkpoints(directory: str, endpoint: str | None = None) -> list[str]:
    """Checkpoints in `directory`, oldest first (temporary files of interrupted writes excluded)."""
    found = [u for u in storage.list_prefix(directory, endpoint) if _NAME.search(u.rsplit("/", 1)[-1])]
    return sorted(found, key=lambda u: u.rsplit("/", 1)[-1])


def latest_checkpoint(directory: str, endpoint: str | None = None) -> str | None:
    found = list_checkpoints(directory, endpoint)
    return found[-1] if found else None


def resume_source(resume: str, directory: str, endpoint: str | None = None) -> str | None:
    """The checkpoint a run continues from: `never` -> None, `auto` -> the newest in `directory`
    (None when there is none), else `resume` itself, which must exist."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(directory, endpoint)
    if not storage.exists(resume, endpoint):
        raise TASNError(f"--resume {resume}: no checkpoint there")
    return resume


def load_checkpoint(uri: str, endpoint: str | None = None) -> dict[str, Any]:
    state = from_bytes(storage.read_bytes(uri, endpoint=endpoint), uri)
    missing = {"model", "optimizer", "epoch", "step"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{uri} is not a training checkpoint (missing {', '.join(sorted(missing))})")
    return state


# -- the final model -------------------------------------------------------------------------

def model_payload(model: torch.nn.Module, config: dict[str, Any], classes: list[str], **extra: Any) -> dict[str, Any]:
    """The `model.pt` contract of docs/stages.md: weights, the resolved config, class names, kind."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": config,
        "classes": list(classes),
        "kind": config["model"]["kind"],
        **extra,
    }


def save_model(uri: str, model: torch.nn.Module, config: dict[str, Any], classes: list[str],
               endpoint: str | None = None, **extra: Any) -> str:
    return storage.write_bytes(uri, to_bytes(model_payload(model, config, classes, **extra)), endpoint=endpoint)


def load_model(path_or_uri: str, endpoint: str | None = None) -> tuple[Network, dict[str, Any]]:
    """Rebuild the network from a `model.pt` (or a training checkpoint, which carries the same
    keys) and return (model in eval mode, meta); meta is the payload without the weights."""
    payload = from_bytes(storage.read_bytes(path_or_uri, endpoint=endpoint), path_or_uri)
    if not isinstance(payload, dict) or not {"model", "config", "classes"} <= set(payload):
        raise ValueError(f"{path_or_uri} is not a TASN model file (needs model, config, classes)")
    model_cfg = ModelConfig(**payload["config"]["model"])
    model_cfg.pretrained = model_cfg.att_pretrained = "none"  # the weights are in the file
    model = build_model(model_cfg, len(payload["classes"]))
    model.load_state_dict(payload["model"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "model"}
    return model, meta
