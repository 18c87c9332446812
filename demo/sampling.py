"""Streamlit page for SDXL sampling: weights (and an optional LoRA), prompt, negative prompt,
sampler, steps, guidance, seed and size; shows the images and offers them for download.

    pip install streamlit
    streamlit run demo/sampling.py -- --config configs/inference/sd_xl_base.yaml --device_target CPU

The model is built once per (config, weights, mode) and cached across clicks.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import streamlit as st
except ImportError as err:  # the page is optional; the CLI needs no streamlit
    raise SystemExit("the sampling page needs streamlit: pip install streamlit") from err

from PIL import Image  # noqa: E402

from gm.checkpoint.lora_merge import load_base_with_loras, parse_lora_spec  # noqa: E402
from gm.errors import ConfigError, UserError  # noqa: E402
from gm.inference import DISCRETIZATIONS, SAMPLERS, Sampler, SamplingOptions, set_mode  # noqa: E402
from gm.models.diffusion import build_engine  # noqa: E402
from gm.modules.pynative_jit import apply_pynative_jit  # noqa: E402

DEFAULT_CONFIG = str(REPO / "configs" / "inference" / "sd_xl_base.yaml")


def page_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--weight", default="")
    parser.add_argument("--lora", default="", help="optional LoRA files, comma-separated, each FILE or FILE:SCALE "
                                                   "(any format: kohya, diffusers, the seed's ckpt, ours)")
    parser.add_argument("--ms_mode", type=int, default=0)
    parser.add_argument("--device_target", default="CPU")
    args, _ = parser.parse_known_args()
    return args


def lora_list(text: str) -> tuple:
    """((file, scale), ...) from one LoRA per line or comma, each FILE or FILE:SCALE."""
    entries = [e.strip() for line in text.splitlines() for e in line.split(",") if e.strip()]
    return tuple(parse_lora_spec(e) for e in entries)


@st.cache_resource(show_spinner="Building the model ...")
def cached_sampler(config: str, weight: str, loras: tuple, ms_mode: int, device_target: str) -> Sampler:
    """One engine per weights choice (base and optional LoRAs with scales), reused by every click."""
    if loras and not weight:
        raise ConfigError("a LoRA needs the base weights it was trained on; fill in 'Base weights'")
    set_mode(ms_mode, device_target)
    engine = build_engine(config)
    if weight:
        load_base_with_loras(engine, weight, loras)  # LoRAs merged: served at the base model's cost
    apply_pynative_jit("auto", ms_mode, device_target, engine)
    return Sampler(engine)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    args = page_args()
    st.title("SDXL sampling (MindSpore)")
    with st.sidebar:
        config = st.text_input("Config", args.config, key="config")
        weight = st.text_input("Base weights (.safetensors, diffusers folder or .ckpt)", args.weight, key="weight")
        lora = st.text_area("LoRAs (optional; one per line, FILE or FILE:SCALE, any format)", args.lora, key="lora")
        sampler_name = st.selectbox("Sampler", sorted(SAMPLERS), index=sorted(SAMPLERS).index("EulerEDMSampler"),
                                    key="sampler")
        discretization = st.selectbox("Discretization", sorted(DISCRETIZATIONS),
                                      index=sorted(DISCRETIZATIONS).index("LegacyDDPMDiscretization"),
                                      key="discretization")
        steps = st.number_input("Steps", min_value=1, max_value=1000, value=40, key="steps")
        guidance = st.number_input("Guidance scale", min_value=0.0, max_value=30.0, value=5.0, key="guidance")
        seed = st.number_input("Seed", min_value=0, value=42, key="seed")
        width = st.number_input("Width", min_value=8, max_value=2048, value=1024, step=8, key="width")
        height = st.number_input("Height", min_value=8, max_value=2048, value=1024, step=8, key="height")
        num_images = st.number_input("Images", min_value=1, max_value=16, value=1, key="num_images")
    prompt = st.text_area("Prompt", "a photo of an astronaut riding a horse on mars", key="prompt")
    negative = st.text_input("Negative prompt", "", key="negative_prompt")
    if not st.button("Generate", key="generate"):
        return
    options = SamplingOptions(sampler=sampler_name, discretization=discretization, num_steps=int(steps),
                              guidance_scale=float(guidance), negative_prompt=negative, height=int(height),
                              width=int(width), seed=int(seed))
    try:
        options.validate()
        sampler = cached_sampler(config, weight, lora_list(lora), args.ms_mode, args.device_target)
        with st.spinner("Sampling ..."):
            images = sampler([prompt] * int(num_images), options)
    except UserError as err:
        st.error(str(err))
        return
    st.session_state["images"] = images
    st.session_state["engine_id"] = id(sampler.engine)  # lets a test see that clicks reuse the model
    for i, image in enumerate(images):
        st.image(image, caption=f"{prompt} (seed {options.seed}, image {i})")
        st.download_button(f"Download image {i}", png_bytes(image), file_name=f"sdxl_{options.seed}_{i}.png",
                           mime="image/png", key=f"download_{i}")


main()
