"""DeepCache: the same images as the `DeepCache` package (0.1.1) on Diffusers, for every branch, the SD pipelines and
first-order, multistep and two-evaluation schedulers; the non-uniform schedule; shallow steps skipping the deep
blocks of every UNet pipeline; one graph per step kind under torch.compile, no recompiles; per-call caches."""

from __future__ import annotations

import ast
import threading
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from conftest import PIPELINE_ATOL, assert_same_images, random_image, seeded, tiny_sd_components, use_scheduler
from test_bench import fake_clock, sweep  # noqa: F401 (fake_clock: a fixture)
from test_compile import CALLS, call, make_pipeline, no_recompiles
from test_controlnet import tiny_controlnet
from torch._dynamo.testing import CompileCounter

import rapiddiff
from rapiddiff import DeepCacheConfig, DeepCacheSDHelper
from rapiddiff.compile import compile_pipeline
from rapiddiff.models.deep_cache import cache_point, full_steps, quad_center_indices, step_positions

DeepCache = pytest.importorskip("DeepCache")

IMAGE = random_image(32, 48, seed=1)
MASK = random_image(32, 48, seed=2, mode="L")
RUN = dict(prompt="a red cube on a table", num_inference_steps=7, output_type="np")


def quiet(*pipes):
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def deepcache_images(ref, ours, params: dict, seed: int = 0, **kwargs):
    """(Diffusers with DeepCache's helper, rapiddiff with its DeepCacheSDHelper), same parameters and seed."""
    outs = []
    for pipe, helper_class in ((ref, DeepCache.DeepCacheSDHelper), (ours, DeepCacheSDHelper)):
        helper = helper_class(pipe=pipe)
        helper.set_params(**params)
        helper.enable()
        try:
            outs.append(pipe(generator=seeded(seed), **(RUN | kwargs)))
        finally:
            helper.disable()
    return outs


@pytest.fixture(scope="module")
def txt2img(tiny_sd_dir):
    return quiet(
        diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
        rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
    )


@pytest.fixture(scope="module")
def deep_sd_dir(tmp_path_factory):
    """An SD pipeline whose UNet has 3 levels of 2 layers (every branch id 0..8 distinct)."""
    parts = tiny_sd_components()
    torch.manual_seed(3)
    parts["unet"] = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=16,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=16,
    ).eval()
    pipe = diffusers.StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    path = tmp_path_factory.mktemp("deep-sd") / "checkpoint"
    pipe.save_pretrained(path)
    return path


# --- the same images as DeepCache ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("branch", range(6))
def test_txt2img_every_branch_matches_deepcache(txt2img, tiny_sd_dir, branch):
    use_scheduler(txt2img, "PNDMScheduler", tiny_sd_dir)  # PNDM: a multistep scheduler
    ref, ours = deepcache_images(*txt2img, dict(cache_interval=3, cache_branch_id=branch))
    assert_same_images(ref, ours)
    uncached = txt2img[1](generator=seeded(0), **RUN).images
    assert np.abs(ours.images - uncached).max() > 1e-3  # the cache did change the image


def test_deeper_unet_every_branch_matches_deepcache(deep_sd_dir):
    pipes = quiet(
        diffusers.StableDiffusionPipeline.from_pretrained(deep_sd_dir),
        rapiddiff.StableDiffusionPipeline.from_pretrained(deep_sd_dir),
    )
    use_scheduler(pipes, "DDIMScheduler", deep_sd_dir)
    for branch in range(9):
        ref, ours = deepcache_images(*pipes, dict(cache_interval=2, cache_branch_id=branch), num_inference_steps=5)
        assert_same_images(ref, ours)


@pytest.mark.parametrize(
    "scheduler",
    [
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "UniPCMultistepScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
    ],
)
def test_schedulers_match_deepcache(txt2img, tiny_sd_dir, scheduler):
    """Two-evaluation schedulers (Heun, KDPM2) included: DeepCache places a step by the first index of its timestep
    in the scheduler's `timesteps`, and so does rapiddiff (see docs/cache.md)."""
    use_scheduler(txt2img, scheduler, tiny_sd_dir)
    ref, ours = deepcache_images(*txt2img, dict(cache_interval=3, cache_branch_id=1), num_inference_steps=6)
    assert_same_images(ref, ours)


def test_img2img_interval_counts_from_the_first_step_that_runs(tiny_sd_dir):
    pipes = quiet(
        diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir),
        rapiddiff.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir),
    )
    for scheduler, strength in (("DDIMScheduler", 0.6), ("PNDMScheduler", 0.8)):
        use_scheduler(pipes, scheduler, tiny_sd_dir)
        ref, ours = deepcache_images(
            *pipes, dict(cache_interval=3, cache_branch_id=0), image=IMAGE, strength=strength, num_inference_steps=10
        )
        assert_same_images(ref, ours)


def test_inpainting_matches_deepcache(tmp_path):
    pipe = diffusers.StableDiffusionInpaintPipeline(
        **tiny_sd_components(unet_in_channels=9), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "inpaint")
    pipes = quiet(pipe, rapiddiff.StableDiffusionInpaintPipeline.from_pretrained(tmp_path / "inpaint"))
    ref, ours = deepcache_images(
        *pipes, dict(cache_interval=2, cache_branch_id=0), image=IMAGE, mask_image=MASK, height=32, width=48
    )
    assert_same_images(ref, ours)


def test_controlnet_matches_deepcache(tiny_sd_dir, tmp_path):
    tiny_controlnet(1).save_pretrained(tmp_path / "cn")
    pipes = quiet(
        diffusers.StableDiffusionControlNetPipeline.from_pretrained(
            tiny_sd_dir, controlnet=diffusers.ControlNetModel.from_pretrained(tmp_path / "cn")
        ),
        rapiddiff.StableDiffusionControlNetPipeline.from_pretrained(
            tiny_sd_dir, controlnet=rapiddiff.ControlNetModel.from_pretrained(tmp_path / "cn")
        ),
    )
    for branch in (0, 1, 3, 4):  # 4: the cut right below the mid block (the step's own mid residual)
        ref, ours = deepcache_images(*pipes, dict(cache_interval=3, cache_branch_id=branch), image=IMAGE)
        assert_same_images(ref, ours)
    ref, ours = deepcache_images(*pipes, dict(cache_interval=2, cache_branch_id=0), image=IMAGE, guess_mode=True)
    assert_same_images(ref, ours)
    # shallow steps stop the ControlNet at the residuals they read: its mid block runs on full steps only
    net = pipes[1].controlnet
    counts, handles = count_calls({"mid": net.mid_block, "deepest": net.down_blocks[-1], "conv_in": net.conv_in})
    try:
        deepcache_images(*pipes, dict(cache_interval=3, cache_branch_id=0), image=IMAGE)
    finally:
        for h in handles:
            h.remove()
    assert counts == {"mid": 3, "deepest": 3, "conv_in": 8}  # PNDM: 8 model calls, positions 0 and 3 and 6 full


def test_deepcache_own_helper_runs_on_rapiddiff(txt2img, tiny_sd_dir):
    """DeepCache's helper swaps module forwards: it walks rapiddiff's UNet as Diffusers' (eager only)."""
    use_scheduler(txt2img, "DDIMScheduler", tiny_sd_dir)
    ours = txt2img[1]
    theirs = DeepCache.DeepCacheSDHelper(pipe=ours)
    theirs.set_params(cache_interval=3, cache_branch_id=2)
    theirs.enable()
    try:
        their_images = ours(generator=seeded(0), **RUN).images
    finally:
        theirs.disable()
    helper = DeepCacheSDHelper(pipe=ours)
    helper.set_params(cache_interval=3, cache_branch_id=2)
    helper.enable()
    try:
        np.testing.assert_allclose(ours(generator=seeded(0), **RUN).images, their_images, atol=1e-5)
    finally:
        helper.disable()


def test_disable_gives_the_uncached_images_exactly(txt2img, tiny_sd_dir):
    use_scheduler(txt2img, "DDIMScheduler", tiny_sd_dir)
    ours = txt2img[1]
    uncached = ours(generator=seeded(0), **RUN).images
    assert not ours.unet.is_cache_enabled
    ours.unet.enable_cache(DeepCacheConfig(cache_interval=3, cache_branch_id=0))
    assert ours.unet.is_cache_enabled and ours.unet.cache_config.cache_interval == 3
    cached = ours(generator=seeded(0), **RUN).images
    ours.unet.disable_cache()
    assert not ours.unet.is_cache_enabled
    assert np.abs(cached - uncached).max() > 1e-3
    assert np.array_equal(ours(generator=seeded(0), **RUN).images, uncached)


# --- the schedule -----------------------------------------------------------------------------------------------------
def deepcache_quad_center():
    """DeepCache's `sample_from_quad_center`, read from its source (its module imports Diffusers names that 0.42
    no longer has)."""
    source = Path(DeepCache.__file__).parent / "sd" / "pipeline_stable_diffusion.py"
    tree = ast.parse(source.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    namespace = {"np": np}
    exec(compile(ast.Module([node], []), str(source), "exec"), namespace)
    return namespace["sample_from_quad_center"]


@pytest.mark.filterwarnings("ignore::numpy.exceptions.ComplexWarning")
def test_non_uniform_schedule_is_deepcaches_function():
    theirs = deepcache_quad_center()
    checked = 0
    for total in (9, 20, 25, 50):
        for interval in (2, 3, 5):
            count = -(-total // interval)
            for center in range(0, total + 1, 3):
                for power in (1.2, 1.4):
                    try:
                        expected = [int(i) for i in theirs(total, count, center, power)[0]]
                    except ValueError:
                        with pytest.raises(ValueError, match="center"):
                            quad_center_indices(total, count, center, power)
                        continue
                    assert quad_center_indices(total, count, center, power) == expected
                    config = DeepCacheConfig(interval, 0, "non-uniform", power, center)
                    full = full_steps(config, list(range(total)))
                    assert [i for i, f in enumerate(full) if f] == expected
                    checked += 1
    assert checked > 100


def test_uniform_schedule_and_positions():
    assert full_steps(DeepCacheConfig(3), list(range(7))) == (True, False, False, True, False, False, True)
    assert full_steps(DeepCacheConfig(1), [0, 1, 2]) == (True, True, True)
    # Heun-like schedule: timesteps repeat; both evaluations of an interval take the first one's position
    timesteps = [999.0, 800.0, 800.0, 600.0, 600.0, 400.0, 400.0]
    assert step_positions(timesteps, 7) == [0, 1, 1, 3, 3, 5, 5]
    assert step_positions(timesteps, 4) == [0, 0, 2, 2]  # img2img: the last 4 evaluations run


def test_bad_configs_are_named(txt2img):
    unet = txt2img[1].unet
    with pytest.raises(ValueError, match="cache_interval=0"):
        DeepCacheConfig(cache_interval=0)
    with pytest.raises(ValueError, match="skip_mode='random'"):
        DeepCacheConfig(skip_mode="random")
    with pytest.raises(ValueError, match=r"cache_branch_id=6: this UNet has 2 levels, so branch ids 0...5"):
        unet.enable_cache(DeepCacheConfig(cache_branch_id=6))
    with pytest.raises(TypeError, match="DeepCacheConfig"):
        unet.enable_cache({"cache_interval": 3})
    assert not unet.is_cache_enabled
    with pytest.raises(ValueError, match="center=15 is outside"):
        full_steps(DeepCacheConfig(3, 0, "non-uniform"), list(range(9)))


# --- every UNet pipeline: interval 1 is the uncached loop, shallow steps skip the deep blocks --------------------------
def count_calls(modules: dict) -> dict:
    counts = dict.fromkeys(modules, 0)

    def hook(name):
        def count(*_):
            counts[name] += 1

        return count

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    return counts, handles


@pytest.mark.parametrize("family", ["txt2img", "img2img", "inpaint", "controlnet", "if-i", "if-ii", "upscale"])
def test_every_unet_pipeline_skips_the_deep_blocks(family, tiny_sd_dir, tiny_upscaler_dir):
    pipe = make_pipeline(family, tiny_sd_dir, tiny_upscaler_dir)
    spec = dict(CALLS[family][0], num_inference_steps=7) | ({"strength": 1.0} if "strength" in CALLS[family][0] else {})
    if family not in ("if-i", "if-ii", "upscale"):  # one model call per step (PNDM repeats its first timestep)
        spec["scheduler"] = "DDIMScheduler"
    uncached = call(pipe, family, spec)
    pipe.unet.enable_cache(DeepCacheConfig(cache_interval=1))
    assert np.array_equal(call(pipe, family, spec), uncached)
    unet = pipe.unet
    modules = {"conv_in": unet.conv_in, "mid": unet.mid_block, "deepest": unet.down_blocks[-1]}
    counts, handles = count_calls(modules)
    pipe.unet.enable_cache(DeepCacheConfig(cache_interval=3, cache_branch_id=0))
    try:
        cached = call(pipe, family, spec)
    finally:
        for h in handles:
            h.remove()
        pipe.unet.disable_cache()
    assert counts == {"conv_in": 7, "mid": 3, "deepest": 3}  # full steps 0, 3, 6
    assert np.isfinite(cached).all() and np.abs(cached - uncached).max() > 1e-4


def test_cache_point_of_a_branch():
    unet = rapiddiff.UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=16, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
    )  # fmt: skip
    # (level, layers run in it, up block index, first up layer run)
    assert cache_point(unet.down_blocks, 0) == (0, 0, 2, 2)
    assert cache_point(unet.down_blocks, 2) == (0, 2, 2, 0)
    assert cache_point(unet.down_blocks, 7) == (2, 1, 0, 1)


# --- per call, threads ------------------------------------------------------------------------------------------------
def test_threads_sharing_a_cached_pipeline_get_their_own_images(txt2img, tiny_sd_dir):
    use_scheduler(txt2img, "DDIMScheduler", tiny_sd_dir)
    ours = txt2img[1]
    ours.unet.enable_cache(DeepCacheConfig(cache_interval=2, cache_branch_id=1))
    try:
        specs = [dict(seed=s, num_inference_steps=n) for s, n in ((0, 5), (1, 7), (2, 6), (3, 4))]
        expected = [ours(generator=seeded(s["seed"]), **(RUN | dict(num_inference_steps=s["num_inference_steps"])))
                    for s in specs]  # fmt: skip
        results: dict[int, np.ndarray] = {}

        def work(k):
            spec = specs[k]
            out = ours(generator=seeded(spec["seed"]), **(RUN | dict(num_inference_steps=spec["num_inference_steps"])))
            results[k] = out.images

        threads = [threading.Thread(target=work, args=(k,)) for k in range(len(specs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ours.unet.disable_cache()
    for k, want in enumerate(expected):
        np.testing.assert_allclose(results[k], want.images, atol=1e-6)


# --- compiled ---------------------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize(
    "whole_step, enable_first", [(False, True), (False, False), (True, True)], ids=["model", "enable-after", "whole"]
)
def test_compiled_cache_is_one_graph_per_step_kind(tiny_sd_dir, tiny_upscaler_dir, whole_step, enable_first):
    torch._dynamo.reset()
    pipe = make_pipeline("txt2img", tiny_sd_dir, tiny_upscaler_dir)
    config = DeepCacheConfig(cache_interval=3, cache_branch_id=1)
    # (a whole step's graph holds the guidance scale: the same one)
    specs = [dict(num_inference_steps=7), dict(num_inference_steps=5, seed=1, prompt="a blue sphere")]
    scheduler = pipe.scheduler
    pipe.unet.enable_cache(config)
    expected = [call(pipe, "txt2img", spec) for spec in specs]
    pipe.scheduler = scheduler
    if not enable_first:
        pipe.unet.disable_cache()
    counter = CompileCounter()
    compile_pipeline(pipe, backend=counter, whole_step=whole_step)
    pipe.unet.enable_cache(config)
    np.testing.assert_allclose(call(pipe, "txt2img", specs[0]), expected[0], atol=2e-3)
    assert counter.frame_count == 3  # full step, shallow step, VAE decoder
    with no_recompiles():
        np.testing.assert_allclose(call(pipe, "txt2img", specs[1]), expected[1], atol=2e-3)
    assert counter.frame_count == 3
    torch._dynamo.reset()


# --- command line -----------------------------------------------------------------------------------------------------
def test_generate_deepcache_flag(tiny_sd_dir, tmp_path, capsys):
    import json

    import PIL.Image

    from rapiddiff import cli

    size = ["--height", "32", "--width", "48", "--steps", "5", "--seed", "3"]
    out = tmp_path / "cube.png"
    assert cli.main(["generate", "a red cube", "--model", str(tiny_sd_dir), "-o", str(out), *size,
                     "--deepcache", "2:1"]) == 0  # fmt: skip
    pipe = quiet(rapiddiff.DiffusionPipeline.from_pretrained(tiny_sd_dir))[0]
    pipe.unet.enable_cache(DeepCacheConfig(cache_interval=2, cache_branch_id=1))
    expected = pipe("a red cube", num_inference_steps=5, height=32, width=48, generator=seeded(3)).images[0]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(out)), np.asarray(expected))
    capsys.readouterr()
    bad = ["generate", "x", "--model", str(tiny_sd_dir), "-o", str(tmp_path / "y.png"), *size]
    assert cli.main([*bad, "--deepcache", "3:6"]) == 2
    assert "cache_branch_id=6" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*bad, "--deepcache", "three"])
    assert "--deepcache 'three': expected INTERVAL[:BRANCH]" in capsys.readouterr().err
    # the batch generator takes it and records it with the run's settings
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    folder = tmp_path / "batch"
    argv = ["generate", "--prompts", str(prompts), "--model", str(tiny_sd_dir), "-o", str(folder), *size,
            "--batch-size", "2", "--deepcache", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    assert json.loads((folder / "run.json").read_text())["settings"]["deepcache"] == "2:0"
    assert len(list(folder.glob("**/*.png"))) == 2


# --- LoRA -------------------------------------------------------------------------------------------------------------
def test_lora_scale_with_the_cache_matches_deepcache(tiny_sd_dir, tmp_path):
    from test_lora import make_lora, save_lora

    pipes = quiet(
        diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
        rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir),
    )
    source, _ = save_lora(make_lora(pipes[0], "peft", seed=3), tmp_path / "lora", "peft")
    for pipe in pipes:
        pipe.load_lora_weights(source)
    params = dict(cache_interval=3, cache_branch_id=1)
    images = []
    for scale in (0.5, 1.0):
        ref, ours = deepcache_images(*pipes, params, cross_attention_kwargs={"scale": scale})
        assert_same_images(ref, ours)
        images.append(ours.images)
    assert np.abs(images[0] - images[1]).max() > 1e-3  # the scale reached the cached UNet


@pytest.mark.compile
def test_compiled_cache_with_lora_scale_and_adapters_never_recompiles(tiny_sd_dir, tiny_upscaler_dir):
    from test_lora import make_lora

    torch._dynamo.reset()
    pipe = make_pipeline("txt2img", tiny_sd_dir, tiny_upscaler_dir)
    pipe.load_lora_weights(make_lora(pipe, "peft", seed=6), adapter_name="a")
    pipe.load_lora_weights(make_lora(pipe, "kohya", seed=7), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 1.0])
    pipe.unet.enable_cache(DeepCacheConfig(cache_interval=3, cache_branch_id=1))
    specs = [dict(num_inference_steps=7, cross_attention_kwargs={"scale": s}) for s in (1.0, 0.5)]
    eager = [call(pipe, "txt2img", spec) for spec in specs]
    pipe.set_adapters(["a", "b"], [0.5, 0.8])
    eager.append(call(pipe, "txt2img", specs[0]))
    pipe.set_adapters(["a", "b"], [1.0, 1.0])
    counter = CompileCounter()
    compile_pipeline(pipe, backend=counter)
    np.testing.assert_allclose(call(pipe, "txt2img", specs[0]), eager[0], atol=2e-3)
    with no_recompiles():
        np.testing.assert_allclose(call(pipe, "txt2img", specs[1]), eager[1], atol=2e-3)
        pipe.set_adapters(["a", "b"], [0.5, 0.8])
        np.testing.assert_allclose(call(pipe, "txt2img", specs[0]), eager[2], atol=2e-3)
    assert counter.frame_count == 3
    assert np.abs(eager[0] - eager[1]).max() > 1e-3 and np.abs(eager[0] - eager[2]).max() > 1e-3
    torch._dynamo.reset()


# --- the quality script -----------------------------------------------------------------------------------------------
def tiny_clip(folder: Path) -> Path:
    from conftest import SD_TOKENIZER
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval().save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=CLIPTokenizer.from_pretrained(SD_TOKENIZER),
    )
    processor.save_pretrained(folder)
    return folder


def test_quality_script_on_tiny_models(tiny_sd_dir, tmp_path, capsys):
    import importlib.util

    path = Path(__file__).parent.parent / "scripts" / "cache_quality.py"
    spec = importlib.util.spec_from_file_location("cache_quality", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue ball on grass\n")
    result = script.main(["--model", str(tiny_sd_dir), "--prompts", str(prompts), "--deepcache", "1", "2:1",
                          "--steps", "5", "--height", "32", "--width", "48", "--clip-model",
                          str(tiny_clip(tmp_path / "clip")), "--json", str(tmp_path / "q.json")])  # fmt: skip
    assert [row["prompt"] for row in result["prompts"]] == ["a red cube", "a blue ball on grass"]
    assert result["summary"]["1"]["psnr"] == float("inf") and result["summary"]["1"]["ssim"] == pytest.approx(1.0)
    cached = result["summary"]["2:1"]
    assert 10 < cached["psnr"] < 80 and 0 < cached["ssim"] < 1
    assert 0 <= cached["clip"] <= 100 and result["summary"]["uncached"]["clip"] == result["summary"]["1"]["clip"]
    assert "| 2:1 |" in capsys.readouterr().out and (tmp_path / "q.json").is_file()
    # the metrics themselves
    image = np.random.RandomState(0).rand(16, 16, 3)
    assert script.psnr(image, np.clip(image + 0.1, 0, 1)) < script.psnr(image, np.clip(image + 0.01, 0, 1))
    assert script.ssim(image, image) == pytest.approx(1.0) and script.ssim(image, 1 - image) < 0


# --- rapiddiff bench's cached mode --------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.usefixtures("fake_clock")
def test_bench_cached_mode_next_to_deepcache(monkeypatch):
    """The cached mode: rapiddiff compiled + cache next to Diffusers + DeepCache (eager); other figures skipped.
    Graph capture on dynamo's eager backend (inductor would take minutes here)."""
    from rapiddiff.bench.presets import PRESETS

    real_pipeline = rapiddiff.compile_pipeline
    compiled = []

    def eager_pipeline(pipe, **kwargs):
        compiled.append(pipe.unet)
        return real_pipeline(pipe, backend="eager", **kwargs)

    monkeypatch.setattr(rapiddiff, "compile_pipeline", eager_pipeline)
    helpers = []
    real_enable = DeepCache.DeepCacheSDHelper.enable

    def enable(self, *args):
        helpers.append(self.params)
        return real_enable(self, *args)

    monkeypatch.setattr(DeepCache.DeepCacheSDHelper, "enable", enable)
    doc = sweep(pipelines=("sd_txt2img", "sd_img2img"), batch_sizes=(1,), modes=("cached",),
                backends=("rapiddiff", "diffusers"))  # fmt: skip
    status = {(c["figure"], c["backend"]): c["status"] for c in doc["cells"]}
    assert status == {("sd_txt2img", "rapiddiff"): "ok", ("sd_txt2img", "diffusers"): "ok",
                      ("sd_img2img", "rapiddiff"): "skipped", ("sd_img2img", "diffusers"): "skipped"}  # fmt: skip
    assert len(compiled) == 1 and not compiled[0].is_cache_enabled  # undone after the cell
    assert helpers and helpers[0]["cache_interval"] == 3 and helpers[0]["cache_block_id"] == 0
    # opt-in (`--modes compiled cached`): the cpu preset's default matrix already fills its 10-minute budget
    assert "cached" not in PRESETS["cpu"].modes and PRESETS["cpu"].compiled_batch_sizes == (1,)


@pytest.mark.compile
def test_compiled_controlnet_cache_never_recompiles(tiny_sd_dir, tiny_upscaler_dir):
    torch._dynamo.reset()
    pipe = make_pipeline("controlnet", tiny_sd_dir, tiny_upscaler_dir)
    pipe.unet.enable_cache(DeepCacheConfig(cache_interval=3, cache_branch_id=1))
    first, second = (dict(CALLS["controlnet"][k], num_inference_steps=7) for k in (0, 1))
    expected = [call(pipe, "controlnet", spec) for spec in (first, second)]
    counter = CompileCounter()
    compile_pipeline(pipe, backend=counter)
    np.testing.assert_allclose(call(pipe, "controlnet", first), expected[0], atol=2e-3)
    # UNet: full and shallow steps, each with residuals and past the control window without; ControlNet: whole and
    # stopped early; the VAE decoder
    assert counter.frame_count == 7
    with no_recompiles():
        np.testing.assert_allclose(call(pipe, "controlnet", second), expected[1], atol=2e-3)
    assert counter.frame_count == 7
    torch._dynamo.reset()


def test_cached_loop_reads_no_tensor_value_and_non_uniform_runs_its_full_steps(txt2img, tiny_sd_dir):
    from rapiddiff.compile import forbid_host_syncs_in_loop

    use_scheduler(txt2img, "DDIMScheduler", tiny_sd_dir)
    ours = txt2img[1]
    config = DeepCacheConfig(cache_interval=3, cache_branch_id=0, skip_mode="non-uniform", center=4)
    ours.unet.enable_cache(config)
    counts, handles = count_calls({"mid": ours.unet.mid_block})
    try:
        with forbid_host_syncs_in_loop(ours):
            images = ours(generator=seeded(0), **(RUN | dict(num_inference_steps=12))).images
    finally:
        for h in handles:
            h.remove()
        ours.unet.disable_cache()
    assert np.isfinite(images).all()
    assert counts["mid"] == len(quad_center_indices(12, 4, 4, 1.4)) == 4


def test_sdxl_matches_deepcache(tiny_sdxl_dir):
    """SDXL's UNet (text_time conditioning) caches as SD's: the same images as DeepCache's helper on Diffusers' SDXL."""
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    ours = rapiddiff.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    quiet(ref, ours)
    size = dict(height=32, width=48, num_inference_steps=5)
    for branch in (0, 1):
        ref_out, ours_out = deepcache_images(ref, ours, dict(cache_interval=2, cache_branch_id=branch), **size)
        np.testing.assert_allclose(ours_out.images, ref_out.images, rtol=0, atol=PIPELINE_ATOL)
    uncached = ours(generator=seeded(0), **(RUN | size)).images
    assert np.abs(ours_out.images - uncached).max() > 1e-4  # the cache did change the image
