"""The reference (mindone) README's DreamBooth commands, run verbatim here: the same flags and
values, with only paths substituted (its config by a tiny training YAML, its converted
``sd_xl_base_1.0_ms.ckpt`` by a tiny one written under the reference's names, its LoRA by the one
the standalone command wrote), ``--device_target Ascend`` by ``CPU`` and mpirun's ``-n 4`` by
``-n 2``. Its training commands give no ``--save_path``, so the runs land in the default
``runs/dreambooth`` of the working folder (a scratch folder with links to the scripts).
Commands: docs/dreambooth_finetune.md of mindone's examples/stable_diffusion_xl."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from PIL import Image

from gm.checkpoint.lora import read_lora_file
from gm.checkpoint.reference_names import reference_names
from gm.checkpoint.safetensors_io import SafetensorsFile
from gm.models.diffusion import build_engine

REPO = Path(__file__).resolve().parents[2]
DOG = REPO.parent / "shared" / "data" / "dreambooth" / "dog"

pytestmark = pytest.mark.skipif(not DOG.is_dir(), reason=f"{DOG} not found (../shared beside the checkout)")


def _reference_args(config, weight, class_dir, parallel=False):
    """The reference README's training commands, flag for flag (the mpirun one has no
    ``--gradient_accumulation_steps`` and adds ``--is_parallel True``)."""
    args = ["train_dreambooth.py", "--config", str(config), "--weight", str(weight), "--instance_data_path",
            str(DOG), "--instance_prompt", "A photo of a sks dog", "--class_data_path", str(class_dir),
            "--class_prompt", "A photo of a dog"]
    args += [] if parallel else ["--gradient_accumulation_steps", "4"]
    args += ["--ms_mode", "0", "--save_ckpt_interval", "500"]
    return args + (["--is_parallel", "True"] if parallel else []) + ["--device_target", "CPU"]


@pytest.fixture(scope="module")
def setup(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_commands")
    # a few steps and class images: the YAML is ours, the command line is theirs
    config = root / "sd_xl_tiny_finetune_dreambooth_lora.yaml"
    config.write_text(f"base_config: {tiny_weights.config}\nlora:\n  rank: 4\ndata:\n  resolution: 64\n"
                      "train:\n  max_train_steps: 2\n  num_class_images: 2\n  sample_batch_size: 2\n"
                      "sampling:\n  num_steps: 2\n")
    engine = build_engine(tiny_weights.config, allocate=False)
    names = reference_names(engine)
    source = SafetensorsFile(tiny_weights.single_file)
    weight = root / "sd_xl_base_1.0_ms.ckpt"
    ms.save_checkpoint([{"name": names[k], "data": ms.Tensor(np.asarray(source[k], np.float32))} for k in source],
                       str(weight))
    return root, config, weight


def _workdir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("train_dreambooth.py", "demo"):
        (path / name).symlink_to(REPO / name)
    return path


def _lora(workdir: Path):
    files = sorted((workdir / "runs" / "dreambooth" / "checkpoints").glob("sdxl_lora_step*_lora.ckpt"))
    assert files, sorted(str(p) for p in workdir.rglob("*"))[:20]
    return read_lora_file(files[-1])[0]


@pytest.fixture(scope="module")
def standalone(setup):
    root, config, weight = setup
    workdir = _workdir(root / "standalone")
    result = subprocess.run([sys.executable, *_reference_args(config, weight, root / "class_standalone")],
                            cwd=workdir, capture_output=True, text=True, timeout=900)
    return workdir, result


def test_the_standalone_command(setup, standalone):
    root = setup[0]
    workdir, result = standalone
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((root / "class_standalone").glob("*.png"))) == 2
    lora = _lora(workdir)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if "up" in k)  # trained, not the zero init


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not found: apt-get install -y openmpi-bin")
def test_the_mpirun_command(setup):
    root, config, weight = setup
    workdir = _workdir(root / "mpirun")
    slots = ["--oversubscribe"] if (os.cpu_count() or 1) < 2 else []
    env = {k: v for k, v in os.environ.items() if k != "MS_COMPILER_CACHE_ENABLE"}
    result = subprocess.run(["mpirun", "--allow-run-as-root", *slots, "-n", "2", sys.executable,
                             *_reference_args(config, weight, root / "class_mpirun", parallel=True)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert len(list((root / "class_mpirun").glob("*.png"))) == 2  # one per rank, none twice
    summary = json.loads((workdir / "runs" / "dreambooth" / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["lora_sha256_per_rank"])) == 1
    lora = _lora(workdir)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if "up" in k)


def test_the_sampling_command_with_the_training_config_and_the_lora(setup, standalone):
    """``--weight base_ms.ckpt,lora.ckpt`` with the training YAML as ``--config``, at its defaults
    (1024x1024, 40 Euler steps; ~3 minutes here): every module of the trained LoRA merged."""
    root, config, weight = setup
    workdir, result = standalone
    assert result.returncode == 0, result.stderr[-2000:]
    lora = sorted((workdir / "runs" / "dreambooth" / "checkpoints").glob("sdxl_lora_step*_lora.ckpt"))[-1]
    modules = sum(1 for key in _lora(workdir) if key.endswith("lora_up.weight"))
    run = subprocess.run([sys.executable, "demo/sampling_without_streamlit.py", "--task", "txt2img",
                          "--config", str(config), "--weight", f"{weight},{lora}", "--prompt",
                          "a sks dog swimming in a pool", "--device_target", "CPU"],
                         cwd=workdir, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert f"{lora}: {modules} modules" in run.stderr, run.stderr[-3000:]
    image = np.asarray(Image.open(workdir / "outputs" / "samples" / "000000.png").convert("RGB"))
    assert image.shape == (1024, 1024, 3) and image.std() > 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_streamlit_command_serves_the_page(setup):
    """``streamlit run demo/sampling.py --server.port <port>`` (headless here) starts and serves;
    the page itself is driven with AppTest in test_sampling_page.py."""
    pytest.importorskip("streamlit")
    workdir = _workdir(setup[0] / "streamlit")
    port = _free_port()
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "demo/sampling.py", "--server.port",
                               str(port), "--server.headless", "true"], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.communicate()[0][-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                    assert reply.read() == b"ok"
                    break
            except OSError:
                assert time.monotonic() < deadline, "streamlit did not come up"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as reply:
            assert reply.status == 200 and b"<html" in reply.read().lower()
    finally:
        server.terminate()
        server.wait(timeout=30)
