"""Synchronous against async (overlapped) sampling: samples/s of the Ray trainer on the same work.

train.async_staleness=0 samples an epoch, then trains on it, so the samplers wait while the
learner trains and the other way round; =1 samples epoch e+1 while the learner trains on epoch e.
Both runs use the demo's config (configs/tiny.yaml: 2 samplers, 1 reward actor, 1 learner) with
its held-out evaluation off, alternate A B A B on one Ray instance, and are timed by the epochs'
time from one epoch's end to the next (outputs and checkpoints included), after the first
`--warmup` epochs (the async run's epoch 0 samples two batches). Prints a table and writes JSON; the README's "Performance" section quotes it.

    python bench/overlap.py --out runs/bench-overlap            # ~8 min on 2 cores
    python bench/overlap.py --out runs/bench-overlap sample.num_batches_per_epoch=16

Extra arguments are config overrides for both runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(staleness: int, out: Path, name: str, overrides: list[str], epochs: int) -> dict:
    """One training run; per-epoch wall, sample and update seconds from its metrics."""
    from actors.driver import train
    from rl.config import load_config

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        f"output_dir={out}", f"run_name={name}", f"num_epochs={epochs}", "evaluation.prompts_file=null",
        f"model.pretrained={ROOT / 'models' / 'toy-sd'}", f"prompts.file={ROOT / 'configs' / 'prompts_toy_train.txt'}",
        *overrides, f"train.async_staleness={staleness}",
    ])
    ends: list[float] = []
    rows = train(config, on_epoch_end=lambda epoch, row: ends.append(time.perf_counter())).read_metrics()
    return {
        "staleness": staleness,
        "samples_per_epoch": config.samples_per_epoch,
        # from one epoch's end to the next: everything the loop does (outputs, checkpoint) included
        "epoch_seconds": [b - a for a, b in zip(ends, ends[1:])],
        "wall_seconds": [r["wall_seconds"] for r in rows],
        "sample_seconds": [r["sample_seconds"] for r in rows],
        "update_seconds": [r["update_seconds"] for r in rows],
        "reward_mean": [r["reward_mean"] for r in rows],
    }


def summarize(runs: list[dict], warmup: int) -> dict[int, dict]:
    """Per staleness: median epoch seconds after warm-up (over all its runs' epochs), samples/s."""
    table = {}
    for staleness in sorted({r["staleness"] for r in runs}):
        mine = [r for r in runs if r["staleness"] == staleness]
        walls = [w for r in mine for w in r["epoch_seconds"][warmup - 1:]]
        updates = [u for r in mine for u in r["update_seconds"][warmup:]]
        seconds = statistics.median(walls)
        table[staleness] = {
            "epochs_timed": len(walls),
            "median_epoch_seconds": seconds,
            "median_update_seconds": statistics.median(updates),
            "samples_per_second": mine[0]["samples_per_epoch"] / seconds,
        }
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-overlap"))
    parser.add_argument("--pairs", type=int, default=2, help="A B pairs (sync, async), interleaved")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1, help="first epochs of each run left out of the timing (>= 1)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both runs (key=value)")
    args = parser.parse_intermixed_args(argv)
    if not 1 <= args.warmup < args.epochs:
        parser.error(f"--warmup ({args.warmup}) must be at least 1 and below --epochs ({args.epochs})")
    overrides = ["sample.num_batches_per_epoch=8", *args.overrides]  # 128 samples/epoch unless overridden
    runs = []
    started = time.perf_counter()
    for pair in range(args.pairs):
        for staleness in (0, 1):
            name = f"pair{pair}-staleness{staleness}"
            runs.append(run_once(staleness, args.out, name, overrides, args.epochs))
            print(f"[{time.perf_counter() - started:6.0f} s] {name}: median epoch "
                  f"{statistics.median(runs[-1]['epoch_seconds'][args.warmup - 1:]):.2f} s", flush=True)
    table = summarize(runs, args.warmup)
    sync, overlapped = table[0], table[1]
    print(f"\n{'loop':14s} {'epochs':>6s} {'s/epoch':>8s} {'update s':>9s} {'samples/s':>10s}")
    for staleness, label in [(0, "synchronous"), (1, "async (1 stale)")]:
        t = table[staleness]
        print(f"{label:14s} {t['epochs_timed']:6d} {t['median_epoch_seconds']:8.2f} {t['median_update_seconds']:9.2f} "
              f"{t['samples_per_second']:10.2f}")
    speedup = overlapped["samples_per_second"] / sync["samples_per_second"]
    share = sync["median_update_seconds"] / sync["median_epoch_seconds"]
    print(f"async / synchronous: {speedup:.2f}x samples/s (learning is {share:.0%} of a synchronous epoch)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overlap.json").write_text(json.dumps(
        {"overrides": overrides, "runs": runs, "table": {str(k): v for k, v in table.items()}, "speedup": speedup,
         "update_share_synchronous": share}, indent=2))
    print(f"wrote {args.out / 'overlap.json'}")


if __name__ == "__main__":
    main()
