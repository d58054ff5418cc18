"""Peak memory and time of one gradient-learner update against the truncation K.

For each step count T and K in {1, 2, 5, all} (DRaFT-K; K = all is DRaFT), a fresh process
loads the model, draws one sample without grad (so the baseline peak holds the model and a
sampling pass), then runs `GradientLearner.minibatch_backward` + `optimizer_step` twice. It
reports what autograd holds for the backward pass (exact: the tensors it saves), the extra peak
memory of the update over that baseline (host RSS from getrusage; CUDA's max_memory_allocated on
a GPU) and the time of the second update. Host RSS also counts what glibc's allocator keeps
after the recomputed activations are freed, so it grows with K faster than what is held. With checkpointing (each
U-Net call and the VAE decode recomputed in backward) the extra memory should grow with K by
the stored latents only (B x 4 x h x w floats per step, a few hundred kB here); without it
(`--no-checkpointing` rows) by one U-Net's activations per step.

    texforce make-tiny runs/tiny-sd
    python bench/gradient_memory.py runs/tiny-sd --size 256 --steps 10 20 --batch 1

At --size 256 the tiny VAE gives 4x64x64 latents, SD 1.5's latent size at 512x512.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from rl.models import DTYPES


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB


def saved_for_backward(learner, prompts: list[str], seeds: list[int], window) -> int:
    """Bytes autograd keeps for the backward pass of one loss (distinct tensors it saves), exact on
    any device: with checkpointing, the checkpointed calls' inputs and the small DDIM-step tensors."""
    saved: dict[tuple, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[(tensor.data_ptr(), tuple(tensor.shape))] = tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        learner.loss(prompts, seeds, window)
    return sum(saved.values())


def measure(model: str, *, steps: int, k: int, size: int, batch: int, checkpointing: bool, threads: int,
            dtype: str = "float32") -> dict:
    """One configuration in this process: baseline peak, update peak, seconds per update."""
    torch.set_num_threads(threads)
    from rl.config import load_config
    from rl.gradient import GradientLearner, Window
    from rl.models import load_pipeline

    config = load_config(None, [
        f"model.pretrained={model}", "model.device=auto", f"model.dtype={dtype}", f"sample.num_steps={steps}",
        f"sample.height={size}", f"sample.width={size}", "train.algorithm=draft_k", f"gradient.truncation_k={k}",
        "lora.policy=unet", "lora.rank=8", "lora.alpha=8", f"gradient.checkpointing={str(checkpointing).lower()}",
    ])
    learner = GradientLearner(load_pipeline(model, dtype=dtype, device="auto"), config)
    device = learner.pipe.unet.device
    prompts, seeds = ["a red ball"] * batch, list(range(batch))
    with torch.no_grad():
        learner.loss(prompts, seeds, Window(steps, steps))  # a sampling pass, no grad
    held = saved_for_backward(learner, prompts, seeds, Window(steps - k, steps))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    baseline = _peak_bytes(device)
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        learner.minibatch_backward(prompts, seeds, Window(steps - k, steps))
        learner.optimizer_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return {"steps": steps, "k": k, "checkpointing": checkpointing, "device": device.type,
            "baseline_mib": baseline / 2**20, "held_mib": held / 2**20, "extra_mib": (_peak_bytes(device) - baseline) / 2**20,
            "seconds": seconds[-1],
            "latents_kib": k * batch * 4 * (size // learner.pipe.vae_scale_factor) ** 2 * 4 / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a local diffusers pipeline directory")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20], help="sampling step counts T")
    parser.add_argument("--ks", default="1,2,5,all", help="truncations K (comma-separated; 'all' = T)")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--batch", type=int, default=1, help="samples per update")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per measurement (CPU)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="the frozen weights' dtype (model.dtype)")
    parser.add_argument("--no-checkpointing", action="store_true", help="also measure K=1 and K=all without checkpointing")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one JSON-encoded configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, **json.loads(args.one))))
        return
    jobs = []
    for steps in args.steps:
        for k in args.ks.split(","):
            jobs.append({"steps": steps, "k": steps if k == "all" else int(k), "checkpointing": True})
        if args.no_checkpointing:
            jobs += [{"steps": steps, "k": k, "checkpointing": False} for k in (1, steps)]
    print("| T | K | checkpointing | held for backward (MiB) | extra peak over sampling (MiB) | "
          "latents of the K steps (KiB) | s / update | device |")
    print("|---|---|---|---|---|---|---|---|")
    for job in jobs:  # a fresh process per row: peak RSS cannot be reset within one
        job |= {"size": args.size, "batch": args.batch, "threads": args.threads, "dtype": args.dtype}
        out = subprocess.run([sys.executable, __file__, args.model, "--one", json.dumps(job)],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:  # out of memory is a result too: the row says so and the table goes on
            error = (out.stderr.strip().splitlines() or ["no output"])[-1][:120]
            print(f"| {job['steps']} | {job['k']} | {'yes' if job['checkpointing'] else 'no'} | failed: {error} "
                  "| | | | |", flush=True)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {row['steps']} | {row['k']} | {'yes' if row['checkpointing'] else 'no'} | {row['held_mib']:.1f} | "
              f"{row['extra_mib']:.1f} | "
              f"{row['latents_kib']:.0f} | {row['seconds']:.2f} | {row['device']} |", flush=True)


if __name__ == "__main__":
    main()
