"""MLflow Model Registry: register a trained run's model, gate it, promote it with an alias.

By role:
- `stage`: the stages `register` (writes registration.json), `promote`, `promotion_history`.
- `gate`: the champion/challenger rule as a pure function (`judge`) of candidate, incumbent and
  their data versions: strictly better on the same data wins; a tie is not a win; no holder means
  promote; `force` overrides with a recorded reason.
- `promotion`: applying it: read the versions, take the lock, move the alias, record the promotion.
- `lock`: the promotion lock (an atomically created registered model with a lease).
- `history`: every promotion in order, checked for aliases moved behind the gate's back.
- `versions`, `tags`: the MLflow client, registering a version, and what is recorded on it.
"""

from tasn.errors import RegistryError
from tasn.registry.history import history
from tasn.registry.promotion import Decision, gate, to_production
from tasn.registry.stage import REFUSED_EXIT, REGISTRATION, RegisterResult, promote, promotion_history, register
from tasn.registry.versions import alias_holder, client, register_version, version_metric

__all__ = [
    "REFUSED_EXIT",
    "REGISTRATION",
    "Decision",
    "RegisterResult",
    "RegistryError",
    "alias_holder",
    "client",
    "gate",
    "history",
    "promote",
    "promotion_history",
    "register",
    "register_version",
    "to_production",
    "version_metric",
]
