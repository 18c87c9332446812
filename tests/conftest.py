"""Shared fixtures: the tiny SDXL reference (diffusers) written as a diffusers folder and as an
official-format single file, once per test session."""

import logging
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("GLOG_v", "3")
# the scripts' persistent compile cache (gm.compile_cache) lives in a folder of this test session,
# shared by its subprocesses: warm within a run, never reused from an earlier one
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gm_test_cache_")
REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

logging.getLogger("mindspore").setLevel(logging.ERROR)


def _cpu_mode(mode_name: str):
    """Set MindSpore's ``mode_name`` (GRAPH_MODE / PYNATIVE_MODE) on the CPU, the previous mode back afterwards."""
    import mindspore as ms

    previous = ms.get_context("mode")
    ms.set_context(mode=getattr(ms, mode_name), device_target="CPU")
    yield
    ms.set_context(mode=previous)


@pytest.fixture(scope="module")
def graph_mode():
    """Graph mode on the CPU for a module's tests (``pytestmark = pytest.mark.usefixtures("graph_mode")``)."""
    yield from _cpu_mode("GRAPH_MODE")


@pytest.fixture(scope="module")
def pynative_mode():
    """PyNative on the CPU for a module's tests (``pytestmark = pytest.mark.usefixtures("pynative_mode")``)."""
    yield from _cpu_mode("PYNATIVE_MODE")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """The tiny reference SDXL with random weights, saved both ways.

    Returns a namespace with ``pipeline`` (diffusers StableDiffusionXLPipeline, torch), ``diffusers_dir``
    (saved with ``save_pretrained``, safetensors), ``single_file`` (official key names, written from the
    diffusers folder through our key maps) and ``config`` (the YAML our engine is built from).
    """
    import reference
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from gm.checkpoint.load import (
        COMPONENTS,
        component_cell,
        read_diffusers_component,
        single_file_state_from_diffusers,
    )
    from gm.checkpoint.safetensors_io import save_safetensors
    from gm.models.diffusion import build_engine
    from gm.modules.embedders.tokenizer import EOT_TOKEN, OPEN_CLIP_PAD_TOKEN, build_hf_tokenizer

    root = tmp_path_factory.mktemp("tiny_sdxl")
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing", steps_offset=1)
    pipeline = StableDiffusionXLPipeline(
        vae=reference.build_vae(), text_encoder=reference.build_clip_l(), text_encoder_2=reference.build_open_clip_g(),
        tokenizer=build_hf_tokenizer(EOT_TOKEN), tokenizer_2=build_hf_tokenizer(OPEN_CLIP_PAD_TOKEN),
        unet=reference.build_unet(), scheduler=scheduler,
    )
    diffusers_dir = root / "diffusers"
    pipeline.save_pretrained(diffusers_dir, safe_serialization=True)

    engine = build_engine(reference.TINY_CONFIG, allocate=False)
    state = {}
    for name in COMPONENTS:
        source = read_diffusers_component(diffusers_dir / name)
        state.update(single_file_state_from_diffusers(name, component_cell(engine, name), source))
    single_file = root / "sd_xl_tiny.safetensors"
    save_safetensors(single_file, state)
    return SimpleNamespace(pipeline=pipeline, diffusers_dir=diffusers_dir, single_file=single_file,
                           config=reference.TINY_CONFIG, root=root)
