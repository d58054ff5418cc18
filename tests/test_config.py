"""Config: published defaults, YAML + overrides, errors that name the key."""
import pytest

from rl.config import ConfigError, TexForceConfig, load_config, save_config


def test_defaults_are_the_published_texforce_settings():
    c = TexForceConfig()
    assert (c.train.learning_rate, c.train.weight_decay, c.train.clip_range) == (3e-4, 1e-4, 1e-4)
    assert (c.sample.eta, c.sample.guidance_scale, c.sample.num_steps) == (1.0, 5.0, 50)
    assert (c.train.adv_clip_max, c.train.timestep_fraction, c.train.max_grad_norm) == (5.0, 0.5, 1.0)
    assert (c.lora.rank, c.lora.alpha, c.lora.init, c.lora.policy) == (16, 16.0, "gaussian", "text_encoder")
    assert c.lora.text_encoder_targets == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert (c.advantage.buffer_size, c.advantage.min_count) == (16, 16)
    assert c.train.min_sigma == 0.0  # every step trained, as the papers do


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\nsample:\n  num_steps: 20\n")
    c = load_config(path, ["sample.num_steps=10", "lora.text_encoder_targets=q_proj,v_proj", "reward.paths.x=/a"])
    assert c.train.learning_rate == 1e-4 and isinstance(c.train.learning_rate, float)
    assert c.sample.num_steps == 10
    assert c.lora.text_encoder_targets == ["q_proj", "v_proj"]
    assert c.reward.paths == {"x": "/a"}
    save_config(c, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == c


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rat=1", "unknown config key 'train.learning_rat'; did you mean 'learning_rate'"),
        ("trian.learning_rate=1", "unknown config key 'trian'; did you mean 'train'"),
        ("sample.num_steps=ten", "sample.num_steps: expected an int"),
        ("sample.num_steps=2.5", "sample.num_steps: expected an int"),
        ("lora.policy=vae", "lora.policy: 'vae' is not one of"),
        ("train.clip_range=yes", "train.clip_range: expected a float"),
        ("sample.eta=0", "sample.eta must be > 0"),
        ("num_epochs", "not of the form"),
    ],
)
def test_errors_name_the_bad_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(None, [override])


def test_missing_config_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
