"""The papers' comparison at toy scale: held-out alignment of the base model and after each method.

Every method trains from the committed toy model (`models/toy-sd`) on the 60 train prompts against
`object_alignment`, with the demo's settings (`configs/tiny.yaml`) and a method's overrides, once
per seed, in-process (`resources.mode=inline`). Every resulting model, the fused ones too, is then
scored on the same held-out (prompt, seed) set (the 20 colour x shape pairs never trained on,
`--eval-seeds` seeds each) sampled as the demo samples, so the rows compare like with like:

| method            | what it is                                                                   |
|-------------------|------------------------------------------------------------------------------|
| base              | the toy model                                                                |
| texforce          | PPO on a text-encoder LoRA (the demo)                                        |
| ddpo              | PPO on a U-Net LoRA                                                          |
| texforce + ddpo   | both LoRAs loaded (they touch different modules: the exact fusion at 1, 1)   |
| refl              | ReFL on a U-Net LoRA, gradient of the soft object reading                    |
| refl + texforce   | the ReFL U-Net LoRA with the TexForce text-encoder LoRA (TexForce's recipe)  |

Writes into --out: `evidence.parquet` (one row per method and seed: held-out reward, colour and
shape parts, and the paired gain over the base model with its standard error), `evidence.md`
(mean +- std over seeds) and `evidence.png`. A finished (method, seed) run is reused when the
script is run again, so an interrupted sweep goes on where it stopped.

    python bench/evidence.py --out runs/evidence          # make evidence
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

from rl.config import load_config  # noqa: E402

# What each trained method changes on top of configs/tiny.yaml. ReFL follows the DRaFT paper's
# small-scale settings where they apply (U-Net LoRA rank 8, AdamW weight decay 0.1).
TRAINED = {
    "texforce": [],
    "ddpo": ["lora.policy=unet"],
    "refl": ["train.algorithm=refl", "lora.policy=unet", "train.learning_rate=1e-3", "train.weight_decay=0.1"],
}
# Fused models: which trained LoRAs are loaded together (alpha 1 each).
FUSED = {"texforce + ddpo": ("texforce", "ddpo"), "refl + texforce": ("refl", "texforce")}


def train_method(method: str, seed: int, *, base_config: Path, out: Path, overrides: list[str]) -> Path:
    """Train one (method, seed) unless its final LoRA exists; returns the LoRA file."""
    from actors.driver import train
    from rl.run_dir import RunDirectory

    run_name = f"{method}_seed{seed}"
    lora = out / run_name / "final_lora" / "pytorch_lora_weights.safetensors"
    if lora.exists():
        return lora
    # no held-out evaluation inside the run: the script scores every model itself, once
    config = load_config(base_config, [*overrides, *TRAINED[method], f"seed={seed}", f"run_name={run_name}",
                                       f"output_dir={out}", "resources.mode=inline", "evaluation.prompts_file=null"])
    if RunDirectory(out / run_name).has_progress():  # an interrupted run: go on from its last checkpoint
        train(config, resume=out / run_name)
    else:
        train(config)
    return lora


def score_model(pipe, reward, prompts: list[str], settings, loras: list[Path]) -> dict[str, np.ndarray]:
    """Per-image rewards (and parts) of the base pipeline with `loras` loaded (alpha 1 each)."""
    from tune.evaluate import evaluate
    from tune.fusion import fuse_files, load_fused

    pipe.unload_lora_weights()
    if loras:
        load_fused(pipe, fuse_files(loras, [1.0] * len(loras)))
    result = evaluate(pipe, reward, prompts, settings)
    pipe.unload_lora_weights()
    return {"reward": result.objective, **result.scores}


def rows_for(method: str, seed: int, scores: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict:
    from tune.evaluate import paired_gain, summarize

    gain = paired_gain(base["reward"], scores["reward"])
    row = {"method": method, "seed": seed, "reward": float(scores["reward"].mean()),
           "reward_sem": summarize(scores["reward"])["sem"], "gain": gain["mean"], "gain_sem": gain["sem"]}
    for part in ("object_alignment_color", "object_alignment_shape"):
        if part in scores:
            row[part.removeprefix("object_alignment_")] = float(scores[part].mean())
    return row


def table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per method, mean +- std over seeds of the held-out reward, colour, shape and the paired gain."""
    lines = ["| method | seeds | held-out object_alignment | colour right | shape right | gain over base (paired) |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue

        def cell(key: str) -> str:
            values = np.array([r[key] for r in mine])
            return f"{values.mean():.3f} +- {values.std(ddof=1) if len(values) > 1 else 0.0:.3f}"

        gain = "-" if method == "base" else cell("gain") + " (per seed: " + ", ".join(
            f"{r['gain']:+.3f} +- {r['gain_sem']:.3f}" for r in mine) + ")"
        lines.append(f"| {method} | {len(mine)} | {cell('reward')} | {cell('color')} | {cell('shape')} | {gain} |")
    return "\n".join(lines)


def plot(rows: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 2, 3.6))
    for i, method in enumerate(methods):
        values = np.array([r["reward"] for r in rows if r["method"] == method])
        if len(values):  # mean +- std over seeds, and each seed: the differences are small against 0
            ax.errorbar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0, fmt="s",
                        color="tab:blue", markersize=8, capsize=5)
            ax.scatter(np.full(len(values), i + 0.12), values, color="black", s=14, zorder=3)
    base = [r["reward"] for r in rows if r["method"] == "base"]
    if base:
        ax.axhline(base[0], color="gray", linestyle="--", linewidth=1, label="base")
        ax.legend(loc="upper left")
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right")
    ax.set_xlim(-0.5, len(methods) - 0.5)
    ax.set_ylabel("held-out object_alignment")
    ax.set_title("held-out alignment per method\n(squares: mean +- std over seeds; dots: one seed each)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"), help="the demo's config")
    parser.add_argument("--out", default="runs/evidence")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=[*TRAINED, *FUSED], choices=[*TRAINED, *FUSED])
    parser.add_argument("--eval-seeds", type=int, default=16, help="images per held-out prompt")
    parser.add_argument("overrides", nargs="*", help="config overrides for every trained method (key=value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import rewards
    from rl.models import load_pipeline
    from rl.prompts import read_prompt_file
    from tune.evaluate import EvalSettings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(args.config, args.overrides)
    held_out = read_prompt_file(config.evaluation.prompts_file, option="evaluation.prompts_file")
    s = config.sample
    settings = EvalSettings(num_seeds=args.eval_seeds, base_seed=config.evaluation.seed_base, num_steps=s.num_steps,
                            guidance_scale=s.guidance_scale, eta=s.eta)
    needed = sorted({m for method in args.methods for m in FUSED.get(method, (method,))}, key=list(TRAINED).index)
    start = time.time()
    loras: dict[tuple[str, int], Path] = {}
    for seed in args.seeds:
        for method in needed:
            loras[method, seed] = train_method(method, seed, base_config=Path(args.config), out=out,
                                               overrides=args.overrides)
            print(f"trained {method} seed {seed} [{time.time() - start:.0f}s]", flush=True)

    pipe = load_pipeline(config.model.pretrained, device=config.model.device)
    reward = rewards.build_reward(config.reward.spec)
    base = score_model(pipe, reward, held_out, settings, [])
    rows = [rows_for("base", -1, base, base)]
    for seed in args.seeds:
        for method in args.methods:
            parts = FUSED.get(method, (method,))
            scores = score_model(pipe, reward, held_out, settings, [loras[p, seed] for p in parts])
            rows.append(rows_for(method, seed, scores, base))
            print(f"{method:16s} seed {seed}: held-out {rows[-1]['reward']:.3f}, gain {rows[-1]['gain']:+.3f} "
                  f"+- {rows[-1]['gain_sem']:.3f}", flush=True)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), out / "evidence.parquet")
    methods = ["base", *args.methods]
    text = table(rows, methods)
    (out / "evidence.md").write_text(
        f"{len(held_out)} held-out prompts x {args.eval_seeds} seeds = {len(held_out) * args.eval_seeds} images per "
        f"model, sampled with {s.num_steps} steps, eta {s.eta:g}, guidance {s.guidance_scale:g}; seeds {args.seeds}.\n\n"
        + text + "\n"
    )
    plot(rows, methods, out / "evidence.png")
    print(text)
    print(f"\n{out / 'evidence.md'}, {out / 'evidence.parquet'}, {out / 'evidence.png'} [{time.time() - start:.0f}s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
