"""Does a configuration gain on every seed? Held-out gains of finished runs, grouped by configuration.

Each run's `evaluation.parquet` holds its held-out rewards image by image before training (epoch -1)
and after its last evaluated epoch, over the same (prompt, seed) pairs, so a run's gain is paired
over those images (`tune.evaluate.paired_gain`). Per group this prints each seed's gain +- its
standard error (over the images, and counting the held-out prompts as the draws: what a claim about unseen
prompts of their kind rests on), the mean +- std over seeds, the mean gain per prompt with its standard error
counting both the training seeds and the held-out prompts as draws (`tune.evaluate.seeds_and_prompts_sem`), how many
seeds gain by more than 3 standard errors (over the images),
and how alike the seeds' per-prompt gains are (the mean correlation between two seeds' gains on
each held-out prompt: do the same pairs move?), and, for a reward with parts (`object_alignment`: colour
and shape right), how each part moved and how closely its change follows the seed's gain: which part
separates the seeds. Every run must have been scored on the same images (the same "before" rewards),
so groups compare like with like.

    python bench/seed_gains.py --group random runs/tiny_s0 runs/tiny_s1 runs/tiny_s2 \
        --group cycle runs/cycle_s0 runs/cycle_s1 runs/cycle_s2 --out runs/seed_gains

A group's name may end in `@EPOCH` to read the evaluation after that epoch instead of the last one,
so runs evaluated along the way compare with themselves at other lengths (`--group 20-epochs@19 ...
--group 40-epochs@39 ...` on the same 40-epoch runs).

Writes into --out: `seed_gains.md` (the table printed), `seed_gains.json` (per run: group, seed,
gain, standard error, per-prompt gains) and `seed_gains.png` (one column per group, a point per seed).
"""
from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

from rl.run_dir import RunDirectory
from tune.evaluate import paired_gain, seeds_and_prompts_sem, summarize

MIN_STANDARD_ERRORS = 3.0


class RunError(ValueError):
    """A folder that is not a finished, evaluated run, or runs scored on different images (a user error)."""


def read_run(path: Path, epoch: int | None = None) -> dict:
    """A run's seed and held-out rewards before training and after `epoch` (None: its last evaluation)."""
    run = RunDirectory(path)
    if not run.evaluation_path.is_file():
        raise RunError(f"{path}: no evaluation.parquet (not a run, or one trained without evaluation.prompts_file)")
    rows = run.read_evaluations()
    if len(rows) < 2 or rows[0]["epoch"] != -1:
        raise RunError(f"{path}: evaluation.parquet has no evaluation both before and after training")
    after_epoch = {int(row["epoch"]): row for row in rows[1:]}
    after = rows[-1] if epoch is None else after_epoch.get(epoch)
    if after is None:
        raise RunError(f"{path}: no evaluation after epoch {epoch} (it has {', '.join(map(str, after_epoch))}); "
                       "pick one of those after the group's @")
    config = run.load_config()
    return {"path": str(path), "seed": config.seed, "epoch": int(after["epoch"]),
            "images_per_prompt": config.evaluation.num_seeds,
            "before": np.asarray(rows[0]["rewards"], dtype=np.float64),
            "after": np.asarray(after["rewards"], dtype=np.float64),
            "parts": part_changes(rows[0], after)}


def part_changes(before: dict, after: dict) -> dict[str, float]:
    """How each part of a composite reward moved (`object_alignment`: colour and shape right), from the
    evaluation's per-part means (`reward_<spec>_<part>_mean`); empty for a reward without parts."""
    prefix = f"reward_{after.get('reward_spec')}_"
    return {key[len(prefix):-len("_mean")]: float(after[key] - before[key]) for key in sorted(after)
            if key.startswith(prefix) and key.endswith("_mean") and key != f"{prefix}mean"
            and before.get(key) is not None and after[key] is not None}


def group_epoch(name: str) -> int | None:
    """The epoch a group name asks for (`40-epochs@39` -> 39), None without an `@EPOCH` suffix."""
    _, at, epoch = name.rpartition("@")
    return int(epoch) if at else None


def gain_of(run: dict) -> dict:
    """The paired gain over the run's images, and its mean gain per held-out prompt (rewards are prompt-major)."""
    prompt_of_image = np.arange(len(run["before"])) // run["images_per_prompt"]
    gain = paired_gain(run["before"], run["after"], prompt_of_image)
    # over each prompt's finite pairs, as the paired gain leaves a non-finite score out
    per_prompt = np.nanmean((run["after"] - run["before"]).reshape(-1, run["images_per_prompt"]), axis=1)
    return {"gain": gain["mean"], "sem": gain["sem"], "sem_over_prompts": gain["sem_over_prompts"],
            "images": gain["n"], "per_prompt": per_prompt.tolist(), "parts": run["parts"]}


def check_same_images(runs: list[dict]) -> None:
    """Refuse runs whose base scores differ: they were evaluated on different images or models."""
    first = runs[0]
    for run in runs[1:]:
        if not np.array_equal(run["before"], first["before"], equal_nan=True):  # False for other shapes too
            raise RunError(f"{run['path']} was evaluated on other images than {first['path']} (its scores before "
                           "training differ): compare runs with the same base model and evaluation settings")


def mean_correlation(per_prompt: list[list[float]]) -> float:
    """Mean Pearson correlation of the per-prompt gains over every pair of runs (nan below 2 runs)."""
    pairs = [np.corrcoef(a, b)[0, 1] for a, b in combinations(per_prompt, 2)]
    return float(np.mean(pairs)) if pairs else float("nan")


def summarize_group(name: str, rows: list[dict]) -> dict:
    gains = np.array([r["gain"] for r in rows])
    summary = summarize(gains)
    per_prompt = np.array([r["per_prompt"] for r in rows])  # [seeds, prompts]
    return {"group": name, "seeds": len(rows), "mean": summary["mean"], "std": summary["std"],
            # the seeds' mean gain as a claim about another training seed on unseen prompts of their kind
            "mean_per_prompt": float(per_prompt.mean()),
            "sem_over_seeds_and_prompts": seeds_and_prompts_sem(per_prompt),
            "above": sum(r["gain"] > MIN_STANDARD_ERRORS * r["sem"] for r in rows),
            "positive": sum(r["gain"] > 0 for r in rows),
            "correlation": mean_correlation([r["per_prompt"] for r in rows]),
            "parts": {part: summarize_part(gains, np.array([r["parts"][part] for r in rows]))
                      for part in set.intersection(*(set(r["parts"]) for r in rows))}}


def summarize_part(gains: np.ndarray, changes: np.ndarray) -> dict:
    """Which part of the reward separates the seeds: its change per seed, and how that follows the seed's gain
    (the Pearson correlation over seeds; nan below 3 seeds or where either does not vary)."""
    summary = summarize(changes)
    varies = len(changes) >= 3 and np.ptp(changes) > 0 and np.ptp(gains) > 0
    return {"mean": summary["mean"], "std": summary["std"], "rising": int(np.sum(changes > 0)),
            "correlation": float(np.corrcoef(changes, gains)[0, 1]) if varies else float("nan")}


def _ratio(gain: float, sem: float) -> str:
    """The gain in standard errors ("n/a" where every image or prompt moved alike: no spread to measure it by)."""
    return f"{gain / sem:+.1f}" if sem > 0 else "n/a"


def table(rows: list[dict], groups: list[dict]) -> str:
    header = ("| group | seed | held-out gain, paired | standard errors | standard error counting the prompts as the "
              "draws | standard errors |")
    lines = [header, "|---|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['seed']} | {r['gain']:+.4f} +- {r['sem']:.4f} | {_ratio(r['gain'], r['sem'])} | "
              f"{r['sem_over_prompts']:.4f} | {_ratio(r['gain'], r['sem_over_prompts'])} |" for r in rows]
    lines += ["", (f"| group | seeds | mean +- std over seeds | the mean gain per prompt, SE counting the seeds "
                   f"and the prompts as draws | above {MIN_STANDARD_ERRORS:g} SE | positive | per-prompt correlation "
                   "between seeds |"), "|---|---|---|---|---|---|---|"]
    for g in groups:
        pooled, sem = g["mean_per_prompt"], g["sem_over_seeds_and_prompts"]
        lines.append(f"| {g['group']} | {g['seeds']} | {g['mean']:+.4f} +- {g['std']:.4f} | {pooled:+.4f} +- {sem:.4f} "
                     f"({_ratio(pooled, sem)}) | {g['above']} of {g['seeds']} | {g['positive']} of {g['seeds']} | "
                     f"{g['correlation']:.2f} |")
    parts = [(g, part, g["parts"][part]) for g in groups for part in sorted(g["parts"])]
    if parts:
        lines += ["", ("| group | reward part | change, mean +- std over seeds | rising | correlation of its "
                       "change with the seed's gain |"), "|---|---|---|---|---|"]
        lines += [f"| {g['group']} | {part} | {p['mean']:+.4f} +- {p['std']:.4f} | {p['rising']} of {g['seeds']} | "
                  f"{p['correlation']:.2f} |" for g, part, p in parts]
    return "\n".join(lines)


def plot(rows: list[dict], groups: list[dict], path: Path, base: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(groups), 3.8), dpi=120)
    points: dict[str, list[tuple[float, float]]] = {}  # a run's points, one per group it is in
    for x, group in enumerate(groups):
        members = [r for r in rows if r["group"] == group["group"]]
        offsets = np.linspace(-0.25, 0.25, len(members)) if len(members) > 1 else [0.0]
        for dx, r in zip(offsets, members):
            ax.errorbar(x + dx, r["gain"], yerr=r["sem"], fmt="o", color="C0", ms=4, capsize=2)
            ax.annotate(str(r["seed"]), (x + dx, r["gain"]), textcoords="offset points", xytext=(4, 2), fontsize=7)
            points.setdefault(r["run"], []).append((x + dx, r["gain"]))
        ax.hlines(group["mean"], x - 0.35, x + 0.35, color="C3", lw=2)
    for run_points in points.values():  # the same run at other epochs (NAME@EPOCH groups): join its points
        if len(run_points) > 1:
            ax.plot(*zip(*run_points), color="C0", lw=0.6, alpha=0.4)
    ax.axhline(0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(groups)), [g["group"] for g in groups])
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel("held-out gain (paired, +-1 SE)")
    ax.set_title(f"held-out gain per seed (base {base:.3f}; red: mean over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", nargs="+", action="append", required=True, metavar=("NAME", "RUN_DIR"),
                        help="a configuration's name and its run directories (repeat for each configuration)")
    parser.add_argument("--out", type=Path, required=True, help="folder for seed_gains.md / .json / .png")
    args = parser.parse_args(argv)
    for group in args.group:
        if len(group) < 2:
            parser.error(f"--group {group[0]}: give the group's run directories after its name")
        try:
            group_epoch(group[0])
        except ValueError:
            parser.error(f"--group {group[0]}: after @ give the epoch whose evaluation to read, "
                         f"e.g. {group[0].rpartition('@')[0]}@19")
    names = [g[0] for g in args.group]
    if len(set(names)) < len(names):
        parser.error(f"--group names must differ, got {names}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [(group[0], read_run(Path(path), group_epoch(group[0]))) for group in args.group for path in group[1:]]
        check_same_images([run for _, run in runs])
    except (RunError, FileNotFoundError) as error:
        print(f"seed_gains.py: error: {error}", file=sys.stderr)
        return 2
    rows = [{"group": name, "seed": run["seed"], "run": run["path"], "epoch": run["epoch"], **gain_of(run)}
            for name, run in runs]
    groups = [summarize_group(g[0], [r for r in rows if r["group"] == g[0]]) for g in args.group]
    text = table(rows, groups)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed_gains.md").write_text(text + "\n")
    (args.out / "seed_gains.json").write_text(json.dumps({"runs": rows, "groups": groups}, indent=1))
    plot(rows, groups, args.out / "seed_gains.png", base=float(runs[0][1]["before"].mean()))
    print(f"wrote {args.out}/seed_gains.md, .json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
