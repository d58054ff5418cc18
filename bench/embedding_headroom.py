"""Can the text conditioning move an attribute at all? An upper bound for any text-encoder method.

A text-encoder LoRA can only change what the U-Net cross-attends to. This script frees that input
entirely: one offset per prompt on the prompt's embedding (`[P, L, D]`, no encoder in the way),
trained by the gradient of a differentiable reward through the whole DDIM chain (eta 0, as the
gradient learners train), and scores the exact reward before and after at eta 1 (as the demo
evaluates) on seeds the training never drew. If the attribute does not move here, no text-encoder
method will move it on this model; if it does, a method that does not is limited by its learner
(signal, step size, regulariser), not by the U-Net.

`--parameterisation lora` puts a text-encoder LoRA (the demo's rank 8, shared by every prompt,
the negative prompt encoded through it as the learners do) in the offsets' place, trained by the
same gradient on the same samples, and also scores the held-out prompts: between the two the cost
of sharing one set of weights across prompts, and how much of the gain reaches prompts never trained.

    python bench/embedding_headroom.py models/toy-sd --reward object_shape_soft   # 7 min on one idle core
    python bench/embedding_headroom.py models/toy-sd --parameterisation lora
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
from rl.config import LoraSettings  # noqa: E402
from rl.ddim import DDIMSchedule  # noqa: E402
from rl.gradient import _decode  # noqa: E402  (checkpointed decode, as the gradient learners)
from rl.lora import add_lora  # noqa: E402
from rl.models import load_pipeline  # noqa: E402
from rl.prompts import read_prompt_file  # noqa: E402
from rl.sampling import decode_latents, denoise, encode, tokenize  # noqa: E402


def score(pipe, schedule, cond, uncond, prompts, reward, *, seeds_per_prompt: int, guidance_scale: float,
          size: int) -> dict[str, torch.Tensor]:
    """Per-image exact reward and its parts over `seeds_per_prompt` fresh seeds per prompt, at eta 1."""
    rows = [i for i in range(len(prompts)) for _ in range(seeds_per_prompt)]
    seeds = [10_000 + k for k in range(len(rows))]  # never drawn in training (those are random 31-bit)
    with torch.no_grad():
        latents = denoise(pipe, cond[rows], uncond.expand(len(rows), -1, -1), seeds, schedule, eta=1.0,
                          guidance_scale=guidance_scale, height=size, width=size)[0][-1]
        output = reward(decode_latents(pipe.vae, latents), [prompts[i] for i in rows])
    return {"reward": output.scores.float(), **{k: v.float() for k, v in output.parts.items()}}


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
    parser.add_argument("--parameterisation", choices=["offset", "lora"], default="offset",
                        help="a free offset per prompt, or one text-encoder LoRA for all prompts")
    parser.add_argument("--lora-rank", type=int, default=8, help="with --parameterisation lora (alpha = rank)")
    parser.add_argument("--held-out-prompts", default=str(ROOT / "configs" / "prompts_toy_held_out.txt"),
                        help="also scored with --parameterisation lora (an offset exists only for its own prompt)")
    parser.add_argument("--held-out-seeds", type=int, default=12, help="fresh seeds per held-out prompt")
    parser.add_argument("--lr", type=float, default=None, help="Adam's; default 1e-2 (offset), 1e-3 (lora)")
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    pipe = load_pipeline(args.model, device="cpu")  # frozen: only the offsets (or the LoRA) train
    rng = random.Random(args.seed)
    prompts = rng.sample(read_prompt_file(args.prompts, option="--prompts"), args.num_prompts)
    schedule = DDIMSchedule.from_scheduler(pipe.scheduler, args.num_steps)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    lora = args.parameterisation == "lora"
    held_out = read_prompt_file(args.held_out_prompts, option="--held-out-prompts") if lora else []
    with torch.no_grad():
        cond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, prompts))
        uncond = encode(pipe.text_encoder, tokenize(pipe.tokenizer, [""]))
    offset = torch.zeros_like(cond, requires_grad=not lora)
    if lora:
        parameters = add_lora(pipe, LoraSettings(policy="text_encoder", rank=args.lora_rank, alpha=args.lora_rank))
    else:
        parameters = [offset]

    def conditioning(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond [P, L, D], uncond [1, L, D]) as trained: the base embeddings plus the offsets, or the LoRA's."""
        if not lora:
            return cond + offset, uncond
        return (encode(pipe.text_encoder, tokenize(pipe.tokenizer, texts)),
                encode(pipe.text_encoder, tokenize(pipe.tokenizer, [""])))

    def score_all() -> dict:
        with torch.no_grad():
            result = {"train": score(pipe, schedule, *conditioning(prompts), prompts, exact, **evaluate)}
            if held_out:
                result["held_out"] = score(pipe, schedule, *conditioning(held_out), held_out, exact,
                                           **{**evaluate, "seeds_per_prompt": args.held_out_seeds})
        return result

    trained = rewards.build_reward(args.reward, device="cpu")
    exact = rewards.build_reward(args.evaluation_reward, device="cpu")
    optimizer = torch.optim.Adam(parameters, lr=args.lr or (1e-3 if lora else 1e-2))
    evaluate = {"seeds_per_prompt": args.eval_seeds, "guidance_scale": args.guidance_scale, "size": size}
    print(f"prompts: {prompts}", flush=True)
    before = score_all()

    start, curve = time.time(), []
    for step in range(args.steps):
        rows = [i for i in range(len(prompts)) for _ in range(args.samples_per_prompt)]
        seeds = [rng.randrange(2**31) for _ in rows]
        step_cond, step_uncond = conditioning(prompts)
        latents = denoise(pipe, step_cond[rows], step_uncond.expand(len(rows), -1, -1), seeds, schedule, eta=0.0,
                          guidance_scale=args.guidance_scale, height=size, width=size, checkpoint=True)[0][-1]
        reward = trained(_decode(pipe.vae, latents, True), [prompts[i] for i in rows]).scores
        optimizer.zero_grad()
        (-reward.mean()).backward()
        optimizer.step()
        curve.append(reward.mean().item())
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step}: {args.reward} {curve[-1]:.3f} [{time.time() - start:.0f}s]", flush=True)

    after = score_all()
    with torch.no_grad():
        moved = (conditioning(prompts)[0] - cond).norm().item()  # how far the train prompts' embeddings moved
    what = "one text-encoder LoRA" if lora else "a free per-prompt offset"
    summary = {}
    for split in before:
        images = len(before[split]["reward"])
        print(f"\n{split} prompts: {args.evaluation_reward} at eta 1 on {images} images (fresh seeds), before -> "
              f"after {args.steps} steps on {what} (|embedding change| {moved:.2f}, |embedding| {cond.norm():.2f}); "
              "gain paired image by image, +- its standard error:")
        summary[split] = {}
        for key, b in before[split].items():
            gain = after[split][key] - b
            summary[split][key] = {"before": b.mean().item(), "after": after[split][key].mean().item(),
                                   "gain": gain.mean().item(), "gain_se": (gain.std() / images**0.5).item()}
            row = summary[split][key]
            print(f"  {key:32s} {row['before']:.3f} -> {row['after']:.3f} ({row['gain']:+.3f} +- {row['gain_se']:.3f})")
    return {"prompts": prompts, "held_out_prompts": held_out, "scores": summary, "train_curve": curve,
            "embedding_change": moved}


if __name__ == "__main__":
    main()
