"""End-to-end samples/s on one piece of work: this trainer in its layouts, and TRL's DDPOTrainer.

Arms (each a fresh process, interleaved A B C ... A B C ... over `--pairs` rounds):

    trl            TRL 0.23 `DDPOTrainer` (in-process, accelerate on CPU/GPU, no logging or checkpoints)
    inline         this trainer in one process (`resources.mode=inline`)
    ray            Ray on this node, synchronous (configs/tiny.yaml's layout: 2 samplers, 1 reward actor, 1 learner)
    ray_async      the same, sampling epoch e+1 while the learner trains on epoch e (`train.async_staleness=1`,
                   the learner on one thread)
    ray_1_sampler  `ray` with one sampler
    inline_no_outputs  `inline` writing only each epoch's metrics row: no TensorBoard, image grid or reward
                   curve (what the background outputs cost the epoch; not in the default arms)

The work is DDPO on a U-Net LoRA (rank 4 on to_q/to_k/to_v/to_out.0, TRL's default), `brightness`
reward (rewards/color.py, the same function for both), whole-batch advantages (TRL's default),
`--steps` DDIM steps at eta 1 and guidance 5, `--trained-fraction` of each trajectory's steps
trained with guidance (TRL's `train_cfg`), one optimizer step per minibatch, float32. This trainer
also writes what a user gets every epoch (checkpoint, image grid, reward curve, TensorBoard,
metrics.parquet); TRL writes nothing. An epoch is timed from one epoch's end to the next; the
first `--warmup` epochs of each run are left out; samples/s is samples per epoch over the median
epoch. Prints a table and writes JSON and a plot; docs/performance.md quotes them.

    pip install -c constraints.txt -e ".[bench]"    # TRL 0.23, for the `trl` arm only
    python bench/end_to_end.py --out runs/bench-e2e                    # ~15 min on 2 cores
    python bench/end_to_end.py --out runs/bench-e2e --arms ray ray_async --samples 128
    python bench/end_to_end.py --out runs/bench-outputs --arms inline inline_no_outputs --pairs 5
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# config overrides of each arm of this trainer, on top of the shared work (`work_overrides`)
ARMS: dict[str, list[str]] = {
    "inline": ["resources.mode=inline"],
    "ray": ["resources.mode=ray"],
    # the learner keeps to its own core while the samplers draw the next epoch on the other
    "ray_async": ["resources.mode=ray", "train.async_staleness=1", "resources.learner_threads=1"],
    "ray_1_sampler": ["resources.mode=ray", "resources.num_samplers=1"],
    "inline_no_outputs": ["resources.mode=inline"],
}
ALL_ARMS = ["trl", *ARMS]
DEFAULT_ARMS = [arm for arm in ALL_ARMS if arm != "inline_no_outputs"]


def work_overrides(args: argparse.Namespace) -> list[str]:
    """The shared work, as overrides of configs/tiny.yaml (its resources layout stays)."""
    batches = args.samples // args.batch
    return [
        f"model.pretrained={args.model}", f"prompts.file={args.prompts}", f"seed={args.seed}",
        f"sample.num_steps={args.steps}", "sample.eta=1.0", "sample.guidance_scale=5.0",
        f"sample.batch_size={args.batch}", f"sample.num_batches_per_epoch={batches}",
        f"train.batch_size={args.batch}", "train.gradient_accumulation_steps=1", "train.num_inner_epochs=1",
        f"train.timestep_fraction={args.trained_fraction}", "train.min_sigma=0", "train.max_step_gain=0",
        "train.kl_coef=0", "train.learning_rate=3e-4", "train.clip_range=1e-4", "train.adv_clip_max=5",
        "train.async_staleness=0", "lora.policy=unet", "lora.rank=4", "lora.alpha=4", "lora.init=gaussian",
        "advantage.mode=batch", "reward.spec=brightness", "evaluation.prompts_file=null",
        "model.dtype=float32",
    ]


def run_trl(args: argparse.Namespace, out: Path) -> dict:
    """TRL's DDPOTrainer on the same model, prompts, reward and sizes; epoch end times."""
    import torch
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from rewards.color import Brightness
    from rl.prompts import read_prompt_file

    prompts = read_prompt_file(args.prompts, option="--prompts")
    rng = random.Random(args.seed)
    reward = Brightness()
    config = DDPOConfig(
        num_epochs=args.epochs, seed=args.seed, mixed_precision="no", log_with=None, save_freq=10**9,
        project_kwargs={"project_dir": str(out / "trl"), "logging_dir": str(out / "trl" / "logs"),
                        "automatic_checkpoint_naming": True, "total_limit": 1},
        sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=5.0,
        sample_batch_size=args.batch, sample_num_batches_per_epoch=args.samples // args.batch,
        train_batch_size=args.batch, train_gradient_accumulation_steps=1, train_num_inner_epochs=1,
        train_timestep_fraction=args.trained_fraction, train_learning_rate=3e-4, train_cfg=True,
        per_prompt_stat_tracking=False,
    )
    PartialState()  # TRL's pipeline logs through accelerate, which needs its state first
    pipeline = DefaultDDPOStableDiffusionPipeline(str(args.model), use_lora=True)
    trainer = DDPOTrainer(
        config,
        reward_function=lambda images, batch_prompts, metadata: (reward(images, batch_prompts), {}),
        prompt_function=lambda: (rng.choice(prompts), {}),
        sd_pipeline=pipeline,
    )
    ends, step = [], 0
    for epoch in range(args.epochs):
        step = trainer.step(epoch, step)
        ends.append(time.perf_counter())
    return {"epoch_ends": ends, "torch_threads": torch.get_num_threads()}


def run_ours(arm: str, args: argparse.Namespace, out: Path, name: str) -> dict:
    """One run of this trainer in `arm`'s layout; epoch end times and its per-epoch update seconds."""
    from actors.driver import train
    from rl.config import load_config
    from rl.outputs import EpochOutputs

    if arm == "inline_no_outputs":  # this process's runs write the metrics row (read back below) and nothing else
        EpochOutputs._write = lambda self, row, *grid_and_plots: self.run.append_metrics(row)

    config = load_config(ROOT / "configs" / "tiny.yaml", [
        *work_overrides(args), f"output_dir={out}", f"run_name={name}", f"num_epochs={args.epochs}",
        *args.overrides, *ARMS[arm],
    ])
    ends: list[float] = []
    rows = train(config, on_epoch_end=lambda epoch, row: ends.append(time.perf_counter())).read_metrics()
    return {"epoch_ends": ends, "update_seconds": [r["update_seconds"] for r in rows]}


def epoch_periods(run: dict, warmup: int) -> list[float]:
    """Seconds from one epoch's end to the next, the first `warmup` epochs left out (epoch 0 has no period)."""
    ends = run["epoch_ends"]
    return [b - a for a, b in zip(ends, ends[1:])][warmup - 1:]


def summarize(runs: list[dict], warmup: int) -> dict[str, dict]:
    """Per arm: the median epoch (periods between epoch ends, the first `warmup` epochs left out) and samples/s."""
    table = {}
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        periods = [p for r in mine for p in epoch_periods(r, warmup)]
        seconds = statistics.median(periods)
        table[arm] = {"epochs_timed": len(periods), "median_epoch_seconds": seconds,
                      "mean_epoch_seconds": statistics.mean(periods),  # counts the epochs that plot (plot_every)
                      "samples_per_second": mine[0]["samples_per_epoch"] / seconds}
    return table


RATIOS = [  # (label, numerator arm, denominator arm): what docs/performance.md's table quotes
    ("best of this trainer / TRL", "best", "trl"),
    ("Ray synchronous / in-process", "ray", "inline"),
    ("Ray async / Ray synchronous", "ray_async", "ray"),
    ("2 samplers / 1 sampler (Ray synchronous)", "ray", "ray_1_sampler"),
    ("outputs written / not (in-process)", "inline", "inline_no_outputs"),
]


def ratios(table: dict[str, dict]) -> dict[str, float]:
    speed = {arm: t["samples_per_second"] for arm, t in table.items()}
    ours = [arm for arm in speed if arm not in ("trl", "inline_no_outputs")]  # what a user runs
    if ours:
        speed["best"] = max(speed[arm] for arm in ours)
    return {label: speed[a] / speed[b] for label, a, b in RATIOS if a in speed and b in speed}


def plot(runs: list[dict], table: dict[str, dict], warmup: int, path: Path, title: str) -> None:
    """samples/s per arm: a bar at the median epoch, a dot per run (its own median)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.45 * len(arms)))
    ax.barh(range(len(arms)), [table[a]["samples_per_second"] for a in arms], color="#9ecae1")
    for i, arm in enumerate(arms):
        for r in (r for r in runs if r["arm"] == arm):
            ax.plot(r["samples_per_epoch"] / statistics.median(epoch_periods(r, warmup)), i, "o", color="#08519c", ms=4)
    ax.set_yticks(range(len(arms)), arms)
    ax.invert_yaxis()
    ax.set_xlabel("samples / s (bar: median epoch over all runs; dots: each run)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-e2e"))
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, default=DEFAULT_ARMS)
    parser.add_argument("--pairs", type=int, default=3, help="rounds over the arms, interleaved")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first epochs of each run left out (>= 1)")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "toy-sd")
    parser.add_argument("--prompts", type=Path, default=ROOT / "configs" / "prompts_toy_train.txt")
    parser.add_argument("--samples", type=int, default=8, help="samples per epoch")
    parser.add_argument("--batch", type=int, default=4, help="samples per sampling call and per minibatch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--trained-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-arm", choices=ALL_ARMS, help=argparse.SUPPRESS)  # one run, in this process
    parser.add_argument("--run-name", default="run", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)  # where a child writes its run
    parser.add_argument("overrides", nargs="*", help="config overrides for this trainer's arms (key=value)")
    args = parser.parse_intermixed_args(argv)
    if not 1 <= args.warmup < args.epochs:
        parser.error(f"--warmup ({args.warmup}) must be at least 1 and below --epochs ({args.epochs})")
    if args.samples % args.batch or args.samples // args.batch < 2:
        parser.error(f"--samples ({args.samples}) must be at least 2 batches of --batch ({args.batch}) "
                     "(two samplers each take one)")
    if "trl" in (args.run_arm or args.arms) and importlib.util.find_spec("trl") is None:
        parser.error("the `trl` arm needs TRL 0.23: pip install -c constraints.txt -e \".[bench]\" "
                     "(or leave it out: --arms inline ray ray_async ray_1_sampler)")
    args.out.mkdir(parents=True, exist_ok=True)

    if args.run_arm:  # a child: one run
        if args.run_arm == "trl":
            result = run_trl(args, args.out / args.run_name)
        else:
            result = run_ours(args.run_arm, args, args.out, args.run_name)
        args.result.write_text(json.dumps({"arm": args.run_arm, "samples_per_epoch": args.samples, **result}))
        return

    runs, started = [], time.perf_counter()
    shared = ["--out", args.out, "--epochs", args.epochs, "--warmup", args.warmup, "--model", args.model,
              "--prompts", args.prompts, "--samples", args.samples, "--batch", args.batch, "--steps", args.steps,
              "--trained-fraction", args.trained_fraction, "--seed", args.seed, *args.overrides]
    for round_ in range(args.pairs):
        for arm in args.arms:
            name = f"round{round_}-{arm}"
            result = args.out / f"{name}.json"
            done = subprocess.run(
                [sys.executable, __file__, *map(str, shared), "--run-arm", arm, "--run-name", name, "--result", result],
                capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode != 0:
                sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
            runs.append(json.loads(result.read_text()))
            median = statistics.median(epoch_periods(runs[-1], args.warmup))
            print(f"[{time.perf_counter() - started:6.0f} s] {name}: median epoch {median:.2f} s",
                  flush=True)

    table = summarize(runs, args.warmup)
    print(f"\n{args.samples} samples/epoch, {args.steps} steps, {args.trained_fraction:g} of them trained, "
          f"batch {args.batch}")
    print(f"{'arm':17s} {'epochs':>6s} {'s/epoch':>8s} {'mean':>6s} {'samples/s':>10s}")
    for arm, t in table.items():
        print(f"{arm:17s} {t['epochs_timed']:6d} {t['median_epoch_seconds']:8.2f} {t['mean_epoch_seconds']:6.2f} "
              f"{t['samples_per_second']:10.2f}")
    ratio = ratios(table)
    for label, value in ratio.items():
        print(f"{label}: {value:.2f}x samples/s")
    title = f"{args.samples} samples/epoch, {args.steps} steps, {args.trained_fraction:g} trained, U-Net LoRA r4"
    plot(runs, table, args.warmup, args.out / "end_to_end.png", title)
    (args.out / "end_to_end.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "work_overrides": work_overrides(args),
         "runs": runs, "table": table, "ratios": ratio}, indent=2))
    print(f"wrote {args.out / 'end_to_end.json'} and end_to_end.png")


if __name__ == "__main__":
    main()
