"""LoRA and textual inversion: parity with Diffusers + peft on the tiny SD checkpoint, in every supported format.

The LoRA files are built here with known keys: Diffusers/PEFT (written by Diffusers' `save_lora_weights`), Kohya/A1111
(LoCon convolutions included, with alphas), and Diffusers' older attention-processor format. Most checks compare the
text encoder's embeddings and one UNet pass (cheap); one test runs the whole pipeline with a LoRA scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_rel, assert_same_images, run_both
from torch import nn

import rapiddiff
from rapiddiff.models.lora_layers import LoRALayerMixin

ATTN = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
PROCESSOR_NAMES = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora",
                   "q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}  # fmt: skip


def make_lora(pipe, fmt: str, seed: int, rank: int = 4, alpha: float = 2.0) -> dict[str, torch.Tensor]:
    """A random LoRA for every Linear/Conv2d (attention projections only for the attention-processor format)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for component, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Linear, nn.Conv2d)) or "lora" in name:
                continue
            if fmt == "attn_procs" and not name.endswith(ATTN):
                continue
            if isinstance(m, nn.Linear):
                down = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
                up = torch.randn(m.out_features, rank, generator=g) * 0.3
            else:
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) / fan_in**0.5
                up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.3
            path = name if component == "unet" else f"text_model.{name}"  # LoRA files keep CLIP's text_model.
            if fmt == "peft":
                sd[f"{component}.{path}.lora_A.weight"] = down
                sd[f"{component}.{path}.lora_B.weight"] = up
            elif fmt == "kohya":
                prefix = "lora_unet_" if component == "unet" else "lora_te_"
                flat = prefix + path.replace(".", "_")
                sd[f"{flat}.lora_down.weight"] = down
                sd[f"{flat}.lora_up.weight"] = up
                sd[f"{flat}.alpha"] = torch.tensor(alpha)
            else:  # attention processors: attn1.processor.to_q_lora.down.weight
                parent, _, leaf = path.rpartition(".")
                if leaf == "0":  # to_out.0
                    parent, _, leaf = parent.rpartition(".")
                    leaf = "to_out.0"
                processor = ".processor" if component == "unet" else ""
                sd[f"{component}.{parent}{processor}.{PROCESSOR_NAMES[leaf]}.down.weight"] = down
                sd[f"{component}.{parent}{processor}.{PROCESSOR_NAMES[leaf]}.up.weight"] = up
    return sd


def save_lora(sd: dict, folder, fmt: str):
    """Write a LoRA the way each ecosystem does; returns (what to pass to load_lora_weights, kwargs)."""
    import diffusers
    import safetensors.torch

    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "peft":
        diffusers.StableDiffusionPipeline.save_lora_weights(
            folder,
            unet_lora_layers={k[5:]: v for k, v in sd.items() if k.startswith("unet.")},
            text_encoder_lora_layers={k[13:]: v for k, v in sd.items() if k.startswith("text_encoder.")},
        )
        return str(folder), {}
    if fmt == "kohya":
        safetensors.torch.save_file(sd, folder / "my_lora.safetensors")
        return str(folder / "my_lora.safetensors"), {}
    safetensors.torch.save_file(sd, folder / "old_lora.safetensors")
    return str(folder), {"weight_name": "old_lora.safetensors"}


def load_pipes(checkpoint):
    import diffusers

    return (
        diffusers.StableDiffusionPipeline.from_pretrained(checkpoint),
        rapiddiff.StableDiffusionPipeline.from_pretrained(checkpoint),
    )


def outputs(pipe, prompt=("a red cube", "two blue spheres")) -> tuple[torch.Tensor, torch.Tensor]:
    """(text embeddings, one UNet pass on a non-square batch-2 latent) of a pipeline."""
    with torch.no_grad():
        emb, _ = pipe.encode_prompt(list(prompt), "cpu", 1, False)
        x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(1))
        out = pipe.unet(x, torch.tensor(500), encoder_hidden_states=emb, return_dict=False)[0]
    return emb, out


def assert_parity(ref, ours, base=None):
    for r, o, what in zip(ref, ours, ("text embeddings", "UNet output")):
        assert_close_rel(o, r, 1e-4, what)
    if base is not None:  # the LoRA must visibly change both
        for b, o, what in zip(base, ours, ("text embeddings", "UNet output")):
            assert (o - b).abs().max() > 1e-2 * b.abs().max(), f"the LoRA does not change the {what}"


def lora_layer_count(pipe) -> int:
    return sum(isinstance(m, LoRALayerMixin) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())


@pytest.mark.parametrize("fmt", ["peft", "kohya", "attn_procs"])
def test_lora_formats_match_diffusers_and_unload_restores(fmt, tiny_sd_dir, tmp_path):
    ref, ours = load_pipes(tiny_sd_dir)
    base = outputs(ours)
    source, kwargs = save_lora(make_lora(ref, fmt, seed=0), tmp_path / fmt, fmt)
    ref.load_lora_weights(source, adapter_name="x", **kwargs)
    ours.load_lora_weights(source, adapter_name="x", **kwargs)
    assert ours.get_list_adapters() == ref.get_list_adapters() == {"unet": ["x"], "text_encoder": ["x"]}
    assert_parity(outputs(ref), outputs(ours), base)
    # state-dict keys are untouched (the adapters are non-persistent buffers)
    assert set(ours.unet.state_dict()) == set(
        rapiddiff.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").state_dict()
    )
    ours.unload_lora_weights()
    assert lora_layer_count(ours) == 0 and ours.get_list_adapters() == {}
    after = outputs(ours)
    assert all(torch.equal(a, b) for a, b in zip(after, base)), "unload_lora_weights must restore the exact outputs"


def test_lcm_lora_workflow_matches_diffusers(tiny_sd_dir, tmp_path):
    """The LCM-LoRA recipe of Diffusers' docs: a LoRA, LCMScheduler from the pipeline's config, 4 steps, guidance 1,
    then fused; same images as Diffusers (list of prompts, non-square, two seeds)."""
    import diffusers

    ref, ours = load_pipes(tiny_sd_dir)
    source, kwargs = save_lora(make_lora(ref, "peft", seed=5), tmp_path / "lcm", "peft")
    for pipe, lib in ((ref, diffusers), (ours, rapiddiff)):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = lib.LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(source, adapter_name="lcm", **kwargs)
    args = dict(prompt=["a red cube", "two blue spheres"], seed=[0, 1], num_inference_steps=4, guidance_scale=1.0)
    args |= dict(height=32, width=48)
    assert_same_images(*run_both((ref, ours), **args))
    for pipe in (ref, ours):
        pipe.fuse_lora()
    assert_same_images(*run_both((ref, ours), **args))


def test_lora_on_the_controlnet_pipeline_matches_diffusers(tiny_sd_dir, tmp_path):
    """load_lora_weights on StableDiffusionControlNetPipeline adapts its UNet and text encoder as Diffusers does."""
    import diffusers
    from conftest import random_image

    ref, ours = load_pipes(tiny_sd_dir)
    source, kwargs = save_lora(make_lora(ref, "kohya", seed=6), tmp_path / "cn", "kohya")
    pipes = []
    for pipe, lib in ((ref, diffusers), (ours, rapiddiff)):
        controlnet = lib.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
        pipe = lib.StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(source, adapter_name="style", **kwargs)
        pipes.append(pipe)
    control = random_image(32, 48, seed=2)
    assert_same_images(*run_both(pipes, prompt=["a red cube", "a cat"], image=control, height=32, width=48))


def test_adapters_weights_disable_fuse_unfuse_delete(tiny_sd_dir, tmp_path):
    ref, ours = load_pipes(tiny_sd_dir)
    base = outputs(ours)
    a = save_lora(make_lora(ref, "peft", seed=1), tmp_path / "a", "peft")
    b = save_lora(make_lora(ref, "kohya", seed=2, alpha=8.0), tmp_path / "b", "kohya")
    for pipe in (ref, ours):
        pipe.load_lora_weights(a[0], adapter_name="a")
        pipe.load_lora_weights(b[0])  # default name
    assert ours.get_active_adapters() == ref.get_active_adapters() == ["default_1"]
    assert_parity(outputs(ref), outputs(ours))
    for pipe in (ref, ours):
        pipe.set_adapters(["a", "default_1"], adapter_weights=[0.7, -0.4])
    assert ours.get_active_adapters() == ["a", "default_1"]
    mixed = outputs(ours)
    assert_parity(outputs(ref), mixed, base)

    ours.disable_lora()
    assert all(torch.equal(x, y) for x, y in zip(outputs(ours), base)), "disable_lora must give the base outputs"
    ours.enable_lora()

    for pipe in (ref, ours):
        pipe.fuse_lora()
    fused = outputs(ours)
    assert_parity(outputs(ref), fused)
    assert_parity(mixed, fused)  # fused == unfused
    ours.unfuse_lora()
    assert all(torch.equal(x, y) for x, y in zip(outputs(ours), mixed)), "unfuse_lora must be exact"
    ref.unfuse_lora()

    for pipe in (ref, ours):
        pipe.delete_adapters("a")
    assert ours.get_list_adapters() == ref.get_list_adapters()
    assert_parity(outputs(ref), outputs(ours))

    # fuse then unload keeps the fused weights (Diffusers' way to bake a LoRA in)
    for pipe in (ref, ours):
        pipe.fuse_lora(lora_scale=0.5)
        pipe.unload_lora_weights()
    assert lora_layer_count(ours) == 0
    assert_parity(outputs(ref), outputs(ours), base)


def test_lora_scale_in_pipeline_call_and_encode_prompt(tiny_sd_dir, tmp_path):
    ref, ours = load_pipes(tiny_sd_dir)
    source, _ = save_lora(make_lora(ref, "peft", seed=3), tmp_path / "l", "peft")
    for pipe in (ref, ours):
        pipe.load_lora_weights(source)
    for r, o in zip(ref.encode_prompt("a cat", "cpu", 1, True, "blurry", lora_scale=0.3),
                    ours.encode_prompt("a cat", "cpu", 1, True, "blurry", lora_scale=0.3)):  # fmt: skip
        assert_close_rel(o, r, 1e-4, "encode_prompt(lora_scale=0.3)")
    kwargs = dict(prompt=["a red cube", "a lighthouse"], height=32, width=48, cross_attention_kwargs={"scale": 0.5})
    ref_out, our_out = run_both((ref, ours), **kwargs)
    assert_same_images(ref_out, our_out)
    with pytest.raises(ValueError, match="only the LoRA scale"):
        ours("a cat", num_inference_steps=1, cross_attention_kwargs={"foo": 1})


def test_model_level_load_lora_adapter(tiny_sd_dir, tmp_path):
    import diffusers

    ref, ours = load_pipes(tiny_sd_dir)
    sd = make_lora(ref, "peft", seed=4)
    unet_layers = {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in unet_layers})
    # rapiddiff's save_lora_weights, with Diffusers' adapter metadata (alpha 2 for rank 4: scale 0.5)
    path = ours.save_lora_weights(tmp_path / "l", unet_lora_layers=unet_layers,
                                  unet_lora_adapter_metadata={"r": 4, "lora_alpha": 2, "target_modules": targets})  # fmt: skip
    source = str(path.parent)
    unets = (diffusers.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet"),
             rapiddiff.UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet"))  # fmt: skip
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))

    def run(unet):
        with torch.no_grad():
            return unet(x, torch.tensor(10), encoder_hidden_states=emb, return_dict=False)[0]

    base = run(unets[1])
    for unet in unets:
        unet.load_lora_adapter(source, prefix="unet", adapter_name="u", weight_name="pytorch_lora_weights.safetensors")
        unet.set_adapters(["u"], weights=[0.6])
    assert unets[1].active_adapters == ["u"]
    assert_close_rel(run(unets[1]), run(unets[0]), 1e-4, "UNet with a LoRA (model level)")
    for unet in unets:
        unet.fuse_lora()
    assert_close_rel(run(unets[1]), run(unets[0]), 1e-4, "fused UNet (model level)")
    unets[1].unfuse_lora()
    unets[1].unload_lora()
    assert torch.equal(run(unets[1]), base)


def test_bad_lora_raises_and_changes_nothing(tiny_sd_dir, tmp_path):
    import safetensors.torch

    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    good = make_lora(pipe, "kohya", seed=5)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    sdxl = dict(good, **{
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
    })  # fmt: skip
    cases = {
        "sdxl": (sdxl, "another architecture.*input_blocks_4_1"),
        "rank": (dict(good, **{f"{q}.lora_up.weight": torch.zeros(64, 3)}), f"rank mismatch.*{q}"),
        "shape": (dict(good, **{f"{q}.lora_down.weight": torch.zeros(4, 33)}), f"do not fit.*{q}"),
        "half": ({k: v for k, v in good.items() if k != f"{q}.lora_up.weight"}, f"up matrix.*missing.*{q}"),
        "te2": (dict(good, **{"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                              "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 4)}),
                "'text_encoder_2', which this pipeline does not have"),
        "dora": (dict(good, **{f"{q}.dora_scale": torch.ones(1, 64)}), "DoRA is not supported"),
    }  # fmt: skip
    for name, (sd, match) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(sd, path)
        with pytest.raises(ValueError, match=f"{name}.safetensors.*{match}"):
            pipe.load_lora_weights(str(path))
        assert pipe.get_list_adapters() == {} and lora_layer_count(pipe) == 0, name
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    pipe.load_lora_weights(good, adapter_name="ok")
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(good, adapter_name="ok")
    with pytest.raises(ValueError, match="not loaded"):
        pipe.set_adapters(["nope"])
    with pytest.raises(ValueError, match="adapts other layers"):
        pipe.load_lora_weights(make_lora(pipe, "attn_procs", seed=9), adapter_name="ok", hotswap=True)
    new = make_lora(pipe, "kohya", seed=8, alpha=1.0)
    pipe.load_lora_weights(new, adapter_name="ok", hotswap=True)  # same layers and ranks: weights replaced in place
    layer = pipe.unet.get_submodule(q[len("lora_unet_") :].replace("_", ".").replace("down.blocks", "down_blocks")
                                    .replace("transformer.blocks", "transformer_blocks").replace("to.q", "to_q"))  # fmt: skip
    assert torch.equal(layer.lora_down, new[f"{q}.lora_down.weight"]) and layer.lora_slots["ok"].scale == 0.25
    with pytest.raises(TypeError, match="unexpected argument"):
        pipe.load_lora_weights(good, adapter_name="ok2", weight_nam="x")


def test_every_sd_pipeline_has_the_loaders():
    for name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                 "StableDiffusionControlNetPipeline", "StableDiffusionUpscalePipeline"):  # fmt: skip
        cls = getattr(rapiddiff, name)
        for method in ("load_lora_weights", "fuse_lora", "set_adapters", "load_textual_inversion"):
            assert callable(getattr(cls, method, None)), (name, method)


# --- textual inversion -----------------------------------------------------------------------------------------------
def test_textual_inversion_formats_match_diffusers(tiny_sd_dir, tmp_path):
    import safetensors.torch

    ref, ours = load_pipes(tiny_sd_dir)
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "cat"
    folder.mkdir()
    safetensors.torch.save_file({"<cat>": torch.randn(32, generator=g)}, folder / "learned_embeds.safetensors")
    torch.save({"string_to_param": {"*": nn.Parameter(torch.randn(3, 32, generator=g))}, "name": "<style>",
                "string_to_token": {"*": 265}, "step": 100}, tmp_path / "style.pt")  # fmt: skip
    safetensors.torch.save_file({"emb_params": torch.randn(2, 32, generator=g)}, tmp_path / "e.safetensors")
    base = ours.encode_prompt("a <cat> in <style> with <e>", "cpu", 1, False)[0]
    files = [str(folder), str(tmp_path / "style.pt"), str(tmp_path / "e.safetensors")]
    ref.load_textual_inversion(files, token=["<cat>", "<style>", "<e>"])
    ours.load_textual_inversion(files, token=[None, None, "<e>"])  # the tokens stored in the files
    prompt = ["a <cat> in <style> with <e>", "<style> dog"]
    assert ours.maybe_convert_prompt(prompt, ours.tokenizer) == ref.maybe_convert_prompt(prompt, ref.tokenizer)
    assert ours.maybe_convert_prompt("<style>", ours.tokenizer) == "<style> <style>_1 <style>_2"
    for r, o in zip(ref.encode_prompt(prompt, "cpu", 1, True, ["<e>", ""]),
                    ours.encode_prompt(prompt, "cpu", 1, True, ["<e>", ""])):  # fmt: skip
        assert_close_rel(o, r, 1e-4, "embeddings with textual inversion")
    assert (ours.encode_prompt(prompt[0], "cpu", 1, False)[0] - base).abs().max() > 1e-3

    with pytest.raises(ValueError, match="already in the tokenizer"):
        ours.load_textual_inversion(str(folder))
    with pytest.raises(ValueError, match="pass token="):
        ours.load_textual_inversion(str(tmp_path / "e.safetensors"))

    for pipe in (ref, ours):
        pipe.unload_textual_inversion("<cat>")
    assert_close_rel(ours.encode_prompt(prompt, "cpu", 1, False)[0], ref.encode_prompt(prompt, "cpu", 1, False)[0])
    ours.unload_textual_inversion()
    assert len(ours.tokenizer) == 49408 and ours.text_encoder.get_input_embeddings().weight.shape[0] == 49408
    assert torch.equal(ours.encode_prompt("a <cat> in <style> with <e>", "cpu", 1, False)[0], base)


def test_lora_and_textual_inversion_from_a_hub_id(tiny_sd_dir, tmp_path, monkeypatch):
    """load_lora_weights / load_textual_inversion take a Hub id (here from an offline cache) like a local folder."""
    import safetensors.torch
    from conftest import fake_hub_cache

    ref, ours = load_pipes(tiny_sd_dir)
    source, _ = save_lora(make_lora(ref, "peft", seed=7), tmp_path / "lora", "peft")
    (tmp_path / "ti").mkdir()
    embeds = {"<toy>": torch.randn(32, generator=torch.Generator().manual_seed(8))}
    safetensors.torch.save_file(embeds, tmp_path / "ti" / "learned_embeds.safetensors")
    fake_hub_cache(tmp_path, monkeypatch, {"tiny-org/pixel-lora": source, "tiny-org/toy": tmp_path / "ti"})
    local = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    local.load_lora_weights(source, adapter_name="pixel")
    local.load_textual_inversion(str(tmp_path / "ti"))
    ours.load_lora_weights("tiny-org/pixel-lora", adapter_name="pixel")
    ours.load_textual_inversion("tiny-org/toy")
    assert_parity(outputs(local, ("a <toy>", "b")), outputs(ours, ("a <toy>", "b")))
    with pytest.raises((FileNotFoundError, OSError, ValueError), match="tiny-org/not-there"):
        ours.load_lora_weights("tiny-org/not-there")


# --- torch.compile ---------------------------------------------------------------------------------------------------
@pytest.mark.compile
def test_lora_scale_adapter_switch_and_fuse_do_not_recompile(tiny_sd_dir):
    """Warm-up: the base model, then with two adapters. Afterwards adapter weights, the call scale, disable/enable,
    fuse (plain layers again: the base model's graph, with the weights changed in place) and unfuse recompile nothing."""
    from rapiddiff.models import lora_layers

    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    unet = pipe.unet
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))

    def check(what):
        with torch.no_grad():
            got = compiled(x, torch.tensor(10.0), encoder_hidden_states=emb, return_dict=False)[0]
            want = unet(x, torch.tensor(10.0), encoder_hidden_states=emb, return_dict=False)[0]
        assert_close_rel(got, want, 1e-4, what)
        return got

    base = check("base model")
    unet.load_lora_adapter(make_lora(pipe, "peft", seed=6), prefix="unet", adapter_name="a")
    pipe.load_lora_weights(make_lora(pipe, "kohya", seed=7), adapter_name="b")
    first = check("warm-up with adapters")
    with torch._dynamo.config.patch(error_on_recompile=True):
        unet.set_adapters(["a", "b"], [0.5, 0.8])
        mixed = check("two adapters")
        assert not torch.allclose(mixed, first) and not torch.allclose(mixed, base)
        lora_layers.set_call_scale(unet, 0.3)
        check("call scale")
        lora_layers.set_call_scale(unet, 1.0)
        unet.set_adapters("a")
        check("switch adapter")
        unet.disable_lora()
        assert torch.equal(check("disabled"), base)
        unet.enable_lora()
        unet.set_adapters(["a", "b"], [0.5, 0.8])
        unet.fuse_lora()
        assert not any(isinstance(m, LoRALayerMixin) for m in unet.modules())
        assert_close_rel(check("fused"), mixed, 1e-4, "fused vs unfused")
        unet.unfuse_lora()
        assert torch.equal(check("unfused"), mixed)
        unet.load_lora_adapter(make_lora(pipe, "peft", seed=8), prefix="unet", adapter_name="a", hotswap=True)
        assert not torch.allclose(check("hotswapped"), mixed)


def test_non_finite_numbers_through_the_side_doors_change_nothing(tiny_sd_dir, tmp_path):
    """nan/inf in adapter weights, a fuse scale, a LoRA file or a textual-inversion file: a ValueError naming it,
    before any weight or layer changes (as cross_attention_kwargs={"scale": nan} is refused)."""
    import safetensors.torch

    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    good = make_lora(pipe, "kohya", seed=5)
    poisoned = dict(good)
    key = sorted(poisoned)[3]
    poisoned[key] = poisoned[key].clone()
    poisoned[key].view(-1)[0] = float("nan")
    safetensors.torch.save_file(poisoned, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=rf"nan.safetensors.*tensor '{key}' holds 1 non-finite value"):
        pipe.load_lora_weights(str(tmp_path / "nan.safetensors"))
    assert pipe.get_list_adapters() == {} and lora_layer_count(pipe) == 0

    pipe.load_lora_weights(good, adapter_name="a")
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="adapter_weights must be finite"):
            pipe.set_adapters(["a"], adapter_weights=[bad])
        with pytest.raises(ValueError, match="lora_scale must be a finite number"):
            pipe.fuse_lora(lora_scale=bad)
    pipe.fuse_lora(lora_scale=np.float32(0.5))  # numpy numbers still work
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())

    safetensors.torch.save_file({"<bad>": torch.tensor([1.0, float("inf")] + [0.0] * 30)}, tmp_path / "ti.safetensors")
    with pytest.raises(ValueError, match=r"ti.safetensors: the embedding of token '<bad>' holds 1 non-finite"):
        pipe.load_textual_inversion(str(tmp_path / "ti.safetensors"))
    assert len(pipe.tokenizer) == 49408


# --- the call scale is per call ----------------------------------------------------------------------------------------
def test_lora_call_scale_is_restored_after_a_call_and_after_a_call_that_raised(tiny_sd_dir):
    """`cross_attention_kwargs={"scale": s}` scales the UNet's adapters for that call only: a direct UNet call after
    it (returned or raised) gives what it gave before, and `lora_scale` reads 1.0 outside calls."""
    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(make_lora(pipe, "peft", seed=4))
    before = outputs(pipe)
    seen = []

    def record(p, i, t, kwargs):
        seen.append(p.lora_scale)
        return {}

    pipe("a cat", num_inference_steps=2, cross_attention_kwargs={"scale": 0.3}, callback_on_step_end=record)
    assert seen and set(seen) == {0.3} and pipe.lora_scale == 1.0
    for a, b in zip(before, outputs(pipe)):
        assert torch.equal(a, b)

    def fail(p, i, t, kwargs):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        pipe("a cat", num_inference_steps=2, cross_attention_kwargs={"scale": 0.3}, callback_on_step_end=fail)
    for a, b in zip(before, outputs(pipe)):
        assert torch.equal(a, b)
