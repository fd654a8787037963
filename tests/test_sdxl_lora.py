"""LoRA on SDXL (the UNet and both text encoders; Diffusers/PEFT and Kohya's SGM-named SDXL files) and textual
inversion with SDXL's two embeddings (clip_l / clip_g), against diffusers on the tiny SDXL checkpoint."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import run_both

from rapiddiff import StableDiffusionXLPipeline
from rapiddiff.models.lora_conversion import original_unet_names

RANK = 4
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2")
TEXT_TARGETS = ("q_proj", "v_proj", "out_proj")


@pytest.fixture
def pipes(tiny_sdxl_dir):
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    ours = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    for p in (ref, ours):
        p.set_progress_bar_config(disable=True)
    return ref, ours


def lora_layers(pipe) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
    """The layers the test LoRA adapts, per component (some attention, projection and feed-forward layers)."""
    out = {}
    for component, targets in (
        ("unet", UNET_TARGETS),
        ("text_encoder", TEXT_TARGETS),
        ("text_encoder_2", TEXT_TARGETS),
    ):
        model = getattr(pipe, component)
        out[component] = [
            (name, m)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(targets) and ("layers.2" not in name)
        ]
    return out


def random_lora(pipe, seed: int = 0) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return {
        c: {n: (torch.randn(RANK, m.in_features, generator=g) * 0.3, torch.randn(m.out_features, RANK, generator=g) * 0.3)
            for n, m in layers}
        for c, layers in lora_layers(pipe).items()
    }  # fmt: skip


def peft_format(lora) -> dict[str, torch.Tensor]:
    state = {}
    for component, layers in lora.items():
        for name, (down, up) in layers.items():
            state[f"{component}.{name}.lora_A.weight"] = down
            state[f"{component}.{name}.lora_B.weight"] = up
    return state


def kohya_format(lora, unet_names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Kohya's SDXL spelling: the UNet in the original (SGM) layout's names, te1/te2 for the text encoders."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    state = {}
    for component, layers in lora.items():
        for name, (down, up) in layers.items():
            name = unet_names[name] if component == "unet" else name
            key = prefixes[component] + name.replace(".", "_")
            state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)}
    return state


def test_sgm_names_follow_the_config(pipes):
    names = original_unet_names(pipes[1].unet)
    assert names["down_blocks.1.attentions.0.proj_in"] == "input_blocks.4.1.proj_in"  # after 3 + 1 downsampler
    assert (
        names["mid_block.attentions.0.transformer_blocks.1.attn2.to_k"]
        == "middle_block.1.transformer_blocks.1.attn2.to_k"
    )
    assert names["up_blocks.0.resnets.2.conv1"] == "output_blocks.2.0.in_layers.2"
    assert names["add_embedding.linear_1"] == "label_emb.0.0"


@pytest.mark.parametrize("form", ["peft", "kohya"])
def test_lora_on_unet_and_both_text_encoders_matches_diffusers(pipes, form):
    ref, ours = pipes
    lora = random_lora(ours)
    state = peft_format(lora) if form == "peft" else kohya_format(lora, original_unet_names(ours.unet))
    plain = run_both(pipes)[1].images
    for pipe in pipes:
        pipe.load_lora_weights(dict(state), adapter_name="style")
    assert {len(v) for v in ours.get_list_adapters().values()} == {1} and len(ours.get_list_adapters()) == 3
    ref_out, our_out = run_both(pipes, cross_attention_kwargs={"scale": 0.7})
    np.testing.assert_allclose(our_out.images, ref_out.images, rtol=0, atol=2e-3)
    assert abs(our_out.images - plain).max() > 1e-2  # the LoRA changed the image
    ours.fuse_lora(lora_scale=0.7)  # SDXL's default components: the UNet and both encoders
    fused = run_both((ref, ours))[1].images
    np.testing.assert_allclose(fused, our_out.images, rtol=0, atol=2e-3)


def test_textual_inversion_with_clip_l_and_clip_g(pipes):
    g = torch.Generator().manual_seed(3)
    embeddings = {"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 32, generator=g)}
    for pipe in pipes:
        pipe.load_textual_inversion(embeddings["clip_l"], token="<cat-toy>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)  # fmt: skip
        pipe.load_textual_inversion(embeddings["clip_g"], token="<cat-toy>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)  # fmt: skip
    ref, ours = run_both(pipes, prompt="a <cat-toy> on a table")
    np.testing.assert_allclose(ours.images, ref.images, rtol=0, atol=2e-3)
