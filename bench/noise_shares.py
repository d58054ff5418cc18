"""Which noise decides the reward: each draw's share of a prompt's reward variance.

A sample's image is fixed by 11 draws: its x_T and one noise draw per DDIM step. The policy gradient's
term for step j, A * grad log pi_j, is multiplied by reward variance that every draw causes, not only
step j's. This script redraws one source at a time for each base sample (a fresh x_T, or a fresh noise
draw at step j with every other draw kept) and prints each source's total share of the within-prompt
reward variance (Sobol's total index, Jansen's estimator):

    S = mean((r - r')^2) / (2 * within-prompt variance of r)

S near 1: that draw alone decides the score; near 0: the score does not depend on it. The total
shares sum to 1 only when no draw's effect depends on another's. Also printed: x_T's first-order
share (x_T kept, every step's noise redrawn), the part of the variance a group that shares its x_T
(`sample.shared_start_noise`) no longer sees. Two samples
that share every draw but step j's differ in reward by what step j decides, so such a pair
estimates step j's policy-gradient term with about S_j of the noise of two independent samples.
Run on the demo's model (docs/demo.md, "Which noise decides the reward"):

    python bench/noise_shares.py models/toy-sd --prompts configs/prompts_toy_train.txt \
        --reward object_alignment --samples 512 --group-size 8 --window 4 --out runs/noise_shares

Costs about 8.5 sampling chains per base sample (the redraws at late steps are short): 4 min for 512 on one
thread.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import rewards
from rl.config import PromptConfig
from rl.ddim import DDIMSchedule, ddim_sigma
from rl.models import load_pipeline
from rl.plots import load_pyplot
from rl.prompts import load_prompts
from rl.sampling import decode_latents, denoise, encode, tokenize

REDRAW_OFFSET = 10**7  # the seeds of the redrawn sources: no base sample uses them


def redrawn_rewards(pipe, reward, schedule: DDIMSchedule, prompts: list[str], seeds: list[int], *,
                    guidance_scale: float, size: int, window: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(base rewards [B], source -> rewards [B] with that source redrawn and every other draw kept).

    Sources: x_T, each step's noise, every step's noise (x_T kept: what a group sharing its start,
    sample.shared_start_noise, still varies by) and, with `window`, steps 0..window-1 and the rest together.
    """
    cond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, prompts))
    uncond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, [""] * len(prompts)))
    other = [s + REDRAW_OFFSET for s in seeds]
    run = {"guidance_scale": guidance_scale, "eta": 1.0, "height": size, "width": size}
    num_steps = schedule.num_steps

    def score(latent: torch.Tensor) -> np.ndarray:
        return reward(decode_latents(pipe.vae, latent), prompts).scores.numpy()

    def steps_redrawn(first: int, stop: int) -> np.ndarray:
        # steps first..stop-1 with the other seeds' draws for them, every later step with the sample's own
        x = denoise(pipe, cond, uncond, other, schedule, start=latents[first], steps=range(first, stop), **run)[0][-1]
        return score(denoise(pipe, cond, uncond, seeds, schedule, start=x, steps=range(stop, num_steps), **run)[0][-1])

    latents, _ = denoise(pipe, cond, uncond, seeds, schedule, **run)
    redrawn = {"x_T": score(denoise(pipe, cond, uncond, seeds, schedule, start_seeds=other, **run)[0][-1])}
    redrawn.update({f"step {j}": steps_redrawn(j, j + 1) for j in range(num_steps)})
    if 0 < window < num_steps:
        redrawn[f"steps 0-{window - 1}"] = steps_redrawn(0, window)
        redrawn[f"steps {window}-{num_steps - 1}"] = steps_redrawn(window, num_steps)
    redrawn["every step"] = steps_redrawn(0, num_steps)
    return score(latents[-1]), redrawn


def total_shares(base: np.ndarray, redrawn: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Jansen's total index of each source with its standard error, and the within-prompt variance."""
    groups = base.reshape(-1, group_size)
    within = float(groups.var(axis=1, ddof=1).mean())
    halves = (base[None] - redrawn) ** 2 / 2
    return halves.mean(1) / within, halves.std(1, ddof=1) / np.sqrt(base.size) / within, within


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="local diffusers directory (e.g. models/toy-sd)")
    parser.add_argument("--prompts", default="configs/prompts_toy_train.txt")
    parser.add_argument("--reward", default="object_alignment")
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--samples", type=int, default=512, help="base samples (a multiple of --chunk)")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8, help="consecutive samples per prompt")
    parser.add_argument("--first-seed", type=int, default=0, help="base samples' seeds FIRST_SEED, FIRST_SEED+1, ...")
    parser.add_argument("--window", type=int, default=0,
                        help="also redraw steps 0..WINDOW-1 together, and the later steps together (4: the demo's trained steps)")
    parser.add_argument("--out", default="runs/noise_shares")
    args = parser.parse_args(argv)
    if args.samples % args.chunk or args.chunk % args.group_size:
        parser.error("--samples must be a multiple of --chunk, and --chunk of --group-size")

    pipe = load_pipeline(args.model, device="cpu")
    reward = rewards.build_reward(args.reward)
    prompt_set = load_prompts(PromptConfig(file=args.prompts))
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, args.num_steps)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = [prompt_set[(i // args.group_size) % len(prompt_set)] for i in range(args.samples)]
    seeds = list(range(args.first_seed, args.first_seed + args.samples))
    start = time.time()
    base, redrawn = [], []
    for c in range(0, args.samples, args.chunk):
        b, r = redrawn_rewards(pipe, reward, schedule, prompts[c : c + args.chunk], seeds[c : c + args.chunk],
                               guidance_scale=args.guidance_scale, size=size, window=args.window)
        base.append(b)
        redrawn.append(r)
        print(f"\r{c + args.chunk}/{args.samples} base samples  [{time.time() - start:.0f}s]", end="", flush=True)
    names = list(redrawn[0])
    base = np.concatenate(base)
    redrawn = np.stack([np.concatenate([r[n] for r in redrawn]) for n in names])  # [sources, samples]
    shares, errors, within = total_shares(base, redrawn, args.group_size)
    changed = [float(c) for c in (redrawn != base).mean(1)]
    single = [k for k, n in enumerate(names) if n == "x_T" or n.startswith("step ")]
    # x_T's first-order share: its effect averaged over the steps' noise (Jansen: 1 - every step's total share)
    x_T_first = 1 - shares[names.index("every step")]

    sigma = ddim_sigma(schedule, schedule.timesteps, eta=1.0)
    print(f"\n\nreward {base.mean():.3f}, within-prompt variance {within:.4f} ({args.samples} base samples, "
          f"groups of {args.group_size}, seeds from {args.first_seed})")
    print("redrawn       sigma_t   total share of the variance   score changed")
    for k, name in enumerate(names):
        sig = f"{float(sigma[int(name[5:])]):.3f}" if name.startswith("step ") else "-"
        print(f"{name:<13} {sig:>7}   {shares[k]:.3f} +- {errors[k]:.3f}{'':>15}{changed[k]:.3f}")
    print(f"sum of the single draws' total shares {shares[single].sum():.2f} (1 if no draw's effect depended on "
          f"another's); x_T's first-order share {x_T_first:.3f} +- {errors[names.index('every step')]:.3f}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_shares.json").write_text(json.dumps({
        "model": args.model, "reward": args.reward, "samples": args.samples, "group_size": args.group_size,
        "first_seed": args.first_seed, "within_prompt_variance": within, "reward_mean": float(base.mean()),
        "x_T_first_order_share": float(x_T_first),
        "sources": [{"redrawn": n, "total_share": float(s), "standard_error": float(e), "score_changed": f}
                    for n, s, e, f in zip(names, shares, errors, changed)],
    }, indent=1))

    plt = load_pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.bar(names, shares, yerr=errors, color=["tab:blue" if k in single else "tab:gray" for k in range(len(names))])
    ax.axhline(1, color="black", lw=0.5, ls="--")
    ax.set(ylabel="total share of the reward variance", ylim=(0, max(1.0, float(shares.max())) * 1.1),
           title=f"{Path(args.model).name}: which draw decides {args.reward} ({args.samples} samples)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "noise_shares.png", dpi=100)
    print(f"\n{out / 'noise_shares.json'}, {out / 'noise_shares.png'}")


if __name__ == "__main__":
    main()
