"""Custom Diffusion processors: Diffusers' files load in both directions and give Diffusers' outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close_rel, tiny_sd_components

import rapiddiff


def custom_diffusion_processors(library, model, seed: int = 0) -> dict:
    """Trained-looking Custom Diffusion processors (library's class) on every cross-attention layer."""
    g = torch.Generator().manual_seed(seed)
    procs = {}
    for name in model.attn_processors:
        layer = model.get_submodule(name[: -len(".processor")])
        hidden = layer.to_q.out_features
        if name.endswith("attn1.processor"):
            procs[name] = library.CustomDiffusionAttnProcessor(False, False, hidden_size=hidden)
            continue
        proc = library.CustomDiffusionAttnProcessor(True, True, hidden_size=hidden, cross_attention_dim=32)
        with torch.no_grad():
            for p in proc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        procs[name] = proc
    return procs


def pair():
    ref = tiny_sd_components()["unet"]
    ours = rapiddiff.UNet2DConditionModel(**ref.config)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 16, 16, generator=g), 10, torch.randn(2, 7, 32, generator=g))
    return ref, ours, inputs


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


@pytest.mark.parametrize("safe", [False, True])
def test_diffusers_files_load_and_ours_are_the_same(tmp_path, safe):
    import diffusers.models.attention_processor as library

    ref, ours, inputs = pair()
    plain = run(ours, inputs)
    ref.set_attn_processor(custom_diffusion_processors(library, ref))
    want = run(ref, inputs)
    ref.save_attn_procs(tmp_path / "diffusers", safe_serialization=safe)
    ours.load_attn_procs(tmp_path / "diffusers")
    got = run(ours, inputs)
    assert_close_rel(got, want, 1e-4, "Diffusers' file in rapiddiff")
    assert (got - plain).abs().max() > 1e-3
    # Diffusers' `unet.load_attn_procs` reads such a file but (0.42.1) sets the processors only for a pipeline: compare
    # the files themselves
    ours.save_attn_procs(tmp_path / "ours", safe_serialization=safe)
    name = "pytorch_custom_diffusion_weights." + ("safetensors" if safe else "bin")
    theirs, mine = (load(tmp_path / folder / name) for folder in ("diffusers", "ours"))
    assert theirs.keys() == mine.keys()
    for key, value in theirs.items():
        assert torch.equal(mine[key], value) if torch.is_tensor(value) else mine[key] == value, key


def load(path):
    import safetensors.torch

    return safetensors.torch.load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)


def test_rapiddiff_processors_match_diffusers():
    import diffusers.models.attention_processor as library

    ref, ours, inputs = pair()
    ref_procs = custom_diffusion_processors(library, ref)
    ours_procs = custom_diffusion_processors(rapiddiff, ours)
    for name, proc in ours_procs.items():
        proc.load_state_dict(ref_procs[name].state_dict())
    ref.set_attn_processor(ref_procs)
    ours.set_attn_processor(ours_procs)
    assert_close_rel(run(ours, inputs), run(ref, inputs), 1e-4, "CustomDiffusionAttnProcessor2_0")
    ours.set_attn_processor({n: rapiddiff.CustomDiffusionAttnProcessor(p.train_kv, p.train_q_out, p.hidden_size,
                                                                       p.cross_attention_dim)
                             for n, p in ours_procs.items()})  # fmt: skip
    key = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight"
    assert key in ours.state_dict(), "the processors' weights are the model's (moved by .to(), saved)"


def test_bad_files(tmp_path):
    _, ours, _ = pair()
    with pytest.raises(ValueError, match="load_lora_adapter"):
        ours.load_attn_procs({"down_blocks.0.attn.lora_A.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="does not have"):
        ours.load_attn_procs({"nowhere.processor.to_k_custom_diffusion.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="no Custom Diffusion processors"):
        ours.save_attn_procs(tmp_path)
    with pytest.raises(FileNotFoundError, match="no Custom Diffusion weights"):
        ours.load_attn_procs(tmp_path)
