"""`rapiddiff bench`: the matrix, the documented JSON fields, failures recorded in their cell, split runs merged.

The sweeps here run the real tiny pipelines but read a fake clock (1 s + 0.1 s per requested step) so that the
assertions do not depend on a shared machine's load; the timing arithmetic is tested on its own.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import subprocess
import sys

import pytest

from rapiddiff.bench import cli, measure, report
from rapiddiff.bench import sweep as sweep_module
from rapiddiff.bench.backends import Backend, Unavailable
from rapiddiff.bench.measure import Cell
from rapiddiff.bench.presets import PRESETS
from rapiddiff.bench.settings import PIPELINES, Settings
from rapiddiff.bench.sweep import run
from rapiddiff.bench.workloads import figures_of

pytest.importorskip("diffusers")

TINY = PRESETS["tiny"]
MODES = ("eager-sdpa", "eager-vanilla")
FIGURES = figures_of(PIPELINES)  # the default run's (sdxl_txt2img runs when named)
BATCHES = (1, 2)
OOM_TIMED = ("sd_inpaint/2/eager-vanilla/diffusers", "after warm-up (timed call 2)")  # an OOM in this cell's call
OOM_BUILD = ("if_stage_1", "diffusers")  # and one while building this pipeline


def fake_timed(call, steps, device):
    call(steps)
    return 1.0 + 0.1 * steps


@pytest.fixture(scope="module")
def fake_clock():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(measure, "timed", fake_timed)
        yield


def sweep(**kwargs):
    kwargs = dict(device="cpu", steps=3, repeats=1, warmup=1, backends=("diffusers",), progress=False) | kwargs
    return run(Settings.create(TINY, **kwargs))


def inject_faults(mp: pytest.MonkeyPatch) -> None:
    """Out-of-memory errors where OOM_TIMED and OOM_BUILD say."""
    real_enter, real_build = measure.Measurement.enter, sweep_module.build_pipeline

    def enter(self, where):
        real_enter(self, where)
        if (self.cell.id, where) == OOM_TIMED:
            raise measure.torch.cuda.OutOfMemoryError(f"injected for {self.cell.id} {where}")

    def build(figure, backend, settings):
        if (figure.name, backend.name) == OOM_BUILD:
            raise measure.torch.cuda.OutOfMemoryError(f"injected while building {figure.name} for {backend.name}")
        return real_build(figure, backend, settings)

    mp.setattr(measure.Measurement, "enter", enter)
    mp.setattr(sweep_module, "build_pipeline", build)


@pytest.fixture(scope="module")
def full(fake_clock, tmp_path_factory):
    """All five pipelines x batch 1, 2 x two modes, with an injected OOM at run time and one at build time."""
    with pytest.MonkeyPatch.context() as mp:
        inject_faults(mp)
        doc = sweep(batch_sizes=BATCHES, modes=MODES)
    out = tmp_path_factory.mktemp("bench")
    return doc, report.write_outputs(doc, out)


def cells_by_id(doc):
    return {"{figure}/{batch_size}/{mode}/{backend}".format(**c): c for c in doc["cells"]}


def table_rows(markdown: str, batch: int) -> dict[str, list[str]]:
    section = markdown.split(f"### Batch size {batch} (iterations/s)")[1].split("###")[0].split("##")[0]
    lines = [line for line in section.strip().splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in rows}


def test_report_has_every_cell(full):
    doc, paths = full
    cells = cells_by_id(doc)
    assert len(cells) == len(FIGURES) * len(BATCHES) * len(MODES)
    for f in FIGURES:
        for b in BATCHES:
            for m in MODES:
                cell = cells[f"{f.name}/{b}/{m}/diffusers"]
                expected = "skipped" if (b > 1 and not f.batched) else cell["status"]
                assert cell["status"] == expected
    markdown = paths["markdown"].read_text()
    for b in BATCHES:
        rows = table_rows(markdown, b)
        assert rows["Pipeline"] == [f"{m}: diffusers" for m in MODES]
        assert set(rows) == {"Pipeline", ":---:"} | {f.label for f in FIGURES}
        for f in FIGURES:
            assert all(rows[f.label]), f"empty cell in row {f.label}, batch {b}"
    ok = [c for c in doc["cells"] if c["status"] == "ok"]
    assert len(ok) == len(doc["cells"]) - 2 * 2 - 4 - 1  # IF II/III at batch 2, stage I build fault, the OOM
    assert cells["sd_txt2img/1/eager-sdpa/diffusers"]["it_per_s"] == pytest.approx(10.0)  # PNDM: n + 1 both calls
    assert table_rows(markdown, 1)["SD - txt2img"][0] == "10.00"


def test_injected_oom_lands_in_its_cell(full):
    doc, paths = full
    cells = cells_by_id(doc)
    oom = cells["sd_inpaint/2/eager-vanilla/diffusers"]
    assert oom["status"] == "failed"
    assert oom["summary"] == "OOM after warm-up (timed call 2)"
    assert "OutOfMemoryError" in oom["error"] and oom["it_per_s"] is None
    for b in BATCHES:
        for m in MODES:
            built = cells[f"if_stage_1/{b}/{m}/diffusers"]
            assert (built["status"], built["summary"]) == ("failed", "OOM while building the pipeline")
    # the sweep went on: the cells after both faults were measured, and the eager-sdpa mode was restored
    assert cells["sd_controlnet/1/eager-sdpa/diffusers"]["status"] == "ok"
    assert cells["if_stage_2/1/eager-vanilla/diffusers"]["status"] == "ok"
    markdown = paths["markdown"].read_text()
    assert table_rows(markdown, 2)["SD - inpaint"][1] == "OOM after warm-up (timed call 2)"
    assert "## Failures" in markdown and "`sd_inpaint/2/eager-vanilla/diffusers`" in markdown


def test_json_and_csv_have_the_documented_fields(full):
    doc, paths = full
    assert json.loads(paths["json"].read_text()) == doc
    assert doc["format"] == "rapiddiff-bench/1" and len(doc["runs"]) == 1
    env, settings = doc["runs"][0]["env"], doc["runs"][0]["settings"]
    for key in ("device", "device_name", "dtype", "torch", "cuda", "rapiddiff", "diffusers", "transformers",
                "python", "cpu", "cpu_count", "git_revision", "started"):  # fmt: skip
        assert key in env, key
    assert env["dtype"] == "float32" and env["device"] == "cpu" and env["diffusers"]
    assert settings["threads"] == env["torch_threads"] == 1  # the tiny preset's, applied during the run
    assert settings["preset"] == "tiny" and settings["modes"] == list(MODES) and settings["batch_sizes"] == [1, 2]
    assert settings["steps"]["sd_txt2img"] == {"long": 3, "short": 2}
    assert settings["pipelines"] == list(PIPELINES)
    fields = {f.name for f in dataclasses.fields(Cell)}
    for cell in doc["cells"]:
        assert set(cell) == fields
        if cell["status"] == "ok":
            assert cell["it_per_s"] > 0 and cell["s_per_image"] > 0 and cell["first_call_s"] > 0
            assert len(cell["iterations"]) == 2 and cell["iterations"][1] > cell["iterations"][0] > 0
            assert cell["seconds"] == [[1.2, 1.3]] and cell["peak_mem_gb"] is None  # the fake clock; no CUDA here
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["cells"])
    assert rows[0]["figure"] == "sd_txt2img" and rows[0]["device_name"] == env["device_name"]
    assert {r["status"] for r in rows} == {"ok", "failed", "skipped"}


def test_charts_or_a_note(full):
    doc, paths = full
    markdown = paths["markdown"].read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "Charts skipped: matplotlib is not installed" in markdown
    else:
        chart = paths["speedup_eager-vanilla_vs_eager-sdpa_diffusers"]
        assert chart.read_bytes().startswith(b"\x89PNG")
        assert f"]({chart.name})" in markdown


def mask_numbers(text: str) -> str:
    return re.sub(r"\d+\.\d+x?", "#", text)


def test_split_runs_merge_into_one_report(fake_clock, tmp_path):
    kw = dict(pipelines=("sd_txt2img",), modes=("eager-sdpa",))
    one = sweep(batch_sizes=(1, 2), **kw)
    first, second = sweep(batch_sizes=(2,), **kw), sweep(batch_sizes=(1,), **kw)
    for name, doc in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(doc))
    assert cli.main(["merge", str(tmp_path / "a/results.json"), str(tmp_path / "b/results.json"), "-o",
                     str(tmp_path / "merged")]) == 0  # fmt: skip
    merged = report.load_document(tmp_path / "merged" / "results.json")
    assert [report._key(c) for c in merged["cells"]] == [report._key(c) for c in one["cells"]]
    assert [c["run"] for c in merged["cells"]] == [1, 0]  # batch 1 came from the second run
    assert mask_numbers(report.batch_tables(merged)) == mask_numbers(report.batch_tables(one))
    markdown = (tmp_path / "merged" / "report.md").read_text()
    assert "Run 1:" in markdown and "Run 2:" in markdown and "Warning" not in markdown
    # a cell measured again in a later run replaces the earlier one
    again = report.merge_documents([merged, second])
    assert len(again["cells"]) == 2 and again["cells"][0]["run"] == 2
    # runs that are not comparable are flagged
    other = json.loads(json.dumps(second))
    other["runs"][0]["env"]["dtype"], other["runs"][0]["settings"]["preset"] = "float16", "gpu"
    assert "differ in dtype, preset" in report.render_markdown(report.merge_documents([first, other]))


def test_rapiddiff_backend_side_by_side(fake_clock):
    doc = sweep(pipelines=("sd_txt2img",), batch_sizes=(1,), modes=("eager-sdpa",), backends=("rapiddiff", "diffusers"))
    cells = cells_by_id(doc)
    rapid = cells["sd_txt2img/1/eager-sdpa/rapiddiff"]
    assert rapid["status"] == "ok", rapid["error"]
    assert rapid["iterations"] == cells["sd_txt2img/1/eager-sdpa/diffusers"]["iterations"]
    row = table_rows(report.batch_tables(doc), 1)
    assert row["Pipeline"] == ["eager-sdpa: rapiddiff", "eager-sdpa: diffusers", "speed-up"]
    assert row["SD - txt2img"] == ["10.00", "10.00", "1.00x"]


def test_real_checkpoint(fake_clock, tmp_path):
    """--model sd=PATH loads a Diffusers checkpoint instead of building random weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from rapiddiff.bench.presets import PRESETS_DIR, preset_config

    def config(sub):
        return preset_config("sd", sub, "config.json", TINY)

    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_config(config("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder"))),
        tokenizer=CLIPTokenizer.from_pretrained(PRESETS_DIR / "stable-diffusion-v1-5" / "tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_config(config("unet")),
        scheduler=diffusers.DDIMScheduler(),  # not the preset's PNDM: the checkpoint's own must be used
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd")
    backends = ("rapiddiff", "diffusers")
    kw = dict(pipelines=("sd_txt2img",), batch_sizes=(1,), modes=("eager-sdpa",), backends=backends)
    doc = sweep(models={"sd": tmp_path / "sd"}, **kw)
    for cell in doc["cells"]:
        assert cell["status"] == "ok", cell["error"]
        assert cell["iterations"] == [2, 3]  # DDIM: as many iterations as steps (the preset's PNDM would add one)
    assert doc["runs"][0]["settings"]["models"] == {"sd": str(tmp_path / "sd")}


def test_timing_arithmetic():
    cell = Cell("sd_txt2img", 2, "eager-sdpa", "diffusers")
    # (iterations, seconds) of the short and long call per repeat: 1 s fixed, 0.1 s per iteration, two noisy calls
    measure._summarise(cell, [[(6, 1.6), (51, 6.1)], [(6, 4.6), (51, 6.1)], [(6, 1.6), (51, 9.1)]])
    assert cell.it_per_s == pytest.approx(10.0)  # medians: 1.6 s and 6.1 s
    assert cell.seconds == [[1.6, 6.1], [4.6, 6.1], [1.6, 9.1]]
    assert cell.s_per_image == pytest.approx(6.1 / 2)
    assert cell.fixed_s == pytest.approx(1.0)
    assert cell.iterations == [6, 51]
    with pytest.raises(RuntimeError, match="not slower"):
        measure._summarise(cell, [[(6, 2.0), (51, 1.0)]])


def test_real_clock_smoke(tmp_path, capsys):
    code = cli.main(["--preset", "tiny", "--pipelines", "sd_txt2img", "--batch-sizes", "1", "--modes", "eager-sdpa",
                     "--backends", "diffusers", "-o", str(tmp_path), "--no-progress"])  # fmt: skip
    assert code == 0
    assert "| SD - txt2img |" in capsys.readouterr().out
    cell = report.load_document(tmp_path / "results.json")["cells"][0]
    assert cell["first_call_s"] > 0
    assert cell["status"] == "ok" or "not slower" in cell["error"]  # a loaded shared machine can swamp tiny loops


def test_failure_classification():
    assert measure.describe_failure(measure.torch.cuda.OutOfMemoryError("x"), "in warm-up")[1] == "OOM in warm-up"
    status, summary, _ = measure.describe_failure(Unavailable("not available in rapiddiff: X", "detail"), "")
    assert (status, summary) == ("unavailable", "not available in rapiddiff: X")
    assert measure.describe_failure(ValueError("bad"), "in warm-up")[1] == "ValueError in warm-up"


def test_backend_resolution():
    with pytest.raises(Unavailable, match="not available in rapiddiff: NoSuchPipeline"):
        Backend("rapiddiff").get("NoSuchPipeline")
    with pytest.raises(ValueError, match="backend='onnx'"):
        Backend("onnx")


def test_only_a_missing_diffusers_is_unavailable(monkeypatch):
    """diffusers not installed: its cells say so. A broken install or a missing rapiddiff module is an error."""
    import importlib
    import types

    def missing(module):
        def import_module(name):
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)

        return import_module

    monkeypatch.setattr(importlib, "import_module", missing("diffusers"))
    with pytest.raises(Unavailable, match="diffusers is not installed"):
        Backend("diffusers").get("StableDiffusionPipeline")
    monkeypatch.setattr(importlib, "import_module", missing("huggingface_hub"))  # diffusers' own dependency
    with pytest.raises(ModuleNotFoundError, match="huggingface_hub"):
        Backend("diffusers").get("StableDiffusionPipeline")
    monkeypatch.setattr(importlib, "import_module", missing("rapiddiff"))
    with pytest.raises(ModuleNotFoundError):
        Backend("rapiddiff").get("StableDiffusionPipeline")
    monkeypatch.undo()

    class LazyExports(types.ModuleType):
        def __getattr__(self, name):
            raise ModuleNotFoundError("No module named 'rapiddiff.pipelines.gone'", name="rapiddiff.pipelines.gone")

    backend = Backend("rapiddiff")
    backend._module = LazyExports("rapiddiff")
    with pytest.raises(ModuleNotFoundError, match="gone"):  # a lazy export naming a missing module: a bug, said so
        backend.get("SomePipeline")


def test_settings_validation():
    with pytest.raises(ValueError, match="unknown \\['sdxl'\\]"):
        Settings.create(TINY, pipelines=("sdxl",))
    with pytest.raises(ValueError, match="batch_sizes"):
        Settings.create(TINY, batch_sizes=(0,))
    with pytest.raises(ValueError, match="repeats=0"):
        Settings.create(TINY, repeats=0)
    with pytest.raises(ValueError, match="at least 3 steps"):
        Settings.create(TINY, steps=2)
    with pytest.raises(ValueError, match="time_budget=-1"):
        Settings.create(TINY, time_budget=-1.0)
    assert Settings.create(TINY).time_budget == 0 and Settings.create(PRESETS["cpu"]).time_budget == 600


def test_cli_registration_and_no_diffusers_import():
    from rapiddiff.cli import build_parser

    args = build_parser().parse_args(["bench", "--preset", "tiny", "--modes", "compiled"])
    assert args.func is cli.run_command and args.modes == ["compiled"]
    args = build_parser().parse_args(["bench", "merge", "a.json", "-o", "out"])
    assert args.func is cli.merge_command
    code = "import sys, rapiddiff.bench.cli, rapiddiff.bench.sweep; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_modes_apply_and_undo():
    from rapiddiff.bench.modes import MODES
    from rapiddiff.bench.workloads import FIGURES_BY_NAME, build_pipeline

    settings = Settings.create(TINY, device="cpu", backends=("diffusers",), progress=False)
    figure = FIGURES_BY_NAME["sd_controlnet"]
    pipe = build_pipeline(figure, Backend("diffusers"), settings)

    def processors():
        return {type(p).__name__ for name in figure.denoisers for p in getattr(pipe, name).attn_processors.values()}

    assert processors() == {"AttnProcessor2_0"}
    undo = MODES["eager-vanilla"](pipe, figure, Backend("diffusers"))
    assert processors() == {"AttnProcessor"}
    undo()
    assert processors() == {"AttnProcessor2_0"}
    unet = pipe.unet
    undo = MODES["compiled"](pipe, figure, Backend("diffusers"))
    assert pipe.unet is not unet and pipe.controlnet._orig_mod is not None  # torch.compile wrappers
    undo()
    assert pipe.unet is unet


@pytest.mark.compile
@pytest.mark.parametrize("inductor", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_compiled_mode_both_backends(fake_clock, monkeypatch, inductor):
    """The compiled column compiles both libraries' denoisers (with inductor: a minute here, so the default run checks
    the plumbing on dynamo's eager backend and the slow run compiles for real)."""
    import torch

    import rapiddiff

    compiled = []
    if not inductor:
        real_compile, real_pipeline = torch.compile, rapiddiff.compile_pipeline

        def eager_compile(model, **kwargs):
            compiled.append(type(model).__module__.split(".")[0])
            return real_compile(model, backend="eager", fullgraph=kwargs.get("fullgraph", False))

        def eager_pipeline(pipe, **kwargs):
            compiled.append("rapiddiff")
            return real_pipeline(pipe, backend="eager", **kwargs)

        monkeypatch.setattr(torch, "compile", eager_compile)
        monkeypatch.setattr(rapiddiff, "compile_pipeline", eager_pipeline)
    doc = sweep(pipelines=("sd_txt2img",), batch_sizes=(1,), modes=("compiled",), backends=("rapiddiff", "diffusers"))
    for cell in doc["cells"]:
        assert cell["status"] == "ok", cell["error"]
    assert inductor or {"diffusers", "rapiddiff"} <= set(compiled)
    assert set(doc["runs"][0]["compiled"]["backends"]) == {"rapiddiff", "diffusers"}  # the report states both recipes


# --- interleaving, intervals, results kept (issues 10 and 14) --------------------------------------------------------
def test_backends_run_interleaved_and_the_speedup_has_an_interval(monkeypatch):
    """Rounds alternate A B, B A...; they stop once the paired ratio's 95 % interval is within +-5 %."""
    calls = []
    real_caller = sweep_module._caller

    def caller(pipe, inputs):
        call = real_caller(pipe, inputs)
        call.backend = type(pipe).__module__.split(".")[0]
        return call

    def clock(call, steps, device):
        backend = call.backend
        calls.append((backend, steps))
        call(steps)
        per_step = 0.05 if backend == "rapiddiff" else 0.1  # rapiddiff twice as fast, no noise
        return 1.0 + per_step * steps

    monkeypatch.setattr(measure, "timed", clock)
    monkeypatch.setattr(sweep_module, "_caller", caller)
    doc = sweep(pipelines=("sd_txt2img",), batch_sizes=(1,), modes=("eager-sdpa",),
                backends=("rapiddiff", "diffusers"), repeats=2, max_repeats=6)  # fmt: skip
    timed_calls = [b for b, _ in calls[2:]]  # after one warm-up call each
    assert timed_calls == ["rapiddiff"] * 2 + ["diffusers"] * 4 + ["rapiddiff"] * 2  # A A B B | B B A A
    rapid = cells_by_id(doc)["sd_txt2img/1/eager-sdpa/rapiddiff"]
    assert rapid["speedup"] == pytest.approx([2.0, 2.0, 2.0])  # two identical rounds: converged at the minimum
    assert table_rows(report.batch_tables(doc), 1)["SD - txt2img"][2] == "2.00x"


def test_paired_speedup_interval():
    fast, slow = [(2, 1.2), (12, 2.2)], [(2, 1.4), (12, 3.4)]  # 10 it/s and 5 it/s
    noisy = [(2, 1.2), (12, 2.0)]  # 12.5 it/s
    estimate, low, high = measure.paired_speedup([fast, noisy, fast], [slow, slow, slow])
    assert low < estimate < high and estimate == pytest.approx((2 * 2 * 2.5) ** (1 / 3))
    assert measure.paired_speedup([fast], [slow]) == pytest.approx([2.0, 2.0, 2.0])
    assert measure.paired_speedup([[(2, 2.0), (12, 1.0)]], [slow]) is None  # no usable round
    assert report.format_speedup([1.02, 0.97, 1.07]) == "same (1.02x, 0.97–1.07)"
    assert report.format_speedup([1.31, 1.25, 1.38]) == "1.31x (1.25–1.38)"
    assert report.format_speedup(None) == "–"


def test_results_are_written_after_every_cell_and_an_interrupt_keeps_them(fake_clock, tmp_path, monkeypatch):
    """A KeyboardInterrupt (Ctrl-C; SIGTERM becomes one) in the third cell: the two cells done are in the files, the
    rest reads "interrupted", and --resume runs only those."""
    writes = []
    real_timed = measure.timed

    def clock(call, steps, device):
        if len(writes) == 2:
            raise KeyboardInterrupt
        return real_timed(call, steps, device)

    monkeypatch.setattr(measure, "timed", clock)
    original_write = report.write_outputs
    monkeypatch.setattr(
        cli, "write_outputs", lambda doc, out, charts=True: writes.append(doc) or original_write(doc, out, charts)
    )
    argv = ["--preset", "tiny", "--pipelines", "sd_txt2img", "sd_img2img", "--batch-sizes", "1", "2", "--modes",
            "eager-sdpa", "--backends", "diffusers", "--steps", "3", "-o", str(tmp_path), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 130
    doc = report.load_document(tmp_path / "results.json")
    statuses = [c["status"] for c in doc["cells"]]
    assert statuses == ["ok", "ok", "interrupted", "interrupted"]
    assert "## Not run" in (tmp_path / "report.md").read_text()
    assert [c["status"] for c in writes[0]["cells"]] == ["ok", "pending", "pending", "pending"]

    monkeypatch.setattr(measure, "timed", real_timed)
    assert cli.main(["--resume", "--modes", "compiled", "-o", str(tmp_path)]) == 2  # matrix options: not with it
    writes.clear()
    monkeypatch.setattr(measure, "timed", fake_timed)
    assert cli.main(["--resume", "-o", str(tmp_path), "--no-progress"]) == 0
    doc = report.load_document(tmp_path / "results.json")
    assert [c["status"] for c in doc["cells"]] == ["ok"] * 4
    assert [c["run"] for c in doc["cells"]] == [0, 0, 1, 1] and len(doc["runs"]) == 2


def test_argument_and_output_errors_are_one_line_before_any_work(tmp_path, capsys):
    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    assert cli.main(["--preset", "tiny", "-o", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err and afile.read_text() == "keep me"
    assert cli.main(["--preset", "tiny", "--batch-sizes", "0", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "batch_sizes" in err and "Traceback" not in err
    assert cli.main(["--resume", "-o", str(tmp_path / "empty")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_sigterm_to_a_running_bench_keeps_a_readable_report(tmp_path):
    """A real subprocess stopped by SIGTERM after its first cell: exit 130, the cells done are in the report."""
    import os
    import signal
    import time

    argv = [sys.executable, "-m", "rapiddiff.bench.cli", "--preset", "tiny", "--pipelines", "sd_txt2img", "sd_img2img",
            "sd_inpaint", "--batch-sizes", "1", "2", "--backends", "diffusers", "--modes", "eager-sdpa", "--steps", "3",
            "-o", str(tmp_path), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(argv, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    results = tmp_path / "results.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and any(c["status"] == "ok" for c in json.loads(results.read_text())["cells"]):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    statuses = [c["status"] for c in report.load_document(results)["cells"]]
    assert statuses[0] == "ok" and "interrupted" in statuses
    assert "## Not run" in (tmp_path / "report.md").read_text()


# --- the time budget -----------------------------------------------------------------------------------------------
def test_planner_lowers_rounds_then_cuts_the_least_important_groups():
    from rapiddiff.bench.budget import Group, Limits, cut_order, plan

    groups = [
        Group("sd_txt2img", 1, "eager-sdpa", setup_s=1.0, round_s=2.0, figure_rank=0),
        Group("sd_txt2img", 1, "compiled", setup_s=60.0, round_s=2.0, figure_rank=0),
        Group("sd_txt2img", 2, "eager-sdpa", setup_s=1.0, round_s=3.0, figure_rank=0),
        Group("if_stage_1", 1, "eager-sdpa", setup_s=1.0, round_s=2.0, figure_rank=4),
        Group("if_stage_1", 1, "compiled", setup_s=60.0, round_s=2.0, figure_rank=4),
    ]
    keys = [g.key for g in groups]
    assert [g.key for g in cut_order(groups)] == [keys[2], keys[4], keys[1], keys[3], keys[0]]
    limits = Limits(low=2, high=9, repeats=3, cell_seconds=1000.0)  # every cell runs as many rounds as planned
    builds = {"sd_txt2img": 4.0, "if_stage_1": 3.0}
    kw = dict(limits=limits, builds=builds, reserve_s=5.0)
    # no budget, or plenty: everything at the most rounds
    full = 5 + 7 + 123 + 9 * (2 + 2 + 3 + 2 + 2)
    for budget, elapsed in ((None, 0.0), (full, 0.0), (full + 100, 100.0)):
        p = plan(groups, budget_s=budget, elapsed_s=elapsed, **kw)
        assert (p.rounds, p.keep, p.cut) == (9, tuple(keys), ())
    assert plan(groups, budget_s=full, elapsed_s=0, **kw).needed_s == full
    # a little short: fewer rounds, nothing cut
    p = plan(groups, budget_s=full, elapsed_s=30.0, **kw)
    assert p.rounds == 6 and p.cut == () and p.needed_s <= full - 30
    # shorter: never below the minimum for an interval, then the batch-2 group goes, then IF's compiled one
    at_low = 5 + 7 + 123 + 2 * 11
    p = plan(groups, budget_s=at_low - 1, elapsed_s=0.0, **kw)
    assert p.rounds == 2 and p.cut == (keys[2],)
    # once cut, the time saved goes to the rounds of the groups kept
    p = plan(groups, budget_s=at_low - 10, elapsed_s=0.0, **kw)
    assert p.cut == (keys[2], keys[4]) and p.rounds == 9 and p.needed_s == 5 + 7 + 62 + 9 * 6
    # at batch 1 compiled goes before eager; a figure none of whose groups is kept costs no build
    p = plan(groups, budget_s=22.0, elapsed_s=0.0, **kw)
    assert p.keep == (keys[0], keys[3]) and p.rounds == 2 and p.needed_s == 5 + 7 + 2 * (1 + 2 * 2)
    p = plan(groups, budget_s=21.0, elapsed_s=0.0, **kw)
    assert p.keep == (keys[0],) and p.rounds == 5  # 5 + 4 + 1 + 2 * 5: IF's 3 s build no longer counted
    # past the budget, nothing is kept
    p = plan(groups, budget_s=100.0, elapsed_s=100.0, **kw)
    assert p.keep == () and p.cut == tuple(g.key for g in cut_order(groups))
    # cell_seconds ends a cell after the round that passes it: a round cap above that costs nothing more
    assert Limits(low=2, high=9, repeats=3, cell_seconds=5.0).rounds_run(9, 2.0) == 3
    assert Limits(low=2, high=9, repeats=3, cell_seconds=0.0).rounds_run(9, 2.0) == 3
    assert Limits(low=2, high=9, repeats=3, cell_seconds=0.0).rounds_run(2, 2.0) == 2


class FakeClock:
    """Monotonic seconds that pass only in timed calls: 1 s + 0.1 s per step, as `fake_timed`."""

    def __init__(self):
        self.t = 100.0

    def now(self):
        return self.t

    def timed(self, call, steps, device):
        call(steps)
        self.t += 1.0 + 0.1 * steps
        return 1.0 + 0.1 * steps


def test_budget_replans_as_cells_finish_and_resume_runs_what_was_cut(monkeypatch, tmp_path):
    """The tiny preset's estimates are far below the fake clock's times: the plan made before the first cell keeps
    everything; once the first group shows the real cost, rounds are lowered, then the least important group is cut,
    listed with the reason in the results and the report, and a resumed run measures it."""
    clock = FakeClock()
    monkeypatch.setattr(measure, "timed", clock.timed)
    kw = dict(device="cpu", steps=3, warmup=1, backends=("diffusers",), progress=False, modes=("eager-sdpa",))
    settings = Settings.create(TINY, pipelines=("sd_txt2img", "sd_img2img"), batch_sizes=(1, 2), repeats=4,
                               time_budget=30.0, **kw)  # fmt: skip
    doc = run(settings, clock=clock.now)
    cells = cells_by_id(doc)
    rounds = {key: len(c["seconds"]) for key, c in cells.items()}
    assert rounds["sd_txt2img/1/eager-sdpa/diffusers"] == 4  # planned with the preset's estimates: the most rounds
    assert rounds["sd_txt2img/2/eager-sdpa/diffusers"] == 2  # re-planned: fewer rounds, not below 2
    cut = cells["sd_img2img/2/eager-sdpa/diffusers"]
    assert (cut["status"], cut["summary"]) == ("cut", "cut: time budget")  # the largest batch, the last figure
    assert cells["sd_img2img/1/eager-sdpa/diffusers"]["status"] == "ok"
    budget = doc["runs"][0]["budget"]
    assert clock.t - 100.0 <= 30.0 and budget["elapsed_s"] == pytest.approx(clock.t - 100.0)
    assert budget["rounds"] == 2 and budget["max_rounds"] == 4
    assert (
        list(budget["cut"]) == ["sd_img2img/2/eager-sdpa"]
        and "time budget 30 s" in budget["cut"]["sd_img2img/2/eager-sdpa"]
    )
    markdown = report.render_markdown(doc)
    assert "## Cut by the time budget" in markdown and "`sd_img2img/2/eager-sdpa`: time budget 30 s" in markdown
    assert "rounds per cell lowered to as few as 2 (of 4)" in markdown
    assert table_rows(markdown, 2)["SD - img2img"] == ["cut: time budget"]

    report.write_outputs(doc, tmp_path, charts=False)
    assert cli.main(["--resume", "--time-budget", "0", "-o", str(tmp_path), "--no-progress"]) == 0
    resumed = report.load_document(tmp_path / "results.json")
    assert [c["status"] for c in resumed["cells"]] == ["ok"] * 4
    assert [c["run"] for c in resumed["cells"]] == [0, 0, 0, 1]
    assert "## Cut by the time budget" not in (tmp_path / "report.md").read_text()


def test_budget_planned_before_the_first_cell(monkeypatch):
    """A budget too short for anything, known from the estimates alone: nothing is built, every cell says why."""
    built = []
    monkeypatch.setattr(sweep_module, "build_pipeline", lambda *a: built.append(a))
    settings = Settings.create(TINY, device="cpu", pipelines=("sd_txt2img",), batch_sizes=(1,), modes=("eager-sdpa",),
                               backends=("diffusers",), progress=False, time_budget=0.5)  # fmt: skip
    doc = run(settings, clock=FakeClock().now)
    assert built == [] and {c["status"] for c in doc["cells"]} == {"cut"}
    assert "time budget 0.5 s: 0 s left after 0 s" in doc["runs"][0]["budget"]["cut"]["sd_txt2img/1/eager-sdpa"]


# --- an output folder holding results -------------------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_before_any_work(fake_clock, tmp_path, monkeypatch, capsys):
    argv = ["--preset", "tiny", "--pipelines", "sd_txt2img", "--batch-sizes", "1", "--modes", "eager-sdpa",
            "--backends", "diffusers", "--steps", "3", "-o", str(tmp_path), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    before = {name: (tmp_path / name).read_bytes() for name in report.FILES.values()}
    built = []
    monkeypatch.setattr(sweep_module, "build_pipeline", lambda *a: built.append(a))
    capsys.readouterr()
    for other in (["--batch-sizes", "2"], ["--modes", "eager-vanilla"], []):  # other settings, or the same again
        assert cli.main(argv + other) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "already holds a benchmark run" in err and "--overwrite" in err
        assert "--resume" in err and "Traceback" not in err
    assert built == [] and {name: (tmp_path / name).read_bytes() for name in report.FILES.values()} == before
    assert cli.main(argv + ["--resume"]) == 2 and "drop --preset" in capsys.readouterr().err
    assert cli.main(["--resume", "--overwrite", "-o", str(tmp_path)]) == 2
    assert "give one of them" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(measure, "timed", fake_timed)
    assert cli.main(argv + ["--batch-sizes", "2", "--overwrite"]) == 0
    assert [c["batch_size"] for c in report.load_document(tmp_path / "results.json")["cells"]] == [2]


def _valid_document():
    from rapiddiff.bench import env

    settings = Settings.create(TINY, device="cpu", pipelines=("sd_txt2img",), batch_sizes=(1,), modes=("eager-sdpa",))
    cells = [Cell("sd_txt2img", 1, "eager-sdpa", b, status="interrupted") for b in settings.backends]
    return report.make_document(settings, env.collect(settings.device, settings.dtype), cells)


def _set(path, value):
    def damage(doc):
        *parents, last = path
        for key in parents:
            doc = doc[key]
        if value is KeyError:
            del doc[last]
        else:
            doc[last] = value

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncated", "is not valid JSON (Expecting ',' delimiter: line 1"),
        ("[1, 2]", "is not a rapiddiff bench result"),
        (_set(["runs"], []), "damaged: 'runs' is not a non-empty list"),
        (_set(["runs", 0, "env", "device_name"], KeyError), "damaged: runs[0]['env'] lacks device_name"),
        (_set(["runs", 0, "settings", "steps"], KeyError), "damaged: runs[0]['settings'] lacks steps"),
        (_set(["cells", 0, "mode"], KeyError), "damaged: cells[0] lacks mode"),
        (_set(["cells", 1, "run"], 3), "damaged: cells[1] names run 3; the file has 1 run(s)"),
        (_set(["runs", 0, "settings", "dtype"], "int8"), "settings cannot be read back (KeyError: 'int8')"),
        (_set(["runs", 0, "settings", "batch_sizes"], [0]), "settings cannot be read back (batch_sizes=(0,)"),
    ],
)
def test_resume_of_a_damaged_results_json_is_a_clear_error(tmp_path, capsys, damage, message):
    """Whatever is wrong with results.json, --resume (and merge) says which file and what, in one line."""
    doc = _valid_document()
    if callable(damage):
        damage(doc)
        text = json.dumps(doc)
    else:
        text = json.dumps(doc)[:-20] if damage == "truncated" else damage
    (tmp_path / "results.json").write_text(text)
    assert cli.main(["--resume", "-o", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(tmp_path / "results.json") in err and message in err
    if "read back" not in message:  # merge needs no settings to be valid, only present
        assert cli.main(["merge", str(tmp_path / "results.json"), "-o", str(tmp_path / "m")]) == 2
        assert message in capsys.readouterr().err


# --- what the compiled column ran -------------------------------------------------------------------------------------
def test_compiled_column_states_each_sides_options_read_at_run_time(monkeypatch):
    """rapiddiff: compile_pipeline's own defaults (freezing included), read from its signature when the run starts, so
    a changed default shows; Diffusers: its recipe; both: inductor's global options in force."""
    import torch

    import rapiddiff
    from rapiddiff.bench.modes import REFERENCE_COMPILE, compile_recipes

    def compile_pipeline(pipe, *, mode="reduce-overhead", fullgraph=True, components=None, freezing=None):
        raise AssertionError("not called")

    monkeypatch.setattr(rapiddiff, "compile_pipeline", compile_pipeline)
    with torch._inductor.config.patch(max_autotune=True):  # (monkeypatch's undo deletes a config module's attribute)
        recipes = compile_recipes(("rapiddiff", "diffusers"))
    rapid, base = recipes["backends"]["rapiddiff"], recipes["backends"]["diffusers"]
    assert rapid["arguments"] == {"mode": "reduce-overhead", "fullgraph": True, "freezing": None}
    assert base["arguments"] == REFERENCE_COMPILE == {"mode": "reduce-overhead", "fullgraph": True}
    assert base["call"] == "torch.compile(<each denoiser>, mode='reduce-overhead', fullgraph=True)"
    assert rapid["mode_options"] == base["mode_options"] == {"triton.cudagraphs": True}
    assert recipes["inductor_config"]["max_autotune"] is True and recipes["inductor_config"]["freezing"] is False
    json.dumps(recipes)  # plain values only

    doc = _valid_document()
    doc["runs"][0]["compiled"] = recipes
    line = next(li for li in report.render_markdown(doc).splitlines() if "compiled column" in li)
    assert "rapiddiff: `rapiddiff.compile_pipeline(pipe, components=<the denoisers>) with its defaults (mode=reduce-" \
           "overhead, fullgraph=True, freezing=None)`" in line  # fmt: skip
    assert "diffusers: `torch.compile(<each denoiser>, mode='reduce-overhead', fullgraph=True)`" in line
    assert "inductor's global config: freezing=False, max_autotune=True" in line


def test_progress_shows_the_time_left_against_the_budget():
    from rapiddiff.bench.budget import Clock

    clock = FakeClock()
    settings = Settings.create(PRESETS["cpu"], device="cpu", progress=False)
    budget = sweep_module.Budget(settings, sweep_module.plan_cells(settings), Clock(clock.now))
    assert budget.postfix() == "10:00 left of 10:00"
    clock.t += 125.4
    assert budget.postfix() == "7:55 left of 10:00"
    clock.t += 500
    assert budget.postfix() == "-0:25 left of 10:00"
    fresh = sweep_module.Budget(settings, sweep_module.plan_cells(settings), Clock(clock.now))
    first = fresh.replan()  # from the estimates alone: the cpu preset's matrix fits its budget at the preset's 3 rounds
    assert first.cut == () and first.rounds == 3 and first.needed_s <= 600


def test_a_cell_running_past_the_budget_is_stopped_and_cut(monkeypatch, tmp_path, capsys):
    """The plan (tiny estimates) keeps every cell, but each call takes 0.4 s of real time: the budget's alarm stops the
    sweep in the middle of a cell, which is cut with the rest, and the report is written within the budget."""
    import time

    def slow(call, steps, device):
        call(steps)
        time.sleep(0.4)
        return 1.0 + 0.1 * steps

    from rapiddiff.bench.workloads import FIGURES_BY_NAME, build_pipeline

    settings = Settings.create(TINY, device="cpu", backends=("diffusers",), progress=False)
    build_pipeline(FIGURES_BY_NAME["sd_txt2img"], Backend("diffusers"), settings)  # imports done: the build is quick
    monkeypatch.setattr(measure, "timed", slow)
    argv = ["--preset", "tiny", "--pipelines", "sd_txt2img", "--batch-sizes", "1", "2", "--modes", "eager-sdpa",
            "--backends", "diffusers", "--steps", "3", "--repeats", "50", "--time-budget", "6", "-o", str(tmp_path),
            "--no-progress"]  # fmt: skip
    start = time.monotonic()
    assert cli.main(argv) == 0
    assert time.monotonic() - start < 6 + 4  # the reserve (1 s for tiny) writes the report; slack for a loaded machine
    doc = report.load_document(tmp_path / "results.json")
    assert {c["status"] for c in doc["cells"]} == {"cut"}, [c["error"] for c in doc["cells"]]
    reasons = doc["runs"][0]["budget"]["cut"]
    assert set(reasons) == {"sd_txt2img/1/eager-sdpa", "sd_txt2img/2/eager-sdpa"}
    assert any("stopped while it ran" in why for why in reasons.values())
    assert "cut" in capsys.readouterr().err


def test_sdxl_txt2img_side_by_side(fake_clock):
    """`--pipelines sdxl_txt2img`: SDXL from the shipped base config (two text encoders), both backends."""
    doc = sweep(
        pipelines=("sdxl_txt2img",), batch_sizes=(2,), modes=("eager-sdpa",), backends=("rapiddiff", "diffusers")
    )
    cells = cells_by_id(doc)
    for backend in ("rapiddiff", "diffusers"):
        assert cells[f"sdxl_txt2img/2/eager-sdpa/{backend}"]["status"] == "ok", cells
    assert table_rows(report.batch_tables(doc), 2)["SDXL - txt2img"][2] == "1.00x"
    assert doc["runs"][0]["settings"]["sizes"]["sdxl"] == 64
