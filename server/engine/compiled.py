"""Compiled backbones: a served model's backbone through `torch.compile` (inductor).

The batch dimension is compiled dynamic, so a model compiles once for every batch size (a
one-row batch is padded to two rows: dynamo specialises size 1, which would cost a second
compile). On CPU this measured as fast as one static graph per size at a fraction of the
compile time. Weights stay graph inputs: inductor's `freezing` (weights constant-folded into
the graph, linears prepacked for oneDNN, a second copy of the weights kept) measured no faster
in float32 (`docs/benchmarks.md`). On CUDA the compiled backbone also runs under CUDA graphs
(`mode="reduce-overhead"`), which replay one recorded shape each, so rows are padded up to a
bucket — powers of two below `max_batch`, and `max_batch` — and at most one graph per bucket
is recorded. Padding rows repeat the batch's first row and are sliced off: every row of a
backbone is its own sample, so they change nothing in the real rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import overload

import torch

from denoised.models.conditioning import ModelInput

log = logging.getLogger("denoised.engine")

Backbone = Callable[[torch.Tensor, torch.Tensor, ModelInput | None], torch.Tensor]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes: 1, 2, 4, … below `max_batch`, then `max_batch` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes = [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch]
    return (*sizes, max_batch)


def bucket_for(rows: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `rows` (`rows` itself above the largest)."""
    return next((size for size in buckets if size >= rows), rows)


# The fewest rows a compiled call gets (size 1 would specialise a graph of its own).
MIN_ROWS = 2


@overload
def pad_rows(tensor: torch.Tensor, size: int) -> torch.Tensor: ...
@overload
def pad_rows(tensor: None, size: int) -> None: ...
@overload
def pad_rows(tensor: torch.Tensor | None, size: int) -> torch.Tensor | None: ...


def pad_rows(tensor: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """`tensor` with its first row repeated until it has `size` rows."""
    if tensor is None or tensor.shape[0] >= size:
        return tensor
    extra = tensor[:1].expand(size - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra])


class CompiledBackbone:
    """`backbone` compiled, called like it: `(x, t, y) -> out` with out's rows matching x's.

    `buckets`: pad every call's rows up to one of these sizes (None: no padding)."""

    def __init__(self, backbone: torch.nn.Module, buckets: tuple[int, ...] | None) -> None:
        self.backbone = backbone
        self.buckets = buckets
        self.cuda_graphs = next(backbone.parameters()).is_cuda
        if self.cuda_graphs:
            self._fn = torch.compile(backbone, mode="reduce-overhead")
        else:
            self._fn = torch.compile(backbone)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: ModelInput | None) -> torch.Tensor:
        # Text models run eager (`ModelRunner`): a compiled backbone takes class ids or nothing.
        assert y is None or isinstance(y, torch.Tensor)
        rows = x.shape[0]
        size = max(MIN_ROWS, rows if self.buckets is None else bucket_for(rows, self.buckets))
        x, t, y = pad_rows(x, size), pad_rows(t, size), pad_rows(y, size)
        for value in (x, t, y):
            if value is not None:
                torch._dynamo.maybe_mark_dynamic(value, 0)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
            # The graph's output buffer is overwritten by its next replay: keep a copy.
            return self._fn(x, t, y)[:rows].clone()
        return self._fn(x, t, y)[:rows]

    def warm_sizes(self) -> tuple[int, ...]:
        """Batch sizes whose first call compiles (or records) something: each bucket when
        padding (one-row calls share the two-row graph), else one dynamic size."""
        if self.buckets is None:
            return (MIN_ROWS,)
        return tuple(size for size in self.buckets if size >= MIN_ROWS) or (MIN_ROWS,)

    @torch.inference_mode()
    def warm_up(self, example: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> float:
        """Call once at every `warm_sizes` size (rows of `example` repeated); seconds taken."""
        started = time.perf_counter()
        x, t, y = example
        for size in self.warm_sizes():
            self(
                pad_rows(x[:1], size),
                pad_rows(t[:1], size),
                None if y is None else pad_rows(y[:1], size),
            )
        return time.perf_counter() - started


def compile_backbone(backbone: torch.nn.Module, max_batch: int) -> CompiledBackbone:
    """The compiled backbone the server runs: padded to `batch_buckets` under CUDA graphs."""
    cuda = next(backbone.parameters()).is_cuda
    return CompiledBackbone(backbone, batch_buckets(max_batch) if cuda else None)
