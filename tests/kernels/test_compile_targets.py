"""Every shipped kernel configuration compiles for Hopper (sm_90) and Ampere (sm_80).

No GPU needed (see targets.py). Checked per configuration: no register spills, shared memory
within the architecture's limit; for attention, pipelined (cp.async) loads and tensor-core
instructions (wgmma on sm_90, mma.sync on sm_80) on half-precision tiles; for the
memory-bound elementwise kernels, 16-byte vector stores.
"""

from __future__ import annotations

import pytest
from targets import MAX_SHARED, compile_all, launch_cases

CASES = sorted(launch_cases())


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:
    return compile_all()


@pytest.mark.parametrize("name", CASES)
def test_compiles_without_spills(compiled: dict[str, dict], name: str) -> None:
    result = compiled[name]
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, result
    assert result["shared"] <= MAX_SHARED[result["capability"]], result
    if name.startswith("attention-"):
        assert result["cp_async"], f"{name}: key/value loads are not pipelined"
        if not name.endswith("float32"):  # float32 keeps full-precision dots on CUDA cores
            instruction = "wgmma" if result["capability"] == 90 else "mma_sync"
            assert result[instruction], f"{name}: no tensor-core instructions"
    else:
        assert result["vector_stores"], f"{name}: stores are not vectorised"
