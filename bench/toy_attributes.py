"""How often does a toy-world model draw the colour and the shape its prompt names, on the
train pairs and on the held-out pairs (`toyworld.captions`)?

Samples every prompt of each split with the project's sampler (`tune.evaluate.generate`, one
seed per image; unlike `texforce eval`, every image has its own seed, so no two prompts share
their noise and the images are independent draws), reads the object back with `toyworld.reader`, and
prints per split: colour, shape and attribute accuracy (the mean of the two, i.e. the mean
`object_alignment`), both right, no object found, and mean `color_alignment`, each with its
standard error. Optionally saves the image grids with what was read.

    python bench/toy_attributes.py runs/tiny-sd --seeds 1 --held-out-seeds 3 --out runs/toy-attributes
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rewards
from rl.models import load_pipeline
from rl.sampling import images_to_float
from toyworld.captions import held_out_combinations, parse_caption, prompts_for, train_combinations
from toyworld.reader import read_objects
from tune.evaluate import EvalSettings, generate, summarize


def measure(pipe, prompts: list[str], settings: EvalSettings) -> tuple[dict[str, dict[str, float]], torch.Tensor, list[str]]:
    """Sample every prompt `settings.num_seeds` times, seeds `base_seed`, `base_seed + 1`, ... one per
    image, and read them back: (summaries by figure, uint8 images, "prompt -> what was read" per image).
    """
    all_prompts = [p for p in prompts for _ in range(settings.num_seeds)]
    seeds = list(range(settings.base_seed, settings.base_seed + len(all_prompts)))
    images = generate(pipe, all_prompts, seeds, settings)
    x = images_to_float(images)
    read = read_objects(x).names()
    named = [parse_caption(p) for p in all_prompts]
    color = torch.tensor([r[0] == n[0] for r, n in zip(read, named)], dtype=torch.float64)
    shape = torch.tensor([r[1] == n[1] for r, n in zip(read, named)], dtype=torch.float64)
    none = torch.tensor([r == (None, None) for r in read], dtype=torch.float64)
    color_alignment = rewards.build_reward("color_alignment")(x, all_prompts).scores.double()
    figures = {
        "color": color, "shape": shape, "attributes": (color + shape) / 2, "both": color * shape,
        "no_object": none, "color_alignment": color_alignment,
    }  # fmt: skip
    labels = [f"{p} -> {r[0]} {r[1]}" for p, r in zip(all_prompts, read)]
    return {name: summarize(v.numpy()) for name, v in figures.items()}, images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a toy-world model directory (texforce make-tiny DIR --pretrain-steps N)")
    parser.add_argument("--seeds", type=int, default=1, help="images per train prompt (60 prompts)")
    parser.add_argument("--held-out-seeds", type=int, default=3, help="images per held-out prompt (20 prompts)")
    parser.add_argument("--num-steps", type=int, default=10, help="DDIM steps (the demo's 10)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG weight (the demo's 5)")
    parser.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1: the policy RL samples from)")
    parser.add_argument("--out", default=None, help="a folder for grid_<split>.png and summary.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    pipe = load_pipeline(args.model, device="cpu")
    results = {}
    for split, combos, num_seeds, base_seed in (
        ("train", train_combinations(), args.seeds, 0),
        ("held_out", held_out_combinations(), args.held_out_seeds, 100_000),
    ):
        settings = EvalSettings(num_seeds=num_seeds, base_seed=base_seed, num_steps=args.num_steps,
                                guidance_scale=args.guidance_scale, eta=args.eta, batch_size=16)  # fmt: skip
        start = time.perf_counter()
        results[split], images, labels = measure(pipe, prompts_for(combos), settings)
        print(f"{split} ({len(labels)} images, {time.perf_counter() - start:.0f} s)")
        for name, s in results[split].items():
            print(f"  {name:16s} {s['mean']:.3f} +- {s['sem']:.3f}")
        if args.out:
            from rl.plots import save_image_grid

            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_image_grid(images, labels, Path(args.out) / f"grid_{split}.png", columns=10)
            torch.save({"images": images, "labels": labels}, Path(args.out) / f"images_{split}.pt")
    if args.out:
        summary = {"model": args.model, "settings": vars(args), "results": results}
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
