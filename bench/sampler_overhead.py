"""The sampler's cost against a plain diffusers call on the same work.

`rl.sampling.sample_trajectories` records every step (x_t, x_{t-1}, log-prob) and draws each
sample's noise from its own seed; `pipe(...)` (StableDiffusionPipeline with the same DDIM
scheduler) only returns images. Same prompts, batch, steps, guidance, eta and dtype; the two are
timed alternately (A B A B ...) after one warm-up call each, and the ratio of medians is
reported. The issue's target is at most 1.10x.

    python bench/sampler_overhead.py models/toy-sd --batch 16 --steps 10 --repeats 7
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rl.models import DTYPES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a diffusers directory (models/toy-sd, or `texforce make-tiny DIR`)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each, interleaved (>= 5)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="the frozen weights' dtype (model.dtype)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-sampler/sampler_overhead.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from rl.models import load_pipeline
    from rl.sampling import sample_trajectories

    pipe = load_pipeline(args.model, dtype=args.dtype, device="auto")
    device = pipe.unet.device
    prompts = [f"a {c} ball" for c in ("red", "blue", "green", "yellow")] * (args.batch // 4 + 1)
    prompts, seeds = prompts[: args.batch], list(range(args.batch))

    def recorded() -> None:
        sample_trajectories(pipe, prompts, seeds, num_steps=args.steps, guidance_scale=args.guidance, eta=args.eta)

    def plain() -> None:
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        pipe(prompts, negative_prompt=[""] * len(prompts), num_inference_steps=args.steps,
             guidance_scale=args.guidance, eta=args.eta, generator=generators, output_type="pt")

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    pipe.set_progress_bar_config(disable=True)
    timed(recorded), timed(plain)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {"sample_trajectories": [], "pipe(...)": []}
    for _ in range(args.repeats):
        times["sample_trajectories"].append(timed(recorded))
        times["pipe(...)"].append(timed(plain))
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["sample_trajectories"] / medians["pipe(...)"]
    print(f"{args.batch} samples, {args.steps} steps, guidance {args.guidance:g}, eta {args.eta:g}, {device}, "
          f"{args.dtype}, {args.threads} threads, median of {args.repeats} (A B interleaved):")
    for name, median in medians.items():
        print(f"  {name:20s} {median:7.3f} s  ({args.batch / median:6.1f} samples/s)")
    print(f"  recorded / plain     {ratio:7.3f}x")
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if peak_gib is not None:
        print(f"  peak device memory   {peak_gib:7.2f} GiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "times": times,
                                    "medians": medians, "ratio": ratio,
                                    "peak_device_gib": peak_gib}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
