"""The promotion lock: claims kept as tags on the registered model itself, ordered as in Lamport's
bakery, each held on a short lease that a heartbeat renews.

MLflow has no transactions, and two promotions may race (two pipeline runs finishing together).
The gate's read-decide-write therefore runs under this lock, and the second promoter waits, then
compares against the first one's result.

Who may take it. A claim is a tag `promotion.lock.<token>` on the registered model `<name>`, and
setting or deleting a tag there needs the same MLflow permission as moving its aliases (EDIT). So
only an account that could promote can claim, hold or clear the lock: an account that may only
read cannot block promotions, and every claim names a trusted holder. (The lock of older versions
of tasn was a registered model `<name>.promotion-lock` of its own, which any account may create:
one found is ignored, with a warning, never obeyed.)

Mutual exclusion without compare-and-set (the bakery): a claimant writes its claim as "choosing",
reads every claim and takes the number one past the largest, writes it, then waits until no claim
is choosing and none has a smaller (number, token); the smallest holds the lock. Each claim's
value carries a beat that a background thread renews every `LOCK_LEASE_S / BEATS_PER_LEASE`
seconds, from the moment it is written. A waiter that sees a claim unchanged for a whole lease on
its own monotonic clock (its holder died: kill -9, a lost node, an evicted pod) deletes it, so a
dead holder delays the next promotion by one lease, and no two hosts' clocks are ever compared. If
a live holder's heartbeat stalls for a lease (a server outage) and its claim is deleted, it finds
out in `Lease.verify`, which the promotion calls right before it changes the registry, and stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

from tasn.errors import RegistryError, ServiceError, shown
from tasn.registry.versions import actor, error_code, utc_now

log = logging.getLogger(__name__)

CLAIM_TAG = "promotion.lock."  # + the claimant's token: {"owner", "since", "number" (None while choosing), "beat"}
LEGACY_LOCK_SUFFIX = ".promotion-lock"  # the lock model of older tasn versions: anyone could create it
LOCK_LEASE_S = 30.0  # a dead holder blocks promotions this long; the KFP promote task's retries outlast it
BEATS_PER_LEASE = 3  # renewals per lease: two may fail (a slow server) before a waiter takes over


@dataclass(frozen=True)
class Claim:
    token: str
    owner: str
    number: int | None  # None while choosing
    raw: str  # the tag's value: a change of it is a sign of life

    def before(self, other: Claim) -> bool:
        return (self.number or 0, self.token) < (other.number or 0, other.token)


def registered_model(mc: MlflowClient, name: str) -> RegisteredModel:
    try:
        return mc.get_registered_model(name)
    except MlflowException as exc:
        if error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"registered model {name!r} not found: {exc.message}") from exc
        raise


def claims(mc: MlflowClient, name: str, model: RegisteredModel | None = None) -> dict[str, Claim]:
    """Every claim on the lock of `name` (read from `model` when given), by token; a value that is
    not a claim counts as one still choosing."""
    found = {}
    for key, raw in (model or registered_model(mc, name)).tags.items():
        if key.startswith(CLAIM_TAG):
            token = key[len(CLAIM_TAG):]
            try:
                value = json.loads(raw)
                owner, number = str(value["owner"]), value["number"]
            except (ValueError, TypeError, KeyError):
                owner, number = "an unreadable claim", None
            found[token] = Claim(token, owner, number if isinstance(number, int) else None, raw)
    return found


@dataclass
class Lease:
    """This process's claim on the lock of `name`, and the heartbeat renewing it."""

    mc: MlflowClient
    name: str
    token: str
    lease: float
    owner: str = field(default_factory=actor)
    since: str = field(default_factory=utc_now)
    number: int | None = None
    beat: int = 0
    lost: str | None = None  # why the heartbeat found the claim no longer ours
    model: RegisteredModel | None = None  # the registered model as last read under the lock
    stopped: threading.Event = field(default_factory=threading.Event)  # set on release
    writing: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tag(self) -> str:
        return CLAIM_TAG + self.token

    def write(self, number: int | None = None, renew: bool = False) -> None:
        """Write the claim (`number` None: choosing); `renew` only beats, and never re-creates a
        claim a waiter deleted."""
        with self.writing:
            if renew:
                if self.token not in claims(self.mc, self.name):
                    self.lost = "its claim was deleted by a waiter that took it for dead"
                    return
                self.beat += 1
            else:
                self.number = number
            value = {"owner": self.owner, "since": self.since, "number": self.number, "beat": self.beat}
            self.mc.set_registered_model_tag(self.name, self.tag, json.dumps(value, sort_keys=True))

    def verify(self) -> RegisteredModel:
        """Raise unless the lock is still ours (call right before changing the registry); returns
        the registered model as just read."""
        self.model = registered_model(self.mc, self.name)
        current = claims(self.mc, self.name, self.model)
        mine = current.get(self.token)
        if self.lost is None and mine is None:
            self.lost = "its claim was deleted by a waiter that took it for dead"
        elif self.lost is None and mine is not None:
            ahead = [c for c in current.values() if c.token != self.token and c.number and c.before(mine)]
            if ahead:
                self.lost = f"now held by {ahead[0].owner}"
        if self.lost is not None:
            raise ServiceError(
                f"lost the promotion lock of {self.name!r} ({self.lost}; its lease of {self.lease:g} s ran out "
                "before the heartbeat could renew it): nothing was changed, run the promotion again"
            )
        return self.model

    def heartbeat(self) -> None:
        """Renew the claim until released; stop when it turns out to be gone."""
        while not self.stopped.wait(self.lease / BEATS_PER_LEASE):
            try:
                self.write(renew=True)
            except Exception as exc:  # a flaky server: the next beat tries again, the lease covers a few
                log.warning("could not renew the promotion lock of %s: %s", self.name, exc)
            if self.lost is not None:
                log.error("promotion lock of %s: %s", self.name, self.lost)
                return

    def release(self) -> None:
        self.stopped.set()
        with self.writing, contextlib.suppress(MlflowException):  # gone already: nothing to release
            self.mc.delete_registered_model_tag(self.name, self.tag)


@contextlib.contextmanager
def promotion_lock(mc: MlflowClient, name: str, timeout: float = 120.0, lease: float | None = None) -> Iterator[Lease]:
    """Hold the promotion lock of registered model `name` for the duration of the block (see the
    module docstring), renewing its lease (`LOCK_LEASE_S` unless given) from a background thread.

    Waits up to `timeout` seconds for the claims ahead; a claim nobody renewed for a whole lease
    (its holder died) is deleted. An account that may not set tags on `name` cannot claim it."""
    held = Lease(mc, name, uuid.uuid4().hex, LOCK_LEASE_S if lease is None else lease)
    ignore_legacy_lock(mc, name)
    try:
        held.write(None)
    except MlflowException as exc:
        raise ServiceError(f"cannot claim the promotion lock of {name!r}: {exc.message}") from exc
    beating = threading.Thread(target=held.heartbeat, name=f"heartbeat {name}", daemon=True)
    beating.start()
    try:
        held.write(1 + max((c.number or 0 for c in claims(mc, name).values()), default=0))
        _wait_for_turn(held, time.monotonic() + timeout)
        yield held
    finally:
        held.release()
        beating.join(timeout=held.lease)


def _wait_for_turn(held: Lease, deadline: float) -> None:
    """Return once no claim is choosing and none is ahead of ours; delete claims nobody renewed
    for a lease; ServiceError naming the holder at `deadline`."""
    seen: dict[str, tuple[str, float]] = {}  # token -> (value last seen, since when on our clock)
    pause = 0.1
    while True:
        held.model = registered_model(held.mc, held.name)
        current = claims(held.mc, held.name, held.model)
        mine = current.pop(held.token, None)
        if mine is None or held.lost:
            held.verify()  # raises: our claim was taken for dead
        assert mine is not None
        now = time.monotonic()
        blocking = []
        for claim in current.values():
            if claim.number is not None and not claim.before(mine):
                continue
            raw, since = seen.get(claim.token, (None, now))
            if raw != claim.raw:
                seen[claim.token] = (claim.raw, now)
            elif now - since >= held.lease:
                log.warning("promotion lock of %s: the claim of %s was not renewed for %.0f s (its holder died); "
                            "removing it", held.name, claim.owner, now - since)
                with contextlib.suppress(MlflowException):
                    held.mc.delete_registered_model_tag(held.name, CLAIM_TAG + claim.token)
                continue
            blocking.append(claim)
        if not blocking:
            return
        if now > deadline:
            first = min(blocking, key=lambda c: (c.number is not None, c.number or 0, c.token))
            raise ServiceError(
                f"model {held.name!r} is being promoted by {first.owner} (its claim on the promotion lock: "
                f"{shown(first.raw)}); try again later. A claim whose holder died is removed once nobody "
                f"renewed it for {held.lease:g} s"
            )
        time.sleep(pause)
        pause = min(pause * 1.5, 1.0, max(0.1, held.lease / 10))  # polls ease off, but a release is seen within 1 s


def ignore_legacy_lock(mc: MlflowClient, name: str) -> None:
    """Warn about a registered model `<name>.promotion-lock` (the lock of older tasn versions, or a
    forgery: any account may create one) and go on: it is never obeyed, and the owner its tags
    claim is not repeated, since nothing vouches for it."""
    try:
        mc.get_registered_model(name + LEGACY_LOCK_SUFFIX)
    except MlflowException:
        return
    log.warning("ignoring the registered model %r: older tasn versions used it as the promotion lock, but any "
                "account may create it, so its tags prove nothing; the lock is claims on %r itself now (an admin "
                "may delete that model)", name + LEGACY_LOCK_SUFFIX, name)
