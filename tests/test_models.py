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
    make_tiny(tmp_path / "all", pretrain_steps=9)
    assert [kw["combinations"] for kw in seen] == [train_combinations(), all_combinations()]
    assert seen[0]["vae_steps"] == 3 and seen[0]["unet_steps"] == 6


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
