"""bfloat16 on the CPU: attention in float32 (what `load_pipeline` sets up) against PyTorch's own bfloat16 attention.

PyTorch's CPU flash-attention backward in bfloat16 is several times slower than in float32 at
small head dimensions (the toy model's is 8), so `rl.models.load_pipeline` wraps each U-Net
attention processor to run the attention product in float32 on the CPU
(`CpuFloat32AttentionProcessor`). On one pipeline, timed alternately after a warm-up (median of
--repeats), each arm switching the processors before it runs:

- one PPO minibatch (`PPOLearner.minibatch_backward` + optimizer step; the demo's 64 rows x its
  trained steps, KL penalty included) and one sampling batch (`sample_trajectories`, 16 samples);
- in bfloat16 with float32 attention, in bfloat16 with bfloat16 attention, and in float32 (a
  second pipeline) for reference.

    python bench/cpu_half_attention.py models/toy-sd --repeats 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each arm, interleaved (>= 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cpu-half-attention/cpu_half_attention.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value) on configs/tiny.yaml")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(args.threads)

    from rl.config import load_config
    from rl.learner import PPOLearner
    from rl.models import CpuFloat32AttentionProcessor, load_pipeline
    from rl.sampling import sample_trajectories

    def setup(dtype: str):
        config = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={args.model}", f"model.dtype={dtype}",
                                                              *args.overrides])
        pipe = load_pipeline(args.model, dtype=dtype, device="cpu")
        return config, pipe, PPOLearner(pipe, config)

    config, bf16_pipe, bf16_learner = setup("bfloat16")
    _, fp32_pipe, fp32_learner = setup("float32")
    float32_attention = dict(bf16_pipe.unet.attn_processors)
    assert all(isinstance(p, CpuFloat32AttentionProcessor) for p in float32_attention.values())
    bfloat16_attention = {name: p.processor for name, p in float32_attention.items()}

    s, rows = config.sample, config.train.batch_size
    prompts = [f"a {c} {o}" for c in ("red", "blue", "green", "yellow") for o in ("ball", "car", "cup", "tree")]
    prompts = (prompts * (rows // len(prompts) + 1))[:rows]
    batch = sample_trajectories(fp32_pipe, prompts, list(range(rows)), num_steps=s.num_steps,
                                guidance_scale=s.guidance_scale, eta=s.eta)
    advantages = torch.linspace(-1, 1, rows)
    step_index = fp32_learner.trainable_steps.repeat(rows, 1)

    def arm(pipe, learner, processors):
        def learn() -> None:
            if processors is not None:
                pipe.unet.set_attn_processor(dict(processors))  # it empties the dict it is given
            learner.minibatch_backward(batch, advantages, step_index)
            learner.optimizer_step()

        def sample() -> None:
            if processors is not None:
                pipe.unet.set_attn_processor(dict(processors))  # it empties the dict it is given
            with torch.no_grad():
                sample_trajectories(pipe, prompts[: s.batch_size], list(range(s.batch_size)), num_steps=s.num_steps,
                                    guidance_scale=s.guidance_scale, eta=s.eta)
        return {"learner minibatch": learn, "sampling batch": sample}

    arms = {"bfloat16, float32 attention": arm(bf16_pipe, bf16_learner, float32_attention),
            "bfloat16, bfloat16 attention": arm(bf16_pipe, bf16_learner, bfloat16_attention),
            "float32": arm(fp32_pipe, fp32_learner, None)}
    for phases in arms.values():
        for fn in phases.values():
            fn()  # warm-up
    times = {name: {phase: [] for phase in phases} for name, phases in arms.items()}
    for _ in range(args.repeats):
        for name, phases in arms.items():
            for phase, fn in phases.items():
                start = time.perf_counter()
                fn()
                times[name][phase].append(time.perf_counter() - start)
    medians = {name: {phase: statistics.median(v) for phase, v in phases.items()} for name, phases in times.items()}
    reference = medians["bfloat16, float32 attention"]
    print(f"{rows} rows x {len(fp32_learner.trainable_steps)} trained steps (learner), {s.batch_size} samples x "
          f"{s.num_steps} steps (sampling), cpu, {args.threads} threads, median of {args.repeats}, interleaved:")
    for name, phases in medians.items():
        cells = "  ".join(f"{phase} {m:6.3f} s ({m / reference[phase]:.2f}x)" for phase, m in phases.items())
        print(f"  {name:30s} {cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times,
                                    "medians": medians}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
