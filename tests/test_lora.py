"""LoRA I/O: diffusers-format safetensors that `load_lora_weights` reproduces exactly."""
import pytest
import torch
from safetensors import safe_open

from rl.config import LoraSettings
from rl.lora import add_lora, get_policy_weights, save_lora, set_policy_weights
from rl.models import load_pipeline
from rl.sampling import encode, tokenize


def _perturb(params):
    with torch.no_grad():
        for i, p in enumerate(params):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))


def test_lora_starts_as_identity_with_zero_A_grads(pipe):
    ids = tokenize(pipe.tokenizer, ["a red ball"])
    base = encode(pipe.text_encoder, ids)
    params = add_lora(pipe, LoraSettings(rank=4, alpha=4))
    assert len(params) == 2 * 4 * 2  # 2 layers x (q,k,v,out) x (A,B)
    out = encode(pipe.text_encoder, ids)
    torch.testing.assert_close(out, base)
    out.sum().backward()
    named = {n: p for n, p in pipe.text_encoder.named_parameters() if "lora_" in n}
    assert all(p.grad.abs().sum() == 0 for n, p in named.items() if "lora_A" in n)  # B = 0 at init
    assert any(p.grad.abs().sum() > 0 for n, p in named.items() if "lora_B" in n)


@pytest.mark.parametrize("policy", ["text_encoder", "both"])
def test_saved_lora_loads_with_load_lora_weights(pipe, tiny_sd_dir, tmp_path, policy):
    settings = LoraSettings(policy=policy, rank=4, alpha=8)  # scale alpha/r = 2
    params = add_lora(pipe, settings)
    _perturb(params)
    ids = tokenize(pipe.tokenizer, ["a photo of a blue car", ""])
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        text_out = encode(pipe.text_encoder, ids)
        unet_out = pipe.unet(x, t, encoder_hidden_states=text_out).sample
    path = save_lora(get_policy_weights(pipe, policy, version=1), settings, tmp_path / "lora")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith(("text_encoder.", "unet.")) for k in keys)
    assert any(k.startswith("unet.") for k in keys) == (policy == "both")

    fresh = load_pipeline(tiny_sd_dir, device="cpu")
    fresh.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        text_loaded = encode(fresh.text_encoder, ids)
        unet_loaded = fresh.unet(x, t, encoder_hidden_states=text_loaded).sample
    torch.testing.assert_close(text_loaded, text_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(unet_loaded, unet_out, rtol=0, atol=1e-5)
    assert not torch.allclose(text_out, encode(load_pipeline(tiny_sd_dir, device="cpu").text_encoder, ids))


def test_policy_weights_move_between_pipelines(pipe, tiny_sd_dir):
    params = add_lora(pipe, LoraSettings(rank=4, alpha=4))
    _perturb(params)
    weights = get_policy_weights(pipe, "text_encoder", version=3)
    other = load_pipeline(tiny_sd_dir, device="cpu")
    add_lora(other, LoraSettings(rank=4, alpha=4))
    set_policy_weights(other, weights)
    ids = tokenize(pipe.tokenizer, ["a cat"])
    torch.testing.assert_close(encode(other.text_encoder, ids), encode(pipe.text_encoder, ids))
    assert weights.version == 3 and weights.unet is None and weights.num_bytes() > 0


def test_wrong_rank_is_a_clear_error(pipe, tiny_sd_dir):
    add_lora(pipe, LoraSettings(rank=4, alpha=4))
    weights = get_policy_weights(pipe, "text_encoder", version=0)
    other = load_pipeline(tiny_sd_dir, device="cpu")
    add_lora(other, LoraSettings(rank=8, alpha=8))
    with pytest.raises(ValueError, match="shape mismatch.*lora.rank"):
        set_policy_weights(other, weights)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_lora_stays_float32_on_a_half_precision_model(tiny_sd_dir, dtype):
    pipe = load_pipeline(tiny_sd_dir, dtype=dtype, device="cpu")
    params = add_lora(pipe, LoraSettings(policy="both", rank=4, alpha=4))
    assert all(p.dtype == torch.float32 for p in params)  # master weights; AdamW state follows them
    _perturb(params)
    text = encode(pipe.text_encoder, tokenize(pipe.tokenizer, ["a red ball"]))
    x = torch.randn(1, 4, 16, 16, dtype=pipe.unet.dtype)
    out = pipe.unet(x, torch.tensor([500]), encoder_hidden_states=text).sample
    # peft casts each LoRA input to float32 and the layer output back to the frozen weights' dtype
    assert text.dtype == out.dtype == getattr(torch, dtype)
    out.float().square().mean().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in params)
