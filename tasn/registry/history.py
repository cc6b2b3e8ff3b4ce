"""The promotion history of a registered model, read back from its versions' tags and checked.

Each promotion record names the version that held the alias before it (`previous`), so the records
of one alias form a chain; a break in the chain, or an alias held by a version the last record does
not name, means someone moved an alias without `tasn promote` (by hand in the UI, say), or a
promotion was killed between writing its record and moving the alias, which the next promotion
mends (`mend`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

from tasn.errors import RegistryError
from tasn.registry.tags import PROMOTION_TAG
from tasn.registry.versions import client, utc_now

log = logging.getLogger(__name__)
WITHDRAWN = "withdrawn"  # set on the record of a promotion whose alias move never happened (`mend`)


def _records(mc: MlflowClient, name: str) -> list[tuple[str, str, dict[str, Any]]]:
    """(version, tag key, record) of every promotion record of `name`, by seq."""
    escaped = name.replace("'", "\\'")
    found = []
    for mv in mc.search_model_versions(f"name='{escaped}'"):
        for key, value in mv.tags.items():
            if key.startswith(PROMOTION_TAG):
                found.append((str(mv.version), key, json.loads(value)))
    return sorted(found, key=lambda r: r[2]["seq"])


def mend(mc: MlflowClient, name: str, model: RegisteredModel | None = None) -> list[int]:
    """Withdraw the record of a promotion that was killed after writing it and before moving the
    alias: the last record of an alias, naming a version that does not hold it, while the version
    it names as `previous` still does. The record stays, marked `withdrawn` (deleting a tag may
    need more than the EDIT a promoter has). Call under the promotion lock (`model`: the registered
    model as read there); returns the seqs."""
    aliases = {alias: str(v) for alias, v in ((model or mc.get_registered_model(name)).aliases or {}).items()}
    last: dict[str, tuple[str, str, dict[str, Any]]] = {}
    for version, key, rec in _records(mc, name):
        if not rec.get(WITHDRAWN):
            last[rec["alias"]] = (version, key, rec)
    mended = []
    for alias, (version, key, rec) in last.items():
        if aliases.get(alias) != rec["version"] and aliases.get(alias) == rec.get("previous"):
            why = f"the alias never moved (promotion #{rec['seq']} was interrupted); withdrawn {utc_now()}"
            mc.set_model_version_tag(name, version, key, json.dumps({**rec, WITHDRAWN: why}, sort_keys=True))
            log.warning("promotion #%d of %s v%s to %s was interrupted before the alias moved: withdrawn",
                        rec["seq"], name, rec["version"], alias)
            mended.append(rec["seq"])
    return mended


def history(name: str, *, mlflow_client: MlflowClient | None = None) -> dict[str, Any]:
    """All promotions of `name` in order, and who holds each alias now.

    Returns {"name", "promotions": [record, ...] (by seq), "aliases": {alias: version},
    "consistent": bool, "problems": [text]}: consistent means, per alias, each record's `previous`
    is the version of the record before it and the last record's version holds the alias now.
    Withdrawn records (`mend`) are listed but are not part of the chain.
    """
    mc = mlflow_client or client()
    try:
        model = mc.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(f"registered model {name!r} not found on {mc.tracking_uri}: {exc.message}") from exc
    records = [rec for _, _, rec in _records(mc, name)]
    aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
    problems = []
    last: dict[str, str | None] = {}
    for rec in records:
        alias = rec["alias"]
        if rec.get(WITHDRAWN):
            continue
        if alias in last and rec.get("previous") != last[alias]:
            problems.append(f"#{rec['seq']}: {alias} v{rec['version']} says previous {rec.get('previous')}, "
                            f"history says {last[alias]}")
        last[alias] = rec["version"]
    for alias, version in aliases.items():
        if last.get(alias) != version:
            problems.append(f"{alias} is held by v{version} but the last recorded promotion is {last.get(alias)}")
    for alias, given in last.items():
        if alias not in aliases:
            problems.append(f"the last recorded promotion gave {alias} to v{given}, but no version holds it")
    return {"name": name, "promotions": records, "aliases": aliases, "consistent": not problems,
            "problems": problems}
