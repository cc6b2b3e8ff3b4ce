"""The promotion history of a registered model, read back from its versions' tags and checked.

Each promotion record names the version that held the alias before it (`previous`), so the records
of one alias form a chain; a break in the chain, or an alias held by a version the last record does
not name, means someone moved an alias without `tasn promote` (by hand in the UI, say).
"""

from __future__ import annotations

import json
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasn.errors import RegistryError
from tasn.registry.tags import PROMOTION_TAG
from tasn.registry.versions import client


def history(name: str, *, mlflow_client: MlflowClient | None = None) -> dict[str, Any]:
    """All promotions of `name` in order, and who holds each alias now.

    Returns {"name", "promotions": [record, ...] (by seq), "aliases": {alias: version},
    "consistent": bool, "problems": [text]}: consistent means, per alias, each record's `previous`
    is the version of the record before it and the last record's version holds the alias now.
    """
    mc = mlflow_client or client()
    try:
        model = mc.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(f"registered model {name!r} not found on {mc.tracking_uri}: {exc.message}") from exc
    escaped = name.replace("'", "\\'")
    records = []
    for mv in mc.search_model_versions(f"name='{escaped}'"):
        for key, value in mv.tags.items():
            if key.startswith(PROMOTION_TAG):
                records.append(json.loads(value))
    records.sort(key=lambda r: r["seq"])
    aliases = {alias: str(v) for alias, v in (model.aliases or {}).items()}
    problems = []
    last: dict[str, str | None] = {}
    for rec in records:
        alias = rec["alias"]
        if alias in last and rec.get("previous") != last[alias]:
            problems.append(f"#{rec['seq']}: {alias} v{rec['version']} says previous {rec.get('previous')}, "
                            f"history says {last[alias]}")
        last[alias] = rec["version"]
    for alias, version in aliases.items():
        if last.get(alias) != version:
            problems.append(f"{alias} is held by v{version} but the last recorded promotion is {last.get(alias)}")
    return {"name": name, "promotions": records, "aliases": aliases, "consistent": not problems,
            "problems": problems}
