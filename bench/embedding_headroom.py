"""Can the text conditioning move an attribute at all? An upper bound for any text-encoder method.

A text-encoder LoRA can only change what the U-Net cross-attends to. This script frees that input
entirely: one offset per prompt on the prompt's embedding (`[P, L, D]`, no encoder in the way),
trained by the gradient of a differentiable reward through the whole DDIM chain (eta 0, as the
gradient learners train), and scores the exact reward before and after at eta 1 (as the demo
evaluates) on seeds the training never drew. If the attribute does not move here, no text-encoder
method will move it on this model; if it does, a method that does not is limited by its learner
(signal, step size, regulariser), not by the U-Net.

    python bench/embedding_headroom.py models/toy-sd --reward object_shape_soft   # 7 min on one idle core
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rewards  # noqa: E402
from rl.ddim import DDIMSchedule  # noqa: E402
from rl.gradient import _decode  # noqa: E402  (checkpointed decode, as the gradient learners)
from rl.models import load_pipeline  # noqa: E402
from rl.prompts import read_prompt_file  # noqa: E402
from rl.sampling import decode_latents, denoise, encode, tokenize  # noqa: E402


def score(pipe, schedule, cond, uncond, prompts, reward, *, seeds_per_prompt: int, guidance_scale: float,
          size: int) -> dict:
    """Mean exact reward and its parts over `seeds_per_prompt` fresh seeds per prompt, at eta 1."""
    rows = [i for i in range(len(prompts)) for _ in range(seeds_per_prompt)]
    seeds = [10_000 + k for k in range(len(rows))]  # never drawn in training (those are random 31-bit)
    with torch.no_grad():
        latents = denoise(pipe, cond[rows], uncond.expand(len(rows), -1, -1), seeds, schedule, eta=1.0,
                          guidance_scale=guidance_scale, height=size, width=size)[0][-1]
        output = reward(decode_latents(pipe.vae, latents), [prompts[i] for i in rows])
    return {"reward": output.scores.float().mean().item(), **{k: v.float().mean().item() for k, v in output.parts.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="local diffusers directory (e.g. models/toy-sd)")
    parser.add_argument("--prompts", default=str(ROOT / "configs" / "prompts_toy_train.txt"))
    parser.add_argument("--num-prompts", type=int, default=8, help="drawn from --prompts with --seed")
    parser.add_argument("--reward", default="object_shape_soft", help="the differentiable reward trained")
    parser.add_argument("--evaluation-reward", default="object_alignment", help="the exact reward scored")
    parser.add_argument("--steps", type=int, default=40, help="Adam steps on the offsets")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="per Adam step")
    parser.add_argument("--eval-seeds", type=int, default=24, help="fresh seeds per prompt, before and after")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model, device="cpu")  # frozen: only the offsets train
    rng = random.Random(args.seed)
    prompts = rng.sample(read_prompt_file(args.prompts, option="--prompts"), args.num_prompts)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, args.num_steps)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        cond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, prompts))
        uncond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, [""]))
    offset = torch.zeros_like(cond, requires_grad=True)
    trained = rewards.build_reward(args.reward, device="cpu")
    exact = rewards.build_reward(args.evaluation_reward, device="cpu")
    optimizer = torch.optim.Adam([offset], lr=args.lr)
    evaluate = {"seeds_per_prompt": args.eval_seeds, "guidance_scale": args.guidance_scale, "size": size}
    print(f"prompts: {prompts}", flush=True)
    before = score(pipe, schedule, cond, uncond, prompts, exact, **evaluate)

    start, curve = time.time(), []
    for step in range(args.steps):
        rows = [i for i in range(len(prompts)) for _ in range(args.samples_per_prompt)]
        seeds = [rng.randrange(2**31) for _ in rows]
        latents = denoise(pipe, (cond + offset)[rows], uncond.expand(len(rows), -1, -1), seeds, schedule, eta=0.0,
                          guidance_scale=args.guidance_scale, height=size, width=size, checkpoint=True)[0][-1]
        reward = trained(_decode(pipe.vae, latents, True), [prompts[i] for i in rows]).scores
        optimizer.zero_grad()
        (-reward.mean()).backward()
        optimizer.step()
        curve.append(reward.mean().item())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step}: {args.reward} {curve[-1]:.3f} [{time.time() - start:.0f}s]", flush=True)

    after = score(pipe, schedule, cond + offset.detach(), uncond, prompts, exact, **evaluate)
    images = len(prompts) * args.eval_seeds
    print(f"\n{args.evaluation_reward} at eta 1 on {images} images (fresh seeds), before -> after "
          f"{args.steps} steps on a free per-prompt offset (|offset| {offset.norm():.2f}, |embedding| {cond.norm():.2f}):")
    for key in before:
        print(f"  {key:32s} {before[key]:.3f} -> {after[key]:.3f} ({after[key] - before[key]:+.3f})")
    return {"prompts": prompts, "before": before, "after": after, "train_curve": curve, "offset_norm": offset.norm().item()}


if __name__ == "__main__":
    main()
