"""What the cross-attention KV cache buys: per-step time of an SD-like text UNet given the
cached text keys/values vs given the text (every cross-attention layer projecting it again).

The UNet is Stable Diffusion 1.5's layout with every width halved (160..640 channels, 8 heads,
two resnets per level) on 32x32 latents, random weights, a 77-token x 768 prompt per row as
CLIP gives it. Rounds alternate the two modes (A B, B A, ...) so drifting machine load touches
both alike; each figure is the median over rounds. Not a test: timings depend on the machine.

    python benchmarks/cross_attention_cache.py                  # CPU, float32, batch 2
    python benchmarks/cross_attention_cache.py --device cuda --dtype bfloat16 --batch 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from denoised.models.backbones.unet_text import UNetText, UNetTextConfig
from denoised.models.conditioning import TextContext

REDUCED_SD15 = UNetTextConfig(sample_size=32, block_out_channels=(160, 320, 640, 640))
TOKENS = 77


def seconds_per_step(step, steps: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="rows per forward")
    parser.add_argument("--steps", type=int, default=3, help="timed forwards per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode (alternating)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "CPU"
    print(f"torch {torch.__version__}, {name}, {args.dtype}, {args.threads} CPU threads")

    torch.manual_seed(0)
    c = REDUCED_SD15
    unet = UNetText(c).to(device=device, dtype=dtype).eval().requires_grad_(False)
    x = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, device=device)
    x, t = x.to(dtype), torch.rand(args.batch, device=device) * 999
    context = TextContext(torch.randn(args.batch, TOKENS, c.cross_attention_dim, device=device))
    with torch.inference_mode():
        cache = unet.text_cache(context)
        modes = {
            "recompute": lambda: unet(x, t, context),
            "cached": lambda: unet(x, t, cache),
            "text_cache": lambda: unet.text_cache(context),  # once per request
        }
        sync = torch.cuda.synchronize if cuda else lambda: None
        for step in modes.values():
            step()  # warm-up: allocator, kernels' compilation
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for r in range(args.rounds):
            for mode in list(modes)[:: 1 if r % 2 == 0 else -1]:
                times[mode].append(seconds_per_step(modes[mode], args.steps, sync))

    per_row = cache.nbytes / args.batch / 2**20
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(
        f"UNet {params:.0f}M parameters, {len(cache.kv)} cross-attention layers, latents "
        f"{c.in_channels}x{c.sample_size}x{c.sample_size}, text {TOKENS}x"
        f"{c.cross_attention_dim}, batch {args.batch}; cache {per_row:.2f} MiB per row; "
        f"medians of {args.rounds} rounds x {args.steps} steps"
    )
    print(f"{'mode':>10} {'ms/call':>9}")
    for mode, seconds in times.items():
        print(f"{mode:>10} {statistics.median(seconds) * 1e3:>9.2f}")
    ratio = statistics.median(
        a / b for a, b in zip(times["recompute"], times["cached"], strict=True)
    )
    print(f"recompute / cached (median of the rounds' ratios): {ratio:.3f}x")


if __name__ == "__main__":
    main()
