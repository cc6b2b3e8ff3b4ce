"""The promotion lock: a registered model named `<name>.promotion-lock` whose creation is atomic.

MLflow has no transactions, and two promotions may race (two pipeline runs finishing together).
The gate's read-decide-write therefore runs under this lock: its creation is atomic in the tracking
store (a unique name), it is deleted when done, and the second promoter waits, then compares
against the first one's result. A lock left by a killed process expires after `LOCK_LEASE_S`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasn.errors import ServiceError
from tasn.registry.versions import actor, error_code, utc_now

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_S = 600.0


@contextlib.contextmanager
def promotion_lock(mc: MlflowClient, name: str, timeout: float = 120.0, lease: float = LOCK_LEASE_S) -> Iterator[str]:
    """Hold `<name>.promotion-lock` for the duration of the block.

    Waits up to `timeout` seconds for another holder; a lock whose lease has run out (its process
    died) is removed and taken over.
    """
    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    while True:
        tags = {"owner": actor(), "token": token, "since": utc_now(), "expires": repr(time.time() + lease)}
        try:
            mc.create_registered_model(lock, tags=tags,
                                       description=f"promotion lock of {name}; delete only if its owner died")
            break
        except MlflowException as exc:
            if error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise ServiceError(f"cannot take the promotion lock {lock!r}: {exc.message}") from exc
        held = lock_tags(mc, lock)
        if held is None:
            continue  # released between our two calls
        if float(held.get("expires", "0")) < time.time():
            log.warning("promotion lock %s of %s expired; taking it over", lock, held.get("owner"))
            release(mc, lock, held.get("token"))
            continue
        if time.monotonic() > deadline:
            raise ServiceError(
                f"model {name!r} is being promoted by {held.get('owner')} (lock {lock!r} held since "
                f"{held.get('since')}); try again later, or delete that registered model if its owner died"
            )
        time.sleep(0.1 + random.random() * 0.2)
    try:
        yield lock
    finally:
        release(mc, lock, token)


def lock_tags(mc: MlflowClient, lock: str) -> dict[str, str] | None:
    """The tags of the lock model (owner, token, since, expires), or None when nobody holds it."""
    try:
        return dict(mc.get_registered_model(lock).tags)
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def release(mc: MlflowClient, lock: str, token: str | None) -> None:
    """Delete the lock if it is still the one with `token` (not one a successor took)."""
    held = lock_tags(mc, lock)
    if held is None or held.get("token") != token:
        return
    with contextlib.suppress(MlflowException):
        mc.delete_registered_model(lock)
