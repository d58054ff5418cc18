"""The PPO learner: once-per-minibatch encoder backward, learning on a fixed batch, row-weighted steps."""
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import perturb_lora, tiny_config

from actors.sampler import SamplerWorker

from rl.config import ConfigError, TrainConfig
from rl.ddim import ddim_sigma
from rl.learner import PPOLearner, UpdateHistory, accumulation_plan, combine_rank_metrics, warmup_cosine, warmup_length
from rl.models import load_pipeline
from rl.ppo import clipped_surrogate_loss, gaussian_kl
from rl.sampling import Trajectories, encode, sample_trajectories, step_distribution


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
    perturb_lora(learner.params)
    batch = sample_trajectories(pipe, ["a red ball", "a cat"], [0, 1], num_steps=6, guidance_scale=5.0, eta=1.0)
    perturb_lora(learner.params, seed=1, scale=0.02)  # off-policy, so ratios differ from 1 and some clip
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
    perturb_lora(learner.params)
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


def test_a_batch_one_version_stale_is_checked_under_the_lora_that_sampled_it(pipe, tiny_sd_dir):
    """train.async_staleness=1: epoch e+1 is sampled by version e while the learner trains on
    epoch e. The learner keeps version e's LoRA, recomputes the stale batch's log-probs under it
    (they must agree with the sampler's), and trains from its own current LoRA, unchanged by the check."""
    cfg = tiny_config(tiny_sd_dir, "train.batch_size=2", "train.clip_range=0.2", "train.learning_rate=1e-2",
                      "train.warmup_steps=0")
    learner = PPOLearner(pipe, cfg)
    prompts, seeds = ["a red ball", "a cat"], [0, 1]
    v0 = learner.get_weights()
    fresh = sample_trajectories(pipe, prompts, seeds, num_steps=6, guidance_scale=5.0, eta=1.0, policy_version=0)
    stale = sample_trajectories(pipe, prompts, [2, 3], num_steps=6, guidance_scale=5.0, eta=1.0, policy_version=0)
    assert learner.update(fresh, torch.tensor([1.0, -1.0]))["staleness"] == 0
    v1 = learner.get_weights()
    assert v1.version == 1 and not all(torch.equal(v0.text_encoder[k], v1.text_encoder[k]) for k in v0.text_encoder)
    for key, value in learner.get_weights(0).text_encoder.items():  # kept, and in the checkpoint state
        assert torch.equal(value, v0.text_encoder[key])
        assert torch.equal(learner.state_dict()["previous_lora"]["text_encoder"][key], value)
    # a sampler sharing the pipeline (inline mode) that is handed the older LoRA draws with it, then gives it back
    sampler = SamplerWorker(cfg, pipe=pipe)
    sampler.version = learner.version
    _, images, *_ = sampler.sample(v0, prompts, [2, 3])
    sampler.sample_with(v1)
    assert torch.equal(images, stale.images)
    metrics = learner.update(stale, torch.tensor([1.0, -1.0]))
    assert metrics["staleness"] == 1
    assert metrics["logprob_mismatch"] < 1e-5  # under version 0's LoRA, not the learner's version 1
    assert metrics["ratio"] != pytest.approx(1.0, abs=1e-7)  # the learner's own policy did move
    # the same update without the check in between: the check left the learner's LoRA as it was
    replay = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), cfg)
    replay.update(fresh, torch.tensor([1.0, -1.0]))
    replay.previous_weights = None  # nothing to check the stale batch against: NaN, same step
    assert math.isnan(replay.update(stale, torch.tensor([1.0, -1.0]))["logprob_mismatch"])
    for key, value in replay.get_weights().text_encoder.items():
        torch.testing.assert_close(learner.get_weights().text_encoder[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keeps the LoRA of versions"):
        learner.get_weights(0)


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
    # with the default every step is trained, so the spoiled steps reach the gradient (NaN: the step is skipped)
    every_step = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), tiny_config(tiny_sd_dir, "train.timestep_fraction=1.0", "train.batch_size=4"))
    assert every_step.trainable_steps.tolist() == list(range(6))
    assert every_step.update(spoiled, advantages)["skipped_steps"] == 1
    assert every_step.update(batch, advantages)["skipped_steps"] == 0


def test_a_sampler_keeps_only_the_latents_the_learner_reads_and_the_update_is_the_same(pipe, tiny_sd_dir):
    """train.min_sigma leaves steps 0-3 of 6: a sampler's trajectories keep latents 0-4 of the chain's 7
    (x_t and x_{t-1} of each trainable step), and the PPO update on them is the update on whole chains."""
    cfg = tiny_config(tiny_sd_dir, "train.min_sigma=0.05", "train.timestep_fraction=1.0", "train.batch_size=4",
                      "train.learning_rate=1e-2", "train.warmup_steps=0")
    learner = PPOLearner(pipe, cfg)
    prompts, seeds = ["a red ball", "a cat"] * 2, [0, 1, 2, 3]
    _, images, *samples = SamplerWorker(cfg, pipe=learner.pipe).sample(learner.get_weights(), prompts, seeds)
    kept = Trajectories.cat(samples)
    whole = sample_trajectories(learner.pipe, prompts, seeds, num_steps=6, guidance_scale=cfg.sample.guidance_scale,
                                eta=cfg.sample.eta)
    assert kept.latent_positions.tolist() == [[0, 1, 2, 3, 4]] * 4 and whole.latent_positions is None
    assert torch.equal(kept.latents, whole.latents[:, :5]) and torch.equal(images, whole.images)
    assert sum(sample.latents.nbytes for sample in samples) * 7 == whole.latents.nbytes * 5  # a copy, not a view
    with pytest.raises(ValueError, match=r"chain positions \[5\] were not kept \(kept: \[0, 1, 2, 3, 4\]\)"):
        kept.latents_at(torch.tensor([[4, 5]] * 4))
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    start = learner.state_dict()
    learner.update(kept, advantages)
    from_kept = learner.get_weights().text_encoder
    learner.load_state_dict(start)
    learner.update(whole, advantages)
    assert any(not torch.equal(v, start["lora"]["text_encoder"][k]) for k, v in from_kept.items())
    for k, v in learner.get_weights().text_encoder.items():
        assert torch.equal(from_kept[k], v)


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
    perturb_lora(learner.params)
    base = load_pipeline(tiny_sd_dir, device="cpu")
    expected = _mean_kl_to(base, learner, batch, step_index)
    kls = []
    for _ in range(4):  # with zero advantages only the KL term moves the weights
        kls.append(learner.minibatch_backward(batch, no_advantage, step_index)["kl_to_base"])
        learner.optimizer_step()
    assert kls[0] == pytest.approx(expected, rel=1e-4) and expected > 0
    assert kls[1] < kls[0] and max(kls[1:]) < 0.5 * kls[0], kls
    assert _mean_kl_to(base, learner, batch, step_index) < 0.5 * expected


def test_lora_init_seed_sets_the_initial_lora_apart_from_the_run_seed(tiny_sd_dir):
    def initial(*overrides):
        learner = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), tiny_config(tiny_sd_dir, *overrides))
        return [p.detach().clone() for p in learner.params], learner.generator.get_state()

    (run0, shuffles0), (run1, _) = initial("seed=0"), initial("seed=1")
    (moved, shuffles), (default, _) = initial("seed=0", "lora.init_seed=1"), initial("seed=0", "lora.init_seed=0")
    assert all(torch.equal(a, b) for a, b in zip(moved, run1))  # the LoRA of seed 1 ...
    assert torch.equal(shuffles, shuffles0)  # ... with seed 0's minibatch shuffles
    assert all(torch.equal(a, b) for a, b in zip(default, run0))
    assert not all(torch.equal(a, b) for a, b in zip(run0, run1))


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


def test_a_resumes_optimizer_settings_and_schedule_length_take_effect(pipe, tiny_sd_dir):
    """`--resume RUN train.learning_rate=... num_epochs=...`: the saved config changes, and so must the optimizer
    (torch's load_state_dict brings back the checkpoint's lr, weight decay and betas, and its schedule's base LR)."""
    original = ("train.warmup_steps=0", "train.lr_schedule=cosine", "num_epochs=2")
    learner = PPOLearner(pipe, tiny_config(tiny_sd_dir, *original, "train.learning_rate=1e-2"))
    batch = sample_trajectories(pipe, ["a", "b"], [0, 1], num_steps=6, guidance_scale=5.0, eta=1.0)
    learner.update(batch, torch.tensor([1.0, -1.0]))
    state = learner.state_dict()
    same = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), tiny_config(tiny_sd_dir, *original,
                                                                             "train.learning_rate=1e-2"))
    same.load_state_dict(state)  # an unchanged config resumes exactly where the run was
    assert same.optimizer.param_groups[0]["lr"] == learner.optimizer.param_groups[0]["lr"] < 1e-2
    assert same.lr_scheduler.get_last_lr() == learner.lr_scheduler.get_last_lr()
    changed = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), tiny_config(
        tiny_sd_dir, "train.warmup_steps=0", "train.lr_schedule=cosine", "num_epochs=20", "train.learning_rate=1e-3",
        "train.weight_decay=0", "train.adam_beta2=0.99"))
    changed.load_state_dict(state)
    group, step = changed.optimizer.param_groups[0], changed.lr_scheduler.last_epoch
    assert step == learner.lr_scheduler.last_epoch == 1
    assert group["lr"] == pytest.approx(1e-3 * changed.lr_scheduler.lr_lambdas[0](1))  # 20 epochs' cosine at step 1
    assert (group["weight_decay"], group["betas"]) == (0.0, (0.9, 0.99))
    assert changed.optimizer.state  # Adam's moments are the checkpoint's
    changed.update(batch, torch.tensor([1.0, -1.0]))
    assert changed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * changed.lr_scheduler.lr_lambdas[0](2))


# --- every optimizer step follows the mean gradient over the rows in it -----------------------


@pytest.mark.parametrize("num_samples, batch_size, accumulate, world", [(7, 2, 2, 1), (5, 2, 1, 2), (11, 2, 2, 2), (3, 4, 3, 3)])
def test_accumulation_plan_weights_each_minibatch_by_its_share_of_the_step(num_samples, batch_size, accumulate, world):
    plans = [accumulation_plan(num_samples, batch_size=batch_size, accumulate=accumulate, world_size=world, rank=r)
             for r in range(world)]
    assert len({len(plan) for plan in plans}) == 1  # every rank takes every optimizer step
    covered = []
    for step in zip(*plans):
        minibatches = [mb for rank_minibatches in step for mb in rank_minibatches]
        rows = sorted(i for begin, end, _ in minibatches for i in range(begin, end))
        assert rows == list(range(rows[0], rows[0] + len(rows)))  # the step's rows, each once
        assert sum(weight for _, _, weight in minibatches) == pytest.approx(1.0)
        assert all(weight == (end - begin) / len(rows) for begin, end, weight in minibatches)
        covered += rows
    assert covered == list(range(num_samples))
    # the short last accumulation group and a rank without rows
    assert accumulation_plan(7, batch_size=2, accumulate=2)[-1] == [(4, 6, 2 / 3), (6, 7, 1 / 3)]
    assert accumulation_plan(5, batch_size=2, accumulate=1, world_size=2, rank=1)[-1] == [(5, 5, 0.0)]


@pytest.mark.parametrize("num_samples, batch_size, world", [(8, 2, 2), (5, 2, 2), (11, 2, 3), (3, 4, 3)])
def test_rank_metrics_combine_into_one_learners_on_the_union_batch(num_samples, batch_size, world):
    """L ranks' metrics, combined, are one learner's on the union of their rows: a minibatch metric is the mean over
    every rank's rows (rank 0's share alone is another number), the step's from rank 0, a maximum the largest."""
    generator = torch.Generator().manual_seed(0)
    loss, kl = torch.randn(num_samples, generator=generator), torch.rand(num_samples, generator=generator)
    union, ranks = UpdateHistory(), [UpdateHistory() for _ in range(world)]
    for begin, end, _ in [mb for step in accumulation_plan(num_samples, batch_size=batch_size * world, accumulate=1)
                          for mb in step]:
        union.minibatch(end - begin, {"loss": loss[begin:end].mean().item(), "approx_kl": kl[begin:end].mean().item()})
    for rank, history in enumerate(ranks):
        for step in accumulation_plan(num_samples, batch_size=batch_size, accumulate=1, world_size=world, rank=rank):
            for begin, end, _ in step:
                rows = slice(begin, end)
                history.minibatch(end - begin, {"loss": loss[rows].mean().item() if end > begin else 0.0,
                                                "approx_kl": kl[rows].mean().item() if end > begin else 0.0})
            history.step({"grad_norm": 0.5, "skipped_steps": 0.0})
    summaries = [history.summary() | {"logprob_mismatch": float(rank), "trajectories_fetched": 2.0 + rank}
                 for rank, history in enumerate(ranks)]
    combined = combine_rank_metrics(summaries)
    assert combined["loss"] == pytest.approx(loss.mean().item(), abs=1e-6)
    if summaries[0]["rows_trained"] < num_samples:  # rank 0's share is not all the rows
        assert combined["loss"] != pytest.approx(summaries[0]["loss"], abs=1e-3)
    assert combined["approx_kl"] == pytest.approx(union.summary()["approx_kl"], abs=1e-6)
    assert combined["grad_norm"] == 0.5 and combined["skipped_steps"] == 0.0
    trained = [rank for rank, summary in enumerate(summaries) if summary["rows_trained"] > 0]
    assert combined["logprob_mismatch"] == max(trained) and combined["trajectories_fetched"] == 2.0 + max(trained)
    assert "rows_trained" not in combined


def test_update_history_weighs_minibatches_by_rows_and_sums_skipped_steps():
    history = UpdateHistory()
    history.minibatch(3, {"loss": 1.0, "logprob_mismatch": 1e-6})
    history.minibatch(1, {"loss": 5.0})
    history.minibatch(0, {"loss": 0.0})  # a rank's empty share of a minibatch
    history.step({"grad_norm": 1.0, "skipped_steps": 1.0})
    history.step({"grad_norm": 3.0, "skipped_steps": 1.0})
    assert history.summary() == {"loss": 2.0, "logprob_mismatch": 1e-6, "grad_norm": 2.0, "skipped_steps": 2.0,
                                 "rows_trained": 4.0}
    empty = UpdateHistory()
    empty.minibatch(0, {"loss": 0.0})
    assert math.isnan(empty.summary()["loss"]) and empty.summary()["rows_trained"] == 0.0


def _assert_same_gradient(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """Equal up to float32 summation order (minibatches of other sizes run other kernels), which
    Adam's g / sqrt(v) amplifies in the weights of later steps: 1e-4 of the largest entry."""
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


def _record_step_gradients(learner) -> list[list[torch.Tensor]]:
    """The gradients each optimizer step uses (after the all-reduce, unscaling and clipping)."""
    recorded = []
    learner.optimizer.register_step_pre_hook(lambda *_: recorded.append([p.grad.clone() for p in learner.params]))
    return recorded


_ROW_WEIGHTING = ("train.clip_range=0.2", "train.warmup_steps=0", "train.lr_schedule=constant",
                  "train.learning_rate=1e-3", "train.max_grad_norm=1e6")


def _off_policy_learner(tiny_sd_dir, *overrides):
    learner = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), tiny_config(tiny_sd_dir, *_ROW_WEIGHTING, *overrides))
    perturb_lora(learner.params)  # B != 0, so every LoRA factor gets a gradient
    return learner


def test_short_last_accumulation_group_steps_on_the_mean_of_its_rows(pipe, tiny_sd_dir):
    batch = sample_trajectories(pipe, ["a red ball", "a cat", "a dog"] * 2, list(range(6)), num_steps=6,
                                guidance_scale=5.0, eta=1.0)
    advantages = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.1])
    # 3 minibatches of 2 with accumulate 2: steps of 4 and 2 rows, as one learner with minibatches of 4
    accumulated = _off_policy_learner(tiny_sd_dir, "train.batch_size=2", "train.gradient_accumulation_steps=2")
    single = _off_policy_learner(tiny_sd_dir, "train.batch_size=4")
    grads_accumulated, grads_single = _record_step_gradients(accumulated), _record_step_gradients(single)
    accumulated.update(batch, advantages)
    single.update(batch, advantages)
    assert len(grads_accumulated) == len(grads_single) == 2
    for step_a, step_s in zip(grads_accumulated, grads_single):
        assert sum(g.abs().sum() for g in step_s) > 0
        _assert_same_gradient(step_a, step_s)


def _rank_update(rank, world, init_file, tiny_sd_dir, batches, out_dir):
    """One data-parallel rank (gloo): update on each batch given only the rows it trains on (what a
    rank fetches), save the step gradients, the weights and those rows."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        learner = _off_policy_learner(tiny_sd_dir, "train.batch_size=2")
        recorded = _record_step_gradients(learner)
        rows = []
        for batch, advantages in batches:
            generator_state = learner.generator.get_state()
            draws = learner.draw_update(len(advantages))
            assert torch.equal(learner.generator.get_state(), generator_state)  # drawn from a copy
            rows.append(draws.rows.tolist())
            learner.update(batch.select(draws.rows), advantages, draws)
        torch.save({"grads": recorded, "weights": learner.get_weights().text_encoder, "rows": rows},
                   f"{out_dir}/rank{rank}.pt")
        # neither rank tears down its gloo pairs while the other may still use them: once (of 30 suite runs, beside
        # a CPU-bound process) rank 0 aborted ("terminate called without an active exception") with rank 1 alive
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ranks_with_fewer_or_no_rows_step_like_one_learner_on_the_union(pipe, tiny_sd_dir, tmp_path):
    """Two gloo ranks with minibatches of 2, each given only the rows it trains on, against one learner
    with minibatches of 4 on the whole batch: 5 rows leave rank 1 nothing in the last step, 7 rows leave
    it one of three, 2 rows leave it none at all."""
    prompts = ["a red ball", "a cat", "a dog", "a blue car"] * 2
    batches = [(sample_trajectories(pipe, prompts[:n], list(range(n)), num_steps=6, guidance_scale=5.0, eta=1.0),
                torch.linspace(-1.0, 1.5, n)) for n in (5, 7, 2)]
    mp.spawn(_rank_update, args=(2, tmp_path / "rendezvous", tiny_sd_dir, batches, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # the ranks split each batch between them (a rank with no rows still reads one, for the shapes)
    for n, rows_0, rows_1 in zip((5, 7, 2), ranks[0]["rows"], ranks[1]["rows"]):
        assert sorted(rows_0 + rows_1) == list(range(n)) or (n == 2 and sorted(rows_0) == [0, 1] and rows_1 == [0])
    assert [len(rows) for rows in ranks[0]["rows"]] == [3, 4, 2]
    single = _off_policy_learner(tiny_sd_dir, "train.batch_size=4")
    recorded = _record_step_gradients(single)
    for batch, advantages in batches:
        single.update(batch, advantages)
    assert len(recorded) == len(ranks[0]["grads"]) == 5
    for step, expected in enumerate(recorded):
        for rank in ranks:
            _assert_same_gradient(rank["grads"][step], expected)
    for key, value in single.get_weights().text_encoder.items():  # 2% of an Adam step (lr 1e-3)
        for rank in ranks:
            torch.testing.assert_close(rank["weights"][key], value, rtol=0, atol=2e-5)


# --- the LR schedule ---------------------------------------------------------------------


def test_warmup_starts_from_lr_zero_and_warmup_fraction_sets_its_length(pipe, tiny_sd_dir):
    factor = warmup_cosine(4, 20, "cosine")
    assert [factor(s) for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert factor(12) == pytest.approx(0.5) and factor(20) == pytest.approx(0.0)
    assert warmup_length(TrainConfig(warmup_fraction=0.03, warmup_steps=10), 6400) == 192  # TexForce: 3% of the steps
    assert warmup_length(TrainConfig(warmup_steps=10), 6400) == 10
    # 8 samples per epoch in minibatches of 2 for 25 epochs: 100 optimizer steps, 3 of warmup
    cfg = tiny_config(tiny_sd_dir, "sample.batch_size=8", "num_epochs=25", "train.warmup_fraction=0.03",
                      "train.learning_rate=1e-3")
    learner = PPOLearner(pipe, cfg)
    lrs = []
    for _ in range(5):
        lrs.append(learner.optimizer.param_groups[0]["lr"])
        learner.optimizer.step()
        learner.lr_scheduler.step()
    assert lrs[:4] == pytest.approx([0.0, 1e-3 / 3, 2e-3 / 3, 1e-3])
    assert lrs[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 97)))


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


def test_optimizer_step_clips_the_lora_gradient_to_max_grad_norm(pipe, tiny_sd_dir):
    """Adam is nearly scale-invariant, so only the step's own gradient shows whether max_grad_norm is applied."""
    learner = PPOLearner(pipe, tiny_config(tiny_sd_dir, "train.max_grad_norm=0.01"))
    for p in learner.params:
        p.grad = torch.ones_like(p)
    stepped_with = []
    learner.optimizer.register_step_pre_hook(lambda *_: stepped_with.append(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in learner.params])).item()))
    metrics = learner.optimizer_step()
    assert metrics["grad_norm"] == pytest.approx(math.sqrt(sum(p.numel() for p in learner.params)))  # before clipping
    assert stepped_with == [pytest.approx(0.01, rel=1e-4)]


def test_timestep_fraction_trains_that_share_of_each_samples_steps_drawn_at_random(pipe, tiny_sd_dir, monkeypatch):
    """DDPO's timestep_fraction: each sample trains int(K * fraction) of its K trainable steps, a fresh random
    subset per sample (not the first ones, which are the noisiest)."""
    learner = PPOLearner(pipe, tiny_config(tiny_sd_dir, "train.timestep_fraction=0.5", "train.batch_size=4"))
    steps = learner.trainable_steps.tolist()
    trained = int(len(steps) * 0.5)
    (step_index,) = learner.draw_update(64).step_indices
    assert all(sorted(row) == sorted(steps) for row in step_index.tolist())  # each row a permutation
    chosen = step_index[:, :trained]
    assert all(16 <= int((chosen == s).sum()) <= 48 for s in steps)  # binomial(64, 1/2): 32 +- 4 each
    widths = []
    backward = learner.minibatch_backward

    def recording(batch, advantages, step_index, *args, **kwargs):
        widths.append(step_index.shape[1])
        return backward(batch, advantages, step_index, *args, **kwargs)

    monkeypatch.setattr(learner, "minibatch_backward", recording)
    batch = sample_trajectories(pipe, ["a", "b", "c", "d"], [0, 1, 2, 3], num_steps=6, guidance_scale=5.0, eta=1.0)
    learner.update(batch, torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    assert widths and set(widths) == {trained}
