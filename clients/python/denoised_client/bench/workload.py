"""Workload mixes: which requests a benchmark sends, and how often.

A mix file (JSON, or YAML with the `bench` extra) holds defaults for every request, the
endpoint, and a list of entries. A list-valued field in an entry expands to the cross product
(samplers × steps × guidance × n ...); each combination is drawn with the entry's `weight`:

    {"model": "digits-dit", "label": "3",
     "mix": [{"sampler": ["ddim", "dpmpp-2m"], "steps": [10, 20], "guidance_scale": 3},
             {"sampler": "heun", "steps": 10, "n": 4, "weight": 0.5}],
     "group_by": ["sampler", "steps"]}

`group_by` (default: sampler) names the fields whose values split the results into groups.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from denoised_client.types import ENDPOINT_PATHS, Endpoint, GenerationRequest

REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.name != "seed")
GROUP_FIELDS = ("sampler", "steps", "guidance_scale", "n", "model", "label", "size")
_SHORT = {"guidance_scale": "w"}


@dataclass(frozen=True)
class WorkItem:
    request: GenerationRequest
    weight: float


@dataclass(frozen=True)
class Workload:
    items: tuple[WorkItem, ...]
    endpoint: Endpoint = "generate"
    # The fields that name a request's group in the results (e.g. sampler and steps).
    group_by: tuple[str, ...] = ("sampler",)

    def __post_init__(self) -> None:
        if not self.items:
            raise ValueError("a workload needs at least one request in its mix")
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {', '.join(ENDPOINT_PATHS)}")
        unknown = [f for f in self.group_by if f not in GROUP_FIELDS]
        if unknown or not self.group_by:
            raise ValueError(f"group_by takes fields of {', '.join(GROUP_FIELDS)}; got {unknown}")

    def pick(self, rng: random.Random) -> GenerationRequest:
        """A request drawn by weight, with a seed from `rng` (so a run can be repeated)."""
        item = rng.choices(self.items, weights=[i.weight for i in self.items])[0]
        return dataclasses.replace(item.request, seed=rng.randrange(2**63))

    def group(self, request: GenerationRequest) -> str:
        """The request's group, e.g. `dpmpp-2m steps=20 w=3` (unset fields: `default`)."""
        parts = []
        for name in self.group_by:
            value = getattr(request, name)
            value = "default" if value is None else value
            parts.append(str(value) if name == "sampler" else f"{_SHORT.get(name, name)}={value}")
        return " ".join(parts)

    def describe(self) -> list[dict[str, Any]]:
        """The expanded mix as JSON-able rows (for the results file)."""
        return [
            {
                **{k: v for k, v in dataclasses.asdict(i.request).items() if v is not None},
                "weight": i.weight,
            }
            for i in self.items
        ]


def _expand(entry: dict[str, Any], defaults: dict[str, Any], where: str) -> list[WorkItem]:
    entry = dict(entry)
    weight = entry.pop("weight", 1.0)
    if not isinstance(weight, (int, float)) or weight <= 0:
        raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
    fields = {**defaults, **entry}
    unknown = sorted(set(fields) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(REQUEST_FIELDS)}, weight"
        )
    axes = {k: v if isinstance(v, list) else [v] for k, v in fields.items()}
    if any(not values for values in axes.values()):
        raise ValueError(f"{where}: an empty list leaves nothing to send")
    return [
        WorkItem(GenerationRequest(**dict(zip(axes, combo, strict=True))), float(weight))
        for combo in itertools.product(*axes.values())
    ]


def workload_from_spec(spec: dict[str, Any]) -> Workload:
    """A workload from a parsed mix file (see the module docstring)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("mix"), list):
        raise ValueError('a mix spec is an object with a "mix" list of request entries')
    defaults = {k: v for k, v in spec.items() if k not in ("mix", "endpoint", "group_by")}
    items = [
        item
        for i, entry in enumerate(spec["mix"])
        for item in _expand(entry, defaults, f"mix[{i}]")
    ]
    group_by = spec.get("group_by", ["sampler"])
    group_by = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    return Workload(tuple(items), spec.get("endpoint", "generate"), group_by)


def load_workload(path: str | Path) -> Workload:
    """Read a mix file: `.yaml`/`.yml` (needs pyyaml), anything else JSON."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: YAML mixes need pyyaml (pip install 'denoised-client[bench]'); "
                "or write the mix as JSON"
            ) from None
        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    try:
        return workload_from_spec(spec)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
