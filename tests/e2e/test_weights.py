"""Whole-model weight loading through every route, the converter, and errors for bad files."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from gm.checkpoint.errors import CheckpointError
from gm.checkpoint.load import declared_prediction_type, engine_state, load_weights, weight_arrays
from gm.checkpoint.safetensors_io import SafetensorsFile, save_safetensors
from gm.models.diffusion import build_engine

REPO_TOOL = ["tools/convert_weights.py"]


def _run_tool(args, cwd):
    return subprocess.run([sys.executable, *REPO_TOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def engine(tiny_weights):
    return build_engine(tiny_weights.config)


@pytest.fixture(scope="module")
def single_file_state(engine, tiny_weights):
    load_weights(engine, tiny_weights.single_file)
    return engine_state(engine)


def test_single_file_and_diffusers_folder_load_the_same_weights(engine, tiny_weights, single_file_state):
    load_weights(engine, tiny_weights.diffusers_dir)
    from_folder = engine_state(engine)
    assert from_folder.keys() == single_file_state.keys()
    for name, value in from_folder.items():
        np.testing.assert_array_equal(value, single_file_state[name], err_msg=name)
    # and they are the reference's weights, not initial values
    ref_unet = tiny_weights.pipeline.unet.state_dict()
    np.testing.assert_array_equal(from_folder["model.diffusion_model.input_blocks.0.0.weight"],
                                  ref_unet["conv_in.weight"].numpy())
    ref_te2 = tiny_weights.pipeline.text_encoder_2.state_dict()
    np.testing.assert_array_equal(from_folder["conditioner.embedders.1.model.text_projection"],
                                  ref_te2["text_projection.weight"].numpy().T)


def test_convert_to_ckpt_and_back(tiny_weights, single_file_state, tmp_path):
    # as in the official file, OpenCLIP's logit_scale is a 0-d tensor: it must stay 0-d both ways
    source = tmp_path / "with_logit_scale.safetensors"
    scale = "conditioner.embedders.1.model.logit_scale"
    save_safetensors(source, {**dict(SafetensorsFile(tiny_weights.single_file).items()),
                              scale: np.array(4.6052, np.float32)})
    ckpt = tmp_path / "tiny.ckpt"
    result = _run_tool(["--input", str(source), "--output", str(ckpt),
                        "--config", str(tiny_weights.config)], cwd=tiny_weights.config.parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    back = tmp_path / "back.safetensors"
    result = _run_tool(["--input", str(ckpt), "--output", str(back), "--config", str(tiny_weights.config)],
                       cwd=tiny_weights.config.parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    round_trip = SafetensorsFile(back)
    original = SafetensorsFile(source)
    assert set(round_trip) == set(original)
    for name in original:
        assert round_trip.shape(name) == original.shape(name), name
        np.testing.assert_array_equal(round_trip[name], original[name], err_msg=name)
    assert round_trip.shape(scale) == ()


# The reference's naming rules (mindone's converter: its torch_key_base.yaml -> mindspore_key_base.yaml
# pairs, 2,514 lines), restated here independently of gm.checkpoint.reference_names: norms'
# weight/bias -> gamma/beta, embedding tables -> embedding_table; and the defect of its key list,
# CLIP-L's token embedding written under a bigG-like name with a double dot.
_NORM = r"(?:norm|norm[123]|norm_out|layer_norm[12]|final_layer_norm|ln_[12]|ln_final|in_layers\.0|out_layers\.0)"
REFERENCE_RULES = [
    (r"^conditioner\.embedders\.0\.transformer\.text_model\.embeddings\.token_embedding\.weight$",
     "conditioner.embedders.1.model.token_embedding..embedding_table"),
    (r"^(.*\.(?:token_embedding|position_embedding))\.weight$", r"\1.embedding_table"),
    (rf"^(.*\.{_NORM}|model\.diffusion_model\.out\.0)\.weight$", r"\1.gamma"),
    (rf"^(.*\.{_NORM}|model\.diffusion_model\.out\.0)\.bias$", r"\1.beta"),
]


def _reference_name(official):
    for pattern, replacement in REFERENCE_RULES:
        renamed, hits = re.subn(pattern, replacement, official)
        if hits:
            return renamed
    return official


def test_the_reference_converters_ckpt_loads_the_same_weights(engine, tiny_weights, single_file_state, tmp_path):
    """A tiny sd_xl_base_1.0_ms.ckpt as the reference's converter writes it (ms.save_checkpoint of
    float32 tensors under its names) loads into exactly the single file's weights."""
    import mindspore as ms

    source = SafetensorsFile(tiny_weights.single_file)
    entries = [{"name": _reference_name(k), "data": ms.Tensor(np.asarray(source[k], np.float32))} for k in source]
    renamed = sum(e["name"] != k for e, k in zip(entries, source))
    assert renamed > 100 and any(".." in e["name"] for e in entries)
    ckpt = tmp_path / "sd_xl_tiny_ms.ckpt"
    ms.save_checkpoint(entries, str(ckpt))
    load_weights(engine, ckpt)
    state = engine_state(engine)
    assert state.keys() == single_file_state.keys()
    for name, value in state.items():
        np.testing.assert_array_equal(value, single_file_state[name], err_msg=name)


def test_convert_to_the_reference_names_and_back(tiny_weights, tmp_path):
    ckpt = tmp_path / "tiny_ms.ckpt"
    cwd = tiny_weights.config.parents[2]
    result = _run_tool(["--input", str(tiny_weights.single_file), "--output", str(ckpt), "--names", "reference",
                        "--config", str(tiny_weights.config)], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    from gm.checkpoint.load import read_ckpt

    original = SafetensorsFile(tiny_weights.single_file)
    written = read_ckpt(ckpt)
    # the reference's names, with CLIP-L's token embedding under its proper name rather than the defect
    expected = {_reference_name(k) for k in original}
    expected.remove("conditioner.embedders.1.model.token_embedding..embedding_table")
    expected.add("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.embedding_table")
    assert set(written) == expected
    back = tmp_path / "back.safetensors"
    result = _run_tool(["--input", str(ckpt), "--output", str(back), "--config", str(tiny_weights.config)], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    round_trip = SafetensorsFile(back)
    assert set(round_trip) == set(original)
    for name in original:
        np.testing.assert_array_equal(round_trip[name], original[name], err_msg=name)
    refused = _run_tool(["--input", str(tiny_weights.single_file), "--output", str(tmp_path / "x.safetensors"),
                         "--names", "reference", "--config", str(tiny_weights.config)], cwd=cwd)
    assert refused.returncode == 2 and "--names reference writes a MindSpore .ckpt" in refused.stderr


def test_fp16_and_bf16_files_load(engine, tiny_weights, single_file_state, tmp_path):
    source = {k: torch.from_numpy(np.array(v)) for k, v in SafetensorsFile(tiny_weights.single_file).items()}
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / f"tiny_{dtype}.safetensors"
        save_file({k: v.to(dtype) for k, v in source.items()}, str(path))
        load_weights(engine, path)
        loaded = engine_state(engine)
        for name in source:
            expected = source[name].to(dtype).float().numpy()
            np.testing.assert_array_equal(loaded[name], expected, err_msg=f"{dtype} {name}")


def test_missing_and_unexpected_keys_are_counted(tiny_weights, tmp_path):
    engine = build_engine(tiny_weights.config, allocate=False)
    state = dict(SafetensorsFile(tiny_weights.single_file))
    del state["model.diffusion_model.out.2.weight"]
    del state["first_stage_model.quant_conv.bias"]
    state["model.diffusion_model.extra.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "edited.safetensors"
    save_safetensors(path, state)
    with pytest.raises(CheckpointError, match=r"missing keys 1 \(first: out\.2\.weight\); unexpected keys 1"):
        list(weight_arrays(engine, path))


def test_checkpoint_of_another_architecture(tiny_weights, tmp_path):
    config = OmegaConf.load(tiny_weights.config)
    config.model.params.network_config.params.model_channels = 64
    wider = build_engine(config, allocate=False)
    with pytest.raises(CheckpointError, match="wrong shape"):
        list(weight_arrays(wider, tiny_weights.single_file))
    # an SD 1.x-style file (cond_stage_model.*) is not SDXL
    sd1 = tmp_path / "sd15.safetensors"
    save_safetensors(sd1, {"cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(4, np.float32),
                           "model.diffusion_model.input_blocks.0.0.weight": np.ones((4, 4, 3, 3), np.float32)})
    with pytest.raises(CheckpointError, match="not an SDXL base checkpoint"):
        list(weight_arrays(wider, sd1))


def test_diffusers_folder_without_a_component(tiny_weights, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(tiny_weights.diffusers_dir, partial)
    shutil.rmtree(partial / "text_encoder_2")
    engine = build_engine(tiny_weights.config, allocate=False)
    with pytest.raises(CheckpointError, match="missing text_encoder_2/"):
        list(weight_arrays(engine, partial))


@pytest.mark.parametrize("damage", ["not_safetensors", "truncated", "wrong_arch", "missing_file"])
def test_bad_weight_file_gives_one_line_error(tiny_weights, tmp_path, damage):
    bad = tmp_path / "bad.safetensors"
    if damage == "not_safetensors":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        expected = "not a safetensors file"
    elif damage == "truncated":
        data = tiny_weights.single_file.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        expected = "truncated"
    elif damage == "wrong_arch":
        save_safetensors(bad, {"cond_stage_model.model.ln_final.weight": np.ones(8, np.float32)})
        expected = "not an SDXL base checkpoint"
    else:
        bad = tmp_path / "nowhere.safetensors"
        expected = "no such file"
    out = tmp_path / "out.ckpt"
    result = _run_tool(["--input", str(bad), "--output", str(out), "--config", str(tiny_weights.config)],
                       cwd=tiny_weights.config.parents[2])
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert expected in lines[-1] and str(bad) in lines[-1]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_check_model_tool_loads_and_runs(tiny_weights):
    result = subprocess.run([sys.executable, "tools/check_model.py", "--config", str(tiny_weights.config),
                             "--weight", str(tiny_weights.diffusers_dir), "--resolution", "64"],
                            cwd=tiny_weights.config.parents[2], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unet" in result.stderr and "crossattn (1, 77, 96), vector (1, 1600), image (1, 3, 64, 64)" in result.stderr


# -- what the weights say their UNet predicts (gm.checkpoint.prediction_type) --------------------

def _with(tiny_weights, tmp_path, name, extra=None, metadata=None):
    path = tmp_path / name
    save_safetensors(path, {**dict(SafetensorsFile(tiny_weights.single_file).items()), **(extra or {})},
                     metadata=metadata)
    return path


def test_the_weights_declare_v_prediction_every_way_other_tools_write_it(engine, tiny_weights, tmp_path):
    """ComfyUI's ``v_pred`` key, ModelSpec's header entry and a diffusers scheduler config each set the
    engine's preconditioning; ``--prediction_type`` wins over them; a file that says nothing keeps the
    config's (SDXL base: epsilon)."""
    marked = _with(tiny_weights, tmp_path, "v_pred_key.safetensors", {"v_pred": np.zeros((0,), np.float32)})
    spec_v = _with(tiny_weights, tmp_path, "spec_v.safetensors", metadata={"modelspec.prediction_type": "v"})
    spec_eps = _with(tiny_weights, tmp_path, "spec_eps.safetensors", metadata={"modelspec.prediction_type": "epsilon"})
    try:
        for path, requested, expected in [
            (tiny_weights.single_file, None, "epsilon"), (marked, None, "v_prediction"),
            (spec_v, None, "v_prediction"), (spec_eps, None, "epsilon"),
            (marked, "epsilon", "epsilon"), (tiny_weights.single_file, "v_prediction", "v_prediction"),
            (tiny_weights.diffusers_dir, None, "epsilon"),
        ]:
            engine.denoiser.set_prediction_type("epsilon")
            assert load_weights(engine, path, requested) == expected, (path.name, requested)
            assert engine.denoiser.scaling.prediction_type == expected
        # the scheduler config of a v-prediction diffusers export (the tiny folder's own says epsilon)
        config = json.loads((tiny_weights.diffusers_dir / "scheduler" / "scheduler_config.json").read_text())
        assert config["prediction_type"] == "epsilon"
        v_folder = tmp_path / "v_folder"
        for part in tiny_weights.diffusers_dir.iterdir():
            (v_folder / part.name).parent.mkdir(exist_ok=True)
            (v_folder / part.name).symlink_to(part, target_is_directory=part.is_dir())
        (v_folder / "scheduler").unlink()
        (v_folder / "scheduler").mkdir()
        (v_folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config,
                                                                                 "prediction_type": "v_prediction"}))
        assert load_weights(engine, v_folder) == "v_prediction"
    finally:
        engine.denoiser.set_prediction_type("epsilon")


def test_unsupported_declarations_are_one_line_errors(tiny_weights, tmp_path):
    engine = build_engine(tiny_weights.config, allocate=False)
    ztsnr = _with(tiny_weights, tmp_path, "ztsnr.safetensors",
                  {"v_pred": np.zeros((0,), np.float32), "ztsnr": np.zeros((0,), np.float32)})
    with pytest.raises(CheckpointError, match="zero-terminal-SNR"):
        declared_prediction_type(ztsnr)
    odd = _with(tiny_weights, tmp_path, "odd.safetensors", metadata={"modelspec.prediction_type": "x0"})
    with pytest.raises(CheckpointError, match="'x0' is not epsilon or v"):
        declared_prediction_type(odd)
    assert engine.denoiser.scaling.prediction_type == "epsilon"


@pytest.mark.parametrize("marker", ["key", "modelspec"])
def test_convert_keeps_a_v_prediction_model_one(tiny_weights, tmp_path, marker):
    """single file -> .ckpt -> single file: the declaration survives both formats (a ModelSpec-only
    file gains the key, which a .ckpt can carry)."""
    source = _with(tiny_weights, tmp_path, "v.safetensors", *(
        [{"v_pred": np.zeros((0,), np.float32)}] if marker == "key" else [None, {"modelspec.prediction_type": "v"}]))
    ckpt, back = tmp_path / "v.ckpt", tmp_path / "back.safetensors"
    for src, dst in ((source, ckpt), (ckpt, back)):
        result = _run_tool(["--input", str(src), "--output", str(dst), "--config", str(tiny_weights.config)],
                           cwd=tiny_weights.config.parents[2])
        assert result.returncode == 0, result.stderr[-2000:]
        assert declared_prediction_type(dst) == "v_prediction", dst.name
    assert SafetensorsFile(back).metadata["modelspec.prediction_type"] == "v"
    assert "v_pred" in SafetensorsFile(back)
