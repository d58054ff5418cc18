"""The tiny pipeline is a real diffusers directory; loading fails fast with a useful message."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from rl.models import ModelNotFoundError, load_pipeline
from toyworld.tiny import build_tiny_pipeline, make_tiny


def test_make_tiny_cli_writes_a_loadable_pipeline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    texforce = Path(sys.executable).with_name("texforce")
    cmd = [str(texforce)] if texforce.exists() else [sys.executable, "-m", "rl.cli"]
    out = subprocess.run(cmd + ["make-tiny", str(tmp_path / "tiny-sd")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torchvision" not in out.stderr, out.stderr  # transformers' advice would replace the pinned torch
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "tiny-sd"))
    assert len(pipe.tokenizer) > 256
    assert pipe.tokenizer.tokenize("a red ball") == ["a</w>", "red</w>", "ball</w>"]
    image = pipe("a red ball", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3)


def test_tiny_pipeline_is_deterministic_from_seed():
    a, b, c = build_tiny_pipeline(3), build_tiny_pipeline(3), build_tiny_pipeline(4)
    wa, wb, wc = (next(p.unet.parameters()) for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_make_tiny_pretrains_on_the_scene_set_it_is_given(tmp_path, monkeypatch):
    import toyworld.pretrain
    from toyworld.captions import all_combinations, train_combinations

    seen = []
    monkeypatch.setattr(toyworld.pretrain, "pretrain_tiny", lambda pipe, **kw: seen.append(kw) or {})
    make_tiny(tmp_path / "train", pretrain_steps=9, scenes="train")
    make_tiny(tmp_path / "all", pretrain_steps=9, vae_steps=5)
    assert [kw["combinations"] for kw in seen] == [train_combinations(), all_combinations()]
    assert seen[0]["vae_steps"] == 3 and seen[0]["unet_steps"] == 6
    assert seen[1]["vae_steps"] == 5 and seen[1]["unet_steps"] == 4  # --vae-steps 5 of 9


def test_the_toy_tokenizer_spells_any_text_without_unknown_tokens():
    """Its byte alphabet is CLIP's: every byte of any string is a token, none becomes <|endoftext|> (unknown)."""
    from toyworld.tiny import toy_tokenizer

    tokenizer = toy_tokenizer()
    text = "".join(map(chr, range(ord("!"), 0x100))) + " a red ball, ¬ ünïcödé ☃ 猫"
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
    assert len(ids) > 200 and tokenizer.unk_token_id not in ids


def test_the_tiny_pipeline_has_stable_diffusions_noise_schedule(tiny_sd_dir):
    """SD 1.x's scheduler_config.json: scaled-linear betas from 0.00085 to 0.012 over 1000 steps, steps_offset 1,
    set_alpha_to_one false, no clipping: 50 DDIM steps run 981, 961, ..., 1."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(981, 0, -20))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(scheduler.alphas_cumprod, torch.cumprod(1 - betas, 0).float())
    assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0] and not scheduler.config.clip_sample


def test_missing_directory_with_hub_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not a local directory and HF_HUB_OFFLINE"):
        load_pipeline("runwayml/stable-diffusion-v1-5")


def test_directory_without_model_index_or_component(tmp_path, tiny_sd_dir):
    (tmp_path / "README.md").write_text("not a pipeline")
    with pytest.raises(ModelNotFoundError, match="no model_index.json.*make-tiny"):
        load_pipeline(str(tmp_path))
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelNotFoundError, match="missing the 'unet' component"):
        load_pipeline(str(broken))


def test_loaded_pipeline_is_frozen_with_ddim(pipe):
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
