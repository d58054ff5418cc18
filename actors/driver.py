"""The driver: the training loop, read as its phases.

    for each epoch:  sample -> reward -> advantage -> update -> sync weights -> log -> checkpoint

(a gradient learner does the first four in one differentiable pass on the learner group). With
train.async_staleness=1 (PPO) the samplers draw epoch e+1 with the LoRA the learner starts epoch
e from, while the learner trains on epoch e, so neither waits for the other:

    epoch e:  advantage(batch e) -> start update e -> sample + reward batch e+1 -> finish update e

and, when `evaluation.prompts_file` is set, scores the policy on those (held-out) prompts with
fixed seeds before training and after the last (or every N-th) epoch.

It talks to the roles through `InlineWorkers` or `RayWorkers` (actors/topology.py) and owns
the per-prompt reward statistics, so L learners see the advantages one learner would.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from actors.reward import RewardScores
from actors.rollout import Rollout, TrajectoriesLostError, is_lost
from actors.topology import (
    ActorsLostError,
    InlineWorkers,
    LearnerFailedError,
    RayWorkers,
    check_fits_this_machine,
    init_ray,
)
from rl.advantages import PerPromptStatTracker, compute_advantages, group_keys
from rl.algorithms import get_algorithm
from rl.config import ConfigError, TexForceConfig
from rl.lora import PolicyWeights
from rl.output_lock import claim_output_dir, release_output_dirs
from rl.outputs import EpochOutputs
from rl.plots import save_image_grid
from rl.preflight import preflight, ray_address
from rl.prompts import epoch_prompts, group_start_seeds, load_prompts, read_prompt_file
from rl.run_dir import RunDirectory, epoch_reward_sem, make_output_dir, storage_problem
from tune.evaluate import clustered_sem

log = logging.getLogger("texforce")


class TrainingStopped(RuntimeError):
    """The run cannot go on (learner restarts used up, actors lost, non-finite rewards); the
    message says how to resume. The CLI prints it as one line."""


class NonFiniteRewardError(TrainingStopped):
    """A reward came back NaN/inf and reward.on_non_finite is `stop`."""


# "0" makes a local Ray cluster bind its servers to 127.0.0.1 (Ray reads it at import)
LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_ray(config: TexForceConfig) -> None:
    """Join resources.address or RAY_ADDRESS if given, else start a local single-node cluster
    that listens on 127.0.0.1 only (to serve other machines, start a head with `ray start
    --head` and pass its address)."""
    import ray

    if ray.is_initialized():
        return
    address, option = ray_address(config)
    if not address and os.environ.setdefault(LOOPBACK_ONLY_ENV, "0") == "0":
        # the processes Ray starts read the variable; this one read it when ray was imported
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        init_ray(address, option, log_to_driver=True)
    else:
        check_fits_this_machine(config)  # said before Ray's start-up lines
        ray.init(address="local", include_dashboard=False, log_to_driver=True)
    if threading.current_thread() is threading.main_thread():
        # ray.init makes SIGTERM a sys.exit, then its core worker puts a native handler in front that dumps a stack
        # and aborts the process: hand the signal back to Python, so a stopped job runs the driver's cleanup
        signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGTERM))


def make_workers(config: TexForceConfig):
    if config.resources.mode == "inline":
        return InlineWorkers(config)
    connect_ray(config)
    return RayWorkers(config)


def drop_non_finite(rollout: Rollout, config: TexForceConfig) -> tuple[Rollout, np.ndarray, int]:
    """Keep only finite-reward samples (with a warning), or raise in `stop` mode; returns the
    kept rollout, its rewards and how many were dropped."""
    report = rollout.scores.finite_report
    finite = report.mask
    dropped = int((~finite).sum())
    if dropped == 0:
        return rollout, rollout.scores.scores.numpy().astype(np.float64), 0
    message = f"{dropped} of {len(finite)} samples of the epoch have non-finite rewards ({report})"
    if config.reward.on_non_finite == "stop" or dropped == len(finite):
        raise NonFiniteRewardError(message + "; stopping (reward.on_non_finite=stop or no finite sample left)")
    log.warning("%s; dropping them (reward.on_non_finite=drop)", message)
    kept = rollout.select(torch.nonzero(finite).flatten())
    return kept, kept.scores.scores.numpy().astype(np.float64), dropped


def train(
    config: TexForceConfig,
    *,
    resume: str | Path | None = None,
    on_epoch_end: Callable[[int, dict], bool | None] | None = None,
) -> RunDirectory:
    """Run (or resume) a training run of `train.algorithm` (PPO or a gradient learner); returns its run directory.

    A learner that dies is replaced and the run goes on from the last checkpoint, up to
    resources.max_restarts times; then TrainingStopped says how to resume, as it does when the run's disk
    is full or read-only (STORAGE_ERRNOS). `on_epoch_end(epoch, metrics_row)` returning True ends the run
    after that epoch as if it were the last (held-out evaluation, final LoRA): a caller's own stopping rule,
    such as a time budget.
    """
    try:
        return _train(config, resume=resume, on_epoch_end=on_epoch_end)
    except OSError as error:
        run = RunDirectory(resume) if resume else RunDirectory.for_config(config)
        problem = storage_problem(error, run.path)
        if problem is None:
            raise
        latest = run.latest_checkpoint()
        kept = f"the last checkpoint, {latest.name}, is kept" if latest else "no checkpoint was written yet"
        raise TrainingStopped(f"{problem}, then continue with `texforce train --resume {run.path}` ({kept})") \
            from error
    finally:
        release_output_dirs()  # another command may write there now


def _train(config: TexForceConfig, *, resume: str | Path | None,
           on_epoch_end: Callable[[int, dict], bool | None] | None) -> RunDirectory:
    from tqdm.auto import tqdm

    preflight(config, resume=resume)  # every user error before the run directory exists
    if config.resources.mode != "inline":
        connect_ray(config)  # so does a cluster that refuses the connection (token authentication)
    if resume:
        run = RunDirectory(make_output_dir(resume, "--resume"))
        claim_output_dir(run.path, "--resume")
        run.save_config(config)  # this resume's overrides (num_epochs=...) hold for the next one too
    else:
        run = RunDirectory.create(config)
    prompts = load_prompts(config.prompts)
    held_out = config.evaluation.prompts_file
    eval_prompts = read_prompt_file(held_out, option="evaluation.prompts_file") if held_out else []
    workers = make_workers(config)
    outputs = bar = None
    try:
        tracker, start = _restore(run, config, workers) if resume else (_new_tracker(config), 0)
        if start >= config.num_epochs:
            log.info("the run has finished its num_epochs=%d; pass num_epochs=N with --resume to train more",
                     config.num_epochs)
        weights = workers.get_weights()
        batches = _Batches(config, prompts, _sampling_weights(config, workers, weights))
        done = {row["epoch"] for row in run.read_evaluations()}
        unfinished = start - 1 if start > 0 and _evaluation_due(start - 1, config) and start - 1 not in done else None
        evaluation = None
        if start == 0 and -1 not in done:  # the base model's
            evaluation = evaluate_held_out(-1, weights, eval_prompts, config=config, run=run, workers=workers)
        elif unfinished is not None:  # resumed after an epoch whose held-out evaluation was cut short (stopped, lost)
            evaluation = _evaluate_after(unfinished, weights, eval_prompts, config=config, run=run, workers=workers,
                                         tracker=tracker)
        outputs = EpochOutputs(run, title=f"{config.run_name}: {config.reward.spec}")
        outputs.write_evaluation(evaluation)
        bar = tqdm(total=config.num_epochs, initial=start, desc="epochs")
        learner_failures = 0
        epoch = start
        while epoch < config.num_epochs:
            try:
                row, weights = _run_epoch(epoch, weights, config=config, run=run, workers=workers,
                                          tracker=tracker, batches=batches, outputs=outputs)
            except LearnerFailedError as error:
                learner_failures += 1
                if learner_failures > config.resources.max_restarts:
                    raise TrainingStopped(
                        f"the learner failed {learner_failures} times, more than resources.max_restarts="
                        f"{config.resources.max_restarts} ({error}); the checkpoints are kept: resume with "
                        f"`texforce train --resume {run.path}`"
                    ) from error
                log.warning("%s; restarting the learners from the last checkpoint (%d of %d restarts)",
                            error, learner_failures, config.resources.max_restarts)
                try:
                    workers.restart_learners()
                except ActorsLostError as lost:
                    raise TrainingStopped(f"{lost}; the checkpoints are kept: resume with "
                                          f"`texforce train --resume {run.path}`") from lost
                tracker, epoch = _restore(run, config, workers)
                weights = workers.get_weights()
                batches = _Batches(config, prompts, _sampling_weights(config, workers, weights))
                bar.n = epoch
                bar.refresh()
                continue
            stop = bool(on_epoch_end(epoch, row)) if on_epoch_end is not None else False
            if stop or _evaluation_due(epoch, config):
                outputs.write_evaluation(  # TensorBoard, and the curve with the new held-out point
                    _evaluate_after(epoch, weights, eval_prompts, config=config, run=run, workers=workers,
                                    tracker=tracker))
            bar.update(1)
            progress = {"kl": f"{row['approx_kl']:.1e}"} if "approx_kl" in row else {"loss": f"{row['loss']:.4f}"}
            bar.set_postfix(reward=f"{row['reward_mean']:.4f}", **progress)
            epoch += 1
            if stop:
                break
        bar.close()
        run.save_final_lora(weights, config)
    except (KeyboardInterrupt, SystemExit) as stop:  # Ctrl-C; SIGTERM (`ray job stop`, kill) exits through sys.exit
        if bar is not None:
            bar.close()  # the line below on a line of its own
        latest = run.latest_checkpoint()
        kept = f"the last checkpoint, {latest.name}, is kept" if latest else "no checkpoint yet"
        log.warning("%s; %s: continue with `texforce train --resume %s`",
                    "interrupted" if isinstance(stop, KeyboardInterrupt) else "stopped", kept, run.path)
        raise
    finally:
        if bar is not None:
            bar.close()  # before anything the caller prints (a second close does nothing)
        try:
            if outputs is not None:
                outputs.close()  # everything queued is on disk when train returns or stops
        finally:
            workers.shutdown()
    return run


@dataclass
class _Experience:
    """What an epoch's sample/reward/update phases hand to logging: the update's metrics, the
    finite-reward samples' prompts and rewards, the grid's images, and all the scores."""

    metrics: dict
    prompts: list[str]
    # uint8 images of the first `prompts`, fetched only for an epoch whose grid is drawn; None: lost with a node
    grid_images: Callable[[], torch.Tensor | None]
    scores: RewardScores
    rewards: np.ndarray
    dropped: int
    sample_seconds: float
    update_seconds: float
    stop: TrainingStopped | None = None  # raised once this epoch is logged and checkpointed


class _Batches:
    """Which prompts and seeds each epoch's batch is drawn with, the LoRA of the first rollout after
    a start or restore, and the batch already sampled for the next epoch (async sampling). Every
    later rollout of epoch e uses the LoRA epoch e starts from; with train.async_staleness=1 the
    first one after a restore uses the version before it, so a resumed run draws the same samples
    as the run that was not interrupted."""

    def __init__(self, config: TexForceConfig, prompts: list[str], first_weights: PolicyWeights):
        self.config, self.prompts = config, prompts
        self.first_weights: PolicyWeights | None = first_weights  # the first rollout's; later ones use the epoch's
        self.ready: Rollout | None = None  # the next epoch's, sampled early

    def prompts_and_seeds(self, epoch: int) -> tuple[list[str], list[int]]:
        c = self.config
        group = c.advantage.group_size if c.advantage.mode == "group" else 1
        return epoch_prompts(
            self.prompts, seed=c.seed, epoch=epoch, num_samples=c.samples_per_epoch, group_size=group,
            order=c.prompts.order,
        )

    def rollout(self, epoch: int, sampling: PolicyWeights, workers) -> Rollout:
        """Sample and score epoch `epoch`'s batch with the LoRA `sampling`."""
        prompts, seeds = self.prompts_and_seeds(epoch)
        return workers.rollout(sampling, prompts, seeds, start_seeds=self.start_seeds(seeds))

    def start_seeds(self, seeds: list[int]) -> list[int] | None:
        """The x_T seed of each sample when the groups share their start (sample.shared_start_noise), else None."""
        c = self.config
        return group_start_seeds(seeds, c.advantage.group_size) if c.sample.shared_start_noise else None


def _sampling_weights(config: TexForceConfig, workers, weights: PolicyWeights) -> PolicyWeights:
    """The LoRA of the first rollout after a start or restore: `weights` (the learner's), or the version before it
    with async sampling (none before version 0)."""
    if config.train.async_staleness and weights.version > 0 and not get_algorithm(config.train.algorithm).samples_in_learner:
        return workers.get_weights(weights.version - 1)
    return weights


def _due(epoch: int, every: int, config: TexForceConfig) -> bool:
    """Whether an every-N-epochs output (save_every, plot_every) is written after `epoch`: each N-th and the last."""
    return (epoch + 1) % every == 0 or epoch == config.num_epochs - 1


def _run_epoch(
    epoch: int, weights: PolicyWeights, *, config: TexForceConfig, run: RunDirectory, workers,
    tracker: PerPromptStatTracker, batches: _Batches, outputs: EpochOutputs,
) -> tuple[dict, PolicyWeights]:
    """One epoch: sample -> reward -> advantage -> update -> sync weights -> log -> checkpoint.
    A gradient learner samples, scores and steps in one pass on its own worker group (no
    samplers, reward actors or advantages). Returns the epoch's metrics row and the learner's
    weights after it."""
    t0 = time.perf_counter()
    # 1-4. sample, reward, (advantage,) update
    if get_algorithm(config.train.algorithm).samples_in_learner:
        epoch_prompt_list, seeds = batches.prompts_and_seeds(epoch)
        done = _gradient_phases(epoch, weights, epoch_prompt_list, seeds, config=config, run=run, workers=workers,
                                tracker=tracker)
    else:
        done = _ppo_phases(epoch, weights, batches, config=config, run=run, workers=workers, tracker=tracker)
    # 5. weights for the next epoch's samplers
    weights = workers.get_weights()
    t_updated = time.perf_counter()
    # 6. log
    rewards, scores = done.rewards, done.scores
    some = len(rewards) > 0  # none: a gradient learner's epoch whose every reward was non-finite (it stops)
    nan = float("nan")
    row = {
        "epoch": epoch,
        "reward_mean": float(rewards.mean()) if some else nan,
        "reward_std": float(rewards.std()) if some else nan,
        # of the mean, over the epoch's prompts: a prompt's images are alike, and the prompts are what is drawn
        "reward_sem": clustered_sem(rewards, done.prompts) if some else nan,
        **{f"reward_{k}_mean": float(v[torch.isfinite(v)].mean()) if bool(torch.isfinite(v).any()) else nan
           for k, v in scores.parts.items()},
        **done.metrics,
        "num_samples": len(rewards),
        "num_dropped": done.dropped,
        "sample_seconds": done.sample_seconds,
        "update_seconds": done.update_seconds,
        "wall_seconds": t_updated - t0,
        "samples_per_second": len(scores.scores) / (done.sample_seconds or done.update_seconds),
        "actor_restarts": workers.restarts,
    }
    if config.plot_every == "auto":
        plots = epoch == config.num_epochs - 1 or outputs.plots_due()
    else:
        plots = _due(epoch, config.plot_every, config)
    shown = done.grid_images() if plots and len(done.prompts) else None
    outputs.write(row, shown, _captions(done.prompts[:8], torch.from_numpy(rewards[:8])),  # in the background
                  plots=plots)
    # 7. checkpoint
    if done.stop is not None or _due(epoch, config.save_every, config):
        _save_checkpoint(run, config, workers, tracker, weights, epoch)
    if done.stop is not None:
        raise done.stop
    return row, weights


def _ppo_phases(epoch: int, weights: PolicyWeights, batches: _Batches, *, config: TexForceConfig,
                run: RunDirectory, workers, tracker: PerPromptStatTracker) -> _Experience:
    """Samplers roll out, reward actors score, the driver computes advantages, the learners update;
    with async sampling the next epoch's rollout runs while the learners update."""
    t0 = time.perf_counter()
    # 1-2. sample trajectories and score them (unless they were sampled during the last epoch)
    if batches.ready is None:
        sampling, batches.first_weights = batches.first_weights or weights, None
        batches.ready = _rollout(epoch, sampling, batches, config=config, run=run, workers=workers, tracker=tracker)
    rollout, batches.ready = batches.ready, None
    sample_seconds = time.perf_counter() - t0
    try:
        kept, rewards, dropped = drop_non_finite(rollout, config)
    except NonFiniteRewardError as error:
        bad = torch.nonzero(~torch.isfinite(rollout.scores.scores)).flatten()[:16].tolist()
        images = _grid_images(rollout, bad, f"epoch {epoch}'s non-finite rewards")
        if images is not None:
            save_image_grid(images, _captions([rollout.prompts[i] for i in bad], rollout.scores.scores[bad]),
                            run.grids / f"epoch_{epoch:04d}_non_finite.png")
        _checkpoint_last_finished_epoch(run, config, workers, tracker, weights, epoch)
        raise NonFiniteRewardError(f"{error}; fix the reward, then `texforce train --resume {run.path}`") from None
    # 3. advantages
    finished = copy.deepcopy(tracker)  # the statistics as the last finished epoch left them, for a checkpoint of it
    rows = range(len(kept)) if kept.keep is None else kept.keep.tolist()  # epoch positions: which group is whose
    groups = group_keys(kept.prompts, rows, config.advantage.group_size, shared_start=config.sample.shared_start_noise)
    advantages = torch.from_numpy(
        compute_advantages(
            kept.prompts, rewards, mode=config.advantage.mode,
            adv_clip_max=config.train.adv_clip_max, tracker=tracker, groups=groups,
        )
    )
    # 4. PPO update (the learners fetch the trajectories from the samplers' shards), and meanwhile
    #    (async) the next epoch's rollout with the LoRA this one starts from
    t_update = time.perf_counter()
    pending = workers.start_update(kept.trajectories(), advantages)
    stop = None
    if config.train.async_staleness and epoch + 1 < config.num_epochs:
        t_next = time.perf_counter()
        try:
            batches.ready = batches.rollout(epoch + 1, weights, workers)
        except ActorsLostError as error:  # gone for good: this epoch's update still finishes, is logged and kept
            stop = TrainingStopped(f"{error}; then `texforce train --resume {run.path}`")
            stop.__cause__ = error
        finally:
            sample_seconds += time.perf_counter() - t_next
    metrics, kept = _finish_update(pending, kept, advantages, epoch, weights, config=config, run=run, workers=workers,
                                   tracker=finished)
    shown = list(range(min(8, len(kept))))  # the epoch's image grid
    grid_images = partial(_grid_images, kept, shown, f"epoch {epoch}'s grid")
    return _Experience(metrics, list(kept.prompts), grid_images, rollout.scores, rewards, dropped,
                       sample_seconds=sample_seconds, update_seconds=time.perf_counter() - t_update, stop=stop)


def _finish_update(pending, kept: Rollout, advantages: torch.Tensor, epoch: int, weights: PolicyWeights, *,
                   config: TexForceConfig, run: RunDirectory, workers,
                   tracker: PerPromptStatTracker) -> tuple[dict[str, float], Rollout]:
    """The learners' metrics of the update in flight, and the rollout they trained on. If a sampler's
    node died before the learners fetched its shards, none of them stepped: the lost shards are sampled
    again (the rollout returned holds the new ones) and the update sent again, up to
    resources.max_restarts times; then the run stops with its checkpoints kept, the last finished epoch's with
    `tracker`, the reward statistics before this epoch's rewards joined them."""
    losses = 0
    while True:
        try:
            return workers.finish_update(pending), kept
        except TrajectoriesLostError as lost:
            losses += 1
            if losses > config.resources.max_restarts:
                _checkpoint_last_finished_epoch(run, config, workers, tracker, weights, epoch)
                raise TrainingStopped(f"{lost}, {losses} times in epoch {epoch} (resources.max_restarts="
                                      f"{config.resources.max_restarts}); the checkpoints are kept: resume with "
                                      f"`texforce train --resume {run.path}`") from lost
            log.warning("%s; sampling them again", lost)
            try:
                kept = workers.resample(kept, lost.shards)
            except ActorsLostError as gone:  # no sampler left to draw them again
                _checkpoint_last_finished_epoch(run, config, workers, tracker, weights, epoch)
                raise TrainingStopped(f"{gone}; the checkpoints are kept: resume with "
                                      f"`texforce train --resume {run.path}`") from gone
            pending = workers.start_update(kept.trajectories(), advantages)


def _rollout(epoch: int, sampling: PolicyWeights, batches: _Batches, *, config: TexForceConfig,
             run: RunDirectory, workers, tracker: PerPromptStatTracker) -> Rollout:
    """Sample and score epoch `epoch`'s batch with the LoRA `sampling`. If the samplers or reward actors are gone for
    good, stop with the last finished epoch checkpointed. (The next epoch's batch, drawn during this epoch's update
    with async sampling, stops the run after this epoch instead: `_ppo_phases`.)"""
    try:
        return batches.rollout(epoch, sampling, workers)
    except ActorsLostError as error:
        _checkpoint_last_finished_epoch(run, config, workers, tracker, workers.get_weights(), epoch)
        raise TrainingStopped(f"{error}; then `texforce train --resume {run.path}`") from error


def _gradient_phases(epoch: int, weights: PolicyWeights, prompts: list[str], seeds: list[int], *,
                     config: TexForceConfig, run: RunDirectory, workers, tracker: PerPromptStatTracker) -> _Experience:
    """The learner group samples with grad, scores with the differentiable reward and steps, in one pass.

    Non-finite rewards were left out of the loss; in `stop` mode the run stops once this epoch is logged and
    checkpointed (its update used only the finite ones)."""
    t0 = time.perf_counter()
    metrics, samples = workers.train_on_prompts(prompts, seeds)
    scores = RewardScores(samples.scores, samples.parts)
    finite = scores.finite_report.mask
    dropped = int((~finite).sum())
    stop = None
    if dropped:
        message = f"{dropped} of {len(finite)} samples of the epoch have non-finite rewards ({scores.finite_report})"
        if config.reward.on_non_finite == "stop" or dropped == len(finite):
            save_image_grid(samples.images, _captions(samples.prompts, scores.scores),
                            run.grids / f"epoch_{epoch:04d}_non_finite.png")
            stop = NonFiniteRewardError(f"{message}; stopping after a checkpoint of this epoch (they were left out of "
                                        f"its update); fix the reward, then `texforce train --resume {run.path}`")
        else:
            log.warning("%s; they were left out of the update (reward.on_non_finite=drop)", message)
    keep = torch.nonzero(finite).flatten()
    rewards = scores.scores[keep].numpy().astype(np.float64)
    return _Experience(metrics, [samples.prompts[i] for i in keep.tolist()], lambda: samples.images[keep[:8]], scores,
                       rewards, dropped,
                       sample_seconds=0.0, update_seconds=time.perf_counter() - t0, stop=stop)


def evaluate_held_out(epoch: int, weights: PolicyWeights, prompts: list[str], *, config: TexForceConfig,
                      run: RunDirectory, workers) -> dict | None:  # fmt: skip
    """Score the policy `weights` (trained through `epoch`; -1 = the base model) on the evaluation
    `prompts` (evaluation.prompts_file; none: nothing to do, None returned).

    The same fixed (prompt, seed) pairs every time, sampled with the policy's steps and guidance
    at `evaluation.eta` (default the policy's own) by the same samplers and reward actors (a gradient learner's own
    ranks: its group has none); appends a row
    to evaluation.parquet, returned, and saves each prompt's first image in grids/eval_epoch_NNNN.png
    (eval_before_training.png for the base model).
    """
    from tqdm.auto import tqdm

    from tune.evaluate import EvalSettings, eval_set, paired_gain, summarize

    if not prompts:
        return None
    s = config.sample
    settings = EvalSettings(num_seeds=config.evaluation.num_seeds, base_seed=config.evaluation.seed_base,
                            num_steps=s.num_steps, guidance_scale=s.guidance_scale, eta=config.evaluation_eta)  # fmt: skip
    eval_prompts, seeds = eval_set(prompts, settings)
    when = "before training" if epoch < 0 else f"after epoch {epoch}"
    shards = math.ceil(len(eval_prompts) / s.batch_size)  # the rollout's shards of sample.batch_size
    with tqdm(total=shards, desc=f"held-out evaluation {when}", unit="batch", leave=False) as bar:
        try:
            rollout = workers.rollout(weights, eval_prompts, seeds, evaluation=True,
                                      on_shard_done=lambda kind, _shard: bar.update(int(kind == "score")))  # fmt: skip
        except LearnerFailedError as error:  # a gradient learner's ranks draw its evaluation
            raise TrainingStopped(f"{error}; the checkpoints are kept: resume with `texforce train --resume {run.path}`, "
                                  "which finishes the evaluation") from error
    scores = rollout.scores
    finite = torch.isfinite(scores.scores)
    reward = summarize(scores.scores[finite].numpy())
    row = {"epoch": epoch, "policy_version": weights.version, "reward_spec": config.evaluation.reward or config.reward.spec,
           "eta": settings.eta,
           "reward_mean": reward["mean"], "reward_sem": reward["sem"],
           **{f"reward_{k}_mean": float(v[finite].mean()) for k, v in scores.parts.items()},
           "num_samples": len(eval_prompts), "num_dropped": int((~finite).sum()),
           "rewards": scores.scores.tolist()}  # fmt: skip
    base = [r for r in run.read_evaluations() if r["epoch"] == -1]
    if epoch >= 0 and base:
        gain = paired_gain(np.asarray(base[0]["rewards"], dtype=np.float64), scores.scores.numpy().astype(np.float64),
                           eval_prompts)
        row |= {"reward_gain": gain["mean"], "reward_gain_sem": gain["sem"],
                "reward_gain_sem_over_prompts": gain["sem_over_prompts"]}
    run.append_evaluation(row)
    first = list(range(0, len(eval_prompts), config.evaluation.num_seeds))[:16]  # each prompt's first image
    images = _grid_images(rollout, first, f"the held-out evaluation {when}")
    if images is not None:
        save_image_grid(images, _captions([eval_prompts[i] for i in first], scores.scores[first]),
                        run.grids / ("eval_before_training.png" if epoch < 0 else f"eval_epoch_{epoch:04d}.png"))
    log.info("held-out reward %s: %.4f +- %.4f (%d images)", when, reward["mean"], reward["sem"], len(eval_prompts))
    return row


def _evaluation_due(epoch: int, config: TexForceConfig) -> bool:
    """Whether the held-out evaluation runs after `epoch`: the last one, and every evaluation.every-th."""
    every = config.evaluation.every
    return epoch == config.num_epochs - 1 or bool(every and (epoch + 1) % every == 0)


def _evaluate_after(epoch: int, weights: PolicyWeights, prompts: list[str], *, config: TexForceConfig,
                    run: RunDirectory, workers, tracker: PerPromptStatTracker) -> dict | None:
    """`evaluate_held_out` after `epoch`; if the samplers or reward actors are gone for good, the run stops with
    `epoch` checkpointed (save_every may have skipped it), and its resume runs the evaluation."""
    try:
        return evaluate_held_out(epoch, weights, prompts, config=config, run=run, workers=workers)
    except ActorsLostError as error:
        _checkpoint_last_finished_epoch(run, config, workers, tracker, weights, epoch + 1)
        raise TrainingStopped(f"{error}; the checkpoints are kept: resume with `texforce train --resume {run.path}`, "
                              "which finishes the evaluation") from error


def _grid_images(rollout: Rollout, rows: list[int], what: str) -> torch.Tensor | None:
    """The images of `rows` for a grid, or None if a node that held them has died since they were
    scored (Ray): a grid is not worth sampling again, nor stopping for."""
    try:
        return rollout.images(rows)
    except Exception as error:
        if not is_lost(error):
            raise
        log.warning("the images for %s were lost with the node that held them; no grid for it", what)
        return None


def _new_tracker(config: TexForceConfig) -> PerPromptStatTracker:
    return PerPromptStatTracker(config.advantage.buffer_size, config.advantage.min_count)


def _restore(run: RunDirectory, config: TexForceConfig, workers) -> tuple[PerPromptStatTracker, int]:
    """Load the last readable checkpoint into the learners; returns the reward statistics and
    the epoch to go on from (0, with fresh statistics, when there is no checkpoint)."""
    tracker = _new_tracker(config)
    loaded = run.load_latest_checkpoint()
    if loaded is None and run.has_progress():  # every checkpoint damaged: starting over would overwrite the run
        raise ConfigError(f"--resume {run.path}: none of its checkpoints reads back (the warnings above name them), "
                          "and a resume from epoch 0 would overwrite its metrics; start a new run (another run_name)")
    if loaded is None:
        return tracker, 0
    path, learner_state, driver_state = loaded
    workers.load_learner_state(learner_state)
    tracker.load_state_dict(driver_state["tracker"])
    log.info("restored %s from %s", run.path, path.name)
    return tracker, driver_state["epoch"] + 1


def _captions(prompts: list[str], rewards: torch.Tensor) -> list[str]:
    return [f"{p} | r={float(r):.4f}" for p, r in zip(prompts, rewards)]


def _checkpoint_last_finished_epoch(run, config, workers, tracker, weights, epoch: int) -> None:
    """Before stopping in `epoch`: make sure epoch - 1's work is in a checkpoint (save_every may have skipped it)."""
    latest = run.latest_checkpoint()
    if epoch > 0 and (latest is None or latest.name != f"epoch_{epoch - 1:04d}"):
        _save_checkpoint(run, config, workers, tracker, weights, epoch - 1)


def _save_checkpoint(run, config, workers, tracker, weights, epoch: int) -> None:
    run.save_checkpoint(
        epoch, learner_state=workers.learner_state(), driver_state={"tracker": tracker.state_dict()},
        weights=weights, config=config,
    )


def training_reward(rows: list[dict]) -> tuple[float, float]:
    """The mean of these epochs' batch mean rewards, and its standard error: each epoch draws its batch
    afresh, so the epochs' standard errors add in quadrature."""
    sems = [epoch_reward_sem(r) for r in rows]
    return sum(r["reward_mean"] for r in rows) / len(rows), math.sqrt(sum(s * s for s in sems)) / len(rows)


def summarize(run: RunDirectory) -> str:
    """Where the outputs are; the training reward of the first and last (up to 5) epochs, as one epoch's
    batch is too noisy to compare with another's; the held-out evaluations before and after training."""
    rows = run.read_metrics()
    lines = [f"run directory: {run.path.resolve()}"]
    if rows:
        k = max(1, min(5, len(rows) // 2))
        parts = []
        for window in ([rows[:k], rows[-k:]] if len(rows) > 1 else [rows]):
            mean, sem = training_reward(window)
            epochs = f"epochs {window[0]['epoch']}-{window[-1]['epoch']}" if k > 1 else f"epoch {window[0]['epoch']}"
            parts.append(f"{epochs} {mean:.4f} +- {sem:.4f}")
        lines.append(f"training reward (the sampled batches' mean): {' -> '.join(parts)}")
    evaluations = run.read_evaluations()
    if len(evaluations) >= 2:
        before, after = evaluations[0], evaluations[-1]
        lines.append(f"held-out {after.get('reward_spec') or 'reward'} ({after['num_samples']} images): before training {before['reward_mean']:.4f} "
                     f"+- {before['reward_sem']:.4f} -> after epoch {after['epoch']} {after['reward_mean']:.4f} "
                     f"+- {after['reward_sem']:.4f} (evaluation.parquet)")
        if after.get("reward_gain") is not None:
            gain = after["reward_gain"]
            lines.append(f"held-out gain, paired over the same prompts and seeds: {gain:+.4f} "
                         f"+- {after['reward_gain_sem']:.4f} ({gain / max(after['reward_gain_sem'], 1e-12):+.1f} "
                         f"standard errors)")
            if after.get("reward_gain_sem_over_prompts") is not None:
                sem = after["reward_gain_sem_over_prompts"]
                lines.append(f"  counting the held-out prompts as a draw of prompts of their kind: +- {sem:.4f} "
                             f"({gain / max(sem, 1e-12):+.1f} standard errors)")
    for label, path in [("final LoRA", run.final_lora / "pytorch_lora_weights.safetensors"),
                        ("metrics", run.metrics_path), ("reward curve", run.reward_curve),
                        ("image grids", run.grids), ("checkpoints", run.checkpoints),
                        ("tensorboard", run.tensorboard)]:
        lines.append(f"  {label:12s} {path}")
    return "\n".join(lines)
