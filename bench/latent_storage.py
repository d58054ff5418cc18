"""Which dtype a trajectory's latents can be stored in: bytes against the PPO gradient's fidelity.

A sampler keeps every step's latent for the learner. Stored in half precision they take half the
bytes (object store, network, learner fetch), but the learner then scores the *stored* x_{t-1}: the
sampler must round the chain as it samples and score the rounded value (`rl.sampling.denoise`), and
where sigma_t is small the rounding is a visible part of a step's noise. On the demo's model and
config, sampled from one float32 pipeline with the same seeds, per storage dtype:

- bytes of one sample's trajectory;
- max over rows of |recomputed - stored log-prob| per step, for the rounded chain and (what rounding
  afterwards would give) for the float32 chain cast to the dtype;
- per step, the cosine of the PPO LoRA gradient on the stored batch to the one on the float32 batch.

    python bench/latent_storage.py --out runs/bench-latent-storage     # ~2 min on 2 cores
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from gradient_snr import cosine, flat_grad

ROOT = Path(__file__).resolve().parent.parent


def recomputed_mismatch(learner, batch) -> list[float]:
    """Per step, max over rows of |log-prob recomputed from the stored latents - the stored one|."""
    from rl.sampling import encode, recomputed_log_probs

    cond = encode(learner.pipe.text_encoder, batch.prompt_ids).detach()
    uncond = encode(learner.pipe.text_encoder, batch.negative_ids).detach()
    steps = torch.arange(batch.log_probs.shape[1]).repeat(len(batch), 1)
    recomputed = recomputed_log_probs(learner.pipe.unet, learner.schedule, batch, steps, cond, uncond,
                                      guidance_scale=learner.sample.guidance_scale, eta=learner.sample.eta)
    return (recomputed - batch.log_probs).abs().amax(dim=0).tolist()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, default=ROOT / "models" / "toy-sd")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=None, help="default: the demo's")
    parser.add_argument("--lora-policy", default="text_encoder", choices=["text_encoder", "unet", "both"])
    parser.add_argument("--size", type=int, default=None, help="image size; default: the model's")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-latent-storage"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rl.config import load_config
    from rl.learner import PPOLearner
    from rl.models import load_pipeline_from_config
    from rl.prompts import load_prompts
    from rl.sampling import sample_trajectories

    overrides = [f"model.pretrained={args.pretrained}", f"prompts.file={ROOT / 'configs' / 'prompts_toy_train.txt'}",
                 "model.device=cpu", "train.clip_range=10.0",
                 "train.min_sigma=0", f"lora.policy={args.lora_policy}"]
    overrides += [f"sample.num_steps={args.num_steps}"] if args.num_steps else []
    overrides += [f"sample.height={args.size}", f"sample.width={args.size}"] if args.size else []
    config = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    learner = PPOLearner(load_pipeline_from_config(config.model), config)
    s = config.sample
    prompts = (load_prompts(config.prompts) * args.rows)[: args.rows]
    seeds = list(range(args.rows))
    advantages = torch.randn(args.rows, generator=torch.Generator().manual_seed(0))

    def sample(dtype: torch.dtype):
        return sample_trajectories(learner.pipe, prompts, seeds, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                                   eta=s.eta, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
                                   latent_dtype=dtype)

    def step_gradients(batch) -> list[torch.Tensor]:
        grads = []
        for j in range(s.num_steps):
            learner.minibatch_backward(batch, advantages, torch.full((args.rows, 1), j))
            grads.append(flat_grad(learner.params))
        return grads

    reference = sample(torch.float32)
    reference_grads = step_gradients(reference)
    from rl.ddim import ddim_sigma

    result = {"pretrained": str(args.pretrained), "rows": args.rows, "num_steps": s.num_steps,
              "size": s.height or learner.pipe.unet.config.sample_size * learner.pipe.vae_scale_factor, "eta": s.eta,
              "last_step_sigma": float(ddim_sigma(learner.schedule, learner.schedule.timesteps[-1:], s.eta)),
              "final_latent_rms": float(reference.latents[:, -1].pow(2).mean().sqrt()), "dtypes": {}}
    for name in ("float32", "float16", "bfloat16"):
        dtype = getattr(torch, name)
        batch = reference if dtype == torch.float32 else sample(dtype)
        grads = reference_grads if dtype == torch.float32 else step_gradients(batch)
        trajectory_bytes = sum(getattr(batch, f.name).nbytes for f in dataclasses.fields(batch)
                               if f.name != "images" and hasattr(getattr(batch, f.name), "nbytes")) // args.rows
        row = {
            "bytes_per_sample": trajectory_bytes,
            "mismatch_rounded_chain": recomputed_mismatch(learner, batch),
            "mismatch_cast_afterwards": recomputed_mismatch(
                learner, dataclasses.replace(reference, latents=reference.latents.to(dtype))),
            "gradient_cosine_per_step": [cosine(g, r) for g, r in zip(grads, reference_grads)],
            "final_latent_relative_difference": float((batch.latents[:, -1].float() - reference.latents[:, -1]).norm()
                                                      / reference.latents[:, -1].norm()),
        }
        result["dtypes"][name] = row
    print(f"{args.rows} samples x {s.num_steps} steps at {result['size']} px, eta {s.eta}, one float32 pipeline "
          f"({args.pretrained.name}); x_0's RMS {result['final_latent_rms']:.2f}, the last step's sigma_t "
          f"{result['last_step_sigma']:.3f}; per storage dtype:")
    print(f"{'stored as':10s} {'KiB/sample':>10s} {'max mismatch, rounded chain':>28s} "
          f"{'max mismatch, cast afterwards':>30s} {'gradient cosine: min step (last)':>33s}")
    for name, row in result["dtypes"].items():
        cos = row["gradient_cosine_per_step"]
        print(f"{name:10s} {row['bytes_per_sample'] / 1024:10.1f} {max(row['mismatch_rounded_chain']):28.1e} "
              f"{max(row['mismatch_cast_afterwards']):30.1e} {min(cos):24.4f} ({cos[-1]:.4f})")
    for name, row in result["dtypes"].items():
        print(f"  {name} gradient cosine per step: " + " ".join(f"{c:.4f}" for c in row["gradient_cosine_per_step"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latent_storage.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'latent_storage.json'}")
    return result


if __name__ == "__main__":
    main()
