"""The trainer end to end: Ray actors, data-parallel learners, faults, resume, bad input."""
import math
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import rewards
from actors.driver import NonFiniteRewardError, train
from actors.sampler import SamplerWorker
from actors.topology import InsufficientResourcesError, RayWorkers
from conftest import tiny_config
from rl.learner import PPOLearner
from rl.models import load_pipeline
from rl.prompts import BUILTIN


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


def test_end_to_end_ray_run(ray_session, tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=e2e", "num_epochs=2", "resources.num_samplers=2")
    run = train(config)
    rows = pq.read_table(run.metrics_path).to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["num_samples"] == 8 and r["num_dropped"] == 0 for r in rows)
    # samplers and learner are different processes; the learner agrees with them before updating
    assert all(r["logprob_mismatch"] < 1e-5 for r in rows)
    assert [r["policy_version"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["reward_mean"]) and math.isfinite(r["approx_kl"]) for r in rows)
    for path in [run.config_path, run.reward_curve, run.grids / "epoch_0001.png",
                 run.final_lora / "pytorch_lora_weights.safetensors",
                 run.checkpoints / "epoch_0001" / "learner.pt",
                 run.checkpoints / "epoch_0001" / "lora" / "pytorch_lora_weights.safetensors"]:
        assert path.exists(), path
    assert any(run.tensorboard.iterdir())
    # the exported LoRA loads into a fresh pipeline with diffusers
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    pipe.load_lora_weights(str(run.final_lora))


def test_two_learners_match_one_learner_on_the_union_batch(ray_session, tiny_sd_dir, tmp_path):
    two = _trainer_config(tiny_sd_dir, tmp_path, "resources.num_learners=2", "resources.num_samplers=1",
                          "train.batch_size=2", "sample.num_batches_per_epoch=2")
    one = _trainer_config(tiny_sd_dir, tmp_path, "train.batch_size=4", "sample.num_batches_per_epoch=2")
    sampler = SamplerWorker(one)
    learner = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), one)
    prompts = BUILTIN["colors"][:8]
    initial = learner.get_weights()
    batch, _ = sampler.sample(initial, prompts, list(range(8)))
    advantages = torch.linspace(-1.5, 1.5, 8)
    learner.update(batch, advantages)

    workers = RayWorkers(two)
    try:
        metrics = workers.update(batch, advantages)
        distributed = workers.get_weights()
    finally:
        workers.shutdown()
    assert metrics["policy_version"] == 1
    single = learner.get_weights()
    assert max((v - initial.text_encoder[k]).abs().max() for k, v in single.text_encoder.items()) > 5e-4
    # Adam moves each weight by ~lr = 1e-3; unsynchronised gradients would differ at that scale.
    # Near-zero gradients make Adam's g/sqrt(v) float-sensitive, hence 5% of a step.
    for key, value in single.text_encoder.items():
        torch.testing.assert_close(distributed.text_encoder[key], value, rtol=1e-4, atol=5e-5)


def test_killed_sampler_and_reward_actor_are_recovered(ray_session, tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.num_samplers=2", "sample.num_steps=8",
                             "sample.batch_size=2", "sample.num_batches_per_epoch=12")
    workers = RayWorkers(config)
    try:
        weights = workers.get_weights()
        prompts, seeds = BUILTIN["colors"][:24], list(range(24))
        reference, reference_scores = workers.rollout(weights, prompts, seeds)

        def kill_soon():
            time.sleep(0.6)
            ray_session.kill(workers.samplers[0], no_restart=False)
            ray_session.kill(workers.reward_actors[0], no_restart=False)

        killer = threading.Thread(target=kill_soon)
        killer.start()
        trajectories, scores = workers.rollout(weights, prompts, seeds)
        killer.join()
        assert workers.restarts >= 1
    finally:
        workers.shutdown()
    assert len(trajectories) == 24 and trajectories.prompts == prompts
    # re-issued shards are sampled from the same seeds: nothing differs from the clean epoch
    torch.testing.assert_close(scores.scores, reference_scores.scores)
    torch.testing.assert_close(trajectories.latents, reference.latents)


def test_resume_reaches_the_same_lora(tiny_sd_dir, tmp_path):
    overrides = ("resources.mode=inline", "num_epochs=3", "advantage.mode=per_prompt", "advantage.min_count=2")
    straight = train(_trainer_config(tiny_sd_dir, tmp_path, "run_name=straight", *overrides))

    class Interrupt(Exception):
        pass

    def interrupt_after_epoch_1(epoch, row):
        if epoch == 1:
            raise Interrupt

    config = _trainer_config(tiny_sd_dir, tmp_path, "run_name=resumed", *overrides)
    with pytest.raises(Interrupt):
        train(config, on_epoch_end=interrupt_after_epoch_1)
    resumed_dir = tmp_path / "resumed"
    assert not (resumed_dir / "final_lora").exists()
    resumed = train(config, resume=resumed_dir)
    assert [r["epoch"] for r in resumed.read_metrics()] == [0, 1, 2]
    a = load_file(str(straight.final_lora / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed.final_lora / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        [r["reward_mean"] for r in resumed.read_metrics()], [r["reward_mean"] for r in straight.read_metrics()],
        rtol=1e-5,
    )


def test_resource_check_fails_fast_with_the_shortfall(ray_session, tiny_sd_dir, tmp_path):
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.gpus_per_sampler=1")
    start = time.monotonic()
    with pytest.raises(InsufficientResourcesError, match=r"GPU: requested 2, the cluster has 0.*resources\."):
        RayWorkers(config)
    assert time.monotonic() - start < 10


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


def test_non_finite_rewards_are_dropped_with_a_warning(tiny_sd_dir, tmp_path, nan_reward, caplog, monkeypatch):
    monkeypatch.setattr("rl.prompts.BUILTIN", {**BUILTIN, "colors": ["a red ball", "a blue ball"]})
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=1",
                             f"reward.spec={nan_reward}", "run_name=drop")
    with caplog.at_level("WARNING", logger="texforce"):
        run = train(config)
    row = run.read_metrics()[0]
    assert row["num_dropped"] > 0 and row["num_samples"] == 8 - row["num_dropped"]
    assert math.isfinite(row["reward_mean"]) and math.isfinite(row["loss"])
    assert "non-finite" in caplog.text and "nan_for_blue at samples" in caplog.text


def test_non_finite_rewards_stop_after_a_checkpoint(tiny_sd_dir, tmp_path, nan_reward, monkeypatch):
    state = {"epoch": 0}

    def prompts_per_epoch(prompts, *, seed, epoch, num_samples, group_size=1):
        state["epoch"] = epoch
        word = "red" if epoch == 0 else "blue"
        return [f"a {word} ball"] * num_samples, list(range(num_samples))

    monkeypatch.setattr("actors.driver.epoch_prompts", prompts_per_epoch)
    config = _trainer_config(tiny_sd_dir, tmp_path, "resources.mode=inline", "num_epochs=3", "save_every=5",
                             f"reward.spec={nan_reward}", "reward.on_non_finite=stop", "run_name=stop")
    with pytest.raises(NonFiniteRewardError, match="non-finite"):
        train(config)
    run_dir = tmp_path / "stop"
    assert state["epoch"] == 1
    assert (run_dir / "checkpoints" / "epoch_0000" / "learner.pt").exists()  # epoch 0's work is kept
    assert (run_dir / "grids" / "epoch_0001_non_finite.png").exists()
