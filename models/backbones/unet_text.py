"""A text-conditioned UNet compatible with diffusers' `UNet2DConditionModel` in the Stable
Diffusion 1.x / 2.x configurations (latent diffusion, Rombach et al., 2022).

The blocks are `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`, `UpBlock2D`
and `CrossAttnUpBlock2D`; every attention block is a `Transformer2DModel` with one
`BasicTransformerBlock` (self-attention, cross-attention on the text tokens, GEGLU
feed-forward, each after a LayerNorm) between GroupNorm + `proj_in` and `proj_out`, the
projections 1x1 convs (SD 1.x) or linear (`use_linear_projection`, SD 2.x). Parameter names
match diffusers, so a pipeline's `unet/` folder loads without renaming, and `from_dict` reads
its `config.json` as it is, refusing by name every setting outside these configurations.

diffusers' naming quirk is kept: `attention_head_dim` is the number of heads of each block
(an int, or one per down block, mirrored for the up blocks), not their width.

The text keys and values of a cross-attention layer depend only on the prompt, so they are
computed once per request (`text_cache`) and reused at every step and for every image of
the request; `forward` takes either the encoded text or such a `CrossAttentionCache`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from denoised.kernels.attention import attention
from denoised.models.backbones.architecture import Architecture
from denoised.models.backbones.conv_blocks import AttentionFactory
from denoised.models.backbones.unet import UNetLevels, check_blocks
from denoised.models.conditioning import TextContext

CROSS_DOWN, CROSS_UP = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
DOWN_BLOCKS = ("DownBlock2D", CROSS_DOWN)
UP_BLOCKS = ("UpBlock2D", CROSS_UP)
CROSS_BLOCKS = (CROSS_DOWN, CROSS_UP)

# diffusers settings outside SD 1.x/2.x: any other value is a different network, refused.
# A list value (one per block) must hold the supported value in every place.
FIXED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "transformer_layers_per_block": (1,),
    "reverse_transformer_layers_per_block": (None,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "cross_attention_norm": (None,),
    "attention_type": ("default",),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
}
# diffusers settings with no effect on this inference: dropout (training only),
# addition_embed_type_num_heads (used only with an addition embedding, refused above), and
# upcast_attention: diffusers' SDPA path ignores it too, and float32 needs no upcast; the
# kernels keep the softmax statistics in float32 at lower precisions anyway.
IGNORED_SETTINGS = ("dropout", "addition_embed_type_num_heads", "upcast_attention")


@dataclass(frozen=True)
class UNetTextConfig(Architecture):
    """Defaults are Stable Diffusion 1.5's UNet."""

    sample_size: int = 64  # latent side
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", CROSS_UP, CROSS_UP, CROSS_UP)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8  # heads per block (diffusers' name)
    cross_attention_dim: int = 768  # width of the text tokens
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_dim: int | None = None  # None: 4 x block_out_channels[0]

    def __post_init__(self):
        check_blocks(self, DOWN_BLOCKS, UP_BLOCKS)
        n = len(self.block_out_channels)
        for key in ("sample_size", "layers_per_block", "cross_attention_dim"):
            if type(getattr(self, key)) is not int:
                raise ValueError(f"{key} must be one integer, got {getattr(self, key)!r}")
        if len(self.heads) != n:
            raise ValueError(
                f"attention_head_dim gives {len(self.heads)} head counts for {n} blocks"
            )
        for width, heads in zip(self.block_out_channels, self.heads, strict=True):
            if heads < 1 or width % heads:
                raise ValueError(f"{heads} attention heads do not divide {width} channels")

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads of each resolution level (down block i, up block n-1-i)."""
        h = self.attention_head_dim
        return (h,) * len(self.block_out_channels) if isinstance(h, int) else tuple(h)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetTextConfig:
        """From our `to_dict` or a diffusers `UNet2DConditionModel` config.json as it is:
        `_`-prefixed metadata and `IGNORED_SETTINGS` are dropped, `FIXED_SETTINGS` must hold
        their supported value, anything else must be a field (ValueError naming the key)."""
        kind = d.get("_class_name", "UNet2DConditionModel")
        if kind != "UNet2DConditionModel":
            raise ValueError(f"{kind!r} is not a UNet2DConditionModel")
        d = {k: v for k, v in d.items() if not k.startswith("_") and k not in IGNORED_SETTINGS}
        for key, allowed in FIXED_SETTINGS.items():
            value = d.pop(key, allowed[0])
            values = value if isinstance(value, (list, tuple)) else [value]
            if not all(v in allowed for v in values):
                raise ValueError(
                    f"unsupported UNet2DConditionModel setting {key}={value!r} "
                    f"(supported: {' or '.join(map(repr, allowed))})"
                )
        size = d.get("sample_size")
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            d["sample_size"] = size[0]  # square [h, w]
        return super().from_dict(d)


@dataclass(frozen=True)
class CrossAttentionCache:
    """The text keys and values of every cross-attention layer, for a batch's rows.

    `kv[i]` is layer i's (K, V), each `[B, heads, L, head_dim]`; `mask` (`[B, L]` bool, True
    for real tokens; None: all real) leaves out padding. Made by `UNetText.text_cache`, taken
    by its `forward` in place of the text; `cat` and `repeat_rows` build a batch's cache out
    of its requests' caches.
    """

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    mask: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.kv[0][0].shape[0]

    @property
    def length(self) -> int:
        """Text tokens per row (padding included)."""
        return self.kv[0][0].shape[2]

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.kv for t in pair] + [m for m in (self.mask,) if m is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def full_mask(self) -> torch.Tensor:
        """The mask with None written out (every token real)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.rows, self.length, dtype=torch.bool, device=self.kv[0][0].device)

    @classmethod
    def cat(cls, caches: Sequence[CrossAttentionCache]) -> CrossAttentionCache:
        """The rows of `caches` in order; shorter texts are padded to the longest (zero keys and
        values, masked out). The mask stays None when no row has padding."""
        if not caches:
            raise ValueError("CrossAttentionCache.cat needs at least one cache")
        if len({len(c.kv) for c in caches}) != 1:
            raise ValueError("the caches come from backbones with different layer counts")
        length = max(c.length for c in caches)

        def padded(t: torch.Tensor, dim: int) -> torch.Tensor:
            pad = [0, 0] * (t.ndim - 1 - dim) + [0, length - t.shape[dim]]
            return F.pad(t, pad)

        def joined(i: int, j: int) -> torch.Tensor:
            return torch.cat([padded(c.kv[i][j], 2) for c in caches])

        kv = tuple((joined(i, 0), joined(i, 1)) for i in range(len(caches[0].kv)))
        if all(c.mask is None and c.length == length for c in caches):
            return cls(kv)
        return cls(kv, torch.cat([padded(c.full_mask(), 1) for c in caches]))

    def repeat_rows(self, n: int) -> CrossAttentionCache:
        """Every row `n` times in a row (a request's n images share its prompt)."""
        kv = tuple(
            (k.repeat_interleave(n, dim=0), v.repeat_interleave(n, dim=0)) for k, v in self.kv
        )
        mask = None if self.mask is None else self.mask.repeat_interleave(n, dim=0)
        return CrossAttentionCache(kv, mask)


class Attention(nn.Module):
    """diffusers' `Attention` as SD uses it: q/k/v projections without bias, `to_out.0` with;
    self-attention, or cross-attention on text tokens of width `kv_dim`."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, L, kv_dim]` -> K, V `[B, heads, L, head_dim]`."""
        return self.split_heads(self.to_k(source)), self.split_heads(self.to_v(source))

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x: [B, N, dim]`; `kv` None: self-attention (keys and values from `x`)."""
        k, v = self.kv(x) if kv is None else kv
        out = attention(self.split_heads(self.to_q(x)), k, v, mask)
        b, _, n, _ = out.shape
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer, 2020): half of the projection gates the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # net.1 is diffusers' dropout, which does nothing at inference.
        self.net = nn.ModuleList(
            [GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """diffusers' `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention on
    the text (layer `cache_index` of the cache), GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, cross_attention_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        self.cache_index = -1  # set by UNetText once every layer exists

    def forward(self, x: torch.Tensor, cache: CrossAttentionCache) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), cache.kv[self.cache_index], cache.mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel` on a feature map: GroupNorm, `proj_in`, the transformer
    blocks over the H*W positions, `proj_out`, residual."""

    def __init__(self, channels: int, heads: int, c: UNetTextConfig):
        super().__init__()
        self.linear = c.use_linear_projection
        self.norm = nn.GroupNorm(c.norm_num_groups, channels, eps=1e-6)
        self.proj_in: nn.Linear | nn.Conv2d
        self.proj_out: nn.Linear | nn.Conv2d
        if self.linear:
            self.proj_in = nn.Linear(channels, channels)
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, c.cross_attention_dim)]
        )

    def forward(self, x: torch.Tensor, cache: CrossAttentionCache) -> torch.Tensor:
        b, ch, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, ch)
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, cache)
        if self.linear:
            t = self.proj_out(t)
        t = t.reshape(b, h, w, ch).permute(0, 3, 1, 2)
        if not self.linear:
            t = self.proj_out(t)
        return t + x


class UNetText(UNetLevels):
    def __init__(self, config: UNetTextConfig):
        c = config

        def attention(level: int, kind: str) -> AttentionFactory:
            width, heads = c.block_out_channels[level], c.heads[level]
            return (lambda: SpatialTransformer(width, heads, c)) if kind in CROSS_BLOCKS else None

        mid = SpatialTransformer(c.block_out_channels[-1], c.heads[-1], c)
        super().__init__(c, attention, mid)
        # Cache slots in module order, which is also the order forward runs them in.
        self._cross_attention_blocks = [
            m for m in self.modules() if isinstance(m, TransformerBlock)
        ]
        for i, block in enumerate(self._cross_attention_blocks):
            block.cache_index = i

    def text_cache(self, context: TextContext) -> CrossAttentionCache:
        """Every cross-attention layer's keys and values of `context` (one row per row)."""
        tokens, mask = context.tokens, context.mask
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.cross_attention_dim:
            raise ValueError(
                f"text tokens must be [batch, tokens, {self.config.cross_attention_dim}], "
                f"got {list(tokens.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape[:2]):
            raise ValueError(
                f"the text mask must be a {list(tokens.shape[:2])} bool tensor, got "
                f"{list(mask.shape)} {mask.dtype}"
            )
        tokens = tokens.to(self.conv_in.weight.dtype)
        kv = tuple(block.attn2.kv(tokens) for block in self._cross_attention_blocks)
        return CrossAttentionCache(kv, mask)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: TextContext | CrossAttentionCache
    ) -> torch.Tensor:
        """`x: [B, C, H, W]` latents, `t: [B]` in [0, 1000), `y` the rows' encoded text or its
        cache (`text_cache`); the pooled embedding, if any, is not used by SD 1.x/2.x."""
        if y is None:
            raise ValueError(
                "a text-conditioned UNet needs text (unconditional rows: the empty prompt's)"
            )
        cache = y if isinstance(y, CrossAttentionCache) else self.text_cache(y)
        if cache.rows != x.shape[0]:
            raise ValueError(f"{cache.rows} rows of text for {x.shape[0]} rows of latents")
        return self.levels(x, self.embed_time(t), cache)
