"""Model-based rewards, loaded from tiny random-weight models in the official file formats."""
from __future__ import annotations

import json
import math
import shutil
from typing import TYPE_CHECKING

import pytest
import torch
import torch.nn.functional as F

import rewards
from rewards import imagereward as ir
from rewards.checkpoint import read_state_dict
from rewards.openclip import openclip_config, openclip_to_hf
from rewards.preprocess import clip_preprocess

# The tiny official-format models (session fixture `tiny_reward_files`); imported as a plugin, not
# by name, so it is built once for all reward test files and pytest can still rewrite its asserts.
pytest_plugins = ("rewards_fixtures",)
if TYPE_CHECKING:
    from rewards_fixtures import TinyRewardFiles

MODEL_REWARDS = ["imagereward", "hpsv2", "hpsv2_1", "pickscore", "clip_score", "aesthetic"]
TEXT_CONDITIONED = ["imagereward", "hpsv2", "hpsv2_1", "pickscore", "clip_score"]
PROMPTS = ["a red ball on the grass", "a photo of a blue car", "a beautiful house", "a red ball on the grass"]


@pytest.fixture(scope="module")
def built(tiny_reward_files: TinyRewardFiles) -> dict[str, rewards.Reward]:
    return {name: rewards.build_reward(name, paths=tiny_reward_files.paths) for name in MODEL_REWARDS}


def _images(n=4, h=40, w=48, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- key mapping ---------------------------------------------------------------------------

def test_imagereward_keys_map_strictly(tiny_reward_files):
    path = tiny_reward_files.root / "imagereward" / "ImageReward.pt"
    state_dict = read_state_dict(path, what="ImageReward.pt")
    mapped = ir.map_imagereward_keys(state_dict, path=path)
    model = ir.load_imagereward_model(path, path.parent / "med_config.json")
    model.load_state_dict(mapped, strict=True)  # no missing or unexpected keys
    dropped = set(state_dict) - {k for k in state_dict if not ir._DROPPED.match(k)}
    assert dropped == {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                       "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}


@pytest.mark.parametrize("file", ["HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"])
def test_openclip_keys_map_strictly(tiny_reward_files, file):
    from rewards_fixtures import OPENCLIP
    from transformers import CLIPModel

    path = tiny_reward_files.root / "hps" / file
    state_dict = read_state_dict(path, what="HPS")
    config = openclip_config(state_dict, vision_head_width=80, text_head_width=64, hidden_act="gelu",
                             eos_token_id=1, bos_token_id=0, pad_token_id=1, path=path, what="HPS")
    assert config.vision_config.num_attention_heads == OPENCLIP["vision_width"] // 80
    assert config.vision_config.image_size == OPENCLIP["image"]
    CLIPModel(config).load_state_dict(openclip_to_hf(state_dict, path=path, what="HPS"), strict=True)
    # shapes no ViT-H-14 has: named before a model is built
    kwargs = {"eos_token_id": 1, "bos_token_id": 0, "pad_token_id": 1, "path": path, "what": "HPS"}
    with pytest.raises(ValueError, match=f"{path}: widths 160/64 are not multiples of the head widths 80/48 of HPS"):
        openclip_config(state_dict, vision_head_width=80, text_head_width=48, hidden_act="gelu", **kwargs)
    with pytest.raises(ValueError, match=f"{path}: visual.proj and text_projection project to different sizes"):
        openclip_config({**state_dict, "text_projection": state_dict["text_projection"][:, :16]}, vision_head_width=80,
                        text_head_width=64, hidden_act="gelu", **kwargs)


def test_hf_clip_directories_load_without_missing_keys(tiny_reward_files):
    from transformers import CLIPModel

    for key in ("pickscore", "clip_score"):
        _, info = CLIPModel.from_pretrained(tiny_reward_files.paths[key], output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


# --- the scorer contract ---------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_shape_gradient_and_batch_invariance(built, name):
    reward = built[name]
    assert reward.differentiable
    images = _images().requires_grad_()
    out = reward(images, PROMPTS)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()
    assert set(out.parts) == {name}
    out.scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with torch.no_grad():
        single = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]).scores for i in range(4)])
        again = reward(images, PROMPTS).scores
    torch.testing.assert_close(single, out.scores.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, out.scores.detach(), atol=0, rtol=0)
    assert out.scores[0] != out.scores[1]  # random weights still separate different inputs


@pytest.mark.parametrize("name", TEXT_CONDITIONED)
def test_text_conditioned_scores_depend_on_prompt(built, name):
    image = _images(1).expand(3, -1, -1, -1)
    scores = built[name](image, ["a red ball", "a photo of a blue car", "a cat"]).scores
    assert len(set(scores.tolist())) == 3


def test_aesthetic_ignores_prompt(built):
    image = _images(1).expand(2, -1, -1, -1)
    scores = built["aesthetic"](image, ["a red ball", "a cat"]).scores
    assert scores[0] == scores[1]


@pytest.mark.parametrize("name", ["hpsv2", "imagereward", "aesthetic"])
def test_low_precision_still_returns_float32(tiny_reward_files, built, name):
    """bfloat16 towers; ImageReward's and the aesthetic predictor's MLP heads run in float32, as the official code."""
    reward = rewards.build_reward(name, paths=tiny_reward_files.paths, dtype=torch.bfloat16)
    full = built[name]
    images = _images()
    low, ref = reward(images, PROMPTS).scores, full(images, PROMPTS).scores
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.05, rtol=0)


# --- parity with independent implementations of the official forward passes ------------------

def _mlp_head_reference(x, head, prefix=""):
    """The official heads' nn.Sequential (ImageReward's MLP, the aesthetic predictor's): its linear layers 0, 2, 4, 6
    and 7 in turn (the others are dropouts, off at inference)."""
    for index in (0, 2, 4, 6, 7):
        x = F.linear(x, head[f"{prefix}layers.{index}.weight"], head[f"{prefix}layers.{index}.bias"])
    return x


def _layer_norm_eps(module) -> set[float]:
    return {m.eps for m in module.modules() if isinstance(m, torch.nn.LayerNorm)}


def _openclip_block(x, sd, prefix, heads, mask):
    width = x.shape[-1]
    attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
    attn.load_state_dict({"in_proj_weight": sd[f"{prefix}.attn.in_proj_weight"],
                          "in_proj_bias": sd[f"{prefix}.attn.in_proj_bias"],
                          "out_proj.weight": sd[f"{prefix}.attn.out_proj.weight"],
                          "out_proj.bias": sd[f"{prefix}.attn.out_proj.bias"]})
    h = F.layer_norm(x, (width,), sd[f"{prefix}.ln_1.weight"], sd[f"{prefix}.ln_1.bias"])
    x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
    h = F.layer_norm(x, (width,), sd[f"{prefix}.ln_2.weight"], sd[f"{prefix}.ln_2.bias"])
    h = F.linear(F.gelu(F.linear(h, sd[f"{prefix}.mlp.c_fc.weight"], sd[f"{prefix}.mlp.c_fc.bias"])),
                 sd[f"{prefix}.mlp.c_proj.weight"], sd[f"{prefix}.mlp.c_proj.bias"])
    return x + h


def _openclip_reference_score(sd, pixels, ids):
    """OpenCLIP CLIP.encode_image / encode_text (nn.MultiheadAttention, as open_clip) + cosine."""
    from rewards_fixtures import OPENCLIP

    c = OPENCLIP
    vw, tw = c["vision_width"], c["text_width"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=c["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, vw), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (vw,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for b in range(c["vision_layers"]):
        x = _openclip_block(x, sd, f"visual.transformer.resblocks.{b}", vw // 80, None)
    image = F.layer_norm(x[:, 0], (vw,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]
    t = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for b in range(c["text_layers"]):
        t = _openclip_block(t, sd, f"transformer.resblocks.{b}", tw // 64, mask)
    t = F.layer_norm(t, (tw,), sd["ln_final.weight"], sd["ln_final.bias"])
    text = t[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return (F.normalize(image, dim=-1) * F.normalize(text, dim=-1)).sum(-1)


@pytest.mark.parametrize(("name", "file"), [("hpsv2", "HPS_v2_compressed.pt"), ("hpsv2_1", "HPS_v2.1_compressed.pt")])
def test_hps_matches_openclip_reference(built, tiny_reward_files, name, file):
    scorer = built[name].scorers[0]
    sd = read_state_dict(tiny_reward_files.root / "hps" / file, what="HPS")
    images = _images()
    ids = scorer.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = _openclip_reference_score(sd, clip_preprocess(images, 32, letterbox=True), ids)  # HPSv2 pads
        ours = built[name](images, PROMPTS).scores
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    # open_clip's LayerNorm eps (1e-5) everywhere: too small to show in the scores of these random weights
    assert _layer_norm_eps(scorer.clip) == {1e-5}


def _blip_reference_score(sd, pixels, ids, mask, med):
    """BLIP ViT (timm-style qkv, eps 1e-6) -> med.py BERT with cross-attention -> MLP, normalised."""
    v, t = "blip.visual_encoder", "blip.text_encoder"
    w = sd[f"{v}.patch_embed.proj.weight"].shape[0]
    patch = sd[f"{v}.patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], 1, w), x.flatten(2).transpose(1, 2)], 1) + sd[f"{v}.pos_embed"]
    heads = w // 64
    b = 0
    while f"{v}.blocks.{b}.norm1.weight" in sd:
        p = f"{v}.blocks.{b}"
        h = F.layer_norm(x, (w,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[f"{p}.attn.qkv.weight"], sd[f"{p}.attn.qkv.bias"])
        q, k, val = qkv.reshape(x.shape[0], x.shape[1], 3, heads, w // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (w // heads) ** -0.5).softmax(-1) @ val
        x = x + F.linear(a.transpose(1, 2).reshape_as(x), sd[f"{p}.attn.proj.weight"], sd[f"{p}.attn.proj.bias"])
        h = F.layer_norm(x, (w,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
                     sd[f"{p}.mlp.fc2.weight"], sd[f"{p}.mlp.fc2.bias"])
        x = x + h
        b += 1
    image = F.layer_norm(x, (w,), sd[f"{v}.norm.weight"], sd[f"{v}.norm.bias"], eps=1e-6)

    hid, nh, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]

    def ln(y, name):
        return F.layer_norm(y, (hid,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=eps)

    def attention(prefix, hidden, context, add_mask):
        def split(y):
            return y.reshape(y.shape[0], y.shape[1], nh, hid // nh).transpose(1, 2)
        q = split(F.linear(hidden, sd[f"{prefix}.self.query.weight"], sd[f"{prefix}.self.query.bias"]))
        k = split(F.linear(context, sd[f"{prefix}.self.key.weight"], sd[f"{prefix}.self.key.bias"]))
        val = split(F.linear(context, sd[f"{prefix}.self.value.weight"], sd[f"{prefix}.self.value.bias"]))
        a = ((q @ k.transpose(-2, -1)) / math.sqrt(hid // nh) + add_mask).softmax(-1) @ val
        a = a.transpose(1, 2).reshape(hidden.shape)
        return ln(F.linear(a, sd[f"{prefix}.output.dense.weight"], sd[f"{prefix}.output.dense.bias"]) + hidden,
                  f"{prefix}.output.LayerNorm")

    h = sd[f"{t}.embeddings.word_embeddings.weight"][ids] + sd[f"{t}.embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(h, f"{t}.embeddings.LayerNorm")
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for layer in range(med["num_hidden_layers"]):
        p = f"{t}.encoder.layer.{layer}"
        a = attention(f"{p}.attention", h, h, self_mask)
        a = attention(f"{p}.crossattention", a, image, 0.0)
        i = F.gelu(F.linear(a, sd[f"{p}.intermediate.dense.weight"], sd[f"{p}.intermediate.dense.bias"]))
        h = ln(F.linear(i, sd[f"{p}.output.dense.weight"], sd[f"{p}.output.dense.bias"]) + a, f"{p}.output.LayerNorm")
    r = _mlp_head_reference(h[:, 0], sd, prefix="mlp.")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072  # ImageReward.py's mean and std


def test_imagereward_matches_official_forward(built, tiny_reward_files):
    scorer = built["imagereward"].scorers[0]
    folder = tiny_reward_files.root / "imagereward"
    sd = read_state_dict(folder / "ImageReward.pt", what="ImageReward.pt")
    med = json.loads((folder / "med_config.json").read_text())
    images = _images()
    prompts = [*PROMPTS[:3], " ".join(["a red ball on the grass with a blue car"] * 5)]  # 45 words: cut at 35 tokens
    tokens = scorer.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        ref = _blip_reference_score(sd, clip_preprocess(images, 32), tokens.input_ids, tokens.attention_mask, med)
        ours = built["imagereward"](images, prompts).scores
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # the LayerNorm eps of BLIP's ViT (1e-6) and of med_config.json: too small to show in these random weights' scores
    assert _layer_norm_eps(scorer.model.visual_encoder) == {1e-6}
    assert _layer_norm_eps(scorer.model.text_encoder) == {med["layer_norm_eps"]}


def test_parity_with_image_reward_package(built, tiny_reward_files):
    """Runs only where the official `image-reward` package imports (it does not with transformers 5)."""
    try:
        from ImageReward.ImageReward import MLP
        from ImageReward.models.BLIP.med import BertConfig, BertModel
        from ImageReward.models.BLIP.vit import VisionTransformer
    except Exception as err:  # noqa: BLE001 - any import failure means the package is unusable here
        reason = f"image-reward package not importable here ({type(err).__name__}: {err})"
        print(reason)
        pytest.skip(reason)
    folder = tiny_reward_files.root / "imagereward"
    sd = read_state_dict(folder / "ImageReward.pt", what="ImageReward.pt")
    config = BertConfig.from_json_file(str(folder / "med_config.json"))
    config.encoder_width = 64
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1).eval()
    bert = BertModel(config=config, add_pooling_layer=False).eval()
    vit.load_state_dict({k[len("blip.visual_encoder."):]: v for k, v in sd.items() if k.startswith("blip.visual_encoder.")})
    bert.load_state_dict({k[len("blip.text_encoder."):]: v for k, v in sd.items() if k.startswith("blip.text_encoder.")})
    mlp = MLP(json.loads((folder / "med_config.json").read_text())["hidden_size"])
    mlp.layers = ir.linear_stack_from_state_dict(
        {k[4:]: v for k, v in sd.items() if k.startswith("mlp.")}, path=folder, what="mlp").layers
    scorer = built["imagereward"].scorers[0]
    images = _images()
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        embeds = vit(clip_preprocess(images, 32))
        text = bert(tokens.input_ids, attention_mask=tokens.attention_mask, encoder_hidden_states=embeds,
                    encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long), return_dict=True)
        ref = (mlp(text.last_hidden_state[:, 0]).squeeze(-1) - ir.SCORE_MEAN) / ir.SCORE_STD
        ours = built["imagereward"](images, PROMPTS).scores
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_aesthetic_matches_the_improved_aesthetic_predictor(built, tiny_reward_files):
    """simple_inference.py: CLIP's image features (resize, centre crop, CLIP normalisation), L2-normalised, through
    the linear layers of the head."""
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_reward_files.paths["aesthetic_clip"]).eval()
    head = torch.load(tiny_reward_files.paths["aesthetic"], weights_only=True)
    images = _images()
    with torch.no_grad():
        features = clip.get_image_features(pixel_values=clip_preprocess(images, 32)).pooler_output
        x = _mlp_head_reference(features / features.norm(dim=-1, keepdim=True), head)
        ours = built["aesthetic"](images, PROMPTS).scores
    torch.testing.assert_close(ours, x.squeeze(-1), atol=1e-5, rtol=1e-5)


# --- clear errors ----------------------------------------------------------------------------

def _paths(files: TinyRewardFiles, **overrides) -> dict[str, str]:
    paths = dict(files.paths)
    for key, value in overrides.items():
        if value is None:
            paths.pop(key, None)
        else:
            paths[key] = str(value)
    return paths


def test_missing_checkpoint_says_what_to_download(tiny_reward_files, tmp_path, monkeypatch):
    monkeypatch.delenv("TEXFORCE_IMAGEREWARD", raising=False)
    with pytest.raises(FileNotFoundError, match=r"no path given for 'imagereward': provide ImageReward.pt from "
                                                r"THUDM/ImageReward.*reward\.paths\.imagereward=PATH"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward=None))
    with pytest.raises(FileNotFoundError, match=f"'hpsv2' not found at {tmp_path}/HPS_v2_compressed.pt: "
                                                "provide HPS_v2_compressed.pt from xswu/HPSv2"):
        rewards.build_reward("hpsv2", paths=_paths(tiny_reward_files, hpsv2=tmp_path))
    with pytest.raises(FileNotFoundError, match=f"'hpsv2_1' not found at {tmp_path}/HPS_v2.1_compressed.pt: "
                                                "provide HPS_v2.1_compressed.pt from xswu/HPSv2"):
        rewards.build_reward("hpsv2_1", paths=_paths(tiny_reward_files, hpsv2_1=tmp_path))


def test_missing_med_config_is_named(tiny_reward_files, tmp_path):
    shutil.copy(tiny_reward_files.root / "imagereward" / "ImageReward.pt", tmp_path / "ImageReward.pt")
    with pytest.raises(FileNotFoundError, match=f"'imagereward_med_config' not found at {tmp_path}/med_config.json"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward=tmp_path / "ImageReward.pt"))


def test_a_bad_med_config_or_no_room_for_blips_tokens_is_named(tiny_reward_files, tmp_path):
    """med_config.json that is not JSON or lacks a size, or a checkpoint whose embedding has no row for the [DEC] and
    [ENC] tokens BLIP adds to the BERT vocabulary: each a one-line error naming the file, not a traceback."""
    from transformers import BertTokenizer

    folder = tiny_reward_files.root / "imagereward"
    sd = read_state_dict(folder / "ImageReward.pt", what="ImageReward.pt")
    med = json.loads((folder / "med_config.json").read_text())
    ckpt, config = tmp_path / "ImageReward.pt", tmp_path / "med_config.json"
    torch.save(sd, ckpt)
    config.write_text("<html>Not Found</html>")
    with pytest.raises(rewards.RewardFileError, match=f"{config} is not JSON; provide med_config.json from THUDM"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward=ckpt))
    config.write_text(json.dumps({k: v for k, v in med.items() if k != "vocab_size"}))
    with pytest.raises(rewards.RewardFileError, match=f"{config} lacks \\['vocab_size'\\]; provide med_config.json"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward=ckpt))
    words = len(BertTokenizer.from_pretrained(str(tiny_reward_files.bert_tokenizer)))
    key = "blip.text_encoder.embeddings.word_embeddings.weight"
    torch.save({**sd, key: sd[key][:words + 1]}, ckpt)  # room for one of the two
    config.write_text(json.dumps({**med, "vocab_size": words + 1}))
    with pytest.raises(rewards.RewardFileError, match=f"has {words + 2} tokens with \\[DEC\\]/\\[ENC\\] but {config} "
                                                      f"embeds {words + 1}"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward=ckpt))


def test_safetensors_or_text_where_pt_expected(tiny_reward_files, tmp_path):
    from safetensors.torch import save_file

    fake = tmp_path / "HPS_v2_compressed.pt"
    save_file({"x": torch.zeros(2)}, str(fake))
    with pytest.raises(ValueError, match=f"{fake} is not a PyTorch checkpoint \\(looks like safetensors\\); "
                                         "expected an HPSv2 checkpoint"):
        rewards.build_reward("hpsv2", paths=_paths(tiny_reward_files, hpsv2=fake))
    fake.write_text("<html>Not Found</html>")
    with pytest.raises(ValueError, match="looks like HTML"):
        rewards.build_reward("hpsv2", paths=_paths(tiny_reward_files, hpsv2=fake))
    fake.write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match="looks like text"):
        rewards.build_reward("hpsv2", paths=_paths(tiny_reward_files, hpsv2=fake))


def test_pickle_with_code_is_refused(tiny_reward_files, tmp_path):
    fake = tmp_path / "ImageReward.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, fake)  # a pickled module, not a state dict
    shutil.copy(tiny_reward_files.root / "imagereward" / "med_config.json", tmp_path)
    with pytest.raises(ValueError, match=f"could not read {fake} as a weights-only PyTorch checkpoint"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward=fake))


def test_wrong_keys_are_named(tiny_reward_files, tmp_path):
    ckpt = tiny_reward_files.root / "hps" / "HPS_v2_compressed.pt"
    sd = read_state_dict(ckpt, what="HPS")
    wrong = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": {**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(160)}}, wrong)
    with pytest.raises(ValueError, match=f"{wrong} has keys that do not belong to .*resblocks.0.ls_1.gamma"):
        rewards.build_reward("hpsv2", paths=_paths(tiny_reward_files, hpsv2=wrong))
    torch.save({"layers.0.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(ValueError, match=f"{wrong} does not look like .*missing keys .*visual.class_embedding"):
        rewards.build_reward("hpsv2", paths=_paths(tiny_reward_files, hpsv2=wrong))
    # an ImageReward checkpoint with a layer renamed (e.g. another BLIP variant)
    ir_sd = read_state_dict(tiny_reward_files.root / "imagereward" / "ImageReward.pt", what="ImageReward")
    ir_sd["blip.visual_encoder.blocks.0.attn.qkv_extra.weight"] = ir_sd.pop("blip.visual_encoder.blocks.0.attn.qkv.weight")
    torch.save(ir_sd, tmp_path / "ImageReward.pt")
    shutil.copy(tiny_reward_files.root / "imagereward" / "med_config.json", tmp_path)
    with pytest.raises(ValueError, match="do not belong to .*blocks.0.attn.qkv_extra.weight"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward=tmp_path))


def test_aesthetic_head_for_a_different_clip(tiny_reward_files, tmp_path):
    from rewards_fixtures import head_state_dict

    head = tmp_path / "head.pth"
    torch.save(head_state_dict(torch.Generator().manual_seed(0), 768), head)
    with pytest.raises(ValueError, match="takes 768-d embeddings but the CLIP model .* projects to 24"):
        rewards.build_reward("aesthetic", paths=_paths(tiny_reward_files, aesthetic=head))


def test_missing_or_useless_tokenizer(tiny_reward_files, tmp_path, monkeypatch):
    monkeypatch.delenv("TEXFORCE_IMAGEREWARD_TOKENIZER", raising=False)
    with pytest.raises(FileNotFoundError, match="no path given for 'imagereward_tokenizer': provide a "
                                                "bert-base-uncased tokenizer directory"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward_tokenizer=None))
    with pytest.raises(FileNotFoundError, match=f"no BERT tokenizer in {tmp_path} \\(expected vocab.txt or "
                                                "tokenizer.json\\)"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward_tokenizer=tmp_path))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match="has only 5 tokens"):
        rewards.build_reward("imagereward", paths=_paths(tiny_reward_files, imagereward_tokenizer=tmp_path))
    # PickScore's model directory ships no tokenizer: without pickscore_tokenizer it must say so
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer in .*PickScore_v1.*pickscore_tokenizer"):
        rewards.build_reward("pickscore", paths=_paths(tiny_reward_files, pickscore_tokenizer=None))


def test_not_a_clip_directory(tiny_reward_files, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} has no config.json: 'clip_score' must be a "
                                                "transformers CLIPModel directory"):
        rewards.build_reward("clip_score", paths=_paths(tiny_reward_files, clip_score=tmp_path))


def test_an_unusable_model_file_is_a_reward_file_error_naming_the_reward(tiny_reward_files, tmp_path):
    """A builder's ValueError (a file of the wrong kind) becomes a RewardFileError, the user error the command
    line prints as one line; left a ValueError, it is a traceback."""
    fake = tmp_path / "HPS_v2_compressed.pt"
    fake.write_text("<html>Not Found</html>")
    with pytest.raises(rewards.RewardFileError) as error:
        rewards.build_reward("hpsv2", paths=_paths(tiny_reward_files, hpsv2=fake))
    assert str(error.value) == (
        f"reward 'hpsv2': {fake} is not a PyTorch checkpoint (looks like HTML/XML text (a web page saved instead of the "
        "file?)); expected an HPSv2 checkpoint (HPS_v2_compressed.pt from xswu/HPSv2 on the Hugging Face hub), a file "
        "written by torch.save")
