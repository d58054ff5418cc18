"""Reward against wall-clock time for every registered algorithm, trained for the same budget.

Each algorithm in `rl.algorithms` (PPO and the gradient learners DRaFT, DRaFT-K, DRaFT-LV, ReFL,
AlignProp, TextCraftor) trains from the same config (`configs/tiny.yaml` by default) on the same
differentiable reward (`color_alignment`), in-process (`resources.mode=inline`), until its training
time passes `--budget-s` seconds; the epoch running then is finished, so a run overshoots by up to
one epoch. Time is the cumulative `wall_seconds` of the run's epochs (model loading, logging and
checkpoints excluded), so the curves compare reward per second of training, not per epoch.

Writes into --out: one run directory per algorithm (run_name = the algorithm), `curves.parquet`
(one row per algorithm and epoch), `curves.png` (every algorithm's reward against seconds in one
figure) and `curves.md` (epochs and samples in the budget, the reward of the first and last 3 epochs).
A run whose metrics.parquet already has rows is reused as it is, so an interrupted sweep goes on
where it stopped (delete a run directory to train it again).

Costs about budget x algorithms of wall-clock, plus each run's model loading:

    python bench/algorithm_curves.py --out runs/algorithm_curves --budget-s 180
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.algorithms import algorithm_names  # noqa: E402
from rl.config import load_config  # noqa: E402

# What each algorithm changes on top of the config and the user's overrides (these win). Every one
# trains on the differentiable `color_alignment`; held-out evaluation is PPO's only and is off. The
# U-Net gradient learners follow the DRaFT paper's small-scale settings (AdamW weight decay 0.1,
# LoRA rank 8 as in configs/tiny.yaml) with the learning rate scaled up for the toy model (1e-3, as
# bench/evidence.py's ReFL); TextCraftor keeps the text-encoder LoRA with the same learning rate, and
# PPO keeps the demo's settings.
COMMON = ["reward.spec=color_alignment", "evaluation.prompts_file=null"]
UNET_GRADIENT = ["lora.policy=unet", "train.learning_rate=1e-3", "train.weight_decay=0.1"]
METHOD_OVERRIDES: dict[str, list[str]] = {
    "ppo": [],
    "draft": UNET_GRADIENT,
    "draft_k": UNET_GRADIENT,
    "draft_lv": UNET_GRADIENT,
    "refl": UNET_GRADIENT,
    "alignprop": UNET_GRADIENT,
    "textcraftor": ["train.learning_rate=1e-3"],
}
MAX_EPOCHS = 1000  # the budget stops a run long before this
EDGE = 3  # epochs averaged at each end of a run for the table


class _BudgetSpent(Exception):
    """Raised from the epoch callback to stop a run once its training time passes the budget."""


def train_algorithm(name: str, *, base_config: Path, out: Path, overrides: list[str], budget_s: float,
                    seed: int) -> list[dict]:
    """Train `name` until its cumulative epoch time passes `budget_s` (unless its run already has
    metrics); returns the run's metrics rows, by epoch."""
    from actors.driver import train
    from rl.run_dir import RunDirectory

    run = RunDirectory(out / name)
    if not run.read_metrics():
        config = load_config(base_config, [f"num_epochs={MAX_EPOCHS}", *overrides, f"train.algorithm={name}",
                                           *COMMON, *METHOD_OVERRIDES.get(name, []), f"seed={seed}",
                                           f"run_name={name}", f"output_dir={out}", "resources.mode=inline"])
        spent = 0.0

        def stop_when_spent(epoch: int, row: dict) -> None:
            nonlocal spent
            spent += row["wall_seconds"]
            if spent >= budget_s:
                raise _BudgetSpent

        try:
            train(config, on_epoch_end=stop_when_spent)
        except _BudgetSpent:
            pass  # the finished epochs' rows are already in metrics.parquet
    return sorted(run.read_metrics(), key=lambda r: r["epoch"])


def curve_rows(name: str, metrics: list[dict]) -> list[dict]:
    """The curve of one run: seconds is the cumulative training time at the end of each epoch."""
    seconds = np.cumsum([r["wall_seconds"] for r in metrics])
    return [{"algorithm": name, "epoch": int(r["epoch"]), "seconds": float(s), "reward_mean": float(r["reward_mean"]),
             "reward_std": float(r["reward_std"]), "num_samples": int(r["num_samples"])}
            for r, s in zip(metrics, seconds)]


def table(rows: list[dict], names: list[str]) -> str:
    """Markdown: per algorithm, epochs, samples and seconds in the budget, the first and last epochs' reward."""
    lines = [f"| algorithm | epochs | samples | seconds | reward, first {EDGE} epochs | reward, last {EDGE} epochs "
             "| change |", "|---|---|---|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["algorithm"] == name]
        if not mine:
            continue
        reward = np.array([r["reward_mean"] for r in mine])
        first, last = reward[:EDGE].mean(), reward[-EDGE:].mean()
        lines.append(f"| {name} | {len(mine)} | {sum(r['num_samples'] for r in mine)} | {mine[-1]['seconds']:.1f} "
                     f"| {first:.4f} | {last:.4f} | {last - first:+.4f} |")
    return "\n".join(lines)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` epochs (shorter at the start), to see the trend through the noise."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot(rows: list[dict], names: list[str], path: Path, *, budget_s: float, reward: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, name in enumerate(names):
        mine = [r for r in rows if r["algorithm"] == name]
        if not mine:
            continue
        seconds = np.array([r["seconds"] for r in mine])
        values = np.array([r["reward_mean"] for r in mine])
        color = f"C{i % 10}"
        ax.plot(seconds, values, color=color, alpha=0.3, linewidth=0.8, marker="." if len(mine) < 30 else None)
        ax.plot(seconds, smooth(values, 5), color=color, linewidth=1.8, label=name)
    ax.axvline(budget_s, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training wall-clock (s, cumulative epoch time)")
    ax.set_ylabel(f"mean {reward} per epoch")
    ax.set_title(f"reward vs time, {budget_s:g} s each (thin: per epoch; thick: mean of the last 5)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    names = algorithm_names()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"),
                        help="the config every run starts from")
    parser.add_argument("--out", default="runs/algorithm_curves")
    parser.add_argument("--budget-s", type=float, default=180.0, help="training wall-clock seconds per algorithm")
    parser.add_argument("--algorithms", nargs="+", default=names, choices=names)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides for every algorithm (key=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows: list[dict] = []
    for name in args.algorithms:
        metrics = train_algorithm(name, base_config=Path(args.config), out=out, overrides=args.overrides,
                                  budget_s=args.budget_s, seed=args.seed)
        rows += curve_rows(name, metrics)
        print(f"{name}: {len(metrics)} epochs [{time.time() - start:.0f}s]", flush=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), out / "curves.parquet")
    text = table(rows, args.algorithms)
    (out / "curves.md").write_text(
        f"Reward `color_alignment` against training time, {args.budget_s:g} s per algorithm (the last epoch may run "
        f"past it), seed {args.seed}, from {args.config}"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "") + ".\n\n" + text + "\n"
    )
    plot(rows, args.algorithms, out / "curves.png", budget_s=args.budget_s, reward="color_alignment")
    print(text)
    print(f"\n{out / 'curves.md'}, {out / 'curves.parquet'}, {out / 'curves.png'} [{time.time() - start:.0f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
