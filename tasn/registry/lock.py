"""The promotion lock: a registered model named `<name>.promotion-lock` whose creation is atomic,
held on a short lease that a heartbeat renews.

MLflow has no transactions, and two promotions may race (two pipeline runs finishing together).
The gate's read-decide-write therefore runs under this lock: its creation is atomic in the tracking
store (a unique name), it is deleted when done, and the second promoter waits, then compares
against the first one's result.

A holder can die without deleting it (kill -9, a lost node, an evicted pod). So while the holder
works, a background thread renews the lock every `LOCK_LEASE_S / BEATS_PER_LEASE` seconds (the
`beat` tag), and a waiter that sees the same holder and beat for a whole lease on its own
monotonic clock takes the lock over: a dead holder delays the next promotion by one lease, and no
two hosts' clocks are ever compared, so clock skew cannot steal a live lock. If the heartbeat
stalls for a lease (a server outage), a waiter may take over; the old holder then finds out in
`Lease.verify`, which the promotion calls right before it moves an alias, and stops.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasn.errors import ServiceError
from tasn.registry.versions import actor, error_code, utc_now

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_S = 30.0  # a dead holder blocks promotions this long; the KFP promote task's retries outlast it
BEATS_PER_LEASE = 3  # renewals per lease: two may fail (a slow server) before a waiter takes over
BEAT_TAG = "beat"


@dataclass
class Lease:
    """A held promotion lock and the heartbeat thread renewing it."""

    mc: MlflowClient
    lock: str
    token: str
    lease: float
    lost: str | None = None  # why the heartbeat found the lock no longer ours
    stopped: threading.Event = field(default_factory=threading.Event)  # set on release

    def verify(self) -> None:
        """Raise unless the lock is still ours (call right before changing the registry)."""
        held = lock_tags(self.mc, self.lock)
        if self.lost is None and (held is None or held.get("token") != self.token):
            self.lost = f"now held by {held.get('owner')}" if held else "deleted"
        if self.lost is not None:
            raise ServiceError(
                f"lost the promotion lock {self.lock!r} ({self.lost}; its lease of {self.lease:g} s ran out "
                "before the heartbeat could renew it): nothing was changed, run the promotion again"
            )

    def heartbeat(self) -> None:
        """Renew the lease until released; stop when the lock turns out to be someone else's."""
        beat = 0
        while not self.stopped.wait(self.lease / BEATS_PER_LEASE):
            try:
                held = lock_tags(self.mc, self.lock)
                if held is None or held.get("token") != self.token:
                    self.lost = f"now held by {held.get('owner')}" if held else "deleted"
                    log.error("promotion lock %s was taken from us (%s)", self.lock, self.lost)
                    return
                beat += 1
                self.mc.set_registered_model_tag(self.lock, BEAT_TAG, f"{beat} {utc_now()}")
            except Exception as exc:  # a flaky server: the next beat tries again, the lease covers a few
                log.warning("could not renew the promotion lock %s: %s", self.lock, exc)


@contextlib.contextmanager
def promotion_lock(mc: MlflowClient, name: str, timeout: float = 120.0, lease: float | None = None) -> Iterator[Lease]:
    """Hold `<name>.promotion-lock` for the duration of the block, renewing its lease
    (`LOCK_LEASE_S` unless given) from a background thread.

    Waits up to `timeout` seconds for another holder; a lock nobody renewed for a whole lease
    (its holder died) is removed and taken over.
    """
    lease = LOCK_LEASE_S if lease is None else lease
    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout
    seen: tuple[str | None, str | None] | None = None  # the holder and beat last seen, and since when
    seen_at = 0.0
    pause = 0.1
    while True:
        tags = {"owner": actor(), "token": token, "since": utc_now(), "lease": f"{lease:g}", BEAT_TAG: "0"}
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
        now = time.monotonic()
        state = (held.get("token"), held.get(BEAT_TAG))
        if state != seen:
            seen, seen_at = state, now
        elif now - seen_at >= lease:
            log.warning("promotion lock %s of %s was not renewed for %.0f s (its holder died); taking it over",
                        lock, held.get("owner"), now - seen_at)
            release(mc, lock, held.get("token"))
            seen = None
            continue
        if now > deadline:
            raise ServiceError(
                f"model {name!r} is being promoted by {held.get('owner')} (lock {lock!r} held since "
                f"{held.get('since')}, renewed: beat {held.get(BEAT_TAG)}); try again later. A lock whose "
                f"holder died is taken over once nobody renewed it for {lease:g} s"
            )
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0, max(0.1, lease / 10))  # polls ease off, but a release is seen within 1 s
    held_lease = Lease(mc, lock, token, lease)
    beating = threading.Thread(target=held_lease.heartbeat, name=f"heartbeat {lock}", daemon=True)
    beating.start()
    try:
        yield held_lease
    finally:
        held_lease.stopped.set()
        beating.join(timeout=lease)
        release(mc, lock, token)


def lock_tags(mc: MlflowClient, lock: str) -> dict[str, str] | None:
    """The tags of the lock model (owner, token, since, lease, beat), or None when nobody holds it."""
    try:
        return dict(mc.get_registered_model(lock).tags)
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def release(mc: MlflowClient, lock: str, token: str | None) -> None:
    """Delete the lock if it is still the one with `token` (not one a successor took). A dead
    holder's lock belongs to its account: another account without MANAGE on it cannot take it over."""
    held = lock_tags(mc, lock)
    if held is None or held.get("token") != token:
        return
    try:
        mc.delete_registered_model(lock)
    except MlflowException as exc:
        if error_code(exc) == "PERMISSION_DENIED":
            raise ServiceError(
                f"the promotion lock {lock!r} of {held.get('owner')} is stale, but this MLflow account may not "
                "delete it: promote with the account that took it (the pipeline's), or ask an admin to delete "
                "that registered model"
            ) from exc
        # anything else: gone already, or the next attempt finds it again
