"""Variance of the LoRA gradient per sample: DRaFT-LV against DRaFT-1, at equal samples.

Both estimators get the same N samples (prompt i, seed i): DRaFT-1 backpropagates the reward
of x_0 through the last sampling step; DRaFT-LV draws x_0 without grad and backpropagates the
summed rewards of `--copies` re-noised one-step copies of it. For each, from the N per-sample
gradients g_i (U-Net LoRA, flattened) it prints the mean gradient's norm, the variance
E||g_i - mean||^2, the relative variance (variance / ||mean||^2: how many samples the estimate
needs before its noise falls below its signal) and the seconds per sample. The U-Net LoRA starts
at the model (B = 0), so this is the gradient that starts training.

    texforce make-tiny runs/tiny-sd --pretrain-steps 750
    python bench/gradient_variance.py --model runs/tiny-sd --samples 32 --steps 20
"""
from __future__ import annotations

import argparse
import time

import torch

from rl.config import PromptConfig, load_config
from rl.gradient import GradientLearner, draw_window
from rl.models import load_pipeline
from rl.prompts import BUILTIN, load_prompts


def per_sample_gradients(learner: GradientLearner, prompts: list[str], seeds: list[int]) -> tuple[torch.Tensor, float]:
    """[N, P] gradients of -reward, one sample each, and the seconds per sample."""
    grads = []
    start = time.perf_counter()
    for prompt, seed in zip(prompts, seeds):
        window = draw_window(learner.algorithm, learner.config, learner.generator)
        learner.minibatch_backward([prompt], [seed], window)
        grads.append(torch.cat([p.grad.flatten() for p in learner.params]))
        learner.optimizer.zero_grad(set_to_none=True)
    return torch.stack(grads), (time.perf_counter() - start) / len(seeds)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a local diffusers pipeline directory")
    parser.add_argument("--reward", default="color_alignment", help="a differentiable reward spec")
    parser.add_argument("--prompts", help="prompt file (default: the builtin colour prompts)")
    parser.add_argument("--samples", type=int, default=32, help="samples N per estimator")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--copies", type=int, default=2, help="DRaFT-LV's re-noised copies n")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance weight")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompt_set = load_prompts(PromptConfig(file=args.prompts)) if args.prompts else BUILTIN["colors"]
    prompts = [prompt_set[i % len(prompt_set)] for i in range(args.samples)]
    seeds = [args.seed * 100_003 + i for i in range(args.samples)]
    rows = []
    print(f"{args.samples} samples, {args.steps} steps, reward {args.reward}, model {args.model}")
    print("| estimator | mean gradient norm | variance E||g - mean||^2 | relative variance | s / sample |")
    print("|---|---|---|---|---|")
    for name, algorithm in (("DRaFT-1", "draft_k"), (f"DRaFT-LV (n={args.copies})", "draft_lv")):
        config = load_config(None, [
            f"model.pretrained={args.model}", "model.device=auto", f"sample.num_steps={args.steps}",
            f"sample.guidance_scale={args.guidance}", f"train.algorithm={algorithm}", "gradient.truncation_k=1",
            f"gradient.lv_copies={args.copies}", "lora.policy=unet", "lora.rank=8", "lora.alpha=8",
            f"reward.spec={args.reward}", f"seed={args.seed}",
        ])
        learner = GradientLearner(load_pipeline(args.model, device="auto"), config)
        grads, seconds = per_sample_gradients(learner, prompts, seeds)
        mean = grads.mean(0)
        variance = float(((grads - mean) ** 2).sum(1).mean())
        row = {"estimator": name, "mean_norm": float(mean.norm()), "variance": variance,
               "relative_variance": variance / float(mean.norm() ** 2 + 1e-30), "seconds_per_sample": seconds}
        rows.append(row)
        print(f"| {name} | {row['mean_norm']:.3e} | {row['variance']:.3e} | {row['relative_variance']:.2f} | "
              f"{seconds:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
