"""MMDiT against diffusers' SD3Transformer2DModel: a saved `transformer/` folder loads as it is
and gives diffusers' outputs (float32, within 1e-5 × the output's scale), sampling with our
Euler sampler and SD3's flow process equals diffusers' FlowMatchEulerDiscreteScheduler, and
padded prompts are masked out."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from denoised.models.backbones.mmdit import MMDiT, MMDiTConfig
from denoised.models.checkpoints.convert import (
    process_from_scheduler_config,
    read_diffusers_backbone,
)
from denoised.models.checkpoints.model_dir import (
    load_model_dir,
    save_model_dir,
)
from denoised.models.checkpoints.presets import SD3_MEDIUM, SD3_PROCESS
from denoised.models.conditioning import TextContext
from denoised.models.sampling.process import process_from_config
from denoised.models.sampling.samplers import create_sampler, sample

TINY = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 12,
    "out_channels": 4,
    "pos_embed_max_size": 12,
}
# SD3.5's options: q/k RMSNorm in both streams, MMDiT-X's second attention in block 0.
TINY_35 = {**TINY, "qk_norm": "rms_norm", "dual_attention_layers": (0,)}
CONFIGS = pytest.mark.parametrize("config", [TINY, TINY_35], ids=["sd3", "sd3.5"])
TEXT_TOKENS = 5


def random_sd3(config: dict, seed: int = 0) -> SD3Transformer2DModel:
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():  # no zero-initialised layer may hide a wrong path
            p.normal_(0, 0.15)
    return ref


def save_and_load(ref: SD3Transformer2DModel, tmp_path) -> MMDiT:
    """`ref` saved as a pipeline's `transformer/` folder, loaded by our backbone from the
    folder's config.json and safetensors as they are."""
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder)
    return read_diffusers_backbone(folder, "mmdit").eval()


def text(batch: int, seed: int = 2, tokens: int = TEXT_TOKENS) -> TextContext:
    g = torch.Generator().manual_seed(seed)
    return TextContext(
        torch.randn(batch, tokens, TINY["joint_attention_dim"], generator=g),
        pooled=torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
    )


def assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    scale = ref.abs().max().item()
    assert scale > 0.1
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max |ours − diffusers| = {err:.3g} > {rel:g} × {scale:.3g}"


@CONFIGS
def test_saved_transformer_loads_and_matches_diffusers(tmp_path, config):
    model = save_and_load(ref := random_sd3(config), tmp_path)
    g = torch.Generator().manual_seed(1)
    y = text(4)
    t = torch.tensor([0.0, 1000.0, 417.25, 3.5])  # a different step per sample
    # The training size, and smaller non-square inputs cropped from the table's centre.
    for h, w in ((8, 8), (6, 10), (24, 24)):
        x = torch.randn(4, 4, h, w, generator=g)
        with torch.no_grad():
            ours = model(x, t, y)
            theirs = ref(x, y.tokens, y.pooled, t).sample
        assert_close(ours, theirs)


def test_position_table_is_diffusers():
    ref = SD3Transformer2DModel(**TINY)  # built by diffusers, not randomised: its sin-cos table
    assert torch.equal(MMDiT(MMDiTConfig(**TINY)).pos_embed.pos_embed, ref.pos_embed.pos_embed)


@pytest.mark.parametrize(
    ("config", "millions"),
    [
        (SD3_MEDIUM.to_dict(), 2028.3),  # parameters, without the position table buffer
        # SD3.5-large and -medium shapes: q/k RMSNorm, and MMDiT-X blocks in the medium one.
        ({**SD3_MEDIUM.to_dict(), "num_layers": 38, "num_attention_heads": 38,
          "caption_projection_dim": 2432, "qk_norm": "rms_norm"}, 8056.7),
        ({**SD3_MEDIUM.to_dict(), "pos_embed_max_size": 384, "qk_norm": "rms_norm",
          "dual_attention_layers": tuple(range(13))}, 2243.2),
    ],
    ids=["sd3-medium", "sd3.5-large", "sd3.5-medium"],
)  # fmt: skip
def test_full_size_names_and_shapes_are_diffusers(config, millions):
    with torch.device("meta"):  # no memory, no init cost
        ref = SD3Transformer2DModel(**config)
        ours = MMDiT(MMDiTConfig.from_dict(dict(ref.config)))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert abs(sum(p.numel() for p in ours.parameters()) / 1e6 - millions) < 0.1


def test_model_directory_roundtrip(tmp_path):
    model = save_and_load(random_sd3(TINY_35, seed=4), tmp_path)
    save_model_dir(tmp_path / "model", model, {"process": SD3_PROCESS})
    loaded = load_model_dir(tmp_path / "model")
    assert loaded.config["family"] == "mmdit" and isinstance(loaded.backbone, MMDiT)
    assert loaded.backbone.config == model.config
    assert loaded.text_dims == (16, 12) and loaded.latent_shape == (4, 8, 8)
    assert loaded.guided_channels == 4 and loaded.null_label is None
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), text(2)
    with torch.no_grad():
        assert torch.equal(loaded.backbone(x, t, y), model(x, t, y))


def test_padded_prompt_tokens_are_not_attended_to():
    model = MMDiT(MMDiTConfig(**TINY)).eval()
    torch.manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 750.0])
    y = text(2, tokens=7)
    # Row 0's prompt has 3 real tokens, row 1's all 7.
    mask = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    with torch.no_grad():
        padded = model(x, t, TextContext(y.tokens, mask, y.pooled))
        short = model(x[:1], t[:1], TextContext(y.tokens[:1, :3], pooled=y.pooled[:1]))
        full = model(x[1:], t[1:], TextContext(y.tokens[1:], pooled=y.pooled[1:]))
        unmasked = model(x[:1], t[:1], TextContext(y.tokens[:1], pooled=y.pooled[:1]))
    assert_close(padded[:1], short)
    assert_close(padded[1:], full)
    assert (padded[:1] - unmasked).abs().max() > 1e-3  # the padding did matter unmasked


def test_euler_with_sd3_process_matches_flow_match_euler(tmp_path):
    """Same initial latents, same prompt: our sampler on our backbone, with the process read
    from SD3's scheduler config, against diffusers' scheduler on diffusers' transformer. The
    scheduler is handed our (unshifted) σ grid: by default it shifts its σ_min twice
    (tests/models/test_samplers_diffusers.py)."""
    ref = random_sd3(TINY, seed=6)
    model = save_and_load(ref, tmp_path)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's scheduler config
    scheduler.save_config(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    process = process_from_config(process_from_scheduler_config(saved))
    assert process.to_config() == SD3_PROCESS
    steps, shape, y = 8, (2, 4, 8, 8), text(2)

    @torch.no_grad()
    def ours_fn(x, t, _):
        return model(x, t, y)

    state = create_sampler("euler", process, steps, shape, torch.Generator().manual_seed(0))
    x = state.x.clone()
    ours = sample(ours_fn, state)
    scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / 1000, steps)))
    assert np.allclose(
        [e.model_time for e in state.plan], scheduler.timesteps.numpy(), rtol=1e-6
    )  # the backbone is fed diffusers' timestep, 1000·σ
    with torch.no_grad():
        for t in scheduler.timesteps:  # StableDiffusion3Pipeline's loop, without guidance
            v = ref(x, y.tokens, y.pooled, t.expand(shape[0])).sample
            x = scheduler.step(v, t, x).prev_sample
    assert_close(ours, x, rel=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"qk_norm": "layer_norm"}, r"qk_norm 'layer_norm' is not supported"),
        ({"dual_attention_layers": [0, 2]}, r"dual_attention_layers \[2\] are not layers"),
        ({"caption_projection_dim": 24}, r"caption_projection_dim \(24\) must equal"),
        ({"pos_embed_max_size": None}, r"pos_embed_max_size must be a positive integer"),
        ({"use_rope": True}, r"unknown MMDiTConfig fields: \['use_rope'\]"),
        ({"_class_name": "FluxTransformer2DModel"}, r"'FluxTransformer2DModel' is not SD3Tr"),
    ],
)
def test_unsupported_config_is_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        MMDiTConfig.from_dict({"_class_name": "SD3Transformer2DModel", **TINY, **change})


def test_bad_inputs_are_refused_by_name():
    model = MMDiT(MMDiTConfig(**TINY))
    x, t, y = torch.randn(2, 4, 8, 8), torch.zeros(2), text(2)
    with pytest.raises(ValueError, match="with pooled set"):
        model(x, t, TextContext(y.tokens))
    with pytest.raises(ValueError, match=r"tokens must be \[2, L, 16\]"):
        model(x, t, TextContext(y.tokens[..., :8], pooled=y.pooled))
    with pytest.raises(ValueError, match=r"mask must be bool \(2, 5\)"):
        model(x, t, TextContext(y.tokens, torch.ones(2, 4, dtype=torch.bool), y.pooled))
    with pytest.raises(ValueError, match=r"larger than the position table \(pos_embed_max_s"):
        model(torch.randn(2, 4, 26, 8), t, y)
