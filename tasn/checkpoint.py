"""Training checkpoints and the final `model.pt`, on a local path or an s3:// URI.

Everything is stored as tensors and plain containers, so it loads with
`torch.load(weights_only=True)`: a checkpoint from an untrusted bucket cannot run code. A training
checkpoint holds what an interrupted run needs to continue bit for bit: model, optimizer,
scheduler, grad scaler, the random states (python, numpy, torch, cuda), epoch, optimizer step and
the sampler position inside the epoch. Files are named `ckpt-<step>.pt` with the step zero-padded,
so the newest is the last in name order; each is written atomically, so a kill mid-write leaves the
previous one intact (and a temporary file beside it, which `sweep_temporaries` removes when the
next run starts).

Every checkpoint also records a fingerprint of what its weights depend on (`fingerprint`: the
model, loss, train and preprocess settings and the data version). A run resumes only from a
checkpoint with its own fingerprint: continuing another config's weights would train nothing, or
the wrong thing, and then write the new config into model.pt as if it had been trained with it.
`train.force_resume: true` resumes anyway. Resuming `auto` skips an unreadable newest checkpoint
(truncated by a full disk, a foreign file) with a warning and continues from the next kept one.
"""

from __future__ import annotations

import io
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasn import storage
from tasn.config import Config, check
from tasn.config.loader import build
from tasn.errors import ConfigError, DataError, TASNError, shown
from tasn.model import build_model
from tasn.model.network import Network
from tasn.redact import redact_tree

log = logging.getLogger(__name__)

_NAME = re.compile(r"ckpt-(\d{9})\.pt$")
# What tasn.io.atomic_write_bytes leaves beside `ckpt-<step>.pt` when killed mid-write.
_TEMPORARY = re.compile(r"^\.ckpt-\d{9}\.pt\..+\.tmp$")

# The sections a checkpoint's weights depend on, and the keys among them that only steer the run
# (where it saves, what it logs, when it stops early): those may change between a run and its resumption.
FINGERPRINT_SECTIONS = ("model", "loss", "train", "preprocess")
FINGERPRINT_IGNORED = frozenset({
    "train.resume", "train.force_resume", "train.checkpoint_dir", "train.checkpoint_every",
    "train.keep_checkpoints", "train.log_every", "train.picture_images", "train.workers", "train.max_steps",
    "train.chance_check",
    "preprocess.workers",
})
DATA_VERSION = "data.version"  # the fingerprint's data key


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
    if "config" in state:  # the run's config: its URIs may carry credentials
        state = {**state, "config": redact_tree(state["config"])}
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


def load_checkpoint(uri: str, endpoint: str | None = None) -> dict[str, Any]:
    state = from_bytes(storage.read_bytes(uri, endpoint=endpoint), uri)
    missing = {"model", "optimizer", "epoch", "step"} - set(state if isinstance(state, dict) else ())
    if missing:
        raise ValueError(f"{uri} is not a training checkpoint (missing {', '.join(sorted(missing))})")
    return state


def resume_source(resume: str, directory: str, endpoint: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint a run continues from, loaded: `never` -> None; `auto` -> the newest readable
    one in `directory` (an unreadable one is skipped with a warning naming it; None when there is
    none); else `resume` itself, a path or URI that must hold a readable checkpoint."""
    if resume == "never":
        return None
    if resume != "auto":
        if not storage.exists(resume, endpoint):
            raise TASNError(f"--resume {resume}: no checkpoint there")
        try:
            return resume, load_checkpoint(resume, endpoint)
        except ValueError as exc:
            raise TASNError(f"--resume {resume}: {exc}") from exc
    for uri in reversed(list_checkpoints(directory, endpoint)):
        try:
            return uri, load_checkpoint(uri, endpoint)
        except ValueError as exc:
            log.warning("skipping checkpoint %s: %s; trying the one before it", uri, exc)
    return None


def clear_checkpoints(directory: str, endpoint: str | None = None) -> list[str]:
    """Delete the checkpoints in `directory`; returns them. A run that starts afresh in a folder
    (`--resume never`, as the DVC stage does) clears it first: an earlier run's later steps would
    outrank its own, both in the rotation (`save_checkpoint` keeps the newest by step) and when a
    later run resumes `auto`."""
    found = list_checkpoints(directory, endpoint)
    for uri in found:
        storage.delete(uri, endpoint=endpoint)
    if found:
        log.warning("starting afresh (resume never): removed %d checkpoint(s) an earlier run left in %s",
                    len(found), directory)
    return found


def sweep_temporaries(directory: str) -> list[str]:
    """Delete what killed checkpoint writes left in a local checkpoint folder (an S3 PUT leaves
    nothing); returns the removed paths. Call at the start of the run that owns the folder."""
    folder = Path(directory)
    if storage.is_s3(directory) or not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and _TEMPORARY.match(path.name):
            path.unlink(missing_ok=True)
            removed.append(str(path))
            log.warning("removed %s, left by a checkpoint write that was killed", path)
    return removed


# -- fingerprints ----------------------------------------------------------------------------

def fingerprint(cfg: Config, data_version: str | None) -> dict[str, Any]:
    """`section.key -> value` of everything a checkpoint's weights depend on, plus the data version."""
    flat = cfg.flat()
    keys = (k for k in flat if k.split(".", 1)[0] in FINGERPRINT_SECTIONS and k not in FINGERPRINT_IGNORED)
    return redact_tree({**{k: flat[k] for k in sorted(keys)}, DATA_VERSION: data_version})


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`key (saved -> current)` for every key whose value differs (or is missing on one side)."""
    missing = object()
    keys = sorted(set(saved) | set(current))
    return [f"{k} ({saved.get(k, 'unset')!r} -> {current.get(k, 'unset')!r})" for k in keys
            if saved.get(k, missing) != current.get(k, missing)]


def check_fingerprint(uri: str, state: dict[str, Any], current: dict[str, Any], force: bool) -> list[str]:
    """The differences between the checkpoint's fingerprint and this run's; a ConfigError naming
    them unless `force` (then they are returned, for the caller to report)."""
    saved = state.get("fingerprint")
    if saved is None:
        diffs = ["the checkpoint has no fingerprint (written by an older tasn)"]
    else:
        diffs = differences(dict(saved), current)
    if diffs and not force:
        raise ConfigError(
            f"{uri} was written by a run of another config or data, so it cannot be continued: "
            f"{'; '.join(diffs)}. Start afresh with -S train.resume=never (or another --out or "
            "train.checkpoint_dir), or resume anyway with -S train.force_resume=true"
        )
    return diffs


# -- the final model -------------------------------------------------------------------------

def model_payload(model: torch.nn.Module, config: dict[str, Any], classes: list[str], **extra: Any) -> dict[str, Any]:
    """The `model.pt` contract of docs/stages.md: weights, the resolved config (credentials in its
    URIs redacted: `tasn.redact.redact_tree`), class names, kind."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": redact_tree(config),
        "classes": list(classes),
        "kind": config["model"]["kind"],
        **extra,
    }


def save_model(uri: str, model: torch.nn.Module, config: dict[str, Any], classes: list[str],
               endpoint: str | None = None, **extra: Any) -> str:
    return storage.write_bytes(uri, to_bytes(model_payload(model, config, classes, **extra)), endpoint=endpoint)


# TASN keys added after model files were first written, with the value every file from before had.
BEFORE_THE_KEY = {"att_stride": 8, "structure_power": 2.0, "detail_power": 1.0}


def recorded_config(config: Any, where: str) -> Config:
    """The config a model file (or checkpoint) records, held to the rules of a params file
    (`tasn.config.loader.build` and `check`): a file edited by hand or by an attacker cannot
    ask for 10^8 sampler iterations or keys no network takes."""
    model = config.get("model") if isinstance(config, dict) else None
    if isinstance(model, dict) and model.get("kind", "tasn") == "tasn":
        # recorded before a key existed: the value every TASN had then, not today's default
        config = {**config, "model": {**BEFORE_THE_KEY, **model}}
    try:
        cfg: Config = build(Config, config)
        check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: the config recorded in it is not valid: {exc}") from None
    return cfg


def load_model(path_or_uri: str, endpoint: str | None = None) -> tuple[Network, dict[str, Any]]:
    """Rebuild the network from a `model.pt` (or a training checkpoint, which carries the same
    keys) and return (model in eval mode, meta); meta is the payload without the weights, its
    config the checked one (`recorded_config`)."""
    payload = from_bytes(storage.read_bytes(path_or_uri, endpoint=endpoint), path_or_uri)
    if not isinstance(payload, dict) or not {"model", "config", "classes"} <= set(payload):
        raise ValueError(f"{path_or_uri} is not a TASN model file (needs model, config, classes)")
    cfg = recorded_config(payload["config"], path_or_uri)
    classes = payload["classes"]
    if not (isinstance(classes, list) and 0 < len(classes) <= 10**6 and all(isinstance(c, str) for c in classes)):
        raise ConfigError(f"{path_or_uri}: its classes must be a non-empty list of names, got {shown(classes)}")
    cfg.model.pretrained = cfg.model.att_pretrained = "none"  # the weights are in the file
    model = build_model(cfg.model, len(classes))
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:  # shapes, missing keys, not a state dict
        raise DataError(f"{path_or_uri}: its weights do not fit the {cfg.model.kind} network its config "
                        f"describes ({shown(str(exc))})") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "model"}
    meta["config"] = cfg.to_dict()
    return model, meta
