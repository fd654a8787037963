"""CPU int8 static quantization of a pipeline's UNet (beyond Diffusers): PT2E with torchao's `X86InductorQuantizer`,
calibrated on the pipeline's own denoising steps, then compiled with inductor freezing.

    report = rapiddiff.quantize_pipeline(pipe, "int8-static", calibration_prompts=["a castle", "a forest"],
                                         num_inference_steps=20)
    print(report)            # max |diff| and PSNR of the calibration images against the float pipeline

Steps: (1) the float pipeline generates the calibration prompts' images (seeded) while every UNet input is recorded;
(2) the UNet is exported (`torch.export`) at the recorded shapes, annotated by the quantizer (convolutions, linears and
the ops around them: int8 activations with per-tensor scales, int8 weights per channel), observed on the recorded
inputs and converted; (3) the converted graph is compiled with freezing (weights packed for oneDNN's int8 kernels,
VNNI / AMX) and takes the UNet's place in `pipe.unet`'s calls; (4) the same prompts and seeds run again and the
images are compared with step (1)'s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..frozen import _global_freezing
from .config import import_torchao
from .cpu import cpu_precisions

MODES = ("int8-static",)
# Freezing packs the int8 weights once for oneDNN; max-autotune also times inductor's C++ GEMM templates (AMX / VNNI
# int8 micro-kernels) against oneDNN for each linear layer and keeps the faster: on the full SD 1.5 UNet at 32x32
# latents it made the int8 UNet ~4% faster for ~75 s more compile (docs/precision.md).
INT8_STATIC_INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True}


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """How far the quantized pipeline's images are from the float pipeline's, on the calibration prompts (same seeds;
    images in [0, 1])."""

    mode: str
    calibration_prompts: tuple[str, ...]
    num_inference_steps: int
    calibration_calls: int  # UNet calls observed
    max_abs_diff: float
    psnr_db: float

    def __str__(self) -> str:
        return (
            f"{self.mode}: {self.calibration_calls} UNet calls observed ({len(self.calibration_prompts)} prompts x "
            f"{self.num_inference_steps} steps); images vs float: max |diff| {self.max_abs_diff:.4f}, "
            f"PSNR {self.psnr_db:.1f} dB"
        )


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio of images in [0, 1], in dB (inf when identical)."""
    mse = float(np.mean((images.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


class _UNetCore(nn.Module):
    """The UNet as the denoising loop calls it, positional tensors in, the sample out (what torch.export takes)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _Recorder:
    """Stands in for the UNet's call during the float run: records each call's inputs, runs the UNet eagerly."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet = unet
        self.inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> Any:
        extra = sorted(k for k in kwargs if k not in ("encoder_hidden_states", "return_dict"))
        if extra:
            raise ValueError(
                f"quantize_pipeline: the UNet is called with {extra}; int8-static supports pipelines whose UNet takes "
                "the sample, the timestep and the prompt embeddings only (text-to-image, img2img)"
            )
        timestep = torch.as_tensor(timestep, dtype=torch.float32)
        self.inputs.append((sample.detach().clone(), timestep.clone(), kwargs["encoder_hidden_states"].detach()))
        return self.unet._call_impl(sample, timestep, **kwargs)


class StaticInt8Call:
    """The UNet's call after `quantize_pipeline`: the compiled int8 graph, for the calibrated shapes only."""

    quantized_static = True  # compile_pipeline leaves such a UNet alone (see its check)

    def __init__(self, compiled: Any, shapes: tuple[torch.Size, torch.Size], mixed_bf16: bool) -> None:
        self._compiled = compiled
        self.shapes = shapes
        self.mixed_bf16 = mixed_bf16

    def __call__(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs: Any
    ) -> Any:
        extra = sorted(k for k in kwargs if k != "return_dict")
        if extra:
            raise ValueError(f"the int8-static UNet takes sample, timestep and encoder_hidden_states only, got {extra}")
        shapes = (sample.shape, encoder_hidden_states.shape)
        if shapes != self.shapes:
            raise ValueError(
                f"the int8-static UNet was calibrated and compiled for sample {tuple(self.shapes[0])} and prompt "
                f"embeddings {tuple(self.shapes[1])}, got {tuple(shapes[0])} and {tuple(shapes[1])}: call with the "
                "calibration's height, width, batch and guidance, or quantize_pipeline again"
            )
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device)
        with _global_freezing(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.mixed_bf16):
            out = self._compiled(sample, timestep, encoder_hidden_states).to(sample.dtype)
        return (out,) if kwargs.get("return_dict") is False else _output(out)


def _output(sample: torch.Tensor) -> Any:
    from ..models.unet_2d_condition import UNet2DConditionOutput

    return UNet2DConditionOutput(sample=sample)


def int8_static_call(
    unet: nn.Module,
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    mixed_bf16: bool | None = None,
) -> Any:
    """The int8 UNet call: `unet` exported at the inputs' shapes, annotated by `X86InductorQuantizer` (its default
    config), observed on `inputs` (sample, float32 timestep, prompt embeddings), converted and compiled (fullgraph,
    INT8_STATIC_INDUCTOR_OPTIONS). Set it as `unet._compiled_call_impl` to run it in place of the UNet.

    mixed_bf16: run the ops left in floating point (attention's matmuls and softmax, norms, activations) in bfloat16
    under autocast, torchao's "int8-mixed-bf16" recipe; None: where the CPU has native bf16."""
    if mixed_bf16 is None:
        mixed_bf16 = cpu_precisions().bf16
    pt2e = import_torchao("torchao.quantization.pt2e.quantize_pt2e")
    x86 = import_torchao("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        exported = torch.export.export(_UNetCore(unet).eval(), tuple(inputs[0])).module()
        _linear_weights_as_parameters(exported)
        prepared = pt2e.prepare_pt2e(exported, quantizer)
        for args in inputs:
            prepared(*args)
        converted = pt2e.convert_pt2e(prepared)
    if mixed_bf16:
        _drop_dtype_asserts(converted)
        _dequantize_to_bf16(converted)
    compiled = torch.compile(converted, fullgraph=True, options=INT8_STATIC_INDUCTOR_OPTIONS)
    return StaticInt8Call(compiled, (inputs[0][0].shape, inputs[0][2].shape), mixed_bf16)


# Ops between a parameter and a linear layer's weight argument that only reshape or cast it.
_WEIGHT_VIEWS = (
    torch.ops.aten.to.dtype,
    torch.ops.aten._to_copy.default,
    torch.ops.aten.flatten.using_ints,
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
)


def _linear_weights_as_parameters(graph_module: torch.fx.GraphModule) -> int:
    """Give the quantizer every linear layer: a 1x1 convolution applied to tokens (`conv1x1_on_tokens`, SD 1.x's
    `proj_out`) is `F.linear` of a reshaped view of the conv's weight, which `X86InductorQuantizer` does not match (it
    finds linear layers by module type, and its weight is no parameter). Each such weight becomes a parameter of its
    own, computed once here, and the node is marked as `F.linear`. Returns how many were rewritten."""
    graph = graph_module.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.linear.default:
            continue
        chain, source = [], node.args[1]
        while isinstance(source, torch.fx.Node) and source.op == "call_function" and source.target in _WEIGHT_VIEWS:
            chain.append(source)
            source = source.args[0]
        if not chain or source.op != "get_attr":
            continue
        name = f"{source.target.replace('.', '_')}_as_linear"
        if not hasattr(graph_module, name):  # a weight several linear calls share is computed once
            weight = graph_module.get_parameter(source.target)
            for op in reversed(chain):
                weight = op.target(weight, *op.args[1:], **op.kwargs)
            graph_module.register_parameter(name, nn.Parameter(weight.detach().clone(), requires_grad=False))
        with graph.inserting_before(node):
            node.replace_input_with(node.args[1], graph.get_attr(name))
        node.meta["source_fn_stack"] = [(node.name, torch.nn.functional.linear)]
        rewritten += 1
    graph.eliminate_dead_code()
    graph_module.recompile()
    return rewritten


def _dequantize_to_bf16(graph_module: torch.fx.GraphModule) -> int:
    """Under autocast only convolutions, linear layers and attention compute in bf16; the ops that take a dequantized
    activation otherwise (residual adds, group norms, SiLU, concatenations) keep its dtype, float32: twice the memory
    traffic of the bf16 UNet's. Those dequantizations produce bf16 instead. The ones feeding a convolution or a linear
    layer are left as they are: inductor fuses them into its int8 kernels. Returns how many were changed."""
    qd = torch.ops.quantized_decomposed
    dequantize = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor}
    int8_ops = {torch.ops.aten.conv2d.default, torch.ops.aten.linear.default}
    changed = 0
    for node in graph_module.graph.nodes:
        if node.target in dequantize and not any(user.target in int8_ops for user in node.users):
            node.kwargs = {**node.kwargs, "out_dtype": torch.bfloat16}
            changed += 1
    graph_module.recompile()
    return changed


def _drop_dtype_asserts(graph_module: torch.fx.GraphModule) -> None:
    """torch.export records the dtype each `.to()` in the forward saw (float32); under autocast some are bfloat16."""
    for node in list(graph_module.graph.nodes):
        if node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph_module.graph.erase_node(node)
    graph_module.recompile()


def check_static_supported(pipe: Any, mode: str) -> None:
    """The checks quantize_pipeline makes before any work: the mode, a float32 UNet on the CPU, a CPU with VNNI."""
    if mode not in MODES:
        raise ValueError(f"quantize_pipeline: mode={mode!r}; allowed: {', '.join(map(repr, MODES))}")
    unet = getattr(pipe, "unet", None)
    if not isinstance(unet, nn.Module):
        raise ValueError(f"quantize_pipeline: {type(pipe).__name__} has no UNet to quantize")
    if unet.device.type != "cpu":
        raise ValueError(
            f"quantize_pipeline: {mode} is a CPU quantization (X86InductorQuantizer); the UNet is on {unet.device}. "
            "On GPUs load with quantization_config=PipelineQuantizationConfig(...) (torchao int8 dynamic / float8)"
        )
    if unet.dtype != torch.float32:
        raise ValueError(f"quantize_pipeline: {mode} calibrates a float32 UNet, got {unet.dtype}")
    if getattr(unet, "_compiled_call_impl", None) is not None:
        raise ValueError("quantize_pipeline: the UNet is already compiled; quantize the uncompiled pipeline")
    found = cpu_precisions()
    if not found.int8:
        raise RuntimeError(
            f"quantize_pipeline: {mode} needs a CPU with int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or "
            f"AMX-INT8); this CPU has: {found.describe()}. Use bfloat16 (torch_dtype=torch.bfloat16) or float32"
        )


def quantize_pipeline(
    pipe: Any,
    mode: str,
    *,
    calibration_prompts: Sequence[str],
    num_inference_steps: int,
    seed: int = 0,
    mixed_bf16: bool | None = None,
    **call_kwargs: Any,
) -> QuantizationReport:
    """Quantize `pipe.unet` in place (see the module docstring) and return how far its images moved.

    mode: "int8-static". calibration_prompts: prompts run through the float pipeline, one call each, generator
    seeded with `seed`; their UNet inputs calibrate the activation scales. call_kwargs: more pipeline arguments
    (height, width, guidance_scale, negative_prompt, num_images_per_prompt...): they fix the shapes the int8 UNet
    is compiled for, so later calls must use the same size, batch and guidance on/off. mixed_bf16: the
    unquantized ops in bfloat16 (see `int8_static_call`; default: where the CPU has native bf16).
    """
    check_static_supported(pipe, mode)
    if isinstance(calibration_prompts, str) or not calibration_prompts:
        raise ValueError(f"calibration_prompts must be a non-empty list of prompts, got {calibration_prompts!r}")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
    for taken in ("prompt", "output_type", "generator", "num_inference_steps"):
        if taken in call_kwargs:
            raise TypeError(f"quantize_pipeline sets {taken}= itself; got {taken}={call_kwargs[taken]!r}")
    import_torchao("torchao.quantization.pt2e.quantize_pt2e")  # before the float run: no torchao, no wait

    def run_all() -> np.ndarray:
        images = []
        for prompt in calibration_prompts:
            generator = torch.Generator().manual_seed(seed)
            out = pipe(
                prompt,
                num_inference_steps=num_inference_steps,
                generator=generator,
                output_type="np",
                **call_kwargs,
            )
            images.append(out.images)
        return np.concatenate(images)

    unet = pipe.unet
    recorder = _Recorder(unet)
    unet._compiled_call_impl = recorder
    try:
        reference = run_all()
    finally:
        unet._compiled_call_impl = None
    inputs = recorder.inputs
    shapes = {(s.shape, e.shape) for s, _, e in inputs}
    if len(shapes) != 1:
        raise ValueError(f"quantize_pipeline: the calibration calls used several UNet input shapes {sorted(shapes)}")

    unet._compiled_call_impl = int8_static_call(unet, inputs, mixed_bf16)
    quantized = run_all()
    return QuantizationReport(
        mode=mode,
        calibration_prompts=tuple(calibration_prompts),
        num_inference_steps=num_inference_steps,
        calibration_calls=len(inputs),
        max_abs_diff=float(np.abs(quantized - reference).max()),
        psnr_db=psnr(quantized, reference),
    )
