"""The text-conditioned UNet against diffusers' UNet2DConditionModel (SD 1.x- and SD 2.x-like
layouts), its cross-attention KV cache, and its model directory."""

import json
import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers_reference import assert_close, randomised

from denoised.models.backbones.unet_text import CrossAttentionCache, UNetText, UNetTextConfig
from denoised.models.checkpoints.convert import read_diffusers_backbone
from denoised.models.checkpoints.model_dir import WEIGHTS_FILE, load_model_dir, save_model_dir
from denoised.models.conditioning import TextContext

TEXT_DIM = 24
# SD 1.x's layout shrunk: 1x1-conv projections, one head count (2) for every block.
SD1_LIKE = {
    "sample_size": 16,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": 2,
    "cross_attention_dim": TEXT_DIM,
    "norm_num_groups": 8,
}
# SD 2.x's: linear projections, head counts per block (mirrored for the up blocks, head
# widths 16, 16, 32), the other time-embedding options, upcast_attention (ignored).
SD2_LIKE = {
    **SD1_LIKE,
    "block_out_channels": (32, 64, 96),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4, 3),
    "use_linear_projection": True,
    "upcast_attention": True,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}
SD_PROCESS = {
    "type": "vp",
    "schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction": "epsilon",
}


def inputs(batch: int, tokens: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.rand(batch, generator=g) * 999  # a different step per row
    return x, t, torch.randn(batch, tokens, TEXT_DIM, generator=g)


@pytest.fixture(scope="module", params=[SD1_LIKE, SD2_LIKE], ids=["sd1", "sd2"])
def pair(request, tmp_path_factory) -> tuple[UNet2DConditionModel, UNetText, object]:
    """diffusers' model and ours, loaded from the folder diffusers saved."""
    torch.manual_seed(0)
    ref = randomised(UNet2DConditionModel(**request.param))
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    return ref, read_diffusers_backbone(folder, "unet-text").eval(), folder


def test_matches_diffusers(pair):
    ref, ours, _ = pair
    x, t, text = inputs(3, 7)
    with torch.no_grad():
        assert_close(ours(x, t, TextContext(text)), ref(x, t, text).sample)


def test_matches_diffusers_with_a_padding_mask(pair):
    ref, ours, _ = pair
    x, t, text = inputs(3, 7, seed=2)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, [0, 5]] = False
    with torch.no_grad():
        theirs = ref(x, t, text, encoder_attention_mask=mask).sample
        assert_close(ours(x, t, TextContext(text, mask)), theirs)
        assert (ours(x, t, TextContext(text)) - theirs).abs().max() > 1e-3  # the mask matters


def test_odd_latent_sizes_match_diffusers(pair):
    # A side that does not halve evenly is brought back to the skip's size on the way up.
    ref, ours, _ = pair
    _, t, text = inputs(2, 5)
    x = torch.randn(2, 4, 13, 11, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours(x, t, TextContext(text)), ref(x, t, text).sample)


def test_cache_for_a_batch_of_two_requests(pair):
    """Two requests' caches with different prompt lengths and masks, one with two images:
    the batch's output equals each request run alone on its text (and diffusers')."""
    ref, ours, _ = pair
    _, _, text_a = inputs(1, 9, seed=4)
    _, _, text_b = inputs(1, 5, seed=5)
    mask_b = torch.tensor([[True, True, True, False, False]])
    x, t, _ = inputs(3, 1, seed=6)
    with torch.no_grad():
        cache_a = ours.text_cache(TextContext(text_a))
        cache_b = ours.text_cache(TextContext(text_b, mask_b))
        batch = CrossAttentionCache.cat([cache_a.repeat_rows(2), cache_b])
        assert batch.rows == 3 and batch.length == 9
        assert batch.mask.tolist() == [[True] * 9] * 2 + [[True] * 3 + [False] * 6]
        out = ours(x, t, batch)
        alone_a = ours(x[:2], t[:2], TextContext(text_a.expand(2, -1, -1)))
        alone_b = ours(x[2:], t[2:], TextContext(text_b, mask_b))
        expected = torch.cat([alone_a, alone_b])
        # Float32 GEMMs of 3 and of 2 + 1 rows round differently (4.6e-7 of the largest value
        # on an AVX2 CPU): the bound is the diffusers comparison's; a wrong mask costs > 1e-3.
        assert_close(out, expected)
        assert torch.equal(ours(x[2:], t[2:], cache_b), alone_b)
        assert_close(out[2:], ref(x[2:], t[2:], text_b, encoder_attention_mask=mask_b).sample)


def test_cache_shape_and_size(pair):
    _, ours, _ = pair
    cache = ours.text_cache(TextContext(torch.randn(2, 7, TEXT_DIM)))
    widths = [b.attn2.to_k.out_features for b in ours._cross_attention_blocks]
    assert len(cache.kv) == len(widths)
    for (k, v), width, block in zip(cache.kv, widths, ours._cross_attention_blocks, strict=True):
        assert k.shape == v.shape == (2, block.attn2.heads, 7, width // block.attn2.heads)
    assert cache.mask is None and cache.nbytes == 2 * 2 * 7 * sum(widths) * 4
    same_length = CrossAttentionCache.cat([cache, cache.repeat_rows(3)])
    assert same_length.rows == 8 and same_length.mask is None  # nothing padded, no mask


def test_model_directory_from_diffusers_config(pair, tmp_path):
    """A model directory whose architecture is the diffusers config.json as it is."""
    _, ours, folder = pair
    config = {
        "family": "unet-text",
        "architecture": json.loads((folder / "config.json").read_text()),
        "process": SD_PROCESS,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / WEIGHTS_FILE)
    loaded = load_model_dir(tmp_path)
    assert loaded.text_dims == (ours.config.cross_attention_dim, None)
    assert loaded.num_classes is None
    assert loaded.latent_shape == (4, 16, 16) and loaded.guided_channels == 4
    assert loaded.backbone.config == ours.config
    x, t, text = inputs(2, 7)
    with torch.no_grad():
        assert torch.equal(loaded.backbone(x, t, TextContext(text)), ours(x, t, TextContext(text)))


def test_save_and_load_round_trip(pair, tmp_path):
    _, ours, _ = pair
    save_model_dir(tmp_path / "sd", ours, {"process": SD_PROCESS})
    loaded = load_model_dir(tmp_path / "sd")
    assert loaded.config["family"] == "unet-text" and loaded.text_dims is not None
    assert UNetTextConfig.from_dict(loaded.config["architecture"]) == ours.config


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("addition_embed_type", "text_time"),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("time_cond_proj_dim", 256),
        ("encoder_hid_dim", 32),
        ("transformer_layers_per_block", [1, 2, 1]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("only_cross_attention", True),
    ],
)
def test_unsupported_setting_is_refused_by_name(key, value):
    with pytest.raises(ValueError, match=f"unsupported UNet2DConditionModel setting {key}="):
        UNetTextConfig.from_dict({**SD1_LIKE, key: value})


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown UNetTextConfig fields: \['attention_bias'\]"):
        UNetTextConfig.from_dict({**SD1_LIKE, "attention_bias": True})
    with pytest.raises(ValueError, match="unsupported down block 'AttnDownBlock2D'"):
        UNetTextConfig.from_dict({**SD1_LIKE, "down_block_types": ["AttnDownBlock2D"] * 3})
    with pytest.raises(ValueError, match="cross_attention_dim must be one integer"):
        UNetTextConfig.from_dict({**SD1_LIKE, "cross_attention_dim": [24, 24, 24]})
    with pytest.raises(ValueError, match="3 attention heads do not divide 32 channels"):
        UNetTextConfig.from_dict({**SD1_LIKE, "attention_head_dim": 3})
    with pytest.raises(ValueError, match="not a UNet2DConditionModel"):
        UNetTextConfig.from_dict({**SD1_LIKE, "_class_name": "UNet2DModel"})
    ours = UNetText(UNetTextConfig.from_dict(SD1_LIKE))
    with pytest.raises(ValueError, match=r"text tokens must be \[batch, tokens, 24\]"):
        ours.text_cache(TextContext(torch.randn(1, 7, 16)))
    x, t, text = inputs(2, 7)
    with pytest.raises(ValueError, match="1 rows of text for 2 rows of latents"):
        ours(x, t, TextContext(text[:1]))
    with pytest.raises(ValueError, match="needs text"):
        ours(x, t, None)


@pytest.mark.parametrize(
    ("overrides", "parameters"),
    [
        ({}, 859_520_964),  # Stable Diffusion 1.5
        (
            {"attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024},
            865_910_724,  # Stable Diffusion 2.1
        ),
    ],
    ids=["sd1.5", "sd2.1"],
)
def test_full_sd_layouts_match_diffusers(overrides, parameters):
    """Released SD UNet configs have diffusers' names and shapes (built on the meta device)."""
    sd = {
        "sample_size": 64,
        "cross_attention_dim": 768,
        **overrides,
        "use_linear_projection": bool(overrides),
    }
    with torch.device("meta"):
        ref = UNet2DConditionModel(**sd)
        ours = UNetText(UNetTextConfig.from_dict(dict(ref.config)))
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == parameters
