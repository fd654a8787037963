"""IP-Adapter: weights in Diffusers' format written by the test, loaded by both libraries, same images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close_rel, assert_same_images, random_image, run_both, tiny_sd_components

import rapiddiff

CROSS = 32  # tiny_sd_components' cross_attention_dim


def ip_adapter_state_dict(unet, projection: str = "ip", seed: int = 0) -> dict:
    """An IP-Adapter for `unet` in the original release's layout (`image_proj`, `ip_adapter.<n>.to_k_ip`), random."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    ip = {}
    cross_layers = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    for i, name in enumerate(cross_layers):
        hidden = unet.get_submodule(name[: -len(".processor")]).to_q.out_features
        ip[f"{2 * i + 1}.to_k_ip.weight"] = rand(hidden, CROSS)
        ip[f"{2 * i + 1}.to_v_ip.weight"] = rand(hidden, CROSS)
    if projection == "ip":  # pooled embedding (dim 24) -> 4 tokens
        proj = {"proj.weight": rand(4 * CROSS, 24), "proj.bias": rand(4 * CROSS), "norm.weight": 1 + rand(CROSS)}
        proj["norm.bias"] = rand(CROSS)
    elif projection == "faceid":  # id embedding (16) -> 2 tokens
        proj = {"proj.0.weight": rand(32, 16), "proj.0.bias": rand(32), "proj.2.weight": rand(2 * CROSS, 32)}
        proj |= {"proj.2.bias": rand(2 * CROSS), "norm.weight": 1 + rand(CROSS), "norm.bias": rand(CROSS)}
    elif projection == "full":  # hidden states (dim 24) token by token
        proj = {"proj.0.weight": rand(24, 24), "proj.0.bias": rand(24), "proj.2.weight": rand(CROSS, 24)}
        proj |= {"proj.2.bias": rand(CROSS), "proj.3.weight": 1 + rand(CROSS), "proj.3.bias": rand(CROSS)}
    else:  # "plus": a perceiver resampler, hidden 64 (1 head of 64), 3 queries, depth 4, over hidden states (dim 24)
        proj = {"latents": rand(1, 3, 64), "proj_in.weight": rand(64, 24), "proj_in.bias": rand(64)}
        proj |= {"proj_out.weight": rand(CROSS, 64), "proj_out.bias": rand(CROSS)}
        proj |= {"norm_out.weight": 1 + rand(CROSS), "norm_out.bias": rand(CROSS)}
        for i in range(4):
            for norm in ("norm1", "norm2"):
                proj |= {f"layers.{i}.0.{norm}.weight": 1 + rand(64), f"layers.{i}.0.{norm}.bias": rand(64)}
            proj |= {f"layers.{i}.0.to_q.weight": rand(64, 64), f"layers.{i}.0.to_kv.weight": rand(128, 64)}
            proj |= {f"layers.{i}.0.to_out.weight": rand(64, 64)}
            proj |= {f"layers.{i}.1.0.weight": 1 + rand(64), f"layers.{i}.1.0.bias": rand(64)}
            proj |= {f"layers.{i}.1.1.weight": rand(256, 64), f"layers.{i}.1.3.weight": rand(64, 256)}
    return {"image_proj": proj, "ip_adapter": ip}


def image_encoder():
    """A tiny CLIP vision tower with a 24-d projection (the pooled image embedding IP-Adapter projects)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    config = CLIPVisionConfig(
        hidden_size=24, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=24,
    )  # fmt: skip
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def ip_dir(tmp_path_factory):
    """A Hub-like IP-Adapter folder: models/ip.safetensors, models/ip.bin, models/image_encoder/."""
    import diffusers
    import safetensors.torch

    unet = diffusers.UNet2DConditionModel(**tiny_sd_components()["unet"].config)
    state = ip_adapter_state_dict(unet)
    root = tmp_path_factory.mktemp("ip-adapter")
    (root / "models").mkdir()
    flat = {f"{part}.{k}": v for part, values in state.items() for k, v in values.items()}
    safetensors.torch.save_file(flat, root / "models" / "ip.safetensors")
    torch.save(ip_adapter_state_dict(unet, seed=1), root / "models" / "ip.bin")
    image_encoder().save_pretrained(root / "models" / "image_encoder")
    return root


@pytest.fixture(scope="module")
def loaded(tiny_sd_dir, ip_dir):
    """(diffusers, rapiddiff) text-to-image pipelines with the .safetensors IP-Adapter and its image encoder."""
    import diffusers

    pipes = []
    for library in (diffusers, rapiddiff):
        pipe = library.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
        pipe.load_ip_adapter(ip_dir, subfolder="models", weight_name="ip.safetensors")
        pipe.set_progress_bar_config(disable=True)
        pipes.append(pipe)
    return pipes


def test_image_prompt_matches_diffusers(loaded):
    image = random_image(40, 48, seed=5)
    ref, ours = run_both(loaded, ip_adapter_image=image)
    assert_same_images(ref, ours)
    # the adapter changes the image; while it is loaded the UNet needs image embeddings (as in Diffusers)
    other = run_both(loaded, ip_adapter_image=random_image(40, 48, seed=6))[1]
    assert np.abs(other.images - ours.images).max() > 1e-3
    with pytest.raises(ValueError, match="pass the image embeddings"):
        loaded[1](prompt="x", num_inference_steps=1)


def test_scale_embeds_and_batches_match_diffusers(loaded):
    for pipe in loaded:
        pipe.set_ip_adapter_scale(0.6)
    try:
        embeds = [torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(9))]  # [negative; positive]
        ref, ours = run_both(loaded, ip_adapter_image_embeds=embeds, num_images_per_prompt=2)
        assert_same_images(ref, ours)
        images = [random_image(32, 32, seed=1), random_image(32, 32, seed=2)]  # two images for the one adapter
        ref, ours = run_both(loaded, ip_adapter_image=[images], guidance_scale=1.0)
        assert_same_images(ref, ours)
    finally:
        for pipe in loaded:
            pipe.set_ip_adapter_scale(1.0)


def test_scale_zero_is_the_plain_pipeline(loaded, tiny_sd_dir):
    pipe = loaded[1]
    pipe.set_ip_adapter_scale(0.0)
    try:
        embeds = [torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(9))]
        with_adapter = pipe(prompt="a red cube", num_inference_steps=2, output_type="np", ip_adapter_image_embeds=embeds,
                            generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    finally:
        pipe.set_ip_adapter_scale(1.0)
    plain = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    without = plain(prompt="a red cube", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    np.testing.assert_allclose(with_adapter, without, atol=1e-5)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_other_pipelines_match_diffusers(loaded, kind):
    import diffusers

    names = {"img2img": "StableDiffusionImg2ImgPipeline", "inpaint": "StableDiffusionInpaintPipeline",
             "controlnet": "StableDiffusionControlNetPipeline"}  # fmt: skip
    extra = {}
    if kind == "controlnet":
        torch.manual_seed(1)
        net = diffusers.ControlNetModel(block_out_channels=(32, 64), layers_per_block=1, in_channels=4,
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=16,
                                        conditioning_embedding_out_channels=(16, 32)).eval()  # fmt: skip
        state = net.state_dict()
        ours_net = rapiddiff.ControlNetModel(**net.config)
        ours_net.load_state_dict(state)
        nets = (net, ours_net)
    pipes = []
    for i, (library, base) in enumerate(zip((diffusers, rapiddiff), loaded)):
        components = {k: v for k, v in base.components.items() if k != "safety_checker"}
        if kind == "controlnet":
            components["controlnet"] = nets[i]
        pipes.append(getattr(library, names[kind])(**components, safety_checker=None, requires_safety_checker=False))
    if kind in ("img2img", "inpaint"):
        extra = {"image": random_image(32, 32, seed=4), "strength": 0.75}
    if kind == "inpaint":
        extra["mask_image"] = random_image(32, 32, seed=6, mode="L")
    if kind == "controlnet":
        extra = {"image": random_image(32, 32, seed=4)}
    embeds = [torch.randn(2, 1, 24, generator=torch.Generator().manual_seed(2))]
    ref, ours = run_both(pipes, ip_adapter_image_embeds=embeds, num_inference_steps=3, **extra)
    assert_same_images(ref, ours)


@pytest.mark.parametrize("projection", ["ip", "faceid", "full", "plus"])
def test_unet_projections_match_diffusers(projection):
    """UNet level, two adapters (the second with two images each): Diffusers' `_load_ip_adapter_weights` and ours."""
    ref = tiny_sd_components()["unet"]
    ours = rapiddiff.UNet2DConditionModel(**ref.config)
    ours.load_state_dict(ref.state_dict())
    states = [ip_adapter_state_dict(ref, projection, seed=s) for s in (0, 1)]
    ref._load_ip_adapter_weights(states)
    ours._load_ip_adapter_weights(states)
    assert ours.config.encoder_hid_dim_type == "ip_image_proj"
    assert isinstance(ours.encoder_hid_proj, rapiddiff.MultiIPAdapterImageProjection)
    g = torch.Generator().manual_seed(0)
    dim = {"faceid": (16,), "ip": (24,)}.get(projection, (5, 24))  # pooled / id embeddings, or hidden states
    embeds = [torch.randn(2, 1, *dim, generator=g), torch.randn(2, 2, *dim, generator=g)]
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, CROSS, generator=g)
    with torch.no_grad():
        want = ref(x, 10, text, added_cond_kwargs={"image_embeds": embeds}).sample
        got = ours(x, 10, text, added_cond_kwargs={"image_embeds": embeds}).sample
    assert_close_rel(got, want, 1e-4, projection)
    assert set(ours.state_dict()) == set(ref.state_dict()), "Diffusers' module names and keys"


def test_masks_and_per_image_scales_match_diffusers():
    """`ip_adapter_masks` (one mask per image) with per-image scales, as InstantStyle / regional prompting use."""
    ref = tiny_sd_components()["unet"]
    ours = rapiddiff.UNet2DConditionModel(**ref.config)
    ours.load_state_dict(ref.state_dict())
    state = ip_adapter_state_dict(ref)
    ref._load_ip_adapter_weights(state)
    ours._load_ip_adapter_weights(state)
    for model in (ref, ours):
        for proc in model.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                proc.scale = [[0.7, 1.3]]
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(1, 2, 32, 32)
    masks[0, 0, :, :16], masks[0, 1, :, 16:] = 1, 1
    embeds = [torch.randn(2, 2, 24, generator=g)]
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, CROSS, generator=g)
    kwargs = dict(added_cond_kwargs={"image_embeds": embeds}, cross_attention_kwargs={"ip_adapter_masks": [masks]})
    with torch.no_grad():
        assert_close_rel(ours(x, 10, text, **kwargs).sample, ref(x, 10, text, **kwargs).sample, 1e-4, "masked")


def test_bin_file_block_scales_and_unload(tiny_sd_dir, ip_dir):
    import diffusers

    pipes = []
    for library in (diffusers, rapiddiff):
        pipe = library.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
        pipe.load_ip_adapter(str(ip_dir), subfolder="models", weight_name="ip.bin")
        pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 2.0]}})  # InstantStyle: one transformer of one block
        pipes.append(pipe)
    scales = {n: p.scale for n, p in pipes[1].unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    assert scales == {n: p.scale for n, p in pipes[0].unet.attn_processors.items() if hasattr(p, "to_k_ip")}
    ref, ours = run_both(pipes, ip_adapter_image=random_image(32, 32, seed=3))
    assert_same_images(ref, ours)
    pipe = pipes[1]
    pipe.unload_ip_adapter()
    assert pipe.image_encoder is None and pipe.unet.encoder_hid_proj is None
    assert pipe.unet.config.encoder_hid_dim_type is None
    assert not any("ip" in k.split(".")[-3] for k in pipe.unet.state_dict() if k.count(".") > 3)
    plain = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    a, b = run_both([plain, pipe])
    np.testing.assert_array_equal(a.images, b.images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ip_adapter_image_embeds": torch.zeros(2, 1, 24)}, "has to be of type `list`"),
        ({"ip_adapter_image_embeds": [torch.zeros(2, 24)]}, "3D or 4D"),
        ({"ip_adapter_image_embeds": [torch.full((2, 1, 24), float("nan"))]}, "nan"),
        ({"ip_adapter_image_embeds": [torch.zeros(2, 1, 24)], "ip_adapter_image": random_image(8, 8)}, "either"),
        ({"ip_adapter_image": [random_image(8, 8)] * 2}, "same length as the number of IP Adapters"),
        (
            {
                "cross_attention_kwargs": {"ip_adapter_masks": [torch.ones(1, 3, 8, 8)]},
                "ip_adapter_image_embeds": [torch.zeros(2, 1, 24)],
            },
            "3 masks for 1 images",
        ),  # fmt: skip
    ],
)
def test_bad_input(loaded, kwargs, message):
    with pytest.raises(ValueError, match=message):
        loaded[1](prompt="x", num_inference_steps=1, output_type="np", **kwargs)


def test_bad_files_and_scales(tiny_sd_dir, tmp_path):
    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    with pytest.raises(ValueError, match="no IP-Adapter is loaded"):
        pipe(prompt="x", num_inference_steps=1, ip_adapter_image_embeds=[torch.zeros(2, 1, 24)])
    state = ip_adapter_state_dict(pipe.unet)
    state["ip_adapter"]["1.to_k_ip.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"ip_adapter\.1\.to_k_ip\.weight holds nan/inf"):
        pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    state = ip_adapter_state_dict(pipe.unet)
    del state["ip_adapter"]["3.to_v_ip.weight"]
    with pytest.raises(ValueError, match="3.to_v_ip.weight missing"):
        pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    with pytest.raises(ValueError, match="required keys"):
        pipe.load_ip_adapter({"image_proj": {}}, subfolder="", weight_name="", image_encoder_folder=None)
    with pytest.raises(ValueError, match="is a state dict"):
        pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="")
    assert pipe.unet.encoder_hid_proj is None, "nothing loaded by the failed calls"
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    for bad in (float("nan"), [1.0, 2.0], "x"):
        with pytest.raises(ValueError, match="scale"):
            pipe.set_ip_adapter_scale(bad)
    with pytest.raises(ValueError, match="down.block_0 does not exist"):
        pipe.set_ip_adapter_scale({"down": {"block_0": 1.0}})  # block 0 has no attentions
    with pytest.raises(ValueError, match="ip_adapter_image needs an image_encoder"):
        pipe(prompt="x", num_inference_steps=1, ip_adapter_image=random_image(8, 8))


# --- torch.compile ---------------------------------------------------------------------------------------------------
@pytest.mark.compile
def test_scale_changes_do_not_recompile(tiny_sd_dir):
    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.load_ip_adapter(ip_adapter_state_dict(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    unet = pipe.unet
    compiled = torch.compile(unet, backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(0)
    x, text, embeds = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(2, 1, 24)

    def check(what):
        with torch.no_grad():
            kwargs = dict(encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds]}, return_dict=False)
            got = compiled(x, torch.tensor(10.0), **kwargs)[0]
            want = unet(x, torch.tensor(10.0), **kwargs)[0]
        assert_close_rel(got, want, 1e-4, what)
        return got

    from rapiddiff.frozen import default_freezes

    assert not default_freezes(unet), "compile_pipeline keeps the scales as graph inputs (not frozen constants)"
    first = check("warm-up")
    with torch._dynamo.config.patch(error_on_recompile=True):
        pipe.set_ip_adapter_scale(0.3)
        assert not torch.allclose(check("scale 0.3"), first)
        pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 2.0]}})
        check("per-block scales")


def test_one_tensor_is_one_image_as_in_diffusers():
    """Diffusers' deprecated form: `image_embeds` as one tensor without the images axis (one adapter)."""
    ref = tiny_sd_components()["unet"]
    ours = rapiddiff.UNet2DConditionModel(**ref.config)
    ours.load_state_dict(ref.state_dict())
    ours._load_ip_adapter_weights(ip_adapter_state_dict(ref))
    g = torch.Generator().manual_seed(0)
    embeds, x, text = torch.randn(2, 24, generator=g), torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, CROSS)
    with torch.no_grad():
        want = ours(x, 10, text, added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
        with pytest.warns(FutureWarning, match="deprecated"):
            got = ours(x, 10, text, added_cond_kwargs={"image_embeds": embeds}).sample
    assert torch.equal(got, want)
