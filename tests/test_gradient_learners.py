"""Gradient learners (rl/gradient.py): the truncated gradient is the true derivative of the reward
through the last K steps, the steps before them carry none, ReFL stops in its range, TextCraftor's
early steps run on the base text encoder, the KL regulariser is DPOK's and pulls toward the base,
and half precision gives the float32 gradient."""
import re

import pytest
import torch
from conftest import perturb_lora, tiny_config

from rl.algorithms import get_algorithm
from rl.gradient import GradientLearner, Window, _decode, _draw_steps, draw_window, refl_stop_range
from rl.ddim import add_noise, predicted_x0
from rl.lora import get_policy_weights, set_policy_weights
from rl.models import load_pipeline
from rl.sampling import denoise, encode, guided_noise_prediction, tokenize

PROMPTS, SEEDS = ["a red ball", "a blue car"], [1, 2]


def _learner(tiny_sd_dir, algorithm, *overrides, dtype="float32"):
    config = tiny_config(tiny_sd_dir, f"train.algorithm={algorithm}", "lora.policy=both", "sample.num_steps=4",
                         f"model.dtype={dtype}", *overrides)
    return GradientLearner(load_pipeline(tiny_sd_dir, dtype=dtype, device="cpu"), config)


def _run(learner):
    return dict(guidance_scale=learner.sample.guidance_scale, eta=0.0, height=learner.height, width=learner.width)


def _assert_gradient_matches_central_differences(learner, grads: list[torch.Tensor], loss, h: float) -> None:
    """Along each of the three LoRA tensors with the largest gradient, the central difference of
    `loss()` (a float) at step h equals the derivative along the gradient, its norm, within 3%."""
    norms = torch.stack([g.norm() for g in grads])
    assert norms.max() > 0
    with torch.no_grad():
        for i in norms.argsort(descending=True)[:3].tolist():
            param, direction = learner.params[i], grads[i] / norms[i]
            original = param.clone()
            param.add_(h * direction)
            plus = loss()
            param.copy_(original - h * direction)
            minus = loss()
            param.copy_(original)
            finite_difference = (plus - minus) / (2 * h)
            assert abs(finite_difference - norms[i].item()) < 0.03 * abs(finite_difference), (i, finite_difference)


@pytest.mark.parametrize("k", [2, 4])  # the last 2 of 4 steps (DRaFT-K), and all 4 (DRaFT)
def test_truncated_lora_gradient_matches_finite_differences(tiny_sd_dir, one_torch_thread, k):
    """d(-mean reward)/d(LoRA) along each of the three LoRA tensors with the largest gradient,
    against central differences of the same loss with x_{T-K} held fixed (the truncated objective;
    for K = T that is x_T, so the plain derivative). float32 throughout: relative error < 3%
    at h = 0.03 (measured 0.06-0.8%; the reward's roundoff limits smaller h)."""
    learner = _learner(tiny_sd_dir, "draft_k", f"gradient.truncation_k={k}")
    perturb_lora(learner.params, scale=0.1)
    steps = learner.schedule.num_steps
    learner.minibatch_backward(PROMPTS, SEEDS, Window(steps - k, steps))
    grads = [p.grad.clone() for p in learner.params]
    with torch.no_grad():
        cond, uncond = learner.embeddings(PROMPTS)
        x_start = denoise(learner.pipe, cond, uncond, SEEDS, learner.schedule, steps=range(0, steps - k),
                          **_run(learner))[0][-1]

        def loss() -> float:
            cond, uncond = learner.embeddings(PROMPTS)
            x0 = denoise(learner.pipe, cond, uncond, SEEDS, learner.schedule, start=x_start,
                         steps=range(steps - k, steps), **_run(learner))[0][-1]
            return -learner.reward(_decode(learner.pipe.vae, x0, False), PROMPTS).scores.double().mean().item()

        _assert_gradient_matches_central_differences(learner, grads, loss, h=0.03)


def test_what_the_weights_do_before_the_last_k_steps_changes_nothing_in_the_gradient(tiny_sd_dir, one_torch_thread):
    """A hook adds (s - s.detach()) to the U-Net's input latent, s = the sum of the U-Net LoRA
    parameters: the values stay the same, but every call it touches gains a path from the weights to
    the loss. On the steps before the last K the gradient is bit-identical (they run without grad);
    on a step inside the window it changes (the test would catch a leak)."""
    learner = _learner(tiny_sd_dir, "draft_k", "gradient.truncation_k=2")
    perturb_lora(learner.params, scale=0.1)
    unet_lora = [p for n, p in learner.pipe.unet.named_parameters() if "lora_" in n]
    timesteps = learner.schedule.timesteps.tolist()
    window = Window(2, 4)

    def gradient(hooked_timesteps: list[int]) -> list[torch.Tensor]:
        def hook(module, args):
            latent, t = args[0], args[1]
            if int(t[0]) not in hooked_timesteps:
                return None
            s = sum(p.sum() for p in unet_lora)
            return (latent + (s - s.detach()), *args[1:])

        handle = learner.pipe.unet.register_forward_pre_hook(hook)
        try:
            learner.minibatch_backward(PROMPTS, SEEDS, window)
        finally:
            handle.remove()
        grads = [p.grad.clone() for p in learner.params]
        learner.optimizer.zero_grad(set_to_none=True)
        return grads

    plain = gradient([])
    early = gradient(timesteps[:2])  # the two steps before the window
    inside = gradient(timesteps[2:3])  # the first step of the window
    assert all(torch.equal(a, b) for a, b in zip(plain, early))
    assert not all(torch.allclose(a, b) for a, b in zip(plain, inside))


def test_refl_stops_in_its_range():
    assert refl_stop_range(0.75, 0.975, 40) == (30, 39)  # ImageReward's ReFL: step 30-39 of 40
    assert refl_stop_range(0.75, 0.975, 10) == (7, 9)
    assert refl_stop_range(0.9, 0.99, 4) == (3, 3)
    config = tiny_config("unused", "train.algorithm=refl", "sample.num_steps=10")
    generator = torch.Generator().manual_seed(0)
    windows = [draw_window(get_algorithm("refl"), config, generator) for _ in range(200)]
    assert {w.first for w in windows} == {7, 8, 9}  # every step of the range, none outside
    assert all(w.stop and w.end == w.first + 1 for w in windows)
    ks = {draw_window(get_algorithm("alignprop"), config, generator).num_grad_steps for _ in range(300)}
    assert ks == set(range(1, 11))  # AlignProp: K uniform in [1, T]
    draft_k = tiny_config("unused", "train.algorithm=draft_k", "sample.num_steps=10", "gradient.truncation_k=3")
    window = draw_window(get_algorithm("draft_k"), draft_k, generator)  # DRaFT-K: exactly the last K steps
    assert (window.first, window.end, window.num_grad_steps) == (7, 10, 3)


def test_refl_update_scores_its_stop_step(tiny_sd_dir, one_torch_thread):
    learner = _learner(tiny_sd_dir, "refl", "sample.num_steps=8", "train.batch_size=1")
    metrics, samples = learner.update(["a red ball"] * 4, [0, 1, 2, 3])
    low, high = refl_stop_range(0.75, 0.975, 8)
    assert low <= metrics["refl_stop_step"] <= high and metrics["grad_steps"] == 1
    assert samples.rows == [0, 1, 2, 3] and samples.images.dtype == torch.uint8


def test_textcraftor_early_steps_run_on_the_base_text_encoder(tiny_sd_dir, one_torch_thread):
    """The learner's sample equals: the base model's first T-K steps (a pipeline without any LoRA),
    then the LoRA'd encoder's last K; it differs from the all-LoRA and the all-base samples."""
    learner = _learner(tiny_sd_dir, "textcraftor", "lora.policy=text_encoder", "gradient.textcraftor_fraction=0.5")
    perturb_lora(learner.params, scale=0.5)
    base = load_pipeline(tiny_sd_dir, device="cpu")
    steps, run = learner.schedule.num_steps, _run(learner)
    with torch.no_grad():
        _, _, x0 = learner.loss(PROMPTS, SEEDS, draw_window(learner.algorithm, learner.config, learner.generator))
        cond, uncond = learner.embeddings(PROMPTS)
        base_cond = encode(base.text_encoder, tokenize(base.tokenizer, PROMPTS))
        base_uncond = encode(base.text_encoder, tokenize(base.tokenizer, [""] * len(PROMPTS)))
        base_latents = denoise(base, base_cond, base_uncond, SEEDS, learner.schedule, **run)[0]
        expected = denoise(learner.pipe, cond, uncond, SEEDS, learner.schedule, start=base_latents[steps - 2],
                           steps=range(steps - 2, steps), **run)[0][-1]
        all_lora = denoise(learner.pipe, cond, uncond, SEEDS, learner.schedule, **run)[0][-1]
    torch.testing.assert_close(x0, expected, rtol=1e-5, atol=1e-5)
    assert (x0 - all_lora).abs().max() > 1e-3  # 100x the tolerance of the match above
    assert (x0 - base_latents[-1]).abs().max() > 1e-3


def test_draft_lv_sums_the_rewards_of_its_copies(tiny_sd_dir, one_torch_thread):
    learner = _learner(tiny_sd_dir, "draft_lv", "gradient.lv_copies=3")
    perturb_lora(learner.params, scale=0.1)
    window = draw_window(learner.algorithm, learner.config, learner.generator)
    assert (window.first, window.end, window.copies) == (4, 4, 3)  # the loop itself carries no grad ...
    assert window.num_grad_steps == 1  # ... each copy's one step does (the logged `grad_steps`)
    loss, metrics, x0 = learner.loss(PROMPTS, SEEDS, window)
    assert loss.item() == pytest.approx(-3 * metrics["reward_trained"], rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in learner.params)
    # each copy: the sample re-noised to the last step's timestep with its own noise, then that one step denoised
    steps, run = learner.schedule.num_steps, _run(learner)
    noises = learner.copy_noise(x0.detach(), SEEDS, 3)
    assert not torch.equal(noises[0], noises[1]) and not torch.equal(noises[1], noises[2])
    with torch.no_grad():
        cond, uncond = learner.embeddings(PROMPTS)
        t = torch.full((len(SEEDS),), int(learner.schedule.timesteps[-1]), dtype=torch.long)
        rewards = []
        for noise in noises:
            start = add_noise(learner.schedule, x0.detach(), noise, t)
            copy = denoise(learner.pipe, cond, uncond, SEEDS, learner.schedule, start=start,
                           steps=range(steps - 1, steps), **run)[0][-1]
            rewards.append(learner.reward(_decode(learner.pipe.vae, copy, False), PROMPTS).scores.mean().item())
    assert metrics["reward_trained"] == pytest.approx(sum(rewards) / 3, abs=1e-5)


def test_refl_scores_the_predicted_x0_at_its_stop_step_and_returns_the_finished_sample(tiny_sd_dir, one_torch_thread,
                                                                                       monkeypatch):
    """ReFL's reward is of x0_hat predicted from x_m at step m (one guided U-Net call); the sample it returns for
    the logs and grids is the plain sampler's finished one, like every other algorithm's."""
    import rl.gradient

    learner = _learner(tiny_sd_dir, "refl")
    perturb_lora(learner.params, scale=0.1)
    decoded = []
    decode = rl.gradient._decode
    monkeypatch.setattr(rl.gradient, "_decode", lambda vae, latents, use_checkpoint: (
        decoded.append(latents.detach().clone()), decode(vae, latents, use_checkpoint))[1])
    m = 2
    with torch.no_grad():
        _, _, x0 = learner.loss(PROMPTS, SEEDS, Window(m, m + 1, stop=True))
        cond, uncond = learner.embeddings(PROMPTS)
        latents = denoise(learner.pipe, cond, uncond, SEEDS, learner.schedule, **_run(learner))[0]
        t = torch.full((len(SEEDS),), int(learner.schedule.timesteps[m]), dtype=torch.long)
        eps = guided_noise_prediction(learner.pipe.unet, latents[m], t, cond, uncond, learner.sample.guidance_scale)
    torch.testing.assert_close(decoded[0], predicted_x0(learner.schedule, eps, t, latents[m]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, latents[-1], rtol=1e-5, atol=1e-5)


def test_the_kl_is_taken_at_the_drawn_steps_state_which_it_does_not_train(tiny_sd_dir, one_torch_thread):
    """DPOK: the KL of the step at x_{kl_step} of the sample, x_t held fixed (no gradient reaches the states)."""
    learner = _learner(tiny_sd_dir, "draft", "gradient.kl_coef=1")
    perturb_lora(learner.params, scale=0.1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    cond, uncond = learner.embeddings(PROMPTS)
    learner.kl_to_base(PROMPTS, x * 1.0, 1, cond, uncond).backward()
    assert x.grad is None
    states = []
    kl_to_base = learner.kl_to_base
    learner.kl_to_base = lambda prompts, x_t, step, c, u: (states.append(x_t.detach().clone()),
                                                            kl_to_base(prompts, x_t, step, c, u))[1]
    learner.loss(PROMPTS, SEEDS, Window(0, 4, kl_step=2))
    with torch.no_grad():
        cond, uncond = learner.embeddings(PROMPTS)
        latents = denoise(learner.pipe, cond, uncond, SEEDS, learner.schedule, **_run(learner))[0]
    torch.testing.assert_close(states[0], latents[2], rtol=1e-5, atol=1e-5)


def test_weights_missing_a_module_are_refused_by_name(tiny_sd_dir):
    pipe, other = (_learner(tiny_sd_dir, "draft").pipe for _ in range(2))
    weights = get_policy_weights(pipe, "both", 0)
    missing = min(weights.unet)
    del weights.unet[missing]
    with pytest.raises(ValueError, match=rf"LoRA weights for unet do not match its adapter: missing \['{re.escape(missing)}'"):
        set_policy_weights(other, weights)


@pytest.mark.parametrize("algorithm", ["draft", "draft_k", "draft_lv", "refl", "alignprop", "textcraftor"])
def test_the_kl_step_is_a_step_with_grad_and_costs_no_draw_when_off(algorithm):
    config = tiny_config("unused", f"train.algorithm={algorithm}", "sample.num_steps=10", "gradient.kl_coef=1")
    plain = tiny_config("unused", f"train.algorithm={algorithm}", "sample.num_steps=10")
    generator, plain_generator = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    steps = set()
    for _ in range(100):
        window = draw_window(get_algorithm(algorithm), config, generator)
        if window.copies:  # DRaFT-LV: the copies' one step, T - 1
            assert window.kl_step == 9
        else:
            assert window.first <= window.kl_step < window.end
        steps.add(window.kl_step)
        assert draw_window(get_algorithm(algorithm), plain, plain_generator).kl_step is None
    if algorithm == "draft":
        assert steps == set(range(10))  # uniform over the window: every step drawn
    # off, it draws nothing: the windows (ReFL's m, AlignProp's K) are those of a run without the regulariser
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(5):
        draw_window(get_algorithm(algorithm), plain, a)
        _draw_steps(get_algorithm(algorithm), plain, b)
    assert torch.equal(a.get_state(), b.get_state())


def test_kl_to_base_is_zero_at_the_base_and_its_gradient_matches_finite_differences(tiny_sd_dir, one_torch_thread):
    """DPOK's term ||eps_theta - eps_base||^2 at a fixed x_t: 0 with the LoRA at its start (B = 0: the
    base model, so the base really is the LoRA switched off), and with both LoRAs moved its gradient
    is the derivative of the term (central differences, float32, within 3%)."""
    learner = _learner(tiny_sd_dir, "draft", "gradient.kl_coef=1")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    step = 1

    def kl() -> torch.Tensor:
        cond, uncond = learner.embeddings(PROMPTS)
        return learner.kl_to_base(PROMPTS, x, step, cond, uncond)

    assert kl().item() == 0.0
    perturb_lora(learner.params, scale=0.1)
    value = kl()
    assert value.item() > 1e-4
    value.backward()
    _assert_gradient_matches_central_differences(learner, [p.grad.clone() for p in learner.params],
                                                 lambda: kl().double().item(), h=0.01)


def test_the_kl_regulariser_pulls_the_lora_back_to_the_base(tiny_sd_dir, one_torch_thread):
    """TextCraftor from a moved text-encoder LoRA, the same prompts, seeds and steps, with and without
    the regulariser: with kl_coef large the updates shrink the LoRA's KL to the base, without it they
    do not; the loss is -reward + kl_coef x the logged kl_to_base."""
    def kl_after(kl_coef: float) -> list[float]:
        learner = _learner(tiny_sd_dir, "textcraftor", "lora.policy=text_encoder", "gradient.textcraftor_fraction=1.0",
                           f"gradient.kl_coef={kl_coef}", "train.learning_rate=3e-2", "train.batch_size=2",
                           "reward.spec=color_alignment")
        perturb_lora(learner.params, scale=0.3)
        window = Window(0, 4, kl_step=2)
        history = []
        for _ in range(4):
            metrics, _ = learner.minibatch_backward(PROMPTS, SEEDS, window)
            if kl_coef > 0:
                assert metrics["loss"] == pytest.approx(-metrics["reward_trained"] + kl_coef * metrics["kl_to_base"],
                                                        rel=1e-5, abs=1e-6)
            learner.optimizer_step()
            with torch.no_grad():
                cond, uncond = learner.embeddings(PROMPTS)
                x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
                history.append(learner.kl_to_base(PROMPTS, x, 2, cond, uncond).item())
        return history

    held, free = kl_after(100.0), kl_after(0.0)
    assert held[-1] < 0.5 * held[0], held
    assert free[-1] > held[-1] * 2, (free, held)


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("algorithm, window", [
    ("draft_k", Window(3, 4)),  # DRaFT-1
    ("draft", Window(0, 4)),  # through every step
    ("refl", Window(0, 1, stop=True)),  # x0_hat predicted at the first step
    ("refl", Window(1, 2, stop=True)),
    ("draft_lv", Window(4, 4, copies=2)),  # the re-noised copies
    ("textcraftor", Window(3, 4)),
])
def test_half_precision_gradient_learner_matches_float32(tiny_sd_dir, one_torch_thread, algorithm, window):
    """Each gradient learner's window on both LoRAs, one prompt at the tiny model's 64 px: the unscaled float32 LoRA
    gradient the optimizer steps on, from fp16 (loss-scaled) and bf16 frozen weights, against float32 (measured:
    cosine >= 0.9993 in bf16, >= 0.99999 in fp16)."""
    reference = _learner(tiny_sd_dir, algorithm, "train.max_grad_norm=1e6")
    perturb_lora(reference.params, scale=0.1)
    weights = reference.get_weights()  # taken before the reference steps: every learner's gradient at these

    def step_gradient(learner) -> list[torch.Tensor]:
        set_policy_weights(learner.pipe, weights)
        recorded = []
        learner.optimizer.register_step_pre_hook(lambda *_: recorded.append([p.grad.clone() for p in learner.params]))
        learner.minibatch_backward(PROMPTS[:1], SEEDS[:1], window)
        learner.optimizer_step()
        assert all(g.dtype == torch.float32 for g in recorded[0])
        return recorded[0]

    fp32 = step_gradient(reference)
    for dtype in ("float16", "bfloat16"):
        half = step_gradient(_learner(tiny_sd_dir, algorithm, "train.max_grad_norm=1e6", dtype=dtype))
        assert _cosine(half, fp32) > 0.99, dtype
        ratio = torch.cat([g.flatten() for g in half]).norm() / torch.cat([g.flatten() for g in fp32]).norm()
        assert abs(float(ratio) - 1) < 0.05, dtype


def test_half_precision_kl_regulariser_matches_float32(tiny_sd_dir, one_torch_thread):
    """The KL term alone (its value and gradient) from fp16 and bf16 frozen weights against float32, at
    a LoRA that moves the guided noise prediction by kl_to_base ~2e-3 per element. fp16 matches; bf16's
    rounding in the two U-Net calls (amplified by the guidance scale) adds a floor to the value (+33%
    here, measured; 3.9x at kl ~2e-4) and noise, not a bias, to the gradient (docs/half_precision.md)."""
    reference = _learner(tiny_sd_dir, "draft", "gradient.kl_coef=1")
    perturb_lora(reference.params, scale=0.03)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def kl_gradient(learner) -> tuple[float, list[torch.Tensor]]:
        set_policy_weights(learner.pipe, reference.get_weights())
        learner.optimizer.zero_grad(set_to_none=True)
        cond, uncond = learner.embeddings(PROMPTS)
        kl = learner.kl_to_base(PROMPTS, x.to(learner.pipe.unet.dtype), 1, cond, uncond)
        kl.backward()
        return kl.item(), [p.grad.float().clone() for p in learner.params]

    value, fp32 = kl_gradient(reference)
    assert 1e-3 < value < 1e-2, value
    fp16_value, fp16 = kl_gradient(_learner(tiny_sd_dir, "draft", "gradient.kl_coef=1", dtype="float16"))
    assert fp16_value == pytest.approx(value, rel=0.02) and _cosine(fp16, fp32) > 0.999
    bf16_value, bf16 = kl_gradient(_learner(tiny_sd_dir, "draft", "gradient.kl_coef=1", dtype="bfloat16"))
    assert value < bf16_value < 1.5 * value and _cosine(bf16, fp32) > 0.98


def test_gradient_variance_bench_runs_on_the_tiny_model(tiny_sd_dir, one_torch_thread, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gradient_variance.py"
    spec = importlib.util.spec_from_file_location("gradient_variance", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--model", tiny_sd_dir, "--samples", "3", "--steps", "3"])
    assert [r["estimator"] for r in rows] == ["DRaFT-1", "DRaFT-LV (n=2)"]
    assert all(r["variance"] > 0 and r["mean_norm"] > 0 for r in rows)
    assert "| DRaFT-LV (n=2) |" in capsys.readouterr().out


def test_a_non_finite_reward_leaves_the_gradient_and_the_other_samples_train(tiny_sd_dir, one_torch_thread):
    """A score that is NaN (a reward model's bad sample) takes no part in the loss, and no part in the
    gradient either: the reward's backward would give its image 0 x NaN, and that NaN every LoRA weight."""
    from rewards.base import RewardOutput

    learner = _learner(tiny_sd_dir, "draft_k", "gradient.truncation_k=2", "train.warmup_steps=0")
    perturb_lora(learner.params, scale=0.1)
    reward = learner.reward

    def first_sample_nan(images, prompts):
        output = reward(images, prompts)  # a square root of a negative number: NaN, and a NaN derivative
        scores = torch.cat([(output.scores[:1] - 10).sqrt(), output.scores[1:]])
        return RewardOutput(scores=scores, parts=output.parts)

    learner.reward = first_sample_nan
    steps = learner.schedule.num_steps
    learner.minibatch_backward(PROMPTS, SEEDS, Window(steps - 2, steps))
    grads = [p.grad for p in learner.params]
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the gradient is the second sample's alone
    learner.optimizer.zero_grad(set_to_none=True)
    learner.reward = reward
    learner.minibatch_backward(PROMPTS[1:], SEEDS[1:], Window(steps - 2, steps))
    alone = [p.grad.clone() for p in learner.params]
    for g, a in zip(grads, alone):
        torch.testing.assert_close(g, a / 2, rtol=1e-4, atol=1e-7)  # the loss averages over the minibatch of 2
