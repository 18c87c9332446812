"""DreamBooth working, seen by the toy world's judge: the README's main command on the shipped base
(gm/pretrained/), with prior preservation and without. The subject-prompt images move from the base
model's subject fidelity toward the instance photos' own; with the prior, the class-prompt images
stay recognisable as their class, more than without it. Margins from measured runs (below)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
JUDGE = "gm/pretrained/toy_world_judge.safetensors"
# Measured 2026-12-06, 23rd session (2 CPU cores, the shipped base with its 24000-step VAE and its own judge,
# the subject drawn at the world's robot height, instance prompt "a photo of a sks toy", 400 LoRA steps at
# batch 4, 20 sampler steps, 32 images per prompt set): subject fidelity 0.409 -> 0.774 with the prior (0.686
# without; the photos' own 1.000, their VAE round trip 0.995); class accuracy 1.000 before, 0.812 after with
# the prior, 0.188 without; class images read as the subject: 0.000 before, 0.031 with the prior, 0.500
# without. Margins: about half of each measured change (32 images: 0.03125 is one image).
MIN_FIDELITY_GAIN = 0.18
MIN_CLASS_ACCURACY_KEPT = 0.31
MIN_SUBJECT_LEAK_AVOIDED = 0.23


def _main_command(root: Path, with_prior: bool) -> dict:
    subject = root / "toy_subject"
    if not subject.is_dir():
        subprocess.run([sys.executable, "tools/draw_toy_subject.py", "--out", str(subject)], cwd=REPO, check=True,
                       capture_output=True)
    save = root / ("with_prior" if with_prior else "without_prior")
    args = ["train_dreambooth.py", "--instance_data_path", str(subject), "--instance_prompt", "a photo of a sks toy",
            "--save_path", str(save), "--eval_toy_world_judge", JUDGE]
    if with_prior:
        args += ["--class_data_path", str(root / "class_toy"), "--class_prompt", "a photo of a toy"]
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((save / "summary.json").read_text())["evaluation"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_world_dreambooth")
    return _main_command(root, True), _main_command(root, False)


def test_the_subject_is_learned(runs):
    prior, _ = runs
    before, after = prior["before"], prior["after"]
    assert after["subject_fidelity"] - before["subject_fidelity"] > MIN_FIDELITY_GAIN


def test_prior_preservation_keeps_the_class(runs):
    prior, no_prior = runs
    assert prior["after"]["class_accuracy"] - no_prior["after"]["class_accuracy"] > MIN_CLASS_ACCURACY_KEPT


def test_prior_preservation_keeps_the_subject_out_of_the_class(runs):
    """Language drift, the failure prior preservation exists for: "a photo of a toy" draws the subject."""
    prior, no_prior = runs
    assert no_prior["after"]["class_as_subject"] - prior["after"]["class_as_subject"] > MIN_SUBJECT_LEAK_AVOIDED


def test_the_shipped_base_is_an_official_fp16_single_file():
    from safetensors import safe_open

    base = REPO / "gm" / "pretrained" / "sd_xl_toy_world.safetensors"
    assert base.stat().st_size < 40 * 2 ** 20
    with safe_open(str(base), "np") as f:
        names = list(f.keys())
        assert {str(f.get_tensor(n).dtype) for n in names[:50]} == {"float16"}
    for prefix in ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                   "conditioner.embedders.1.model."):
        assert any(n.startswith(prefix) for n in names), prefix
    card = (REPO / "gm" / "pretrained" / "MODEL_CARD.md").read_text()
    assert "tools/pretrain_toy_world.py" in card
