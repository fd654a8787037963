"""enable_gradient_checkpointing: the same loss and gradients, the blocks recomputed in the backward pass."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_sd_components

import rapiddiff


def count_forwards(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_same_gradients_and_recomputed(kind):
    ref = tiny_sd_components()[kind]
    models = []
    for _ in range(2):
        model = getattr(rapiddiff, type(ref).__name__)(**ref.config).train()
        model.load_state_dict(ref.state_dict())
        models.append(model)
    g = torch.Generator().manual_seed(0)
    if kind == "unet":
        inputs = (torch.randn(2, 4, 16, 16, generator=g), 10, torch.randn(2, 7, 32, generator=g))
        probe = "down_blocks.1.resnets.0"
    else:
        inputs = (torch.randn(1, 3, 32, 32, generator=g),)
        probe = "decoder.up_blocks.0.resnets.0"
    plain, checkpointed = models
    assert not checkpointed.is_gradient_checkpointing
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    calls = [count_forwards(m.get_submodule(probe)) for m in models]
    grads = []
    for model in models:
        out = model(*inputs, return_dict=False)[0]
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert calls[0][0] == 1 and calls[1][0] == 2, "the checkpointed block ran again in the backward pass"
    with torch.no_grad():  # no gradients: no recomputation, same output
        torch.testing.assert_close(checkpointed(*inputs).sample, plain(*inputs).sample)
    checkpointed.disable_gradient_checkpointing()
    assert not checkpointed.is_gradient_checkpointing
    assert all("forward" not in m.__dict__ for m in checkpointed.modules())


@pytest.mark.parametrize("kind", ["unet", "vae"])
def test_checkpointed_blocks_have_diffusers_class_names(kind):
    """Diffusers' test_gradient_checkpointing_is_applied: the class names of the modules checkpointing is enabled on
    (Diffusers' block classes: CrossAttnDownBlock2D..., the VAE's Encoder, Decoder, UNetMidBlock2D)."""
    ref = tiny_sd_components()[kind]
    ours = getattr(rapiddiff, type(ref).__name__)(**ref.config)
    names = []
    for model in (ref, ours):
        model.enable_gradient_checkpointing()
        names.append({type(m).__name__ for m in model.modules() if getattr(m, "gradient_checkpointing", False)})
    assert names[1] == names[0] and len(names[0]) >= 3


def test_unsupported_model_says_so():
    net = rapiddiff.ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
                                    norm_num_groups=16, conditioning_embedding_out_channels=(16, 32))  # fmt: skip
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        net.enable_gradient_checkpointing()
