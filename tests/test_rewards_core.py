"""The reward contract, registry, composite, finiteness report and weight-free rewards."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import color, jpeg, preprocess
from rewards.base import Reward, RewardOutput
from rewards.files import FileSpec
from rewards.registry import RewardEntry, register

REPO = Path(__file__).resolve().parents[1]


# --- registry -------------------------------------------------------------------------------

def test_unknown_name_lists_valid_ones():
    with pytest.raises(rewards.RewardSpecError, match="valid rewards: .*color_alignment.*imagereward"):
        rewards.build_reward("imagerewrd")


def test_duplicate_registration_is_an_error():
    entry = rewards.get_entry("brightness")
    with pytest.raises(ValueError, match="already registered"):
        register(RewardEntry("brightness", entry.build, True, (), "again"))


def test_entries_carry_metadata():
    entries = {e.name: e for e in rewards.list_entries()}
    assert {"imagereward", "hpsv2", "hpsv2_1", "pickscore", "aesthetic", "clip_score", "jpeg_compressibility",
            "jpeg_incompressibility", "color_alignment", "brightness", "face_quality"} <= set(entries)
    assert entries["imagereward"].differentiable and not entries["jpeg_compressibility"].differentiable
    assert [f.key for f in entries["imagereward"].files] == [
        "imagereward", "imagereward_med_config", "imagereward_tokenizer"]
    assert entries["color_alignment"].files == ()
    assert all(e.description for e in entries.values())


@pytest.mark.parametrize("spec, match", [
    ("brightness:x", "weight 'x' of 'brightness' in spec 'brightness:x' is not a number"),
    ("brightness,brightness:2", "appears twice"),
    ("brightness,,color_alignment", "empty reward"),
    ("nope:1", "unknown reward 'nope'"),
    (":1", "':1' in spec ':1' names no reward"),
    ("brightness:nan", "weight 'nan' of 'brightness' in spec 'brightness:nan' must be a finite number"),
    ("brightness:1,color_alignment:-inf", "weight '-inf' of 'color_alignment' .* must be a finite number"),
])
def test_bad_specs(spec, match):
    with pytest.raises(rewards.RewardSpecError, match=match):
        rewards.parse_spec(spec)


def test_a_missing_weight_is_an_error_and_a_negative_one_keeps_its_sign():
    """`brightness:` is a weight left out, not weight 1; a negative weight penalises its part (minus a JPEG size),
    and spaces around a name or a weight are the writer's layout."""
    with pytest.raises(rewards.RewardSpecError, match="^" + re.escape(
            "weight '' of 'brightness' in spec 'brightness:' is not a number; write e.g. "
            "'imagereward:1.0,aesthetic:0.5'") + "$"):
        rewards.parse_spec("brightness:")
    assert rewards.parse_spec("brightness:-0.5, color_alignment : 2") == [("brightness", -0.5), ("color_alignment", 2.0)]


def test_a_reward_name_a_spec_cannot_spell_is_not_registered(monkeypatch):
    """`a:b` or `a,b` would be split by parse_spec: such a reward could never be asked for."""
    from rewards import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # a wrongly accepted entry stays here
    entry = rewards.get_entry("brightness")
    for name in ("bright:ness", "bright,ness", "bright ness"):
        with pytest.raises(ValueError, match="^" + re.escape(
                f"reward name {name!r} must be letters, digits and underscores") + "$"):
            register(RewardEntry(name, entry.build, True, (), "a name no spec can spell"))


def test_a_build_error_names_the_reward(monkeypatch):
    """Built without a check first (the Python API, a reward actor), a missing file must still say which reward of a
    composite spec needs it."""
    monkeypatch.delenv("TEXFORCE_AESTHETIC", raising=False)
    with pytest.raises(rewards.RewardFileError) as error:
        rewards.build_reward("brightness,aesthetic", paths={})
    assert str(error.value) == (
        "reward 'aesthetic': no path given for 'aesthetic': provide sac+logos+ava1-l14-linearMSE.pth from "
        "christophschuhmann/improved-aesthetic-predictor; set reward.paths.aesthetic=PATH in the training config "
        "(--paths aesthetic=PATH for score, eval and tune) or TEXFORCE_AESTHETIC=PATH in the environment")


def test_a_paths_key_no_reward_of_several_specs_reads_is_named_in_the_plural():
    with pytest.raises(rewards.RewardError, match="^" + re.escape(
            "no reward of 'brightness' or 'color_alignment' reads a file under the key 'foo'; they read no files: "
            "drop the key") + "$"):
        rewards.check_path_keys({"foo": "/x"}, ["brightness", "color_alignment"])
    with pytest.raises(rewards.RewardError, match="^" + re.escape(
            "no reward of 'brightness' or 'aesthetic' reads a file under the key 'foo'; their keys are aesthetic, "
            "aesthetic_clip") + "$"):
        rewards.check_path_keys({"foo": "/x"}, ["brightness", "aesthetic"])


def test_check_reward_finds_missing_files_without_building(tmp_path, monkeypatch):
    for key in ("AESTHETIC", "AESTHETIC_CLIP", "MEDIAPIPE_PYTHON"):
        monkeypatch.delenv(f"TEXFORCE_{key}", raising=False)
    assert rewards.check_reward("brightness:2,color_alignment") == [("brightness", 2.0), ("color_alignment", 1.0)]
    with pytest.raises(rewards.RewardFileError, match=r"reward 'aesthetic': no path given for 'aesthetic': provide .*; "
                                                      r"set reward\.paths\.aesthetic=PATH in the training config"):
        rewards.check_reward("brightness,aesthetic:0.5")
    head = tmp_path / "head.pth"
    head.write_bytes(b"not loaded by the check")
    with pytest.raises(rewards.RewardFileError, match=f"'aesthetic_clip' not found at {tmp_path}/clip"):
        rewards.check_reward("aesthetic", paths={"aesthetic": str(head), "aesthetic_clip": str(tmp_path / "clip")})
    (tmp_path / "clip").mkdir()
    rewards.check_reward("aesthetic", paths={"aesthetic": str(head), "aesthetic_clip": str(tmp_path / "clip")})
    rewards.check_reward("face_quality")  # its interpreter is optional: mediapipe may import where it runs
    with pytest.raises(rewards.RewardFileError, match="'mediapipe_python' not found"):
        rewards.check_reward("face_quality", paths={"mediapipe_python": str(tmp_path / "python")})


def test_a_paths_key_no_reward_reads_is_named_with_the_closest_one(tiny_sd_dir, tmp_path):
    from conftest import tiny_config

    from rl.preflight import preflight

    with pytest.raises(rewards.RewardError, match=r"no reward reads a file under the key 'aestetic' \(did you mean "
                                                  r"'aesthetic'\?\); `texforce rewards list` shows each reward's keys"):
        rewards.check_path_keys({"aestetic": "/x"}, None)
    # the keys of every reward: another reward's key is not an error there
    rewards.check_path_keys({"imagereward": "/x"}, None)
    with pytest.raises(rewards.RewardError, match=r"no reward of 'aesthetic' reads a file under the key 'imagereward';"
                                                  r" its keys are aesthetic, aesthetic_clip$"):
        rewards.check_path_keys({"imagereward": "/x"}, ["aesthetic"])
    with pytest.raises(rewards.RewardError, match="no reward of 'brightness' reads a file under the key 'foo'; it "
                                                  "reads no files: drop the key"):
        rewards.check_path_keys({"foo": "/x"}, ["brightness"])
    assert rewards.check_reward("brightness", paths={"foo": "/x"}) == [("brightness", 1.0)]  # the keys: not its job
    with pytest.raises(rewards.RewardError, match="the key 'aestetic'"):  # `texforce train` checks with preflight
        preflight(tiny_config(tiny_sd_dir, "reward.spec=brightness", "reward.paths.aestetic=/x"))
    # train: a key read by neither reward.spec nor evaluation.reward is named; one the evaluation's reward reads is not
    with pytest.raises(rewards.RewardError, match=r"^no reward of 'brightness' reads a file under the key "
                                                  r"'aesthetic'; it reads no files: drop the key$"):
        preflight(tiny_config(tiny_sd_dir, "reward.spec=brightness", f"reward.paths.aesthetic={tmp_path}"))
    (tmp_path / "head.pth").write_bytes(b"")
    preflight(tiny_config(tiny_sd_dir, "reward.spec=brightness", "evaluation.reward=aesthetic",
                          f"reward.paths.aesthetic={tmp_path / 'head.pth'}", f"reward.paths.aesthetic_clip={tmp_path}"))


def test_import_is_cheap_and_ray_free():
    code = ("import sys, rewards; heavy = [m for m in ('ray', 'transformers', 'diffusers', 'mediapipe') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for source in (REPO / "rewards").rglob("*.py"):
        text = source.read_text()
        assert "import ray" not in text and "from ray" not in text, source


# --- composite and finiteness -------------------------------------------------------------

def test_composite_reports_parts_and_weighted_sum():
    reward = rewards.build_reward("color_alignment:1.0,brightness:0.5,jpeg_compressibility:0.01")
    images = torch.rand(3, 3, 24, 24)
    prompts = ["a red ball", "a blue car", "a dog"]
    out = reward(images, prompts)
    assert set(out.parts) == {"color_alignment", "brightness", "jpeg_compressibility"}
    expected = out.parts["color_alignment"] + 0.5 * out.parts["brightness"] + 0.01 * out.parts["jpeg_compressibility"]
    torch.testing.assert_close(out.scores, expected)
    assert out.scores.shape == (3,)
    assert reward.name == "color_alignment:1,brightness:0.5,jpeg_compressibility:0.01"
    assert not reward.differentiable  # jpeg is not
    assert rewards.build_reward("color_alignment,brightness").differentiable


class _Const:
    differentiable = True

    def __init__(self, name, values):
        self.name, self.values = name, torch.tensor(values)

    def __call__(self, images, prompts):
        return self.values


def test_non_finite_scores_are_kept_and_named():
    reward = Reward([_Const("a", [1.0, float("nan"), 3.0]), _Const("b", [0.0, 1.0, float("inf")])], [1.0, 2.0])
    out = reward(torch.zeros(3, 3, 8, 8), ["x", "y", "z"])
    assert torch.isnan(out.scores[1]) and torch.isinf(out.scores[2])  # not averaged away
    report = rewards.check_finite(out)
    assert not report.ok
    assert report.mask.tolist() == [True, False, False]
    assert report.bad == {"a": [1], "b": [2], "scores": [1, 2]}
    assert "a at samples [1]" in str(report) and "b at samples [2]" in str(report)
    assert rewards.check_finite(RewardOutput(torch.ones(2), {"a": torch.ones(2)})).ok


@pytest.mark.parametrize("spec", ["jpeg_compressibility", "object_alignment", "color_alignment", "brightness"])
def test_a_non_finite_image_has_no_score(spec):
    """A diverged sample's image (NaN out of the VAE) is no picture: JPEG size and the colour readers would score
    what NaN turns into (black, or 0 weight) as one. Its score and every part are NaN, for on_non_finite to handle."""
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    images[1, :, 4:8, 4:8] = float("nan")
    out = rewards.build_reward(spec)(images, ["a red ball"] * 3)
    assert rewards.check_finite(out).mask.tolist() == [True, False, True]
    assert all(bool(torch.isnan(part[1])) for part in out.parts.values())


def test_input_checks():
    reward = rewards.build_reward("brightness")
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        reward(torch.rand(2, 8, 8), ["a", "b"])
    with pytest.raises(TypeError, match="list of strings"):
        reward(torch.rand(1, 3, 8, 8), "a")


# --- colour alignment -----------------------------------------------------------------------

def _solid(rgb, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_color_alignment_prompt_dependent_and_ordered():
    reward = rewards.build_reward("color_alignment")
    red = _solid((1.0, 0.0, 0.0))
    assert reward(red, ["a red ball on the grass"]).scores.item() == pytest.approx(1.0, abs=1e-3)
    assert reward(red, ["a photo of a cyan car"]).scores.item() == pytest.approx(0.0, abs=1e-3)
    assert reward(red, ["a photo of a blue car"]).scores.item() < 0.5
    reddish = _solid((0.8, 0.3, 0.3))
    assert reward(reddish, ["red"]).scores > reward(_solid((0.5, 0.5, 0.5)), ["red"]).scores


def test_color_alignment_mid_range_on_gray_and_noise():
    reward = rewards.build_reward("color_alignment")
    words = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black"]
    gray = reward(_solid((0.5, 0.5, 0.5)).expand(len(words), -1, -1, -1), [f"a {w} ball" for w in words])
    torch.testing.assert_close(gray.scores, torch.full((8,), 0.5), atol=1e-3, rtol=0)
    noise = reward(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)), [f"a {w} ball" for w in words])
    assert ((noise.scores > 0.35) & (noise.scores < 0.6)).all()
    for extra in ("orange", "purple", "pink", "brown"):
        assert 0.3 < reward(torch.full((1, 3, 16, 16), 0.5), [f"an {extra} car"]).scores.item() < 0.7


def test_color_alignment_no_color_word_scores_zero_and_first_word_wins():
    reward = rewards.build_reward("color_alignment")
    assert reward(torch.rand(1, 3, 8, 8), ["a dog in a field"]).scores.item() == 0.0
    assert color.find_color("A Red ball on GREEN grass") == "red"
    assert color.find_color("reddish bluebird") is None  # whole words only
    assert color.find_color("a grey cat") == "grey"


@pytest.mark.parametrize("size", [8, 13, 128])
def test_color_alignment_differentiable_at_any_resolution(size):
    reward = rewards.build_reward("color_alignment")
    images = torch.rand(2, 3, size, size, requires_grad=True)
    reward(images, ["a red ball", "a blue car"]).scores.sum().backward()
    assert images.grad.abs().sum() > 0
    assert images.grad[0, 0].mean() > 0 and images.grad[1, 2].mean() > 0  # more red / more blue is better


def test_brightness():
    reward = rewards.build_reward("brightness")
    out = reward(torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]), ["a", "b"])
    torch.testing.assert_close(out.scores, torch.tensor([0.0, 1.0]))


def test_color_alignment_gradient_is_finite_on_an_image_of_exactly_the_colour():
    """The distance is sqrt(|p - c|^2 + eps): at |p - c| = 0 a bare sqrt has an infinite derivative, and a
    solid image of the named colour (a converged sample) would get NaN gradients."""
    images = _solid((1.0, 0.0, 0.0)).requires_grad_(True)
    score = rewards.build_reward("color_alignment")(images, ["a red ball"]).scores
    score.sum().backward()
    assert score.item() == pytest.approx(1.0, abs=1e-3) and torch.isfinite(images.grad).all()


def test_brightness_weighs_the_channels_in_rgb_order():
    """Rec. 601 luma of [B, 3, H, W] images in RGB order: pure red 0.299, green 0.587, blue 0.114."""
    primaries = torch.cat([_solid(rgb) for rgb in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))])
    out = rewards.build_reward("brightness")(primaries, ["a", "b", "c"])
    torch.testing.assert_close(out.scores, torch.tensor([0.299, 0.587, 0.114]))


def test_colour_words_have_their_hue():
    """Each colour word's RGB is that colour (a typo in the table would reward the wrong colour, and the toy
    world's palette is the same table): the hue in degrees of every chromatic colour, and greys are grey."""
    import colorsys

    hues = {"red": 0, "orange": 30, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "purple": 300,
            "magenta": 300, "pink": 350, "brown": 20}
    for name, hue in hues.items():
        h, _, _ = colorsys.rgb_to_hsv(*color.COLORS[name])
        assert min(abs(360 * h - hue), 360 - abs(360 * h - hue)) < 15, name
    for name, value in (("white", 1.0), ("black", 0.0), ("gray", 0.5), ("grey", 0.5)):
        assert color.COLORS[name] == (value, value, value), name


# --- JPEG -------------------------------------------------------------------------------------

def test_jpeg_size_matches_pil_at_quality_95():
    images = torch.rand(2, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    images[1] = 0.5
    sizes = jpeg.jpeg_size_kb(images)
    array = (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    assert sizes[0].item() == pytest.approx(len(buffer.getvalue()) / 1000)
    comp = rewards.build_reward("jpeg_compressibility")(images, ["", ""])
    incomp = rewards.build_reward("jpeg_incompressibility")(images, ["", ""])
    torch.testing.assert_close(comp.scores, -sizes)
    torch.testing.assert_close(incomp.scores, sizes)
    assert comp.scores[1] > comp.scores[0]  # a flat image compresses better than noise


# --- preprocessing ---------------------------------------------------------------------------

def test_preprocess_shapes_grads_and_pil_agreement():
    images = torch.rand(2, 3, 48, 64, requires_grad=True)
    out = preprocess.clip_preprocess(images, 32)
    assert out.shape == (2, 3, 32, 32)
    out.sum().backward()
    assert images.grad.abs().sum() > 0
    # close to PIL's bicubic resize + center crop of the same image (what the official code does)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 96, 128), 4, stride=1, padding=0)
    smooth = torch.nn.functional.interpolate(smooth, size=(96, 128), mode="bilinear")
    pil = Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    pil = pil.resize((42, 32), Image.BICUBIC)
    left = round((42 - 32) / 2.0)
    ref = torch.from_numpy(np.asarray(pil.crop((left, 0, left + 32, 32)), dtype=np.float32) / 255).permute(2, 0, 1)
    ours = preprocess.center_crop(preprocess.resize_shorter_side(smooth, 32), 32)[0]
    assert (ours - ref).abs().mean() < 0.01


def test_clip_normalisation_is_openai_clips_in_rgb_order():
    """Every CLIP-family scorer normalises with OpenAI CLIP's statistics, in R, G, B order as transformers' CLIP image
    processor has them: a pure red image comes out as CLIP's own preprocessing gives it."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    red = torch.zeros(1, 3, 32, 32)
    red[:, 0] = 1.0
    want = (red - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess.clip_preprocess(red, 32), want)


def test_center_crop_offsets_round_half_to_even_as_torchvision_and_refuse_a_small_image():
    """torchvision's CenterCrop offset is round((side - size) / 2): 1.5 -> 2 rows, 3.5 -> 4 columns (not floor's 1
    and 3). An image smaller than the crop on either side is an error, not a smaller crop."""
    image = torch.arange(35 * 39, dtype=torch.float32).view(1, 1, 35, 39)
    crop = preprocess.center_crop(image, 32)
    assert crop.shape == (1, 1, 32, 32) and crop[0, 0, 0, 0] == 2 * 39 + 4
    with pytest.raises(ValueError, match="cannot center-crop 32px from a 20x40 image"):
        preprocess.center_crop(torch.zeros(1, 3, 20, 40), 32)


def test_preprocess_resizes_in_float32_and_returns_the_dtype_asked_for():
    """Half-precision images and scorers: the bicubic resize runs in float32 (torch has no antialiased bicubic in half
    precision on the CPU), then the pixels take the scorer's dtype (by default the images')."""
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    half = preprocess.clip_preprocess(images.half(), 32)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), preprocess.clip_preprocess(images, 32), atol=2e-2, rtol=0)
    assert preprocess.clip_preprocess(images, 32, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_file_spec_errors_name_key_path_and_what(tmp_path, monkeypatch):
    spec = FileSpec("thing", "file", "thing.pt from somewhere", filename="thing.pt")
    with pytest.raises(FileNotFoundError, match=r"no path given for 'thing': provide thing.pt from somewhere; "
                                                 r"set reward\.paths\.thing=PATH in the training config \(--paths "
                                                 r"thing=PATH for score, eval and tune\) or TEXFORCE_THING=PATH"):
        spec.resolve({})
    with pytest.raises(FileNotFoundError, match=f"'thing' not found at {tmp_path}/thing.pt"):
        spec.resolve({"thing": str(tmp_path)})
    (tmp_path / "thing.pt").write_bytes(b"x")
    assert spec.resolve({"thing": str(tmp_path)}) == tmp_path / "thing.pt"
    monkeypatch.setenv("TEXFORCE_THING", str(tmp_path / "thing.pt"))
    assert spec.resolve(None) == tmp_path / "thing.pt"


def test_file_spec_kinds_defaults_home_and_where_a_path_comes_from(tmp_path, monkeypatch):
    """A file where a directory is wanted (and the reverse) is named; a tokenizer left out defaults to its model's
    directory, given in `paths` or in the environment; `~` is the user's home; `paths` wins over the environment."""
    model = FileSpec("model", "dir", "a model directory")
    tokenizer = FileSpec("model_tokenizer", "dir", "its tokenizer", default_from="model")
    weights = FileSpec("weights", "file", "weights.pt")
    for key in ("MODEL", "MODEL_TOKENIZER", "WEIGHTS"):
        monkeypatch.delenv(f"TEXFORCE_{key}", raising=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=f"'model' at {tmp_path}/weights.pt is not a directory"):
        model.resolve({"model": str(tmp_path / "weights.pt")})
    with pytest.raises(FileNotFoundError, match=f"'weights' at {tmp_path}/model is not a file"):
        weights.resolve({"weights": str(tmp_path / "model")})
    monkeypatch.setenv("HOME", str(tmp_path))
    assert weights.resolve({"weights": "~/weights.pt"}) == tmp_path / "weights.pt"
    monkeypatch.setenv("TEXFORCE_MODEL", str(tmp_path / "model"))
    assert tokenizer.resolve({}) == tmp_path / "model"  # the model's directory, from the environment
    assert model.is_given(None) and not tokenizer.is_given(None)
    (tmp_path / "other").mkdir()
    assert model.resolve({"model": str(tmp_path / "other")}) == tmp_path / "other"  # paths over the environment
    assert tokenizer.describe() == "model_tokenizer: its tokenizer (default: the 'model' directory)"
    assert FileSpec("python", "file", "an interpreter", optional=True).describe() == "python: an interpreter (optional)"
