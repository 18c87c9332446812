"""Full-size SDXL base from configs/inference/sd_xl_base.yaml, built without allocating memory:
names and shapes map one-to-one onto the official checkpoint's keys.

The official key set is derived from the reference implementation at full size (diffusers and
transformers on torch's meta device) through the same key maps the loaders use.
"""

import numpy as np
import pytest
import reference
import torch

from gm.checkpoint.keymap import check_rules, rule_shapes
from gm.checkpoint.load import component_cell, diffusers_rules, diffusers_source, parameters_of
from gm.models.diffusion import build_engine


@pytest.fixture(scope="module")
def engine():
    return build_engine(reference.BASE_CONFIG, allocate=False)


def _meta_reference(component: str):
    builders = {
        "unet": lambda: __import__("diffusers").UNet2DConditionModel(**reference.unet_config(reference.BASE_CONFIG)),
        "vae": lambda: __import__("diffusers").AutoencoderKL(**reference.vae_config(reference.BASE_CONFIG)),
        "text_encoder": lambda: _clip(reference.clip_l_config, "CLIPTextModel"),
        "text_encoder_2": lambda: _clip(reference.open_clip_g_config, "CLIPTextModelWithProjection"),
    }
    with torch.device("meta"):
        return builders[component]()


def _clip(config_fn, cls_name):
    import transformers

    return getattr(transformers, cls_name)(transformers.CLIPTextConfig(**config_fn(reference.BASE_CONFIG)))


# (component, parameters, tensors); official counts of sd_xl_base_1.0
EXPECTED = [
    ("unet", 2_567_463_684, 1680),
    ("vae", 83_653_863, 248),
    ("text_encoder", 123_060_480, 196),
    ("text_encoder_2", 694_659_840 + 1, 390),  # + logit_scale
]


@pytest.mark.parametrize("component,num_params,num_tensors", EXPECTED)
def test_full_size_counts_and_official_keys(engine, component, num_params, num_tensors):
    cell = component_cell(engine, component)
    ours = {name: tuple(p.shape) for name, p in parameters_of(cell).items()}
    assert len(ours) == num_tensors
    assert sum(int(np.prod(s)) for s in ours.values()) == num_params

    ref_state = _meta_reference(component).state_dict()
    # transformers >= 5 lays CLIPTextModel out without text_model.: the loaders adapt it the same way
    ref_shapes = dict(diffusers_source(component, {k: tuple(v.shape) for k, v in ref_state.items()}))
    rules, ignored, optional = diffusers_rules(component, cell)
    # every reference key is used exactly once and every one of our parameters is produced
    check_rules(rules, ref_shapes, what=f"reference {component}", ignore_unused=ignored, optional_targets=optional)
    used = [s for r in rules for s in r.sources]
    assert len(used) == len(set(used))
    produced = rule_shapes(rules, ref_shapes)
    assert set(produced) | set(optional) == set(ours)
    mismatched = {k: (ours[k], v) for k, v in produced.items() if ours[k] != v}
    assert not mismatched


def test_full_size_engine_names_are_official(engine):
    names = set(parameters_of(engine))
    # a few keys exactly as they appear in sd_xl_base_1.0.safetensors
    for key in [
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.0.proj.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.bias",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.label_emb.0.2.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.quant_conv.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.bias",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
        "conditioner.embedders.1.model.text_projection",
        "conditioner.embedders.1.model.logit_scale",
        "conditioner.embedders.1.model.positional_embedding",
    ]:
        assert key in names, key
    assert len(names) == 1680 + 248 + 196 + 390


def test_full_size_group_norms_have_sdxl_groups(engine):
    """Every GroupNorm of the full-size UNet and VAE has SDXL's 32 groups (norm_num_groups defaults to
    it; the tiny config's 8 must not leak into the official model: names and shapes would not show it)."""
    from gm.modules.layers import GroupNorm

    groups = {name: cell.num_groups for name, cell in engine.cells_and_names() if isinstance(cell, GroupNorm)}
    unet = [n for n in groups if n.startswith("model.diffusion_model.")]
    vae = [n for n in groups if n.startswith("first_stage_model.")]
    # SDXL base: UNet 2 per ResBlock (6 down, 2 middle, 9 up), 11 transformers, `out`: 46;
    # VAE encoder 2 x 8 blocks + middle 5 + norm_out, decoder 2 x 12 blocks + middle 5 + norm_out: 52
    assert len(unet) == 46 and len(vae) == 52, (len(unet), len(vae))
    assert set(groups.values()) == {32}


# sha256 of the sorted "name:shape" lines of the reference's (mindone) key list for SDXL base
# (examples/stable_diffusion_xl/tools/model_conversion/mindspore_key_base.yaml, 2,514 lines, read
# 2026-12-01), the list its converter writes sd_xl_base_1.0_ms.ckpt under
REFERENCE_KEY_LIST_SHA256 = "83d19908dbce5a7b032a7993e554c4839420c91a0553f66cd096a10fe3837640"


def test_full_size_reference_names_are_the_reference_key_list(engine):
    """Our derived map of the reference's MindSpore names, applied to the full-size model, gives its
    published key list exactly (names and shapes), 1:1 -- with the list's one defect (CLIP-L's
    token embedding under a double-dotted bigG-like name) in place of the proper name."""
    import hashlib

    from gm.checkpoint.reference_names import _MISNAMED_CLIP_L_TOKENS, reference_names

    names = reference_names(engine)
    assert len(set(names.values())) == len(names) == 2514
    shapes = {name: tuple(p.shape) for name, p in engine.parameters_and_names()}
    proper = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table"
    lines = sorted(f"{_MISNAMED_CLIP_L_TOKENS if names[k] == proper else names[k]}:{shapes[k]}" for k in names)
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == REFERENCE_KEY_LIST_SHA256
