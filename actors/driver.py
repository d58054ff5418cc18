"""The driver: the training loop, read as its phases.

    for each epoch:  sample -> reward -> advantage -> update -> sync weights -> log -> checkpoint

It talks to the roles through `InlineWorkers` or `RayWorkers` (actors/topology.py) and owns
the per-prompt reward statistics, so L learners see the advantages one learner would.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from actors.reward import RewardScores
from actors.topology import InlineWorkers, RayWorkers
from rl.advantages import PerPromptStatTracker, compute_advantages
from rl.config import TexForceConfig
from rl.plots import save_image_grid, save_reward_curve
from rl.prompts import epoch_prompts, load_prompts
from rl.run_dir import RunDirectory
from rl.sampling import Trajectories

log = logging.getLogger("texforce")


class NonFiniteRewardError(RuntimeError):
    """A reward came back NaN/inf and reward.on_non_finite is `stop`."""


def connect_ray(config: TexForceConfig) -> None:
    """Join resources.address or RAY_ADDRESS if given, else start a local single-node cluster."""
    import ray

    if ray.is_initialized():
        return
    address = config.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True)


def make_workers(config: TexForceConfig):
    if config.resources.mode == "inline":
        return InlineWorkers(config)
    connect_ray(config)
    return RayWorkers(config)


def drop_non_finite(
    trajectories: Trajectories, scores: RewardScores, config: TexForceConfig
) -> tuple[Trajectories, np.ndarray, int]:
    """Keep only finite-reward samples (with a warning), or raise in `stop` mode."""
    finite = scores.finite
    dropped = int((~finite).sum())
    if dropped == 0:
        return trajectories, scores.scores.numpy().astype(np.float64), 0
    message = f"{dropped} of {len(finite)} samples have non-finite rewards ({scores.report})"
    if config.reward.on_non_finite == "stop" or dropped == len(finite):
        raise NonFiniteRewardError(message + "; stopping (reward.on_non_finite=stop or no finite sample left)")
    log.warning("%s; dropping them (reward.on_non_finite=drop)", message)
    keep = torch.nonzero(finite).flatten()
    return trajectories.select(keep), scores.scores[keep].numpy().astype(np.float64), dropped


def train(
    config: TexForceConfig,
    *,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> RunDirectory:
    """Run (or resume) a TexForce/DDPO training run; returns its run directory."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    run = RunDirectory(resume) if resume else RunDirectory.create(config)
    prompts = load_prompts(config.prompts)
    group = config.advantage.group_size if config.advantage.mode == "group" else 1
    tracker = PerPromptStatTracker(config.advantage.buffer_size, config.advantage.min_count)
    workers = make_workers(config)
    try:
        start = 0
        checkpoint = run.latest_checkpoint() if resume else None
        if checkpoint is not None:
            learner_state, driver_state = run.load_checkpoint(checkpoint)
            workers.load_learner_state(learner_state)
            tracker.load_state_dict(driver_state["tracker"])
            start = driver_state["epoch"] + 1
            log.info("resumed %s from %s", run.path, checkpoint.name)
        weights = workers.get_weights()
        writer = SummaryWriter(str(run.tensorboard))
        bar = tqdm(range(start, config.num_epochs), initial=start, total=config.num_epochs, desc="epochs")
        for epoch in bar:
            t0 = time.perf_counter()
            # 1-2. sample trajectories and score them
            epoch_prompt_list, seeds = epoch_prompts(
                prompts, seed=config.seed, epoch=epoch, num_samples=config.samples_per_epoch, group_size=group
            )
            trajectories, scores = workers.rollout(weights, epoch_prompt_list, seeds)
            t_sampled = time.perf_counter()
            try:
                trajectories, rewards, dropped = drop_non_finite(trajectories, scores, config)
            except NonFiniteRewardError:
                save_image_grid(trajectories.images, _captions(trajectories.prompts, scores.scores),
                                run.grids / f"epoch_{epoch:04d}_non_finite.png")
                if epoch > start or checkpoint is not None:
                    _save_checkpoint(run, config, workers, tracker, weights, epoch - 1)
                raise
            # 3. advantages
            advantages = torch.from_numpy(
                compute_advantages(
                    trajectories.prompts, rewards, mode=config.advantage.mode,
                    adv_clip_max=config.train.adv_clip_max, tracker=tracker,
                )
            )
            # 4. PPO update
            metrics = workers.update(trajectories, advantages)
            # 5. weights for the next epoch's samplers
            weights = workers.get_weights()
            t_updated = time.perf_counter()
            # 6. log
            row = {
                "epoch": epoch,
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                **{f"reward_{k}_mean": float(v[torch.isfinite(v)].mean()) for k, v in scores.parts.items()},
                **metrics,
                "num_samples": len(trajectories),
                "num_dropped": dropped,
                "sample_seconds": t_sampled - t0,
                "update_seconds": t_updated - t_sampled,
                "wall_seconds": t_updated - t0,
                "samples_per_second": len(scores.scores) / (t_sampled - t0),
                "actor_restarts": workers.restarts,
            }
            rows = run.append_metrics(row)
            for key, value in row.items():
                writer.add_scalar(key, value, epoch)
            save_image_grid(trajectories.images[:8], _captions(trajectories.prompts, torch.from_numpy(rewards)),
                            run.grids / f"epoch_{epoch:04d}.png")
            save_reward_curve([r["epoch"] for r in rows], [r["reward_mean"] for r in rows],
                              [r["reward_std"] for r in rows], run.reward_curve, title=f"{config.run_name}: {config.reward.spec}")
            bar.set_postfix(reward=f"{row['reward_mean']:.4f}", kl=f"{row.get('approx_kl', 0):.1e}")
            # 7. checkpoint
            if (epoch + 1) % config.save_every == 0 or epoch == config.num_epochs - 1:
                _save_checkpoint(run, config, workers, tracker, weights, epoch)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
        writer.close()
        run.save_final_lora(weights, config)
    finally:
        workers.shutdown()
    return run


def _captions(prompts: list[str], rewards: torch.Tensor) -> list[str]:
    return [f"{p} | r={float(r):.4f}" for p, r in zip(prompts, rewards)]


def _save_checkpoint(run, config, workers, tracker, weights, epoch: int) -> None:
    run.save_checkpoint(
        epoch, learner_state=workers.learner_state(), driver_state={"tracker": tracker.state_dict()},
        weights=weights, config=config,
    )


def summarize(run: RunDirectory) -> str:
    """Where the outputs are, and the first and last epoch's mean reward."""
    rows = run.read_metrics()
    lines = [f"run directory: {run.path}"]
    if rows:
        lines.append(f"mean reward: epoch {rows[0]['epoch']} {rows[0]['reward_mean']:.4f} -> "
                     f"epoch {rows[-1]['epoch']} {rows[-1]['reward_mean']:.4f}")
    for label, path in [("final LoRA", run.final_lora / "pytorch_lora_weights.safetensors"),
                        ("metrics", run.metrics_path), ("reward curve", run.reward_curve),
                        ("image grids", run.grids), ("checkpoints", run.checkpoints),
                        ("tensorboard", run.tensorboard)]:
        lines.append(f"  {label:12s} {path}")
    return "\n".join(lines)
