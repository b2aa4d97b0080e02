"""Shared test settings: deterministic, small thread counts (CI has 2 cores), and the
live-server fixtures of tests/serving.py for every folder."""

import os

import torch

torch.set_num_threads(2)

# Without a GPU the Triton kernels run in Triton's CPU interpreter. triton.jit picks its mode
# when a kernel is defined, so this must happen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Imported after the lines above, so the kernels see TRITON_INTERPRET.
pytest_plugins = ["serving"]
