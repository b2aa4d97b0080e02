"""Shared test settings: deterministic, small thread counts (CI has 2 cores)."""

import os

import torch

torch.set_num_threads(2)

# Without a GPU the Triton kernels run in Triton's CPU interpreter. triton.jit picks its mode
# when a kernel is defined, so this must happen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
