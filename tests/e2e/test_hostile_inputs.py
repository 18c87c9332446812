"""Hostile input, table-driven, across train_dreambooth.py, the sampling CLI and the tools: each
case ends with exit code 2 and one logged line that names the flag or file, before any model is
built, and leaves what was already on disk as it was. The scripts run in this process (their
``main`` under ``gm.cli.run_cli``, as ``python script.py`` runs it) so the table takes seconds;
one case (a file-size limit standing in for a full disk) runs as a subprocess."""

import importlib.util
import logging
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gm.cli import run_cli

REPO = Path(__file__).resolve().parents[2]
DOG = REPO.parent / "shared" / "data" / "dreambooth" / "dog"


def _load(relative):
    spec = importlib.util.spec_from_file_location(relative.replace("/", "_")[:-3], REPO / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {name: _load(name) for name in ("train_dreambooth.py", "demo/sampling_without_streamlit.py",
                                           "tools/convert_weights.py", "tools/convert_lora.py",
                                           "tools/merge_lora.py", "tools/check_model.py",
                                           "tools/draw_toy_subject.py", "tools/eval_dreambooth.py")}


@pytest.fixture
def place(tmp_path):
    """A folder with a subject (2 small photos), a run that already exists, and odd files."""
    subject = tmp_path / "subject"
    subject.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(subject / f"{i}.jpg")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "cut.jpg").write_bytes((subject / "0.jpg").read_bytes()[:40])
    (tmp_path / "a_file").write_text("not a folder")
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "train_log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (old / "config.yaml").write_text("lora: {}\n")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n  seed: : :\n")
    (tmp_path / "unknown_key.yaml").write_text("base_config: configs/inference/sd_xl_tiny.yaml\noptim:\n  lr: 1\n")
    (tmp_path / "wrong_type.yaml").write_text("base_config: configs/inference/sd_xl_tiny.yaml\n"
                                              "train:\n  max_train_steps: many\n")
    (tmp_path / "heun.yaml").write_text("base_config: configs/inference/sd_xl_tiny.yaml\n"
                                        "sampling:\n  sampler: Heun\n")
    (tmp_path / "empty_prompts.txt").write_text("\n\n")
    (tmp_path / "no_weight.yaml").write_text("base_config: configs/inference/sd_xl_tiny.yaml\n"
                                             "weight: weights/nowhere.safetensors\n")
    np.savez(tmp_path / "latents.npz", a=np.zeros((1, 4, 8, 8), np.float32))
    (tmp_path / "not_image.png").write_text("hello")
    (tmp_path / "zero.safetensors").write_bytes(b"")
    (tmp_path / "cut.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\": \"F32\"")
    (tmp_path / "exists.safetensors").write_bytes(b"someone else's file")
    (tmp_path / "folder.safetensors").mkdir()
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    toys = tmp_path / "toys"
    toys.mkdir()
    (toys / "toy_00.jpg").write_bytes(b"my own photo")
    return tmp_path


def _train(extra, subject="subject", save="run"):
    return ["train_dreambooth.py", "--instance_data_path", f"{{p}}/{subject}", "--instance_prompt",
            "a photo of sks dog", "--save_path", f"{{p}}/{save}", *extra]


def _sample(extra):
    return ["demo/sampling_without_streamlit.py", "--save_path", "{p}/samples", "--width", "64", "--height", "64",
            *extra]


CASES = [  # (id, argv with {p} = the place, text the one error line must hold)
    ("seed", _train(["--seed", "-1"]), "--seed -1: must be >= 0"),
    ("lr_inf", _train(["--learning_rate", "inf"]), "--learning_rate inf: must be a finite number"),
    ("lr_nan", _train(["--learning_rate", "nan"]), "--learning_rate nan: must be a finite number"),
    ("lr_zero", _train(["--learning_rate", "0"]), "--learning_rate 0.0: must be > 0"),
    ("guidance", _train(["--guidance_scale", "-2"]), "--guidance_scale -2.0: must be >= 0"),
    ("alpha", _train(["--lora_alpha", "0"]), "--lora_alpha 0.0: must be > 0"),
    ("targets", _train(["--lora_unet_targets", "attn", "mlp"]), "--lora_unet_targets"),
    ("rank", _train(["--lora_rank", "0"]), "--lora_rank 0: must be >= 1"),
    ("dropout", _train(["--lora_dropout", "1.5"]), "--lora_dropout 1.5"),
    ("fp16_cpu", _train(["--mixed_precision", "fp16"]), "--mixed_precision fp16: the CPU target trains in fp32"),
    ("prior_fp16_cpu", _train(["--prior_generation_precision", "bf16"]),
     "--prior_generation_precision bf16: the CPU target samples in fp32"),
    ("sample_fp16_cpu", _sample(["--precision", "fp16"]), "--precision fp16 needs --device_target Ascend or GPU"),
    ("precision", _train(["--mixed_precision", "fp8"]), "--mixed_precision fp8"),
    ("device", _train(["--device_target", "TPU"]), "--device_target TPU"),
    ("blank_prompt", ["train_dreambooth.py", "--instance_data_path", "{p}/subject", "--instance_prompt", "   ",
                      "--save_path", "{p}/run"], "--instance_prompt is required (and not blank)"),
    ("blank_class_prompt", _train(["--class_data_path", "{p}/class", "--class_prompt", " "]),
     "--class_prompt is blank"),
    ("blank_validation", _train(["--validation_prompt", "  "]), "--validation_prompt '  ': is blank"),
    ("class_is_instance", _train(["--class_data_path", "{p}/subject", "--class_prompt", "a dog"]),
     "is the instance folder"),
    ("class_inside_instance", _train(["--class_data_path", "{p}/subject/class", "--class_prompt", "a dog"]),
     "is the instance folder (or inside it)"),
    ("class_is_file", _train(["--class_data_path", "{p}/a_file", "--class_prompt", "a dog"]), "is a file"),
    ("zero_class_images", _train(["--class_data_path", "{p}/class", "--class_prompt", "a dog",
                                  "--num_class_images", "0"]), "--num_class_images 0 with --class_data_path"),
    ("save_is_file", _train([], save="a_file"), "--save_path {p}/a_file: is a file"),
    ("save_holds_run", _train([], save="old_run"), "already holds a training run"),
    ("resume_nothing", _train(["--resume_from_checkpoint", "latest"]), "no complete training state"),
    ("resume_and_overwrite", _train(["--resume_from_checkpoint", "latest", "--overwrite"], save="old_run"),
     "exclude each other"),
    ("resume_missing_folder", _train(["--resume_from_checkpoint", "{p}/nowhere"]), "no such state folder"),
    ("yaml_broken", _train(["--config", "{p}/bad.yaml"]), "--config {p}/bad.yaml"),
    ("yaml_unknown_key", _train(["--config", "{p}/unknown_key.yaml"]), "lr"),
    ("yaml_wrong_type", _train(["--config", "{p}/wrong_type.yaml"]), "--config {p}/wrong_type.yaml"),
    ("yaml_sampler", _train(["--config", "{p}/heun.yaml"]), "sampling.sampler Heun: expected one of"),
    ("config_missing", _train(["--config", "{p}/nowhere.yaml"]), "--config {p}/nowhere.yaml: no such file"),
    ("config_weight_missing", _train(["--config", "{p}/no_weight.yaml"]),
     "--config {p}/no_weight.yaml: weight weights/nowhere.safetensors does not exist; give --weight FILE"),
    ("eval_judge_missing", _train(["--eval_toy_world_judge", "{p}/none.safetensors"]),
     "--eval_toy_world_judge {p}/none.safetensors: no such file"),
    ("eval_images", _train(["--eval_num_images", "1"]), "--eval_num_images 1: must be >= 2"),
    ("eval_clip_missing", _train(["--eval_clip", "{p}/nowhere"]), "--eval_clip {p}/nowhere: no such file or folder"),
    ("eval_dino_missing", _train(["--eval_dino", "{p}/nowhere"]), "--eval_dino {p}/nowhere: no such file or folder"),
    ("eval_steps", _train(["--eval_steps", "0"]), "--eval_steps 0: must be >= 1"),
    ("eval_prompts_empty", _train(["--eval_prompts", "{p}/empty_prompts.txt"]),
     "--eval_prompts {p}/empty_prompts.txt: no prompts in the file"),
    ("metrics_no_model", ["tools/eval_dreambooth.py", "--images", "{p}/subject", "--subject", "{p}/subject"],
     "give --clip and/or --dino"),
    ("metrics_clip_score", ["tools/eval_dreambooth.py", "--images", "{p}/subject", "--metric", "clip_score"],
     "--metric clip_score needs --clip"),
    ("metrics_clip_missing", ["tools/eval_dreambooth.py", "--images", "{p}/subject", "--subject", "{p}/subject",
                              "--clip", "{p}/nowhere"], "--clip {p}/nowhere: no such file or folder"),
    ("metrics_images_empty", ["tools/eval_dreambooth.py", "--images", "{p}/empty", "--subject", "{p}/subject",
                              "--dino", "{p}/subject"], "--images {p}/empty: folder is empty"),
    ("metrics_no_prompt", ["tools/eval_dreambooth.py", "--images", "{p}/subject", "--subject", "{p}/subject",
                           "--dino", "{p}/subject"], "0.jpg has no prompt"),
    ("lora_format", _train(["--lora_format", "onnx"]), "--lora_format onnx: expected one of kohya, diffusers, gm"),
    ("save_precision", _train(["--save_precision", "fp8"]), "--save_precision fp8: expected one of fp32, fp16, bf16"),
    ("init_lora_missing", _train(["--init_lora", "{p}/none.safetensors"]), "--init_lora {p}/none.safetensors"),
    ("instance_missing", _train([], subject="nowhere"), "{p}/nowhere"),
    ("instance_empty", _train([], subject="empty"), "folder is empty"),
    ("instance_broken", _train([], subject="broken"), "2 image files failed to decode"),
    ("instance_symlink_loop", _train([], subject="loop_a"), "loop_a"),
    ("instance_is_file", _train([], subject="a_file"), "a_file"),
    ("skipped_steps", _train(["--max_skipped_steps", "0"]), "--max_skipped_steps 0: must be >= 1"),
    ("checkpointing", _train(["--checkpointing_steps", "0"]), "--checkpointing_steps 0: must be >= 1"),
    ("resolution", _train(["--resolution", "100"]), "--resolution 100: must be a positive multiple of 8"),
    ("scheduler", _train(["--lr_scheduler", "exponential"]), "--lr_scheduler exponential"),
    ("sample_npz", _sample(["--init_latent_path", "{p}/latents.npz"]), "an .npz archive"),
    ("sample_img", _sample(["--task", "img2img", "--img", "{p}/not_image.png"]), "--img {p}/not_image.png: not a "
                                                                                 "readable image"),
    ("sample_blank_prompt", _sample(["--prompt", "  "]), "--prompt is blank"),
    ("sample_scales", _sample(["--weight", "{p}/exists.safetensors,{p}/exists.safetensors", "--lora_scale", "1",
                               "2"]), "--lora_scale: 2 scale(s) for 1 LoRA"),
    ("sample_missing_lora", _sample(["--weight", "{p}/exists.safetensors,{p}/none.safetensors"]),
     "LoRA file {p}/none.safetensors does not exist"),
    ("sample_steps", _sample(["--sample_step", "0"]), "--sample_step 0"),
    ("convert_to_folder", ["tools/convert_weights.py", "--input", "{p}/exists.safetensors", "--output",
                           "{p}/folder.safetensors"], "--output {p}/folder.safetensors: is a folder"),
    ("convert_over_file", ["tools/convert_weights.py", "--input", "{p}/zero.safetensors", "--output",
                           "{p}/exists.safetensors"], "already exists; choose another name or pass --overwrite"),
    ("convert_zero_byte", ["tools/convert_weights.py", "--input", "{p}/zero.safetensors", "--output",
                           "{p}/out.ckpt", "--config", "configs/inference/sd_xl_tiny.yaml"],
     "{p}/zero.safetensors: not a safetensors file"),
    ("lora_truncated", ["tools/convert_lora.py", "--input", "{p}/cut.safetensors", "--output", "{p}/out.safetensors",
                        "--to", "kohya", "--config", "configs/inference/sd_xl_tiny.yaml"], "{p}/cut.safetensors"),
    ("lora_over_file", ["tools/convert_lora.py", "--input", "{p}/cut.safetensors", "--output",
                        "{p}/exists.safetensors", "--to", "kohya"], "already exists"),
    ("merge_missing_lora", ["tools/merge_lora.py", "--base", "{p}/exists.safetensors", "--lora", "{p}/none.st",
                            "--output", "{p}/merged.safetensors"], "--lora {p}/none.st: no such file"),
    ("check_resolution", ["tools/check_model.py", "--resolution", "0"], "--resolution 0: must be a positive multiple"),
    ("toy_replace", ["tools/draw_toy_subject.py", "--out", "{p}/toys", "--num_images", "1"],
     "toy_00.jpg (and 0 more) already there"),
]


def _snapshot(root: Path):
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if not p.is_symlink()}


@pytest.mark.parametrize("argv,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_gives_one_line_and_changes_nothing(scripts, place, argv, expected, caplog, monkeypatch):
    assert len(CASES) >= 40
    monkeypatch.chdir(REPO)
    argv = [a.format(p=place) for a in argv]
    module = scripts[argv[0]]
    monkeypatch.setattr(module, "setup_logging", lambda *a, **k: None)  # keep pytest's log capture
    import gm.models.diffusion as diffusion

    real_build = diffusion.build_engine

    def build_engine(*args, **kwargs):  # a name table (no memory) is fine, a model is not
        if kwargs.get("allocate", True):
            pytest.fail("a model was built")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(diffusion, "build_engine", build_engine)
    if hasattr(module, "build_engine"):
        monkeypatch.setattr(module, "build_engine", build_engine)
    before = _snapshot(place)
    with caplog.at_level(logging.ERROR, logger="gm"), pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: module.main(argv[1:]))
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert expected.format(p=place) in errors[0], errors[0]
    after = _snapshot(place)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing written before is changed
    new = set(after) - set(before)
    assert not new, new


@pytest.mark.parametrize("script", ["train_dreambooth.py", "demo/sampling_without_streamlit.py"])
def test_a_device_this_machine_lacks_is_one_line(script, tmp_path):
    # a subprocess: the attempt must not touch this test process's MindSpore context
    extra = (["--instance_data_path", str(DOG), "--instance_prompt", "sks"] if script.startswith("train") else [])
    result = subprocess.run([sys.executable, script, "--device_target", "GPU", "--save_path", str(tmp_path / "o"),
                             *extra], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--device_target GPU: not usable here" in result.stderr and "Traceback" not in result.stderr


def _no_core():
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))  # a "disk" with 16 KB free per file
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past it fails with EFBIG instead of killing


@pytest.mark.skipif(not DOG.is_dir(), reason="needs ../shared/data/dreambooth/dog")
def test_a_full_disk_is_found_before_anything_is_built(tmp_path):
    result = subprocess.run([sys.executable, "train_dreambooth.py", "--instance_data_path", str(DOG),
                             "--instance_prompt", "a photo of sks dog", "--save_path", str(tmp_path / "run")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=_no_core)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--save_path" in result.stderr and "cannot write there (File too large)" in result.stderr
    assert "Traceback" not in result.stderr
