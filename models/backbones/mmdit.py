"""MMDiT: the multimodal diffusion transformer of Stable Diffusion 3 (Esser et al., 2024).

Latents are cut into p x p patches and given a fixed 2-D sin-cos position table, cropped from
the centre of a `pos_embed_max_size`² table so one model serves several sizes. The text
encoders' hidden states are projected to the same width (`context_embedder`). Every joint
block keeps two streams of weights, one per modality (adaLN-Zero modulation, q/k/v and output
projections, MLP), and runs one attention over the concatenated image and text tokens, so
each modality attends to both. The modulation comes from the sum of a timestep embedding and
a projection of the pooled text embedding. The last block updates only the image tokens (its
text stream stops at the keys and values: `context_pre_only`); an adaptive LayerNorm and a
linear layer map the tokens back to patches.

Config fields and parameter names are diffusers' `SD3Transformer2DModel`, so a pipeline's
`transformer/` folder (config.json + safetensors) loads without renaming. SD3.5's two options
are supported: `qk_norm="rms_norm"` (RMSNorm over each head's queries and keys, both streams)
and `dual_attention_layers` (blocks with a second, image-only self-attention: MMDiT-X).

Time convention: `t` is diffusers' `timestep`, 1000·σ for `x = (1−σ)·x0 + σ·ε` (the flow
process's "rf" convention, `FlowProcess(convention="rf")`); the output is the velocity ε − x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from denoised.kernels.activations import gelu_tanh
from denoised.kernels.adaln import (
    gate_residual,
    gate_residual_layer_norm_modulate,
    layer_norm_modulate,
)
from denoised.kernels.attention import attention
from denoised.models.backbones.architecture import Architecture
from denoised.models.backbones.dit import PatchEmbed, patch_grid, unpatchify
from denoised.models.backbones.embeddings import TimestepMLP, sincos_2d, timestep_embedding
from denoised.models.conditioning import TextContext

DIFFUSERS_CLASS = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm")
# Width of the sinusoidal timestep features (diffusers' `Timesteps(256)`, cos first, shift 0).
TIME_FREQ_DIM = 256
# eps of every LayerNorm and of the q/k RMSNorms.
NORM_EPS = 1e-6


@dataclass(frozen=True)
class MMDiTConfig(Architecture):
    """diffusers' `SD3Transformer2DModel` arguments, with its defaults (SD3-medium is
    `presets.SD3_MEDIUM`)."""

    sample_size: int = 128  # latent side of the training images
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096  # width of the text encoders' hidden states
    caption_projection_dim: int = 1152  # text stream width: must equal the image stream's
    pooled_projection_dim: int = 2048  # width of the pooled text embedding
    out_channels: int | None = 16  # None: in_channels
    pos_embed_max_size: int = 96  # side of the position table inputs are cropped from
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 (MMDiT-X) blocks with a second attention
    qk_norm: str | None = None  # SD3.5: "rms_norm"

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        for name in (
            "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
            "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
            "pooled_projection_dim", "out_channels", "pos_embed_max_size",
        ):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MMDiT {name} must be a positive integer, got {value!r}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"MMDiT caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads x attention_head_dim ({self.inner_dim}): joint attention "
                "runs both streams at one width"
            )
        if self.qk_norm not in QK_NORMS:
            raise ValueError(
                f"MMDiT qk_norm {self.qk_norm!r} is not supported; supported: {QK_NORMS}"
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"MMDiT dual_attention_layers {bad} are not layers of a {self.num_layers}-layer "
                "model"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """`out_channels` resolved (`__post_init__` sets None to `in_channels`)."""
        return self.in_channels if self.out_channels is None else self.out_channels

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MMDiTConfig:
        """From a model directory's `architecture` or diffusers' `transformer/config.json`
        (its `_`-prefixed metadata is dropped once `_class_name` is checked); ValueError naming
        an unknown field or an unsupported value."""
        if d.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
            raise ValueError(f"_class_name {d['_class_name']!r} is not {DIFFUSERS_CLASS}")
        return super().from_dict({k: v for k, v in d.items() if not k.startswith("_")})


class CroppedPatchEmbed(PatchEmbed):
    """Patch tokens plus the centre crop of the fixed position table (diffusers' `PatchEmbed`
    with `pos_embed_max_size`). The table is stored in checkpoints, so it is a buffer that
    loads like a weight (and is not computed on the meta device, where loading builds)."""

    pos_embed: torch.Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, c: MMDiTConfig):
        super().__init__(c.in_channels, c.inner_dim, c.patch_size)
        self.patch_size = c.patch_size
        side = self.max_size = c.pos_embed_max_size
        table = torch.empty(1, side * side, c.inner_dim)
        if not table.is_meta:
            # The table's positions span the training grid's side (sample_size / p), not one
            # per index.
            spacing = side / (c.sample_size // c.patch_size)
            table.copy_(sincos_2d(c.inner_dim, side, side, spacing)[None])
        self.register_buffer("pos_embed", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = patch_grid(x, self.patch_size)
        m = self.max_size
        if grid_h > m or grid_w > m:
            raise ValueError(
                f"latent grid {grid_h}x{grid_w} (patches) is larger than the position table "
                f"(pos_embed_max_size {m})"
            )
        top, left = (m - grid_h) // 2, (m - grid_w) // 2
        table = self.pos_embed.view(m, m, -1)[top : top + grid_h, left : left + grid_w]
        return super().forward(x) + table.reshape(1, grid_h * grid_w, -1)


class TimeTextEmbed(nn.Module):
    """The conditioning vector: timestep embedding + pooled text projection (diffusers'
    `CombinedTimestepTextProjEmbeddings`)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepMLP(TIME_FREQ_DIM, dim)
        self.text_embedder = TimestepMLP(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(t, TIME_FREQ_DIM, flip_sin_to_cos=True, freq_shift=0.0)
        return self.timestep_embedder(freqs.to(pooled.dtype)) + self.text_embedder(pooled)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero's per-sample modulation vectors from the conditioning: (shift, scale, gate)
    for attention and for the MLP, and a third triple for MMDiT-X's second attention."""

    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(c)).chunk(self.chunks, dim=1)


class AdaLayerNormContinuous(nn.Module):
    """LayerNorm modulated by the conditioning, without a gate (the last block's text input
    and the output norm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(c)).chunk(2, dim=1)  # scale first, unlike adaLN-Zero
        return layer_norm_modulate(x, shift, scale, NORM_EPS)


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, NORM_EPS)


class Attention(nn.Module):
    """Self-attention over the image tokens, joined by the text tokens when `added_kv`: their
    own projections (`add_*_proj`), one softmax over both, split back afterwards.

    With `context_pre_only` (the last block) the text tokens give keys and values only: their
    outputs would be discarded, so their queries are not computed (`add_q_proj` is kept for
    loading)."""

    def __init__(
        self, dim: int, heads: int, qk_norm: str | None, added_kv: bool, context_pre_only: bool
    ):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads

        def norm() -> RMSNorm | None:
            return RMSNorm(head_dim) if qk_norm == "rms_norm" else None

        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.norm_q, self.norm_k = norm(), norm()
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out: nn.Linear | None = None
        if added_kv:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (
                nn.Linear(dim, dim) for _ in range(3)
            )
            self.norm_added_q, self.norm_added_k = norm(), norm()
            if not context_pre_only:
                self.to_add_out = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor:
        b, n, d = t.shape
        t = t.view(b, n, self.heads, d // self.heads).transpose(1, 2)
        return t if norm is None else norm(t)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x: [B, N, D]` image tokens, `context: [B, L, D]` text tokens (with `added_kv`),
        `mask: [B, N + L]` keys to attend to. Returns (image out, text out or None)."""
        b, n, d = x.shape
        q = self._heads(self.to_q(x), self.norm_q)
        k = self._heads(self.to_k(x), self.norm_k)
        v = self._heads(self.to_v(x))
        text_out = self.to_add_out if context is not None else None
        if context is not None:
            k = torch.cat([k, self._heads(self.add_k_proj(context), self.norm_added_k)], dim=2)
            v = torch.cat([v, self._heads(self.add_v_proj(context))], dim=2)
            if text_out is not None:
                q = torch.cat([q, self._heads(self.add_q_proj(context), self.norm_added_q)], 2)
        out = attention(q, k, v, mask).transpose(1, 2).reshape(b, -1, d)
        return self.to_out[0](out[:, :n]), None if text_out is None else text_out(out[:, n:])


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with tanh GELU: `net.0.proj`, then `net.2`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj = nn.Module()
        proj.proj = nn.Linear(dim, mult * dim)
        # net.1 is diffusers' (inference-time no-op) dropout, kept so the names line up.
        self.net = nn.ModuleList([proj, nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        proj = cast(nn.Linear, self.net[0].proj)
        return self.net[2](gelu_tanh(proj(x)))


class JointTransformerBlock(nn.Module):
    """One MMDiT block: both streams modulated, joint attention, gated residuals, MLPs.

    The last block (`context_pre_only`) modulates its text input without gates and returns no
    text tokens. MMDiT-X blocks (`dual`) add an image-only attention on the block's input,
    with its own modulation, gated into the residual after the joint one."""

    def __init__(
        self, dim: int, heads: int, context_pre_only: bool, dual: bool, qk_norm: str | None
    ):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(dim, 9 if dual else 6)
        self.norm1_context = (
            AdaLayerNormContinuous(dim) if context_pre_only else AdaLayerNormZero(dim)
        )
        self.attn = Attention(dim, heads, qk_norm, True, context_pre_only)
        self.attn2 = Attention(dim, heads, qk_norm, False, False) if dual else None  # image only
        self.ff = FeedForward(dim)
        self.ff_context = None if context_pre_only else FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        c: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *second = self.norm1(c)
        h = layer_norm_modulate(x, shift_msa, scale_msa, NORM_EPS)
        if self.context_pre_only:
            h_context = self.norm1_context(context, c)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
                self.norm1_context(c)
            )
            h_context = layer_norm_modulate(context, c_shift_msa, c_scale_msa, NORM_EPS)
        branch, context_branch = self.attn(h, h_context, mask)
        if self.attn2 is not None:
            shift_msa2, scale_msa2, gate_msa2 = second
            h2 = layer_norm_modulate(x, shift_msa2, scale_msa2, NORM_EPS)
            x = gate_residual(x, gate_msa, branch)
            gate_msa, branch = gate_msa2, self.attn2(h2)[0]
        x, h = gate_residual_layer_norm_modulate(
            x, gate_msa, branch, shift_mlp, scale_mlp, NORM_EPS
        )
        x = gate_residual(x, gate_mlp, self.ff(h))
        if self.ff_context is None:  # context_pre_only: no text tokens out
            return x, None
        context, h_context = gate_residual_layer_norm_modulate(
            context, c_gate_msa, context_branch, c_shift_mlp, c_scale_mlp, NORM_EPS
        )
        return x, gate_residual(context, c_gate_mlp, self.ff_context(h_context))


class MMDiT(nn.Module):
    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.config = c = config
        dim = c.inner_dim
        self.pos_embed = CroppedPatchEmbed(c)
        self.time_text_embed = TimeTextEmbed(dim, c.pooled_projection_dim)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(
                dim,
                c.num_attention_heads,
                context_pre_only=i == c.num_layers - 1,
                dual=i in c.dual_attention_layers,
                qk_norm=c.qk_norm,
            )
            for i in range(c.num_layers)
        )
        self.norm_out = AdaLayerNormContinuous(dim)
        self.proj_out = nn.Linear(dim, c.patch_size * c.patch_size * c.output_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: TextContext) -> torch.Tensor:
        """`x: [B, C, H, W]` latents, `t: [B]` diffusers' timestep (1000·σ), `y` the prompts'
        encodings: `tokens [B, L, joint_attention_dim]`, `pooled [B, pooled_projection_dim]`
        (required) and `mask [B, L]` (optional: False marks padding no token attends to).
        Returns the velocity `[B, out_channels, H, W]`."""
        pooled = self._check_context(y, x.shape[0])
        grid_h, grid_w = patch_grid(x, self.config.patch_size)
        tokens = self.pos_embed(x)
        c = self.time_text_embed(t, pooled.to(x.dtype))
        context = self.context_embedder(y.tokens.to(x.dtype))
        mask = None
        if y.mask is not None:  # image tokens are never padding
            mask = torch.cat([y.mask.new_ones(x.shape[0], tokens.shape[1]), y.mask], dim=1)
        for block in self.transformer_blocks:
            tokens, context = block(tokens, context, c, mask)
        out = self.proj_out(self.norm_out(tokens, c))
        return unpatchify(out, grid_h, grid_w, self.config.patch_size, self.config.output_channels)

    def _check_context(self, y: TextContext | None, batch: int) -> torch.Tensor:
        """`y.pooled`, once `y` is checked to fit a `batch`-row forward (ValueError if not)."""
        c = self.config
        if not isinstance(y, TextContext) or y.pooled is None:
            raise ValueError("MMDiT needs y = TextContext(tokens, mask, pooled) with pooled set")
        if y.tokens.dim() != 3 or tuple(y.tokens.shape[::2]) != (batch, c.joint_attention_dim):
            raise ValueError(
                f"TextContext.tokens must be [{batch}, L, {c.joint_attention_dim}], got "
                f"{tuple(y.tokens.shape)}"
            )
        if tuple(y.pooled.shape) != (batch, c.pooled_projection_dim):
            raise ValueError(
                f"TextContext.pooled must be [{batch}, {c.pooled_projection_dim}], got "
                f"{tuple(y.pooled.shape)}"
            )
        if y.mask is not None and (
            y.mask.dtype != torch.bool or y.mask.shape != y.tokens.shape[:2]
        ):
            raise ValueError(
                f"TextContext.mask must be bool {tuple(y.tokens.shape[:2])}, got "
                f"{y.mask.dtype} {tuple(y.mask.shape)}"
            )
        return y.pooled
