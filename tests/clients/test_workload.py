"""Workload mixes: cross-product expansion, weighted draws, grouping, and file errors."""

import json
import math
import random

import pytest

from denoised_client.bench.workload import load_workload, workload_from_spec

SPEC = {
    "model": "digits-dit",
    "label": "3",
    "mix": [
        {"sampler": ["ddim", "dpmpp-2m"], "steps": [10, 20], "guidance_scale": 3},
        {"sampler": "heun", "steps": 10, "n": 4, "weight": 2, "label": "7"},
    ],
}


def test_lists_expand_to_their_cross_product_with_defaults_applied():
    workload = workload_from_spec(SPEC)
    rows = workload.describe()
    assert len(rows) == 5
    assert {(r["sampler"], r["steps"]) for r in rows[:4]} == {
        ("ddim", 10), ("ddim", 20), ("dpmpp-2m", 10), ("dpmpp-2m", 20)
    }  # fmt: skip
    assert all(r["model"] == "digits-dit" and r["guidance_scale"] == 3 for r in rows[:4])
    assert rows[4] == {"label": "7", "model": "digits-dit", "n": 4, "sampler": "heun",
                       "steps": 10, "output_format": "png", "weight": 2.0}  # fmt: skip


def test_draws_follow_the_weights_and_carry_fresh_seeds():
    workload = workload_from_spec(SPEC)
    rng = random.Random(0)
    draws = [workload.pick(rng) for _ in range(6000)]
    heun = sum(d.sampler == "heun" for d in draws) / len(draws)
    expected = 2 / 6  # heun's weight 2 against four combinations of weight 1
    assert abs(heun - expected) < 5 * math.sqrt(expected * (1 - expected) / len(draws))
    assert len({d.seed for d in draws}) == len(draws)
    again = [workload.pick(random.Random(0)) for _ in range(1)]
    assert again[0] == draws[0]  # the same seed gives the same run


def test_groups_name_the_chosen_fields():
    workload = workload_from_spec({**SPEC, "group_by": ["sampler", "steps", "guidance_scale"]})
    names = {workload.group(item.request) for item in workload.items}
    assert names == {"ddim steps=10 w=3", "ddim steps=20 w=3", "dpmpp-2m steps=10 w=3",
                     "dpmpp-2m steps=20 w=3", "heun steps=10 w=default"}  # fmt: skip
    assert workload_from_spec({"mix": [{}]}).group(workload.items[0].request) == "ddim"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"mix": [{"sampler": "ddim", "colour": "red"}]}, ["mix[0]", "colour", "allowed"]),
        ({"mix": [{"weight": 0}]}, ["mix[0]", "weight must be a positive number"]),
        ({"mix": [{"steps": []}]}, ["empty list"]),
        ({"mix": []}, ["at least one request"]),
        ({"sampler": "ddim"}, ['"mix" list']),
        ({"mix": [{}], "endpoint": "edits"}, ["endpoint must be one of"]),
        ({"mix": [{}], "group_by": ["colour"]}, ["group_by", "colour"]),
    ],
)
def test_bad_specs_name_the_problem(spec, words):
    with pytest.raises(ValueError) as error:
        workload_from_spec(spec)
    for word in words:
        assert word in str(error.value)


def test_json_and_yaml_files(tmp_path):
    (tmp_path / "mix.json").write_text(json.dumps(SPEC))
    (tmp_path / "mix.yaml").write_text(
        "model: digits-dit\nlabel: '3'\nendpoint: images\nmix:\n"
        "  - {sampler: [ddim, dpmpp-2m], steps: [10, 20], guidance_scale: 3}\n"
        "  - {sampler: heun, steps: 10, n: 4, weight: 2, label: '7'}\n"
    )
    from_json = load_workload(tmp_path / "mix.json")
    from_yaml = load_workload(tmp_path / "mix.yaml")
    assert from_json.items == from_yaml.items and from_yaml.endpoint == "images"
    (tmp_path / "bad.json").write_text(json.dumps({"mix": [{"stesp": 3}]}))
    with pytest.raises(ValueError, match=r"bad\.json: mix\[0\]: unknown field\(s\) stesp"):
        load_workload(tmp_path / "bad.json")
