"""SDXL's text side (tiny config) against transformers and diffusers with the same weights.

The reference text encoders are built from the same YAML numbers with random weights
(tests/reference.py), saved with ``save_pretrained`` and loaded into our GeneralConditioner two
ways: as diffusers folders (``text_encoder/``, ``text_encoder_2/``) and as an official-format
single file (``conditioner.embedders.{0,1}.*``). The MindSpore forward runs in graph mode, compiled
once per conditioner. Tolerance (fp32): max |ours - reference| <= 1e-4 * max(1, max |reference|).

Checked: CLIP-L penultimate hidden states, OpenCLIP-G penultimate hidden states and pooled
projection (vs transformers ``hidden_states[-2]`` / ``text_embeds``); the whole conditioning
(crossattn and vector with micro-conditioning) vs diffusers' StableDiffusionXLPipeline
``encode_prompt`` + ``unet.add_time_proj(add_time_ids)``, for the prompt and for both negative
branches; the full-size encoders' parameter counts.
"""

import mindspore as ms
import numpy as np
import pytest
import reference
import torch
from omegaconf import OmegaConf
from safetensors.numpy import save_file

from gm.checkpoint import CheckpointError
from gm.checkpoint.diffusers_text import rules_clip_l, rules_open_clip_g
from gm.checkpoint.load import (
    load_diffusers_component,
    load_single_file_component,
    read_diffusers_component,
    single_file_state_from_diffusers,
)
from gm.modules.embedders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from gm.util import instantiate_from_config

PROMPTS = [
    "a photo of sks dog",
    "A sks dog wearing a red hat, cinematic lighting, 4k, 🐶 " * 4,  # > 77 tokens: truncated
    "",
]
# (h, w) and (top, left), different per sample, as SGM's batch keys
ORIGINAL = np.array([[1024, 768], [512, 896], [768, 1024]], np.float32)
CROP = np.array([[16, 32], [0, 0], [8, 64]], np.float32)
TARGET = np.array([[1024, 1024], [1024, 1024], [896, 1152]], np.float32)
COMPONENTS = {"text_encoder": 0, "text_encoder_2": 1}


def _tolerance(ref: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def _assert_close(ours, ref, what: str) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    diff = float(np.abs(ours - ref).max())
    assert diff <= _tolerance(ref), f"{what}: max diff {diff:.3g} > {_tolerance(ref):.3g}"
    return diff


def _batch(prompts=PROMPTS):
    return {"txt": list(prompts), "original_size_as_tuple": ORIGINAL, "crop_coords_top_left": CROP,
            "target_size_as_tuple": TARGET}


def _new_conditioner(config=reference.TINY_CONFIG):
    return instantiate_from_config(OmegaConf.load(config).model.params.conditioner_config)


pytestmark = pytest.mark.usefixtures("graph_mode")  # conftest: graph mode, restored after


@pytest.fixture(scope="module")
def ref_encoders():
    return reference.build_clip_l(), reference.build_open_clip_g()


@pytest.fixture(scope="module")
def folders(ref_encoders, tmp_path_factory):
    """A diffusers-layout folder: text_encoder/, text_encoder_2/ and our tokenizers as tokenizer/, tokenizer_2/."""
    root = tmp_path_factory.mktemp("sdxl_text")
    for name, model in zip(COMPONENTS, ref_encoders):
        model.save_pretrained(root / name, safe_serialization=True)
    helper = _new_conditioner()
    helper.embedders[0].tokenizer.hf_tokenizer.save_pretrained(root / "tokenizer")
    helper.embedders[1].tokenizer.hf_tokenizer.save_pretrained(root / "tokenizer_2")
    return root


@pytest.fixture(scope="module")
def from_diffusers(folders):
    cond = _new_conditioner()
    for name, index in COMPONENTS.items():
        load_diffusers_component(cond.embedders[index], folders / name, name)
    return cond


@pytest.fixture(scope="module")
def single_file(folders, ref_encoders, tmp_path_factory):
    """An official-format single file holding the two text encoders, made from the diffusers folders."""
    helper = _new_conditioner()
    state = {}
    for name, index in COMPONENTS.items():
        diffusers_state = dict(read_diffusers_component(folders / name))
        state.update(single_file_state_from_diffusers(name, helper.embedders[index], diffusers_state))
    # official files carry OpenCLIP's (unused) contrastive temperature too
    state["conditioner.embedders.1.model.logit_scale"] = np.array(np.log(1 / 0.07), np.float32)
    path = tmp_path_factory.mktemp("sdxl_single") / "sd_xl_text.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def from_single_file(single_file):
    cond = _new_conditioner()
    for name, index in COMPONENTS.items():
        load_single_file_component(cond.embedders[index], single_file[0], name)
    return cond


@pytest.fixture(scope="module")
def reference_text(ref_encoders, folders):
    """transformers outputs for PROMPTS, tokenized by transformers' CLIPTokenizer from the folders."""
    from transformers import CLIPTokenizer

    out = {}
    with torch.no_grad():
        for name, model, tok_dir in zip(COMPONENTS, ref_encoders, ("tokenizer", "tokenizer_2")):
            tok = CLIPTokenizer.from_pretrained(str(folders / tok_dir))
            ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            result = model(ids, output_hidden_states=True)
            out[name] = {"ids": ids.numpy(), "penultimate": result.hidden_states[-2].numpy()}
            if name == "text_encoder_2":
                out[name]["pooled"] = result.text_embeds.numpy()
    return out


@pytest.fixture(scope="module")
def outputs(from_diffusers, from_single_file):
    return {"diffusers": from_diffusers.encode(_batch()), "single_file": from_single_file.encode(_batch())}


def test_single_file_has_official_keys(single_file, folders):
    _, state = single_file
    hf = dict(read_diffusers_component(folders / "text_encoder_2"))
    width = hf["text_model.final_layer_norm.weight"].shape[0]
    packed = state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    assert packed.shape == (3 * width, width)
    qkv = [hf[f"text_model.encoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    np.testing.assert_array_equal(packed, np.concatenate(qkv, axis=0))
    np.testing.assert_array_equal(state["conditioner.embedders.1.model.text_projection"],
                                  hf["text_projection.weight"].T)
    assert state["conditioner.embedders.1.model.positional_embedding"].shape == (77, width)
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in state
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in state


def test_both_routes_load_identical_weights(from_diffusers, from_single_file):
    a = {n: p.asnumpy() for n, p in from_diffusers.parameters_and_names()}
    b = {n: p.asnumpy() for n, p in from_single_file.parameters_and_names()}
    assert a.keys() == b.keys()
    for name in a:
        if not name.endswith("logit_scale"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_token_ids_match_transformers(from_diffusers, reference_text):
    arrays = from_diffusers.prepare_arrays(_batch())
    for (name, index) in COMPONENTS.items():
        np.testing.assert_array_equal(arrays[index], reference_text[name]["ids"])


@pytest.mark.parametrize("route", ["diffusers", "single_file"])
def test_encoders_match_transformers(outputs, reference_text, ref_encoders, route):
    crossattn = outputs[route]["crossattn"].asnumpy()
    vector = outputs[route]["vector"].asnumpy()
    width_l = ref_encoders[0].config.hidden_size
    embed_dim = ref_encoders[1].config.projection_dim
    diffs = {
        "CLIP-L penultimate": _assert_close(crossattn[..., :width_l], reference_text["text_encoder"]["penultimate"],
                                            f"{route} CLIP-L"),
        "OpenCLIP-G penultimate": _assert_close(crossattn[..., width_l:],
                                                reference_text["text_encoder_2"]["penultimate"], f"{route} OpenCLIP-G"),
        "OpenCLIP-G pooled": _assert_close(vector[:, :embed_dim], reference_text["text_encoder_2"]["pooled"],
                                           f"{route} pooled"),
    }
    print(route, {k: f"{v:.2e}" for k, v in diffs.items()})


@pytest.fixture(scope="module")
def pipeline(ref_encoders, folders):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    return StableDiffusionXLPipeline(
        vae=reference.build_vae(), unet=reference.build_unet(), scheduler=EulerDiscreteScheduler(),
        text_encoder=ref_encoders[0], text_encoder_2=ref_encoders[1],
        tokenizer=CLIPTokenizer.from_pretrained(str(folders / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(folders / "tokenizer_2")),
    )


def _reference_time_embeds(pipe) -> np.ndarray:
    """diffusers' add_time_ids per sample (its pipeline takes one size for the batch) through unet.add_time_proj."""
    projection_dim = pipe.text_encoder_2.config.projection_dim
    ids = torch.cat([pipe._get_add_time_ids(tuple(o), tuple(c), tuple(t), dtype=torch.float32,
                                            text_encoder_projection_dim=projection_dim)
                     for o, c, t in zip(ORIGINAL.tolist(), CROP.tolist(), TARGET.tolist())])  # (B, 6)
    with torch.no_grad():
        return pipe.unet.add_time_proj(ids.flatten()).reshape(len(PROMPTS), -1).numpy()


def test_conditioner_matches_sdxl_pipeline(pipeline, from_diffusers):
    """Prompt branch and both unconditional branches against StableDiffusionXLPipeline.encode_prompt.

    diffusers (force_zeros_for_empty_prompt=True, the SDXL base default): negative_prompt=None gives
    all-zero negative crossattn and pooled embeddings (= our force_uc_zero_embeddings=("txt",));
    an explicit negative prompt, even "", is encoded (= our force_uc_zero_embeddings=()). The size
    part of the unconditional vector is the same as the conditional one in both.
    """
    with torch.no_grad():
        embeds, neg_zero, pooled, neg_pooled_zero = pipeline.encode_prompt(
            PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True)
        _, neg_empty, _, neg_pooled_empty = pipeline.encode_prompt(
            PROMPTS, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=[""] * len(PROMPTS))
    assert not neg_zero.abs().max() and not neg_pooled_zero.abs().max()
    time_embeds = _reference_time_embeds(pipeline)
    vector = np.concatenate([pooled.numpy(), time_embeds], axis=1)

    cond, uncond_zero = from_diffusers.get_unconditional_conditioning(_batch())
    _, uncond_empty = from_diffusers.get_unconditional_conditioning(
        _batch(), batch_uc=_batch([""] * len(PROMPTS)), force_uc_zero_embeddings=())
    diffs = {
        "crossattn": _assert_close(cond["crossattn"].asnumpy(), embeds.numpy(), "crossattn"),
        "vector": _assert_close(cond["vector"].asnumpy(), vector, "vector"),
        "vector sizes part": _assert_close(cond["vector"].asnumpy()[:, pooled.shape[1]:], time_embeds, "sizes"),
        "uncond crossattn (empty)": _assert_close(uncond_empty["crossattn"].asnumpy(), neg_empty.numpy(), "uc txt"),
        "uncond vector (empty)": _assert_close(
            uncond_empty["vector"].asnumpy(), np.concatenate([neg_pooled_empty.numpy(), time_embeds], 1), "uc vec"),
    }
    np.testing.assert_array_equal(uncond_zero["crossattn"].asnumpy(), neg_zero.numpy())
    np.testing.assert_array_equal(uncond_zero["vector"].asnumpy()[:, :pooled.shape[1]], neg_pooled_zero.numpy())
    np.testing.assert_array_equal(uncond_zero["vector"].asnumpy()[:, pooled.shape[1]:],
                                  cond["vector"].asnumpy()[:, pooled.shape[1]:])
    print({k: f"{v:.2e}" for k, v in diffs.items()})


def test_wrong_component_is_rejected(folders):
    cond = _new_conditioner()
    with pytest.raises(CheckpointError, match="text_encoder_2: unexpected keys 1 .*text_projection"):
        load_diffusers_component(cond.embedders[0], folders / "text_encoder_2", "text_encoder")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_diffusers_component(cond.embedders[1], folders / "text_encoder", "text_encoder_2")


def test_full_size_encoders_build_without_memory():
    """sd_xl_base.yaml's encoders: official parameter counts, key maps derive for every parameter."""
    entries = OmegaConf.load(reference.BASE_CONFIG).model.params.conditioner_config.params.emb_models
    with ms.nn.utils.no_init_parameters():
        clip_l = FrozenCLIPEmbedder(**entries[0].params)
        open_clip_g = FrozenOpenCLIPEmbedder2(**entries[1].params)
    counts = {}
    for name, cell, rules in (("clip_l", clip_l, rules_clip_l), ("open_clip_g", open_clip_g, rules_open_clip_g)):
        params = dict(cell.parameters_and_names())
        counts[name] = sum(int(np.prod(p.shape)) for p in params.values())
        assert {r.target for r in rules(cell)} == set(params)
    assert counts["clip_l"] == 123_060_480
    assert counts["open_clip_g"] == 694_659_840 + 1  # + logit_scale
    assert tuple(dict(open_clip_g.parameters_and_names())["model.logit_scale"].shape) == ()
    print(counts)
