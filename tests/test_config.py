"""Config: params.yaml, profiles and overrides; every bad key, value or file is named, before any work."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from tasn.choices import BACKBONES
from tasn.config import Config, ConfigError, ModelConfig, Range, check, find_params, load_config
from tasn.config.rules import field_types

ROOT = Path(__file__).resolve().parents[1]
ROOT_PARAMS = ROOT / "params.yaml"
# load_config(params.yaml, profile).to_dict() as the loader of commit 2186d66 (profiles inside
# params.yaml, dataclass defaults = the CUB recipe) resolved them: moving the profiles out and making
# the defaults the demo must not change a single value.
GOLDEN = json.loads((ROOT / "tests" / "golden" / "profiles.json").read_text())


def test_repository_params_and_every_profile_load():
    base = load_config(ROOT_PARAMS)
    assert base.model.kind == "tasn"
    cub = load_config(ROOT_PARAMS, "cub")
    # the authors' CUB recipe (docs/method.md)
    assert (cub.model.input_size, cub.model.att_size, cub.model.out_size) == (512, 224, 224)
    assert (cub.train.lr, cub.train.epochs, cub.train.milestones) == (0.1, 300, [100, 200])
    assert cub.model.backbone == "resnet50" and cub.model.dense == 4.0 and cub.model.iters == 5
    assert cub.loss.temperature == 10.0
    for name in ("cub", "cub336"):  # the authors' recipe exactly, whatever the demo's top level says
        c = load_config(ROOT_PARAMS, name)
        t = c.train
        assert (t.optimizer, t.lr, t.momentum, t.weight_decay, t.schedule, t.milestones, t.gamma) == (
            "sgd", 0.1, 0.0, 0.0, "step", [100, 200], 0.1), name
        augmentation = (t.jitter, t.rotation, t.lighting)
        assert (t.warmup_epochs, t.label_smoothing, augmentation) == (0.0, 0.0, (0.4, 30.0, 0.1)), name
        assert (c.model.zero_init_residual, c.loss.distill_teacher) == (False, "authors"), name
        assert t.min_steps == 0, name  # their epochs, however few steps they are
        assert t.attention_first == 0.0, name  # all branches learn from the first step, as theirs
        assert (c.model.att_stride, c.model.structure_power, c.model.detail_power) == (8, 2.0, 1.0), name
    for name in ("demo", "cub336", "smoke"):
        load_config(ROOT_PARAMS, name)


@pytest.mark.parametrize("profile", sorted(GOLDEN))
def test_profiles_resolve_exactly_as_before_they_moved_out_of_params_yaml(profile):
    assert load_config(ROOT_PARAMS, profile).to_dict() == GOLDEN[profile]


def test_params_yaml_spells_out_exactly_the_dataclass_defaults():
    """The dataclasses are the one source; params.yaml (what DVC reads) is checked against them."""
    assert yaml.safe_load(ROOT_PARAMS.read_text()) == Config().to_dict()
    assert load_config(None) == load_config(ROOT_PARAMS) == Config()
    assert load_config(ROOT_PARAMS, "demo") == Config()  # `demo` names the defaults: no overlay
    check(Config())  # the defaults obey their own rules


def test_a_profile_can_be_a_path_to_a_yaml_file(tmp_path):
    overlay = tmp_path / "mine.yaml"
    overlay.write_text("train: {epochs: 3}\n")
    assert load_config(ROOT_PARAMS, str(overlay)).train.epochs == 3
    assert load_config(None, str(ROOT / "profiles" / "cub.yaml")) == load_config(ROOT_PARAMS, "cub")


def test_overrides_are_typed_and_applied_last():
    cfg = load_config(ROOT_PARAMS, "smoke", ["train.lr=0.01", "model.kind=baseline", "train.milestones=[1, 2]"])
    assert cfg.train.lr == 0.01 and cfg.model.kind == "baseline" and cfg.train.milestones == [1, 2]
    assert cfg.flat()["train.lr"] == 0.01


def test_a_missing_params_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"none.yaml: no such file"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["train.lrr=0.1"], "unknown key train.lrr"),
        (["train.lr=fast"], "train.lr: expected float"),
        (["train.epochs=1.5"], "train.epochs: expected int"),
        (["train.deterministic=1"], "train.deterministic: expected true or false"),
        (["model.kind=vit"], "model.kind: 'vit' is not one of"),
        (["model.dense=0"], "model.dense: must be > 0"),
        (["lr=0.1"], "the key must name a section"),
        (["train.lr"], "expected section.key=value"),
        (["model.input_size=600"], "larger than preprocess.size"),
        # bounds (issue 13): finite floats, non-negative counts, sizes within limits
        (["train.lr=.nan"], "train.lr: must be a finite number, got nan"),
        (["train.lr=.inf"], "train.lr: must be a finite number, got inf"),
        (["loss.w_distill=-.inf"], "loss.w_distill: must be a finite number"),
        (["train.keep_checkpoints=-1"], "train.keep_checkpoints: must be >= 0 and <= 1000000, got -1"),
        (["validate.min_side=-5"], "validate.min_side: must be >= 1"),
        (["validate.workers=-1"], "validate.workers: must be >= 0 and <= 512, got -1"),
        (["preprocess.size=200000"], "preprocess.size: must be >= 8 and <= 8192, got 200000"),
        (["train.milestones=[10, -2]"], r"train.milestones\[1\]: must be >= 0"),
        (["train.log_every=0"], "train.log_every: must be >= 1"),
        (["train.batchnorm=odd"], "train.batchnorm: 'odd' is not one of local, sync, frozen"),
        (["model.att_backbone=resnet50"], "model.att_backbone: 'resnet50' is not one of"),
        (["validate.test_fraction_min=0.7"], r"validate.test_fraction_min \(0.7\) is larger than test_fraction_max"),
        (["data.synth.min_side=800"], r"data.synth.min_side \(800\) is larger than max_side \(700\)"),
        # the recipe knobs (issue 10)
        (["train.optimizer=lamb"], "train.optimizer: 'lamb' is not one of sgd, adamw"),
        (["train.schedule=linear"], "train.schedule: 'linear' is not one of step, cosine"),
        (["loss.distill_teacher=none"], "loss.distill_teacher: 'none' is not one of authors, detached"),
        (["train.warmup_epochs=99"], r"train.warmup_epochs \(99\) is more than epochs"),
        (["train.warmup_epochs=-1"], "train.warmup_epochs: must be >= 0"),
        (["train.label_smoothing=1.0"], "train.label_smoothing: must be >= 0 and < 1, got 1.0"),
        (["train.lighting=-0.1"], "train.lighting: must be >= 0"),
        (["model.zero_init_residual=2"], "model.zero_init_residual: expected true or false"),
    ],
)
def test_bad_values_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT_PARAMS, None, overrides)


def test_every_number_field_states_its_bounds_and_every_choice_its_names():
    """No knob without a rule: each int/float field is Annotated with a Range (lists: per item),
    and the backbone choices are the model's own registry."""
    def number_fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = field_types(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                yield from number_fields(tp, f"{prefix}{f.name}.")
            elif tp in (int, float) or typing.get_origin(tp) is typing.Annotated:
                yield f"{prefix}{f.name}", tp
            elif typing.get_origin(tp) is list and typing.get_origin(typing.get_args(tp)[0]) is not typing.Literal:
                yield f"{prefix}{f.name}", tp  # a list of numbers (a list of names is a list of choices)

    fields = dict(number_fields(Config))
    assert len(fields) > 40
    for name, tp in fields.items():
        if typing.get_origin(tp) is list:
            (tp,) = typing.get_args(tp)
        assert typing.get_origin(tp) is typing.Annotated, f"{name} has no bounds"
        assert any(isinstance(m, Range) for m in tp.__metadata__), f"{name} has no Range"
    assert typing.get_args(field_types(ModelConfig)["backbone"]) == BACKBONES


def test_a_config_built_in_code_is_held_to_the_same_rules():
    cfg = Config()
    cfg.train.lr = float("nan")
    with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
        check(cfg)
    cfg = Config()
    cfg.model.backbone = "vgg16"  # what the type checker refuses where it checks
    with pytest.raises(ConfigError, match="model.backbone: 'vgg16' is not one of"):
        check(cfg)


def test_without_a_params_file_here_the_installed_one_and_its_profiles_are_read(tmp_path, monkeypatch):
    """The image: no params.yaml in /workspace; $TASN_PARAMS names the installed file, and
    `--profile NAME` finds profiles/NAME.yaml beside it. A params.yaml here still comes first."""
    installed = tmp_path / "etc" / "tasn"
    (installed / "profiles").mkdir(parents=True)
    (installed / "params.yaml").write_text("train: {epochs: 3}\n")
    (installed / "profiles" / "quick.yaml").write_text("train: {batch_size: 4}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TASN_PARAMS", str(installed / "params.yaml"))
    cfg = load_config(find_params(), "quick")
    assert (cfg.train.epochs, cfg.train.batch_size) == (3, 4)
    (tmp_path / "params.yaml").write_text("train: {epochs: 5}\n")
    assert find_params() == Path("params.yaml")
    monkeypatch.delenv("TASN_PARAMS")
    (tmp_path / "params.yaml").unlink()
    assert find_params() is None


def test_unknown_profile_bad_yaml_and_profiles_left_in_the_params_file(tmp_path):
    known = r"profile 'nope' is not in .*profiles \(profiles: cub, cub336, demo, smoke\)"
    with pytest.raises(ConfigError, match=known):
        load_config(ROOT_PARAMS, "nope")
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    old = tmp_path / "old.yaml"
    old.write_text("train: {lr: 0.1}\nprofiles: [x]\n")
    with pytest.raises(ConfigError, match="profiles do not live in the params file; put each in profiles/NAME.yaml"):
        load_config(old, "x")
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "x.yaml").write_text("[x]\n")
    with pytest.raises(ConfigError, match=r"x.yaml: expected a mapping of sections, got list"):
        load_config(None, str(tmp_path / "profiles" / "x.yaml"))
    with pytest.raises(ConfigError, match="a profile is a name"):
        load_config(ROOT_PARAMS, "../etc/passwd")


def test_duplicate_keys_are_named_with_their_lines(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"params.yaml:4: duplicate key 'lr' \(first at line 2\)"):
        load_config(params)
    params.write_text("model: {kind: tasn}\ntrain: {}\nmodel: {kind: baseline}\n")
    with pytest.raises(ConfigError, match=r"params.yaml:3: duplicate key 'model' \(first at line 1\)"):
        load_config(params)


def _tasn(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasn.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.mark.parametrize(
    "setup,args,named",
    [
        (None, ["-S", "train.lr=.nan"], "train.lr: must be a finite number"),
        (None, ["-S", "train.keep_checkpoints=-1"], "train.keep_checkpoints: must be >= 0"),
        (None, ["-S", "validate.min_side=-5"], "validate.min_side: must be >= 1"),
        (None, ["-S", "validate.workers=-1"], "validate.workers: must be >= 0"),
        (None, ["-S", "preprocess.size=200000"], "preprocess.size: must be >= 8 and <= 8192"),
        ("train:\n  lr: 0.1\n  lr: 0.2\n", [], "params.yaml:3: duplicate key 'lr'"),
        ("profiles: [x]\n", ["--profile", "x"], "profiles do not live in the params file"),
        (None, ["--params", "nope.yaml"], "--params nope.yaml: no such file"),
        (None, ["--profile", "nope"], "profile 'nope' is not in"),
    ],
)
def test_the_cli_names_the_bad_value_and_exits_1_without_a_traceback(tmp_path, setup, args, named):
    if setup is not None:
        (tmp_path / "params.yaml").write_text(setup)
    proc = _tasn("validate", "--data", str(tmp_path / "raw"), "--report-dir", str(tmp_path / "report"), *args,
                 cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("tasn validate: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["params.yaml"] if setup else [])  # nothing written


def test_without_a_params_file_the_cli_uses_the_defaults(tmp_path):
    """Outside a project (no params.yaml here) a stage runs on the defaults, which are params.yaml's."""
    proc = _tasn("validate", "--data", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == f"tasn validate: error: {tmp_path / 'nowhere'}: not a directory"
