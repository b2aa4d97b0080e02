"""Compile every shipped kernel launch for real GPU targets on a machine without a GPU.

`compile_launch` binds the exact arguments a launcher passes (so the specialisation —
constexprs, 16-byte alignment, integer arguments equal to 1 — is the launched one), compiles
them with Triton's own pipeline for a capability, and reassembles the PTX with the ptxas
Triton bundles to read the resource usage a driver would otherwise report.

Triton's language library is itself made of `triton.jit` functions, which become interpreter
functions when `TRITON_INTERPRET=1` is set at import; so the tests run `python targets.py` in
a child process without it, which compiles all `launch_cases()` and prints JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, create_function_from_signature

# Shared memory one block may use: sm_90 227 KB, sm_80 163 KB (CUDA programming guide).
MAX_SHARED = {90: 232448, 80: 166912}
ATTENTION_DTYPES = {
    90: (torch.bfloat16, torch.float16, torch.float32),
    80: (torch.bfloat16, torch.float32),
}


@dataclass(frozen=True)
class CompiledTarget:
    capability: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    wgmma: bool  # Hopper warpgroup matrix instructions
    mma_sync: bool  # Ampere-style warp matrix instructions
    cp_async: bool  # asynchronous global -> shared copies (software pipelining)
    vector_stores: bool  # 16-byte global stores


def compile_launch(kernel, capability: int, args: tuple, kwargs: dict) -> CompiledTarget:
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    target = GPUTarget("cuda", capability, 32)
    backend = triton.compiler.make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, None
    )
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
             str(src), "-o", str(Path(tmp, "kernel.cubin"))],
            check=True, capture_output=True, text=True,
        ).stderr  # fmt: skip
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if spills is None or registers is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return CompiledTarget(
        capability=capability,
        shared=compiled.metadata.shared,
        registers=int(registers.group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        wgmma="wgmma.mma_async" in ptx,
        mma_sync="mma.sync" in ptx,
        cp_async="cp.async" in ptx,
        vector_stores="st.global.v4" in ptx,
    )


def launch_cases() -> dict[str, tuple]:
    """name -> (kernel, capability, args, kwargs) for every shipped configuration."""
    from denoised.kernels.adaln import _adaln_fwd, adaln_launch
    from denoised.kernels.attention import _flash_attention_fwd, flash_attention_launch
    from denoised.kernels.guidance import BatchUpdate, _guided_update_fwd, guided_update_launch

    cases = {}
    for capability, dtypes in ATTENTION_DTYPES.items():
        for dtype in dtypes:
            for d in (32, 64, 72, 96, 128):
                # DiT's layout: q, k, v are views of one [B, N, 3, H, D] projection; N has a
                # ragged tail.
                qkv = torch.empty(2, 257, 3, 4, d, dtype=dtype)
                q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
                out = torch.empty(2, 4, 257, d, dtype=dtype)
                _, args, kwargs = flash_attention_launch(q, k, v, out, (capability // 10, 0))
                name = f"attention-sm{capability}-d{d}-{str(dtype).removeprefix('torch.')}"
                cases[name] = (_flash_attention_fwd, capability, args, kwargs)
    for capability in MAX_SHARED:
        # DiT-S, -B/-L and -XL widths: 512-, 1024- and 2048-lane column blocks.
        for channels in (384, 1024, 1152):
            x = torch.empty(2, 257, channels, dtype=torch.bfloat16)
            mod = torch.empty(2, 6 * channels, dtype=torch.bfloat16).chunk(6, dim=1)
            out = torch.empty(2 * 257, channels, dtype=torch.bfloat16)
            variants = {
                "norm": (None, None, mod[0], mod[1], None, out),
                "residual": (mod[2], x, None, None, out, None),
                "residual-norm": (mod[2], x, mod[0], mod[1], out, out),
            }
            for variant, (gate, branch, shift, scale, x_out, y) in variants.items():
                _, args, kwargs = adaln_launch(x, gate, branch, shift, scale, 1e-6, x_out, y)
                name = f"adaln-{variant}-sm{capability}-c{channels}-bfloat16"
                cases[name] = (_adaln_fwd, capability, args, kwargs)
    for capability in MAX_SHARED:
        # Tiny latents (one 256-element block per sample) and DiT-XL 256 px ones (4 x 32 x 32,
        # 2048-element blocks); the shortest and longest update; bf16 and float32 outputs.
        for (c, h), order, noise, dtype in (
            ((4, 8), 1, False, torch.bfloat16),
            ((4, 32), 4, True, torch.bfloat16),
            ((4, 32), 2, True, torch.float32),
        ):
            x = torch.empty(8, c, h, h)
            out = torch.empty(12, 2 * c, h, h, dtype=dtype)
            vec = torch.empty(8)
            update = BatchUpdate(
                torch.zeros(8, dtype=torch.int64), vec, vec, vec, vec, torch.empty(8, order),
                torch.empty(order - 1, 8, c, h, h), vec, torch.empty_like(x) if noise else None,
            )  # fmt: skip
            _, args, kwargs = guided_update_launch(
                x, out[:8, :c], out[8:, :c], update, c, torch.empty_like(x), torch.empty_like(x)
            )
            name = f"guidance-k{order}-noise{int(noise)}-sm{capability}-{c}x{h}x{h}-{dtype}"
            cases[name.replace("torch.", "")] = (_guided_update_fwd, capability, args, kwargs)
    return cases


def compile_all() -> dict[str, dict]:
    """Compile every case in a child process without the interpreter; name -> CompiledTarget."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, __file__], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout)


if __name__ == "__main__":
    results = {}
    for name, (kernel, capability, args, kwargs) in launch_cases().items():
        results[name] = asdict(compile_launch(kernel, capability, args, kwargs))
    json.dump(results, sys.stdout)
