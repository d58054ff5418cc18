"""The trainer end to end: Ray actors, data-parallel learners, faults, resume, bad input."""
import itertools
import json
import math
import os
import shutil
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

import actors.sampler
import rewards
from actors.driver import (
    NonFiniteRewardError, TrainingStopped, _Batches, _grid_images, summarize, train, training_reward,
)
from actors.reward import RewardScores
from actors.rollout import Rollout
from actors.sampler import SamplerWorker
from actors.topology import (
    SAMPLER_INLINE_BYTES, ActorsLostError, InlineWorkers, InsufficientResourcesError, RayWorkers, _actor_info,
    check_resources,
)
from conftest import draw_epoch_prompts, tiny_config
from rl.config import load_config
from rl.learner import PPOLearner, combine_rank_metrics
from rl.models import load_pipeline
from rl.outputs import EpochOutputs
from rl.prompts import BUILTIN, cycled_indices, epoch_prompts
from rl.run_dir import RunDirectory
from rl.sampling import Trajectories
from tune.evaluate import EvalSettings, clustered_sem, eval_set, evaluate


def _trainer_config(tiny_sd_dir, tmp_path, *overrides):
    return tiny_config(
        tiny_sd_dir,
        f"output_dir={tmp_path}",
        "sample.batch_size=4",
        "sample.num_batches_per_epoch=2",
        "train.batch_size=4",
        "train.clip_range=0.2",
        "train.learning_rate=1e-3",
        "train.warmup_steps=0",
        "advantage.mode=batch",
        "resources.cpus_per_sampler=0.5",
        "resources.cpus_per_reward_actor=0.5",
        "resources.cpus_per_learner=0.5",
        *overrides,
    )


def test_end_to_end_ray_run(ray_session, tiny_sd_dir, tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\na black bird\n")
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=e2e", "num_epochs=2", "resources.num_samplers=2",
                             f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=2",
                             "evaluation.reward=brightness", "evaluation.eta=0")  # fmt: skip
    run = train(config)
    progress = capsys.readouterr().err  # each held-out evaluation shows a bar: it takes minutes at the demo's size
    assert "held-out evaluation before training" in progress and "held-out evaluation after epoch 1" in progress
    rows = pq.read_table(run.metrics_path).to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["num_samples"] == 8 and r["num_dropped"] == 0 for r in rows)
    # samplers and learner are different processes; the learner agrees with them before updating
    assert all(r["logprob_mismatch"] < 1e-5 for r in rows)
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["approx_kl"]) for r in rows)
    assert all(r["reward_sem"] > 0 for r in rows)  # over the epoch's prompts (clustered_sem)
    for path in [run.config_path, run.reward_curve, run.grids / "epoch_0001.png",
                 run.final_lora / "pytorch_lora_weights.safetensors",
                 run.checkpoints / "epoch_0001" / "learner.pt",
                 run.checkpoints / "epoch_0001" / "lora" / "pytorch_lora_weights.safetensors"]:
        assert path.exists(), path
    assert any(run.tensorboard.iterdir())
    # the exported LoRA loads into a fresh pipeline with diffusers
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    # held-out evaluation before training and after the last epoch: the fixed (prompt, seed) set
    # that `texforce eval` scores for the base model and for the final LoRA
    evaluations = run.read_evaluations()
    assert [r["epoch"] for r in evaluations] == [-1, 1] and [r["policy_version"] for r in evaluations] == [0, 2]
    # drawn at evaluation.eta (0: deterministic DDIM), not at the policy's sample.eta (1)
    assert [r["eta"] for r in evaluations] == [0.0, 0.0]
    # the reward curve is redrawn with the last held-out point
    assert run.reward_curve.stat().st_mtime_ns >= run.evaluation_path.stat().st_mtime_ns
    settings = EvalSettings(num_seeds=2, base_seed=config.evaluation.seed_base, num_steps=6, eta=0.0)
    prompts = held_out.read_text().split("\n")[:3]
    reward = rewards.build_reward("brightness")  # evaluation.reward; training scored color_alignment
    assert [r["reward_spec"] for r in evaluations] == ["brightness"] * 2
    assert evaluate(pipe, reward, prompts, settings).objective.mean() == pytest.approx(evaluations[0]["reward_mean"], abs=1e-6)
    base_scores = evaluate(pipe, reward, prompts, settings).objective
    assert evaluations[0]["rewards"] == pytest.approx(base_scores.tolist(), abs=1e-6)
    pipe.load_lora_weights(str(run.final_lora))
    final_scores = evaluate(pipe, reward, prompts, settings).objective
    assert final_scores.mean() == pytest.approx(evaluations[1]["reward_mean"], abs=1e-6)
    # the gain is paired image by image over the same (prompt, seed) pairs
    change = final_scores - base_scores
    assert evaluations[1]["reward_gain"] == pytest.approx(change.mean(), abs=1e-6)
    assert evaluations[1]["reward_gain_sem"] == pytest.approx(change.std(ddof=1) / math.sqrt(len(change)), abs=1e-6)
    eval_prompts, _ = eval_set(prompts, settings)  # and counting the 3 prompts, not the 6 images, as the draws
    assert evaluations[1]["reward_gain_sem_over_prompts"] == pytest.approx(clustered_sem(change, eval_prompts), abs=1e-6)
    assert "counting the held-out prompts as a draw of prompts of their kind: +- " in summarize(run)
    assert "reward_gain" not in evaluations[0] or evaluations[0]["reward_gain"] is None
    assert (run.grids / "eval_before_training.png").exists() and (run.grids / "eval_epoch_0001.png").exists()
    assert "held-out brightness (6 images): before training" in summarize(run)
    assert "held-out gain, paired over the same prompts and seeds" in summarize(run)
    (mean_0, sem_0), (mean_1, sem_1) = training_reward(rows[:1]), training_reward(rows[1:])
    assert (f"training reward (the sampled batches' mean): epoch 0 {mean_0:.4f} +- {sem_0:.4f} -> epoch 1 "
            f"{mean_1:.4f} +- {sem_1:.4f}") in summarize(run)


def test_summary_compares_the_first_and_last_five_epochs_training_reward(tmp_path):
    """One epoch's batch mean is as noisy as its standard error (0.018 in the demo, larger than its gain): the
    summary compares the means of the first and last 5 epochs, each with its standard error."""
    run = RunDirectory(tmp_path)
    for epoch in range(12):
        run.append_metrics({"epoch": epoch, "reward_mean": 0.5 + 0.01 * epoch, "reward_std": 0.2, "num_samples": 16})
    mean, sem = training_reward(run.read_metrics()[:5])
    assert mean == pytest.approx(0.52) and sem == pytest.approx(0.05 / math.sqrt(5))  # 0.2 / sqrt(16) per epoch
    assert "training reward (the sampled batches' mean): epochs 0-4 0.5200 +- 0.0224 -> epochs 7-11 0.5900 +- 0.0224" \
        in summarize(run)
    # a row's standard error over its prompts (`reward_sem`, clustered) when it has one
    run.append_metrics({"epoch": 11, "reward_mean": 0.61, "reward_std": 0.2, "num_samples": 16, "reward_sem": 0.1})
    assert training_reward(run.read_metrics()[-1:]) == (0.61, 0.1)
    assert training_reward(run.read_metrics()[-2:])[1] == pytest.approx(math.sqrt(0.05**2 + 0.1**2) / 2)


def test_the_held_out_evaluation_runs_after_every_nth_and_the_last_epoch():
    """evaluation.every=N: after epochs N-1, 2N-1, ... (the N-th, 2N-th epoch) and the last; 0: the last only."""
    from actors.driver import _evaluation_due

    def due(*overrides):
        config = load_config(None, ["num_epochs=7", *overrides])
        return [epoch for epoch in range(config.num_epochs) if _evaluation_due(epoch, config)]

    assert due("evaluation.every=3") == [2, 5, 6]
    assert due("evaluation.every=2") == [1, 3, 5, 6]
    assert due("evaluation.every=0") == [6]


def test_summary_compares_the_last_held_out_evaluation_with_the_base_models(tmp_path):
    """With evaluation.every, evaluation.parquet holds a row per evaluated epoch: "before training" is the base
    model's (epoch -1), whatever was evaluated between it and the last."""
    run = RunDirectory(tmp_path)
    for epoch, mean in [(-1, 0.25), (0, 0.5), (1, 0.75)]:
        run.append_evaluation({"epoch": epoch, "reward_mean": mean, "reward_sem": 0.01, "num_samples": 4,
                               "rewards": [mean] * 4})
    assert ("(4 images): before training 0.2500 +- 0.0100 -> after epoch 1 0.7500 +- 0.0100"
            in summarize(run))


def test_two_learners_match_one_learner_on_the_union_batch(ray_session, tiny_sd_dir, tmp_path):
    two = _trainer_config(tiny_sd_dir, tmp_path, "resources.num_learners=2", "resources.num_samplers=1",
                          "train.batch_size=2", "sample.num_batches_per_epoch=2")
    one = _trainer_config(tiny_sd_dir, tmp_path, "train.batch_size=4", "sample.num_batches_per_epoch=2")
    sampler = SamplerWorker(one)
    learner = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), one)
    prompts = BUILTIN["colors"][:8]
    initial = learner.get_weights()
    _, _, *samples = sampler.sample(initial, prompts, list(range(8)))
    advantages = 2.0 ** torch.arange(8) / 64 - 1  # no 4 of them have the mean of all 8: nor has a rank's loss
    single_metrics = combine_rank_metrics([learner.update(Trajectories.cat(samples), advantages)])
    inline = InlineWorkers(two)  # the same config inline: one learner, on the ranks' minibatches
    inline.update(Trajectories.cat(samples), advantages)
    inline_weights = inline.get_weights().text_encoder
    assert all(torch.equal(inline_weights[k], v) for k, v in learner.get_weights().text_encoder.items())

    workers = RayWorkers(two)
    try:
        # the samplers' refs: each rank fetches only the 4 rows it trains on
        rollout = workers.rollout(initial, prompts, list(range(8)))
        metrics = workers.update(rollout.trajectories(), advantages)
        distributed = workers.get_weights()
    finally:
        workers.shutdown()
    assert metrics["policy_version"] == 1 and metrics["trajectories_fetched"] == 4
    single = learner.get_weights()
    assert max((v - initial.text_encoder[k]).abs().max() for k, v in single.text_encoder.items()) > 5e-4
    # Adam moves each weight by ~lr = 1e-3; unsynchronised gradients would differ at that scale.
    # Near-zero gradients make Adam's g/sqrt(v) float-sensitive, hence 5% of a step.
    for key, value in single.text_encoder.items():
        torch.testing.assert_close(distributed.text_encoder[key], value, rtol=1e-4, atol=5e-5)
    # and they report what it reports: means over all 8 rows (rank 0's 4 rows alone give another loss), the largest
    # log-prob mismatch of any rank, the most rows a rank fetched
    assert set(metrics) == set(single_metrics) | {"trajectories_fetched"}
    for key in ("loss", "approx_kl", "clipfrac", "ratio", "grad_norm", "lr"):
        assert metrics[key] == pytest.approx(single_metrics[key], rel=1e-3, abs=1e-12), key
    assert metrics["logprob_mismatch"] < 1e-5 and single_metrics["logprob_mismatch"] < 1e-5  # float noise alike


def test_async_sampling_on_ray_is_the_inline_run_one_version_stale(ray_session, tiny_sd_dir, tmp_path):
    """train.async_staleness=1: Ray samples epoch e+1 while the learner trains on
    epoch e; inline mode computes the same run in turn. Epoch 0's batch is on-policy either way;
    later ones are drawn by the version before the learner's, which the synchronous loop does not do."""
    overrides = ("num_epochs=3", "resources.num_samplers=2", "sample.num_steps=4", "train.async_staleness=1")
    on_ray = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=async_ray", *overrides))
    inline = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=async_inline", "resources.mode=inline", *overrides))
    synchronous = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=sync", "resources.mode=inline",
                                        *overrides, "train.async_staleness=0"))
    rows, sync_rows = on_ray.read_metrics(), synchronous.read_metrics()
    assert [r["staleness"] for r in rows] == [0, 1, 1] and [r["staleness"] for r in sync_rows] == [0, 0, 0]
    assert all(r["logprob_mismatch"] < 1e-5 for r in rows)  # under the LoRA that drew each batch
    ray_lora, inline_lora, sync_lora = (load_file(str(run.final_lora / "pytorch_lora_weights.safetensors"))
                                        for run in (on_ray, inline, synchronous))
    # Ray and inline differ by float noise only (different thread counts; here ~3e-7), the
    # synchronous loop's LoRA by a training step's size (Adam moves each weight by ~lr = 1e-3)
    for key, value in inline_lora.items():
        torch.testing.assert_close(ray_lora[key], value, rtol=1e-4, atol=2e-6)
    assert max((sync_lora[k] - v).abs().max() for k, v in inline_lora.items()) > 1e-4
    np.testing.assert_allclose([r["reward_mean"] for r in rows], [r["reward_mean"] for r in inline.read_metrics()],
                               rtol=1e-5)


def _a_lost_object(ray) -> "ray.ObjectRef":
    """A ref whose object Ray has lost, as the trajectories of a shard sampled on a node that died:
    its owner, an actor, is killed, and the ref is returned once a get says it is lost."""

    @ray.remote(num_cpus=0)
    class Owner:
        def put(self) -> list:
            return [ray.put(np.zeros(1 << 20, dtype=np.uint8))]  # in the object store, not inline

    owner = Owner.remote()
    (lost,) = ray.get(owner.put.remote())
    ray.kill(owner)
    while True:
        try:
            ray.get(lost, timeout=60)
        except ray.exceptions.ObjectLostError:
            return lost
        time.sleep(0.05)


def _lose_shard_0_at_epoch_1(monkeypatch, lost, times: int) -> None:
    """The learners' update of epoch 1 (policy version 1) gets `lost` for shard 0's trajectories,
    the first `times` times it is sent."""
    start_update = RayWorkers.start_update
    sent = []

    def start_update_losing_shard_0(self, trajectories, advantages):
        if self.get_weights().version == 1 and len(sent) < times:
            sent.append(1)
            trajectories = replace(trajectories, shards=[[lost, *trajectories.shards[0][1:]], *trajectories.shards[1:]])
        return start_update(self, trajectories, advantages)

    monkeypatch.setattr(RayWorkers, "start_update", start_update_losing_shard_0)


def test_trajectories_lost_before_the_update_are_sampled_again_by_the_lora_that_drew_them(
        ray_session, tiny_sd_dir, tmp_path, monkeypatch, caplog):
    """Async: epoch 1's batch was drawn by version 0 while version 1 trained; when its shard is lost,
    version 0 draws it again (the rollout keeps the LoRA that drew it), so the run equals one without the loss."""
    overrides = ("num_epochs=2", "resources.num_samplers=2", "sample.num_steps=4", "train.async_staleness=1")
    _lose_shard_0_at_epoch_1(monkeypatch, _a_lost_object(ray_session), times=1)
    with caplog.at_level("WARNING", logger="texforce"):
        run = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=lost", *overrides))
    inline = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=inline", "resources.mode=inline", *overrides))
    assert "the trajectories of shard(s) [0] were lost with the node that held them; sampling them again" in caplog.text
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1] and [r["staleness"] for r in rows] == [0, 1]
    assert all(r["logprob_mismatch"] < 1e-5 for r in rows)  # drawn again by version 0, not by version 1
    np.testing.assert_allclose([r["reward_mean"] for r in rows], [r["reward_mean"] for r in inline.read_metrics()],
                               rtol=1e-5)
    ray_lora, inline_lora = (load_file(str(r.final_lora / "pytorch_lora_weights.safetensors")) for r in (run, inline))
    for key, value in inline_lora.items():
        torch.testing.assert_close(ray_lora[key], value, rtol=1e-4, atol=2e-6)


def test_trajectories_lost_more_than_max_restarts_times_stop_the_run_with_how_to_resume(
        ray_session, tiny_sd_dir, tmp_path, monkeypatch):
    # save_every=2: epoch 0's checkpoint is written by the stop, with epoch 0's reward statistics (per_prompt),
    # not with epoch 1's rewards already in them (a resume would count them twice)
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=lost_twice", "num_epochs=2", "resources.num_samplers=1",
                             "sample.num_steps=4", "resources.max_restarts=1", "save_every=2",
                             "advantage.mode=per_prompt")
    _lose_shard_0_at_epoch_1(monkeypatch, _a_lost_object(ray_session), times=2)
    # in its own words: the learners' error reaches the driver inside Ray's traceback of the rank's call
    with pytest.raises(TrainingStopped, match=r"^the trajectories of shard\(s\) \[0\] were lost with the node that held "
                                              r"them, 2 times in epoch 1 \(resources.max_restarts=1\).*resume with "
                                              r"`texforce train --resume "):
        train(config)
    checkpoints = tmp_path / "lost_twice" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["epoch_0000"] and (checkpoints / "epoch_0000" / "learner.pt").exists()
    history = json.loads((checkpoints / "epoch_0000" / "driver.json").read_text())["tracker"]["history"]
    assert sum(len(rewards) for rewards in history.values()) == config.samples_per_epoch  # epoch 0's 8, not 16
    assert _learner_pids(ray_session) == []


def test_no_sampler_left_to_draw_lost_trajectories_again_stops_the_run_with_how_to_resume(
        ray_session, tiny_sd_dir, tmp_path, monkeypatch):
    from actors.topology import ActorsLostError

    def every_sampler_gone(self, rollout, shards):
        raise ActorsLostError("every sampler is gone (each used its resources.max_restarts=1)")

    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=gone", "num_epochs=2", "resources.num_samplers=1",
                             "sample.num_steps=4", "resources.max_restarts=1", "save_every=2")
    _lose_shard_0_at_epoch_1(monkeypatch, _a_lost_object(ray_session), times=1)
    monkeypatch.setattr(RayWorkers, "resample", every_sampler_gone)
    with pytest.raises(TrainingStopped, match=r"^every sampler is gone .*; the checkpoints are kept: resume with "
                                              r"`texforce train --resume .*gone`$"):
        train(config)
    assert [p.name for p in (tmp_path / "gone" / "checkpoints").iterdir()] == ["epoch_0000"]  # epoch 0 kept
    assert _learner_pids(ray_session) == []


@pytest.mark.parametrize("staleness", [0, 1], ids=["sync", "async"])
def test_samplers_gone_while_drawing_a_batch_stop_with_the_last_finished_epoch_logged_and_kept(
        tiny_sd_dir, tmp_path, monkeypatch, staleness):
    """The samplers gone for good while drawing epoch 1's batch: during epoch 0's update with async sampling (that
    update still finishes), at the start of epoch 1 without. Either way epoch 0's metrics row and checkpoint are
    written (save_every=5 would skip it), not epoch 1's, which trained nothing (a checkpoint named epoch_0001 would
    make the resume skip it), and the run stops with how to resume, which goes on from epoch 1."""
    rollout = InlineWorkers.rollout
    calls = []

    def gone_at_the_second_batch(self, *args, evaluation=False, **kwargs):
        calls.append(evaluation)
        if calls.count(False) == 2 and not evaluation:
            raise ActorsLostError("every sampler died more than resources.max_restarts=3 times")
        return rollout(self, *args, evaluation=evaluation, **kwargs)

    monkeypatch.setattr(InlineWorkers, "rollout", gone_at_the_second_batch)
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=gone", "resources.mode=inline", "num_epochs=3",
                             "sample.num_steps=4", f"train.async_staleness={staleness}", "save_every=5")
    with pytest.raises(TrainingStopped, match=r"^every sampler died .*; then `texforce train --resume .*gone`$"):
        train(config)
    run = RunDirectory(tmp_path / "gone")
    assert [p.name for p in run.checkpoints.iterdir()] == ["epoch_0000"]
    assert [r["epoch"] for r in run.read_metrics()] == [0]
    monkeypatch.setattr(InlineWorkers, "rollout", rollout)
    resumed = train(load_config(run.path / "config.yaml"), resume=run.path)
    assert [r["epoch"] for r in resumed.read_metrics()] == [0, 1, 2]


def test_a_grid_whose_images_were_lost_is_skipped_and_the_epoch_written(ray_session, tmp_path, caplog):
    """A node that held an epoch's grid images died after they were scored: the epoch's outputs
    are written without the grid, with a warning, and the run goes on."""
    lost = _a_lost_object(ray_session)
    rollout = Rollout(["a red ball", "a blue cup"], RewardScores(torch.zeros(2), {}), [2], [lost], [lost])
    with caplog.at_level("WARNING", logger="texforce"):
        images = _grid_images(rollout, [0, 1], "epoch 3's grid")
    assert images is None
    assert "the images for epoch 3's grid were lost with the node that held them; no grid for it" in caplog.text
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    outputs = EpochOutputs(run, title="curve")
    outputs.write({"epoch": 3, "reward_mean": 0.6, "reward_std": 0.3, "num_samples": 2}, images, ["a", "b"])
    outputs.close()
    assert [r["epoch"] for r in run.read_metrics()] == [3] and run.reward_curve.exists()
    assert not run.grids.exists() or not any(run.grids.iterdir())


def _fault_config(tiny_sd_dir, tmp_path, *overrides):
    return _trainer_config(tiny_sd_dir, tmp_path, "resources.num_samplers=2", "sample.num_steps=4",
                           "sample.batch_size=2", "sample.num_batches_per_epoch=6", *overrides)


class _SaysImage1NotFinite:
    """A sampler's handle whose sample calls report their second image non-finite (`SampledShard.images_finite`), as
    the sampler reports a NaN image that its uint8 rounding made black."""

    def __init__(self, actor):
        self.actor, self.num_returns = actor, 1
        self.sample = self  # the rollout calls .sample.options(num_returns=...).remote(weights, prompts, ...)

    def options(self, num_returns: int = 1, **_):
        self.num_returns = num_returns
        return self

    def remote(self, *args, **kwargs):
        drawn, *rest = self.actor.sample.options(num_returns=self.num_returns).remote(*args, **kwargs)
        shard = ray.get(drawn)
        return [ray.put(replace(shard, images_finite=torch.tensor([True, False]))), *rest]

    def __getattr__(self, name):
        return getattr(self.actor, name)


def test_killed_sampler_and_reward_actor_cost_one_restart_each(ray_session, tiny_sd_dir, tmp_path):
    workers = RayWorkers(_fault_config(tiny_sd_dir, tmp_path, "resources.learner_threads=2"))
    try:
        weights = workers.get_weights()
        prompts, seeds = BUILTIN["colors"][:12], list(range(12))
        reference = workers.rollout(weights, prompts, seeds)
        # the driver holds refs to the samplers' shards, not the latents
        refs = [ref for shard in reference.trajectory_shards for ref in shard] + reference.image_shards
        assert len(refs) == 12 + 6 and all(isinstance(ref, ray.ObjectRef) for ref in refs)
        # ... which point into the node's object store, not into the driver's memory, though each is under Ray's
        # 100 KiB limit for returning an object inside the reply to its caller
        locations = ray.experimental.get_object_locations(refs).values()
        assert all(where["node_ids"] and SAMPLER_INLINE_BYTES < where["object_size"] < 100 * 1024 for where in locations)
        fetched = reference.trajectories().fetch()
        reference_latents = fetched.latents
        # the learners' trajectories come without the images, which the reward actors read apart
        assert fetched.images is None
        images = reference.images([0, 11])
        assert images.shape[:2] == (2, 3) and images.dtype == torch.uint8
        # held-out images come without trajectories: nothing trains on them
        held_out = workers.rollout(weights, prompts[:4], seeds[:4], evaluation=True)
        assert held_out.trajectory_shards == [[], []] and len(held_out.scores.scores) == 4
        assert held_out.images([3]).shape[:2] == (1, 3)
        # a sampler's word that an image was not finite before its uint8 rounding reaches the reward actor: NaN reward
        samplers = workers.samplers
        workers.samplers = [_SaysImage1NotFinite(s) for s in samplers]
        try:
            flagged = workers.rollout(weights, prompts[:2], seeds[:2]).scores.scores
        finally:
            workers.samplers = samplers
        assert torch.isnan(flagged[1]) and float(flagged[0]) == pytest.approx(float(reference.scores.scores[0]))
        assert workers.restarts == 0
        killed = []

        def kill_after_the_first_shard(kind, shard):  # mid-epoch, whatever the load on the cores
            if kind == "sample" and not killed:
                killed.append(shard)
                ray_session.kill(workers.samplers[0], no_restart=False)
                ray_session.kill(workers.reward_actors[0], no_restart=False)

        rollout = workers.rollout(weights, prompts, seeds, on_shard_done=kill_after_the_first_shard)
        trajectories = rollout.trajectories().fetch()
        assert killed
        # Ray's own restart count: one death is one restart, not one per failed or retried call
        assert workers.restarts == 2
        # the learner runs resources.learner_threads (here 2) though it reserves 0.5 CPU
        threads = ray.get(workers.learners[0].__ray_call__.remote(lambda self: torch.get_num_threads()))
        assert threads == 2 and workers.config.resources.cpus_per_learner == 0.5
    finally:
        workers.shutdown()
    assert len(trajectories) == 12 and trajectories.prompts == prompts == rollout.prompts
    # re-issued shards are sampled from the same seeds: nothing differs from the clean epoch
    torch.testing.assert_close(rollout.scores.scores, reference.scores.scores)
    torch.testing.assert_close(trajectories.latents, reference_latents)


def test_rollout_roles_yield_the_cores_restarted_ones_too(ray_session, tiny_sd_dir, tmp_path):
    """resources.rollout_low_priority: samplers and reward actors at SCHED_IDLE, the learner not. Nothing
    is sampled here: at SCHED_IDLE beside busy processes that crawls (beside three, >7 min for 12 samples)."""
    workers = RayWorkers(_fault_config(tiny_sd_dir, tmp_path, "resources.rollout_low_priority=true"))
    rollout_roles = workers.samplers + workers.reward_actors

    def policies() -> dict[str, list[int]]:
        return {role: [os.sched_getscheduler(_actor_info(a)["Pid"]) for a in actors]
                for role, actors in [("rollout", rollout_roles), ("learner", workers.learners)]}

    try:
        assert policies() == {"rollout": [os.SCHED_IDLE] * 3, "learner": [os.SCHED_OTHER]}
        killed = [workers.samplers[0], workers.reward_actors[0]]
        for actor in killed:
            ray_session.kill(actor, no_restart=False)
        deadline = time.monotonic() + 300
        while any(int(_actor_info(a).get("NumRestarts", 0)) < 1 for a in killed):
            assert time.monotonic() < deadline, "Ray did not restart the killed actors"
            time.sleep(0.05)
        # Ray holds a ping until the restart is done: then the restarted processes have lowered theirs
        ray.get([a.ping.options(max_task_retries=-1).remote() for a in rollout_roles])
        assert workers.restarts == 2
        assert policies() == {"rollout": [os.SCHED_IDLE] * 3, "learner": [os.SCHED_OTHER]}
    finally:
        workers.shutdown()


def test_a_sampler_out_of_restarts_leaves_its_work_to_the_others(ray_session, tiny_sd_dir, tmp_path, caplog):
    workers = RayWorkers(_fault_config(tiny_sd_dir, tmp_path, "resources.max_restarts=0"))
    try:
        weights = workers.get_weights()
        prompts, seeds = BUILTIN["colors"][:12], list(range(12))

        killed = []

        def kill_once(kind, shard):
            if kind == "sample" and not killed:
                killed.append(shard)
                ray_session.kill(workers.samplers[0], no_restart=False)

        with caplog.at_level("WARNING", logger="texforce"):
            rollout = workers.rollout(weights, prompts, seeds, on_shard_done=kill_once)
            trajectories = rollout.trajectories().fetch()
    finally:
        workers.shutdown()
    assert trajectories.prompts == prompts and torch.isfinite(rollout.scores.scores).all()
    assert "sampler 0 is gone after 0 restarts" in caplog.text


class _ScoresLostImages:
    """A reward actor's handle whose score calls for `prompts` read `lost` in place of the shard's images:
    what a reward actor meets when the node that sampled the shard died before it was scored."""

    def __init__(self, actor, lost, prompts: list[str]):
        self.actor, self.lost, self.prompts, self.calls = actor, lost, prompts, 0
        self.score = self  # the rollout calls .score.remote(images, prompts, evaluation, images_finite)

    def remote(self, images, prompts, evaluation, images_finite):
        if list(prompts) == self.prompts:
            images, self.calls = self.lost, self.calls + 1
            assert self.calls <= 5, "the rollout samples a shard whose images are lost again and again"
        return self.actor.score.remote(images, prompts, evaluation, images_finite)

    def __getattr__(self, name):
        return getattr(self.actor, name)


def test_a_shards_images_lost_more_than_max_restarts_times_stop_the_rollout(ray_session, tiny_sd_dir, tmp_path,
                                                                             caplog):
    """Each loss of a shard's images has the shard sampled again, up to max(1, resources.max_restarts)
    times; then the rollout stops, naming the shard (the driver turns it into a stop with how to resume)."""
    workers = RayWorkers(_fault_config(tiny_sd_dir, tmp_path, "resources.max_restarts=1"))
    actors = workers.reward_actors
    prompts, seeds = BUILTIN["colors"][:12], list(range(12))
    assert len(set(prompts)) == 12
    workers.reward_actors = [_ScoresLostImages(a, _a_lost_object(ray_session), prompts[2:4]) for a in actors]
    try:
        with caplog.at_level("WARNING", logger="texforce"), pytest.raises(
                ActorsLostError, match=r"the images of shard 1 were lost with their node 2 times "
                                       r"\(resources.max_restarts=1\)"):
            workers.rollout(workers.get_weights(), prompts, seeds)
        assert sum(a.calls for a in workers.reward_actors) == 2  # scored, lost, sampled again, lost again
        assert caplog.text.count("the images of shard 1 were lost with the node that held them") == 1
        assert workers.restarts == 0  # no actor died: a lost object is not a death
    finally:
        workers.reward_actors = actors
        workers.shutdown()


class _OnADeadNode:
    """Handles of actors that share a node which dies at the first call any of them gets for `method`: that call and
    each later one to an actor of the node fail (ActorDiedError, from a killed stand-in) until the actor has answered
    a ping, which Ray holds until its restart elsewhere is done. poisoned: prompts whose every call fails instead,
    the actor dying on that input each time."""

    def __init__(self, ray, actors: list, method: str, poisoned: list[str] | None = None):
        @ray.remote(num_cpus=0)
        class StandIn:
            def call(self):
                pass

        self.dead = StandIn.remote()
        ray.kill(self.dead, no_restart=True)
        self.actors, self.poisoned, self.revived, self.failed = actors, poisoned, set(), []
        self.handles = [_OnNodeHandle(self, i, method) for i in range(len(actors))]

    def call(self, i: int, method: str, num_returns: int, args: tuple, kwargs: dict):
        prompts = list(args[1])  # sample(weights, prompts, ...), score(images, prompts, ...)
        if (prompts == self.poisoned) if self.poisoned is not None else (i not in self.revived):
            self.failed.append(i)
            return self.dead.call.options(num_returns=num_returns).remote()
        return getattr(self.actors[i], method).options(num_returns=num_returns).remote(*args, **kwargs)


class _OnNodeHandle:
    def __init__(self, node: _OnADeadNode, i: int, method: str):
        self.node, self.i, self.method, self.num_returns = node, i, method, 1
        setattr(self, method, self)

    def options(self, num_returns: int = 1, **_):
        self.num_returns = num_returns
        return self

    def remote(self, *args, **kwargs):
        num_returns, self.num_returns = self.num_returns, 1
        return self.node.call(self.i, self.method, num_returns, args, kwargs)

    @property
    def ping(self):
        self.node.revived.add(self.i)
        return self.node.actors[self.i].ping

    def __getattr__(self, name):
        return getattr(self.node.actors[self.i], name)


@pytest.mark.parametrize("role", ["sampler", "reward actor"])
def test_a_shard_failed_again_by_an_actor_of_the_same_dead_node_is_not_taken_for_a_poisoned_input(
        ray_session, tiny_sd_dir, tmp_path, caplog, role):
    """Two samplers (or reward actors) on one node, which dies as the first of them gets the epoch's only shard.
    The shard goes to the other, idle and not yet known dead, and fails again. Counting that as a second failure
    of the shard would stop the rollout at resources.max_restarts=1 ("its actor dies on this input"); it says
    nothing about the shard. Both actors answer once Ray restarted them, and the shard is sampled and scored."""
    workers = RayWorkers(_fault_config(tiny_sd_dir, tmp_path, "resources.max_restarts=1", "resources.num_reward_actors=2"))
    attribute, method = ("samplers", "sample") if role == "sampler" else ("reward_actors", "score")
    actors = getattr(workers, attribute)
    prompts, seeds = BUILTIN["colors"][:2], [0, 1]  # one shard
    try:
        weights = workers.get_weights()
        reference = workers.rollout(weights, prompts, seeds)
        node = _OnADeadNode(ray_session, actors, method)
        setattr(workers, attribute, node.handles)
        with caplog.at_level("WARNING", logger="texforce"):
            rollout = workers.rollout(weights, prompts, seeds)
    finally:
        setattr(workers, attribute, actors)
        workers.shutdown()
    assert node.failed == [0, 1]
    assert [f"{role} {i} failed on shard 0" in caplog.text for i in (0, 1)] == [True, True]
    torch.testing.assert_close(rollout.scores.scores, reference.scores.scores)


def test_a_shard_that_fails_on_an_actor_that_answered_since_its_last_failure_stops_the_rollout(
        ray_session, tiny_sd_dir, tmp_path):
    """A poisoned input: every sample call for the shard fails. The second actor's failure is not counted (it had
    not answered since the first); once a restarted actor answered, its failure on the shard is the second, over
    max(1, resources.max_restarts=1): the rollout stops naming the shard."""
    workers = RayWorkers(_fault_config(tiny_sd_dir, tmp_path, "resources.max_restarts=1"))
    samplers = workers.samplers
    prompts = BUILTIN["colors"][:2]
    node = _OnADeadNode(ray_session, samplers, "sample", poisoned=prompts)
    workers.samplers = node.handles
    try:
        with pytest.raises(ActorsLostError, match=r"^sample of shard 0 \(prompts \[.*\]\) failed 2 times: its actor "
                                                  r"dies on this input$"):
            workers.rollout(workers.get_weights(), prompts, [0, 1])
    finally:
        workers.samplers = samplers
        workers.shutdown()
    assert len(node.failed) == 3 and node.failed[:2] == [0, 1]


def test_a_shards_failure_counts_once_per_death_of_an_actor_that_answered_since_the_shards_last_counted_one():
    """`_ShardFailures` without Ray: two samplers that both answered earlier shards share a node that dies with the
    shard on the first; the second fails it too before the driver knows, which says nothing about the shard."""
    from actors.topology import _ShardFailures

    failures = _ShardFailures()
    failures.answered("sampler", 0)
    failures.answered("sampler", 1)
    assert failures.failed("sample", 3, "sampler", 0) == 1
    assert failures.failed("sample", 3, "sampler", 1) == 1  # the same death, seen again
    failures.answered("sampler", 1)  # restarted, it answered its ping
    assert failures.failed("sample", 3, "sampler", 1) == 2  # and died on the shard again: it dies on this input
    assert failures.failed("sample", 3) == 3  # the shard's images lost with a node: always counted


def _learner_pids(ray) -> list[int]:
    from ray._private import state

    return [a["Pid"] for a in state.actors().values() if a["ActorClassName"] == "LearnerWorker" and a["State"] == "ALIVE"]


def _kill_the_learner_after_epoch_0(ray):
    def on_epoch_end(epoch, row):
        if epoch == 0:
            (pid,) = _learner_pids(ray)
            os.kill(pid, signal.SIGKILL)

    return on_epoch_end


@pytest.mark.parametrize("staleness", [0, 1], ids=["sync", "async"])
def test_a_dead_learner_is_replaced_and_the_run_goes_on_from_its_checkpoint(ray_session, tiny_sd_dir, tmp_path,
                                                                             staleness):
    """Async: epoch 1's batch, drawn during epoch 0's update, is drawn again after the restore with the version
    before the checkpoint's (a new `_Batches`), as the straight run drew it, not with the restored LoRA."""
    overrides = ("num_epochs=2", "resources.num_samplers=1", "sample.num_steps=4", f"train.async_staleness={staleness}")
    # the run without the fault inline: the same run as on Ray, to float noise (test_async_sampling_on_ray_...)
    straight = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=straight", "resources.mode=inline", *overrides))
    run = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=killed", *overrides),
                on_epoch_end=_kill_the_learner_after_epoch_0(ray_session))
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["actor_restarts"] == 1
    # epoch 1 ran on a new learner loaded from epoch 0's checkpoint: the same LoRA as without the fault (a lost
    # optimizer state or a batch drawn by another version moves weights by a step's size, ~lr = 1e-3)
    a = load_file(str(straight.final_lora / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run.final_lora / "pytorch_lora_weights.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose([r["reward_mean"] for r in rows], [r["reward_mean"] for r in straight.read_metrics()],
                               rtol=1e-5)


def test_a_learner_lost_in_a_gradient_runs_evaluation_stops_it_with_how_to_resume_which_finishes_it(
        ray_session, tiny_sd_dir, tmp_path):
    """A gradient learner's ranks draw its held-out evaluation: killed after the last epoch, before the evaluation
    after it, the run stops with one line (checkpoints kept), and the resumed run evaluates that epoch."""
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\n")
    config = tiny_config(tiny_sd_dir, f"output_dir={tmp_path}", "run_name=refl", "train.algorithm=refl",
                         "lora.policy=unet", "sample.num_steps=4", "num_epochs=1", f"evaluation.prompts_file={held_out}",
                         "evaluation.num_seeds=2", "resources.cpus_per_learner=1")
    with pytest.raises(TrainingStopped, match=r"learner rank\(s\) \[0\] died during the held-out evaluation .*"
                                              r"resume with `texforce train --resume .*refl`, which finishes"):
        train(config, on_epoch_end=_kill_the_learner_after_epoch_0(ray_session))
    run_dir = tmp_path / "refl"
    assert [r["epoch"] for r in RunDirectory(run_dir).read_evaluations()] == [-1]
    run = train(load_config(run_dir / "config.yaml"), resume=run_dir)
    assert [r["epoch"] for r in run.read_evaluations()] == [-1, 0]
    assert (run.final_lora / "pytorch_lora_weights.safetensors").exists()


def test_an_error_in_the_learner_ranks_is_raised_as_a_bug_not_taken_for_a_death(ray_session, tiny_sd_dir, tmp_path):
    """Both ranks reject a batch of the wrong number of steps: every rank is alive, so the driver
    re-raises the error at once instead of restarting the group (which would fail the same way)."""
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.num_learners=2", "resources.num_samplers=1",
                             "train.batch_size=2")
    other_steps = _trainer_config(tiny_sd_dir, tmp_path, "sample.num_steps=4")
    workers = RayWorkers(config)
    try:
        _, _, *samples = SamplerWorker(other_steps).sample(workers.get_weights(), BUILTIN["colors"][:4], list(range(4)))
        batch = Trajectories.cat(samples)
        with pytest.raises(ray.exceptions.RayTaskError, match="trajectories have 4 steps, the learner's schedule 6"):
            workers.update(batch, torch.zeros(4))
        assert workers.restarts == 0 and workers.get_weights().version == 0  # the same ranks still answer
    finally:
        workers.shutdown()


def test_learners_that_cannot_start_again_stop_the_run_with_how_to_resume(ray_session, tiny_sd_dir, tmp_path):
    """A new group whose rank dies while starting (here: its model is gone) is started again, up to
    resources.max_restarts times, then the run stops with its checkpoints and no learner left behind."""
    model = Path(shutil.copytree(tiny_sd_dir, tmp_path / "model"))
    config = _trainer_config(str(model), tmp_path, "run_name=nostart", "num_epochs=2", "resources.num_samplers=1",
                             "sample.num_steps=4", "resources.max_restarts=1")
    kill = _kill_the_learner_after_epoch_0(ray_session)

    def kill_and_remove_the_model(epoch, row):
        kill(epoch, row)
        if epoch == 0:
            model.rename(tmp_path / "gone")

    with pytest.raises(TrainingStopped, match=r"died while the group started, 2 times.*resume with `texforce train"):
        train(config, on_epoch_end=kill_and_remove_the_model)
    assert (tmp_path / "nostart" / "checkpoints" / "epoch_0000" / "learner.pt").exists()
    assert _learner_pids(ray_session) == []


def test_a_learner_out_of_restarts_stops_with_how_to_resume(ray_session, tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=stops", "num_epochs=2", "resources.num_samplers=1",
                             "sample.num_steps=4", "resources.max_restarts=0")
    with pytest.raises(TrainingStopped, match=r"resume with `texforce train --resume .*stops`"):
        train(config, on_epoch_end=_kill_the_learner_after_epoch_0(ray_session))
    assert (tmp_path / "stops" / "checkpoints" / "epoch_0000" / "learner.pt").exists()


def test_actor_restarts_count_each_learner_rank_a_group_restart_replaced():
    """metrics.parquet's actor_restarts: Ray's restarts of the rollout roles, plus every rank of each learner group
    the driver replaced (`restart_learners` starts all of them again)."""
    workers = object.__new__(RayWorkers)
    workers.samplers, workers.reward_actors, workers.learners, workers.learner_restarts = [], [], ["rank 0", "rank 1"], 2
    assert workers.restarts == 4


class _Interrupt(Exception):
    pass


def _interrupt_after_epoch_1(epoch, row):
    if epoch == 1:
        raise _Interrupt


# async: the resumed run must draw its first batch with the LoRA kept from before the interruption
_RESUME_OVERRIDES = ("resources.mode=inline", "num_epochs=3", "advantage.mode=per_prompt", "advantage.min_count=2",
                     "train.async_staleness=1")


@pytest.fixture(scope="module")
def runs_for_resume(tiny_sd_dir, tmp_path_factory):
    """A straight 3-epoch inline run, and the same run interrupted after epoch 1 (checkpoints 0 and 1)."""
    tmp_path = tmp_path_factory.mktemp("resume")
    straight = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=straight", *_RESUME_OVERRIDES))
    with pytest.raises(_Interrupt):
        train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=interrupted", *_RESUME_OVERRIDES),
              on_epoch_end=_interrupt_after_epoch_1)
    assert not (tmp_path / "interrupted" / "final_lora").exists()
    return straight, tmp_path / "interrupted"


def _assert_same_lora(run, straight):
    a = load_file(str(straight.final_lora / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run.final_lora / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        [r["reward_mean"] for r in run.read_metrics()], [r["reward_mean"] for r in straight.read_metrics()], rtol=1e-5,
    )


def test_resume_reaches_the_same_lora(runs_for_resume, tmp_path):
    straight, interrupted = runs_for_resume
    run_dir = shutil.copytree(interrupted, tmp_path / "run")
    resumed = train(load_config(run_dir / "config.yaml"), resume=run_dir)
    assert [r["epoch"] for r in resumed.read_metrics()] == [0, 1, 2]
    _assert_same_lora(resumed, straight)


def test_resume_falls_back_from_a_truncated_checkpoint(runs_for_resume, tmp_path, caplog):
    straight, interrupted = runs_for_resume
    run_dir = shutil.copytree(interrupted, tmp_path / "run")
    latest = run_dir / "checkpoints" / "epoch_0001" / "learner.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level("WARNING", logger="texforce"):
        resumed = train(load_config(run_dir / "config.yaml"), resume=run_dir)
    assert "epoch_0001 cannot be read" in caplog.text
    # epoch 1 is trained again from epoch 0's checkpoint, to the same end
    _assert_same_lora(resumed, straight)


def test_resume_overrides_are_saved_for_the_next_resume(runs_for_resume, tmp_path):
    _, interrupted = runs_for_resume
    run_dir = shutil.copytree(interrupted, tmp_path / "run")
    config = load_config(run_dir / "config.yaml", ["num_epochs=2"])  # as `--resume RUN num_epochs=2` builds it
    train(config, resume=run_dir)  # epochs 0-1 are done: nothing to train, the final LoRA is written
    assert load_config(run_dir / "config.yaml").num_epochs == 2
    assert (run_dir / "final_lora" / "pytorch_lora_weights.safetensors").exists()


def test_on_epoch_end_returning_true_ends_the_run_like_its_last_epoch(tiny_sd_dir, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\n")
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=budget", "num_epochs=5", "resources.mode=inline",
                             "sample.num_steps=4", f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=1")
    seen = []
    run = train(config, on_epoch_end=lambda epoch, row: seen.append(epoch) or epoch == 1)
    assert seen == [0, 1] and [r["epoch"] for r in run.read_metrics()] == [0, 1]
    # what the last epoch gets: the held-out evaluation (paired with the base model's) and the final LoRA
    evaluations = run.read_evaluations()
    assert [r["epoch"] for r in evaluations] == [-1, 1] and np.isfinite(evaluations[1]["reward_gain"])
    assert (run.final_lora / "pytorch_lora_weights.safetensors").exists()


def test_a_resume_finishes_the_last_epochs_interrupted_held_out_evaluation(tiny_sd_dir, tmp_path, monkeypatch):
    import actors.driver

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\n")
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=cut", "resources.mode=inline", "sample.num_steps=4",
                             f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=1")
    evaluate = actors.driver.evaluate_held_out

    def interrupted_after_the_base(epoch, *args, **kwargs):
        if epoch >= 0:
            raise KeyboardInterrupt
        evaluate(epoch, *args, **kwargs)

    monkeypatch.setattr(actors.driver, "evaluate_held_out", interrupted_after_the_base)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    run_dir = tmp_path / "cut"
    assert [r["epoch"] for r in RunDirectory(run_dir).read_evaluations()] == [-1]
    assert not (run_dir / "final_lora").exists()
    monkeypatch.setattr(actors.driver, "evaluate_held_out", evaluate)
    run = train(load_config(run_dir / "config.yaml"), resume=run_dir)  # every epoch is done: only the evaluation
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]
    evaluations = run.read_evaluations()
    assert [r["epoch"] for r in evaluations] == [-1, 1] and np.isfinite(evaluations[1]["reward_gain"])
    assert (run.final_lora / "pytorch_lora_weights.safetensors").exists()


def test_actors_lost_in_a_mid_run_evaluation_stop_with_the_epoch_kept_and_the_resume_evaluates_it(
        tiny_sd_dir, tmp_path, monkeypatch):
    import actors.driver
    from actors.topology import ActorsLostError

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\n")
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=lost", "resources.mode=inline", "sample.num_steps=4",
                             "num_epochs=3", "save_every=3", f"evaluation.prompts_file={held_out}",
                             "evaluation.num_seeds=1", "evaluation.every=1")
    evaluate = actors.driver.evaluate_held_out

    def samplers_gone_after_epoch_0(epoch, *args, **kwargs):
        if epoch == 0:
            raise ActorsLostError("every sampler is gone (each used its resources.max_restarts=3)")
        return evaluate(epoch, *args, **kwargs)

    monkeypatch.setattr(actors.driver, "evaluate_held_out", samplers_gone_after_epoch_0)
    with pytest.raises(TrainingStopped, match=r"^every sampler is gone .*; the checkpoints are kept: resume with "
                                              r"`texforce train --resume .*lost`, which finishes the evaluation$"):
        train(config)
    run = RunDirectory(tmp_path / "lost")
    assert [p.name for p in run.checkpoints.iterdir()] == ["epoch_0000"]  # save_every=3 would have skipped it
    assert [r["epoch"] for r in run.read_evaluations()] == [-1]
    monkeypatch.setattr(actors.driver, "evaluate_held_out", evaluate)
    run = train(load_config(run.path / "config.yaml"), resume=run.path)
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1, 2]
    assert [r["epoch"] for r in run.read_evaluations()] == [-1, 0, 1, 2]  # epoch 0's evaluated by the resume


def test_each_held_out_gain_is_paired_with_the_base_model_and_a_resume_evaluates_each_epoch_once(
        tiny_sd_dir, tmp_path, monkeypatch):
    """evaluation.every=1: each evaluation's gain is against the base model's scores (epoch -1), not the evaluation
    before it; a resume after an evaluated epoch does not evaluate it again (minutes at the demo's size)."""
    import actors.driver
    from tune.evaluate import paired_gain

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\na white cup\n")
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=every", "resources.mode=inline", "sample.num_steps=4",
                             "num_epochs=2", f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=2",
                             "evaluation.every=1")
    run = train(config)
    evaluate, evaluated = actors.driver.evaluate_held_out, []
    monkeypatch.setattr(actors.driver, "evaluate_held_out",
                        lambda epoch, *args, **kwargs: evaluated.append(epoch) or evaluate(epoch, *args, **kwargs))
    train(load_config(run.config_path, ["num_epochs=3"]), resume=run.path)
    assert evaluated == [2]
    evaluations = run.read_evaluations()
    assert [r["epoch"] for r in evaluations] == [-1, 0, 1, 2]
    base = np.asarray(evaluations[0]["rewards"])
    for before, row in itertools.pairwise(evaluations[1:]):
        assert row["rewards"] != before["rewards"]  # the LoRA moved: pairing with the row before would differ
    for row in evaluations[1:]:
        gain = paired_gain(base, np.asarray(row["rewards"]))
        assert row["reward_gain"] == pytest.approx(gain["mean"]) and row["reward_gain_sem"] == pytest.approx(gain["sem"])


def test_a_held_out_file_added_in_a_resume_gets_no_before_training_row(tiny_sd_dir, tmp_path):
    """The base model's evaluation runs before epoch 0 only: a resume that adds evaluation.prompts_file holds trained
    weights, which must not be scored as "before training" (the gains would be paired with them); the epochs
    evaluated after it have no gain."""
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=added", "resources.mode=inline", "sample.num_steps=4",
                             "num_epochs=1")
    run = train(config)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a purple hat\n")
    train(load_config(run.config_path, ["num_epochs=2", f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=1"]),
          resume=run.path)
    evaluations = run.read_evaluations()
    assert [r["epoch"] for r in evaluations] == [1] and evaluations[0].get("reward_gain") is None


def test_resource_check_fails_fast_with_the_shortfall(ray_session, tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.gpus_per_sampler=1")
    start = time.monotonic()
    with pytest.raises(InsufficientResourcesError, match=r"GPU: requested 2, the cluster has 0.*resources\."):
        RayWorkers(config)
    assert time.monotonic() - start < 10


def test_a_model_the_actors_cannot_load_is_the_one_line_user_error_inline_mode_gives(ray_session, tiny_sd_dir,
                                                                                       tmp_path):
    """An actor's constructor that raises ModelNotFoundError reached the driver as Ray's ActorDiedError, whose text
    holds the traceback: `texforce train` printed 166 lines and exit code 1 where inline mode prints one line."""
    from rl.models import ModelNotFoundError

    broken = Path(shutil.copytree(tiny_sd_dir, tmp_path / "model"))
    unet_config = json.loads((broken / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [2 * c for c in unet_config["block_out_channels"]]  # not its weights' shapes
    (broken / "unet" / "config.json").write_text(json.dumps(unet_config))
    config = _trainer_config(str(broken), tmp_path, "resources.num_samplers=1")
    with pytest.raises(ModelNotFoundError) as inline:
        InlineWorkers(config)
    with pytest.raises(ModelNotFoundError) as on_ray:
        RayWorkers(config)
    assert str(on_ray.value).startswith(f"could not load a Stable Diffusion pipeline from '{broken}'")
    assert str(on_ray.value) == str(inline.value) and "Traceback" not in str(on_ray.value)


def test_the_end_of_a_run_does_not_wait_on_a_learner_busy_with_an_update(ray_session, monkeypatch):
    """Ctrl-C during an update: the learner's shutdown call queues behind the update, so the run's end waits
    SHUTDOWN_GRACE_S for it, not resources.call_timeout_s (30 min), then kills the actors: the samplers and reward
    actors too, which would otherwise hold their CPUs in a cluster that outlives the run."""
    import threading

    import actors.topology

    @ray.remote(num_cpus=0)
    class BusyLearner:
        def update(self):
            threading.Event().wait()  # an update that does not end before the kill

        def shutdown(self):
            return None

        def ping(self):
            return "alive"

    learner, sampler, reward_actor = (BusyLearner.remote() for _ in range(3))  # the other two as stand-ins
    assert ray.get([a.ping.remote() for a in (learner, sampler, reward_actor)]) == ["alive"] * 3
    learner.update.remote()
    workers = object.__new__(RayWorkers)
    workers.learners, workers.samplers, workers.reward_actors, workers.timeout = [learner], [sampler], [reward_actor], 1800.0
    monkeypatch.setattr(actors.topology, "SHUTDOWN_GRACE_S", 0.5)
    workers.shutdown()
    for actor in (learner, sampler, reward_actor):
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.ping.remote(), timeout=60)


def test_placement_packs_the_actors_onto_the_nodes_not_their_totals():
    from actors.topology import place_on_nodes

    two_fours = [(4.0, 0.0), (4.0, 0.0)]
    assert place_on_nodes([(3, 0), (3, 0), (2, 0)], two_fours) is False  # 8 <= 8 CPUs, yet a 3 and a 2 share no node
    assert place_on_nodes([(2, 0), (2, 0), (2, 0), (2, 0)], two_fours) is True
    assert place_on_nodes([(3, 0), (1, 0), (3, 0), (1, 0)], two_fours) is True  # first fit in this order would too
    assert place_on_nodes([(1, 1), (1, 1)], [(8.0, 1.0), (8.0, 0.0)]) is False  # one GPU node
    assert place_on_nodes([(0.5, 0.25)] * 8, [(4.0, 1.0), (2.0, 1.0)]) is True
    assert place_on_nodes([], []) is True
    many = [(1.0, 0.0)] * 40 + [(1.5, 0.0)]
    assert place_on_nodes(many, [(41.5, 0.0)] + [(0.4, 0.0)] * 60) is True  # decided at once, not by trying 61 nodes
    # a GPU node left again gives its GPU back: the learner moves to the smaller GPU node, the sampler to the larger
    assert place_on_nodes([(3, 1), (1, 1), (3, 0)], [(4.0, 1.0), (3.0, 1.0)]) is True
    # 13 learners of 3 CPUs and 9 of 1 on twelve 4-CPU nodes: refused at once (largest first, each room size tried
    # once), not undecided after PLACEMENT_SEARCH_LIMIT tries, which would leave Ray waiting without a word
    assert place_on_nodes([(3, 0)] * 13 + [(1, 0)] * 9, [(4.0, 0.0)] * 12) is False


def test_resource_check_names_actors_that_fit_the_totals_but_not_the_nodes(tiny_sd_dir, tmp_path, monkeypatch):
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 4.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.num_learners=2", "resources.cpus_per_learner=3",
                             "resources.num_samplers=1", "resources.cpus_per_sampler=2",
                             "resources.cpus_per_reward_actor=0")
    with pytest.raises(InsufficientResourcesError, match=r"the actors fit the cluster's totals but not its nodes "
                                                         r"together \(nodes: 4 CPU / 0 GPU, 4 CPU / 0 GPU\)"):
        check_resources(config)
    check_resources(replace(config, resources=replace(config.resources, cpus_per_sampler=1.0)))  # 3 + 1 on each


def test_resource_shortfall_names_a_role_no_node_holds_and_leaves_an_undecided_packing_to_ray(monkeypatch):
    import actors.topology
    from actors.topology import resource_shortfall

    config = load_config(None, ["resources.num_samplers=1", "resources.cpus_per_sampler=1",
                                "resources.cpus_per_reward_actor=1", "resources.cpus_per_learner=2"])
    assert resource_shortfall(config, [(4.0, 0.0)]) == []  # exactly the node's 4 CPUs
    gpu_learner = replace(config, resources=replace(config.resources, gpus_per_learner=2.0))
    assert resource_shortfall(gpu_learner, [(4.0, 1.0), (4.0, 1.0)]) == [
        "one learner needs 2 CPU / 2 GPU but no node has that much"]  # 2 GPUs in all, one on each node
    # a gradient learner samples and scores itself: the samplers' and reward actors' resources are not asked for
    gradient = replace(config, train=replace(config.train, algorithm="draft"),
                       resources=replace(config.resources, cpus_per_sampler=8.0, gpus_per_reward_actor=1.0))
    assert resource_shortfall(gradient, [(2.0, 0.0)]) == []
    # a search that has not decided within PLACEMENT_SEARCH_LIMIT tries leaves the run to Ray, not refused
    monkeypatch.setattr(actors.topology, "PLACEMENT_SEARCH_LIMIT", 2)
    assert resource_shortfall(config, [(4.0, 0.0), (4.0, 0.0)]) == []


def test_a_local_ray_counts_only_this_machines_cpus_and_gpus_and_a_resource_wait_waits_for_nodes(monkeypatch):
    """check_fits_this_machine counts this machine's CPUs and the GPUs a local Ray would find (a GPU run on a
    machine without one started Ray and made its run directory first); resources.resource_wait_s waits for an
    autoscaler's nodes before it refuses the run."""
    import actors.topology
    from actors.topology import check_fits_this_machine, local_gpu_count

    assert local_gpu_count() == torch.cuda.device_count()  # NVIDIA's count, as torch sees it: 0 here
    config = load_config(None, ["resources.num_samplers=1", "resources.gpus_per_learner=1"])
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setattr(actors.topology, "local_gpu_count", lambda: 1.0)
    check_fits_this_machine(config)
    with pytest.raises(InsufficientResourcesError, match="CPU: requested 3, the cluster has 2"):
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        check_fits_this_machine(config)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    monkeypatch.setattr(actors.topology, "local_gpu_count", lambda: 0.0)
    with pytest.raises(InsufficientResourcesError, match="GPU: requested 1, the cluster has 0"):
        check_fits_this_machine(config)
    monkeypatch.setattr(actors.topology, "local_gpu_count", lambda: 1.0)
    joined = iter([[], [], [(4.0, 1.0)]])  # the cluster's nodes as the autoscaler adds them
    monkeypatch.setattr(actors.topology, "alive_nodes", lambda: next(joined))
    monkeypatch.setattr(actors.topology.time, "sleep", lambda seconds: None)
    with pytest.raises(InsufficientResourcesError, match="CPU: requested 3, the cluster has 0"):
        check_resources(config)  # resource_wait_s=0: at once
    check_resources(replace(config, resources=replace(config.resources, resource_wait_s=600.0)))
    assert next(joined, None) is None


@pytest.mark.parametrize("chain", [["rl.models.ModelNotFoundError", "rewards.base.RewardFileError"],
                                   ["rewards.base.RewardFileError", "rl.models.ModelNotFoundError"]])
def test_the_user_error_an_actors_constructor_raised_is_rebuilt_from_the_last_one_in_rays_report(chain):
    """A user error raised while handling another (or a subclass of a USER_ERRORS type, as RewardFileError is a
    RewardError) is the one the user is told, in its own words."""
    from ray.exceptions import RayActorError

    import rewards.base
    import rl.models
    from actors.topology import constructor_user_error

    report = "".join(f"Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n{name}: failed {i}\n\n"
                     "During handling of the above exception, another exception occurred:\n\n"
                     for i, name in enumerate(chain)).rsplit("\n\nDuring", 1)[0]
    error = constructor_user_error(RayActorError(error_msg=report, actor_init_failed=True))
    last = {"rl.models.ModelNotFoundError": rl.models.ModelNotFoundError,
            "rewards.base.RewardFileError": rewards.base.RewardFileError}[chain[-1]]
    assert type(error) is last and str(error) == "failed 1"
    assert constructor_user_error(RayActorError(error_msg=report)) is None  # died after its constructor: not a user error
    assert constructor_user_error(RayActorError(error_msg="Traceback ...\nValueError: bug", actor_init_failed=True)) is None


def test_the_layout_line_counts_the_nodes_and_names_each_actor_on_its_node():
    from actors.topology import describe_layout

    layout = {"sampler": ["aaaaaaaa1111", "bbbbbbbb2222"], "reward actor": ["aaaaaaaa1111"], "learner": ["aaaaaaaa1111"]}
    assert describe_layout(layout) == ("actors on 2 nodes: node aaaaaaaa: sampler 0, reward actor 0, learner 0; "
                                       "node bbbbbbbb: sampler 1")
    assert describe_layout({"learner": ["cccccccc3333"]}) == "actors on 1 node: node cccccccc: learner 0"


class _NanForBlue:
    name = "nan_for_blue"
    differentiable = False

    def __call__(self, images, prompts):
        return torch.tensor([float("nan") if "blue" in p else 0.5 + 0.01 * i for i, p in enumerate(prompts)])


@pytest.fixture(scope="module")
def nan_reward():
    if "nan_for_blue" not in {e.name for e in rewards.list_entries()}:
        rewards.register(rewards.RewardEntry("nan_for_blue", lambda **_: _NanForBlue(), False, (), "test"))
    return "nan_for_blue"


def test_random_prompt_order_is_the_published_draw():
    prompts = [f"prompt {i}" for i in range(7)]
    chosen, seeds = epoch_prompts(prompts, seed=5, epoch=3, num_samples=12, group_size=4)
    rng = np.random.default_rng([5, 3])
    drawn = rng.choice(7, size=3, replace=True)
    assert chosen == [prompts[i] for i in drawn for _ in range(4)]
    assert seeds == rng.integers(0, 2**31 - 1, size=12).tolist()


def test_cycle_prompt_order_trains_every_prompt_equally_often_with_the_same_noise():
    prompts = [f"prompt {i}" for i in range(60)]
    drawn = []
    for epoch in range(20):  # 32 prompts an epoch: passes over the 60 end inside epochs
        chosen, seeds = epoch_prompts(prompts, seed=3, epoch=epoch, num_samples=256, group_size=8, order="cycle")
        assert chosen[::8] == chosen[7::8]  # each prompt still k times in a row
        drawn += chosen[::8]
        assert seeds == epoch_prompts(prompts, seed=3, epoch=epoch, num_samples=256, group_size=8)[1]
    for start in range(0, 600, 60):  # each full pass holds every prompt once
        assert sorted(drawn[start:start + 60]) == sorted(prompts)
    counts = [drawn.count(p) for p in prompts]
    assert max(counts) - min(counts) == 1  # 640 draws: 10 or 11 each (with replacement: 3 to 20 in the demo's seeds 0-4)
    other_seed = [p for e in range(2)
                  for p in epoch_prompts(prompts, seed=4, epoch=e, num_samples=256, group_size=8, order="cycle")[0][::8]]
    assert other_seed != drawn[:64]
    with pytest.raises(ValueError, match="order"):
        epoch_prompts(prompts, seed=3, epoch=0, num_samples=8, order="shuffled")


def test_each_pass_of_the_cycle_order_is_shuffled_anew_and_any_slice_is_the_same_sequences():
    """A pass is a permutation of its own: one order repeated every pass would batch the same prompts together every
    pass. A slice that starts mid-pass is the same stretch of the one sequence."""
    sequence = cycled_indices(10, seed=3, start=0, count=30)
    assert sorted(sequence[:10]) == sorted(sequence[10:20]) == sorted(sequence[20:]) == list(range(10))
    assert sequence[:10] != sequence[10:20] and sequence[10:20] != sequence[20:]
    assert cycled_indices(10, seed=3, start=7, count=15) == sequence[7:22]


def test_the_run_draws_prompts_in_the_configured_order(tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "prompts.order=cycle", "advantage.mode=batch")
    batches = _Batches(config, BUILTIN["colors"], first_weights=None)
    chosen, _ = batches.prompts_and_seeds(1)
    n = config.samples_per_epoch
    assert chosen == epoch_prompts(BUILTIN["colors"], seed=config.seed, epoch=1, num_samples=n, order="cycle")[0]
    assert chosen != epoch_prompts(BUILTIN["colors"], seed=config.seed, epoch=1, num_samples=n)[0]


def test_shared_start_noise_gives_each_prompt_group_its_first_samples_x_T_on_ray_and_inline(
    ray_session, tiny_sd_dir, tmp_path, monkeypatch
):
    """sample.shared_start_noise: the run's rollouts pass the groups' start seeds, and they reach the samplers
    (on Ray too, where the groups of 4 are split over shards of 2)."""
    config_overrides = ("advantage.mode=group", "advantage.group_size=4", "sample.shared_start_noise=true",
                        "sample.batch_size=2", "sample.num_batches_per_epoch=4", "sample.num_steps=2", "train.batch_size=8")
    config = _trainer_config(tiny_sd_dir, tmp_path, *config_overrides, "resources.num_samplers=2")
    batches = _Batches(config, BUILTIN["colors"], first_weights=None)
    prompts, seeds = batches.prompts_and_seeds(0)
    start_seeds = batches.start_seeds(seeds)
    assert start_seeds == [seeds[0]] * 4 + [seeds[4]] * 4 and len(set(seeds)) == 8
    assert _Batches(load_config(None, ["advantage.mode=group"]), prompts, None).start_seeds(seeds) is None
    inline = InlineWorkers(config)
    weights = inline.get_weights()
    latents = inline.rollout(weights, prompts, seeds, start_seeds=start_seeds).trajectories().fetch().latents
    for group in (latents[:4], latents[4:]):
        assert all(torch.equal(x_T, group[0, 0]) for x_T in group[:, 0])
        assert not torch.allclose(group[1, -1], group[2, -1], atol=1e-3)
    assert not torch.equal(latents[0, 0], latents[4, 0])
    ray_workers = RayWorkers(config)
    try:
        on_ray = ray_workers.rollout(weights, prompts, seeds, start_seeds=start_seeds).trajectories().fetch().latents
    finally:
        ray_workers.shutdown()
    torch.testing.assert_close(on_ray, latents, rtol=1e-4, atol=1e-5)
    passed = []
    sample = actors.sampler.sample_trajectories
    monkeypatch.setattr(actors.sampler, "sample_trajectories",
                        lambda *args, **kwargs: passed.extend(kwargs["start_seeds"]) or sample(*args, **kwargs))
    train(_trainer_config(tiny_sd_dir, tmp_path, *config_overrides, "resources.mode=inline", "num_epochs=1"))
    assert passed == start_seeds


def test_a_sample_whose_image_is_not_finite_gets_no_reward_instead_of_a_black_pictures(
        tiny_sd_dir, tmp_path, caplog, second_image_nan):
    """uint8 rounding makes a NaN image black, which `jpeg_compressibility` scores best of all: the sampler says
    which images were finite, their rewards are NaN, and reward.on_non_finite drops them."""
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=1", "sample.num_steps=2",
                             "reward.spec=jpeg_compressibility", "run_name=nan_image")
    workers = InlineWorkers(config)
    with caplog.at_level("WARNING", logger="texforce"):
        scores = workers.rollout(workers.get_weights(), ["a red ball", "a blue cup", "a red ball", "a cat"], [0, 1, 2, 3]).scores
    assert "samples [1] of this shard (prompts ['a blue cup']) decoded to non-finite images" in caplog.text
    assert torch.isnan(scores.scores[1]) and torch.isnan(scores.parts["jpeg_compressibility"][1])
    assert torch.isfinite(scores.scores[[0, 2, 3]]).all()
    with caplog.at_level("WARNING", logger="texforce"):
        run = train(config)
    assert run.read_metrics()[0]["num_dropped"] == 2  # row 1 of each of the epoch's two shards
    assert "decoded to non-finite images" in caplog.text


def test_non_finite_rewards_are_dropped_with_a_warning(tiny_sd_dir, tmp_path, nan_reward, caplog, monkeypatch):
    monkeypatch.setattr("rl.prompts.BUILTIN", {**BUILTIN, "colors": ["a red ball", "a blue ball"]})
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=1",
                             f"reward.spec={nan_reward}", "run_name=drop")
    with caplog.at_level("WARNING", logger="texforce"):
        run = train(config)
    row = run.read_metrics()[0]
    assert row["num_dropped"] > 0 and row["num_samples"] == 8 - row["num_dropped"]
    assert math.isfinite(row["reward_mean"]) and math.isfinite(row["loss"])
    # the indices are positions in the whole epoch (2 shards of 4), not in a shard
    prompts, _ = epoch_prompts(["a red ball", "a blue ball"], seed=config.seed, epoch=0, num_samples=8)
    blue = [i for i, p in enumerate(prompts) if "blue" in p]
    assert max(blue) >= 4
    assert f"nan_for_blue at samples {blue}" in caplog.text


def test_plot_every_writes_the_grid_of_every_nth_and_the_last_epoch_and_metrics_for_all(tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=3", "plot_every=2",
                             "run_name=plots")
    run = train(config)
    assert sorted(p.name for p in run.grids.iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1, 2] and run.reward_curve.exists()


def test_plot_every_auto_draws_the_first_and_the_last_epoch_and_between_them_within_its_share(tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=3", "run_name=auto")
    assert config.plot_every == "auto"  # the default
    run = train(config)
    rows = run.read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2] and run.reward_curve.exists()
    grids = sorted(p.name for p in run.grids.iterdir())
    assert grids[0] == "epoch_0000.png" and grids[-1] == "epoch_0002.png"
    if rows[0]["wall_seconds"] + rows[1]["wall_seconds"] < 5:  # a second drawing (>= 0.05 s) would exceed 1% of that
        assert grids == ["epoch_0000.png", "epoch_0002.png"]


def test_an_epoch_whose_grid_is_skipped_fetches_no_images(tiny_sd_dir, tmp_path, monkeypatch):
    from actors import driver

    fetch, fetched = driver._grid_images, []

    def grid_images(rollout, rows, what):
        fetched.append(what)
        return fetch(rollout, rows, what)

    monkeypatch.setattr(driver, "_grid_images", grid_images)
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=3", "plot_every=2",
                             "run_name=skip-grid")
    run = train(config)
    assert fetched == ["epoch 1's grid", "epoch 2's grid"]  # every 2nd and the last
    assert sorted(p.name for p in run.grids.iterdir()) == ["epoch_0001.png", "epoch_0002.png"]


@pytest.mark.parametrize("mode", ["stop", "drop"])
def test_non_finite_rewards_stop_after_a_checkpoint(tiny_sd_dir, tmp_path, nan_reward, monkeypatch, mode):
    """Epoch 1's every reward NaN: `stop` stops there, and so does `drop` (no finite sample left to train on), with
    epoch 0's work checkpointed (save_every=5 would skip it) and a grid of the non-finite samples."""
    drawn = []
    draw_epoch_prompts(monkeypatch,
                       lambda epoch, n: drawn.append(epoch) or [f"a {'red' if epoch == 0 else 'blue'} ball"] * n)
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=3", "save_every=5",
                             "sample.num_steps=4", f"reward.spec={nan_reward}", f"reward.on_non_finite={mode}",
                             "run_name=stop")
    with pytest.raises(NonFiniteRewardError, match=r"8 of 8 samples .*no finite sample left"):
        train(config)
    run = RunDirectory(tmp_path / "stop")
    assert drawn[-1] == 1
    assert (run.checkpoints / "epoch_0000" / "learner.pt").exists()  # epoch 0's work is kept
    assert [p.name for p in run.checkpoints.iterdir()] == ["epoch_0000"]
    assert [r["epoch"] for r in run.read_metrics()] == [0]
    assert (run.grids / "epoch_0001_non_finite.png").exists()


def test_non_finite_held_out_scores_are_left_out_of_the_mean_and_counted(tiny_sd_dir, tmp_path, nan_reward, monkeypatch):
    """A held-out image whose score is NaN: the evaluation's mean is over the finite ones, num_dropped counts it, and
    the grid shows each prompt's first image (evaluation.num_seeds=2: 3 of the 6)."""
    import actors.driver

    grids = {}
    save = actors.driver.save_image_grid

    def record(images, captions, path, **kwargs):
        grids[Path(path).name] = captions
        return save(images, captions, path, **kwargs)

    monkeypatch.setattr(actors.driver, "save_image_grid", record)
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a blue cup\na red ball\na green hat\n")
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=1", "sample.num_steps=4",
                             f"evaluation.prompts_file={held_out}", "evaluation.num_seeds=2",
                             f"evaluation.reward={nan_reward}", "run_name=nan_held_out")
    run = train(config)
    # nan_for_blue scores by position in a shard of 4: the red ball's images 0.52 and 0.53, the green hat's 0.5, 0.51
    for row in run.read_evaluations():
        assert row["num_samples"] == 6 and row["num_dropped"] == 2
        assert row["reward_mean"] == pytest.approx(0.515) and math.isnan(row["rewards"][0])
    assert run.read_evaluations()[1]["reward_gain"] == pytest.approx(0.0)
    assert grids["eval_before_training.png"] == ["a blue cup | r=nan", "a red ball | r=0.5200", "a green hat | r=0.5000"]


def _disk_full(path) -> OSError:
    import errno

    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_a_full_disk_while_checkpointing_stops_with_how_to_resume_and_the_resume_finishes(
        tiny_sd_dir, tmp_path, monkeypatch):
    import rl.run_dir

    save_lora = rl.run_dir.save_lora

    def fills_the_disk_at_epoch_1(weights, settings, directory):
        save_lora(weights, settings, directory)
        if "epoch_0001" in str(directory):
            raise _disk_full(directory / "pytorch_lora_weights.safetensors")

    monkeypatch.setattr(rl.run_dir, "save_lora", fills_the_disk_at_epoch_1)
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=full", "resources.mode=inline", "num_epochs=3",
                             "sample.num_steps=4")
    run_dir = tmp_path / "full"
    with pytest.raises(TrainingStopped, match=(
            r"^No space left on device: .*\.tmp_epoch_0001/lora/pytorch_lora_weights\.safetensors; free space there, "
            rf"then continue with `texforce train --resume {run_dir}` \(the last checkpoint, epoch_0000, is kept\)$")):
        train(config)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["epoch_0000"]  # the half-written one removed
    monkeypatch.setattr(rl.run_dir, "save_lora", save_lora)
    run = train(load_config(run_dir / "config.yaml"), resume=run_dir)
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1, 2]
    assert (run.final_lora / "pytorch_lora_weights.safetensors").exists()


def test_a_full_disk_writing_an_epochs_row_stops_before_its_checkpoint_and_the_resume_writes_every_row(
        tiny_sd_dir, tmp_path, monkeypatch):
    append_metrics = RunDirectory.append_metrics

    def fills_the_disk_at_epoch_1(self, row):
        if row["epoch"] == 1:
            raise _disk_full(self.metrics_path)
        return append_metrics(self, row)

    monkeypatch.setattr(RunDirectory, "append_metrics", fills_the_disk_at_epoch_1)
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=full", "resources.mode=inline", "num_epochs=3",
                             "sample.num_steps=4")
    with pytest.raises(TrainingStopped, match=r"^No space left on device: .*metrics\.parquet; free space there, then "
                                              r"continue with `texforce train --resume .*` \(the last checkpoint, "
                                              r"epoch_0000, is kept\)$"):
        train(config)
    run_dir = tmp_path / "full"
    assert [r["epoch"] for r in RunDirectory(run_dir).read_metrics()] == [0]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["epoch_0000"]  # no checkpoint without its row
    monkeypatch.setattr(RunDirectory, "append_metrics", append_metrics)
    assert [r["epoch"] for r in train(load_config(run_dir / "config.yaml"), resume=run_dir).read_metrics()] == [0, 1, 2]


def test_a_full_disk_under_the_background_writer_stops_the_run_the_same_way(tiny_sd_dir, tmp_path, monkeypatch):
    import rl.outputs

    save_image_grid = rl.outputs.save_image_grid

    def fills_the_disk_at_epoch_1(images, captions, path, **kwargs):
        if "epoch_0001" in str(path):
            raise _disk_full(path)
        return save_image_grid(images, captions, path, **kwargs)

    monkeypatch.setattr(rl.outputs, "save_image_grid", fills_the_disk_at_epoch_1)
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=full", "resources.mode=inline", "num_epochs=3",
                             "sample.num_steps=4", "plot_every=1")
    with pytest.raises(TrainingStopped, match=r"^No space left on device: .*grids/epoch_0001\.png; free space there, "
                                              r"then continue with `texforce train --resume .*` \(the last "
                                              r"checkpoint, epoch_000[12], is kept\)$"):
        train(config)
    run = RunDirectory(tmp_path / "full")
    # raised at a later epoch's write: every checkpoint kept has its metrics row
    assert {r["epoch"] for r in run.read_metrics()} >= {int(p.name[-4:]) for p in run.checkpoints.iterdir()}
    monkeypatch.setattr(rl.outputs, "save_image_grid", save_image_grid)
    resumed = train(load_config(run.path / "config.yaml"), resume=run.path)
    assert [r["epoch"] for r in resumed.read_metrics()] == [0, 1, 2]


def test_keep_checkpoints_deletes_all_but_the_newest_and_a_resume_goes_on_from_them(tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=kept", "resources.mode=inline", "num_epochs=3",
                             "sample.num_steps=4", "keep_checkpoints=2")
    run = train(config)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch_0001", "epoch_0002"]
    more = load_config(run.config_path, ["num_epochs=4"])
    train(more, resume=run.path)
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["epoch_0002", "epoch_0003"]
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1, 2, 3]
