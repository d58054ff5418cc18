"""A fixed, seeded evaluation set: generate every (prompt, seed) pair, score it, summarise.

The same function scores a `texforce eval` run and one Tune trial, so a sweep's numbers are
the numbers `eval` prints for the same alphas. Sampling goes through
`rl.sampling.sample_trajectories` with one seed per image, so an image does not depend on
its batch-mates and the set is reproducible across batch sizes and processes.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rl.config import SEED_LIMIT, ConfigError
from rl.sampling import images_to_float


@dataclass(frozen=True)
class EvalSettings:
    """How the evaluation set is drawn."""

    num_seeds: int = 2
    """Images per prompt; image j of every prompt uses seed `base_seed + j`."""
    base_seed: int = 0
    """First noise seed."""
    num_steps: int = 50
    """DDIM steps."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight."""
    eta: float = 0.0
    """DDIM eta (0: deterministic given the initial noise)."""
    batch_size: int = 8
    """Images per sampling call (does not change the images)."""

    def __post_init__(self):
        checks = [
            (self.num_seeds >= 1, f"--seeds must be at least 1, got {self.num_seeds}"),
            (0 <= self.base_seed <= SEED_LIMIT - self.num_seeds,  # torch's generators take int64 seeds
             f"--base-seed must be in [0, 2**63 - --seeds] (image j's seed is BASE_SEED + j), got {self.base_seed}"),
            (self.num_steps >= 1, f"--steps must be at least 1, got {self.num_steps}"),
            (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
             f"--guidance must be >= 0 (1 = the conditional prediction alone), got {self.guidance_scale}"),
            (0 <= self.eta <= 1, f"--eta must be in [0, 1] (0: deterministic DDIM), got {self.eta}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class EvalResult:
    """N = len(prompts) * num_seeds images and their scores.

    images: [N, 3, H, W] uint8; prompts, seeds: length N; scores: reward -> [N] float64
    (each part of the reward spec, unweighted); objective: [N], the spec's weighted sum.
    """

    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    scores: dict[str, np.ndarray]
    objective: np.ndarray

    def summary(self) -> dict[str, dict[str, float]]:
        """Per reward (and "objective"): mean, std, sem (std / sqrt(n)), n."""
        return {name: summarize(values) for name, values in {**self.scores, "objective": self.objective}.items()}


def summarize(values: np.ndarray) -> dict[str, float]:
    """mean, sample std (ddof 1; 0 for one value), standard error of the mean, n."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    std = float(values.std(ddof=1)) if n > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "sem": std / math.sqrt(n) if n else float("nan"), "n": n}


def clustered_sem(values: np.ndarray, clusters: Sequence) -> float:
    """The standard error of values.mean() when the clusters (prompts) are drawn at random and samples of one
    cluster are alike: sqrt(G / (G - 1) * sum_c (sum_{i in c} (y_i - mean))^2) / n over the G clusters (the
    cluster-robust estimate; std / sqrt(n) with one sample per cluster). std / sqrt(n) would treat 8 images of one
    prompt as 8 prompts' worth of evidence. One cluster (a run on one prompt): its images are the draws, so
    std / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    _, index = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    sums = np.bincount(index, weights=values - values.mean())
    g = len(sums)
    return math.sqrt(g / (g - 1) * float(np.sum(sums**2))) / len(values) if g > 1 else summarize(values)["sem"]


def seeds_and_prompts_sem(gains: np.ndarray) -> float:
    """The standard error of gains.mean() for gains [S, P], training seed s's mean gain on prompt p, when both the
    seeds and the prompts are draws (crossed random effects): sqrt((MS_seeds + MS_prompts - MS_residual) / (S P)),
    from the two-way ANOVA's mean squares, at least the larger of the one-way terms'. The prompts' SE alone misses
    how the training seeds differ: a seed's gain that is the same on every prompt cancels out of the prompts'
    spread. One seed: the prompts' SE; one prompt: the seeds'."""
    gains = np.asarray(gains, dtype=np.float64)
    s, p = gains.shape
    seed_means, prompt_means, mean = gains.mean(axis=1), gains.mean(axis=0), gains.mean()
    ms_seeds = p * float(np.sum((seed_means - mean) ** 2)) / (s - 1) if s > 1 else 0.0
    ms_prompts = s * float(np.sum((prompt_means - mean) ** 2)) / (p - 1) if p > 1 else 0.0
    residual = gains - seed_means[:, None] - prompt_means[None, :] + mean
    ms_residual = float(np.sum(residual**2)) / ((s - 1) * (p - 1)) if s > 1 and p > 1 else 0.0
    return math.sqrt(max(ms_seeds + ms_prompts - ms_residual, ms_seeds, ms_prompts) / (s * p))


def paired_gain(before: np.ndarray, after: np.ndarray, prompts: Sequence[str] | None = None) -> dict[str, float]:
    """`summarize` of the change image by image, for two scorings of the same (prompt, seed) pairs:
    the standard error is that of the paired differences (pairs with a non-finite score left out). It holds
    for these prompts; with `prompts` (one per image), `sem_over_prompts` is the standard error had the
    prompts been drawn at random from prompts of their kind (`clustered_sem`): what a claim about unseen
    prompts of that kind rests on."""
    finite = np.isfinite(before) & np.isfinite(after)
    gain = summarize(after[finite] - before[finite])
    if prompts is not None:
        gain["sem_over_prompts"] = clustered_sem(after[finite] - before[finite], np.asarray(prompts)[finite])
    return gain


def eval_set(prompts: list[str], settings: EvalSettings) -> tuple[list[str], list[int]]:
    """Every prompt once per seed: prompts [N], seeds [N] with N = len(prompts) * num_seeds."""
    pairs = [(p, settings.base_seed + j) for p in prompts for j in range(settings.num_seeds)]
    return [p for p, _ in pairs], [s for _, s in pairs]


def generate(pipe, prompts: list[str], seeds: list[int], settings: EvalSettings, *, progress: bool = False) -> torch.Tensor:
    """[N, 3, H, W] uint8 images, one per (prompt, seed), in batches of `settings.batch_size`;
    `progress` shows a bar (a held-out set of thousands of images takes minutes)."""
    from tqdm.auto import tqdm

    from rl.sampling import sample_trajectories

    images = []
    starts = range(0, len(prompts), settings.batch_size)
    for start in tqdm(starts, desc=f"sampling {len(prompts)} images", unit="batch", disable=not progress, leave=False):
        batch = slice(start, start + settings.batch_size)
        out = sample_trajectories(
            pipe,
            prompts[batch],
            seeds[batch],
            num_steps=settings.num_steps,
            guidance_scale=settings.guidance_scale,
            eta=settings.eta,
        )
        images.append(out.images)
    return torch.cat(images)


def score(
    reward, images: torch.Tensor, prompts: list[str], *, device: str | torch.device = "cpu", batch_size: int = 32
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Score uint8 images [N,3,H,W] with a `rewards.Reward` built on `device`: (part -> [N], weighted sum [N])."""
    parts: dict[str, list[np.ndarray]] = {}
    totals = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            x = images_to_float(images[start : start + batch_size]).to(device)
            out = reward(x, prompts[start : start + batch_size])
            totals.append(out.scores.double().cpu().numpy())
            for name, part in out.parts.items():
                parts.setdefault(name, []).append(part.double().cpu().numpy())
    return {name: np.concatenate(v) for name, v in parts.items()}, np.concatenate(totals)


def evaluate(pipe, reward, prompts: list[str], settings: EvalSettings, *, reward_device: str = "cpu",
             progress: bool = False) -> EvalResult:
    """Generate the seeded set with `pipe` as it is (LoRAs already loaded) and score it."""
    all_prompts, seeds = eval_set(prompts, settings)
    images = generate(pipe, all_prompts, seeds, settings, progress=progress)
    parts, objective = score(reward, images, all_prompts, device=reward_device)
    return EvalResult(images=images, prompts=all_prompts, seeds=seeds, scores=parts, objective=objective)


def output_paths(out_dir: str | Path) -> dict[str, Path]:
    """What `write_outputs` writes into `out_dir`."""
    out_dir = Path(out_dir)
    return {"scores": out_dir / "scores.parquet", "summary": out_dir / "summary.json", "grid": out_dir / "grid.png"}


def save_images(images: torch.Tensor, prompts: list[str], directory: str | Path) -> Path:
    """Each uint8 image [N, 3, H, W] as `directory`/NNNNN.png (lossless: scored again, it scores the same) and
    `directory`/prompts.txt, line i the prompt of image i: the layout `texforce score` reads."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        Image.fromarray(image).save(directory / f"{i:05d}.png")
    (directory / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts))
    return directory


def write_outputs(result: EvalResult, out_dir: str | Path, *, extra: dict | None = None, columns: int = 8) -> dict[str, Path]:
    """scores.parquet (prompt, seed, image index, one column per reward), summary.json, grid.png."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rl.plots import save_image_grid
    from rl.run_dir import written_whole

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = {
        "image": list(range(len(result.prompts))),
        "prompt": result.prompts,
        "seed": result.seeds,
        **{name: values.tolist() for name, values in result.scores.items()},
        "objective": result.objective.tolist(),
    }
    paths = output_paths(out_dir)
    with written_whole(paths["scores"]) as tmp:
        pq.write_table(pa.table(table), tmp)
    summary = {"rewards": result.summary(), **(extra or {})}
    with written_whole(paths["summary"]) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    captions = [
        f"{p} [seed {s}] " + " ".join(f"{k}={v[i]:.3f}" for k, v in result.scores.items())
        for i, (p, s) in enumerate(zip(result.prompts, result.seeds))
    ]
    with written_whole(paths["grid"]) as tmp:  # a second or more for a large grid
        save_image_grid(result.images, captions, tmp, columns=columns)
    return paths
