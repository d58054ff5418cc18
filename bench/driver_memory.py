"""The driver's peak memory against the samples per epoch, and the bytes a sample's trajectory moves.

The driver keeps object refs to the samplers' trajectory shards and hands them to the learners,
which fetch them from the object store (actors/rollout.py): its peak RSS should not grow with the
epoch's latents. Each epoch size runs in a fresh process (peak RSS is a process-lifetime high
water mark): the demo's config on Ray, one epoch, no held-out evaluation, at a larger image size
so an epoch's latents are large enough to see. With the demo's `train.min_sigma` a sample keeps 5
of its chain's 11 latents (81 KiB at 128 px), under Ray's 100 KiB limit for returning a result
inside the reply to the caller: the samplers put their results in the object store all the same
(`actors.topology.SAMPLER_INLINE_BYTES`). `--every-step` trains every step (`train.min_sigma=0`),
so a trajectory keeps its whole chain (177 KiB).
Prints a table and writes JSON.

    python bench/driver_memory.py --out runs/bench-driver-memory     # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sampler_weights(sampler):
    from rl.lora import get_policy_weights

    return get_policy_weights(sampler.pipe, sampler.config.lora.policy, 0)


def measure(batches: int, size: int, out: Path, every_step: bool) -> dict:
    """In this process: one epoch of `batches` x 16 samples; the driver's peak RSS and a trajectory's bytes."""
    sys.path.insert(0, str(ROOT))
    from actors.driver import train
    from rl.config import load_config

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"output_dir={out}", f"run_name=batches{batches}", "num_epochs=1", "evaluation.prompts_file=null",
        f"model.pretrained={ROOT / 'models' / 'toy-sd'}", f"prompts.file={ROOT / 'configs' / 'prompts_toy_train.txt'}",
        f"sample.num_batches_per_epoch={batches}", f"sample.height={size}", f"sample.width={size}",
        *(["train.min_sigma=0"] if every_step else []),
    ])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # one sample's trajectory as it travels sampler -> object store -> learner (after the peak is read)
    from dataclasses import fields

    from actors.sampler import SamplerWorker

    sampler = SamplerWorker(config)
    _, _, trajectory = sampler.sample(sampler_weights(sampler), ["a red ball"], [0])
    trajectory_bytes = sum(getattr(trajectory, f.name).nbytes for f in fields(trajectory)
                           if hasattr(getattr(trajectory, f.name), "nbytes"))
    return {"samples_per_epoch": config.samples_per_epoch, "image_size": size, "driver_peak_rss": peak,
            "driver_rss_before_training": before, "trajectory_bytes_per_sample": trajectory_bytes,
            "epoch_trajectory_bytes": trajectory_bytes * config.samples_per_epoch}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-driver-memory"))
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 16], help="sample batches (of 16) per epoch")
    parser.add_argument("--size", type=int, default=128, help="image size (latents are size/4 square)")
    parser.add_argument("--every-step", action="store_true", help="train every step: keep the whole chain")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(measure(args.child, args.size, args.out, args.every_step)), flush=True)
        return
    results = []
    for batches in args.batches:
        child = ["--child", str(batches), "--size", str(args.size), "--out", str(args.out),
                 *(["--every-step"] if args.every_step else [])]
        done = subprocess.run([sys.executable, __file__, *child], capture_output=True, text=True, check=True)
        results.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:]))
        r = results[-1]
        print(f"{r['samples_per_epoch']:5d} samples/epoch: driver peak RSS {r['driver_peak_rss'] / 2**20:7.1f} MiB "
              f"(epoch's trajectories {r['epoch_trajectory_bytes'] / 2**20:6.1f} MiB)", flush=True)
    growth = (results[-1]["driver_peak_rss"] - results[0]["driver_peak_rss"]) / 2**20
    data = (results[-1]["epoch_trajectory_bytes"] - results[0]["epoch_trajectory_bytes"]) / 2**20
    print(f"driver peak grows by {growth:+.1f} MiB while the epoch's trajectories grow by {data:.1f} MiB; "
          f"{results[0]['trajectory_bytes_per_sample'] / 1024:.0f} KiB per sample move sampler -> learner")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "driver_memory.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'driver_memory.json'}")


if __name__ == "__main__":
    main()
