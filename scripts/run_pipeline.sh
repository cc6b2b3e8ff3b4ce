#!/usr/bin/env bash
# `make run`: fetch the embedded sample through DVC (the in-repo default remote, no network), then
# run the whole pipeline with `dvc repro` (validate -> preprocess -> train -> evaluate -> register
# + staging gate) on params.yaml's top level, and say where to look at the result.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
# OpenMP threads that sleep rather than spin while they wait: on a CPU shared with other work, the
# default spinning made a training step 6-17x slower (docs/training.md); on an idle one it costs little.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
command -v tasn >/dev/null || { echo "run_pipeline: no tasn command: run \`make install\` first" >&2; exit 1; }
start=$SECONDS

echo "== dvc pull data/raw   (the embedded sample)"
dvc pull data/raw
# A run brought back by `dvc pull` or `dvc checkout` (the committed demo run, another machine's) is
# up to date for DVC, but its MLflow run and registered version are in the store of the machine that
# made it: then the train stage runs again (and what follows it), so this machine's store has them.
if python - <<'PY'
import sys
from pathlib import Path
from mlflow import MlflowClient
from tasn.config import load_config
from tasn.tracking import RunInfo, resolve_uri
if not Path("outputs/train/run.json").is_file():
    sys.exit(1)  # nothing trained here yet: dvc repro trains
try:
    run = RunInfo.read("outputs/train/run.json")
    MlflowClient(resolve_uri(load_config("params.yaml").tracking)).get_run(run.run_id or "-")
except Exception:  # a run this store does not have
    sys.exit(0)
sys.exit(1)
PY
then
  echo "== dvc repro --force train   (outputs/train holds a run this machine's MLflow store does not have)"
  dvc repro --force train
fi
echo "== dvc repro"
dvc repro
if ! dvc status --quiet; then
  echo "run_pipeline: dvc status is not clean after dvc repro:" >&2
  dvc status >&2
  exit 1
fi

echo "== done in $((SECONDS - start)) s; dvc status is clean"
python - <<'PY'
import json
from tasn.tracking import runs_page
r = json.load(open("outputs/register/registration.json"))
run = json.load(open("outputs/train/run.json"))
alias = r.get("alias") or "staging"
print(f"\nmodel {r['name']} v{r['version']}: {r.get('decision')} ({r.get('reason')})")
print(f"  {r.get('primary_metric')}: candidate {r.get('candidate')}, previous {alias} {r.get('incumbent')}")
print("look at it:")
print("  mlflow ui --backend-store-uri sqlite:///mlflow.db      (runs, the registered model, its @staging alias),")
print(f"    then open {runs_page(run['experiment_id'])}")
print("  dvc metrics show; dvc plots show                       (metrics and curves; plots land in dvc_plots/)")
PY
