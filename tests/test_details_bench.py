"""benchmarks/details.py: which logged runs count as the same recipe; benchmarks/part_zoom.py: the zoom
it reads off a sampler grid."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from tasn.config import load_config
from tasn.model import build_model
from tasn.model.sampler import sampler_coordinates

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str = "details"):
    spec = importlib.util.spec_from_file_location(f"{script}_bench", ROOT / "benchmarks" / f"{script}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{script}_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_what_only_tasn_reads_leaves_the_baselines_recipe_alone():
    bench = _bench()

    def ids(*overrides):
        cfg = load_config(ROOT / "params.yaml", None, list(overrides))
        return {key: bench.recipe_id(cfg, key) for key in bench.MODELS}

    base = ids()
    tasn_only = ids("model.att_size=112", "train.attention_first=0.5", "loss.w_part=0.2", "model.dense=2.0",
                    "model.structure_power=2")
    assert tasn_only["tasn"] != base["tasn"]
    assert (tasn_only["baseline"], tasn_only["ceiling"]) == (base["baseline"], base["ceiling"])
    shared = ids("train.lr=0.05")
    assert all(shared[key] != base[key] for key in bench.MODELS)
    # and the baseline network really does not read them: the same weights from the same seed
    nets = []
    for overrides in ([], ["model.att_size=112", "model.dense=2.0", "model.att_head_channels=8"]):
        cfg = load_config(ROOT / "params.yaml", None, ["model.kind=baseline", *overrides])
        torch.manual_seed(0)
        nets.append(build_model(cfg.model, 5).state_dict())
    assert nets[0].keys() == nets[1].keys() and all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


def test_the_embedded_verdict_needs_both_models_and_says_nothing_without_one():
    bench = _bench()
    run = [{"top1": 0.7}, {"top1": 0.6}]
    assert bench.verdict({"tasn": run}) == ""  # --models tasn: nothing to compare with
    said = bench.verdict({"tasn": run, "baseline": [{"top1": 0.55}, {"top1": 0.55}]})
    assert "+15.0, +5.0" in said and "premise NOT shown on every seed" in said


def test_a_plain_resize_zooms_by_one_and_a_map_on_the_part_by_up_to_dense():
    zooms, size, out = _bench("part_zoom").zooms, 168, 56
    step = (size - 1) / 10  # 11 x 11 maps, upsampled with aligned corners: cell k is centred at k * step
    parts = [(5 * step, 5 * step, 12.0), (2 * step, 7 * step, 12.0)]
    uniform = torch.ones(2, 11, 11)  # a plain resize, by the sampler's definition
    assert zooms(sampler_coordinates(uniform, size, out, 4.0, 5, 2.0), parts, size, out) == pytest.approx(
        [1.0, 1.0], abs=0.1)
    hot = torch.zeros(2, 11, 11)
    hot[0, 5, 5] = hot[1, 7, 2] = 1.0  # one hot cell over each part
    for power in (2.0, 12.0):
        z = zooms(sampler_coordinates(hot, size, out, 4.0, 5, power), parts, size, out)
        assert all(2.0 < v <= 4.0 * 1.05 for v in z), (power, z)  # `dense` caps it
