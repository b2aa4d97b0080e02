"""Shared test settings: deterministic, small thread counts (CI has 2 cores)."""

import torch

torch.set_num_threads(2)
