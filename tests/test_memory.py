"""Memory switches and Diffusers code that drops in: VAE tiling, attention slicing, FreeU, Diffusers' processors on
rapiddiff's attention layers, xFormers, model / sequential CPU offload (device moves recorded on the CPU)."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import assert_close_rel
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers.models import attention_processor as dap
from test_unet import IF_I, SD1, SD2, inputs, make_pair, single_thread  # noqa: F401 (autouse fixture)

from rapiddiff.models import attention_processor as rap
from rapiddiff.models.autoencoder_kl import AutoencoderKL

VAE = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    latent_channels=4,
    layers_per_block=1,
    sample_size=32,
)


# --- VAE tiling ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae_pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = DAutoencoderKL(**VAE).eval()
    path = tmp_path_factory.mktemp("vae-tiling")
    ref.save_pretrained(path)
    return ref, AutoencoderKL.from_pretrained(path)


def test_tiled_encode_and_decode_match_diffusers(vae_pair):
    ref, ours = vae_pair
    assert (ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor) == (32, 16, 0.25)
    image = torch.rand(2, 3, 40, 60, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 21, 30, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = ours.decode(z).sample, ours.encode(image).latent_dist.mean
        for vae in (ref, ours):
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 16, 8  # small tiles: many seams, edge tiles
        try:
            for slicing in (False, True):
                for vae in (ref, ours):
                    vae.use_slicing = slicing
                decoded = ours.decode(z).sample
                assert_close_rel(decoded, ref.decode(z).sample, 1e-5, what="tiled decode")
                mean = ours.encode(image).latent_dist.mean
                assert_close_rel(mean, ref.encode(image).latent_dist.mean, 1e-5, what="tiled encode")
            assert (decoded - plain[0]).abs().max() > 1e-3 and (mean - plain[1]).abs().max() > 1e-3  # tiles ran
            # The rapiddiff arguments: same as setting Diffusers' attributes.
            ours.disable_tiling()
            ours.enable_tiling(tile_sample_min_size=16, tile_overlap_factor=0.5)
            ref.tile_overlap_factor = 0.5
            assert_close_rel(ours.decode(z).sample, ref.decode(z).sample, 1e-5, what="tiled decode, overlap 0.5")
        finally:
            for vae in (ref, ours):
                vae.disable_tiling()
                vae.use_slicing = False
                vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 32, 16, 0.25
    assert_close_rel(ours.decode(z).sample, plain[0], 0, what="tiling off again")


def test_tiling_errors_name_the_setting(vae_pair):
    _, ours = vae_pair
    with pytest.raises(ValueError, match="tile_sample_min_size=15"):
        ours.enable_tiling(tile_sample_min_size=15)
    with pytest.raises(ValueError, match="tile_sample_min_size must be a positive int"):
        ours.enable_tiling(tile_sample_min_size=0)
    with pytest.raises(ValueError, match="tile_overlap_factor"):
        ours.enable_tiling(tile_overlap_factor=1.0)
    with pytest.raises(ValueError, match="no stride"):
        ours.enable_tiling(tile_sample_min_size=2, tile_overlap_factor=0.5)
    ours.tile_sample_min_size, ours.tile_latent_min_size, ours.tile_overlap_factor = 16, 7, 0.25
    ours.use_tiling = True
    try:
        with pytest.raises(ValueError, match="tile_latent_min_size=7"):
            ours.decode(torch.zeros(1, 4, 20, 20))
    finally:
        ours.use_tiling = False
        ours.tile_sample_min_size, ours.tile_latent_min_size = 32, 16


# --- attention slicing -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [SD2, IF_I], ids=["sd2", "if"])
def test_sliced_attention_gives_the_same_outputs(config):
    torch.manual_seed(0)
    import rapiddiff

    unet = rapiddiff.UNet2DConditionModel(**config).eval()
    kw = inputs(config)
    with torch.no_grad():
        plain = unet(**kw).sample
        heads = [m.heads for m in unet.modules() if isinstance(m, rap.Attention)]
        for size in ("auto", "max", 1, [max(h // 2, 1) for h in heads]):
            unet.set_attention_slice(size)
            procs = list(unet.attn_processors.values())
            assert all(isinstance(p, rap.SlicedAttnProcessor) for p in procs)
            assert_close_rel(unet(**kw).sample, plain, 1e-5, what=f"slice_size={size!r}")
        assert {type(p) for p in procs} == (
            {rap.SlicedAttnAddedKVProcessor} if "encoder_hid_dim" in config else {rap.SlicedAttnProcessor}
        )
        unet.set_attention_slice(None)
        assert all(
            type(p) in (rap.AttnProcessor2_0, rap.AttnAddedKVProcessor2_0) for p in unet.attn_processors.values()
        )


def test_slice_size_errors():
    import rapiddiff

    unet = rapiddiff.UNet2DConditionModel(**SD1)
    for bad in (0, -2, True, 1.5, "half"):
        with pytest.raises(ValueError, match="slice_size"):
            unet.set_attention_slice(bad)
    with pytest.raises(ValueError, match="slice_size=3 must be <= the number of heads"):
        unet.set_attention_slice(3)
    with pytest.raises(ValueError, match="list of 1 sizes"):
        unet.set_attention_slice([1])
    with pytest.raises(ValueError, match="slice_size"):
        rap.SlicedAttnProcessor(0)


# --- FreeU -----------------------------------------------------------------------------------------------------------
def test_freeu_matches_diffusers(save_diffusers):
    config = dict(SD2, attention_head_dim=2, upcast_attention=False)
    ref, ours = make_pair(config, save_diffusers)
    kw = inputs(config, size=(16, 24))
    with torch.no_grad():
        plain = ours(**kw).sample
        for unet in (ref, ours):
            unet.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
        out = ours(**kw).sample
        assert_close_rel(out, ref(**kw).sample, 1e-4, what="FreeU")
        assert (out - plain).abs().max() > 1e-3
        for unet in (ref, ours):
            unet.enable_freeu(s1=0.9, s2=0.0, b1=1.5, b2=1.6)  # Diffusers' rule: a zero factor turns it off
        assert_close_rel(ours(**kw).sample, ref(**kw).sample, 1e-4, what="FreeU with a zero factor")
        ours.disable_freeu()
        assert_close_rel(ours(**kw).sample, plain, 0, what="FreeU off")
    with pytest.raises(TypeError, match="b1"):
        ours.enable_freeu(s1=0.9, s2=0.2, b1="1.5", b2=1.6)


# --- Diffusers' processors on rapiddiff's layers -----------------------------------------------------------------------
class P2PStyleProcessor:
    """A prompt-to-prompt-style processor written against Diffusers' API: records every cross-attention map and
    reweights one text token, with Diffusers' helpers (prepare_attention_mask, head_to_batch_dim, get_attention_scores,
    batch_to_head_dim, norm_cross, group_norm, residual_connection, rescale_output_factor, to_out)."""

    def __init__(self, store: list, token: int = 2, weight: float = 2.0):
        self.store, self.token, self.weight = store, token, weight

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        cross = encoder_hidden_states is not None
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, attention_mask)
        if cross:
            self.store.append(probs.detach().clone())
            scale = torch.ones(probs.shape[-1], dtype=probs.dtype)
            scale[self.token] = self.weight
            probs = probs * scale
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def test_diffusers_processors_run_unchanged(save_diffusers):
    ref, ours = make_pair(SD1, save_diffusers)
    kw = inputs(SD1)
    kw["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0]])
    for make in (dap.AttnProcessor2_0, dap.AttnProcessor):
        ref.set_attn_processor(make())
        ours.set_attn_processor(make())  # Diffusers' own instances
        with torch.no_grad():
            assert_close_rel(ours(**kw).sample, ref(**kw).sample, 1e-4, what=make.__name__)
    maps_ref, maps_ours = [], []
    ref.set_attn_processor(P2PStyleProcessor(maps_ref))
    ours.set_attn_processor(P2PStyleProcessor(maps_ours))
    with torch.no_grad():
        out = ours(**kw).sample
        assert_close_rel(out, ref(**kw).sample, 1e-4, what="prompt-to-prompt-style processor")
    assert len(maps_ours) == len(maps_ref) == 4  # every cross-attention layer, in Diffusers' order
    for a, b in zip(maps_ours, maps_ref):
        assert_close_rel(a, b, 1e-5, what="captured attention map")


def test_diffusers_added_kv_processor_and_refusals(save_diffusers):
    ref, ours = make_pair(IF_I, save_diffusers)
    kw = inputs(IF_I)
    for make in (dap.AttnAddedKVProcessor2_0, dap.AttnAddedKVProcessor):
        ref.set_attn_processor(make())
        ours.set_attn_processor(make())
        with torch.no_grad():
            assert_close_rel(ours(**kw).sample, ref(**kw).sample, 1e-4, what=make.__name__)
    # Refused when set, never at the first forward.
    with pytest.raises(TypeError, match="AttnProcessor2_0 does not fit"):
        ours.set_attn_processor(dap.AttnProcessor2_0())
    sd = make_pair(SD1, save_diffusers)[1]
    with pytest.raises(TypeError, match="AttnAddedKVProcessor does not fit"):
        sd.set_attn_processor(dap.AttnAddedKVProcessor())
    with pytest.raises(TypeError, match="JointAttnProcessor2_0 needs attention parts"):
        sd.set_attn_processor(dap.JointAttnProcessor2_0())
    with pytest.raises(TypeError, match="cannot be called as Diffusers calls processors"):
        sd.set_attn_processor(lambda attn, hidden_states: hidden_states)


def test_cross_attention_kwargs_reach_the_processor_or_are_dropped(caplog):
    seen = []

    def proc(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, scale_map=None):
        seen.append(scale_map)
        return rap.AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask)

    attn = rap.Attention(query_dim=16, heads=2, dim_head=8, processor=proc)
    x = torch.randn(1, 5, 16)
    with caplog.at_level(logging.WARNING):
        attn(x, scale_map=3, unknown=1)
    assert seen == [3] and "['unknown'] are not expected by function" in caplog.text


def test_xformers_switch_says_sdpa_is_in_use(caplog, save_diffusers):
    _, ours = make_pair(SD1, save_diffusers)
    ours.set_default_attn_processor()
    with caplog.at_level(logging.WARNING):
        ours.enable_xformers_memory_efficient_attention()
    assert "scaled_dot_product_attention" in caplog.text
    assert all(type(p) is rap.AttnProcessor2_0 for p in ours.attn_processors.values())
    ours.disable_xformers_memory_efficient_attention()
    assert all(type(p) is rap.AttnProcessor2_0 for p in ours.attn_processors.values())


# --- model / sequential CPU offload ----------------------------------------------------------------------------------
def record_moves(pipe, names=("text_encoder", "unet", "vae")) -> list:
    """Patch each component's `.to` to record (component, device) in call order."""
    moves = []
    for name in names:
        module = getattr(pipe, name)
        original = module.to

        def to(*args, _name=name, _original=original, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if target is not None and not isinstance(target, torch.dtype):
                moves.append((_name, str(torch.device(target))))
            return _original(*args, **kwargs)

        module.to = to
    return moves


def generate(pipe, **kw):
    return pipe(
        "a red cube", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **kw
    ).images


def test_model_cpu_offload_moves_each_model_in_turn(tiny_sd_dir):
    import rapiddiff

    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = generate(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert pipe._execution_device == torch.device("cpu:0")
    moves = record_moves(pipe)
    for _ in range(2):  # the second call finds every model offloaded again
        moves.clear()
        assert (generate(pipe) == expected).all()
        assert moves == [
            ("text_encoder", "cpu:0"),
            ("text_encoder", "cpu"),  # offloaded when the UNet is first called
            ("unet", "cpu:0"),
            ("unet", "cpu"),  # offloaded when the VAE decodes
            ("vae", "cpu:0"),
            ("vae", "cpu"),  # maybe_free_model_hooks at the end of the call
        ]
    pipe.remove_all_hooks()
    moves.clear()
    assert (generate(pipe) == expected).all() and moves == []
    assert pipe._execution_device == torch.device("cpu")


def test_sequential_cpu_offload_and_offload_errors(tiny_sd_dir):
    import rapiddiff

    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    expected = generate(pipe)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert next(pipe.unet.parameters()).device.type == "meta"  # weights live in accelerate's CPU map
    assert pipe._execution_device == torch.device("cpu:0")
    assert (generate(pipe) == expected).all()
    with pytest.raises(ValueError, match="cannot be compiled"):
        pipe.unet.compile()
    with pytest.raises(ValueError, match="cannot be compiled"):
        rapiddiff.compile_pipeline(pipe, backend="eager")
    with pytest.raises(ValueError, match="sequential CPU offload is on"):
        pipe.to("meta")
    pipe.remove_all_hooks()
    assert next(pipe.unet.parameters()).device.type == "cpu"
    assert (generate(pipe) == expected).all()

    with pytest.raises(RuntimeError, match="needs an accelerator"):
        pipe.enable_model_cpu_offload()
    with pytest.raises(ValueError, match="gpu_id=1 and device='cuda:0'"):
        pipe.enable_model_cpu_offload(gpu_id=1, device="cuda:0")
    with pytest.raises(ValueError, match="gpu_id must be a non-negative int"):
        pipe.enable_sequential_cpu_offload(gpu_id=-1, device="cpu")


# --- offload and tiling under compile_pipeline -----------------------------------------------------------------------
@pytest.mark.compile
def test_model_offload_and_vae_tiling_compile_fullgraph(tiny_sd_dir):
    """Offload enabled, then compile_pipeline (the harder order: compiling replaces the call the hook wrapped). The
    hooks run outside the graphs (fullgraph=True raises on a break): same images, the models still move in turn. The
    tiled VAE decoder compiles once per tile shape. Graph capture is the point: the "eager" backend."""
    import torch._dynamo

    import rapiddiff

    torch._dynamo.reset()
    pipe = rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling(tile_sample_min_size=8)  # 16x24 px images: 2 x 4 tiles of 4x4 latents
    expected = generate(pipe, height=16, width=24)
    pipe.enable_model_cpu_offload(device="cpu")
    rapiddiff.compile_pipeline(pipe, backend="eager")
    moves = record_moves(pipe)
    np_images = generate(pipe, height=16, width=24)
    assert abs(np_images - expected).max() < 1e-5
    assert [m[0] for m in moves] == ["text_encoder", "text_encoder", "unet", "unet", "vae", "vae"]
    assert pipe.unet._compiled_call_impl is not None
    torch._dynamo.reset()


def test_pipeline_freeu_and_attention_slicing_match_diffusers(tiny_sd_dir, caplog):
    import diffusers
    from conftest import assert_same_images, run_both

    import rapiddiff

    pipes = [diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd_dir)]
    pipes.append(rapiddiff.StableDiffusionPipeline.from_pretrained(tiny_sd_dir))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
        pipe.enable_attention_slicing("max")
    args = dict(prompt=["a red cube", "a blue ball"], height=16, width=24)
    ref, ours = run_both(pipes, **args)
    assert_same_images(ref, ours)
    assert all(isinstance(p, rap.SlicedAttnProcessor) for p in pipes[1].unet.attn_processors.values())
    for pipe in pipes:
        pipe.disable_freeu()
        pipe.disable_attention_slicing()
    with caplog.at_level(logging.WARNING):
        pipes[1].enable_xformers_memory_efficient_attention()
    assert "already runs torch.nn.functional.scaled_dot_product_attention" in caplog.text
    plain_ref, plain = run_both(pipes, **args)
    assert_same_images(plain_ref, plain)
    assert abs(plain.images - ours.images).max() > 1e-3  # FreeU changed the images
    assert not hasattr(rapiddiff.IFPipeline, "enable_freeu")  # as Diffusers: IF pipelines have no FreeU
