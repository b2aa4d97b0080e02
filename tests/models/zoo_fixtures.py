"""Fixtures shared by the zoo tests (imported by name into each test module)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # 16-sample batches of an 8×8 model: a second thread only adds synchronisation, which
    # costs seconds per test on a loaded 2-core machine. Restoring the count afterwards also
    # undoes the zoo commands' own torch.set_num_threads(--threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
