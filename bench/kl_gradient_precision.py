"""The PPO learner's KL-penalty and surrogate gradients in a half dtype against float32, at a trained LoRA.

bfloat16 reads `kl_to_base` several times higher than float32 near the base model (a rounding floor on
the value, docs/half_precision.md). Does the penalty's gradient, which is what training follows,
differ too? On a run's last checkpoint (its config, its LoRA), one minibatch of trajectories
sampled in float32 from the run's train prompts, two LoRA gradients per dtype:

- the KL term alone (`train.kl_coef=1`, advantages 0, so the surrogate contributes nothing);
- the surrogate alone (`train.kl_coef=0`, advantages drawn from N(0, 1)).

Printed: each gradient's cosine and norm ratio to float32's, and `kl_to_base` as each dtype reads it.

    python bench/kl_gradient_precision.py runs/bf16_kl01_seed0 --rows 32
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gradient_snr import cosine, flat_grad


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run directory with checkpoints/epoch_*")
    parser.add_argument("--rows", type=int, default=32, help="trajectories in the minibatch (the first train prompts)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default RUN/kl_gradient_precision.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rl.config import load_config
    from rl.learner import PPOLearner
    from rl.models import load_pipeline_from_config
    from rl.prompts import load_prompts
    from rl.run_dir import RunDirectory
    from rl.sampling import sample_trajectories

    run = RunDirectory(args.run)
    checkpoint = run.latest_checkpoint()
    if checkpoint is None:
        raise SystemExit(f"{args.run} has no checkpoints/epoch_*")
    state, _ = RunDirectory.load_checkpoint(checkpoint)

    learners = {}
    for dtype in ("float32", args.dtype):
        # no clipping: the minibatch is sampled in float32, so a half dtype's ratio is 1 only up to its rounding, which
        # a small clip_range would turn into clipped terms (bench/ppo_ratio_precision.py)
        config = load_config(run.config_path, [f"model.dtype={dtype}", "model.device=cpu", "train.clip_range=10"])
        learner = PPOLearner(load_pipeline_from_config(config.model), config)
        learner.load_state_dict(state)  # the run's LoRA (and its optimizer state, unused here)
        learners[dtype] = learner
    s = config.sample
    prompts = (load_prompts(config.prompts) * args.rows)[: args.rows]
    batch = sample_trajectories(learners["float32"].pipe, prompts, list(range(args.rows)), num_steps=s.num_steps,
                                guidance_scale=s.guidance_scale, eta=s.eta)
    step_index = learners["float32"].trainable_steps.repeat(args.rows, 1)

    def gradient(learner, advantages: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, float]:
        learner.train.kl_coef = kl_coef
        metrics = learner.minibatch_backward(batch, advantages, step_index)
        return flat_grad(learner.params), metrics.get("kl_to_base", 0.0)

    terms = {"KL term (advantages 0)": (torch.zeros(args.rows), 1.0),
             "surrogate (no KL)": (torch.randn(args.rows, generator=torch.Generator().manual_seed(0)), 0.0)}
    result = {"checkpoint": str(checkpoint), "dtype": args.dtype, "rows": args.rows, "terms": {}}
    print(f"{checkpoint}, {args.rows} rows x {len(step_index[0])} trained steps, {args.dtype} against float32:")
    for name, (advantages, kl_coef) in terms.items():
        reference, reference_kl = gradient(learners["float32"], advantages, kl_coef)
        half, half_kl = gradient(learners[args.dtype], advantages, kl_coef)
        row = {"cosine": cosine(half, reference),
               "norm_ratio": float(half.norm() / reference.norm()),
               "kl_to_base_float32": reference_kl, f"kl_to_base_{args.dtype}": half_kl}
        result["terms"][name] = row
        print(f"  {name:24s} cosine {row['cosine']:.4f}  norm {row['norm_ratio']:.3f}x"
              + (f"  kl_to_base float32 {reference_kl:.2e}, {args.dtype} {half_kl:.2e}" if kl_coef else ""))
    out = args.out or args.run / "kl_gradient_precision.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
