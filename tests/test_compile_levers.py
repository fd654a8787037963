"""Speed levers of compile_pipeline: inductor's freezing (weights baked into the compiled code) never serves stale
weights; fused Q/K/V under torch.compile. Marked `compile` (inductor on the CPU, tiny modules)."""

from __future__ import annotations

import types

import pytest
import torch
from conftest import assert_close_rel
from test_compile import fresh_dynamo, no_recompiles  # noqa: F401 (autouse fixture)
from torch import nn

from rapiddiff.compile import FrozenWeightsCall, compile_pipeline, inductor_options

pytestmark = pytest.mark.compile


class Tiny(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).mean((2, 3)))


def frozen(module: nn.Module) -> FrozenWeightsCall:
    kwargs = inductor_options("reduce-overhead", False, {"freezing": True})
    module._compiled_call_impl = FrozenWeightsCall(module, fullgraph=True, **kwargs)
    return module._compiled_call_impl


def test_frozen_weights_follow_every_weight_change(caplog):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = Tiny(0).eval(), Tiny(1).eval()
    calls = frozen(a), frozen(b)

    def check(m: nn.Module, what: str) -> None:
        with torch.no_grad():
            expected = m._call_impl(x)  # eager, with the module's current weights
            assert_close_rel(m(x), expected, rel=1e-5, what=what)

    with torch.no_grad():
        check(a, "first compile")
        check(b, "a second module of the same class and shapes: its own weights, not a's")
        with no_recompiles():
            check(a, "weights unchanged")
        assert calls[0].compiles == 1
        a.conv.weight.add_(0.5)  # a LoRA fused in place
        with caplog.at_level("WARNING", logger="rapiddiff.compile"):
            check(a, "in-place update")
        assert "Tiny: weights changed since it was compiled with inductor freezing; compiling it again" in caplog.text
        a.load_state_dict(b.state_dict())
        check(a, "load_state_dict")
        a.proj = nn.Linear(8, 4)  # a component swapped
        check(a, "submodule swapped")
        a.load_state_dict({k: v + 1 for k, v in b.state_dict().items()}, assign=True)  # Diffusers' loading path
        check(a, "load_state_dict(assign=True)")
        a.conv.bias.copy_(torch.ones(8))
        check(a, "copy_")
        a.proj.weight.data = torch.randn(4, 8)
        check(a, "param.data replaced")
        with no_recompiles():
            check(a, "unchanged after all that")
    assert calls[0].compiles == 7
    assert calls[1].compiles == 1


def test_the_weight_check_survives_modules_built_elsewhere():
    """Registrations in other modules (a new pipeline built, a layer added elsewhere) only make the check walk the
    module again; they do not recompile it."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = Tiny(0).eval()
    call = frozen(a)
    with torch.no_grad():
        a(x)
        Tiny(5)  # registers parameters and submodules in another module
        assert not call.weights_changed()
        with no_recompiles():
            assert_close_rel(a(x), a._call_impl(x), rel=1e-5, what="after another module was built")
        a.conv.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        assert call.weights_changed()
    assert call.compiles == 1


def test_the_levers_script_notices_a_variant_that_did_not_compile():
    """A second module of the same class compiled in the same process runs the first one's graph (dynamo's cache is
    per code object, its guards check structure): scripts/compile_levers.py refuses such a measurement."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "scripts" / "compile_levers.py"
    spec = importlib.util.spec_from_file_location("compile_levers", path)
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    x = torch.randn(2, 3, 8, 8)
    first, second = Tiny(0).eval(), Tiny(1).eval()
    graphs = []
    with torch.no_grad():
        for m in (first, second):
            m.compile(backend="eager", fullgraph=True)
            before = levers.compile_counters()["graphs"]
            m(x)
            graphs.append(levers.compile_counters()["graphs"] - before)
    assert graphs == [1, 0]
    levers.require_compiled_anew("first", True, graphs[0])
    with pytest.raises(levers.NotCompiledAnew, match="second: its first call compiled no graph"):
        levers.require_compiled_anew("second", True, graphs[1])
    assert "diffusers-recipe" == levers.parse_args([]).baseline  # every variant is timed beside Diffusers' recipe


def test_freezing_is_on_by_default_for_cpu_modules(tiny_sd_dir):
    from test_compile import txt2img

    pipe = compile_pipeline(txt2img(tiny_sd_dir), components=["unet"])
    assert isinstance(pipe.unet._compiled_call_impl, FrozenWeightsCall) and pipe.unet._compiled_call_impl.frozen
    pipe = compile_pipeline(txt2img(tiny_sd_dir), components=["unet"], freezing=False)
    assert not isinstance(pipe.unet._compiled_call_impl, FrozenWeightsCall)
    with pytest.raises(ValueError, match="inductor's"):
        compile_pipeline(txt2img(tiny_sd_dir), backend="eager", freezing=True)
    with pytest.raises(ValueError, match="freezing='yes'"):
        compile_pipeline(txt2img(tiny_sd_dir), freezing="yes")


@pytest.mark.parametrize("freezing", [None, False])
def test_freezing_bakes_the_weights_into_the_compiled_code(freezing):
    """The lever really runs: with freezing the generated code holds the weights as constants (prepacked for oneDNN
    on this CPU); the reference recipe passes them as inputs. torch.compile(options={"freezing": True}) alone does
    not get there: dynamo decides at trace time, from inductor's global flag, whether weights are constants."""
    from torch._inductor.utils import run_and_get_code

    m = Tiny(0).eval()
    compile_pipeline(types.SimpleNamespace(unet=m), components=["unet"], freezing=freezing)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, code = run_and_get_code(lambda: m(x))
        assert_close_rel(out, m._call_impl(x), rel=1e-5, what=f"freezing={freezing}")
    assert ("_frozen_param" in "\n".join(code)) == (freezing is None), f"freezing={freezing}: compiled code {code}"


def test_default_freezing_steps_aside_for_lora_layers():
    """freezing=None: a LoRA's scales change between calls, so a module holding LoRA layers compiles unfrozen (its
    scales stay graph inputs); a LoRA loaded after a frozen compile makes the next call compile once, unfrozen."""
    from rapiddiff.models.lora_layers import add_to_layer

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    m = Tiny(0).eval()
    kwargs = inductor_options("reduce-overhead", False, {"freezing": True})
    call = m._compiled_call_impl = FrozenWeightsCall(m, cpu_only=True, fullgraph=True, **kwargs)
    assert call.frozen
    with torch.no_grad():
        m(x)
        add_to_layer(m.proj, "a", torch.randn(2, 8), torch.randn(4, 2), 1.0)
        m.proj.lora_scale.fill_(0.5)
        assert_close_rel(m(x), m._call_impl(x), rel=1e-5, what="LoRA loaded after compiling")
        assert (call.compiles, call.frozen) == (2, False)
        with no_recompiles():
            m.proj.lora_scale.fill_(0.25)  # a new adapter scale: an input of the unfrozen graph
            assert_close_rel(m(x), m._call_impl(x), rel=1e-5, what="scale changed")
    assert call.compiles == 2


def test_whole_step_refuses_model_offload(tiny_sd_dir):
    from test_compile import txt2img

    from rapiddiff.utils.offload import ModelOffloadHook

    pipe = txt2img(tiny_sd_dir)
    ModelOffloadHook(pipe.unet, torch.device("cpu")).attach()
    with pytest.raises(ValueError, match=r"whole_step=True with model CPU offload \(unet offloaded\)"):
        compile_pipeline(pipe, whole_step=True, backend="eager")


@pytest.mark.parametrize(
    "lever",
    [dict(freezing=True), dict(options={"conv_1x1_as_mm": True}), dict(fuse_qkv=True)],
    ids=["freezing", "conv_1x1_as_mm", "fused-qkv"],
)
def test_each_lever_matches_eager_and_does_not_recompile(tiny_sd_dir, lever):
    """Every lever of docs/compile.md section 9 under inductor: the UNet's eager output (1e-4 of its scale), and a
    second call with new values (latents, timestep, text) under error_on_recompile."""
    from test_compile import txt2img

    unet = txt2img(tiny_sd_dir).unet
    g = torch.Generator().manual_seed(3)
    inputs = [
        (torch.randn(2, 4, 16, 24, generator=g), torch.tensor(t), torch.randn(2, 7, 32, generator=g))
        for t in (437.0, 21.0)
    ]
    with torch.no_grad():
        expected = [unet(*x).sample for x in inputs]
        kwargs = dict(lever)
        if kwargs.pop("fuse_qkv", False):
            unet.fuse_qkv_projections()
        compile_pipeline(types.SimpleNamespace(unet=unet), components=["unet"], **kwargs)
        assert_close_rel(unet(*inputs[0]).sample, expected[0], rel=1e-4, what=f"{lever}: first call")
        with no_recompiles():
            assert_close_rel(unet(*inputs[1]).sample, expected[1], rel=1e-4, what=f"{lever}: new values")


def test_threads_in_frozen_calls_see_freezing_on_and_leave_it_as_it_was():
    """Frozen calls turn inductor's `freezing` on while they run (dynamo reads it when it traces): each of several
    threads inside such calls at once must see it on (a thread that finds another already inside must not skip
    setting it where the config is per thread), and none may leave it on afterwards."""
    import threading

    from rapiddiff.frozen import _global_freezing

    threads = 4
    all_inside = threading.Barrier(threads)
    seen: list[tuple[bool, bool, bool]] = []

    def call() -> None:
        before = torch._inductor.config.freezing
        for _ in range(20):
            with _global_freezing():
                all_inside.wait(timeout=30)  # every thread in a frozen call at the same time
                inside = torch._inductor.config.freezing
                all_inside.wait(timeout=30)
        seen.append((before, inside, torch._inductor.config.freezing))

    workers = [threading.Thread(target=call) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(seen) == threads
    assert all(inside for _, inside, _ in seen), seen
    assert all(after == before for before, _, after in seen), seen
    assert torch._inductor.config.freezing is False
