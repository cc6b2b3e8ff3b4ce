"""Config: params.yaml sections, profiles and overrides; every bad key or value is named."""

from __future__ import annotations

import pytest

from tasn.config import Config, ConfigError, load_config

ROOT_PARAMS = "params.yaml"


def test_repository_params_and_every_profile_load():
    base = load_config(ROOT_PARAMS)
    assert base.model.kind == "tasn"
    cub = load_config(ROOT_PARAMS, "cub")
    # the authors' CUB recipe (TASN.md)
    assert (cub.model.input_size, cub.model.att_size, cub.model.out_size) == (512, 224, 224)
    assert (cub.train.lr, cub.train.epochs, cub.train.milestones) == (0.1, 300, [100, 200])
    assert cub.model.backbone == "resnet50" and cub.model.dense == 4.0 and cub.model.iters == 5
    assert cub.loss.temperature == 10.0
    for name in ("demo", "cub336", "smoke"):
        load_config(ROOT_PARAMS, name)


def test_overrides_are_typed_and_applied_last():
    cfg = load_config(ROOT_PARAMS, "smoke", ["train.lr=0.01", "model.kind=baseline", "train.milestones=[1, 2]"])
    assert cfg.train.lr == 0.01 and cfg.model.kind == "baseline" and cfg.train.milestones == [1, 2]
    assert cfg.flat()["train.lr"] == 0.01


def test_missing_params_file_gives_defaults(tmp_path):
    assert load_config(tmp_path / "none.yaml") == Config()


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
    ],
)
def test_bad_values_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT_PARAMS, None, overrides)


def test_unknown_profile_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="profile 'nope' is not in"):
        load_config(ROOT_PARAMS, "nope")
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
