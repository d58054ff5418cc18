"""Gradient learners on the trainer: the same run directory, checkpoints, resume and Ray topology as PPO,
and a ReFL U-Net LoRA fused with a TexForce text-encoder LoRA loads into diffusers."""
import shutil

import numpy as np
import pytest
import torch
from conftest import draw_epoch_prompts, tiny_config
from safetensors.torch import load_file

from actors.driver import train
from rl.config import load_config
from rl.learner import PPOLearner
from rl.lora import get_policy_weights, save_lora
from rl.models import load_pipeline
from rl.gradient import GradientLearner
from rl.sampling import sample_trajectories


def _config(tiny_sd_dir, tmp_path, *overrides):
    return tiny_config(
        tiny_sd_dir, f"output_dir={tmp_path}", "train.algorithm=refl", "lora.policy=unet", "sample.num_steps=4",
        "sample.batch_size=4", "sample.num_batches_per_epoch=2", "train.batch_size=4", "train.learning_rate=1e-2",
        "train.warmup_steps=0", "num_epochs=3", "resources.cpus_per_learner=1", *overrides,
    )


class _Interrupt(Exception):
    pass


def _interrupt_after_epoch_1(epoch, row):
    if epoch == 1:
        raise _Interrupt


def _held_out(tmp_path) -> list[str]:
    """Held-out prompts (3, with sample.batch_size 4: shards of 4 and 2 images) scored at 2 seeds each."""
    path = tmp_path / "held_out.txt"
    path.write_text("a purple hat\na green ball\na red car\n")
    return [f"evaluation.prompts_file={path}", "evaluation.num_seeds=2"]


@pytest.fixture(scope="module")
def inline_runs(tiny_sd_dir, tmp_path_factory):
    """A straight 3-epoch inline ReFL run scored on held-out prompts before and after, and the same run
    interrupted after epoch 1, without the evaluation."""
    tmp_path = tmp_path_factory.mktemp("gradient-runs")
    straight = train(_config(tiny_sd_dir, tmp_path, "run_name=straight", "resources.mode=inline", *_held_out(tmp_path)))
    with pytest.raises(_Interrupt):
        train(_config(tiny_sd_dir, tmp_path, "run_name=interrupted", "resources.mode=inline"),
              on_epoch_end=_interrupt_after_epoch_1)
    return straight, tmp_path / "interrupted"


def _assert_same_run(run, straight, *, rtol=1e-5, atol=1e-7):
    a = load_file(str(straight.final_lora / "pytorch_lora_weights.safetensors"))
    b = load_file(str(run.final_lora / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(k.startswith("unet.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=rtol, atol=atol)
    np.testing.assert_allclose([r["reward_mean"] for r in run.read_metrics()],
                               [r["reward_mean"] for r in straight.read_metrics()], rtol=rtol)


def test_inline_run_writes_the_ppo_outputs_and_learns(inline_runs):
    straight, _ = inline_runs
    rows = straight.read_metrics()
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    # ReFL's range at 4 steps is step 3 only: floor(0.75 * 4) to min(3, floor(0.975 * 4))
    assert all(r["num_samples"] == 8 and r["num_dropped"] == 0 and r["refl_stop_step"] == 3 for r in rows)
    assert [r["policy_version"] for r in rows] == [1, 2, 3] and all(r["grad_norm"] > 0 for r in rows)
    for path in [straight.reward_curve, straight.grids / "epoch_0002.png",
                 straight.checkpoints / "epoch_0002" / "learner.pt",
                 straight.checkpoints / "epoch_0002" / "lora" / "pytorch_lora_weights.safetensors"]:
        assert path.exists(), path
    assert any(straight.tensorboard.iterdir())


def test_a_gradient_run_scores_held_out_prompts_on_its_learner_as_texforce_eval_does(inline_runs, tiny_sd_dir):
    """No samplers: the learner draws and scores the held-out images, the same images and scores `texforce eval`
    (tune.evaluate) gives the base model and the final LoRA, with the paired gain between them."""
    from rewards.registry import build_reward
    from tune.evaluate import EvalSettings, evaluate, paired_gain

    straight, _ = inline_runs
    config = load_config(straight.path / "config.yaml")
    before, after = straight.read_evaluations()
    assert (before["epoch"], after["epoch"]) == (-1, 2) and (before["policy_version"], after["policy_version"]) == (0, 3)
    settings = EvalSettings(num_seeds=2, base_seed=config.evaluation.seed_base, num_steps=4,
                            guidance_scale=config.sample.guidance_scale, eta=config.evaluation_eta)
    prompts = ["a purple hat", "a green ball", "a red car"]
    reward = build_reward(config.reward.spec)
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    base = evaluate(pipe, reward, prompts, settings).objective
    pipe.load_lora_weights(str(straight.final_lora))
    final = evaluate(pipe, reward, prompts, settings).objective
    np.testing.assert_allclose(before["rewards"], base, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after["rewards"], final, rtol=1e-4, atol=1e-6)
    assert not np.allclose(after["rewards"], before["rewards"])  # the LoRA moved: a different image somewhere
    gain = paired_gain(np.asarray(before["rewards"]), np.asarray(after["rewards"]))
    assert after["reward_gain"] == pytest.approx(gain["mean"]) and after["reward_gain_sem"] == pytest.approx(gain["sem"])
    assert (straight.grids / "eval_before_training.png").exists() and (straight.grids / "eval_epoch_0002.png").exists()
    # and TensorBoard has them at step = epochs trained, beside the training scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight.tensorboard))
    events.Reload()
    assert {"held_out/reward_mean", "held_out/reward_sem", "held_out/reward_gain", "reward_mean"} <= set(
        events.Tags()["scalars"])
    means = [(e.step, e.value) for e in events.Scalars("held_out/reward_mean")]
    assert means == [(0, pytest.approx(before["reward_mean"])), (3, pytest.approx(after["reward_mean"]))]
    assert [(e.step, e.value) for e in events.Scalars("held_out/reward_gain")] == [(3, pytest.approx(gain["mean"]))]


def test_a_learners_evaluation_scores_with_its_own_reward_model_unless_evaluation_reward_names_another(
        tiny_sd_dir, tmp_path, second_image_nan):
    """A held-out image that decoded to NaN (black after its uint8 rounding) is scored NaN, not as a black image."""
    from actors.learner import LearnerWorker

    for overrides, shared in [((), True), (("evaluation.reward=brightness",), False)]:
        worker = LearnerWorker(_config(tiny_sd_dir, tmp_path, *_held_out(tmp_path), *overrides))
        images, scores = worker.evaluate(["a purple hat", "a red car"], [7, 8])
        assert images.shape[0] == 2 and images.dtype == torch.uint8 and scores.scores.shape == (2,)
        assert torch.isfinite(scores.scores[0]) and torch.isnan(scores.scores[1])
        assert (worker.evaluator[1].reward is worker.learner.reward) is shared
        assert worker.learner.version == 0 and not any(p.grad is not None for p in worker.learner.params)


def test_gradient_run_resumes_to_the_same_lora(inline_runs, tmp_path):
    """The interrupted run had no held-out evaluation: the straight run's, drawn by its learner, left its training
    as it was."""
    straight, interrupted = inline_runs
    assert not (interrupted / "final_lora").exists()
    run_dir = shutil.copytree(interrupted, tmp_path / "run")
    resumed = train(load_config(run_dir / "config.yaml"), resume=run_dir)
    assert [r["epoch"] for r in resumed.read_metrics()] == [0, 1, 2]
    _assert_same_run(resumed, straight)


def test_ray_run_with_two_learner_ranks_matches_the_inline_run(ray_session, inline_runs, tiny_sd_dir, tmp_path):
    """No samplers or reward actors: two learner ranks sample, score and step on 2 rows each per
    optimizer step, all-reducing gradients, like one inline learner on the 4 rows; the same config inline
    runs that one learner (actors.topology.as_one_learner), so it debugs the Ray run."""
    straight, _ = inline_runs
    two_ranks = ("resources.num_learners=2", "train.batch_size=2", "resources.cpus_per_learner=0.5", *_held_out(tmp_path))
    inline = train(_config(tiny_sd_dir, tmp_path, "run_name=inline", "resources.mode=inline", *two_ranks))
    _assert_same_run(inline, straight, rtol=0, atol=0)
    run = train(_config(tiny_sd_dir, tmp_path, "run_name=ray", *two_ranks))
    _assert_same_run(run, straight, rtol=1e-4, atol=1e-6)
    assert all(r["actor_restarts"] == 0 for r in run.read_metrics())
    # the held-out shards split over the two ranks score as the inline learner scored them
    for ray_row, inline_row in zip(run.read_evaluations(), straight.read_evaluations(), strict=True):
        assert ray_row["epoch"] == inline_row["epoch"] and ray_row["num_samples"] == 6
        np.testing.assert_allclose(ray_row["rewards"], inline_row["rewards"], rtol=1e-4, atol=1e-6)


def test_refl_unet_lora_fuses_with_a_texforce_text_encoder_lora(tiny_sd_dir, tmp_path, capsys, one_torch_thread):
    """Each LoRA gets two optimizer steps on the tiny model (ReFL on the U-Net; PPO on the text
    encoder), is saved the trainer's way, and `texforce fuse` combines them; the fused file loads
    with `pipe.load_lora_weights` and its images differ from each LoRA's alone."""
    from rl.cli import main

    refl_config = _config(tiny_sd_dir, tmp_path, "lora.unet_targets=to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2")
    refl = GradientLearner(load_pipeline(tiny_sd_dir, device="cpu"), refl_config)
    for _ in range(2):
        refl.update(["a red ball", "a blue car", "a green cup", "a red hat"], [0, 1, 2, 3])
    unet_file = save_lora(refl.get_weights(), refl_config.lora, tmp_path / "refl")

    ppo_config = tiny_config(tiny_sd_dir, "lora.policy=text_encoder", "sample.num_steps=4", "train.learning_rate=1e-2",
                             "train.warmup_steps=0", "train.clip_range=10")
    ppo = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), ppo_config)
    for _ in range(2):
        batch = sample_trajectories(ppo.pipe, ["a red ball", "a blue car"], [0, 1], num_steps=4, guidance_scale=5.0,
                                    eta=1.0)
        ppo.update(batch, torch.tensor([1.0, -1.0]))
    text_file = save_lora(get_policy_weights(ppo.pipe, "text_encoder", ppo.version), ppo_config.lora, tmp_path / "tex")

    fused_file = tmp_path / "fused.safetensors"
    assert main(["fuse", "--lora", f"{unet_file}:1", "--lora", f"{text_file}:1", "--out", str(fused_file)]) == 0
    assert "fused 2 LoRAs" in capsys.readouterr().out

    def images(lora) -> torch.Tensor:
        pipe = load_pipeline(tiny_sd_dir, device="cpu")
        pipe.load_lora_weights(str(lora))
        return pipe(["a red ball"], num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    fused, unet_only, text_only = images(fused_file), images(unet_file), images(text_file)
    assert (fused - unet_only).abs().max() > 1e-3 and (fused - text_only).abs().max() > 1e-3
    assert any("ff.net" in key for key in load_file(str(fused_file)))  # attention and feed-forward LoRA


class _DifferentiableNanForBlue:
    """The images' mean brightness (differentiable), NaN for a prompt with "blue" in it."""

    name = "brightness_nan_for_blue"
    differentiable = True

    def __call__(self, images, prompts):
        blue = torch.tensor(["blue" in p for p in prompts], device=images.device)
        return torch.where(blue, torch.full_like(images[:, 0, 0, 0], float("nan")), images.mean(dim=(1, 2, 3)))


@pytest.fixture(scope="module")
def nan_gradient_reward() -> str:
    import rewards

    if _DifferentiableNanForBlue.name not in {e.name for e in rewards.list_entries()}:
        rewards.register(rewards.RewardEntry(_DifferentiableNanForBlue.name, lambda **_: _DifferentiableNanForBlue(),
                                             True, (), "test"))
    return _DifferentiableNanForBlue.name


def test_a_gradient_learners_non_finite_stop_keeps_the_epoch_with_its_row_and_the_resume_goes_on(
        tiny_sd_dir, tmp_path, monkeypatch, nan_gradient_reward):
    from actors.driver import NonFiniteRewardError
    from rl.run_dir import RunDirectory

    blue_at = {1}
    draw_epoch_prompts(monkeypatch, lambda epoch, n: [f"a {'blue' if epoch in blue_at else 'red'} ball"] * n)
    config = _config(tiny_sd_dir, tmp_path, "run_name=stop", "resources.mode=inline", "save_every=5",
                     f"reward.spec={nan_gradient_reward}", "reward.on_non_finite=stop")
    with pytest.raises(NonFiniteRewardError, match=r"8 of 8 samples of the epoch have non-finite rewards .*stopping "
                                                   r"after a checkpoint of this epoch"):
        train(config)
    run = RunDirectory(tmp_path / "stop")
    assert [p.name for p in run.checkpoints.iterdir()] == ["epoch_0001"]  # this epoch's, as the message says ...
    assert [r["epoch"] for r in run.read_metrics()] == [0, 1]  # ... with its row: the resume does not lose it
    assert run.read_metrics()[1]["num_dropped"] == 8 and (run.grids / "epoch_0001_non_finite.png").exists()
    blue_at.clear()
    resumed = train(load_config(run.path / "config.yaml"), resume=run.path)
    assert [r["epoch"] for r in resumed.read_metrics()] == [0, 1, 2]


def test_a_gradient_learners_non_finite_rewards_are_dropped_from_the_epochs_row(tiny_sd_dir, tmp_path, monkeypatch,
                                                                                nan_gradient_reward):
    """reward.on_non_finite=drop (the default): the epoch's row is over the finite rewards only, as PPO's is, with the
    dropped ones counted; a NaN kept in them would make the logged reward NaN."""
    from rl.run_dir import RunDirectory

    draw_epoch_prompts(monkeypatch, lambda epoch, n: ["a blue ball", "a red ball"] * (n // 2))
    config = _config(tiny_sd_dir, tmp_path, "run_name=drop", "resources.mode=inline", "num_epochs=1",
                     f"reward.spec={nan_gradient_reward}")
    assert config.reward.on_non_finite == "drop"
    (row,) = RunDirectory(train(config).path).read_metrics()
    assert row["num_dropped"] == 4 and row["num_samples"] == 4
    assert np.isfinite(row["reward_mean"]) and np.isfinite(row["reward_sem"])
