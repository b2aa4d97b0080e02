"""Fault injection for reliability tests: off unless the `fault_injection` setting
(`DENOISED_FAULT_INJECTION`) names faults, e.g. `oom_above_rows=4,nan_label=7`.

Faults act on the backbone forward of the engine's model runners:

- `oom_above_rows=N`: a forward over more than N rows raises `torch.OutOfMemoryError`
  (as a device would), so the engine must split the batch and retry the halves.
- `oom_times=K`: `oom_above_rows` fires only on the first K such forwards of each model (a
  transient shortage); unset, on every one (a lasting limit).
- `nan_label=L`: the backbone's output is NaN on the rows conditioned on class id L.
- `raise_label=L`: a forward that contains a row conditioned on class id L raises.
- `forward_delay=S`: every forward first sleeps S seconds (a slow model, so tests can
  count steps against wall time).

Never set in production: the faults exist to prove that requests fail alone and the
engine carries on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from denoised.models.conditioning import ModelInput

Forward = Callable[[torch.Tensor, torch.Tensor, ModelInput | None], torch.Tensor]


@dataclass(frozen=True)
class Faults:
    oom_above_rows: int | None = None
    oom_times: int | None = None
    nan_label: int | None = None
    raise_label: int | None = None
    forward_delay: float | None = None

    @property
    def active(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def wrap(self, forward: Forward) -> Forward:
        """`forward` with the faults applied (itself when none are set)."""
        if not self.active:
            return forward
        oom_fired = 0

        def faulty(x: torch.Tensor, t: torch.Tensor, y: ModelInput | None) -> torch.Tensor:
            nonlocal oom_fired
            if self.forward_delay is not None:
                time.sleep(self.forward_delay)
            if (
                self.oom_above_rows is not None
                and x.shape[0] > self.oom_above_rows
                and (self.oom_times is None or oom_fired < self.oom_times)
            ):
                oom_fired += 1
                raise torch.OutOfMemoryError(
                    f"injected: {x.shape[0]} rows > oom_above_rows={self.oom_above_rows}"
                )
            # Label faults act on class ids only: a text model's rows have none.
            labels = y if isinstance(y, torch.Tensor) else None
            if (
                self.raise_label is not None
                and labels is not None
                and (labels == self.raise_label).any()
            ):
                raise RuntimeError(f"injected: a row has label {self.raise_label}")
            out = forward(x, t, y)
            if self.nan_label is not None and labels is not None:
                rows = (labels == self.nan_label).view(-1, *([1] * (out.dim() - 1)))
                out = out.masked_fill(rows, float("nan"))
            return out

        return faulty


def parse_faults(spec: str) -> Faults:
    """`"name=value,..."` → Faults; ValueError naming an unknown fault or a bad value."""
    kinds = {f.name: (float if f.name == "forward_delay" else int) for f in fields(Faults)}
    values: dict[str, Any] = {}  # name -> int, or float for forward_delay
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, raw = part.partition("=")
        name = name.strip()
        if name not in kinds:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(kinds)}")
        try:
            values[name] = kinds[name](raw)
        except ValueError:
            raise ValueError(f"fault {name}: cannot parse {raw!r}") from None
    return Faults(**values)
