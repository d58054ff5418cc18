"""Checks before a run starts (`rl.preflight`): the model directory, prompts, rewards, devices and
the settings that need the model. Each names the file or key and the fix; none loads weights."""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, tiny_config

from rl.config import ConfigError, PromptConfig
from rl.models import ModelNotFoundError, check_device, check_model, safetensors_header
from rl.preflight import preflight
from rl.prompts import PromptsError, load_prompts, long_prompts

NO_WARMUP = "train.warmup_steps=0"  # the tiny configs' few steps all fall in the default warmup, which warns

WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture
def model_copy(tiny_sd_dir, tmp_path):
    """A copy of the tiny pipeline to break."""
    return shutil.copytree(tiny_sd_dir, tmp_path / "sd")


# --- the model directory -----------------------------------------------------------------------


def test_missing_and_empty_model_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # a path is never sent to the hub
    with pytest.raises(ModelNotFoundError, match=re.escape(f"model directory not found: {tmp_path / 'sd'}")):
        check_model(str(tmp_path / "sd"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"model directory .*empty is empty: .*make-tiny"):
        check_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("component", sorted(WEIGHTS))
def test_truncated_weights_are_named(model_copy, component):
    weights = model_copy / WEIGHTS[component]
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 100)
    with pytest.raises(ModelNotFoundError, match=re.escape(
            f"{weights} is truncated: its header describes {size} bytes but the file has {size - 100}")):
        check_model(str(model_copy))


def test_corrupt_and_empty_weights_files(model_copy):
    weights = model_copy / WEIGHTS["vae"]
    weights.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=re.escape(f"{weights} is truncated or not a safetensors file (0 bytes)")):
        check_model(str(model_copy))
    weights.write_bytes((20).to_bytes(8, "little") + b"{not json at all....}")
    with pytest.raises(ModelNotFoundError, match=re.escape(f"{weights} has a corrupt safetensors header")):
        safetensors_header(weights)
    weights.unlink()
    with pytest.raises(ModelNotFoundError, match=r"vae has no weights \(\*\.safetensors or \*\.bin\)"):
        check_model(str(model_copy))


def test_missing_or_empty_tokenizer_says_how_to_fix(model_copy):
    (model_copy / "tokenizer" / "tokenizer.json").write_text("")
    with pytest.raises(ModelNotFoundError, match=r"tokenizer file .*tokenizer\.json is empty; copy the tokenizer/ folder"):
        check_model(str(model_copy))
    for file in (model_copy / "tokenizer").iterdir():
        file.unlink()
    with pytest.raises(ModelNotFoundError, match=r"tokenizer holds no tokenizer \(tokenizer\.json, or vocab\.json \+ "
                                                 r"merges\.txt\); copy the tokenizer/ folder of the same model"):
        check_model(str(model_copy))
    shutil.rmtree(model_copy / "tokenizer")
    with pytest.raises(ModelNotFoundError, match="missing the 'tokenizer' component"):
        check_model(str(model_copy))


def test_corrupt_config_json_is_named(model_copy):
    (model_copy / "unet" / "config.json").write_text("{")
    with pytest.raises(ModelNotFoundError, match=re.escape(f"{model_copy / 'unet' / 'config.json'} is not valid JSON")):
        check_model(str(model_copy))


def test_the_tiny_pipeline_passes(tiny_sd_dir):
    assert check_model(tiny_sd_dir) is not None
    header = safetensors_header(next((check_model(tiny_sd_dir) / "vae").glob("*.safetensors")))
    assert all(len(v["data_offsets"]) == 2 for k, v in header.items() if k != "__metadata__")


# --- settings that need the model --------------------------------------------------------------


def test_image_size_must_be_a_multiple_of_the_vae_factor(tiny_sd_dir):
    factor = 2 ** (len(json.loads(open(f"{tiny_sd_dir}/vae/config.json").read())["block_out_channels"]) - 1)
    assert factor == 4
    with pytest.raises(ConfigError, match=r"sample\.height=33 is not a multiple of the VAE's downscale factor 4 "
                                          r"\(from .*vae/config\.json\); use 32 or 36"):
        preflight(tiny_config(tiny_sd_dir, "sample.height=33"))
    with pytest.raises(ConfigError, match=r"sample\.width=2 is not a multiple .* use 4$"):
        preflight(tiny_config(tiny_sd_dir, "sample.width=2"))
    preflight(tiny_config(tiny_sd_dir, "sample.height=36", "sample.width=28"))


def test_min_sigma_too_large_fails_before_the_model_loads(tiny_sd_dir, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("preflight must not load the pipeline")

    monkeypatch.setattr("rl.models.load_pipeline", no_loading)
    with pytest.raises(ConfigError, match=r"train\.min_sigma=5\.0 leaves no step to train.*lower train\.min_sigma"):
        preflight(tiny_config(tiny_sd_dir, "train.min_sigma=5"))


@pytest.mark.parametrize("override, message", [
    ("lora.text_encoder_targets=[qproj]", (r"lora\.text_encoder_targets: 'qproj' names no layer of .*text_encoder; "
                                           r"its Linear and Conv2d layers end in: fc1, fc2, k_proj, out_proj, q_proj, v_proj$")),
    ("lora.text_encoder_targets=[]", r"lora\.text_encoder_targets is empty but lora\.policy=text_encoder trains"),
    ("lora.text_encoder_targets=[final_layer_norm]", r"'final_layer_norm' matches (text_model\.)?final_layer_norm \(LayerNorm\)"),
    ("lora.policy=unet lora.unet_targets=[to_q,norm]", r"lora\.unet_targets: 'norm' matches .*\(GroupNorm\).*to_out\.0"),
])
def test_lora_targets_must_name_linear_or_conv_layers(tiny_sd_dir, override, message):
    with pytest.raises(ConfigError, match=message):
        preflight(tiny_config(tiny_sd_dir, *override.split()))


def test_lora_targets_of_the_component_trained_only(tiny_sd_dir):
    preflight(tiny_config(tiny_sd_dir, "lora.unet_targets=[nothing]"))  # policy text_encoder: the U-Net's are unused
    preflight(tiny_config(tiny_sd_dir, "lora.policy=both", "lora.unet_targets=[to_q,conv1]", "lora.text_encoder_targets=[fc1]"))


def test_lora_targets_of_a_class_this_stack_cannot_build_are_left_to_the_loader(model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "NoSuchTextModel"]
    (model_copy / "model_index.json").write_text(json.dumps(index))
    preflight(tiny_config(str(model_copy), "lora.text_encoder_targets=[qproj]"))  # no check, no traceback


# --- prompts -----------------------------------------------------------------------------------


def test_prompt_file_missing_a_folder_empty_or_not_utf8(tmp_path):
    path = tmp_path / "p.txt"
    with pytest.raises(PromptsError, match=re.escape(f"prompt file not found: {path}")):
        load_prompts(PromptConfig(file=str(path)))
    with pytest.raises(PromptsError, match=re.escape(f"prompt file {tmp_path} is not a file (prompts.file")):
        load_prompts(PromptConfig(file=str(tmp_path)))
    path.write_text("\n  \n")
    with pytest.raises(PromptsError, match=re.escape(f"prompt file {path} has no prompts; write one prompt per line")):
        load_prompts(PromptConfig(file=str(path)))
    path.write_bytes("a red ball\na caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PromptsError, match=re.escape(f"prompt file {path}: line 2: byte 0xe9 is not UTF-8; save it")):
        load_prompts(PromptConfig(file=str(path)))


def test_long_prompts_warn_once_naming_how_many(tiny_sd_dir, tmp_path, caplog):
    path = tmp_path / "p.txt"
    long = "a red ball " + "and a blue car " * 30
    path.write_text(f"a red ball\n{long}\n{long}\n{long} again\n")
    with caplog.at_level(logging.WARNING, logger="texforce"):
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, f"prompts.file={path}"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"2 of 3 prompts in {path} are longer than the tokenizer's 77 tokens and will be truncated")


def test_a_prompt_of_exactly_the_tokenizers_length_is_not_long():
    """model_max_length counts the start and end tokens: a prompt that fills it is encoded whole, one token more is cut."""
    from toyworld.tiny import toy_tokenizer

    tokenizer = toy_tokenizer()
    fits = " ".join(["ball"] * (tokenizer.model_max_length - 2))
    assert len(tokenizer(fits).input_ids) == tokenizer.model_max_length
    assert long_prompts([fits, fits + " ball"], tokenizer) == [fits + " ball"]


def test_evaluation_prompts_that_are_also_trained_on_warn_once(tiny_sd_dir, tmp_path, caplog):
    train, held_out = tmp_path / "train.txt", tmp_path / "held_out.txt"
    train.write_text("a red ball\na blue car\n")
    held_out.write_text("a green cup\nA  Red ball\n")  # the same prompt, other case and spacing
    with caplog.at_level(logging.WARNING, logger="texforce"):
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, f"prompts.file={train}", f"evaluation.prompts_file={held_out}"))
        root = Path(__file__).resolve().parents[1] / "configs"  # the demo's two sets share no prompt
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, f"prompts.file={root / 'prompts_toy_train.txt'}",
                              f"evaluation.prompts_file={root / 'prompts_toy_held_out.txt'}"))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "1 of 2 evaluation prompts (evaluation.prompts_file) are also training prompts, e.g. 'A  Red ball': the "
        "held-out gain is then partly a training one"]


def test_each_learner_warns_that_it_ignores_the_others_kl_penalty(tiny_sd_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="texforce"):
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "train.algorithm=draft", "lora.policy=unet", "reward.spec=color_alignment"))
        assert not caplog.records
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "train.algorithm=draft", "lora.policy=unet", "reward.spec=color_alignment",
                              "train.kl_coef=0.1", "gradient.kl_coef=2"))
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "train.kl_coef=0.1"))  # PPO uses it
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "gradient.kl_coef=2"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "train.kl_coef=0.1 is PPO's KL penalty; train.algorithm=draft does not use it (its own is gradient.kl_coef, 2 here)",
        ("gradient.kl_coef=2 is the gradient learners' KL regulariser; train.algorithm=ppo does not use it (its own "
         "is train.kl_coef, 0 here)"),
    ]



def test_a_run_whose_optimizer_steps_all_fall_in_the_warmup_says_so(tiny_sd_dir, caplog):
    """A one-step trial run with the default warmup took its step at learning rate 0: a zero LoRA, without a word."""
    with caplog.at_level(logging.WARNING, logger="texforce"):
        preflight(tiny_config(tiny_sd_dir))  # 2 epochs x 2 steps, warmup 10
        preflight(tiny_config(tiny_sd_dir, "train.num_inner_epochs=3"))  # 12 steps: beyond it
        preflight(tiny_config(tiny_sd_dir, "train.warmup_fraction=0.03"))  # int(0.03 x 4) = 0 steps
        preflight(tiny_config(tiny_sd_dir, "train.algorithm=refl", "lora.policy=unet", "reward.spec=color_alignment",
                              "train.num_inner_epochs=3", "train.warmup_steps=5"))  # a gradient learner: one pass
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"the run's {steps} optimizer steps all fall in its learning-rate warmup of {warmup} steps (train.warmup_steps, "
        "or train.warmup_fraction of the run): the rate rises from 0, the first step changes nothing, and it never "
        f"reaches train.learning_rate={lr}; lower the warmup or train longer"
        for steps, warmup, lr in ((4, 10, 0.0003), (4, 5, 0.0003))]


def test_several_learner_ranks_say_how_many_rows_a_step_averages_and_inline_that_it_takes_their_steps(
        tiny_sd_dir, caplog):
    with caplog.at_level(logging.INFO, logger="texforce"):
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "train.batch_size=8"))
        assert not [r for r in caplog.records if "rows per optimizer step" in r.getMessage()]
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "resources.num_learners=2", "train.batch_size=8"))
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "resources.num_learners=4", "train.batch_size=2",
                              "train.gradient_accumulation_steps=3"))
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "resources.num_learners=2", "train.batch_size=8", "resources.mode=inline"))
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "optimizer step" in r.getMessage()]
    assert said == [
        ("INFO", "2 learner ranks x train.batch_size=8: 16 rows per optimizer step (train.batch_size is per rank; "
                 "divide it by 2 for one learner's steps)"),
        ("INFO", "4 learner ranks x train.batch_size=2 x train.gradient_accumulation_steps=3: 24 rows per optimizer "
                 "step (train.batch_size is per rank; divide it by 4 for one learner's steps)"),
        ("INFO", "resources.mode=inline runs one learner for resources.num_learners=2 ranks: it trains on their "
                 "minibatches, 2 x train.batch_size=8 = 16 rows in one forward pass, and takes the optimizer steps 2 "
                 "Ray ranks take (16 rows each)"),
    ]

# --- rewards and devices -----------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward 'nope'; valid rewards:"),
    ("color_alignment:x", "weight 'x' of 'color_alignment' in spec 'color_alignment:x' is not a number"),
    (":1", "':1' in spec ':1' names no reward"),
    ("color_alignment:nan", "weight 'nan' of 'color_alignment' in spec 'color_alignment:nan' must be a finite number"),
])
def test_reward_spec_is_checked_before_sampling(tiny_sd_dir, monkeypatch, spec, message):
    import rewards

    monkeypatch.setattr("actors.driver.train", lambda *a, **k: pytest.fail("must fail before training"), raising=False)
    with pytest.raises(rewards.RewardSpecError, match=re.escape(message)):
        preflight(tiny_config(tiny_sd_dir, f"reward.spec={spec}"))


def test_evaluation_reward_is_checked_and_named_before_sampling(tiny_sd_dir):
    import rewards

    with pytest.raises(rewards.RewardSpecError, match=re.escape("evaluation.reward: unknown reward 'nope'; valid rewards:")):
        preflight(tiny_config(tiny_sd_dir, "evaluation.reward=nope"))
    preflight(tiny_config(tiny_sd_dir, "evaluation.reward=object_alignment", "reward.spec=object_alignment_soft"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(tiny_sd_dir):
    with pytest.raises(ConfigError, match=r"model\.device=cuda:0: this machine has no CUDA device; use model\.device=cpu"):
        preflight(tiny_config(tiny_sd_dir, "resources.mode=inline", "model.device=cuda:0"))
    with pytest.raises(ConfigError, match=r"--device=cuda: this machine has no CUDA device"):
        check_device("cuda", option="--device", local=True)
    check_device("cuda:1", option="model.device", local=False)  # on a Ray cluster the workers have the GPUs


def test_a_cuda_index_past_this_machines_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for device in ("cuda", "cuda:0", "cuda:1"):
        check_device(device, option="model.device", local=True)
    with pytest.raises(ConfigError, match=r"^model\.device=cuda:2: this machine has 2 CUDA devices, cuda:0 to cuda:1$"):
        check_device("cuda:2", option="model.device", local=True)


def test_device_names_and_gpu_requests(tiny_sd_dir):
    with pytest.raises(ConfigError, match=r"model\.device='gpu' is not a torch device; use auto, cpu, cuda or cuda:N"):
        check_device("gpu", option="model.device", local=False)
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_sampler=0: Ray hides the GPUs from an actor that "
                                          r"requests none; set resources\.gpus_per_sampler"):
        preflight(tiny_config(tiny_sd_dir, "model.device=cuda"))


# --- the Ray cluster to join ---------------------------------------------------------------------


@pytest.fixture
def closed_port():
    """A local port nothing listens on (connections to it are refused at once)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_ray_address_nothing_answers_at_fails_in_preflight_naming_where_it_came_from(
        tiny_sd_dir, closed_port, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{closed_port}"
    with pytest.raises(ConfigError, match=re.escape(
            f"resources.address={address}: no Ray head answers there (Connection refused); start one there with "
            f"`ray start --head --port={closed_port}`, or correct the address")):
        preflight(tiny_config(tiny_sd_dir, "resources.mode=ray", f"resources.address={address}"))
    monkeypatch.setenv("RAY_ADDRESS", f"ray://{address}")
    with pytest.raises(ConfigError, match=re.escape(f"RAY_ADDRESS=ray://{address}: no Ray head answers there")):
        preflight(tiny_config(tiny_sd_dir, "resources.mode=ray"))
    preflight(tiny_config(tiny_sd_dir, "resources.mode=inline"))  # inline joins no cluster


def test_ray_addresses_that_are_urls_or_malformed_say_what_ray_takes():
    from rl.preflight import check_ray_address

    with pytest.raises(ConfigError, match=r"--ray-address=http://head:8265 is a http URL: .* is the address for `ray "
                                          r"job submit`$"):
        check_ray_address("http://head:8265", "--ray-address")
    for bad in ("head", "head:port", ":6379"):
        with pytest.raises(ConfigError, match=re.escape(f"x={bad} is not HOST:PORT (e.g. 10.0.0.1:6379)")):
            check_ray_address(bad, "x")
    for resolved_by_ray in (None, "", "local", "auto"):
        check_ray_address(resolved_by_ray, "x")


def test_a_ray_address_that_answers_passes():
    import socket

    from rl.preflight import check_ray_address

    with socket.socket() as head:
        head.bind(("127.0.0.1", 0))
        head.listen()
        check_ray_address(f"127.0.0.1:{head.getsockname()[1]}", "resources.address")
        check_ray_address(f"ray://127.0.0.1:{head.getsockname()[1]}", "resources.address")


def test_auto_without_a_running_cluster_is_a_user_error(monkeypatch):
    import ray

    from actors.driver import connect_ray
    from rl.config import load_config

    def no_cluster(**kwargs):  # what ray.init(address="auto") raises at once when no cluster runs here
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with pytest.raises(ConfigError, match=r"^resources\.address=auto: Could not find any running Ray instance") as error:
        connect_ray(load_config(None, ["resources.address=auto"]))
    # Ray's clients do not turn token authentication on by themselves: a token cluster refuses them in these words
    assert str(error.value).endswith("; if the cluster uses token authentication (`ray start` with "
                                     "RAY_AUTH_MODE=token), set RAY_AUTH_MODE=token here too")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError) as error:
        connect_ray(load_config(None, ["resources.address=auto"]))
    assert "token authentication" not in str(error.value)


def test_a_run_larger_than_this_machine_is_refused_before_a_local_ray_starts(tiny_sd_dir, tmp_path, monkeypatch,
                                                                            capsys):
    """A local Ray has this machine's CPUs and GPUs: asking for more was refused only once Ray had started, after its
    start-up lines (three lines on stderr, and a run directory)."""
    import os

    import ray

    from rl import cli

    def started(**kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", started)
    code = cli.main(["train", f"model.pretrained={tiny_sd_dir}", "model.device=cpu", f"output_dir={tmp_path}",
                     "run_name=r", "resources.num_samplers=4", "resources.cpus_per_sampler=1"])
    line = one_line_error(capsys, code)
    assert line.startswith("texforce train: the Ray cluster cannot host this run: CPU: requested 6, the cluster "
                           "has 2"), line  # 4 samplers, a reward actor and a learner at 1 CPU each
    assert not (tmp_path / "r").exists()
    # nor GPUs it has not (counted as Ray counts them: none on a machine without one)
    if torch.cuda.device_count() == 0:
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
        code = cli.main(["train", f"model.pretrained={tiny_sd_dir}", "model.device=cpu", f"output_dir={tmp_path}",
                         "run_name=r", "resources.gpus_per_learner=1"])
        line = one_line_error(capsys, code)
        assert line.startswith("texforce train: the Ray cluster cannot host this run: GPU: requested 1, the "
                               "cluster has 0"), line
        assert not (tmp_path / "r").exists()


def test_a_cluster_that_refuses_the_connection_leaves_no_run_directory(tiny_sd_dir, tmp_path, monkeypatch):
    """Ray was joined after the run directory was made: a refused connection left a folder with a config.yaml."""
    import ray
    from conftest import tiny_config

    from actors.driver import train

    def refused(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    config = tiny_config(tiny_sd_dir, "resources.mode=ray", "resources.address=auto", f"output_dir={tmp_path}",
                         "run_name=r")
    with pytest.raises(ConfigError, match="^resources.address=auto: Failed to connect"):
        train(config)
    assert not (tmp_path / "r").exists()


# --- prompts the reward reads nothing in; run directories inside Ray's working_dir copy -------------------------


@pytest.mark.parametrize("spec", ["object_alignment", "object_shape_soft", "color_alignment"])
def test_training_prompts_a_prompt_aware_reward_reads_nothing_in_are_refused(tiny_sd_dir, tmp_path, spec):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\na dog on the grass\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"prompts.file={prompts}: no prompt names what reward {spec} reads (e.g. 'a photo of a cat'), so it "
            "scores every image 0 and the run would learn nothing; write prompts that name a ")):
        preflight(tiny_config(tiny_sd_dir, f"prompts.file={prompts}", f"reward.spec={spec}"))
    with pytest.raises(ConfigError, match=r"^prompts\.builtin=animals: no prompt names what reward color_alignment"):
        preflight(tiny_config(tiny_sd_dir, "prompts.builtin=animals", "reward.spec=color_alignment"))
    preflight(tiny_config(tiny_sd_dir, f"prompts.file={prompts}", "reward.spec=brightness"))  # reads no prompt
    preflight(tiny_config(tiny_sd_dir, f"prompts.file={prompts}", "reward.spec=brightness,color_alignment:0"))


def test_training_prompts_the_reward_reads_nothing_in_warn_with_their_count(tiny_sd_dir, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\na red ball\na blue car\na photo of a cat\na green hat\n")
    with caplog.at_level(logging.WARNING, logger="texforce"):
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, f"prompts.file={prompts}", "reward.spec=object_alignment"))
        preflight(tiny_config(tiny_sd_dir, NO_WARMUP, "prompts.builtin=animals", "reward.spec=object_shape"))  # "a bird" only
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        (f"1 of 4 prompts (prompts.file={prompts}) name nothing reward object_alignment reads, e.g. 'a photo of a "
         "cat': it scores their images 0 whatever they show"),
        ("25 of 30 prompts (prompts.builtin=animals) name nothing reward object_shape reads, e.g. 'a photo of a cat "
         "sitting in a field': it scores their images 0 whatever they show"),
    ]


def test_eval_tune_and_score_refuse_prompts_the_reward_reads_nothing_in_before_any_work(tiny_sd_dir, tmp_path, capsys):
    """They scored such prompts 0 without a word (`tune` ran the whole sweep on them)."""
    import numpy as np
    from lora_fixtures import make_lora
    from PIL import Image

    from rl.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog\na cat\n")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(images / f"{i}.png")
    lora = make_lora(tiny_sd_dir, tmp_path / "lora", rank=2, alpha=2, seed=0, policy="text_encoder")
    said = (f"--prompts {prompts}: no prompt names what reward color_alignment reads (e.g. 'a dog'), so it scores "
            "every image 0 and the {} would measure nothing; write prompts that name a colour word")
    common = ["--model", tiny_sd_dir, "--prompts", str(prompts), "--device", "cpu"]
    code = main(["eval", *common, "--reward", "color_alignment", "--out", str(tmp_path / "eval")])
    assert one_line_error(capsys, code).startswith("texforce eval: " + said.format("evaluation"))
    code = main(["tune", *common, "--lora", str(lora), "--objective", "color_alignment", "--out", str(tmp_path / "sw")])
    assert one_line_error(capsys, code).startswith("texforce tune: " + said.format("evaluation"))
    code = main(["score", "--reward", "color_alignment", "--images", str(images), "--prompts", str(prompts),
                 "--out", str(tmp_path / "scores" / "s.parquet")])
    assert one_line_error(capsys, code).startswith("texforce score: " + said.format("scores"))
    assert not any((tmp_path / name).exists() for name in ("eval", "sw", "scores"))


def test_held_out_prompts_the_evaluation_reward_reads_nothing_in_are_refused(tiny_sd_dir, tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("a photo of a cat\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"evaluation.prompts_file={held_out}: no prompt names what reward object_color reads (e.g. 'a photo of a "
            "cat'), so it scores every image 0 and the held-out evaluation would measure nothing")):
        preflight(tiny_config(tiny_sd_dir, f"evaluation.prompts_file={held_out}", "reward.spec=object_color"))
    with pytest.raises(ConfigError, match=r"^evaluation\.prompts_file=.* reward color_alignment reads"):
        preflight(tiny_config(tiny_sd_dir, f"evaluation.prompts_file={held_out}", "reward.spec=brightness",
                              "evaluation.reward=color_alignment"))
    preflight(tiny_config(tiny_sd_dir, f"evaluation.prompts_file={held_out}", "evaluation.reward=brightness"))


def test_a_relative_output_dir_or_resume_inside_a_ray_working_dir_copy_is_refused(tiny_sd_dir, tmp_path, monkeypatch):
    """`ray job submit --working-dir .` runs the driver in a temporary copy of the folder, deleted with the session."""
    from rl.preflight import ray_working_dir_copy

    copy = tmp_path / "session_1/runtime_resources/working_dir_files/_ray_pkg_abc"
    (copy / "configs").mkdir(parents=True)
    monkeypatch.chdir(copy / "configs")
    with pytest.raises(ConfigError, match=re.escape(
            f"output_dir=runs is relative, and this job runs in Ray's temporary copy of its --working-dir ({copy}), "
            "deleted with the Ray session with the run's checkpoints and LoRA; pass an absolute output_dir on "
            "storage that outlives the job (e.g. output_dir=/shared/runs)")):
        preflight(tiny_config(tiny_sd_dir))
    with pytest.raises(ConfigError, match=r"^--resume runs/tiny is relative, .* pass the run directory's absolute"):
        preflight(tiny_config(tiny_sd_dir, f"output_dir={tmp_path / 'runs'}"), resume="runs/tiny")
    preflight(tiny_config(tiny_sd_dir, f"output_dir={tmp_path / 'runs'}"))
    preflight(tiny_config(tiny_sd_dir), resume=tmp_path / "runs" / "tiny")  # a resume goes on where it is told
    monkeypatch.chdir(tmp_path)
    preflight(tiny_config(tiny_sd_dir))  # a relative output_dir elsewhere is the user's choice
    assert ray_working_dir_copy(tmp_path / "working_dir_files/_ray_pkg_abc") is None


# --- gaps found by a mutation audit: checks whose removal no test noticed ----------------------------------------


def _unlisted_component(model: Path) -> str:
    """diffusers builds the components model_index.json lists: one it does not list fails only when the pipeline
    loads, after the run directory exists."""
    index = json.loads((model / "model_index.json").read_text())
    del index["unet"]
    (model / "model_index.json").write_text(json.dumps(index))
    return f"{model} is missing the 'unet' component folder ({model / 'unet'})."


def _empty_bin_weights(model: Path) -> str:
    (model / WEIGHTS["vae"]).unlink()
    weights = model / "vae" / "diffusion_pytorch_model.bin"
    weights.write_bytes(b"")
    return f"{weights} is empty; copy it again from the model's snapshot"


def _bytes_after_the_tensors(model: Path) -> str:
    """safetensors refuses a file its header does not fully cover ("incomplete metadata, file not fully covered")
    when the pipeline loads."""
    weights = model / WEIGHTS["unet"]
    size = weights.stat().st_size
    with open(weights, "ab") as handle:
        handle.write(b"\0" * 100)
    return (f"{weights} is truncated: its header describes {size} bytes but the file has {size + 100}; download or "
            "copy it again")


def _vocabulary_without_merges(model: Path) -> str:
    """vocab.json is half of a BPE tokenizer: without merges.txt (or a tokenizer.json) there is none."""
    (model / "tokenizer" / "tokenizer.json").unlink()
    (model / "tokenizer" / "vocab.json").write_text('{"a</w>": 0}')
    return (f"{model / 'tokenizer'} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt); copy the "
            "tokenizer/ folder of the same model's snapshot into it (for SD 1.x, the CLIP ViT-L/14 tokenizer)")


def _scheduler_without_config(model: Path) -> str:
    """Without it the scheduler's loader fails in preflight's min_sigma check, in its own words."""
    (model / "scheduler" / "scheduler_config.json").unlink()
    return f"{model / 'scheduler'} has no scheduler_config.json; copy that folder from the model's snapshot again"


@pytest.mark.parametrize("damage", [_unlisted_component, _empty_bin_weights, _bytes_after_the_tensors,
                                    _vocabulary_without_merges, _scheduler_without_config])
def test_a_damaged_model_folder_is_named_with_the_fix(model_copy, damage):
    """Each damage (its docstring says why it matters) is one line naming the file, before the model loads."""
    message = damage(model_copy)
    with pytest.raises(ModelNotFoundError, match="^" + re.escape(message) + "$"):
        check_model(str(model_copy))


def test_a_tokenizer_without_a_vocabulary_is_refused_before_the_model_loads(model_copy):
    """A tokenizer folder of a few tokens loads (offline, a missing vocabulary gives such a tokenizer) and would
    encode every prompt as unknown tokens."""
    from transformers import CLIPTokenizer

    shutil.rmtree(model_copy / "tokenizer")
    CLIPTokenizer(vocab={"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}, merges=[],
                  model_max_length=77).save_pretrained(str(model_copy / "tokenizer"))
    with pytest.raises(ModelNotFoundError, match="^" + re.escape(
            f"the tokenizer in {model_copy / 'tokenizer'} has only 4 tokens; copy the tokenizer/ folder of the same "
            "model's snapshot into it") + "$"):
        preflight(tiny_config(str(model_copy), "resources.mode=inline"))


def test_a_home_relative_model_path_is_a_path_not_a_hub_id(tmp_path, monkeypatch):
    """`~/models/sd` has one slash, like a hub id `org/name`: it must still be looked up (and reported) as a path."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="^" + re.escape(
            f"model directory not found: {tmp_path / 'sd'}. Pass a local diffusers directory (model.pretrained=... or "
            "--model ...), or build a tiny one with `texforce make-tiny DIR`.") + "$"):
        check_model("~/sd")


@pytest.mark.parametrize("value", ["1", "true", "ON"])
def test_hf_hub_offline_is_read_as_the_hub_reads_it(monkeypatch, value):
    """huggingface_hub takes 1, true, on or yes (any case) for offline: a hub id is then refused with the fix."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(ModelNotFoundError, match="^" + re.escape(
            "model 'org/model' is not a local directory and HF_HUB_OFFLINE is set, so the hub cannot be asked. Pass "
            "a local diffusers directory (model.pretrained=... or --model ...), or build a tiny one with "
            "`texforce make-tiny DIR`.") + "$"):
        check_model("org/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert check_model("org/model") is None  # the hub is asked when the pipeline loads


def test_a_cuda_run_on_ray_needs_a_gpu_request_for_the_reward_actors_too(tiny_sd_dir):
    """The reward actors build their models on model.device (actors/topology.py): Ray hides the GPUs from them too."""
    with pytest.raises(ConfigError, match="^" + re.escape(
            "model.device=cuda but resources.gpus_per_reward_actor=0: Ray hides the GPUs from an actor that requests "
            "none; set resources.gpus_per_reward_actor (fractions share a GPU) or model.device=cpu") + "$"):
        preflight(tiny_config(tiny_sd_dir, "model.device=cuda", "resources.gpus_per_sampler=0.5",
                              "resources.gpus_per_learner=1"))


def test_min_sigma_is_checked_at_the_policys_eta(tiny_sd_dir):
    """sigma_t scales with eta: at sample.eta=0.5 the 6-step schedule's largest sigma_t is 0.412, so min_sigma=0.6
    leaves no step to train there though it would at eta 1 (0.823); the learner would fail after the first rollout."""
    with pytest.raises(ConfigError, match="^" + re.escape(
            "train.min_sigma=0.6 leaves no step to train: the largest sigma_t of this 6-step schedule at eta=0.5 is "
            "0.412; lower train.min_sigma") + "$"):
        preflight(tiny_config(tiny_sd_dir, "sample.eta=0.5", "train.min_sigma=0.6", "resources.mode=inline"))
    preflight(tiny_config(tiny_sd_dir, "train.min_sigma=0.6", "resources.mode=inline"))


def test_a_gradient_learners_clip_score_term_reads_its_paths_key(tiny_sd_dir, tmp_path):
    """TextCraftor's clip_score regulariser is part of the reward it trains on (rl.gradient.reward_spec), though
    not of reward.spec: its reward.paths key is read, not a stray one."""
    preflight(tiny_config(tiny_sd_dir, "train.algorithm=textcraftor", "gradient.clip_score_weight=0.1",
                          f"reward.paths.clip_score={tmp_path}", "resources.mode=inline"))
