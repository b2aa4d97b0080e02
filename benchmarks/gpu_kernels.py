"""The Triton kernels against the PyTorch paths they replace, on one CUDA GPU (bf16).

1. Attention forward, TFLOP/s (4·B·H·N²·D per call): the Triton kernel vs SDPA's flash,
   cuDNN and memory-efficient backends, on q/k/v sliced from one fused qkv projection (the
   layout DiT passes): DiT-XL/2 at 256 px (B=32, H=16, N=256, D=72) and 512 px (N=1024), and
   N=4096 with D=64 and D=128. Ratios are against the fastest SDPA backend.
2. Guidance + solver step, GB/s of compulsory traffic: the fused kernel vs the eager PyTorch
   reference, and as a fraction of a device-to-device copy's bandwidth in the same run.
3. One DiT-XL/2 block (B=32, 256 tokens) and a full random-weight DiT-XL/2 50-step guided
   sampling run (DDIM, scale 4): fused path (attention and fused backends `auto`) vs eager
   (`sdpa`, `reference`).

    python benchmarks/gpu_kernels.py            # everything, < 4 minutes on an H100
    python benchmarks/gpu_kernels.py --skip-dit --sweep-attention   # tune attention_config
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --smoke   # tiny shapes, no GPU needed:
                                                                  # checks the script runs

Every ratio is against a baseline measured in this run. Without a CUDA device (and without
--smoke) it prints why and exits with status 0.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F

from denoised.kernels.attention import AttentionConfig, attention_config, flash_attention_triton
from denoised.kernels.backends import using_backends
from denoised.kernels.guidance import BatchUpdate, guided_update_reference, guided_update_triton
from denoised.models.backbones.dit import DiT
from denoised.models.checkpoints.presets import build_preset


def seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call after two warm-up calls (compilation, autotuning, caches)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def sdpa_backend(name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def bench_attention(shapes, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    print("\n1. Attention forward, TFLOP/s (fused-qkv views)")
    sdpa_names = ("flash", "cudnn", "efficient") if device.type == "cuda" else ("math",)
    names = ("triton", *sdpa_names)
    print(f"{'B':>3} {'H':>3} {'N':>5} {'D':>4} " + " ".join(f"{n:>9}" for n in names)
          + f" {'vs best SDPA':>12} {'max |err|':>9}")  # fmt: skip
    for b, h, n, d in shapes:
        qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        flops = 4 * b * h * n * n * d
        rates, outputs = {}, {}
        fns = {"triton": flash_attention_triton} | {s: sdpa_backend(s) for s in sdpa_names}
        for name, fn in fns.items():
            try:
                outputs[name] = fn(q, k, v)
                call = functools.partial(fn, q, k, v)
                rates[name] = flops / seconds(call, device, repeats) / 1e12
            except RuntimeError as error:  # a backend that does not take this shape
                print(f"    ({name}: {str(error).splitlines()[0][:80]})")
        best = max((rates[s] for s in sdpa_names if s in rates), default=float("nan"))
        ref = next((outputs[s] for s in sdpa_names if s in outputs), None)
        err = (outputs["triton"].float() - ref.float()).abs().max().item() if ref is not None else 0
        cells = " ".join(f"{rates[x]:>9.1f}" if x in rates else f"{'n/a':>9}" for x in names)
        print(f"{b:>3} {h:>3} {n:>5} {d:>4} {cells} {rates['triton'] / best:>11.2f}x {err:>9.1e}")


def sweep_attention(shapes, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    """Time candidate block configurations per shape, to revisit `attention_config`'s table."""
    print("\nAttention block-configuration sweep, TFLOP/s (shipped config marked *)")
    candidates = [
        AttentionConfig(m, n, warps, stages)
        for m in (64, 128) for n in (32, 64, 128) for warps in (4, 8) for stages in (2, 3, 4)
    ]  # fmt: skip
    capability = torch.cuda.get_device_capability(device)
    for b, h, n, d in shapes:
        qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        shipped = attention_config(d, dtype, capability)
        rates = {}
        for cfg in candidates:
            call = functools.partial(flash_attention_triton, q, k, v, config=cfg)
            try:
                rates[cfg] = 4 * b * h * n * n * d / seconds(call, device, repeats) / 1e12
            except Exception as error:  # out of shared memory or registers on this card
                print(f"    ({cfg}: {type(error).__name__})")
        ranked = sorted(rates.items(), key=lambda item: -item[1])[:5]
        best = ", ".join(
            f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"
            f"{'*' if c == shipped else ''}: {r:.0f}" for c, r in ranked
        )  # fmt: skip
        shipped_rate = rates.get(shipped, float("nan"))
        print(f"  B={b} H={h} N={n} D={d}: shipped {shipped_rate:.0f}; best {best}")


def _step_inputs(batch: int, shape: tuple[int, int, int], order: int, device, cond_dtype):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=g).to(device)

    guided = batch // 2  # half the samples guided, as in a mixed serving batch
    out = randn(batch + guided, 2 * shape[0], *shape[1:]).to(cond_dtype)  # learned sigma
    index = torch.full((batch,), -1, dtype=torch.int64)
    index[:guided] = torch.arange(guided)
    vec = randn(batch)
    update = BatchUpdate(
        uncond_index=index.to(device), w=vec + 4, p=vec, q=vec + 1, a=vec - 1,
        b=randn(batch, order), history=randn(order - 1, batch, *shape), c=vec,
        noise=randn(batch, *shape),
    )  # fmt: skip
    inputs = dict(
        x=randn(batch, *shape),
        cond=out[:batch, : shape[0]],
        uncond=out[batch:, : shape[0]],
        update=update,
        guided_channels=3,
    )
    elem = batch * shape[0] * shape[1] * shape[2]
    guided_elems = guided * 3 * shape[1] * shape[2]
    # Compulsory traffic: read x, cond, noise, history, guided uncond; write x_next and d.
    size = torch.finfo(cond_dtype).bits // 8
    traffic = elem * (4 + size + 4 + 4 * (order - 1) + 8) + guided_elems * size
    return inputs, traffic


def bench_guidance(cases, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    print("\n2. Guidance + solver step, GB/s (half the rows guided on 3 of 4 channels, noise on)")
    print(f"{'batch':>5} {'latent':>9} {'K':>2} {'MB':>7} {'fused':>8} {'eager':>8}"
          f" {'copy':>8} {'vs eager':>8} {'of copy':>7}")  # fmt: skip
    for batch, shape, order in cases:
        inputs, traffic = _step_inputs(batch, shape, order, device, dtype)
        fused_call = functools.partial(guided_update_triton, **inputs)
        eager_call = functools.partial(guided_update_reference, **inputs)
        fused = traffic / seconds(fused_call, device, repeats) / 1e9
        eager = traffic / seconds(eager_call, device, repeats) / 1e9
        src = torch.empty(traffic // 8, dtype=torch.float32, device=device)
        copy_call = functools.partial(torch.empty_like(src).copy_, src)
        copy = traffic / seconds(copy_call, device, repeats) / 1e9  # read + write
        latent = "x".join(map(str, shape))
        print(f"{batch:>5} {latent:>9} {order:>2} {traffic / 1e6:>7.1f} {fused:>8.0f} {eager:>8.0f}"
              f" {copy:>8.0f} {fused / eager:>7.2f}x {fused / copy:>6.0%}")  # fmt: skip


def bench_dit(
    name: str,
    backbone: torch.nn.Module,
    config: dict,
    block_batch: int,
    images: int,
    steps: int,
    repeats: int,
    fused: str = "auto",
) -> None:
    """One block and a full guided sampling run, `fused` (the attention and fused backends)
    against eager; the backbone already on its device and dtype."""
    from denoised.models.conditioning import Conditioning
    from denoised.models.sampling.process import process_from_config
    from denoised.models.sampling.samplers import create_sampler, sample

    param = next(backbone.parameters())
    device, dtype = param.device, param.dtype
    arch = backbone.config
    tokens = (arch.input_size // arch.patch_size) ** 2
    paths = {
        "fused": dict(attention=fused, fused=fused),
        "eager": dict(attention="sdpa", fused="reference"),
    }
    print(f"\n3. {name} ({dtype}): fused path vs eager")
    block = backbone.blocks[0]
    x = torch.randn(block_batch, tokens, arch.hidden_size, device=device, dtype=dtype)
    c = torch.randn(block_batch, arch.hidden_size, device=device, dtype=dtype)
    times = {}
    for path, env in paths.items():
        with using_backends(**env), torch.inference_mode():
            times[path] = seconds(lambda: block(x, c), device, repeats)
    print(
        f"  one block, B={block_batch}, {tokens} tokens: fused {times['fused'] * 1e3:.3f} ms, "
        f"eager {times['eager'] * 1e3:.3f} ms, speed-up {times['eager'] / times['fused']:.2f}x"
    )

    process = process_from_config(config["process"])
    labels = torch.arange(images, device=device) % arch.num_classes
    shape = (images, arch.in_channels, arch.input_size, arch.input_size)

    def model_fn(x, t, y):
        return backbone(x.to(dtype), t, y)

    def run():
        generator = torch.Generator(device=device).manual_seed(0)
        state = create_sampler("ddim", process, steps, shape, generator, device=device)
        with torch.inference_mode():
            conditioning = Conditioning.classes(labels, arch.num_classes, 4.0)
            return sample(model_fn, state, conditioning, config["guided_channels"])

    results = {}
    for path, env in paths.items():
        with using_backends(**env):
            times[path] = seconds(functools.partial(_keep, results, path, run), device, 1)
    eager = results["eager"].float()
    err = (results["fused"].float() - eager).abs().max().item() / eager.abs().max().item()
    print(
        f"  {steps}-step guided sampling, {images} images: fused {times['fused']:.3f} s, "
        f"eager {times['eager']:.3f} s, speed-up {times['eager'] / times['fused']:.2f}x "
        f"(max |x_fused - x_eager| / max |x_eager| {err:.1e})"
    )


def _keep(results: dict, key: str, fn: Callable[[], object]) -> None:
    results[key] = fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--skip-dit", action="store_true", help="kernels only")
    parser.add_argument(
        "--sweep-attention", action="store_true", help="also time 36 attention block configs"
    )
    args = parser.parse_args()
    if args.smoke:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        bench_attention([(1, 2, 17, 72)], device, dtype, repeats=1)
        bench_guidance([(4, (4, 8, 8), 2)], device, dtype, repeats=1)
        # A two-block DiT-S/8 (16 tokens); off CUDA `auto` would mean the eager path, so the
        # kernels are forced (Triton's interpreter).
        backbone, config = build_preset("dit-s-2-256")
        small = DiT(replace(backbone.config, patch_size=8, depth=2)).to(device, dtype).eval()
        fused = "auto" if device.type == "cuda" else "triton"
        bench_dit("DiT-S/8, depth 2", small, config, 2, 1, steps=2, repeats=1, fused=fused)
        return
    if not torch.cuda.is_available():
        print("gpu_kernels.py: no CUDA device is available; nothing measured. "
              "Run it on a machine with a GPU (or pass --smoke to check the script).")  # fmt: skip
        return
    device, dtype = torch.device("cuda"), torch.bfloat16
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; "
          f"dtype {dtype}")  # fmt: skip
    attention_shapes = [
        (32, 16, 256, 72),
        (32, 16, 1024, 72),
        (4, 16, 4096, 64),
        (4, 16, 4096, 128),
    ]
    bench_attention(attention_shapes, device, dtype, repeats=30)
    bench_guidance(
        [(128, (4, 32, 32), 2), (128, (4, 32, 32), 3), (256, (4, 64, 64), 2)],
        device, dtype, repeats=30,
    )  # fmt: skip
    if not args.skip_dit:
        backbone, config = build_preset("dit-xl-2-256")
        backbone = backbone.to(device, dtype).eval()
        bench_dit("dit-xl-2-256", backbone, config, 32, images=16, steps=50, repeats=20)
    if args.sweep_attention:
        sweep_attention(attention_shapes, device, dtype, repeats=10)


if __name__ == "__main__":
    sys.exit(main())
