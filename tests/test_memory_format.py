"""Memory layout: every convolution of the UNets, the ControlNet and the VAE receives its input in the memory format of
the model's weights, in the default (contiguous) format and in channels_last. Structural (forward pre-hooks), no timing:
a convolution fed the other layout converts its input or falls back to a slower kernel on every call."""

from __future__ import annotations

import pytest
import torch
from test_controlnet import randomise_output_layers
from test_unet import IF_I, IF_II, INPAINT, SD1, SD2, X4, inputs

import rapiddiff

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
)


def unet(config: dict):
    torch.manual_seed(0)
    return rapiddiff.UNet2DConditionModel(**config).eval(), inputs(config), lambda m, kw: m(**kw, return_dict=False)


def controlnet():
    model, kw, _ = unet(SD1)
    net = randomise_output_layers(
        rapiddiff.ControlNetModel.from_unet(model, conditioning_embedding_out_channels=(8, 16)), 0
    )
    kw = dict(kw, controlnet_cond=torch.randn(2, 3, 32, 48), conditioning_scale=torch.tensor(0.7))
    return net, kw, lambda m, kw: m(**kw, return_dict=False)


def vae(part: str):
    torch.manual_seed(0)
    model = rapiddiff.AutoencoderKL(**VAE).eval()
    if part == "decode":
        return model, dict(z=torch.randn(2, 4, 12, 10)), lambda m, kw: m.decode(**kw)
    return model, dict(x=torch.randn(2, 3, 24, 20)), lambda m, kw: m.encode(**kw)


CASES = {
    "sd": lambda: unet(SD1),
    "sd2": lambda: unet(SD2),
    "inpaint": lambda: unet(INPAINT),
    "if-i": lambda: unet(IF_I),
    "if-ii": lambda: unet(IF_II),
    "x4": lambda: unet(X4),
    "controlnet": controlnet,
    "vae-encode": lambda: vae("encode"),
    "vae-decode": lambda: vae("decode"),
}


def convolutions_fed_other_layouts(model, kw: dict, run, memory_format: torch.memory_format) -> list[str]:
    """Names of the Conv2d layers whose input is not laid out in `memory_format` (the model's, inputs included)."""
    model.to(memory_format=memory_format)
    kw = {k: v.contiguous(memory_format=memory_format) if v.ndim == 4 else v for k, v in kw.items()}
    wrong = []

    def check(name):
        def hook(module, args):
            if not args[0].is_contiguous(memory_format=memory_format):
                wrong.append(f"{name} (strides {args[0].stride()})")

        return hook

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    handles = [m.register_forward_pre_hook(check(n)) for n, m in convs]
    try:
        with torch.no_grad():
            run(model, kw)
    finally:
        for h in handles:
            h.remove()
    return wrong


@pytest.mark.parametrize("name", list(CASES))
def test_every_convolution_gets_the_layout_of_the_weights(name):
    model, kw, run = CASES[name]()
    for label, memory_format in FORMATS.items():
        assert convolutions_fed_other_layouts(model, kw, run, memory_format) == [], f"{name}, {label} model"
