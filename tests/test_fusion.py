"""Exact LoRA fusion: the fused delta is sum_i alpha_i * deltaW_i for every adapted module."""
import json
import re

import pytest
import torch
from conftest import one_line_error
from lora_fixtures import make_lora, merged_deltas
from safetensors import safe_open

from rl.models import load_pipeline
from rl.sampling import encode, tokenize
from tune.fusion import LoraArg, fuse, fuse_files, load_fused, parse_lora_arg
from tune.lora_io import (
    LoraFile,
    LoraFormatError,
    LoraModule,
    parse_state_dict,
    read_lora,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loras(tiny_sd_dir, tmp_path_factory):
    """A: text encoder + U-Net attention, rank 4, alpha 8 (scale 2).
    B: text encoder + U-Net to_q/to_v only, rank 2, alpha 1 (scale 0.5): other ranks, fewer modules."""
    root = tmp_path_factory.mktemp("loras")
    a = make_lora(tiny_sd_dir, root / "a", rank=4, alpha=8, seed=1)
    b = make_lora(tiny_sd_dir, root / "b", rank=2, alpha=1, seed=2, unet_targets=["to_q", "to_v"])
    return a, b


def _outputs(pipe):
    """Text-encoder states and one U-Net prediction: what a LoRA changes."""
    ids = tokenize(pipe.tokenizer, ["a red ball", ""])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = encode(pipe.text_encoder, ids)
        eps = pipe.unet(x, torch.tensor([500, 20]), encoder_hidden_states=text).sample
    return text, eps


@pytest.mark.parametrize("alphas", [(0.6, 0.4), (1.5, -0.7)])
def test_fused_file_delta_is_the_weighted_sum_of_deltas(loras, tiny_sd_dir, tmp_path, alphas):
    """Reference deltas come from diffusers itself: load each LoRA alone, fuse_lora, W - W_base."""
    a, b = loras
    path = fuse_files([a, b], alphas).save(tmp_path / "fused.safetensors")
    fused = merged_deltas(tiny_sd_dir, path)
    ref_a, ref_b = merged_deltas(tiny_sd_dir, a), merged_deltas(tiny_sd_dir, b)
    assert set(fused) == set(ref_a) | set(ref_b)
    assert set(ref_b) < set(ref_a)  # B adapts fewer modules: missing = zero delta
    assert any(k.startswith("text_encoder.") for k in fused) and any(k.startswith("unet.") for k in fused)
    for module, delta in fused.items():
        expected = alphas[0] * ref_a[module] + alphas[1] * ref_b.get(module, torch.zeros_like(delta))
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6, msg=module)


def test_different_ranks_fuse_exactly_in_memory(loras):
    a, b = (read_lora(p) for p in loras)
    fused = fuse([a, b], [0.3, 2.0])
    for module, m_a in a.modules.items():
        expected = 0.3 * m_a.delta() + (2.0 * b.modules[module].delta() if module in b.modules else 0)
        torch.testing.assert_close(fused.delta(module), expected, rtol=1e-5, atol=1e-7)
    ranks = {c: {fused.modules[m][0].shape[0] for m in fused.modules if m.startswith(c)} for c in ("text_encoder", "unet")}
    assert ranks == {"text_encoder": {6}, "unet": {6}}  # 4 + 2, modules only in A zero-padded to 6


def test_alpha_zero_is_the_base_model_and_alpha_one_is_that_lora(loras, tiny_sd_dir):
    a, b = loras
    base = _outputs(load_pipeline(tiny_sd_dir, device="cpu"))
    only_a = load_pipeline(tiny_sd_dir, device="cpu")
    only_a.load_lora_weights(str(a))
    lora_a = _outputs(only_a)

    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    for alphas, expected in (((0.0, 0.0), base), ((1.0, 0.0), lora_a)):
        load_fused(pipe, fuse_files([a, b], alphas))
        for got, want in zip(_outputs(pipe), expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lora_a[0], base[0]) and not torch.allclose(lora_a[1], base[1])


def test_mixing_the_factors_linearly_is_not_the_weighted_sum(loras, tiny_sd_dir, tmp_path):
    """peft's `add_weighted_adapter(combination_type="linear")` trap: (sum a_i B_i)(sum a_i A_i) has cross terms."""
    a = read_lora(loras[0])
    a2 = read_lora(make_lora(tiny_sd_dir, tmp_path / "a2", rank=4, alpha=8, seed=3))
    module = next(iter(a.modules))
    m1, m2 = a.modules[module], a2.modules[module]
    naive = LoraModule(down=0.5 * m1.down + 0.5 * m2.down, up=0.5 * m1.up + 0.5 * m2.up, scale=m1.scale).delta()
    exact = fuse([a, a2], [0.5, 0.5]).delta(module)
    torch.testing.assert_close(exact, 0.5 * m1.delta() + 0.5 * m2.delta(), rtol=1e-5, atol=1e-7)
    assert (naive - exact).abs().max() > 0.1 * exact.abs().max()


def test_mismatched_shapes_name_the_module_and_both_files():
    def lora(path, width):
        return LoraFile(path, {"unet.mid.to_q": LoraModule(torch.zeros(2, width), torch.zeros(width, 2), 1.0)})

    with pytest.raises(LoraFormatError, match=r"unet\.mid\.to_q.*a\.safetensors.*b\.safetensors.*same base model"):
        fuse([lora("a.safetensors", 32), lora("b.safetensors", 64)], [1.0, 1.0])
    # the same output width but another input width: the same one-line error, not torch's shape error
    narrow = LoraFile("c.safetensors", {"unet.mid.to_q": LoraModule(torch.zeros(2, 16), torch.zeros(32, 2), 1.0)})
    with pytest.raises(LoraFormatError, match=r"unet\.mid\.to_q.*a\.safetensors.*c\.safetensors.*same base model"):
        fuse([lora("a.safetensors", 32), narrow], [1.0, 1.0])


def test_missing_file_and_bad_alpha_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        fuse_files([tmp_path / "nope.safetensors"], [1.0])
    with pytest.raises(FileNotFoundError, match="has no pytorch_lora_weights"):
        read_lora(tmp_path)
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_lora_arg("A.safetensors:abc")
    with pytest.raises(ValueError, match="names no file"):
        parse_lora_arg(":0.5")
    with pytest.raises(ValueError, match=r"^--lora 'run/final_lora:0\.5:0\.3' gives two alphas \(0\.5 and 0\.3\); "
                                         r"write PATH\[:ALPHA\], e\.g\. run/final_lora:0\.3$"):  # not "no such file"
        parse_lora_arg("run/final_lora:0.5:0.3")
    (tmp_path / "v:2").write_text("")  # a file whose name holds a colon and a number is a file
    assert parse_lora_arg(f"{tmp_path / 'v:2'}:0.3") == LoraArg(str(tmp_path / "v:2"), 0.3)
    assert parse_lora_arg("A.safetensors:0.6").alpha == 0.6
    assert parse_lora_arg("dir/A.safetensors").alpha is None
    assert parse_lora_arg("/x/A.safetensors:-1e-1").alpha == -0.1


def test_key_formats_parse_to_the_same_delta():
    down, up = torch.randn(2, 32, 3, 3), torch.randn(64, 2, 1, 1)
    conv = "down_blocks.1.resnets.0.conv1"
    expected = (up.flatten(1) @ down.flatten(1)).reshape(64, 32, 3, 3)
    kohya = {
        f"lora_unet_{conv.replace('.', '_')}.lora_down.weight": down,
        f"lora_unet_{conv.replace('.', '_')}.lora_up.weight": up,
        f"lora_unet_{conv.replace('.', '_')}.alpha": torch.tensor(4.0),
    }
    formats = {
        "kohya (alpha 4, r 2)": (kohya, {}, 2.0),
        "peft, no metadata": ({f"unet.{conv}.lora_A.weight": down, f"unet.{conv}.lora_B.weight": up}, {}, 1.0),
        "diffusers": ({f"unet.{conv}.lora.down.weight": down, f"unet.{conv}.lora.up.weight": up}, {}, 1.0),
        "peft + metadata": (
            {f"unet.{conv}.lora_A.weight": down, f"unet.{conv}.lora_B.weight": up},
            {"lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 1})}, 0.5,
        ),
    }
    for name, (tensors, metadata, scale) in formats.items():
        lora = parse_state_dict(tensors, metadata, source=name)
        assert list(lora.modules) == [f"unet.{conv}"], name
        torch.testing.assert_close(lora.modules[f"unet.{conv}"].delta(), scale * expected, msg=name)
    legacy = parse_state_dict(
        {"mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": torch.zeros(2, 64),
         "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.zeros(64, 2)},
        {}, source="legacy",
    )
    assert list(legacy.modules) == ["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"]
    # a peft state dict of the text encoder saved as-is has no prefix either: it was read as the U-Net's and fused into
    # a file that loads into nothing
    k_proj = "encoder.layers.0.self_attn.k_proj"
    for prefix, said in (("", "a text encoder's LoRA without the `text_encoder.` prefix"),
                         ("text_model.", "a text encoder's LoRA without the `text_encoder.` prefix"),
                         ("base_model.model.text_model.", "a peft adapter file")):
        unprefixed = {f"{prefix}{k_proj}.lora_A.weight": torch.zeros(2, 32),
                      f"{prefix}{k_proj}.lora_B.weight": torch.zeros(32, 2)}
        with pytest.raises(LoraFormatError, match=re.escape(f"names no component (unet., text_encoder.): it is {said}")):
            parse_state_dict(unprefixed, {}, source="adapter.safetensors")
    with pytest.raises(LoraFormatError, match="not a LoRA factor"):
        parse_state_dict({"unet.x.weight": torch.zeros(2)}, {}, source="odd.safetensors")


def test_text_encoder_keys_of_both_transformers_eras_name_one_module():
    """transformers 5 has no `text_model.` level in CLIPTextModel; files from 4.x still have it."""
    down, up = torch.randn(2, 32), torch.randn(32, 2)
    q = "encoder.layers.0.self_attn.q_proj"
    new = parse_state_dict({f"text_encoder.{q}.lora_A.weight": down, f"text_encoder.{q}.lora_B.weight": up}, {},
                           source="new")
    old = parse_state_dict({f"text_encoder.text_model.{q}.lora_A.weight": down,
                            f"text_encoder.text_model.{q}.lora_B.weight": up}, {}, source="old")
    assert list(new.modules) == list(old.modules) == [f"text_encoder.{q}"]


def test_fuse_cli_writes_a_loadable_file_with_provenance(loras, tiny_sd_dir, tmp_path, capsys):
    from rl.cli import main

    a, b = loras
    out = tmp_path / "F.safetensors"
    assert main(["fuse", "--lora", f"{a}:0.6", "--lora", f"{b}:0.4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fused 2 LoRAs" in printed and "rank [6]" in printed  # 4 + 2: both LoRAs' factors, stacked
    with safe_open(str(out), "pt") as f:
        record = json.loads(f.metadata()["texforce_fusion"])
    assert record["alphas"] == [0.6, 0.4]
    pipe = load_pipeline(tiny_sd_dir, device="cpu")
    pipe.load_lora_weights(str(out))
    scales = {m.scaling["default_0"] for m in pipe.unet.modules() if hasattr(m, "scaling") and m.scaling}
    assert scales == {1.0}


# --- bad input: one line and exit code 2, before any work --------------------------------------




def test_fuse_bad_inputs_are_one_line(loras, tmp_path, capsys):
    from rl.cli import main

    a, _ = loras
    out = str(tmp_path / "F.safetensors")
    missing = tmp_path / "nope.safetensors"
    assert one_line_error(capsys, main(["fuse", "--lora", str(missing), "--out", out])) == (
        f"texforce fuse: LoRA file not found: {missing} (a .safetensors file or a directory written by save_lora)")
    assert "alpha 'x' is not a number" in one_line_error(capsys, main(["fuse", "--lora", f"{a}:x", "--out", out]))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(a.read_bytes()[:-64])
    line = one_line_error(capsys, main(["fuse", "--lora", str(truncated), "--out", out]))
    assert line.startswith(f"texforce fuse: {truncated} is not a readable safetensors file")
    assert not (tmp_path / "F.safetensors").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_lora_with_non_finite_weights_is_named_with_its_module(loras, tmp_path, capsys, value):
    from safetensors.torch import load_file, save_file

    from rl.cli import main

    tensors = load_file(loras[1])
    key = next(k for k in sorted(tensors) if k.startswith("unet.") and k.endswith("lora.up.weight"))
    tensors[key][0, 0] = value
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken)
    module = key.removesuffix(".lora.up.weight")
    with pytest.raises(LoraFormatError, match=re.escape(f"{broken}: module {module} has NaN or inf values in its up")):
        read_lora(broken)
    out = tmp_path / "F.safetensors"
    line = one_line_error(capsys, main(["fuse", "--lora", str(loras[0]), "--lora", str(broken), "--out", str(out)]))
    assert line.startswith(f"texforce fuse: {broken}: module {module} has NaN or inf values") and not out.exists()


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_saved_lora_files_follow_the_umask(tiny_sd_dir, tmp_path, umask):
    """safetensors writes owner-only files; a LoRA gets the mode every other output gets."""
    import os

    previous = os.umask(umask)
    try:
        trained = make_lora(tiny_sd_dir, tmp_path / "trained", rank=2, alpha=2, seed=0, policy="unet")  # rl.lora
        fused = fuse_files([trained], [0.5]).save(tmp_path / "fused.safetensors")  # tune.lora_io.write_lora
    finally:
        os.umask(previous)
    assert [oct(path.stat().st_mode & 0o777) for path in (trained, fused)] == [oct(0o666 & ~umask)] * 2


def test_fuse_refuses_an_existing_output_before_the_work(loras, tmp_path, capsys, monkeypatch):
    from rl.cli import main

    out = tmp_path / "F.safetensors"
    out.write_bytes(b"keep me")
    monkeypatch.setattr("tune.fusion.fuse", lambda *a, **k: pytest.fail("fused before refusing the output"))
    line = one_line_error(capsys, main(["fuse", "--lora", str(loras[0]), "--out", str(out)]))
    assert line == f"texforce fuse: {out} already exists; remove it or choose another --out"
    assert out.read_bytes() == b"keep me"
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "pytorch_lora_weights.safetensors").write_bytes(b"keep me too")
    assert "dir/pytorch_lora_weights.safetensors already exists" in one_line_error(
        capsys, main(["fuse", "--lora", str(loras[0]), "--out", str(tmp_path / "dir")]))


def test_loras_of_different_base_models_are_named_by_the_fuse_command(tmp_path, capsys):
    from rl.cli import main
    from tune.lora_io import write_lora

    a = write_lora({"unet.mid.to_q": (torch.zeros(2, 32), torch.zeros(32, 2))}, tmp_path / "a.safetensors")
    b = write_lora({"unet.mid.to_q": (torch.zeros(2, 64), torch.zeros(64, 2))}, tmp_path / "b.safetensors")
    line = one_line_error(capsys, main(["fuse", "--lora", str(a), "--lora", str(b), "--out", str(tmp_path / "F.safetensors")]))
    assert f"{a} adapts a weight of shape (32, 32) but {b} one of (64, 64); were these trained on the same base model?" in line


def test_a_lora_that_does_not_fit_the_model_is_named(tiny_sd_dir, tmp_path):
    from pathlib import Path

    from tune.fusion import check_base_model

    model = Path(tiny_sd_dir)
    fits = LoraFile("fits.safetensors", {"unet.conv_in": LoraModule(torch.zeros(2, 4, 3, 3), torch.zeros(32, 2, 1, 1), 1.0)})
    check_base_model(fits, model)
    # a 1x1 convolution adapted by linear factors (peft's shape for it, and what diffusers loads) fits too
    proj_in = load_pipeline(tiny_sd_dir, device="cpu").unet.mid_block.attentions[0].proj_in.weight
    assert proj_in.dim() == 4 and proj_in.shape[2:] == (1, 1)
    linear = LoraFile("linear.safetensors", {"unet.mid_block.attentions.0.proj_in": LoraModule(
        torch.zeros(2, proj_in.shape[1]), torch.zeros(proj_in.shape[0], 2), 1.0)})
    check_base_model(linear, model)
    wider = LoraFile("wide.safetensors", {"unet.conv_in": LoraModule(torch.zeros(2, 8, 3, 3), torch.zeros(32, 2, 1, 1), 1.0)})
    with pytest.raises(LoraFormatError, match=r"wide\.safetensors adapts unet\.conv_in as a \(32, 8, 3, 3\) weight but "
                                              r"the model .* has \(32, 4, 3, 3\): the LoRA was trained on another base model"):
        check_base_model(wider, model)
    other = LoraFile("sdxl.safetensors", {"text_encoder_2.encoder.layers.0.self_attn.q_proj":
                                          LoraModule(torch.zeros(2, 32), torch.zeros(32, 2), 1.0)})
    with pytest.raises(LoraFormatError, match=r"sdxl\.safetensors adapts text_encoder_2\..*q_proj, which the model .* "
                                              r"does not have: the LoRA was trained on another base model"):
        check_base_model(other, model)


@pytest.mark.parametrize("patterns, scales", [
    ({"to_q": 2, "attn1.to_q": 16}, {2 / 4, 8 / 4}),  # two patterns match attn1.to_q: peft takes the first
    ({"attn1.to_q|attn2.to_k": 16}, {16 / 4, 8 / 4}),  # an alternation: peft matches `(.*\.)?(pattern)$`
])
def test_a_peft_alpha_pattern_scales_each_module_as_diffusers_loads_it(loras, tiny_sd_dir, tmp_path, patterns,
                                                                       scales):
    from safetensors.torch import save_file

    with safe_open(str(loras[0]), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    config["unet.alpha_pattern"] = patterns
    path = tmp_path / "patterned.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    ours, loaded = read_lora(path), merged_deltas(tiny_sd_dir, path)
    # rank 4: the patterned modules' alpha, and the others' lora_alpha 8
    assert {module.scale for name, module in ours.modules.items() if name.startswith("unet.")} == scales
    for name, module in ours.modules.items():
        torch.testing.assert_close(module.delta(), loaded[name], rtol=1e-4, atol=1e-6)


def _with_adapter_config(source, path, change, tensors_change=None):
    """A copy of the LoRA file `source` at `path` with its adapter config (the safetensors metadata) edited."""
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is not a dict
        metadata = handle.metadata()
    config = json.loads(metadata["lora_adapter_metadata"])
    change(config)
    if tensors_change is not None:
        tensors_change(tensors)
    save_file(tensors, str(path), metadata={**metadata, "lora_adapter_metadata": json.dumps(config)})
    return path


def _keep_rank_2_of_to_q(tensors):
    for key in list(tensors):
        if key.startswith("unet.") and ".to_q." in key:
            down = "lora_A" in key or ".down." in key
            tensors[key] = (tensors[key][:2] if down else tensors[key][:, :2]).contiguous()


@pytest.mark.parametrize("change, tensors_change", [
    (lambda c: c.update({"unet.alpha_pattern": {"attn1": 16}}), None),  # matches a whole name part only: not attn1.to_q
    (lambda c: c.update({"unet.use_rslora": True, "text_encoder.use_rslora": True}), None),  # alpha / sqrt(r)
    (lambda c: c.update({"text_encoder.alpha_pattern": {"q_proj": 16}}), None),  # the text encoder's own patterns
    (lambda c: c.update({"unet.rank_pattern": {"to_q": 2}}), _keep_rank_2_of_to_q),  # alpha over each module's rank
], ids=["anchored-pattern", "rslora", "text-encoder-pattern", "rank-pattern"])
# peft says the anchored pattern matched no module, as our reading has it
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match any targeted module")
def test_peft_scale_options_give_the_deltas_diffusers_loads(loras, tiny_sd_dir, tmp_path, change, tensors_change):
    path = _with_adapter_config(loras[0], tmp_path / "edited.safetensors", change, tensors_change)
    ours, loaded = read_lora(path), merged_deltas(tiny_sd_dir, path)
    assert set(ours.modules) == set(loaded)
    for name, module in ours.modules.items():
        torch.testing.assert_close(module.delta(), loaded[name], rtol=1e-4, atol=1e-6)


def test_a_dora_adapter_is_refused_as_not_a_weight_delta():
    tensors = {"unet.m.lora_A.weight": torch.zeros(2, 8), "unet.m.lora_B.weight": torch.zeros(8, 2)}
    metadata = {"lora_adapter_metadata": json.dumps({"unet.use_dora": True, "unet.lora_alpha": 2})}
    with pytest.raises(LoraFormatError, match=r"d\.safetensors is a DoRA adapter"):
        parse_state_dict(tensors, metadata, source="d.safetensors")
