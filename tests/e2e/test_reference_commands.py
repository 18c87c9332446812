"""The reference (mindone) README's standalone DreamBooth training command, run verbatim here: the
same flags and values, with only paths substituted (its config by a tiny training YAML, its
converted ``sd_xl_base_1.0_ms.ckpt`` by a tiny one written under the reference's names) and
``--device_target Ascend`` by ``CPU``. (Its mpirun command, run the same way with ``-n 2``, trained
and wrote its files, but once of two runs rank 1 then died at exit with a segfault -- issue 11.)
It gives no ``--save_path``, so the run lands in the
default ``runs/dreambooth`` of the working folder (a scratch folder with links to the scripts)."""

import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from gm.checkpoint.lora import read_lora_file
from gm.checkpoint.reference_names import reference_names
from gm.checkpoint.safetensors_io import SafetensorsFile
from gm.models.diffusion import build_engine

REPO = Path(__file__).resolve().parents[2]
DOG = REPO.parent / "shared" / "data" / "dreambooth" / "dog"

pytestmark = pytest.mark.skipif(not DOG.is_dir(), reason=f"{DOG} not found (../shared beside the checkout)")


def _reference_args(config, weight, class_dir):
    """The reference README's standalone command, flag for flag."""
    return ["train_dreambooth.py", "--config", str(config), "--weight", str(weight), "--instance_data_path",
            str(DOG), "--instance_prompt", "A photo of a sks dog", "--class_data_path", str(class_dir),
            "--class_prompt", "A photo of a dog", "--gradient_accumulation_steps", "4", "--ms_mode", "0",
            "--save_ckpt_interval", "500", "--device_target", "CPU"]


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


def test_the_standalone_command(setup):
    root, config, weight = setup
    workdir = _workdir(root / "standalone")
    result = subprocess.run([sys.executable, *_reference_args(config, weight, root / "class_standalone")],
                            cwd=workdir, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((root / "class_standalone").glob("*.png"))) == 2
    lora = _lora(workdir)
    assert any(np.abs(v).max() > 0 for k, v in lora.items() if "up" in k)  # trained, not the zero init
