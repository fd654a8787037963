"""Diffusers' quantization API with torchao: TorchAoConfig / PipelineQuantizationConfig against Diffusers 0.42.1 with
the same configs (tiny random checkpoints, CPU), eager and compiled."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from conftest import assert_close_rel, assert_same_images, run_both

torchao_quant = pytest.importorskip("torchao.quantization")
import diffusers  # noqa: E402

import rapiddiff  # noqa: E402
from rapiddiff.models.unet_2d_condition import UNet2DConditionModel  # noqa: E402
from rapiddiff.quantization.torchao_quant import is_torchao_quantized  # noqa: E402

SD1 = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=2,
    norm_num_groups=8,
    use_linear_projection=True,  # proj_in / proj_out are linear layers too
)
# The quant types torchao runs on a CPU (float8 dynamic needs a CUDA GPU of compute capability >= 8.9, int4
# weight-only the `mslk` kernels package).
QUANT_TYPES = {
    "int8-weight-only": lambda: torchao_quant.Int8WeightOnlyConfig(),
    "int8-dynamic": lambda: torchao_quant.Int8DynamicActivationInt8WeightConfig(),
    "float8-weight-only": lambda: torchao_quant.Float8WeightOnlyConfig(),
    "fqn-table": lambda: torchao_quant.FqnToConfig(
        {"re:.*attn1\\..*": torchao_quant.Int8WeightOnlyConfig(), "time_embedding.linear_1": None}
    ),
}


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # Diffusers' dtype warnings
    yield
    logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quant") / "unet"
    diffusers.UNet2DConditionModel(**SD1).save_pretrained(path)
    return path


def unet_inputs(dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    return x, torch.tensor(10.0), torch.randn(2, 7, 32, generator=g).to(dtype)


def quantized_names(model: torch.nn.Module) -> set[str]:
    base = sys.modules["torchao"].utils.TorchAOBaseTensor
    return {n for n, p in model.named_parameters() if isinstance(p, base)}


def load_both(path, quant_type, dtype=torch.float32, **config_kwargs):
    ref = diffusers.UNet2DConditionModel.from_pretrained(
        path, torch_dtype=dtype, quantization_config=diffusers.TorchAoConfig(quant_type(), **config_kwargs)
    )
    ours = UNet2DConditionModel.from_pretrained(
        path, torch_dtype=dtype, quantization_config=rapiddiff.TorchAoConfig(quant_type(), **config_kwargs)
    )
    return ref, ours


# --- configs: Diffusers' arguments and errors -----------------------------------------------------------------------
def test_torchao_config_refuses_strings_as_diffusers():
    for library in (diffusers, rapiddiff):
        with pytest.raises(TypeError, match="quant_type must be an AOBaseConfig instance, got str"):
            library.TorchAoConfig("int8wo")


def test_torchao_config_round_trips_through_a_dict():
    config = rapiddiff.TorchAoConfig(torchao_quant.Int8WeightOnlyConfig(), modules_to_not_convert=["conv_in"])
    again = rapiddiff.TorchAoConfig.from_dict(config.to_dict())
    assert (
        again.to_dict()
        == config.to_dict()
        == {
            **diffusers.TorchAoConfig(
                torchao_quant.Int8WeightOnlyConfig(), modules_to_not_convert=["conv_in"]
            ).to_dict()
        }
    )
    with pytest.raises(TypeError, match="unexpected keyword"):
        rapiddiff.TorchAoConfig(torchao_quant.Int8WeightOnlyConfig(), group_size=4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"quant_backend": "torchao"},
        {"quant_backend": "foo", "quant_kwargs": {"a": 1}},
        {"quant_backend": "torchao", "quant_mapping": {"unet": None}},
    ],
)
def test_pipeline_config_errors_as_diffusers(kwargs):
    with pytest.raises(ValueError) as ref:
        diffusers.PipelineQuantizationConfig(**kwargs)
    with pytest.raises(ValueError) as ours:
        rapiddiff.PipelineQuantizationConfig(**kwargs)
    assert str(ours.value).split("\n")[0].split(" (")[0].rstrip(".") == str(ref.value).split("\n")[0].rstrip(".")


def test_pipeline_config_names_what_it_takes():
    with pytest.raises(ValueError, match="module_name=unet could not be found.*rapiddiff.TorchAoConfig"):
        rapiddiff.PipelineQuantizationConfig(
            quant_mapping={"unet": diffusers.TorchAoConfig(QUANT_TYPES["int8-dynamic"]())}
        )
    config = rapiddiff.PipelineQuantizationConfig(
        quant_backend="torchao",
        quant_kwargs={"quant_type": torchao_quant.Int8WeightOnlyConfig()},
        components_to_quantize="unet",
    )
    assert isinstance(config._resolve_quant_config(module_name="unet"), rapiddiff.TorchAoConfig)
    assert config._resolve_quant_config(module_name="vae") is None


def test_missing_torchao_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.core.config", None)
    with pytest.raises(ImportError, match=r"rapiddiff\[quant\]"):
        rapiddiff.TorchAoConfig(object())


# --- models: the same transform, the same outputs --------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(QUANT_TYPES))
def test_unet_matches_diffusers(unet_dir, name):
    ref, ours = load_both(unet_dir, QUANT_TYPES[name])
    assert quantized_names(ours) == quantized_names(ref) != set()
    x, t, e = unet_inputs()
    with torch.no_grad():
        assert_close_rel(ours(x, t, e).sample, ref(x, t, e).sample, what=name)


def test_modules_to_not_convert_as_diffusers(unet_dir):
    skip = ["attn1", "down_blocks.0.attentions.0.proj_in", "time_embedding"]
    ref, ours = load_both(unet_dir, QUANT_TYPES["int8-dynamic"], modules_to_not_convert=skip)
    names = quantized_names(ours)
    assert names == quantized_names(ref)
    assert not any("attn1." in n or "proj_in" in n and "down_blocks.0" in n or "time_embedding" in n for n in names)
    x, t, e = unet_inputs()
    with torch.no_grad():
        assert_close_rel(ours(x, t, e).sample, ref(x, t, e).sample)


def test_bfloat16_default_and_output(unet_dir):
    """No dtype: bfloat16 (Diffusers' default for torchao); outputs within bfloat16's own library-to-library spread."""
    ref = diffusers.UNet2DConditionModel.from_pretrained(
        unet_dir, quantization_config=diffusers.TorchAoConfig(QUANT_TYPES["int8-weight-only"]())
    )
    ours = UNet2DConditionModel.from_pretrained(
        unet_dir, quantization_config=rapiddiff.TorchAoConfig(QUANT_TYPES["int8-weight-only"]())
    )
    assert ours.dtype == ref.dtype == torch.bfloat16
    x, t, e = unet_inputs(torch.bfloat16)
    with torch.no_grad():
        assert_close_rel(ours(x, t, e).sample, ref(x, t, e).sample, rel=3e-2)


def test_saving_a_quantized_model_is_refused_whole(unet_dir, tmp_path):
    ours = UNet2DConditionModel.from_pretrained(
        unet_dir, quantization_config=rapiddiff.TorchAoConfig(QUANT_TYPES["int8-weight-only"]())
    )
    with pytest.raises(NotImplementedError, match="save the float model and quantize when loading"):
        ours.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_model_keeps_its_dtype_as_diffusers(unet_dir):
    ref, ours = load_both(unet_dir, QUANT_TYPES["int8-weight-only"])
    for model in (ref, ours):
        with pytest.raises(ValueError, match="Casting a quantized model to a new `dtype` is unsupported"):
            model.to(torch.float16)
        assert model.to("cpu") is model


def test_model_takes_only_a_torchao_config(unet_dir):
    with pytest.raises(TypeError, match="quantization_config must be a rapiddiff.TorchAoConfig"):
        UNet2DConditionModel.from_pretrained(unet_dir, quantization_config={"quant_type": "int8"})


# --- pipelines ---------------------------------------------------------------------------------------------------
def test_pipeline_quant_mapping_matches_diffusers(tiny_sd_dir):
    """Weight-only int8: the same weights quantize to the same int8 values, so the images agree to the pipelines'
    2e-3. (Dynamic int8 also rounds each step's activations: the ~1e-6 differences between two float pipelines can
    cross a rounding boundary and grow past 2e-3 over the steps, which the model-level tests above absorb.)"""
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir,
        torch_dtype=torch.float32,
        quantization_config=diffusers.PipelineQuantizationConfig(
            quant_mapping={"unet": diffusers.TorchAoConfig(QUANT_TYPES["int8-weight-only"]())}
        ),
    )
    ours = rapiddiff.DiffusionPipeline.from_pretrained(
        tiny_sd_dir,
        torch_dtype=torch.float32,
        quantization_config=rapiddiff.PipelineQuantizationConfig(
            quant_mapping={"unet": rapiddiff.TorchAoConfig(QUANT_TYPES["int8-weight-only"]())}
        ),
    )
    assert quantized_names(ours.unet) == quantized_names(ref.unet) != set()
    assert not is_torchao_quantized(ours.vae) and not is_torchao_quantized(ours.text_encoder)
    assert_same_images(*run_both((ref, ours)))
    with pytest.raises(NotImplementedError, match="torchao-quantized"):
        ours.save_pretrained(tiny_sd_dir.parent / "quantized-copy")


def test_pipeline_backend_quantizes_components_listed(tiny_sd_dir):
    """quant_backend="torchao" (refused by Diffusers 0.42.1 next to transformers): one TorchAoConfig per listed
    component, transformers ones included; unlisted components stay float32."""
    pipe = rapiddiff.DiffusionPipeline.from_pretrained(
        tiny_sd_dir,
        quantization_config=rapiddiff.PipelineQuantizationConfig(
            quant_backend="torchao",
            quant_kwargs={"quant_type": torchao_quant.Int8WeightOnlyConfig()},
            components_to_quantize=["unet", "text_encoder"],
        ),
    )
    assert is_torchao_quantized(pipe.unet) and is_torchao_quantized(pipe.text_encoder)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.float32
    assert pipe("a cube", num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match=r"names component\(s\) \['transformer'\]"):
        rapiddiff.DiffusionPipeline.from_pretrained(
            tiny_sd_dir,
            quantization_config=rapiddiff.PipelineQuantizationConfig(
                quant_mapping={"transformer": rapiddiff.TorchAoConfig(QUANT_TYPES["int8-dynamic"]())}
            ),
        )
    with pytest.raises(ValueError, match="must be an instance of `PipelineQuantizationConfig`"):
        rapiddiff.DiffusionPipeline.from_pretrained(
            tiny_sd_dir, quantization_config=rapiddiff.TorchAoConfig(QUANT_TYPES["int8-dynamic"]())
        )


# --- compiled -------------------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("name", ["int8-weight-only", "int8-dynamic"])
def test_compiled_quantized_unet_matches_diffusers_without_recompiles(unet_dir, name):
    """compile_pipeline (fullgraph, CPU freezing on) on a quantized UNet: Diffusers' eager output (within the fused
    int8 kernels' rounding), torchao's inductor options, and no recompile across calls with new values."""
    from rapiddiff.compile import quantized_module_options

    ref, ours = load_both(unet_dir, QUANT_TYPES[name])
    assert quantized_module_options(ours)["force_fuse_int_mm_with_mul"] is True
    rapiddiff.compile_pipeline(types.SimpleNamespace(unet=ours), components=["unet"])
    x, t, e = unet_inputs()
    with torch.no_grad():
        expected = ref(x, t, e).sample
        assert_close_rel(ours(x, t, e).sample, expected, rel=1e-4 if name == "int8-weight-only" else 1e-2, what=name)
        with torch._dynamo.config.patch(error_on_recompile=True):
            ours(x + 1, torch.tensor(500.0), e * 2)


# --- int8 static (PT2E) ---------------------------------------------------------------------------------------------
def test_quantize_pipeline_refuses_before_any_work(tiny_sd_dir, monkeypatch):
    from rapiddiff.quantization import static
    from rapiddiff.quantization.cpu import CpuPrecisions

    pipe = rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir)
    with pytest.raises(ValueError, match="mode='int4-static'; allowed: 'int8-static'"):
        rapiddiff.quantize_pipeline(pipe, "int4-static", calibration_prompts=["a"], num_inference_steps=2)
    with pytest.raises(ValueError, match="calibration_prompts must be a non-empty list"):
        rapiddiff.quantize_pipeline(pipe, "int8-static", calibration_prompts="a cube", num_inference_steps=2)
    with pytest.raises(TypeError, match="sets output_type= itself"):
        rapiddiff.quantize_pipeline(
            pipe, "int8-static", calibration_prompts=["a"], num_inference_steps=2, output_type="pil"
        )
    monkeypatch.setattr(static, "cpu_precisions", lambda: CpuPrecisions(bf16=False, int8=False, amx=False))
    with pytest.raises(RuntimeError, match="needs a CPU with int8 dot-product instructions.*this CPU has: none"):
        rapiddiff.quantize_pipeline(pipe, "int8-static", calibration_prompts=["a"], num_inference_steps=2)
    bf16 = rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir, torch_dtype=torch.bfloat16)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="calibrates a float32 UNet, got torch.bfloat16"):
        rapiddiff.quantize_pipeline(bf16, "int8-static", calibration_prompts=["a"], num_inference_steps=2)


def test_cpu_precisions_reads_torch_probes(monkeypatch):
    from rapiddiff.quantization.cpu import cpu_precisions

    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)
    assert cpu_precisions() == (True, True, True)
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    assert cpu_precisions().describe() == "none"


@pytest.mark.slow
def test_quantize_pipeline_int8_static(tiny_sd_dir):
    """Calibrated on the pipeline's own steps, compiled, close to the float images; shapes and compile guarded."""
    pipe = rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir)
    float_images = pipe("a cube", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    report = rapiddiff.quantize_pipeline(
        pipe, "int8-static", calibration_prompts=["a cube", "a red ball"], num_inference_steps=3
    )
    assert report.calibration_calls == 8  # PNDM: 3 steps are 4 UNet calls
    assert 0 < report.max_abs_diff < 0.2 and report.psnr_db > 25
    again = pipe("a cube", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert 0 < abs(again.images - float_images.images).max() < 0.2
    with pytest.raises(ValueError, match="calibrated and compiled for sample"):
        pipe("a cube", num_inference_steps=2, height=16, width=16)
    with pytest.raises(ValueError, match="runs the compiled int8 graph"):
        rapiddiff.compile_pipeline(pipe)


def test_int8_static_quantizes_every_linear_layer():
    """SD 1.x's conv projections run on the tokens as F.linear of the conv's weight: the quantizer must see them as
    linear layers too (else they stay float, a matmul with a copy per transformer: ~7% of the SD 1.5 UNet)."""
    from rapiddiff.quantization.config import import_torchao
    from rapiddiff.quantization.static import (
        _dequantize_to_bf16,
        _drop_dtype_asserts,
        _linear_weights_as_parameters,
        _UNetCore,
    )

    pt2e = import_torchao("torchao.quantization.pt2e.quantize_pt2e")
    x86 = import_torchao("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**SD1, "use_linear_projection": False}).eval()
    sample, timestep, context = unet_inputs()
    args = (sample, torch.as_tensor(timestep, dtype=torch.float32), context)
    with torch.no_grad():
        expected = _UNetCore(unet)(*args)
        exported = torch.export.export(_UNetCore(unet), args).module()
        assert _linear_weights_as_parameters(exported) == 4  # a proj_out per transformer: down 1, mid 1, up 2
        assert_close_rel(exported(*args), expected, rel=1e-6)
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = pt2e.prepare_pt2e(exported, quantizer)
        prepared(*args)
        converted = pt2e.convert_pt2e(prepared)
    linears = [n for n in converted.graph.nodes if n.target is torch.ops.aten.linear.default]
    float_weights = [n.name for n in linears if "dequantize" not in str(n.args[1].target)]
    assert linears and not float_weights

    # int8-mixed-bf16: the dequantized activations that feed no int8 layer (residual adds, norms) become bf16
    reference = converted(*args)
    _drop_dtype_asserts(converted)  # as int8_static_call does: export recorded float32 dtypes
    assert _dequantize_to_bf16(converted) > 0
    for node in converted.graph.nodes:
        if "dequantize_per_tensor" in str(node.target):
            feeds_int8 = any(
                u.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default) for u in node.users
            )
            assert (node.kwargs.get("out_dtype") == torch.bfloat16) != feeds_int8, node.name
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = converted(*args).float()
    assert_close_rel(mixed, reference, rel=0.1)  # bf16's rounding on top of int8's


def test_from_single_file_quantizes_as_from_pretrained(tiny_sd_dir, tmp_path):
    import safetensors.torch
    from conftest import tiny_sd_components
    from test_single_file import _original_layout

    c = tiny_sd_components()
    path = tmp_path / "tiny-sd.safetensors"
    safetensors.torch.save_file(_original_layout(c["unet"], c["vae"], c["text_encoder"]), str(path))

    def config():
        return rapiddiff.PipelineQuantizationConfig(
            quant_mapping={"unet": rapiddiff.TorchAoConfig(QUANT_TYPES["int8-dynamic"]())}
        )

    single = rapiddiff.StableDiffusionPipeline.from_single_file(
        path, config=tiny_sd_dir, torch_dtype=torch.float32, quantization_config=config()
    )
    folder = rapiddiff.StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, torch_dtype=torch.float32, quantization_config=config()
    )
    assert quantized_names(single.unet) == quantized_names(folder.unet) != set()
    assert not is_torchao_quantized(single.vae)
    kw = dict(num_inference_steps=2, output_type="np")
    a = single("a cube", generator=torch.Generator().manual_seed(0), **kw).images
    b = folder("a cube", generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < 2e-3
    default = rapiddiff.StableDiffusionPipeline.from_single_file(path, config=tiny_sd_dir, quantization_config=config())
    assert default.unet.dtype == torch.bfloat16 and default.vae.dtype == torch.float32


def test_controlnet_from_single_file_quantized_as_from_pretrained(tmp_path):
    """Diffusers 0.42.1's ControlNetModel.from_single_file takes a TorchAoConfig, loads bfloat16 and quantizes nothing;
    rapiddiff quantizes the same layers as Diffusers' from_pretrained does."""
    import safetensors.torch
    from conftest import tiny_sd_components

    from rapiddiff.models import single_file_keys as keys

    torch.manual_seed(1)
    net = diffusers.ControlNetModel.from_unet(tiny_sd_components()["unet"])
    net_file = tmp_path / "control.safetensors"
    safetensors.torch.save_file(keys.to_original(net.state_dict(), keys.controlnet_rules(net.config)), str(net_file))
    net.save_pretrained(tmp_path / "net")
    ours = rapiddiff.ControlNetModel.from_single_file(
        net_file, config=tmp_path / "net", quantization_config=rapiddiff.TorchAoConfig(QUANT_TYPES["int8-dynamic"]())
    )
    theirs = diffusers.ControlNetModel.from_pretrained(
        tmp_path / "net", quantization_config=diffusers.TorchAoConfig(QUANT_TYPES["int8-dynamic"]())
    )
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert quantized_names(ours) == quantized_names(theirs) != set()
