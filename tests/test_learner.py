"""The PPO learner: once-per-minibatch encoder backward, and learning on a fixed batch."""
import dataclasses

import pytest
import torch
from conftest import tiny_config

from rl.config import ConfigError
from rl.ddim import ddim_sigma
from rl.learner import PPOLearner
from rl.models import load_pipeline
from rl.ppo import clipped_surrogate_loss, gaussian_kl
from rl.sampling import encode, sample_trajectories, step_distribution


def _perturb(params, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _reference_gradients(learner, batch, advantages, step_index):
    """Naive TexForce/TRL style: re-encode the prompts at every trained timestep."""
    K = step_index.shape[1]
    rows = torch.arange(len(batch))
    for k in range(K):
        j = step_index[:, k]
        cond = encode(learner.pipe.text_encoder, batch.prompt_ids)
        uncond = encode(learner.pipe.text_encoder, batch.negative_ids)
        log_prob = step_distribution(
            learner.pipe.unet, learner.schedule, batch.latents[rows, j], batch.timesteps[rows, j],
            batch.latents[rows, j + 1], cond, uncond, guidance_scale=learner.sample.guidance_scale, eta=learner.sample.eta,
        )[0]
        loss, _ = clipped_surrogate_loss(log_prob, batch.log_probs[rows, j], advantages, learner.train.clip_range)
        (loss / K).backward()
    return [p.grad.clone() for p in learner.params]


@pytest.mark.parametrize("policy", ["text_encoder", "both"])
def test_once_per_minibatch_encoder_backward_equals_reencoding(pipe, tiny_sd_dir, policy):
    cfg = tiny_config(tiny_sd_dir, f"lora.policy={policy}", "train.clip_range=0.2")
    learner = PPOLearner(pipe, cfg)
    _perturb(learner.params)
    batch = sample_trajectories(pipe, ["a red ball", "a cat"], [0, 1], num_steps=6, guidance_scale=5.0, eta=1.0)
    _perturb(learner.params, seed=1, scale=0.02)  # off-policy, so ratios differ from 1 and some clip
    advantages = torch.tensor([1.0, -0.5])
    step_index = torch.tensor([[0, 3, 5], [2, 1, 4]])
    learner.minibatch_backward(batch, advantages, step_index)
    fast = [p.grad.clone() for p in learner.params]
    learner.optimizer.zero_grad(set_to_none=True)
    slow = _reference_gradients(learner, batch, advantages, step_index)
    assert sum(g.abs().sum() for g in fast) > 0
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_ppo_steps_raise_the_surrogate_objective(pipe, tiny_sd_dir):
    cfg = tiny_config(tiny_sd_dir, "train.clip_range=10.0", "train.learning_rate=1e-2", "train.warmup_steps=0",
                      "train.lr_schedule=constant", "train.timestep_fraction=1.0", "train.batch_size=4")
    learner = PPOLearner(pipe, cfg)
    _perturb(learner.params)
    batch = sample_trajectories(pipe, ["a red ball"] * 2 + ["a cat"] * 2, [0, 1, 2, 3], num_steps=6,
                                guidance_scale=5.0, eta=1.0)
    advantages = torch.ones(4)
    step_index = torch.arange(6).repeat(4, 1)

    losses = []
    for _ in range(4):
        metrics = learner.minibatch_backward(batch, advantages, step_index)
        losses.append(metrics["loss"])
        learner.optimizer_step()
    final = learner.minibatch_backward(batch, advantages, step_index)["loss"]
    learner.optimizer.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(-1.0, abs=1e-4)  # on-policy: ratio 1, loss = -mean(A)
    # the surrogate objective (-loss) rises at every step; the per-dimension mean log-prob
    # keeps each ratio change small, as in DDPO
    assert all(b < a - 1e-5 for a, b in zip(losses, losses[1:] + [final]))
    assert final < losses[0] - 5e-4


def test_update_runs_inner_epochs_and_bumps_version(pipe, tiny_sd_dir):
    cfg = tiny_config(tiny_sd_dir, "train.num_inner_epochs=2", "train.gradient_accumulation_steps=2",
                      "train.batch_size=1")
    learner = PPOLearner(pipe, cfg)
    before = learner.get_weights()
    batch = sample_trajectories(pipe, ["a", "b", "c", "d"], [0, 1, 2, 3], num_steps=6, guidance_scale=5.0, eta=1.0)
    advantages = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    metrics = learner.update(batch, advantages)
    assert metrics["logprob_mismatch"] < 1e-5  # on-policy before the first step
    assert metrics["policy_version"] == 1 and learner.get_weights().version == 1
    assert learner.optimizer.state_dict()["state"][0]["step"].item() == 4  # 2 epochs x 4 mb / accumulate 2
    after = learner.get_weights()
    changed = [not torch.equal(before.text_encoder[k], after.text_encoder[k]) for k in before.text_encoder]
    assert any(changed)


def test_min_sigma_never_trains_the_near_deterministic_last_steps(pipe, tiny_sd_dir):
    cfg = tiny_config(tiny_sd_dir, "train.min_sigma=0.05", "train.timestep_fraction=1.0", "train.batch_size=4",
                      "train.learning_rate=1e-2", "train.warmup_steps=0")
    learner = PPOLearner(pipe, cfg)
    sigma = ddim_sigma(learner.schedule, learner.schedule.timesteps, eta=1.0)
    # the step onto t=1 and the last step are near-deterministic in SD's schedule
    assert sigma[-2:].max() < 0.05 <= sigma[:-2].min()
    assert learner.trainable_steps.tolist() == [0, 1, 2, 3]
    batch = sample_trajectories(pipe, ["a red ball", "a cat"] * 2, [0, 1, 2, 3], num_steps=6, guidance_scale=5.0, eta=1.0)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    # steps 4 and 5 read latents 4..6 and log-probs 4..5; spoil what only they read
    spoiled = dataclasses.replace(batch, latents=batch.latents.clone(), log_probs=batch.log_probs.clone())
    spoiled.latents[:, 5:] = float("nan")
    spoiled.log_probs[:, 4:] = float("nan")
    start = learner.state_dict()
    learner.update(spoiled, advantages)
    from_spoiled = learner.get_weights().text_encoder
    learner.load_state_dict(start)
    learner.update(batch, advantages)
    from_clean = learner.get_weights().text_encoder
    assert any(not torch.equal(v, start["lora"]["text_encoder"][k]) for k, v in from_clean.items())
    for k, v in from_clean.items():
        assert torch.equal(from_spoiled[k], v)
    # with the default every step is trained, so the spoiled steps reach the weights
    every_step = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), tiny_config(tiny_sd_dir, "train.timestep_fraction=1.0", "train.batch_size=4"))
    assert every_step.trainable_steps.tolist() == list(range(6))
    every_step.update(spoiled, advantages)
    assert not all(torch.isfinite(v).all() for v in every_step.get_weights().text_encoder.values())


def test_min_sigma_that_leaves_no_step_is_a_config_error(pipe, tiny_sd_dir):
    with pytest.raises(ConfigError, match=r"train.min_sigma=5.0 leaves no step to train.*largest sigma_t"):
        PPOLearner(pipe, tiny_config(tiny_sd_dir, "train.min_sigma=5.0"))


def _mean_kl_to(ref_pipe, learner, batch, step_index):
    """The KL of each trained step to `ref_pipe`'s, from two independent pipelines."""
    rows, kls = torch.arange(len(batch)), []
    with torch.no_grad():
        for k in range(step_index.shape[1]):
            j = step_index[:, k]
            args = (learner.schedule, batch.latents[rows, j], batch.timesteps[rows, j], batch.latents[rows, j + 1])
            means = [
                step_distribution(p.unet, *args, encode(p.text_encoder, batch.prompt_ids),
                                  encode(p.text_encoder, batch.negative_ids), guidance_scale=5.0, eta=1.0)[1:]
                for p in (learner.pipe, ref_pipe)
            ]
            kls.append(gaussian_kl(means[0][0], means[1][0], means[0][1]).mean())
    return torch.stack(kls).mean().item()


def test_kl_penalty_is_zero_at_the_base_model_and_pulls_the_policy_back(pipe, tiny_sd_dir):
    cfg = tiny_config(tiny_sd_dir, "train.kl_coef=1.0", "train.timestep_fraction=1.0", "train.batch_size=4",
                      "train.learning_rate=1e-2", "train.warmup_steps=0", "train.lr_schedule=constant")
    learner = PPOLearner(pipe, cfg)
    batch = sample_trajectories(pipe, ["a red ball", "a cat"] * 2, [0, 1, 2, 3], num_steps=6, guidance_scale=5.0, eta=1.0)
    step_index = torch.arange(6).repeat(4, 1)
    no_advantage = torch.zeros(4)
    assert learner.minibatch_backward(batch, no_advantage, step_index)["kl_to_base"] == 0.0  # LoRA B = 0
    learner.optimizer.zero_grad(set_to_none=True)
    _perturb(learner.params)
    base = load_pipeline(tiny_sd_dir, device="cpu")
    expected = _mean_kl_to(base, learner, batch, step_index)
    kls = []
    for _ in range(4):  # with zero advantages only the KL term moves the weights
        kls.append(learner.minibatch_backward(batch, no_advantage, step_index)["kl_to_base"])
        learner.optimizer_step()
    assert kls[0] == pytest.approx(expected, rel=1e-4) and expected > 0
    assert kls[1] < kls[0] and max(kls[1:]) < 0.5 * kls[0], kls
    assert _mean_kl_to(base, learner, batch, step_index) < 0.5 * expected


def test_state_dict_round_trip(pipe, tiny_sd_dir):
    cfg = tiny_config(tiny_sd_dir)
    learner = PPOLearner(pipe, cfg)
    batch = sample_trajectories(pipe, ["a", "b"], [0, 1], num_steps=6, guidance_scale=5.0, eta=1.0)
    learner.update(batch, torch.tensor([1.0, -1.0]))
    state = learner.state_dict()
    other = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), cfg)
    other.load_state_dict(state)
    assert other.version == learner.version
    for k, v in learner.get_weights().text_encoder.items():
        torch.testing.assert_close(other.get_weights().text_encoder[k], v)
    assert torch.equal(other.generator.get_state(), learner.generator.get_state())


def test_max_step_gain_drops_the_step_onto_t1_and_keeps_the_last(pipe, tiny_sd_dir):
    learner = PPOLearner(pipe, tiny_config(tiny_sd_dir, "sample.num_steps=10", "train.max_step_gain=2.0"))
    # SD's leading spacing with steps_offset=1: 901, 801, ..., 101, 1; the step 101 -> 1 has gain 8.3
    assert learner.schedule.timesteps[-2:].tolist() == [101, 1]
    assert learner.trainable_steps.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    # off by default; min_sigma still applies beside it
    assert PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"),
                      tiny_config(tiny_sd_dir, "sample.num_steps=10")).trainable_steps.tolist() == list(range(10))
    both = tiny_config(tiny_sd_dir, "sample.num_steps=10", "train.max_step_gain=2.0", "train.min_sigma=0.05")
    assert PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), both).trainable_steps.tolist() == list(range(8))


def test_max_step_gain_that_leaves_no_step_is_a_config_error(pipe, tiny_sd_dir):
    with pytest.raises(ConfigError, match=r"train.max_step_gain=0.5 leaves no step to train.*smallest gain .* is 0.965; raise train.max_step_gain"):
        PPOLearner(pipe, tiny_config(tiny_sd_dir, "sample.num_steps=10", "train.max_step_gain=0.5"))
