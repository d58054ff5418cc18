"""The PPO ratio in a half dtype against float32, after one real optimizer step.

The first minibatch of an update sees the ratio 1 exactly in every dtype (the learner recomputes the
sampler's log-prob: tests/test_sampling.py); every later minibatch sees the policy moved by the steps before
it. How much of that log-ratio is the step, and how much the half dtype's rounding (the frozen network's
activations round differently once the LoRA has moved, however little)? From the config's model (or a run's
last checkpoint: --run), one minibatch sampled in float32 with its latents stored in float16 (as a half run
stores them), one AdamW step of the float32 learner on it, then in each dtype, each with its own log-probs at
the old weights (what its sampler records):

- the log-ratio log p_new - log p_old of every (row, trained step), against float32's;
- the fraction of those terms each dtype clips at each clip range (PPO's `clipfrac`), against float32's;
- the PPO surrogate's LoRA gradient at the moved weights (no KL), its cosine and norm to float32's.

    python bench/ppo_ratio_precision.py --config configs/tiny.yaml --size 256 --rows 8
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from gradient_snr import cosine, flat_grad


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/tiny.yaml"), help="the run's config (no --run)")
    parser.add_argument("--run", type=Path, default=None, help="a run directory: its config and last checkpoint")
    parser.add_argument("--rows", type=int, default=8, help="trajectories in the minibatch (the first prompts)")
    parser.add_argument("--size", type=int, default=256, help="image size (256 gives the toy model SD's 64x64 latents)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    parser.add_argument("--clip-ranges", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2, 0.2])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/ppo_ratio_precision.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rl.config import load_config
    from rl.learner import PPOLearner
    from rl.lora import set_policy_weights
    from rl.models import load_pipeline_from_config
    from rl.prompts import load_prompts
    from rl.run_dir import RunDirectory
    from rl.sampling import encode, recomputed_log_probs, sample_trajectories

    config_path, state = args.config, None
    if args.run is not None:
        run = RunDirectory(args.run)
        checkpoint = run.latest_checkpoint()
        if checkpoint is None:
            raise SystemExit(f"{args.run} has no checkpoints/epoch_*")
        config_path, (state, _) = run.config_path, RunDirectory.load_checkpoint(checkpoint)
    shapes = ["model.device=cpu", f"sample.height={args.size}", f"sample.width={args.size}", *args.overrides]
    learners = {}
    for dtype in ("float32", *args.dtypes):
        config = load_config(config_path, [*shapes, f"model.dtype={dtype}"])
        learner = PPOLearner(load_pipeline_from_config(config.model), config)
        if state is not None:
            learner.load_state_dict(state)
        learners[dtype] = learner
    reference = learners["float32"]
    s = config.sample
    prompts = (load_prompts(config.prompts) * args.rows)[: args.rows]
    batch = sample_trajectories(reference.pipe, prompts, list(range(args.rows)), num_steps=s.num_steps,
                                guidance_scale=s.guidance_scale, eta=s.eta, height=args.size, width=args.size,
                                latent_dtype=torch.float16)
    step_index = reference.trainable_steps.repeat(args.rows, 1)
    advantages = torch.randn(args.rows, generator=torch.Generator().manual_seed(0))

    def log_probs(learner: PPOLearner) -> torch.Tensor:
        with torch.no_grad():
            cond = encode(learner.pipe.text_encoder, batch.prompt_ids).float()
            uncond = encode(learner.pipe.text_encoder, batch.negative_ids).float()
            return recomputed_log_probs(learner.pipe.unet, learner.schedule, batch, step_index, cond, uncond,
                                        guidance_scale=s.guidance_scale, eta=s.eta).double()

    def with_old(old: torch.Tensor):
        """The batch with `old` as its recorded log-probs at the trained steps: what this dtype's sampler wrote."""
        recorded = batch.log_probs.clone()
        recorded.scatter_(1, step_index, old.float())
        return dataclasses.replace(batch, log_probs=recorded)

    old = {dtype: log_probs(learner) for dtype, learner in learners.items()}
    reference.minibatch_backward(with_old(old["float32"]), advantages, step_index)  # the update's first minibatch
    step = reference.optimizer_step()
    moved = reference.get_weights()
    for learner in learners.values():
        set_policy_weights(learner.pipe, moved)
    log_ratio = {dtype: log_probs(learner) - old[dtype] for dtype, learner in learners.items()}

    result = {"config": str(config_path), "checkpoint": None if state is None else str(checkpoint), "rows": args.rows,
              "size": args.size, "trained_steps": step_index[0].tolist(), "learning_rate": step["lr"], "dtypes": {}}
    true = log_ratio["float32"]
    print(f"{config_path}{'' if state is None else ', ' + str(checkpoint)}: {args.rows} rows x "
          f"{step_index.shape[1]} trained steps at {args.size} px, one AdamW step at lr {step['lr']:.1e}")
    print("  float32 |log-ratio| per trained step (mean over rows): "
          + " ".join(f"{x:.1e}" for x in true.abs().mean(0).tolist()))
    gradients = {}
    for dtype, learner in learners.items():
        for clip_range in args.clip_ranges:
            learner.train.clip_range = clip_range
            learner.minibatch_backward(with_old(old[dtype]), advantages, step_index)
            gradients[dtype, clip_range] = flat_grad(learner.params) / learner.scaler.scale
    for dtype in ("float32", *args.dtypes):
        error = (log_ratio[dtype] - true).abs()
        row = {"error_mean_per_step": error.mean(0).tolist(), "error_max": float(error.max()),
               "sign_disagreements": float(((log_ratio[dtype] * true) < 0).double().mean()), "clip": {}}
        for clip_range in args.clip_ranges:
            g, g32 = gradients[dtype, clip_range], gradients["float32", clip_range]
            row["clip"][clip_range] = {"clipfrac": float((log_ratio[dtype].exp() - 1).abs().gt(clip_range).double().mean()),
                                       "cosine": cosine(g, g32), "norm_ratio": float(g.norm() / g32.norm())}
        result["dtypes"][dtype] = row
        if dtype == "float32":
            continue
        print(f"  {dtype}: log-ratio error per step " + " ".join(f"{x:.1e}" for x in row["error_mean_per_step"])
              + f" (largest {row['error_max']:.1e}; sign differs from float32's on {row['sign_disagreements']:.0%})")
        for clip_range, entry in row["clip"].items():
            print(f"    clip_range {clip_range:g}: clipfrac {entry['clipfrac']:.3f} (float32 "
                  f"{result['dtypes']['float32']['clip'][clip_range]['clipfrac']:.3f}), gradient cosine "
                  f"{entry['cosine']:.4f}, norm {entry['norm_ratio']:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
