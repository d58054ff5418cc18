"""How well does the PPO (score-function) gradient point where the reward goes up, step by step?

TexForce's update is the policy gradient sum_t A * grad log pi(x_{t-1} | x_t, c). Its expected
value equals the gradient of the mean reward, which for a differentiable reward can also be
computed directly by backpropagating through the sampling chain (the reparameterised, DRaFT
gradient). This script estimates both for the text-encoder LoRA at its initial point, splits the
policy gradient by sampling step, and prints

- each step's sigma_t, its gain |d mean / d eps_hat| / sigma_t (the size of its score noise),
  the norm of its policy-gradient term and that term's cosine to the direct gradient;
- the cosine of the summed policy gradient to the direct gradient, for 16/64/256 samples, when
  every step is trained, when the steps with sigma_t < --min-sigma are left out (train.min_sigma)
  and when the steps with gain > --max-step-gain are left out (train.max_step_gain);
- the fraction of LoRA weights whose gradient sign agrees (what Adam's first steps follow);
- each estimator against its own noise, which needs no reference (the direct gradient is noisy
  too): the number of samples at which its signal equals its noise, and its split-half cosine.
  Summed over the high-noise first steps only (--early-sigma, train.min_sigma) and over all.

and saves a PNG of the per-step figures. `--shared-start` draws the policy-gradient samples as
`sample.shared_start_noise` does (one x_T per group), `--first-seed` another set of noise seeds: at 1024
samples the "samples for SNR 1" of the demo's steps came out 9953 and 9663 on two draws with independent
starts, 2886 and 12798 with shared ones, each group normalised alone (5081 and none measurable when a prompt's
groups were pooled, before d041016; docs/demo.md, "Less noise in each step's gradient").
Run on the demo's model (docs/demo.md, "Why `min_sigma`"):

    python bench/gradient_snr.py models/toy-sd --prompts configs/prompts_toy_train.txt \
        --reward object_alignment --samples 1024 --direct-samples 512 --group-size 8

That costs 1024 x 10 U-Net forward/backward passes for the policy gradient and 512 sampling chains
backpropagated for the direct one (about 5 min on 2 cores with --direct-samples 256).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import rewards
from rl.advantages import compute_advantages, group_keys
from rl.config import LoraSettings, PromptConfig
from rl.ddim import DDIMSchedule, ddim_sigma, ddim_step_gain
from rl.learner import trainable_steps
from rl.lora import add_lora
from rl.models import load_pipeline
from rl.prompts import group_start_seeds, load_prompts
from rl.sampling import (
    Trajectories,
    decode_latents,
    denoise,
    encode,
    sample_trajectories,
    step_distribution,
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


def summary_table(per_chunk_step: torch.Tensor, g_direct: torch.Tensor, rules: dict[str, torch.Tensor],
                  chunk: int) -> str:
    """Cosine / sign agreement to `g_direct` of the policy gradient summed over each rule's steps,
    for 16, 64, 256 ... samples (averaged over disjoint groups of chunks).

    per_chunk_step: [chunks, T, P], one chunk's gradient per step; rules: name -> step indices.
    """
    num_chunks, num_steps, _ = per_chunk_step.shape
    width = max(22, *(len(name) + 2 for name in rules))
    left_out = [", ".join(str(j) for j in range(num_steps) if j not in set(steps.tolist())) or "-"
                for steps in rules.values()]
    lines = ["cos / sign agreement to the direct gradient, summed over the steps each rule trains",
             "samples    " + "".join(f"{name:<{width}}" for name in rules),
             "left out   " + "".join(f"{steps:<{width}}" for steps in left_out)]
    m = 1
    while m <= num_chunks:
        cells = []
        for steps in rules.values():
            sums = [per_chunk_step[i * m : (i + 1) * m][:, steps].sum((0, 1)) for i in range(num_chunks // m)]
            cells.append(f"{np.mean([cosine(s, g_direct) for s in sums]):+.2f} / "
                         f"{np.mean([sign_agreement(s, g_direct) for s in sums]):.2f}")
        lines.append(f"{m * chunk:>7}    " + "".join(f"{cell:<{width}}" for cell in cells))
        m *= 4
    return "\n".join(line.rstrip() for line in lines)


def samples_for_unit_snr(chunk_grads: torch.Tensor, chunk: int) -> tuple[float, float]:
    """(samples at which the estimator's signal equals its noise, split-half cosine of the whole set).

    chunk_grads: [K, P], one gradient per chunk of `chunk` samples, independent draws of the
    same estimator. With mean g and per-chunk noise trace tr(S), |g|^2 is estimated without bias
    as |mean|^2 - tr(S) / K; an n-sample average then has signal-to-noise |g|^2 / (tr(S) chunk / n),
    which is 1 at n = chunk tr(S) / |g|^2 (inf: no signal measurable at this K). It needs no
    reference gradient, so it measures the direct gradient by the same rule.
    """
    k = len(chunk_grads)
    mean = chunk_grads.mean(0)
    noise = float(((chunk_grads - mean) ** 2).sum(1).mean()) * k / (k - 1)
    signal = float(mean @ mean) - noise / k
    half = k // 2
    split = cosine(chunk_grads[:half].sum(0), chunk_grads[half : 2 * half].sum(0))
    return (chunk * noise / signal if signal > 0 else float("inf")), split


def snr_table(estimators: dict[str, torch.Tensor], chunk: int) -> str:
    """One row per estimator (name -> [K, P] chunk gradients): samples for signal = noise, split-half cosine."""
    width = max(len(name) for name in estimators) + 2
    lines = [f"{'estimator':<{width}}samples for SNR 1   split-half cosine (samples per half)"]
    for name, grads in estimators.items():
        n_unit, split = samples_for_unit_snr(grads, chunk)
        lines.append(f"{name:<{width}}{n_unit:>16.0f}   {split:+.2f} ({len(grads) // 2 * chunk})")
    return "\n".join(lines)


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
    parser.add_argument("--min-sigma", type=float, default=0.05, help="today's rule: train.min_sigma")
    parser.add_argument("--max-step-gain", type=float, default=2.0, help="the gain rule: train.max_step_gain")
    parser.add_argument("--early-sigma", type=float, default=0.55,
                        help="the early window: train.min_sigma that keeps only the high-noise first steps")
    parser.add_argument("--group-size", type=int, default=1,
                        help="consecutive samples per prompt (advantages are normalised within each group)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="the policy-gradient samples' noise seeds are FIRST_SEED, FIRST_SEED+1, ... (another draw)")
    parser.add_argument("--shared-start", action="store_true",
                        help="each group's samples start from the same x_T (sample.shared_start_noise)")
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
    gain = ddim_step_gain(schedule, schedule.timesteps, eta=1.0)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    start = time.time()

    # 1. the direct gradient of the mean reward, backpropagated through the sampling chain
    direct = []
    for c in range(0, args.direct_samples, args.chunk):
        prompts = [prompts_all[((c + i) // args.group_size) % len(prompts_all)] for i in range(args.chunk)]
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
    prompts = [prompts_all[(i // args.group_size) % len(prompts_all)] for i in range(n)]
    seeds = list(range(args.first_seed, args.first_seed + n))
    start_seeds = group_start_seeds(seeds, args.group_size) if args.shared_start else seeds
    parts = [sample_trajectories(pipe, prompts[i : i + args.chunk], seeds[i : i + args.chunk],
                                 start_seeds=start_seeds[i : i + args.chunk],
                                 num_steps=args.num_steps, guidance_scale=args.guidance_scale, eta=1.0)
             for i in range(0, n, args.chunk)]
    trajectories = Trajectories.cat(parts)
    scores = reward(trajectories.images_float(), trajectories.prompts).scores.numpy()
    groups = group_keys(trajectories.prompts, range(n), args.group_size, shared_start=args.shared_start)
    advantages = torch.from_numpy(compute_advantages(trajectories.prompts, scores, mode="group", adv_clip_max=5.0,
                                                       tracker=None, groups=groups))
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
    print("step  t     sigma_t  gain    |grad|   cos(direct)")
    for j in range(args.num_steps):
        print(f"{j:>4}  {int(schedule.timesteps[j]):>4}  {sigma[j]:.4f}   {gain[j]:5.2f}   {step_norm[j]:.4f}   "
              f"{step_cos[j]:+.2f}")

    # 4. summed over the steps each rule trains, for growing sample counts
    rules = {"all steps": torch.arange(args.num_steps),
             f"sigma_t >= {args.min_sigma:g}": trainable_steps(schedule, 1.0, args.min_sigma),
             f"gain <= {args.max_step_gain:g}": trainable_steps(schedule, 1.0, 0.0, max_step_gain=args.max_step_gain),
             f"sigma_t >= {args.early_sigma:g}": trainable_steps(schedule, 1.0, args.early_sigma)}
    print()
    print(summary_table(per_chunk_step, g_direct, rules, args.chunk))

    # 5. each estimator against its own noise: no reference needed (the direct gradient is noisy too)
    estimators = {"direct (backprop through the chain)": direct}
    for name, steps in rules.items():
        estimators[f"policy gradient, {name} (steps {steps.min().item()}-{steps.max().item()})"] = per_chunk_step[:, steps].sum(1)
    print()
    print(snr_table(estimators, args.chunk))

    # 6. plot: red, the steps the gain rule leaves out
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gain_kept = set(rules[f"gain <= {args.max_step_gain:g}"].tolist())
    colors = ["tab:blue" if j in gain_kept else "tab:red" for j in range(args.num_steps)]
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(12, 3.2))
    ax0.bar(range(args.num_steps), gain.numpy(), color=colors)
    ax0.axhline(args.max_step_gain, color="black", lw=0.5, ls="--")
    ax0.set(xlabel="sampling step", ylabel="|d mean / d eps_hat| / sigma_t", title="per-step gain (score-noise size)")
    ax1.bar(range(args.num_steps), step_norm, color=colors)
    ax1.set(xlabel="sampling step", ylabel="|policy-gradient term|", title="per-step gradient norm")
    ax2.bar(range(args.num_steps), step_cos, color=colors)
    ax2.axhline(0, color="black", lw=0.5)
    ax2.set(xlabel="sampling step", ylabel="cosine to direct gradient", title="per-step direction")
    fig.suptitle(f"{Path(args.model).name}, {args.num_steps} steps, {n} samples; red: gain > {args.max_step_gain:g}")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
