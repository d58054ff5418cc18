"""How well does the PPO (score-function) gradient point where the reward goes up, step by step?

TexForce's update is the policy gradient sum_t A * grad log pi(x_{t-1} | x_t, c). Its expected
value equals the gradient of the mean reward, which for a differentiable reward can also be
computed directly by backpropagating through the sampling chain (the reparameterised, DRaFT
gradient). This script estimates both for the text-encoder LoRA at its initial point, splits the
policy gradient by sampling step, and prints

- each step's share: the norm of its policy-gradient term, its cosine to the direct gradient;
- the cosine of the summed policy gradient to the direct gradient, for N samples, when every
  step is trained and when the steps with sigma_t < --min-sigma are left out;
- the fraction of LoRA weights whose gradient sign agrees (what Adam's first steps follow).

and saves a PNG of the per-step figures. Run on the demo's model (README, "Why min_sigma"):

    python bench/gradient_snr.py runs/tiny-sd --prompts configs/prompts_magenta.txt
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import rewards
from rl.advantages import compute_advantages
from rl.config import LoraSettings, PromptConfig
from rl.ddim import DDIMSchedule, ddim_sigma
from rl.lora import add_lora
from rl.models import load_pipeline
from rl.prompts import load_prompts
from rl.sampling import (
    Trajectories,
    decode_latents,
    denoise,
    encode,
    sample_trajectories,
    tokenize,
)


def flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters' .grad as one vector; resets .grad."""
    grad = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in params])
    for p in params:
        p.grad = None
    return grad


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm() + 1e-30))


def sign_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    nonzero = b != 0
    return float((torch.sign(a[nonzero]) == torch.sign(b[nonzero])).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="local diffusers directory (e.g. runs/tiny-sd)")
    parser.add_argument("--prompts", default="configs/prompts_magenta.txt")
    parser.add_argument("--reward", default="color_alignment", help="a differentiable reward")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=256, help="policy-gradient samples (a multiple of --chunk)")
    parser.add_argument("--direct-samples", type=int, default=128, help="samples for the direct gradient")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--min-sigma", type=float, default=0.05)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="gradient_snr.png")
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device="cpu")
    params = add_lora(pipe, LoraSettings(rank=args.rank, alpha=args.rank))
    # LoRA B starts at zero, so the gradient reaches only B: the same for both estimators
    reward = rewards.build_reward(args.reward)
    prompts_all = load_prompts(PromptConfig(file=args.prompts))
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, args.num_steps)
    sigma = ddim_sigma(schedule, schedule.timesteps, eta=1.0)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    start = time.time()

    # 1. the direct gradient of the mean reward, backpropagated through the sampling chain
    direct = []
    for c in range(0, args.direct_samples, args.chunk):
        prompts = [prompts_all[i % len(prompts_all)] for i in range(args.chunk)]
        seeds = [10**6 + c + i for i in range(args.chunk)]
        cond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, prompts))
        uncond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, [""] * len(prompts)))
        latents, _ = denoise(pipe, cond, uncond, seeds, schedule, guidance_scale=args.guidance_scale, eta=1.0,
                             height=size, width=size)
        reward(decode_latents(pipe.vae, latents[-1]), prompts).scores.sum().backward()
        direct.append(flat_grad(params))
    direct = torch.stack(direct)
    g_direct = direct.sum(0)
    half = len(direct) // 2
    print(f"direct gradient from {args.direct_samples} samples; split-half cosine "
          f"{cosine(direct[:half].sum(0), direct[half:].sum(0)):.2f} (its own noise)  [{time.time() - start:.0f}s]")

    # 2. the policy gradient, per chunk of samples and per step, at ratio 1 (the first PPO step)
    n = args.samples
    prompts = [prompts_all[i % len(prompts_all)] for i in range(n)]
    parts = [sample_trajectories(pipe, prompts[i : i + args.chunk], list(range(i, i + args.chunk)),
                                 num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=1.0)
             for i in range(0, n, args.chunk)]
    trajectories = Trajectories.cat(parts)
    scores = reward(trajectories.images_float(), trajectories.prompts).scores.numpy()
    advantages = torch.from_numpy(compute_advantages(trajectories.prompts, scores, mode="group", adv_clip_max=5.0,
                                                       tracker=None))
    per_chunk_step = torch.zeros(n // args.chunk, args.num_steps, g_direct.numel())
    for c, batch in enumerate(parts):
        rows = slice(c * args.chunk, (c + 1) * args.chunk)
        for j in range(args.num_steps):
            cond = encode(pipe.text_encoder, batch.prompt_ids)
            uncond = encode(pipe.text_encoder, batch.negative_ids)
            log_prob = step_distribution(pipe.unet, schedule, batch.latents[:, j], batch.timesteps[:, j],
                                     batch.latents[:, j + 1], cond, uncond, guidance_scale=args.guidance_scale, eta=1.0)[0]
            (advantages[rows].float() * log_prob).sum().backward()
            per_chunk_step[c, j] = flat_grad(params)
    print(f"policy gradient from {n} samples, reward {scores.mean():.3f} +- {scores.std():.3f}  "
          f"[{time.time() - start:.0f}s]\n")

    # 3. per step
    step_norm = per_chunk_step.sum(0).norm(dim=-1).numpy()
    step_cos = np.array([cosine(per_chunk_step[:, j].sum(0), g_direct) for j in range(args.num_steps)])
    print("step  t     sigma_t  |grad|   cos(direct)")
    for j in range(args.num_steps):
        print(f"{j:>4}  {int(schedule.timesteps[j]):>4}  {sigma[j]:.4f}   {step_norm[j]:.4f}   {step_cos[j]:+.2f}")

    # 4. summed over steps, for growing sample counts
    kept = (sigma >= args.min_sigma).numpy()
    print(f"\nsamples   cos / sign agreement, all steps   cos / sign agreement, sigma_t >= {args.min_sigma}")
    chunks = n // args.chunk
    for m in [2**k for k in range(int(np.log2(chunks)) + 1)]:
        rows = []
        for steps in (np.ones_like(kept), kept):
            sums = [per_chunk_step[i * m : (i + 1) * m][:, steps].sum((0, 1)) for i in range(chunks // m)]
            rows.append(f"{np.mean([cosine(s, g_direct) for s in sums]):+.2f} / "
                        f"{np.mean([sign_agreement(s, g_direct) for s in sums]):.2f}")
        print(f"{m * args.chunk:>7}   {rows[0]:<33}  {rows[1]}")

    # 5. plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.bar(range(args.num_steps), step_norm, color=["tab:blue" if k else "tab:red" for k in kept])
    ax1.set(xlabel="sampling step", ylabel="|policy-gradient term|", title="per-step gradient norm")
    ax2.bar(range(args.num_steps), step_cos, color=["tab:blue" if k else "tab:red" for k in kept])
    ax2.axhline(0, color="black", lw=0.5)
    ax2.set(xlabel="sampling step", ylabel="cosine to direct gradient", title="per-step direction")
    fig.suptitle(f"{Path(args.model).name}, {args.num_steps} steps, {n} samples; red: sigma_t < {args.min_sigma}")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
