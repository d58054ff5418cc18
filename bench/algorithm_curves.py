"""Reward against wall-clock time for every registered algorithm, trained for the same budget.

Each algorithm in `rl.algorithms` (PPO and the gradient learners DRaFT, DRaFT-K, DRaFT-LV, ReFL,
AlignProp, TextCraftor) trains from the same config (`configs/tiny.yaml`, the demo's, by default)
on the same differentiable reward (`--reward`, default `color_alignment`: the share of the image in
the prompt's colour), in-process (`resources.mode=inline`), until
its training time passes `--budget-s` seconds; the epoch running then is finished and is the
run's last (final LoRA written), so a run overshoots by up to one epoch. Time is the cumulative
`wall_seconds` of the run's epochs (model loading, logging and checkpoints excluded), so the
curves compare reward per second of training, not per epoch. The default budget, 400 s, is what
the PPO demo's 20 epochs take inline on 2 cores (19-21 s each).

A training curve's epochs draw different prompts and seeds, so it is noisy (about 0.01 per epoch
at 256 samples). Whether a run learnt is therefore measured as the demo measures it: the base
model and every final LoRA are scored on one fixed held-out set (the config's
`evaluation.prompts_file`, `--eval-seeds` seeds per prompt, sampled as the config samples), and
each algorithm's gain is the paired difference image by image, with its standard error.

One run says little about an algorithm (a seed can hack the reward or stall), so `--seeds` trains
each algorithm once per seed (the seed draws the LoRA's init, the prompts and the noise; the
held-out images stay the same) and the table gives the gain's mean +- std over seeds and on how
many seeds it exceeds 3 standard errors.

Writes into --out: one run directory per seed and algorithm (`seed{s}/{algorithm}`), `curves.parquet`
(one row per seed, algorithm and epoch), `held_out.parquet` (one row per seed and algorithm: held-out
reward and paired gain), `curves.png` (every algorithm's reward against seconds in one figure, and
the held-out gains) and `curves.md` (per seed: epochs in the budget, the first and last epochs'
training reward, the held-out gain; then per algorithm over seeds). A run with a final LoRA is
reused as it is, and the scores of every model are kept (`scores/`), so an interrupted sweep goes on
where it stopped (a run directory without a final LoRA is trained again from the start; delete one
to retrain it).

Costs about budget x algorithms x seeds of wall-clock, plus each run's model loading and the scoring:

    python bench/algorithm_curves.py --out runs/algorithm_curves --budget-s 400 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.algorithms import algorithm_names  # noqa: E402
from rl.config import load_config  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from evidence import held_out_set, rows_for, score_model  # noqa: E402

# What each algorithm changes on top of the config; the user's overrides win over these (so
# `--algorithms textcraftor train.learning_rate=1e-3` trains one variant). Every one trains on the
# differentiable `--reward`; the in-run held-out evaluation is PPO's only, so it is always off and
# every final LoRA is scored afterwards on the same images (`score_final_loras`). The
# U-Net gradient learners follow the DRaFT paper's small-scale settings (AdamW weight decay 0.1,
# LoRA rank 8 as in configs/tiny.yaml) with the learning rate scaled up for the toy model (1e-3, as
# bench/evidence.py's ReFL); TextCraftor keeps the text-encoder LoRA at a tenth of that (1e-4: the
# official code's lr is 1e-6 on the full encoder; at 1e-3 its LoRA, trained only through the last
# steps, lowered held-out reward by 11 SE, docs/gradient_learners.md), and PPO keeps the demo's settings.
COMMON = ["evaluation.prompts_file=null"]
UNET_GRADIENT = ["lora.policy=unet", "train.learning_rate=1e-3", "train.weight_decay=0.1"]
METHOD_OVERRIDES: dict[str, list[str]] = {
    "ppo": [],
    "draft": UNET_GRADIENT,
    "draft_k": UNET_GRADIENT,
    "draft_lv": UNET_GRADIENT,
    "refl": UNET_GRADIENT,
    "alignprop": UNET_GRADIENT,
    "textcraftor": ["train.learning_rate=1e-4"],
}
MAX_EPOCHS = 1000  # the budget stops a run long before this
EDGE = 3  # epochs averaged at each end of a run for the table


def train_algorithm(name: str, *, base_config: Path, out: Path, overrides: list[str], budget_s: float,
                    seed: int, reward: str) -> tuple[list[dict], Path]:
    """Train `name` until its cumulative epoch time passes `budget_s` (unless its run already has a
    final LoRA); returns the run's metrics rows, by epoch, and its final LoRA file."""
    from actors.driver import train
    from rl.run_dir import RunDirectory

    run = RunDirectory(out / name)
    lora = run.final_lora / "pytorch_lora_weights.safetensors"
    if lora.exists():
        trained_on = load_config(run.path / "config.yaml").reward.spec
        if trained_on != reward:
            raise SystemExit(f"algorithm_curves.py: {run.path} was trained on {trained_on}, not {reward}; "
                             "use another --out for another --reward")
    else:
        if run.path.exists():
            shutil.rmtree(run.path)  # an unfinished run: its budget cannot be split across two starts
        config = load_config(base_config, [f"num_epochs={MAX_EPOCHS}", f"train.algorithm={name}", f"reward.spec={reward}",
                                           *METHOD_OVERRIDES.get(name, []), *overrides, *COMMON, f"seed={seed}",
                                           f"run_name={name}", f"output_dir={out}", "resources.mode=inline"])
        spent = 0.0

        def budget_spent(epoch: int, row: dict) -> bool:
            nonlocal spent
            spent += row["wall_seconds"]
            return spent >= budget_s

        train(config, on_epoch_end=budget_spent)
    return sorted(run.read_metrics(), key=lambda r: r["epoch"]), lora


def score_final_loras(loras: dict[tuple[str, int], Path], *, base_config: Path, out: Path, overrides: list[str],
                      eval_seeds: int, reward: str) -> list[dict]:
    """Score the base model and each (algorithm, seed)'s final LoRA on the config's held-out prompts
    (`eval_seeds` seeds each, the same images for all): `evidence.rows_for`'s rows, the base's first
    (method "base", seed -1), each with the paired gain over the base."""
    from tune.evaluate import eval_set
    from tune.worker import FusionJob

    config = load_config(base_config, overrides)
    if config.evaluation.prompts_file is None:
        raise SystemExit("algorithm_curves.py: the config names no evaluation.prompts_file to score the runs on")
    held_out, settings = held_out_set(config, eval_seeds)
    image_prompts = eval_set(held_out, settings)[0]

    def job(lora: Path | None) -> FusionJob:
        return FusionJob(model=str(config.model.pretrained), loras=(str(lora),) if lora else (), prompts=tuple(held_out),
                         reward=reward, settings=settings, device=config.model.device)

    def row(name: str, seed: int, scores: dict[str, np.ndarray]) -> dict:
        unfused = {key: value for key, value in rows_for(name, seed, scores, base, image_prompts).items()
                   if not key.startswith("over_")}
        return {**unfused, "num_images": len(scores["reward"])}

    base = score_model(job(None), out / "scores" / "base.parquet")
    return [row("base", -1, base)] + [row(name, seed, score_model(job(lora), out / "scores" / f"seed{seed}_{name}.parquet"))
                                      for (name, seed), lora in loras.items()]


def curve_rows(name: str, seed: int, metrics: list[dict]) -> list[dict]:
    """The curve of one run: seconds is the cumulative training time at the end of each epoch."""
    seconds = np.cumsum([r["wall_seconds"] for r in metrics])
    return [{"algorithm": name, "seed": seed, "epoch": int(r["epoch"]), "seconds": float(s),
             "reward_mean": float(r["reward_mean"]), "reward_std": float(r["reward_std"]),
             "num_samples": int(r["num_samples"])}
            for r, s in zip(metrics, seconds)]


def _by_run(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Curve rows grouped by (algorithm, seed), epochs in order."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        runs.setdefault((r["algorithm"], r["seed"]), []).append(r)
    return runs


def _gains(held_out: list[dict], name: str) -> tuple[np.ndarray, float]:
    """An algorithm's held-out gains, one per seed, and their std over seeds (0 for one seed)."""
    gains = np.array([r["gain"] for r in held_out if r["method"] == name])
    return gains, float(gains.std(ddof=1)) if len(gains) > 1 else 0.0


def _right(row: dict) -> str:
    """Colour / shape right (the object rewards' exact reading), '-' for other rewards."""
    return "-" if np.isnan(row["color"]) else f"{row['color']:.3f} / {row['shape']:.3f}"


def table(rows: list[dict], held_out: list[dict], names: list[str]) -> str:
    """Markdown: per run, epochs and samples in the budget, the first and last epochs' training reward
    and the final LoRA's held-out gain over the base; then per algorithm, the gain over seeds."""
    base = held_out[0]
    scored = {(r["method"], r["seed"]): r for r in held_out[1:]}
    seeds = sorted({seed for _, seed in scored})
    lines = [(f"Base model, held-out: {base['reward']:.4f} +- {base['reward_sem']:.4f}; colour / shape right "
              f"{_right(base)}."), "",
             (f"| algorithm | seed | epochs | samples | seconds | training reward, first {EDGE} epochs | last {EDGE} "
              "epochs | held-out | held-out gain (paired) | gain / SE | colour / shape right |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    runs = _by_run(rows)
    for name in names:
        for seed in seeds:
            mine = runs.get((name, seed))
            if not mine:
                continue
            reward = np.array([r["reward_mean"] for r in mine])
            h = scored[name, seed]
            ratio = f"{h['gain'] / h['gain_sem']:+.1f}" if h["gain_sem"] > 0 else "-"
            lines.append(f"| {name} | {seed} | {len(mine)} | {sum(r['num_samples'] for r in mine)} "
                         f"| {mine[-1]['seconds']:.1f} | {reward[:EDGE].mean():.4f} | {reward[-EDGE:].mean():.4f} "
                         f"| {h['reward']:.4f} | {h['gain']:+.4f} +- {h['gain_sem']:.4f} | {ratio} | {_right(h)} |")
    lines += ["", ("| algorithm | seeds | held-out gain, mean +- std over seeds | seeds with gain > 3 SE "
                   "| seeds with gain < -3 SE |"), "|---|---|---|---|---|"]
    for name in names:
        gains, std = _gains(held_out, name)
        if not len(gains):
            continue
        sems = np.array([r["gain_sem"] for r in held_out if r["method"] == name])
        lines.append(f"| {name} | {len(gains)} | {gains.mean():+.4f} +- {std:.4f} | {int((gains > 3 * sems).sum())} "
                     f"| {int((gains < -3 * sems).sum())} |")
    return "\n".join(lines)


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` epochs (shorter at the start), to see the trend through the noise."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (sums[1:] - sums[np.arange(1, len(values) + 1) - counts]) / counts


def plot(rows: list[dict], held_out: list[dict], names: list[str], path: Path, *, budget_s: float, reward: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    seeds = sorted({r["seed"] for r in rows})
    runs = _by_run(rows)
    for i, name in enumerate(names):
        color = f"C{i % 10}"
        for seed in seeds:
            mine = runs.get((name, seed))
            if not mine:
                continue
            seconds = np.array([r["seconds"] for r in mine])
            values = np.array([r["reward_mean"] for r in mine])
            if len(seeds) == 1:  # one run: its raw epochs too; with several seeds they would hide the trends
                ax.plot(seconds, values, color=color, alpha=0.3, linewidth=0.8)
            ax.plot(seconds, smooth(values, 5), color=color, linewidth=1.5, label=name if seed == seeds[0] else None)
        gains, std = _gains(held_out, name)
        if len(gains):
            bars.bar(i, gains.mean(), color=color, alpha=0.6, yerr=std, capsize=3)
            bars.plot(np.full(len(gains), i), gains, "k.", markersize=4)
    ax.axvline(budget_s, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("training wall-clock (s, cumulative epoch time)")
    ax.set_ylabel(f"mean {reward} per epoch (train prompts)")
    ax.set_title(f"reward vs time, {budget_s:g} s each, {len(seeds)} seed(s) (lines: mean of the last 5 epochs)",
                 fontsize=10)
    ax.legend(fontsize=8)
    bars.axhline(0, color="gray", linewidth=0.8)
    bars.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    bars.set_title(f"held-out gain of the final LoRA over the base\n(paired, {held_out[0]['num_images']} images; "
                   "mean +- std, dots: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    names = algorithm_names()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"),
                        help="the config every run starts from")
    parser.add_argument("--out", default="runs/algorithm_curves")
    parser.add_argument("--budget-s", type=float, default=400.0, help="training wall-clock seconds per algorithm")
    parser.add_argument("--algorithms", nargs="+", default=names, choices=names)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per algorithm and seed")
    parser.add_argument("--reward", default="color_alignment", help="the differentiable reward every run trains on "
                        "and the held-out images are scored with")
    parser.add_argument("--eval-seeds", type=int, default=32, help="held-out images per prompt for the final scoring")
    parser.add_argument("overrides", nargs="*", help="config overrides for every algorithm (key=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    rows: list[dict] = []
    loras: dict[tuple[str, int], Path] = {}
    for seed in args.seeds:
        for name in args.algorithms:
            metrics, loras[name, seed] = train_algorithm(name, base_config=Path(args.config), out=out / f"seed{seed}",
                                                         overrides=args.overrides, budget_s=args.budget_s, seed=seed,
                                                         reward=args.reward)
            rows += curve_rows(name, seed, metrics)
            print(f"seed {seed}, {name}: {len(metrics)} epochs [{time.time() - start:.0f}s]", flush=True)
    held_out = score_final_loras(loras, base_config=Path(args.config), out=out, overrides=args.overrides,
                                 eval_seeds=args.eval_seeds, reward=args.reward)
    print(f"scored the base model and {len(loras)} final LoRAs [{time.time() - start:.0f}s]", flush=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), out / "curves.parquet")
    pq.write_table(pa.Table.from_pylist(held_out), out / "held_out.parquet")
    text = table(rows, held_out, args.algorithms)
    (out / "curves.md").write_text(
        f"Reward `{args.reward}` against training time, {args.budget_s:g} s per algorithm (the last epoch may run "
        f"past it), seeds {' '.join(map(str, args.seeds))}, from {args.config}"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "")
        + f"; held-out: {held_out[0]['num_images']} images, the same for every model.\n\n" + text + "\n"
    )
    plot(rows, held_out, args.algorithms, out / "curves.png", budget_s=args.budget_s, reward=args.reward)
    print(text)
    print(f"\n{out / 'curves.md'}, {out / 'curves.parquet'}, {out / 'held_out.parquet'}, {out / 'curves.png'} "
          f"[{time.time() - start:.0f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
