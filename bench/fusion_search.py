"""Does `texforce tune` find fusion weights at least as good as a 5x5 grid? (issue #10's fusion check)

Two LoRAs (by default the colour and the shape text-encoder LoRAs that `bench/evidence.py
--methods texforce_color texforce_shape` trains, seed 0), fused on the toy model and judged on
the held-out prompts against the demo's reward, sampled as the demo samples. Both searches are
`texforce tune` runs on one *selection* set of images (`--select-seeds` per prompt, noise seeds
that no other evaluation uses): the 5x5 grid over [0, 1]^2, and the default search
(`--num-samples` trials: the four corners first, then random, or Optuna's TPE when installed).

A search's best is the largest of many noisy estimates, so its selection score flatters it. The
best alphas of both searches, the base model, each LoRA alone and both at 1 are therefore scored
again on other images (`--confirm-seeds` per prompt: the held-out images of `bench/evidence.py`
and the demo), and compared there pair by pair, image by image.

Writes into --out: `grid/` and `search/` (each `texforce tune`'s outputs: results.parquet,
best.json, best_lora/, objective.png), `confirm.parquet` (per image: prompt, seed, each point's
reward), `fusion_search.md` (the table) and `fusion_search.png` (the grid's objective with the
search's trials on it). Finished searches are reused.

    python bench/fusion_search.py --out runs/fusion_search        # after bench/evidence.py (above)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.config import load_config  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from evidence import attribute_accuracy, held_out_set  # noqa: E402

SELECTION_SEED_OFFSET = 1_000_000
"""The selection set's noise seeds start this far past the held-out evaluation's (`evaluation.seed_base`)."""


def run_tune(name: str, common: list[str], extra: list[str], out: Path, num_cpus: int) -> dict:
    """`texforce tune COMMON EXTRA --out OUT/NAME --num-cpus N`, kept if it finished every trial before, resumed if
    it stopped short (Ctrl-C, a failed trial: its best.json then holds the finished trials' best); returns its
    best.json."""
    from tune.cli import main as tune_main
    from tune.sweep import can_resume, read_sweep_record

    sweep_dir = out / name
    best = sweep_dir / "best.json"
    if best.exists():
        job, settings = read_sweep_record(sweep_dir)
        found = json.loads(best.read_text())
        if found["num_trials"] == settings.num_trials(len(job.loras)):
            return found
    resume = can_resume(sweep_dir / "ray_results")
    argv = ["--resume", str(sweep_dir)] if resume else [*common, *extra, "--out", str(sweep_dir)]
    code = tune_main(["tune", *argv, "--num-cpus", str(num_cpus)])
    if code != 0:
        raise SystemExit(code)
    return json.loads(best.read_text())


def grid_surface(results: Path, grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha_1 values [K], alpha_2 values [K], objective [K, K]) of a grid sweep's results.parquet."""
    import pyarrow.parquet as pq

    rows = pq.read_table(results).to_pylist()
    values = np.linspace(0.0, 1.0, grid)
    z = np.full((grid, grid), np.nan)
    for r in rows:
        i, j = int(np.argmin(abs(values - r["alpha_1"]))), int(np.argmin(abs(values - r["alpha_2"])))
        z[i, j] = r["objective"]
    return values, values, z


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="the demo's config")
    parser.add_argument("--loras", nargs=2, default=["runs/evidence/texforce_color_seed0/final_lora",
                                                      "runs/evidence/texforce_shape_seed0/final_lora"])
    parser.add_argument("--names", nargs=2, default=["colour LoRA", "shape LoRA"], help="what the two LoRAs are")
    parser.add_argument("--out", default="runs/fusion_search")
    parser.add_argument("--grid", type=int, default=5, help="grid points per alpha")
    parser.add_argument("--num-samples", type=int, default=16, help="trials of the default search")
    parser.add_argument("--select-seeds", type=int, default=96,
                        help="images per held-out prompt, searches (at 32 the best of two good alphas was noise)")
    parser.add_argument("--confirm-seeds", type=int, default=96, help="images per held-out prompt, confirmation")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance (a trial takes one)")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value), e.g. model.pretrained=...")
    args = parser.parse_args(argv)

    from tune.evaluate import paired_gain, summarize
    from tune.worker import FusionJob, evaluate_alphas

    config = load_config(args.config, args.overrides)
    s = config.sample
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    # 1. both searches, as a user runs them, on the selection set
    common = ["--model", str(config.model.pretrained), "--lora", args.loras[0], "--lora", args.loras[1],
              "--prompts", str(config.evaluation.prompts_file), "--objective", config.reward.spec,
              "--seeds", str(args.select_seeds), "--base-seed", str(config.evaluation.seed_base + SELECTION_SEED_OFFSET),
              "--steps", str(s.num_steps), "--eta", str(s.eta), "--guidance", str(s.guidance_scale),
              "--batch-size", "16", "--device", config.model.device]
    grid = run_tune("grid", common, ["--grid", str(args.grid)], out, args.num_cpus)
    print(f"grid: best {grid['objective']:.4f} at {grid['alphas']} [{time.time() - start:.0f}s]", flush=True)
    search = run_tune("search", common, ["--num-samples", str(args.num_samples)], out, args.num_cpus)
    print(f"search ({search['search']}, {search['num_trials']} trials): best {search['objective']:.4f} at "
          f"{search['alphas']} [{time.time() - start:.0f}s]", flush=True)

    # 2. the candidates, scored again on the confirmation set
    points = {"base": [0.0, 0.0], f"{args.names[0]} alone": [1.0, 0.0], f"{args.names[1]} alone": [0.0, 1.0],
              "both at 1": [1.0, 1.0], f"best of the {args.grid}x{args.grid} grid": grid["alphas"],
              f"best of `texforce tune` ({search['num_trials']} trials)": search["alphas"]}
    held_out, confirm = held_out_set(config, args.confirm_seeds)
    confirm = dataclasses.replace(confirm, batch_size=16)
    job = FusionJob(model=str(config.model.pretrained), loras=tuple(args.loras), prompts=tuple(held_out),
                    reward=config.reward.spec, settings=confirm, device=config.model.device)
    def key(alphas: list[float]) -> tuple[float, float]:
        return round(alphas[0], 6), round(alphas[1], 6)

    scored = {}  # one evaluation per distinct alpha pair (a search's best may be a corner)
    for name, alphas in points.items():
        if key(alphas) not in scored:
            scored[key(alphas)] = evaluate_alphas(job, alphas)
        print(f"confirmed {name} {alphas}: {scored[key(alphas)].objective.mean():.4f} [{time.time() - start:.0f}s]",
              flush=True)
    results = {name: scored[key(alphas)] for name, alphas in points.items()}

    # 3. the table: selection score, confirmation score and paired differences
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = next(iter(results.values()))
    pq.write_table(pa.table({"prompt": first.prompts, "seed": first.seeds,
                             **{name: r.objective for name, r in results.items()}}), out / "confirm.parquet")
    selection = {key([r["alpha_1"], r["alpha_2"]]): r["objective"]  # every trial of both searches
                 for sweep in ("grid", "search") for r in pq.read_table(out / sweep / "results.parquet").to_pylist()}
    base = results["base"].objective
    grid_best = results[f"best of the {args.grid}x{args.grid} grid"].objective
    header = (f"Selection: {len(held_out)} held-out prompts x {args.select_seeds} seeds; confirmation: x "
              f"{args.confirm_seeds} other seeds ({len(base)} images); {s.num_steps} steps, eta {s.eta:g}, "
              f"guidance {s.guidance_scale:g}; objective `{config.reward.spec}`.")
    columns = ("| fused model | alphas | selection objective | confirmed objective | colour right | shape right "
               "| minus base (paired) | minus grid's best (paired) |")
    lines = [header, "", columns, "|---|---|---|---|---|---|---|---|"]
    for name, alphas in points.items():
        r = results[name]
        chosen = selection.get(key(alphas), float("nan"))
        color, shape = (attribute_accuracy(r.scores, a) for a in ("color", "shape"))
        over_base, over_grid = paired_gain(base, r.objective), paired_gain(grid_best, r.objective)
        lines.append(f"| {name} | ({alphas[0]:.2f}, {alphas[1]:.2f}) | {chosen:.4f} | "
                     f"{r.objective.mean():.4f} +- {summarize(r.objective)['sem']:.4f} | {color:.3f} | {shape:.3f} | "
                     f"{over_base['mean']:+.4f} +- {over_base['sem']:.4f} | {over_grid['mean']:+.4f} +- {over_grid['sem']:.4f} |")
    text = "\n".join(lines)
    (out / "fusion_search.md").write_text(text + "\n")

    from tune.plots import plot_objective

    trials = pq.read_table(out / "search" / "results.parquet").to_pylist()
    plot_objective(np.array([[t["alpha_1"], t["alpha_2"]] for t in trials]), np.array([t["objective"] for t in trials]),
                   out / "fusion_search.png", names=args.names,
                   title=f"{config.reward.spec}, selection set\n(colours: the {args.grid}x{args.grid} grid; "
                         f"dots: `texforce tune`'s trials)", background=grid_surface(out / "grid" / "results.parquet", args.grid))
    print(text)
    print(f"\n{out / 'fusion_search.md'}, {out / 'confirm.parquet'}, {out / 'fusion_search.png'} [{time.time() - start:.0f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
