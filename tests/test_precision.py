"""Half-precision learning: fp16 loss scaling and bf16 give the float32 LoRA gradient; overflow is skipped;
on the CPU, half-precision attention runs in float32."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_lora, tiny_config
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.overrides import TorchFunctionMode

from rl.learner import PPOLearner
from rl.lora import set_policy_weights
from rl.models import CpuFloat32AttentionProcessor, Float32CpuAttention, load_pipeline
from rl.sampling import decode_latents, encode, guided_noise_prediction, recomputed_log_probs, sample_trajectories


def _fp16_learner(tiny_sd_dir, *overrides):
    pipe = load_pipeline(tiny_sd_dir, dtype="float16", device="cpu")
    return PPOLearner(pipe, tiny_config(tiny_sd_dir, "model.dtype=float16", *overrides))


def test_overflowing_fp16_step_is_skipped_and_the_scale_backs_off(tiny_sd_dir, one_torch_thread):
    learner = _fp16_learner(tiny_sd_dir, "train.init_loss_scale=1e30", "train.loss_scale_growth_interval=1",
                            "train.warmup_steps=0", "train.learning_rate=1e-2", "lora.policy=both")
    assert all(p.dtype == torch.float32 for p in learner.params)  # fp32 master LoRA weights
    batch = sample_trajectories(learner.pipe, ["a red ball", "a cat"], [0, 1], num_steps=6, guidance_scale=5.0, eta=1.0)
    assert batch.latents.dtype == torch.float16 and batch.log_probs.dtype == torch.float32  # half the bytes
    advantages = torch.tensor([1.0, -1.0])
    before = [p.detach().clone() for p in learner.params]
    # 1. a loss x 1e30 overflows fp16 in the backward pass: no step, no LR step, half the scale
    metrics = learner.update(batch, advantages)
    assert metrics["logprob_mismatch"] < 1e-5  # the fp16 learner recomputes the fp16 sampler's log-probs
    assert metrics["skipped_steps"] == 1 and metrics["loss_scale"] == 5e29
    assert all(torch.equal(p, b) for p, b in zip(learner.params, before))
    assert learner.lr_scheduler.last_epoch == 0 and not learner.optimizer.state
    # 2. at a scale fp16 can hold the step is taken, and after growth_interval=1 finite steps the scale doubles
    learner.scaler.scale = 2.0**16
    metrics = learner.update(batch, advantages)
    assert metrics["skipped_steps"] == 0 and metrics["loss_scale"] == 2.0**17
    assert all(torch.isfinite(p).all() for p in learner.params)
    assert any(not torch.equal(p, b) for p, b in zip(learner.params, before))
    assert learner.lr_scheduler.last_epoch == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # no loss scaler: the skip is the only guard
def test_a_step_with_non_finite_gradients_is_skipped_in_every_dtype(tiny_sd_dir, one_torch_thread, caplog, dtype):
    pipe = load_pipeline(tiny_sd_dir, dtype=dtype, device="cpu")
    learner = PPOLearner(pipe, tiny_config(tiny_sd_dir, f"model.dtype={dtype}", "train.warmup_steps=0",
                                           "train.clip_range=0.2", "train.learning_rate=1e-2", "lora.policy=both"))
    batch = sample_trajectories(learner.pipe, ["a red ball", "a cat"], [0, 1], num_steps=6, guidance_scale=5.0, eta=1.0)
    before = [p.detach().clone() for p in learner.params]
    with caplog.at_level("WARNING", logger="texforce"):
        metrics = learner.update(batch, torch.tensor([float("nan"), -1.0]))  # a NaN in the loss: NaN gradients
    assert metrics["skipped_steps"] == 1 and "gradients are not finite" in caplog.text
    assert all(torch.equal(p, b) for p, b in zip(learner.params, before))  # one NaN step made every weight NaN
    assert learner.lr_scheduler.last_epoch == 0 and not learner.optimizer.state
    metrics = learner.update(batch, torch.tensor([1.0, -1.0]))
    assert metrics["skipped_steps"] == 0 and learner.lr_scheduler.last_epoch == 1
    assert all(torch.isfinite(p).all() for p in learner.params)
    assert any(not torch.equal(p, b) for p, b in zip(learner.params, before))


def test_loss_scale_survives_a_checkpoint(tiny_sd_dir, tmp_path):
    learner = _fp16_learner(tiny_sd_dir)
    assert learner.scaler.scale == 65536.0
    learner.scaler.scale, learner.scaler.finite_steps = 1024.0, 7
    torch.save(learner.state_dict(), tmp_path / "learner.pt")
    resumed = _fp16_learner(tiny_sd_dir)
    resumed.load_state_dict(torch.load(tmp_path / "learner.pt", weights_only=True))  # plain tensors and numbers
    assert (resumed.scaler.scale, resumed.scaler.finite_steps) == (1024.0, 7)


def test_half_precision_latents_are_stored_as_sampled(tiny_sd_dir, one_torch_thread):
    """Latents kept in float16 (a half-precision pipeline's trajectories) against float32, same float32
    pipeline and seeds: the sampler rounds the chain as it samples and scores the rounded latents, so the
    learner recomputes its log-probs exactly; rounding afterwards would not (a last-step log-prob off
    by 0.007 here), and the PPO gradient stays float32's (bfloat16 storage: cosine 0.989)."""
    learner = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"),
                         tiny_config(tiny_sd_dir, "lora.policy=both", "sample.num_steps=6", "train.clip_range=10.0"))
    perturb_lora(learner.params)
    prompts, seeds = ["a red ball", "a blue car", "a cat"], [0, 1, 2]

    def sample(dtype):
        return sample_trajectories(learner.pipe, prompts, seeds, num_steps=6, guidance_scale=5.0, eta=1.0,
                                   latent_dtype=dtype)

    reference, stored = sample(torch.float32), sample(torch.float16)
    assert stored.latents.dtype == torch.float16 and stored.log_probs.dtype == torch.float32
    assert stored.latents.nbytes * 2 == reference.latents.nbytes
    relative = (stored.latents.float() - reference.latents).norm() / reference.latents.norm()
    assert 0 < relative < 1e-3  # the same chain, to float16's precision

    def mismatch(batch) -> torch.Tensor:  # per step, max over rows of |recomputed - stored log-prob|
        with torch.no_grad():
            cond = encode(learner.pipe.text_encoder, batch.prompt_ids)
            uncond = encode(learner.pipe.text_encoder, batch.negative_ids)
        recomputed = recomputed_log_probs(learner.pipe.unet, learner.schedule, batch, torch.arange(6).repeat(3, 1),
                                          cond, uncond, guidance_scale=5.0, eta=1.0)
        return (recomputed - batch.log_probs).abs().amax(dim=0)

    assert mismatch(stored).max() < 1e-5
    rounded_afterwards = dataclasses.replace(reference, latents=reference.latents.half())
    assert mismatch(rounded_afterwards)[-1] > 1e-3
    # the learner's PPO gradient on every step: float16-stored latents against float32 ones
    advantages = torch.tensor([1.0, -0.5, 0.3])
    steps = torch.arange(6).repeat(3, 1)
    gradients = []
    for batch in (reference, stored):
        learner.minibatch_backward(batch, advantages, steps)
        gradients.append([p.grad.clone() for p in learner.params])
        learner.optimizer.zero_grad(set_to_none=True)
    assert _cosine(gradients[1], gradients[0]) > 0.999


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float(a @ b / (a.norm() * b.norm()))


def test_half_precision_lora_gradients_match_float32_at_sd_latent_size(tiny_sd_dir, one_torch_thread):
    """SD 1.5's latent size: 256 px through the tiny VAE's 4x downsampling gives 4x64x64 latents.

    The log-prob is a mean over the 16384 latent dimensions, and the published setting trains
    25 steps per trajectory, each entering the loss with weight 1/25. Here one step enters with
    weight 1/25 (as one row of a 25-row optimizer step does), which sends the same per-element
    gradients through the fp16 U-Net at a 25th of the CPU time: fp16 convolutions and matmuls
    have no fast CPU kernels (~12 s per U-Net forward and backward at this size, bf16 ~1 s).
    """
    overrides = ("lora.policy=both", "sample.num_steps=10", "sample.height=256", "sample.width=256",
                 "train.clip_range=10.0", "train.max_grad_norm=1e6")
    reference = PPOLearner(load_pipeline(tiny_sd_dir, device="cpu"), tiny_config(tiny_sd_dir, *overrides))
    perturb_lora(reference.params)  # B != 0: both LoRA factors get gradients
    batch = sample_trajectories(reference.pipe, ["a red ball"], [0], num_steps=10, guidance_scale=5.0, eta=1.0,
                                height=256, width=256)
    assert batch.latents.shape[-3:] == (4, 64, 64)
    num_text_encoder = sum("lora_" in name for name, _ in reference.pipe.text_encoder.named_parameters())

    def step_gradient(learner) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The (text-encoder LoRA, U-Net LoRA) gradient the optimizer steps on: unscaled, in float32."""
        set_policy_weights(learner.pipe, reference.get_weights())
        recorded = []
        learner.optimizer.register_step_pre_hook(lambda *_: recorded.append([p.grad.clone() for p in learner.params]))
        learner.minibatch_backward(batch, torch.tensor([1.0]), torch.tensor([[6]]), 1 / 25)
        learner.optimizer_step()
        assert all(g.dtype == torch.float32 for g in recorded[0])
        return recorded[0][:num_text_encoder], recorded[0][num_text_encoder:]

    def half_learner(dtype, *extra):
        pipe = load_pipeline(tiny_sd_dir, dtype=dtype, device="cpu")
        return PPOLearner(pipe, tiny_config(tiny_sd_dir, *overrides, f"model.dtype={dtype}", *extra))

    def with_half_attention(learner):
        """The attention a GPU runs, in the half dtype (on the CPU `load_pipeline` computes it in float32)."""
        learner.pipe.unet.set_attn_processor(AttnProcessor2_0())
        return learner

    fp32 = step_gradient(reference)
    fp16_unscaled = step_gradient(half_learner("float16", "train.init_loss_scale=1"))
    fp16 = step_gradient(half_learner("float16"))
    bf16 = step_gradient(half_learner("bfloat16"))
    bf16_attention = step_gradient(with_half_attention(half_learner("bfloat16")))  # measured 0.9965 and more
    for part in (0, 1):  # text-encoder LoRA, U-Net LoRA
        # without loss scaling the per-element gradients underflow fp16 and the direction is lost
        assert _cosine(fp16_unscaled[part], fp32[part]) < 0.8
        for half in (fp16, bf16, bf16_attention):
            assert _cosine(half[part], fp32[part]) > 0.99
            norm = torch.cat([g.flatten() for g in half[part]]).norm() / torch.cat([g.flatten() for g in fp32[part]]).norm()
            assert abs(float(norm) - 1) < 0.05  # back to the float32 magnitude (unscaled)


class _RecordAttentionDtypes(TorchFunctionMode):
    """Records the query dtype of every scaled-dot-product attention that reaches PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_cpu_half_precision_attention_runs_in_float32(tiny_sd_dir, one_torch_thread):
    """PyTorch's CPU flash-attention backward in bfloat16 is ~8x slower than float32's at small head dims."""
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    for dtype, expected in (("bfloat16", torch.float32), ("float16", torch.float32), ("float32", torch.float32)):
        pipe = load_pipeline(tiny_sd_dir, dtype=dtype, device="cpu")
        wrapped = [isinstance(p, CpuFloat32AttentionProcessor) for p in pipe.unet.attn_processors.values()]
        assert all(wrapped) if dtype != "float32" else not any(wrapped)
        ids = pipe.tokenizer(["a red ball"] * 2, padding="max_length", return_tensors="pt").input_ids
        cond = encode(pipe.text_encoder, ids).detach().requires_grad_()
        recorder = _RecordAttentionDtypes()
        with recorder:
            eps = guided_noise_prediction(pipe.unet, x, t, cond, cond.detach(), 5.0)
        assert recorder.dtypes and set(recorder.dtypes) == {expected}
        assert len(recorder.dtypes) == len(wrapped)  # every attention module of one U-Net call
        eps.sum().backward()  # the backward goes through float32 attention too
        assert torch.isfinite(cond.grad).all() and cond.grad.abs().sum() > 0


def test_float32_cpu_attention_equals_the_upcast_product():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g).bfloat16() for _ in range(3))
    mask = torch.randn(6, 6, generator=g).bfloat16()  # additive, in the inputs' dtype as SDPA requires
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask.float()).bfloat16()
    with Float32CpuAttention():
        positional = F.scaled_dot_product_attention(q, k, v, mask)
        keyword = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        untouched = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert positional.dtype == torch.bfloat16
    assert torch.equal(positional, expected) and torch.equal(keyword, expected)
    assert torch.equal(untouched, F.scaled_dot_product_attention(q.float(), k.float(), v.float()))


def test_ppo_clipping_after_a_step_follows_the_policy_not_bfloat16_rounding(tmp_path, one_torch_thread):
    """After one real AdamW step (lr 3e-3, the demo's), every later minibatch's ratio differs from 1 by the step and by
    the half dtype's rounding. On the toy model the bfloat16 rounding exceeds the published clip_range (1e-4), so
    clipping follows it (the gradient points elsewhere); at rl.config's bfloat16 floor for clip_range the clipping
    and the gradient are float32's again, and in float16 too."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import ppo_ratio_precision

    from rl.config import BFLOAT16_MIN_CLIP_RANGE

    result = ppo_ratio_precision.main([
        "--config", str(root / "configs" / "tiny.yaml"), "--rows", "4", "--size", "64", "--threads", "1",
        "--clip-ranges", "1e-4", str(BFLOAT16_MIN_CLIP_RANGE), "--out", str(tmp_path / "ratio.json"),
        f"model.pretrained={root / 'models' / 'toy-sd'}", f"prompts.file={root / 'configs' / 'prompts_toy_train.txt'}",
        "train.warmup_steps=0",
    ])
    rows = result["dtypes"]
    assert rows["float32"]["error_max"] == 0
    assert rows["bfloat16"]["error_max"] > 1e-4  # why bf16 refuses the published clip_range (measured 1.7-1.9e-3)
    assert rows["float16"]["error_max"] < rows["bfloat16"]["error_max"] / 4  # 3 more mantissa bits (measured 8x)
    assert rows["bfloat16"]["clip"][1e-4]["cosine"] < 0.9  # measured 0.44: clipping on rounding
    for dtype in ("bfloat16", "float16"):
        at_floor = rows[dtype]["clip"][BFLOAT16_MIN_CLIP_RANGE]
        assert at_floor["clipfrac"] == rows["float32"]["clip"][BFLOAT16_MIN_CLIP_RANGE]["clipfrac"]
        assert at_floor["cosine"] > 0.995 and abs(at_floor["norm_ratio"] - 1) < 0.05


def test_half_precision_vae_decodes_the_float32_images(tiny_sd_dir, one_torch_thread):
    """On a GPU the images every reward scores (and a gradient learner backpropagates through) come from the
    half-precision VAE: within a few uint8 levels of float32's (measured: largest difference 1.0e-3 in float16,
    1.0e-2 in bfloat16, on this model and the toy model)."""
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = decode_latents(load_pipeline(tiny_sd_dir, device="cpu").vae, latents)
    for dtype, tolerance in [("float16", 3e-3), ("bfloat16", 3e-2)]:
        images = decode_latents(load_pipeline(tiny_sd_dir, dtype=dtype, device="cpu").vae, latents)
        assert images.dtype == torch.float32 and images.shape == reference.shape
        assert 0 < float((images - reference).abs().max()) < tolerance, dtype
