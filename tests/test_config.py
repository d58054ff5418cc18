"""Config: published defaults, YAML + overrides, errors that name the key."""
import dataclasses
import re
from pathlib import Path

import pytest

from rl.config import ConfigError, TexForceConfig, documented_yaml, field_docs, load_config, save_config


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


def test_an_override_of_a_text_setting_is_taken_as_written():
    """A prompt or a path is not YAML-parsed: YAML would cut `blurry, #lowres` at its comment, read `a: b` as a
    mapping and `123` as a number. Quoted, it is YAML's string; `null` is None where the setting allows it."""
    c = load_config(None, ["sample.negative_prompt=blurry, #lowres: bad", "model.pretrained=/models/sd #2",
                           "reward.paths.x=/ckpt/a: b", "run_name=123", "evaluation.reward='quoted'",
                           "evaluation.prompts_file=null", "sample.num_steps=7", "lora.text_encoder_targets=q_proj"])
    assert c.sample.negative_prompt == "blurry, #lowres: bad" and c.model.pretrained == "/models/sd #2"
    assert c.reward.paths == {"x": "/ckpt/a: b"} and c.run_name == "123" and c.evaluation.reward == "quoted"
    assert c.evaluation.prompts_file is None and c.sample.num_steps == 7 and c.lora.text_encoder_targets == ["q_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rat=1", "unknown config key 'train.learning_rat'; did you mean 'learning_rate'"),
        ("trian.learning_rate=1", "unknown config key 'trian'; did you mean 'train'"),
        ("sample.num_steps=ten", "sample.num_steps: expected an int"),
        ("sample.num_steps=2.5", "sample.num_steps: expected an int"),
        ("lora.policy=vae", "lora.policy: 'vae' is not one of"),
        ("train.clip_range=yes", "train.clip_range: expected a float"),
        ("sample.eta=0", "sample.eta must be in (0, 1], got 0.0 (eta=0 is deterministic"),
        ("num_epochs", "not of the form"),
        ("keep_checkpoints=0", "keep_checkpoints must be an integer >= 1 or null (keep every checkpoint), got 0"),
    ],
)
def test_errors_name_the_bad_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("sample.batch_size=0", "sample.batch_size must be an integer >= 1, got 0"),
        ("sample.batch_size=-2", "sample.batch_size must be an integer >= 1, got -2"),
        ("sample.num_batches_per_epoch=0", "sample.num_batches_per_epoch must be an integer >= 1, got 0"),
        ("save_every=0", "save_every must be an integer >= 1, got 0"),
        ("plot_every=0", "plot_every must be an integer >= 1 or auto, got 0"),
        ("plot_every=often", "plot_every: expected int or 'auto', got str 'often'"),
        ("train.gradient_accumulation_steps=0", "train.gradient_accumulation_steps must be an integer >= 1, got 0"),
        ("train.learning_rate=0", "train.learning_rate must be > 0, got 0.0"),
        ("train.learning_rate=-1e-4", "train.learning_rate must be > 0, got -0.0001"),
        ("train.learning_rate=nan", "train.learning_rate: expected a finite number, got nan"),
        ("sample.guidance_scale=-1", "sample.guidance_scale must be >= 0, got -1.0"),
        ("num_epochs=0", "num_epochs must be an integer >= 1, got 0"),
        ("num_epochs=-5", "num_epochs must be an integer >= 1, got -5"),
        ("train.num_inner_epochs=0", "train.num_inner_epochs must be an integer >= 1, got 0"),
        ("sample.eta=1.5", "sample.eta must be in (0, 1], got 1.5 (eta=0 is deterministic and has no log-prob; "
                           "above 1 the DDIM step's variance goes negative)"),
        ("sample.height=0", "sample.height must be >= 1, or null for the U-Net's size, got 0"),
        ("evaluation.eta=1.2", "evaluation.eta must be in [0, 1], or null for sample.eta, got 1.2"),
        ("run_name=../../x", "run_name must be a folder name without '/' or '\\' (not '', '.' or '..'), got '../../x'"),
        ("run_name=a/b", "got 'a/b' (the run directory is output_dir/run_name)"),
        ("run_name=", "run_name must be a folder name"),
        ("run_name=..", "got '..'"),
        ("num_epochs.x=1", "override 'num_epochs.x=1': num_epochs is a value, not a section; write num_epochs=VALUE"),
        ("sample.eta.low=1", "override 'sample.eta.low=1': sample.eta is a value, not a section"),
        (".eta=1", "override '.eta=1' has an empty key part"),
        ("sample.eta=[1", "override 'sample.eta=[1': the value is not valid YAML"),
        ("advantage.buffer_size=8", "advantage.min_count must be <= advantage.buffer_size=8 in per_prompt mode, got "
                                    "16 (a prompt's history holds buffer_size rewards at most"),
    ],
)
def test_values_that_were_accepted_or_crashed_are_errors(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_shared_start_noise_needs_ppo_prompt_groups():
    assert load_config(None, ["sample.shared_start_noise=true", "advantage.mode=group"]).sample.shared_start_noise
    needs = "sample.shared_start_noise=true needs PPO's prompt groups (advantage.mode=group and train.algorithm=ppo)"
    with pytest.raises(ConfigError, match=re.escape(f"{needs}, got advantage.mode='per_prompt', train.algorithm='ppo'")):
        load_config(None, ["sample.shared_start_noise=true", "advantage.mode=per_prompt"])
    with pytest.raises(ConfigError, match=re.escape(f"{needs}, got advantage.mode='group', train.algorithm='draft'")):
        load_config(None, ["sample.shared_start_noise=true", "advantage.mode=group", "train.algorithm=draft"])


def test_seeds_are_int64():
    """A negative or 2**64 seed failed after the model loaded (numpy's or torch's generator refusing it)."""
    for override, rule in [("seed=-1", "seed must be in [0, 2**63)"), ("seed=18446744073709551616", "seed must be"),
                           ("lora.init_seed=-5", "lora.init_seed must be in [0, 2**63) or null"),
                           (f"evaluation.seed_base={2**63 - 10}", "evaluation.seed_base must be in [0, 2**63 - "
                                                                   "evaluation.num_seeds]")]:
        with pytest.raises(ConfigError, match=re.escape(rule)):
            load_config(None, [override, "evaluation.num_seeds=16"])
    assert load_config(None, [f"seed={2**63 - 1}", f"evaluation.seed_base={2**63 - 16}",
                              "evaluation.num_seeds=16"]).seed == 2**63 - 1


def test_bfloat16_ppo_needs_a_clip_range_above_its_rounding():
    """bf16 rounds PPO's log-ratio by 1e-4 to 2e-3 once the LoRA has moved (tests/test_precision.py), so at the published
    clip_range of 1e-4 clipping would follow rounding; float16, float32 and the gradient learners are unaffected."""
    with pytest.raises(ConfigError, match=re.escape("train.clip_range=0.0001 is below bfloat16's rounding")) as error:
        load_config(None, ["model.dtype=bfloat16"])
    assert "use model.dtype=float16" in str(error.value) and "train.clip_range >= 0.01" in str(error.value)
    assert load_config(None, ["model.dtype=bfloat16", "train.clip_range=0.01"]).train.clip_range == 0.01
    assert load_config(None, ["model.dtype=float16"]).train.clip_range == 1e-4
    assert load_config(None, ["model.dtype=bfloat16", "train.algorithm=draft"]).model.dtype == "bfloat16"


def test_held_out_images_are_drawn_at_the_policy_eta_unless_evaluation_eta_is_set():
    assert load_config(None, ["sample.eta=0.7"]).evaluation_eta == 0.7
    assert load_config(None, ["sample.eta=0.7", "evaluation.eta=0"]).evaluation_eta == 0.0


def test_a_value_from_the_file_used_as_a_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("num_epochs: 20\n")
    with pytest.raises(ConfigError, match="num_epochs is a value, not a section"):
        load_config(path, ["num_epochs.x=1"])
    assert load_config(path, ["reward.paths.aesthetic=/m/a.pth"]).reward.paths == {"aesthetic": "/m/a.pth"}


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 1e-4\n    batch_size: 4\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3: invalid YAML: mapping values are not allowed here")):
        load_config(path)


def test_non_utf8_config_names_the_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes("run_name: tiny\nprompts:\n  file: caf\u00e9.txt\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: line 3: byte 0xe9 is not UTF-8; save the file as UTF-8")):
        load_config(path)


SHIPPED_CONFIGS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                         if p.name != "runtime_env.yaml")


def test_shipped_configs_are_valid():
    for path in SHIPPED_CONFIGS:
        load_config(path)


def test_missing_config_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_every_registered_algorithm_validates_with_the_papers_defaults():
    from rl.algorithms import Algorithm, algorithm_names, get_algorithm, register
    from rl.gradient import fraction_of_steps

    config = load_config(None, [])
    assert config.train.algorithm == "ppo"
    g = config.gradient
    assert (g.truncation_k, g.lv_copies, g.refl_min_fraction, g.refl_max_fraction) == (1, 2, 0.75, 0.975)
    assert (g.alignprop_max_k, g.clip_score_weight, g.checkpointing) == (None, 0.0, True)
    # TextCraftor's window: the official code's last 5 of 25 steps, the same share of other step counts
    assert g.textcraftor_fraction == 0.2
    assert [fraction_of_steps(0.2, t) for t in (25, 50, 10, 4, 1)] == [5, 10, 2, 1, 1]
    assert fraction_of_steps(0.5, 4) == 2 and fraction_of_steps(1.0, 7) == 7
    with pytest.raises(ConfigError, match=r"gradient\.textcraftor_fraction must be in \(0, 1\]"):
        load_config(None, ["train.algorithm=textcraftor", "lora.policy=text_encoder", "gradient.textcraftor_fraction=0"])
    assert algorithm_names() == ["ppo", "draft", "draft_k", "draft_lv", "refl", "alignprop", "textcraftor"]
    for name in algorithm_names():
        assert load_config(None, [f"train.algorithm={name}", "sample.num_steps=4"]).train.algorithm == name
        assert get_algorithm(name).samples_in_learner == (name != "ppo")
    with pytest.raises(ValueError, match="algorithm 'ppo' is already registered"):  # not silently replaced
        register(Algorithm("ppo", "another PPO", "gradient", "all"))
    assert get_algorithm("ppo").learner == "ppo"
    with pytest.raises(ConfigError, match=r"gradient\.alignprop_max_k must be in \[1, sample\.num_steps=4\]"):
        load_config(None, ["train.algorithm=alignprop", "sample.num_steps=4", "gradient.alignprop_max_k=5"])
    with pytest.raises(ConfigError, match=r"refl_min_fraction/refl_max_fraction must be 0 <= min <= max < 1"):
        load_config(None, ["train.algorithm=refl", "gradient.refl_min_fraction=0.9", "gradient.refl_max_fraction=0.8"])
    # a PPO run ignores the gradient learners' settings
    assert load_config(None, ["sample.num_steps=4", "gradient.truncation_k=9"]).gradient.truncation_k == 9


def _sections(cls: type) -> list[type]:
    """`cls` and every config class under it."""
    nested = [f.default_factory for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)]
    return [cls, *(section for child in nested for section in _sections(child))]


def test_every_setting_has_its_doc_line():
    """`--print-config` shows each setting under the string written below it in rl/config.py; a new field
    without one would print bare."""
    for section in _sections(TexForceConfig):
        settings = {f.name for f in dataclasses.fields(section) if not dataclasses.is_dataclass(f.default_factory)}
        docs = field_docs(section)
        assert set(docs) == settings, (section.__name__, settings - set(docs))
        assert all(docs.values())
    assert field_docs(TexForceConfig)["seed"] == "Seed for prompts, noise and LoRA init."
    assert field_docs(TexForceConfig.__dataclass_fields__["lora"].default_factory)["alpha"] == (
        "LoRA alpha; deltaW = (alpha / r) * B @ A.")


@pytest.mark.parametrize("path", [None, *SHIPPED_CONFIGS])
def test_the_documented_config_loads_back_to_the_same_config(path, tmp_path):
    config = load_config(path, ["train.learning_rate=1e-3", "lora.text_encoder_targets=q_proj,v_proj",
                                "reward.paths.x=/a b", "sample.negative_prompt=blurry, #lowres: 'bad'"])
    text = documented_yaml(config)
    printed = tmp_path / "printed.yaml"
    printed.write_text(text)
    assert load_config(printed) == config
    lines = text.splitlines()
    at = lines.index("  learning_rate: 0.001")
    assert lines[at - 1] == "  # AdamW learning rate (peak, after warmup)."  # each setting under its doc
    assert "lora:" in lines and lines[lines.index("lora:") + 1].startswith("  # ")
    assert max(map(len, lines)) <= 120


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.adam_beta1=1"], "train.adam_beta1 must be in [0, 1), got 1.0"),
        (["advantage.group_size=1"], "advantage.group_size must be an integer >= 2, got 1"),
        (["train.async_staleness=2"], ("train.async_staleness must be 0 or 1, got 2 (0 = sample then train "
                                       "on-policy, 1 = sample the next epoch while training this one)")),
        (["resources.learner_threads=-1"], "resources.learner_threads must be >= 0, got -1"),
        ([f"seed={2**63}"], f"seed must be in [0, 2**63), got {2**63} (torch's generators take int64 seeds)"),
        (["train.algorithm=draft_lv", "gradient.lv_copies=0"],
         "gradient.lv_copies must be an integer >= 1, got 0 (DRaFT-LV uses 2)"),
        (["lora.alpha=0"], "lora.alpha must be > 0, got 0.0"),
    ],
)
def test_a_value_just_past_its_bound_is_refused(overrides, message):
    """Each bound at its edge, where an off-by-one or a dropped check would let the run start and fail or learn
    nothing later: beta1=1 never moves Adam's first moment, a group of one sample has no spread to compare against,
    staleness 2 is no schedule the loop has, -1 threads fails in the learner actor after Ray started, seed 2**63
    overflows torch's int64 generators, 0 LV copies sum no reward, and alpha 0 scales the LoRA to nothing."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        ("resources.rollout_low_priority='false'", "resources.rollout_low_priority: expected bool, got str 'false'"),
        ("sample.num_steps=true", "sample.num_steps: expected an int, got bool True"),
        ("plot_every=null", "plot_every: expected int or 'auto', got NoneType None"),
    ],
)
def test_a_value_of_the_wrong_type_is_not_coerced(override, message):
    """A quoted 'false' is a string, which as a bool would be True; YAML's `true` is a bool, which as an int would
    be 1; null is no value of plot_every (only the settings that take null may be null: it crashed validation)."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_config(None, [override])


def test_a_list_override_drops_empty_items():
    """A trailing comma or an empty item in `a,b,` must not add '' to a list of LoRA targets."""
    assert load_config(None, ["lora.text_encoder_targets=q_proj, ,v_proj,"]).lora.text_encoder_targets == [
        "q_proj", "v_proj"]


def test_prompt_groups_may_span_sampling_calls():
    """The epoch's prompts are laid out in groups over all its samples (rl.prompts.epoch_prompts gets
    samples_per_epoch), so the epoch's total must be a multiple of advantage.group_size, not each call's batch."""
    config = load_config(None, ["advantage.mode=group", "sample.batch_size=2", "sample.num_batches_per_epoch=2"])
    assert (config.samples_per_epoch, config.advantage.group_size) == (4, 4)
    with pytest.raises(ConfigError, match="^" + re.escape(
            "samples per epoch (sample.batch_size * sample.num_batches_per_epoch = 6) must be a multiple of "
            "advantage.group_size=4 in group mode") + "$"):
        load_config(None, ["advantage.mode=group", "sample.batch_size=3", "sample.num_batches_per_epoch=2"])


def test_optimizer_defaults_are_the_published_adamw_settings():
    """TRL DDPOConfig's AdamW betas and epsilon, which TexForce trains with (the defaults test above pins the
    learning rate and weight decay)."""
    t = TexForceConfig().train
    assert (t.adam_beta1, t.adam_beta2, t.adam_epsilon) == (0.9, 0.999, 1e-8)
