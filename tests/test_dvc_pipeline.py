"""dvc.yaml: the five stages call the real `tasn` commands with flags that parse, declare what the
commands read and write, declare as code deps exactly the tasn modules each stage imports, cache
what a run made and commit the small results to Git, and name the model as a DVC artifact. Then, on
a fresh clone of this repository: a plain `dvc pull` exits 0 and brings the committed run back,
`dvc repro` runs everything for real (smoke settings) with a clean `dvc status` after, metrics and
plots that DVC can show, an experiment lands in the workspace's MLflow store without registering or
moving `@staging`, `dvc checkout` and `dvc exp apply` bring a run back with its model, `dvc
artifacts get` fetches a tagged version's model, `dvc exp show` has only the run's real parameters
and metrics, and editing a module a stage imports makes `dvc status` name that stage."""

from __future__ import annotations

import csv
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib
import yaml
from mlflow import MlflowClient

from tasn import evaluate, tracking
from tasn.cli import build_parser
from tasn.config import Config, load_config
from tasn.registry import REGISTRATION
from tasn.training import outputs

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["validate", "preprocess", "train", "evaluate", "register"]
# The library module each stage's command calls (tasn.commands.<area> imports it when run).
ENTRY = {"validate": "tasn.data.validate", "preprocess": "tasn.data.preprocess", "train": "tasn.training.stage",
         "evaluate": "tasn.evaluate", "register": "tasn.registry.stage"}
FRONT_DOOR = ("tasn/cli.py", "tasn/commands/")  # argument parsing only: not a dep (see dvc.yaml)
# Committed to Git with dvc.lock (dvc exp show / metrics diff / plots diff read them from commits).
IN_GIT = {f"outputs/train/{outputs.METRICS}", f"outputs/train/{outputs.HISTORY}",
          f"outputs/evaluate/{evaluate.METRICS}", f"outputs/evaluate/{evaluate.PER_CLASS}",
          f"outputs/evaluate/{evaluate.CONFUSION_CSV}"}
# flags whose value is a path the stage reads (deps) or writes (outs)
READS = {"--data", "--model", "--run-json", "--metrics"}
WRITES = {"--report-dir", "--out"}


@pytest.fixture(scope="module")
def dvc_yaml():
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _argv(stage) -> list[str]:
    argv = shlex.split(stage["cmd"])
    assert argv[0] == "tasn"
    return argv[1:]


def test_the_five_stages_run_real_tasn_commands(dvc_yaml):
    assert list(dvc_yaml["stages"]) == STAGES
    parser = build_parser()
    for name, stage in dvc_yaml["stages"].items():
        argv = _argv(stage)
        assert argv[0] == name
        args = parser.parse_args(argv)  # a renamed or removed flag fails here (SystemExit)
        assert args.command == name


def test_each_command_reads_its_deps_and_writes_its_outs(dvc_yaml):
    for name, stage in dvc_yaml["stages"].items():
        argv = _argv(stage)
        deps = _paths(stage.get("deps"))
        outs = _paths(stage.get("outs")) + _paths(stage.get("metrics")) + _paths(stage.get("plots"))
        for flag, value in zip(argv, argv[1:]):
            if flag in READS:
                assert value in deps, f"{name}: reads {value} ({flag}) but does not depend on it"
            if flag in WRITES:
                assert any(o == value or o.startswith(value + "/") for o in outs), f"{name}: writes {value} undeclared"
        for dep in deps:
            if dep.startswith("tasn/"):
                assert (ROOT / dep).exists(), f"{name}: code dependency {dep} does not exist"


def test_params_are_config_sections_and_metrics_plots_are_stage_outputs(dvc_yaml):
    sections = set(Config().to_dict())
    for name, stage in dvc_yaml["stages"].items():
        for section in stage.get("params", []):
            assert section in sections, f"{name}: params section {section!r} is not in tasn.config.Config"
    metrics = [m for s in dvc_yaml["stages"].values() for m in _paths(s.get("metrics"))]
    assert metrics == [f"outputs/train/{outputs.METRICS}", f"outputs/evaluate/{evaluate.METRICS}"]
    produced = {p for s in dvc_yaml["stages"].values() for p in _paths(s.get("outs"))}
    for plot in dvc_yaml["plots"]:
        (key, spec), = plot.items() if isinstance(plot, dict) else ((plot, None),)
        files = list(spec["y"]) if spec else [key]
        assert all(f in produced for f in files), f"plot {key}: {files} not all produced by a stage"


def _entries(stage) -> list[tuple[str, dict]]:
    """(path, options) of every out, metric and plot of a stage."""
    return [next(iter(e.items())) if isinstance(e, dict) else (e, {})
            for key in ("outs", "metrics", "plots") for e in stage.get(key) or []]


def listed(root: Path, path: str) -> set[str]:
    """The files git has (or would add) at `path` under `root`: the path itself, or a folder's."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", path], cwd=root,
                         capture_output=True, text=True, check=True).stdout.split()
    return {f for f in out if (root / f).is_file()}


def needed_files(files: list[str], root: Path = ROOT) -> set[str]:
    """The code files a stage depends on, given the tasn files it imported: those files (the front
    door excepted) and, for a package that loads more code on demand (pyproject's package-data:
    the fused sampler's C++/CUDA sources, and the modules that build and register them when CUDA
    is there), the whole package."""
    need = {f for f in files if not f.startswith(FRONT_DOOR)}
    package_data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package in package_data:
        folder = package.replace(".", "/")
        if f"{folder}/__init__.py" in need:
            need |= listed(root, folder)
    return need


def declared_files(stage, root: Path = ROOT) -> set[str]:
    """The code files a stage's deps cover (a folder dep covers every file in it)."""
    return set().union(*(listed(root, d) for d in _paths(stage["deps"]) if d.startswith("tasn/")))


def imported_files(module: str) -> list[str]:
    """The tasn source files importing `module` loads, in a fresh interpreter."""
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps([m.__file__ for n, m in list(sys.modules.items()) "
            "if (n == 'tasn' or n.startswith('tasn.')) and getattr(m, '__file__', None)]))")
    out = subprocess.run([sys.executable, "-c", code, module], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return [str(Path(f).resolve().relative_to(ROOT)) for f in json.loads(out.stdout)]


def test_code_deps_are_the_modules_each_stage_imports(dvc_yaml):
    """Editing any module a stage's code imports must make `dvc status` report the stage, and a
    dep the stage does not import would rerun it for nothing. (The integration test below checks
    the same against what each stage imports while it really runs.)"""
    for name, module in ENTRY.items():
        declared = declared_files(dvc_yaml["stages"][name])
        wanted = needed_files(imported_files(module))
        assert declared == wanted, (f"{name}: missing deps {sorted(wanted - declared)}, "
                                    f"deps it does not import {sorted(declared - wanted)}")


def test_what_a_run_made_is_cached_the_small_results_are_in_git_and_the_data_is_rebuilt(dvc_yaml):
    """Every experiment and commit can be brought back (`dvc exp apply`, `dvc checkout`): what a
    run made is in DVC's cache, the results experiments compare are committed to Git, and only the
    data rebuilt from data/raw is neither. Nothing is both cached and in Git, and checkpoints are
    no output (a stage DVC reruns starts afresh: `--resume never`)."""
    cached, in_git, rebuilt = set(), set(), set()
    for stage in dvc_yaml["stages"].values():
        for path, options in _entries(stage):
            if (options or {}).get("cache", True):
                cached.add(path)
            elif path.startswith("outputs/"):
                in_git.add(path)
            else:
                rebuilt.add(path)
    assert in_git == IN_GIT and rebuilt == {"data/validated", "data/prepared"}
    assert {f"outputs/train/{outputs.MODEL}", f"outputs/train/{outputs.RUN}",
            f"outputs/register/{REGISTRATION}"} <= cached
    ignored = set(subprocess.run(["git", "check-ignore", "--no-index", *cached, *rebuilt, *in_git], cwd=ROOT,
                                 capture_output=True, text=True).stdout.split())
    assert ignored == cached | rebuilt  # Git keeps the results, DVC the rest
    train = dvc_yaml["stages"]["train"]
    assert not [p for p, _ in _entries(train) if outputs.CHECKPOINTS in p]
    assert shlex.split(train["cmd"])[-2:] == ["--resume", "never"]


def test_the_model_is_a_dvc_artifact(dvc_yaml):
    (name, artifact), = dvc_yaml["artifacts"].items()
    assert artifact["type"] == "model" and name == Config().register.model_name
    assert artifact["path"] in _paths(dvc_yaml["stages"]["train"]["outs"])
    assert artifact["path"].endswith("/" + outputs.MODEL)


# -- on a fresh clone, for real --------------------------------------------------------------

# Installed as sitecustomize for the stages' processes (and their worker processes): each writes
# the tasn modules it imported (lazily loaded ones included) when it exits, to
# $TASN_TEST_IMPORTS/<stage>.<pid>.json.
RECORDER = textwrap.dedent("""\
    import atexit, json, os, sys
    def _record():
        out, stage = os.environ.get("TASN_TEST_IMPORTS"), os.environ.get("DVC_STAGE")
        if out and stage:
            files = sorted({m.__file__ for n, m in list(sys.modules.items())
                            if (n == "tasn" or n.startswith("tasn.")) and getattr(m, "__file__", None)})
            with open(os.path.join(out, f"{stage}.{os.getpid()}.json"), "w") as fh:
                json.dump(files, fh)
    atexit.register(_record)
    """)


def _run(cmd: list[str], repo: Path, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _dvc(repo: Path, *args: str, env) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], repo, env)


def fresh_clone(dest: Path) -> Path:
    """`git clone` of this repository, plus what the working tree has not committed yet (tracked
    changes and new files), so the test sees the code under test."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, capture_output=True)
    diff = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=ROOT, capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=dest, input=diff, check=True, capture_output=True)
    new = subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    for rel in new:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes((ROOT / rel).read_bytes())
    return dest


@pytest.mark.slow
@pytest.mark.integration
def test_fresh_clone_pull_repro_experiment_and_status(tmp_path):
    repo = fresh_clone(tmp_path / "clone")
    imports = tmp_path / "imports"
    hooks = tmp_path / "hooks"
    imports.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(RECORDER)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({"DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "1",
                "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": f"{repo}{os.pathsep}{hooks}", "TASN_TEST_IMPORTS": str(imports),
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com"})
    git = lambda *a: _run(["git", *a], repo, env)  # noqa: E731

    _dvc(repo, "pull", env=env)  # a plain pull: the sample and the committed run, and nothing is missing
    assert (repo / "data/raw/images.txt").is_file() and (repo / "outputs/train" / outputs.MODEL).is_file()

    # the smoke settings as the top level of params.yaml, on the smoke sample, as a new data version
    quick = ["train.max_steps=1", "train.picture_images=0", "validate.workers=1", "preprocess.workers=1"]
    smoke = load_config(repo / "params.yaml", "smoke", quick).to_dict()
    (repo / "params.yaml").write_text(yaml.safe_dump(smoke, sort_keys=False))
    shutil.rmtree(repo / "data/raw")
    shutil.copytree(repo / smoke["data"]["raw"], repo / "data/raw")
    _dvc(repo, "commit", "-f", "-q", "data.dvc", env=env)
    git("add", "-A")
    git("commit", "-qm", "smoke settings and sample")

    _dvc(repo, "repro", env=env)
    assert json.loads(_dvc(repo, "status", "--json", env=env).stdout) == {}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert list(lock["stages"]) == STAGES
    registration = json.loads((repo / "outputs/register" / REGISTRATION).read_text())
    assert registration["decision"] == "promote" and registration["version"] == "1"  # first model: promoted
    shown = json.loads(_dvc(repo, "metrics", "show", "--json", env=env).stdout)
    data = next(iter(shown.values()))["data"]
    assert {f"outputs/train/{outputs.METRICS}", f"outputs/evaluate/{evaluate.METRICS}"} <= set(data)
    plots = json.loads(_dvc(repo, "plots", "show", "--json", env=env).stdout)["data"]
    assert {"learning curves", "accuracy per head", "per-class accuracy", "confusion"} <= set(plots)
    assert not [k for k, v in plots.items() if not v], "plots with nothing to draw"
    git("add", "-A")
    git("commit", "-qm", "first run")
    assert not git("status", "--porcelain").stdout.strip()  # the results that belong in Git are in it
    first = {name: (repo / name).read_bytes() for name in ("outputs/train/model.pt", "outputs/evaluate/metrics.json")}

    # an experiment: its run in the same MLflow store, no version registered unless asked, @staging kept
    _dvc(repo, "exp", "run", "-n", "smoke-exp", "-S", "train.seed=1", "-S", "evaluate.topk=3", env=env)
    store = f"sqlite:///{repo / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)
    name = smoke["register"]["model_name"]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert json.loads((repo / "outputs/register" / REGISTRATION).read_text())["decision"] == "not registered"
    (exp_run,) = client.search_runs([client.get_experiment_by_name(smoke["tracking"]["experiment"]).experiment_id],
                                    "attributes.run_name = 'smoke-exp'")
    assert exp_run.data.tags[tracking.DVC_EXP_TAG] == "smoke-exp"
    assert "epoch" not in exp_run.data.metrics and "data.synth.classes" not in exp_run.data.params
    made = {name: (repo / name).read_bytes() for name in first}
    assert made != first

    # brought back: the commit's run (git checkout + dvc checkout), then the experiment's, model included
    git("checkout", "--", ".")
    _dvc(repo, "checkout", "-q", env=env)
    assert {name: (repo / name).read_bytes() for name in first} == first
    assert json.loads(_dvc(repo, "status", "--json", env=env).stdout) == {}
    _dvc(repo, "exp", "apply", "smoke-exp", env=env)
    assert {name: (repo / name).read_bytes() for name in first} == made
    assert json.loads(_dvc(repo, "status", "--json", env=env).stdout) == {}  # nothing to rerun
    git("checkout", "--", ".")
    _dvc(repo, "checkout", "-q", env=env)

    # the model as a DVC artifact: a version is a GTO tag, `dvc artifacts get` fetches its model.pt
    git("tag", "-a", "tasn@v1.0.0", "-m", "Registering artifact tasn version 1.0.0")
    _dvc(repo, "artifacts", "get", ".", "tasn", "-o", str(tmp_path / "got.pt"), env=env)
    assert (tmp_path / "got.pt").read_bytes() == first["outputs/train/model.pt"]

    table = list(csv.DictReader(io.StringIO(_dvc(repo, "exp", "show", "--csv", env=env).stdout)))
    assert not [c for c in table[0] if c.startswith("profiles.")]
    assert not {"num_classes", "timing_batch_size", "kind", "primary_head"} & set(table[0])  # no settings as metrics
    (row,) = [r for r in table if r["Experiment"] == "smoke-exp"]
    assert row["evaluate.topk"] == "3" and row["train.seed"] == "1"
    assert 0 <= float(row["top1"]) <= 1 and row["num_test"] == "12.0"  # its metrics, read from its commit

    # every code dep dvc.yaml declares was loaded by the stage while it ran (the static test above
    # checks the other way: nothing the stage's library code imports is missing; the command
    # modules also import other stages' modules for their output names, which are not deps)
    dvc_yaml = yaml.safe_load((repo / "dvc.yaml").read_text())
    for name in STAGES:
        ran = sorted({str(Path(f).resolve().relative_to(repo)) for dump in imports.glob(f"{name}.*.json")
                      for f in json.loads(dump.read_text())})
        unused = declared_files(dvc_yaml["stages"][name], repo) - needed_files(ran, repo)
        assert not unused, f"{name} declares deps it never loads: {sorted(unused)}"

    # editing a module a stage imports: dvc status names the stage
    for name, module in [("validate", "tasn/data/manifest.py"), ("preprocess", "tasn/data/preprocess.py"),
                         ("train", "tasn/training/loop.py"), ("evaluate", "tasn/evaluate.py"),
                         ("register", "tasn/registry/describe.py")]:
        path = repo / module
        original = path.read_text()
        path.write_text(original + "\n# edited\n")
        try:
            status = json.loads(_dvc(repo, "status", "--json", env=env).stdout)
        finally:
            path.write_text(original)
        assert name in status, f"editing {module} leaves {name} up to date: {status}"
        changed = {dep for entry in status[name] for dep in entry.get("changed deps", {})}
        assert any(module == dep or module.startswith(dep + "/") for dep in changed), (module, changed)


TRACK = textwrap.dedent("""\
    import os, yaml
    from tasn import tracking
    from tasn.config import TrackingConfig
    n = yaml.safe_load(open("params.yaml"))["n"]
    run = tracking.Run(TrackingConfig(experiment="anchor", system_metrics=False), tracking.context_tags(),
                       run_name=tracking.run_name("tasn", "resnet18-slim", n))
    run.log_params({"n": n, "cwd": os.getcwd()})
    run.end()
    open("done.txt", "w").write(str(n))
    """)


@pytest.mark.integration
def test_a_temporary_experiment_tracks_into_the_workspace_store(tmp_path):
    """`dvc exp run --temp` runs the stage in a throwaway copy; its MLflow run still lands in the
    workspace's mlflow.db (DVC hands the stage DVC_ROOT, tasn.tracking anchors the store there)."""
    repo = tmp_path / "ws"
    repo.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update({"DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@example.com"})
    (repo / "track.py").write_text(TRACK)
    (repo / "params.yaml").write_text("n: 1\n")
    (repo / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    stage = {"cmd": f"{sys.executable} track.py", "deps": ["track.py"], "params": ["n"],
             "outs": [{"done.txt": {"cache": False}}]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"track": stage}}))
    _run(["git", "init", "-q"], repo, env)
    _dvc(repo, "init", "-q", env=env)
    _dvc(repo, "repro", env=env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "base"], repo, env)
    _dvc(repo, "exp", "run", "--temp", "-n", "temp-exp", "-S", "n=2", env=env)

    store = f"sqlite:///{repo / 'mlflow.db'}"
    runs = {r.info.run_name: r for r in MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("anchor").experiment_id])}
    assert set(runs) >= {"temp-exp"} and len(runs) == 2  # the workspace run and the experiment's
    ran_in = Path(runs["temp-exp"].data.params["cwd"])
    assert ran_in != repo and ran_in.is_relative_to(repo / ".dvc" / "tmp")  # it did run in a copy
    assert runs["temp-exp"].data.tags[tracking.DVC_EXP_TAG] == "temp-exp"
    assert not list((repo / ".dvc").rglob("mlflow.db"))
