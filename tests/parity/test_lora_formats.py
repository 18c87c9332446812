"""LoRA files against diffusers + PEFT (the reference): ours exported to kohya and diffusers format
load in ``StableDiffusionXLPipeline.load_lora_weights`` with every module applied and the same
UNet and text-encoder outputs; LoRAs made on the reference side (PEFT adapters saved by
``save_lora_weights``, kohya files written by a test-side converter) load here with the same
outputs; the seed's ``lora_A``/``lora_B`` ckpt layout; lossless round trips between formats.

Our forward passes run in PyNative mode (tiny model: no compilation to share).
"""

import json
import logging

import mindspore as ms
import numpy as np
import pytest
import torch

from gm.checkpoint.errors import CheckpointError
from gm.checkpoint.load import load_weights
from gm.checkpoint.lora import load_lora, read_lora_file, save_lora
from gm.checkpoint.safetensors_io import save_safetensors
from gm.models.diffusion import build_engine
from gm.modules.lora import LoRAConfig, inject_lora, lora_modules, lora_parameters, lora_state, set_lora_values

PROMPTS = ["a photo of sks dog", "a dog on the beach"]
CONFIGS = {
    "unet": LoRAConfig(rank=4, alpha=8.0, unet_targets=("attn",)),
    "unet_te": LoRAConfig(rank=4, alpha=4.0, unet_targets=("attn",), text_encoder=True),
    "all": LoRAConfig(rank=2, alpha=3.0, unet_targets=("attn", "ff", "proj"), text_encoder=True),
}


pytestmark = pytest.mark.usefixtures("pynative_mode")


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    return dict(latents=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
                timesteps=np.array([999, 250], np.float32),
                context=rng.standard_normal((2, 77, 96)).astype(np.float32),
                text_embeds=rng.standard_normal((2, 64)).astype(np.float32),
                time_ids=np.array([[64, 64, 0, 0, 64, 64], [96, 64, 8, 0, 64, 64]], np.float32))


def _engine(tiny_weights):
    engine = build_engine(tiny_weights.config)
    load_weights(engine, tiny_weights.single_file)
    engine.set_train(False)
    return engine


def _ours(engine, inputs):
    """(UNet output, crossattn, pooled) of our engine."""
    from gm.modules.diffusionmodules.util import timestep_embedding

    ids = ms.Tensor(inputs["time_ids"].reshape(-1))
    micro = timestep_embedding(ids, 256).asnumpy().reshape(2, -1)
    vector = np.concatenate([inputs["text_embeds"], micro], axis=1)
    unet = engine.model.diffusion_model
    out = unet(*(ms.Tensor(a) for a in (inputs["latents"], inputs["timesteps"], inputs["context"], vector)))
    batch = {"txt": PROMPTS, "original_size_as_tuple": [[64, 64]] * 2, "crop_coords_top_left": [[0, 0]] * 2,
             "target_size_as_tuple": [[64, 64]] * 2}
    crossattn, vec = engine.conditioner(*engine.conditioner.prepare_inputs(batch))
    return out.asnumpy(), crossattn.asnumpy(), vec.asnumpy()[:, :64]


def _reference(pipe, inputs):
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = pipe.unet(t["latents"], t["timesteps"], t["context"],
                        added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]}).sample
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    return out.numpy(), embeds.numpy(), pooled.numpy()


def _assert_close(ours, ref, what):
    for a, b, part in zip(ours, ref, ("unet", "crossattn", "pooled")):
        rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
        assert rel <= 1e-4, f"{what}: {part} differs by {rel:.2e} (relative)"


def _pipeline(tiny_weights):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_weights.diffusers_dir)


def _lora_layers(pipe):
    from peft.tuners.lora import LoraLayer

    return {part: sum(isinstance(m, LoraLayer) for m in getattr(pipe, part).modules())
            for part in ("unet", "text_encoder", "text_encoder_2")}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_in_diffusers(pipe, path):
    handler = _Warnings()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    finally:
        logger.removeHandler(handler)
    return handler.messages


def _randomize(engine, seed):
    rng = np.random.default_rng(seed)
    set_lora_values(engine, {name: rng.standard_normal(p.shape).astype(np.float32) * 0.2
                             for name, p in lora_parameters(engine).items()})


@pytest.fixture(scope="module")
def trained(tiny_weights, inputs):
    """Per config: an engine with a random LoRA, our outputs, the base outputs."""
    out = {}
    for key, config in CONFIGS.items():
        engine = _engine(tiny_weights)
        base = _ours(engine, inputs) if key == "unet" else None
        inject_lora(engine, config)
        _randomize(engine, seed=len(out))
        out[key] = dict(engine=engine, outputs=_ours(engine, inputs), base=base)
    return out


@pytest.mark.parametrize("key", list(CONFIGS))
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_our_lora_loads_in_diffusers_with_every_module_applied(tiny_weights, trained, inputs, key, fmt, tmp_path):
    engine = trained[key]["engine"]
    path = tmp_path / f"{key}_{fmt}.safetensors"
    save_lora(engine, path, {"base_model": "tiny"}, lora_format=fmt)
    pipe = _pipeline(tiny_weights)
    messages = _load_in_diffusers(pipe, path)
    ours = {part: sum(m.component == part for m in lora_modules(engine))
            for part in ("unet", "text_encoder", "text_encoder_2")}
    # "No LoRA keys associated to <model> found with the prefix='<part>'" is right for a part ours leaves alone
    expected = [f"prefix='{part}'" for part, n in ours.items() if n == 0]
    assert not [m for m in messages if ("lora" in m.lower() or "unexpected" in m.lower())
                and not (m.startswith("No LoRA keys") and any(e in m for e in expected))], messages
    counts = _lora_layers(pipe)
    assert counts == ours, (counts, ours)
    _assert_close(trained[key]["outputs"], _reference(pipe, inputs), f"{fmt} {key}")
    if key == "unet":  # the LoRA visibly changes the UNet output (so equality above means something)
        assert np.abs(trained[key]["outputs"][0] - trained[key]["base"][0]).max() > 1e-2


def test_kohya_file_layout_and_metadata(trained, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_lora(trained["all"]["engine"], path, {"base_model": "tiny", "step": 7, "instance_prompt": "a sks dog"},
              lora_format="kohya")
    arrays, metadata = read_lora_file(path)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in arrays}
    assert all(s.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for s in stems)
    assert all(f"{s}.alpha" in arrays and arrays[f"{s}.alpha"].shape == () for s in stems)  # every module
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in stems  # official (sgm) paths
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in stems
    assert {"lora_te2_text_model_encoder_layers_0_self_attn_" + p for p in ("q_proj", "k_proj", "v_proj",
                                                                              "out_proj")} <= stems
    assert not any("down_blocks" in s for s in stems)  # never mixed naming
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("2", "3")
    assert metadata["ss_steps"] == "7" and metadata["modelspec.trigger_phrase"] == "a sks dog"
    assert (metadata["modelspec.prediction_type"], metadata["ss_v_parameterization"]) == ("epsilon", "False")
    # trained on a v-prediction base (train_dreambooth.py passes the ModelSpec entry): kohya's flag follows it
    save_lora(trained["all"]["engine"], path, {"modelspec.prediction_type": "v"}, lora_format="kohya")
    metadata = read_lora_file(path)[1]
    assert (metadata["modelspec.prediction_type"], metadata["ss_v_parameterization"]) == ("v", "True")


@pytest.fixture(scope="module")
def reference_lora(tiny_weights, tmp_path_factory):
    """A LoRA made on the reference side: PEFT adapters with random factors on the UNet (attn + ff)
    and both text encoders, saved by ``save_lora_weights`` with its adapter metadata."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = _pipeline(tiny_weights)
    torch.manual_seed(0)
    unet_config = LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian",
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"])
    text_config = LoraConfig(r=4, lora_alpha=6, init_lora_weights="gaussian",
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    pipe.unet.add_adapter(unet_config)
    # peft itself for the text encoders (transformers' add_adapter wants a newer peft than exists here)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    inject_adapter_in_model(text_config, pipe.text_encoder_2)
    with torch.no_grad():  # gaussian init leaves lora_B at zero: make every factor nonzero
        for part in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for name, p in part.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
    folder = tmp_path_factory.mktemp("reference_lora")
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict(),
        text_encoder_2_lora_adapter_metadata=text_config.to_dict())
    return pipe, folder / "pytorch_lora_weights.safetensors"


def test_diffusers_lora_loads_here_with_the_same_outputs(tiny_weights, reference_lora, inputs, caplog):
    pipe, path = reference_lora
    engine = _engine(tiny_weights)
    with caplog.at_level(logging.INFO, logger="gm.checkpoint.lora"):
        load_lora(engine, path)
    assert "diffusers format" in caplog.text
    # CLIP-L's last block carries a LoRA that SDXL never runs: reported, not silently dropped
    assert "no effect" in caplog.text
    ours, ref = _ours(engine, inputs), _reference(pipe, inputs)
    _assert_close(ours, ref, "diffusers file into ours")
    base = _reference(_pipeline(tiny_weights), inputs)
    for with_lora, without, part in zip(ref, base, ("unet", "crossattn", "pooled")):  # the LoRA matters
        assert np.abs(with_lora - without).max() > 1e-3 * np.abs(without).max(), part


def _kohya_from_peft(path, out):
    """Test-side converter: a diffusers/PEFT LoRA file -> kohya keys with diffusers module paths,
    alpha from the adapter metadata (independent of gm.checkpoint.lora_formats)."""
    arrays, metadata = read_lora_file(path)
    adapter = json.loads(metadata["lora_adapter_metadata"])
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    kohya = {}
    for key, value in arrays.items():
        component, rest = key.split(".", 1)
        module, factor = rest.rsplit(".lora_", 1)
        if component == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module  # transformers >= 5 drops this level in CLIPTextModel
        stem = prefixes[component] + module.replace(".", "_")
        kohya[f"{stem}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{stem}.alpha"] = np.asarray(adapter[f"{component}.lora_alpha"], np.float32)
    save_safetensors(out, kohya)
    return out


def test_kohya_lora_from_the_reference_side_loads_here(tiny_weights, reference_lora, inputs, tmp_path):
    pipe, path = reference_lora
    kohya = _kohya_from_peft(path, tmp_path / "kohya_ref.safetensors")
    engine = _engine(tiny_weights)
    load_lora(engine, kohya)
    _assert_close(_ours(engine, inputs), _reference(pipe, inputs), "kohya file into ours")


def test_seed_ckpt_layout_gives_the_same_outputs(tiny_weights, trained, inputs, tmp_path):
    """The seed's layout (lora_A/lora_B, scale 1) written by hand from our factors with the scale
    folded into lora_B, and our own export to it: both load with our outputs."""
    engine = trained["unet"]["engine"]  # alpha 8, rank 4: scale 2
    by_hand = {}
    for module in lora_modules(engine):
        by_hand[f"{module.name}.lora_A.weight"] = module.cell.lora_down.weight.asnumpy()
        by_hand[f"{module.name}.lora_B.weight"] = module.cell.lora_up.weight.asnumpy() * (module.alpha / module.rank)
    hand = tmp_path / "seed_lora.ckpt"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in by_hand.items()], str(hand))
    exported = tmp_path / "exported_lora.ckpt"
    save_lora(engine, exported, lora_format="seed")
    assert set(read_lora_file(exported)[0]) == set(by_hand)
    for path in (hand, exported):
        other = _engine(tiny_weights)
        load_lora(other, path)
        _assert_close(_ours(other, inputs), trained["unet"]["outputs"], f"seed layout {path.name}")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "gm"])
def test_round_trips_are_lossless(tiny_weights, trained, fmt, tmp_path):
    engine = trained["all"]["engine"]
    path = tmp_path / f"rt_{fmt}.safetensors"
    save_lora(engine, path, lora_format=fmt)
    other = build_engine(tiny_weights.config)
    load_lora(other, path)
    saved = lora_state(engine)
    assert lora_state(other).keys() == saved.keys()
    assert all(np.array_equal(v, saved[k]) for k, v in lora_state(other).items())


@pytest.mark.parametrize("edit,message", [
    (lambda a: {**a, "lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight": np.zeros((2, 3))},
     "'lora_unet_input_blocks_4_0_in_layers_2.lora_down.weight' matches no module .* ResNet"),
    (lambda a: {k: v for k, v in a.items() if not k.endswith("attn1_to_q.lora_up.weight")},
     "has no partner '.*attn1_to_q.lora_up.weight'"),
    (lambda a: {k: (np.zeros((2, 7)) if k.endswith("attn1_to_q.lora_down.weight") else v) for k, v in a.items()},
     "down \\(2, 7\\) .* another model size or architecture"),
    (lambda a: {"foo.weight": np.zeros(3)}, "not a LoRA file"),
])
def test_bad_foreign_lora_files_name_the_key(tiny_weights, trained, edit, message, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_lora(trained["all"]["engine"], path, lora_format="kohya")
    arrays, _ = read_lora_file(path)
    bad = tmp_path / "bad.safetensors"
    save_safetensors(bad, edit(arrays))
    fresh = build_engine(tiny_weights.config)
    with pytest.raises(CheckpointError, match=message):
        load_lora(fresh, bad)
    assert not lora_parameters(fresh)  # nothing injected


def _convert(tiny_weights, source, target, fmt):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "tools/convert_lora.py", "--input", str(source), "--output", str(target),
                             "--to", fmt, "--config", str(tiny_weights.config)], cwd=repo, capture_output=True,
                            text=True, timeout=300)
    return result


def test_convert_lora_tool_chains_formats_losslessly(tiny_weights, trained, inputs, tmp_path):
    engine = trained["all"]["engine"]
    start = tmp_path / "ours.safetensors"
    save_lora(engine, start, {"instance_prompt": "a photo of sks dog"})
    chain = [("kohya", "a_kohya.safetensors"), ("diffusers", "b_diffusers.safetensors"), ("gm", "c_ours.ckpt")]
    source = start
    for fmt, name in chain:
        result = _convert(tiny_weights, source, tmp_path / name, fmt)
        assert result.returncode == 0, result.stderr[-2000:]
        source = tmp_path / name
    back = build_engine(tiny_weights.config)
    load_lora(back, source)
    saved = lora_state(engine)
    assert lora_state(back).keys() == saved.keys()
    assert all(np.array_equal(v, saved[k]) for k, v in lora_state(back).items())
    assert read_lora_file(tmp_path / "a_kohya.safetensors")[1]["modelspec.trigger_phrase"] == "a photo of sks dog"
    # the seed's layout (UNet only) and back to kohya: same outputs
    unet_only = tmp_path / "unet.safetensors"
    save_lora(trained["unet"]["engine"], unet_only, lora_format="kohya")
    assert _convert(tiny_weights, unet_only, tmp_path / "seed_lora.ckpt", "seed").returncode == 0
    assert _convert(tiny_weights, tmp_path / "seed_lora.ckpt", tmp_path / "from_seed.safetensors",
                    "kohya").returncode == 0
    other = _engine(tiny_weights)
    load_lora(other, tmp_path / "from_seed.safetensors")
    _assert_close(_ours(other, inputs), trained["unet"]["outputs"], "kohya -> seed -> kohya")
    # a text-encoder LoRA cannot go to the seed's layout: one line naming the module, nothing written
    refused = _convert(tiny_weights, start, tmp_path / "refused_lora.ckpt", "seed")
    assert refused.returncode == 2 and "UNet modules only" in refused.stderr
    assert not (tmp_path / "refused_lora.ckpt").exists()


def test_merge_lora_tool_bakes_the_lora_into_the_base(tiny_weights, trained, inputs, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from gm.checkpoint.safetensors_io import SafetensorsFile

    repo = Path(__file__).resolve().parents[2]
    lora = tmp_path / "all_kohya.safetensors"
    save_lora(trained["all"]["engine"], lora, lora_format="kohya")

    def merge(output, *loras, dtype="keep", base=tiny_weights.single_file):
        result = subprocess.run([sys.executable, "tools/merge_lora.py", "--base", str(base),
                                 "--lora", *loras, "--output", str(output), "--config", str(tiny_weights.config),
                                 "--dtype", dtype], cwd=repo, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return output

    merged = merge(tmp_path / "merged.safetensors", str(lora))
    engine = build_engine(tiny_weights.config)
    load_weights(engine, merged)
    engine.set_train(False)
    _assert_close(_ours(engine, inputs), trained["all"]["outputs"], "merged base vs base + LoRA")
    # scale 0 leaves every tensor of the base as it was; bf16 output holds the same values to bf16 precision
    base = SafetensorsFile(tiny_weights.single_file)
    zero = SafetensorsFile(merge(tmp_path / "zero.safetensors", f"{lora}:0"))
    assert list(zero) == list(base) and all(np.array_equal(zero[k], base[k]) for k in base)
    bf16 = SafetensorsFile(merge(tmp_path / "bf16.safetensors", str(lora), dtype="bf16"))
    full = SafetensorsFile(merged)
    assert {bf16.dtype(k) for k in bf16} == {"BF16"}
    for key in full:
        np.testing.assert_allclose(bf16[key], full[key], rtol=2 ** -8, atol=1e-30)
    # a v-prediction base stays one: its v_pred key and ModelSpec entry are copied
    from gm.checkpoint.load import declared_prediction_type
    from gm.checkpoint.safetensors_io import save_safetensors

    v_base = tmp_path / "v_base.safetensors"
    save_safetensors(v_base, {**dict(base.items()), "v_pred": np.zeros((1,), np.float32)},
                     metadata={"modelspec.prediction_type": "v"})
    v_merged = merge(tmp_path / "v_merged.safetensors", str(lora), base=v_base)
    assert declared_prediction_type(v_merged) == "v_prediction"
    assert SafetensorsFile(v_merged).metadata["modelspec.prediction_type"] == "v"


@pytest.mark.parametrize("fmt,suffix", [("kohya", ".safetensors"), ("diffusers", ".safetensors"),
                                        ("seed", "_lora.ckpt"), ("gm", "_lora.ckpt")])
def test_half_precision_files_hold_the_factors_rounded_as_torch_rounds(trained, fmt, suffix, tmp_path):
    from gm.checkpoint.safetensors_io import SafetensorsFile

    engine = trained["unet"]["engine"]
    full = tmp_path / f"fp32{suffix}"
    save_lora(engine, full, lora_format=fmt)
    expected, _ = read_lora_file(full)
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        path = tmp_path / f"{dtype}{suffix}"
        save_lora(engine, path, lora_format=fmt, dtype=dtype)
        arrays, _ = read_lora_file(path)
        assert sorted(arrays) == sorted(expected)
        for key, value in expected.items():
            rounded = torch.from_numpy(np.ascontiguousarray(value)).to(torch_dtype).float().numpy()
            np.testing.assert_array_equal(arrays[key].astype(np.float32), rounded, err_msg=f"{dtype} {key}")
        if suffix == ".safetensors":
            assert {SafetensorsFile(path).dtype(k) for k in arrays} == {"F16" if dtype == "fp16" else "BF16"}
        else:
            stored = {str(v.dtype) for v in ms.load_checkpoint(str(path)).values() if hasattr(v, "dtype")}
            assert stored == {"Float16" if dtype == "fp16" else "BFloat16"}
