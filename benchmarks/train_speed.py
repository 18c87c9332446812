"""DreamBooth-LoRA training speed and memory, ours (MindSpore) against the reference (diffusers
``UNet2DConditionModel`` + peft LoRA, torch eager), measured in one run on one machine.

    python benchmarks/train_speed.py                                    # tiny@128, tiny@256, medium@128, medium@256
    python benchmarks/train_speed.py --configs tiny --resolutions 128 --variants graph reference
    python benchmarks/train_speed.py --configs base --resolutions 256 --steps 3 --variants graph reference

Every measurement is a fresh process (so first step = a cold start and peak RSS is that process's
own, read with ``wait4``). Both sides train rank-4 LoRA on to_q/k/v/out.0 of every UNet attention
with AdamW on one instance + one class sample per step at the same resolution and SDXL topology
(random weights: timing does not depend on them).

* ours: ``train_dreambooth.py`` itself, on ``../shared/data/dreambooth/dog`` (instance) and
  ``dog6`` (as 5 ready class images, so nothing is generated), no validation images. Variants:
  ``graph`` (``--ms_mode 0``, cached inputs, the default, on a cold compile cache and an empty
  input store, then ``warm``: the same run again on the now warm cache and filled store),
  ``uncached`` (``--cache_latents False``: VAE and text encoders every step), ``pynative``
  (``--ms_mode 1``, with ``--pynative_jit auto``: the UNet levels compiled), ``pynative_eager``
  (``--ms_mode 1 --pynative_jit off``: every op launched from Python), ``pynative_shared``
  (``--ms_mode 1 --pynative_jit shared``: one compiled graph per block structure). Timings from its ``summary.json``
  (seconds since process start; per-phase medians) and ``train_log.jsonl``.
* reference: latents and text embeddings precomputed (as diffusers' ``--cache_latents`` and its
  precomputed prompt embeddings), then UNet forward + backward + AdamW per step.

Reported per run: ``first_step_s`` (process start to the end of step 1: imports, build,
compilation, caching, step 1), ``median_step_s`` (steps 2..N), ``peak_rss_gb``, achieved
``gflops`` (the reference UNet's forward+backward FLOPs per step counted by torch's
``FlopCounterMode``, divided by the median step) against each framework's measured 2048^2
float32 matmul peak; and ``ratios`` ours / reference. Prints JSON (``--json FILE`` writes it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dreambooth"
CONFIGS = {
    "tiny": REPO / "configs" / "training" / "sd_xl_tiny_dreambooth_lora.yaml",
    "medium": REPO / "configs" / "training" / "sd_xl_medium_dreambooth_lora.yaml",
    "base": REPO / "configs" / "training" / "sd_xl_base_finetune_dreambooth_lora_910b.yaml",
}
VARIANTS = ("graph", "uncached", "pynative", "pynative_eager", "pynative_shared", "reference")
LORA_RANK = 4


def run_child(cmd: List[str], env: Dict[str, str] | None = None, timeout: float = 7200) -> Dict[str, float]:
    """Run ``cmd``; returns wall seconds, peak RSS (GB) of that process and its exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    out_lines = []
    for line in proc.stdout:  # drain, or a chatty child blocks on a full pipe
        out_lines.append(line.decode(errors="replace"))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(out_lines[-15:])
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{tail}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_gb": usage.ru_maxrss / 1024**2,
            "output": "".join(out_lines)}


def ours(config: str, resolution: int, steps: int, variant: str, cache_dir: Path, work: Path) -> Dict:
    save = work / f"{config}_{resolution}_{variant}"
    cmd = [sys.executable, str(REPO / "train_dreambooth.py"), "--config", str(CONFIGS[config]),
           "--instance_data_path", str(DATA / "dog"), "--instance_prompt", "a photo of sks dog",
           "--class_data_path", str(DATA / "dog6"), "--class_prompt", "a photo of a dog", "--num_class_images", "5",
           "--resolution", str(resolution), "--max_train_steps", str(steps), "--save_ckpt_interval", str(steps),
           "--validation_prompt", "", "--train_batch_size", "1", "--gradient_accumulation_steps", "1",
           "--lora_rank", str(LORA_RANK), "--lora_alpha", str(LORA_RANK), "--lora_unet_targets", "attn",
           "--mixed_precision", "fp32", "--save_path", str(save), "--compile_cache", str(cache_dir),
           "--input_cache", str(cache_dir.with_name(cache_dir.name.replace("compile", "input"))),
           "--ms_mode", "1" if variant.startswith("pynative") else "0",
           "--pynative_jit", {"pynative_eager": "off", "pynative_shared": "shared"}.get(variant, "auto"),
           "--overwrite"]  # the warm rerun reuses the folder
    if variant == "uncached":
        cmd += ["--cache_latents", "False"]
    env = dict(os.environ, GLOG_v="3")
    proc = run_child(cmd, env)
    summary = json.loads((save / "summary.json").read_text())
    seconds = [json.loads(line)["seconds"] for line in (save / "train_log.jsonl").read_text().splitlines()]
    timings = summary["timings"]
    return {"first_step_s": timings["first_step_s"], "median_step_s": statistics.median(seconds[1:] or seconds),
            "peak_rss_gb": proc["peak_rss_gb"], "wall_s": proc["wall_s"], "phases": timings}


def reference(config: str, resolution: int, steps: int) -> Dict:
    cmd = [sys.executable, __file__, "--_reference_child", config, str(resolution), str(steps)]
    proc = run_child(cmd, dict(os.environ))
    result = json.loads(proc["output"].strip().splitlines()[-1])
    result["peak_rss_gb"] = proc["peak_rss_gb"]
    result["wall_s"] = proc["wall_s"]
    return result


def _reference_child(config: str, resolution: int, steps: int) -> None:
    """The torch side, in its own process: prints one JSON line."""
    start = time.perf_counter()
    sys.path.insert(0, str(REPO / "tests"))
    import reference as ref
    import torch
    from diffusers import UNet2DConditionModel
    from omegaconf import OmegaConf
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    base = OmegaConf.load(CONFIGS[config]).base_config
    inference_yaml = REPO / base
    params = ref.model_params(inference_yaml).network_config.params
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**ref.unet_config(inference_yaml))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4)
    unet.train()
    gen = torch.Generator().manual_seed(0)
    n, h = 2, resolution // 8  # instance + class sample
    latents = torch.randn(n, 4, h, h, generator=gen)  # precomputed, as diffusers' --cache_latents
    context = torch.randn(n, 77, params.context_dim, generator=gen)
    pooled = torch.randn(n, params.adm_in_channels - 6 * 256, generator=gen)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * n, dtype=torch.float32)
    alphas = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0)

    def step() -> None:
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (n,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = per_sample[: n // 2].mean() + per_sample[n // 2:].mean()  # instance + prior loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = []
    for i in range(steps):
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
        if i == 0:
            first = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step()
    a = torch.randn(2048, 2048)
    torch.mm(a, a)
    t0 = time.perf_counter()
    for _ in range(5):
        torch.mm(a, a)
    peak = 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9
    print(json.dumps({"first_step_s": first, "median_step_s": statistics.median(seconds[1:] or seconds),
                      "flops_per_step": counter.get_total_flops(), "matmul_peak_gflops": peak,
                      "threads": torch.get_num_threads()}))


def mindspore_matmul_peak() -> float:
    code = ("import time, numpy as np, mindspore as ms\n"
            "ms.set_context(mode=ms.GRAPH_MODE, device_target='CPU')\n"
            "a = ms.Tensor(np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32))\n"
            "mm = ms.jit(ms.ops.matmul)\n"
            "mm(a, a).asnumpy()\n"
            "t = time.perf_counter()\n"
            "for _ in range(5):\n    mm(a, a).asnumpy()\n"
            "print(5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, GLOG_v="3"))
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["tiny", "medium"], choices=sorted(CONFIGS))
    parser.add_argument("--resolutions", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--variants", nargs="+", default=["graph", "uncached", "reference"], choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1,
                        help="with graph and reference: this many warm-ours/reference pairs in all, alternated, "
                             "and the median of their step ratios (a steadier ratio on a noisy machine)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--_reference_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 1 or (args.rounds > 1 and not {"graph", "reference"} <= set(args.variants)):
        parser.error(f"--rounds {args.rounds}: use 1, or more with --variants including graph and reference")
    if args._reference_child:
        config, resolution, steps = args._reference_child
        _reference_child(config, int(resolution), int(steps))
        return
    if not (DATA / "dog").is_dir():
        sys.exit(f"benchmark data not found: {DATA / 'dog'} (the repository's ../shared folder)")
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           # our compiled CPU kernels (gm.modules.native_norms, native_conv,
                           # native_attention) or MindSpore's
                           "cpu_norm_kernels": os.environ.get("SDXL_MS_NATIVE_NORMS", "1") != "0",
                           "cpu_conv_kernels": os.environ.get("SDXL_MS_NATIVE_CONV", "1") != "0",
                           "cpu_attention_kernels": os.environ.get("SDXL_MS_NATIVE_ATTENTION", "1") != "0"},
               "mindspore_matmul_peak_gflops": mindspore_matmul_peak(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for config in args.configs:
            for resolution in args.resolutions:
                row = {"config": config, "resolution": resolution, "steps": args.steps}
                cache_dir = work / f"compile_cache_{config}_{resolution}"
                for variant in args.variants:
                    print(f"[{config}@{resolution}] {variant} ...", file=sys.stderr, flush=True)
                    if variant == "reference":
                        row["reference"] = reference(config, resolution, args.steps)
                        continue
                    row[variant] = ours(config, resolution, args.steps, variant, cache_dir, work)
                    if variant == "graph":  # the same run on the now warm compile cache
                        row["graph_warm"] = ours(config, resolution, args.steps, "graph", cache_dir, work)
                if args.rounds > 1:
                    warm = functools.partial(ours, config, resolution, args.steps, "graph", cache_dir, work)
                    theirs = functools.partial(reference, config, resolution, args.steps)
                    _alternated_rounds(row, args.rounds, warm, theirs)
                _add_ratios(row, results["mindspore_matmul_peak_gflops"])
                results["runs"].append(row)
                print(json.dumps(_brief(row)), file=sys.stderr, flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


def _alternated_rounds(row: Dict, rounds: int, ours_warm: Callable[[], Dict], theirs: Callable[[], Dict]) -> None:
    """Round 1 is the row's own warm run and reference run; each further round runs ours (warm
    cache) and then the reference again. This machine's speed drifts by up to 1.5x within minutes,
    so a ratio of runs made back to back, repeated, says more than any single pair."""
    pairs = [(row["graph_warm"]["median_step_s"], row["reference"]["median_step_s"])]
    for i in range(2, rounds + 1):
        print(f"  round {i}/{rounds}", file=sys.stderr, flush=True)
        pairs.append((ours_warm()["median_step_s"], theirs()["median_step_s"]))
    row["rounds"] = [{"ours_warm_median_step_s": a, "reference_median_step_s": b, "ratio": a / b} for a, b in pairs]
    row["median_round_step_ratio"] = statistics.median(pair["ratio"] for pair in row["rounds"])


def _add_ratios(row: Dict, ms_peak: float) -> None:
    ref = row.get("reference")
    if not ref:
        return
    flops = ref["flops_per_step"]
    ref["gflops"] = flops / ref["median_step_s"] / 1e9
    ref["fraction_of_peak"] = ref["gflops"] / ref["matmul_peak_gflops"]
    row["ratios"] = {}
    for variant in ("graph", "graph_warm", "uncached", "pynative", "pynative_eager", "pynative_shared"):
        if variant not in row:
            continue
        run = row[variant]
        run["gflops"] = flops / run["median_step_s"] / 1e9
        run["fraction_of_peak"] = run["gflops"] / ms_peak
        row["ratios"][variant] = {key: run[key] / ref[key] for key in ("median_step_s", "first_step_s", "peak_rss_gb")}
    if "graph" in row and "uncached" in row:
        row["ratios"]["uncached_over_cached_step"] = row["uncached"]["median_step_s"] / row["graph"]["median_step_s"]


def _brief(row: Dict) -> Dict:
    keep = ("first_step_s", "median_step_s", "peak_rss_gb")
    return {k: ({m: round(v[m], 3) for m in keep if m in v} if isinstance(v, dict) and k != "ratios" else v)
            for k, v in row.items()}


if __name__ == "__main__":
    main()
