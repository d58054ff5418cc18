"""`texforce rewards list` and `texforce score`.

Bad input raises `rewards.RewardError`, which the `texforce` entry prints as one line (exit 2).

    texforce rewards list
    texforce score --reward imagereward --images DIR --prompts prompts.txt \
        --paths imagereward=/ckpt/ImageReward.pt imagereward_tokenizer=/ckpt/bert-base-uncased
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rewards.base import RewardError
from rl.cli import DefaultsHelpFormatter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register the reward subcommands on the `texforce` parser."""
    rewards_parser = sub.add_parser("rewards", help="inspect the available rewards")
    rewards_sub = rewards_parser.add_subparsers(dest="rewards_command", required=True, metavar="{list}")
    list_parser = rewards_sub.add_parser("list", help="each reward, whether it is differentiable, its files")
    list_parser.set_defaults(func=cmd_list)

    score = sub.add_parser("score", formatter_class=DefaultsHelpFormatter,
                           help="score a directory of images and write per-image scores to parquet")
    score.add_argument("--reward", required=True, help="a reward name or 'name:w,name:w' (see `rewards list`)")
    score.add_argument("--images", required=True, type=Path, help="directory of images, scored in sorted order")
    score.add_argument("--prompts", required=True, type=Path,
                       help="text file: one prompt per image (sorted file order) or a single prompt for all")
    score.add_argument("--out", type=Path, default=Path("scores.parquet"), help="parquet file to write")
    score.add_argument("--paths", nargs="*", default=[], metavar="KEY=PATH",
                       help="model files by key, e.g. imagereward=/ckpt/ImageReward.pt")
    score.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    score.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 ('auto': CUDA when available)")
    score.set_defaults(func=cmd_score)


def cmd_list(args: argparse.Namespace) -> int:
    from rewards.registry import list_entries

    for entry in list_entries():
        print(f"{entry.name}  differentiable={'yes' if entry.differentiable else 'no'}  {entry.description}")
        if not entry.files:
            print("    files: none")
        for spec in entry.files:
            print(f"    {spec.describe()}  [env {spec.env_var}]")
    return 0


def parse_paths(items: list[str]) -> dict[str, str]:
    """`["key=/path", ...]` -> `{"key": "/path"}`."""
    paths = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise RewardError(f"--paths takes KEY=PATH items, got {item!r}")
        paths[key.strip()] = value.strip()
    return paths


def read_prompts(path: Path, n_images: int) -> list[str]:
    """One prompt per image, or one prompt repeated; blank lines are ignored."""
    if not path.is_file():
        raise RewardError(f"prompts file {path} not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise RewardError(f"prompts file {path}: line {line} is not UTF-8 text; save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise RewardError(f"prompts file {path} is empty: write one prompt per image, or one prompt for all")
    if len(prompts) == 1:
        return prompts * n_images
    if len(prompts) != n_images:
        raise RewardError(f"{path} has {len(prompts)} prompts for {n_images} images: give one per image or one for all")
    return prompts


def list_images(directory: Path) -> list[Path]:
    """The image files of `directory` in sorted order, each checked to be readable (cheaply,
    without decoding), so a corrupt file fails before any scoring."""
    from PIL import Image

    if not directory.is_dir():
        raise RewardError(f"image directory {directory} not found")
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RewardError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    for file in files:
        try:
            with Image.open(file) as image:
                image.verify()
        except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
            raise _unreadable(file, err) from None
    return files


def _unreadable(path: Path, err: Exception) -> RewardError:
    return RewardError(f"{path} is not a readable image ({type(err).__name__}: {err}); remove or replace it")


def load_image(path: Path):
    """An image file -> `[3,H,W]` float tensor in [0,1]. 16-bit images keep their full range
    (PIL's RGB conversion would clip them to 255); grey images are repeated over RGB."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                array = np.asarray(image, dtype=np.float32) / 65535.0
                array = np.repeat(np.clip(array, 0.0, 1.0)[..., None], 3, axis=-1)
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as err:  # noqa: BLE001 - PIL raises many types for a bad file
        raise _unreadable(path, err) from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def score_directory(reward, files: list[Path], prompts: list[str], *, batch_size: int, device: str,
                    progress: bool = False):
    """Score images in batches of equal size; returns the rows written to parquet. `progress` shows a bar on
    stderr (a reward model on a CPU takes about a second an image)."""
    import torch
    from tqdm.auto import tqdm

    rows = []
    start = 0
    bar = tqdm(total=len(files), desc=f"scoring with {reward.name}", unit="image", disable=not progress, leave=False)
    while start < len(files):
        first = load_image(files[start])
        batch = [first]
        while start + len(batch) < len(files) and len(batch) < batch_size:
            nxt = load_image(files[start + len(batch)])
            if nxt.shape != first.shape:
                break
            batch.append(nxt)
        names = files[start:start + len(batch)]
        texts = prompts[start:start + len(batch)]
        with torch.no_grad():
            output = reward(torch.stack(batch).to(device), texts)
        for i, (name, text) in enumerate(zip(names, texts)):
            row = {"file": name.name, "prompt": text, "score": float(output.scores[i])}
            row.update({part: float(values[i]) for part, values in output.parts.items()})
            rows.append(row)
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    return rows


def cmd_score(args: argparse.Namespace) -> int:
    """Every input is checked before the reward model loads; errors are RewardError or, for prompts the reward reads
    nothing in, ConfigError (one line, exit 2)."""
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rewards.registry import build_reward, check_path_keys, check_reward
    from rl.models import check_device, resolve_device
    from rl.preflight import check_prompts_are_read
    from rl.run_dir import make_output_dir, refuse_existing

    if args.batch_size < 1:
        raise RewardError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out.is_dir():
        raise RewardError(
            f"--out {args.out} is a directory; give the parquet file to write, e.g. {args.out / 'scores.parquet'}"
        )
    refuse_existing([args.out])
    check_device(args.device, option="--device", local=True)
    device = str(resolve_device(args.device))
    paths = parse_paths(args.paths)
    check_reward(args.reward, paths=paths)
    check_path_keys(paths, [args.reward])
    files = list_images(args.images)
    prompts = read_prompts(args.prompts, len(files))
    check_prompts_are_read(args.reward, prompts, source=f"--prompts {args.prompts}",
                           outcome="the scores would measure nothing")
    make_output_dir(args.out.parent, "--out")
    reward = build_reward(args.reward, device=device, paths=paths)
    rows = score_directory(reward, files, prompts, batch_size=args.batch_size, device=device, progress=True)
    bad = [r["file"] for r in rows if not math.isfinite(r["score"])]
    finite = [r["score"] for r in rows if math.isfinite(r["score"])]
    mean = sum(finite) / len(finite) if finite else float("nan")
    print(f"scored {len(rows)} images with {reward.name}: mean {mean:.4f}", flush=True)  # shown if the writing fails
    if bad:
        print(f"warning: non-finite scores for {len(bad)} images: {', '.join(bad[:10])}", file=sys.stderr)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    print(f"wrote {args.out}")
    return 0
