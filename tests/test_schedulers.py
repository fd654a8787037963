"""Schedulers against diffusers 0.42.1: full denoising loops, img2img starts, config handling, no syncs in step."""

from __future__ import annotations

import copy
import functools
import inspect
import json
import sys
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import assert_close_rel
from diffusers.utils.torch_utils import randn_tensor as diffusers_randn_tensor

import rapiddiff
from rapiddiff.configuration import ConfigError
from rapiddiff.presets import PRESETS_DIR
from rapiddiff.utils.torch_utils import randn_tensor

CONFIGS = PRESETS_DIR
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
IF_DDPM = dict(
    beta_schedule="squaredcos_cap_v2",
    variance_type="learned_range",
    thresholding=True,
    dynamic_thresholding_ratio=0.95,
    sample_max_value=1.5,
)

# (scheduler, config, step kwargs, num_inference_steps): every supported feature at least once.
CASES = [
    ("DDIMScheduler", {}, {}, 10),
    ("DDIMScheduler", dict(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), {}, 12),
    (
        "DDIMScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
        {},
        10,
    ),
    ("DDIMScheduler", dict(prediction_type="sample", timestep_spacing="linspace", clip_sample_range=0.5), {}, 11),
    ("DDIMScheduler", dict(clip_sample_range=0.8), dict(eta=0.7, use_clipped_model_output=True), 10),
    ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", thresholding=True), dict(eta=1.0), 10),
    ("DDIMScheduler", dict(num_train_timesteps=50, trained_betas=[0.001 * (i + 1) for i in range(50)]), {}, 10),
    ("DDPMScheduler", {}, {}, 10),
    ("DDPMScheduler", IF_DDPM, {}, 12),
    ("DDPMScheduler", dict(variance_type="fixed_small_log", prediction_type="v_prediction"), {}, 10),
    ("DDPMScheduler", dict(variance_type="learned", prediction_type="sample", timestep_spacing="linspace"), {}, 10),
    (
        "DDPMScheduler",
        dict(
            variance_type="fixed_large",
            rescale_betas_zero_snr=True,
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            clip_sample=False,
        ),
        {},
        10,
    ),
    ("PNDMScheduler", dict(**SD, skip_prk_steps=True, steps_offset=1), {}, 15),
    ("PNDMScheduler", {}, {}, 10),
    ("PNDMScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True), {}, 10),
    ("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="linspace"), {}, 10),
    ("EulerDiscreteScheduler", {}, {}, 25),
    ("EulerDiscreteScheduler", dict(**SD, timestep_spacing="leading", steps_offset=1), {}, 10),
    (
        "EulerDiscreteScheduler",
        dict(use_karras_sigmas=True, final_sigmas_type="sigma_min", prediction_type="v_prediction"),
        {},
        10,
    ),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), {}, 10),
    (
        "EulerDiscreteScheduler",
        dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="sample"),
        dict(s_churn=1.0, s_tmin=0.5, s_tmax=20.0),
        10,
    ),
    ("EulerDiscreteScheduler", dict(**SD, use_exponential_sigmas=True, prediction_type="v_prediction"), {}, 10),
    ("EulerDiscreteScheduler", dict(use_beta_sigmas=True, sigma_max=12.0, timestep_spacing="trailing"), {}, 9),
    (
        "EulerDiscreteScheduler",
        dict(interpolation_type="log_linear", timestep_type="continuous", prediction_type="v_prediction"),
        {},
        10,
    ),
    ("EulerAncestralDiscreteScheduler", {}, {}, 10),
    ("EulerAncestralDiscreteScheduler", dict(**SD, timestep_spacing="leading", steps_offset=1), {}, 12),
    (
        "EulerAncestralDiscreteScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
        {},
        10,
    ),
    ("DPMSolverMultistepScheduler", {}, {}, 10),
    ("DPMSolverMultistepScheduler", dict(**SD, solver_order=3, solver_type="heun", use_karras_sigmas=True), {}, 12),
    (
        "DPMSolverMultistepScheduler",
        dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="v_prediction"),
        {},
        10,
    ),
    (
        "DPMSolverMultistepScheduler",
        dict(
            algorithm_type="dpmsolver",
            solver_type="heun",
            solver_order=3,
            final_sigmas_type="sigma_min",
            prediction_type="sample",
            thresholding=True,
        ),
        {},
        10,
    ),
    ("DPMSolverMultistepScheduler", dict(**IF_DDPM, lambda_min_clipped=-5.1), {}, 10),
    (
        "DPMSolverMultistepScheduler",
        dict(solver_order=3, lower_order_final=False, timestep_spacing="trailing", rescale_betas_zero_snr=True),
        {},
        20,
    ),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, timestep_spacing="leading", steps_offset=1), {}, 10),
    (
        "DPMSolverMultistepScheduler",
        dict(euler_at_final=True, lower_order_final=False, prediction_type="sample"),
        {},
        16,
    ),
    ("DPMSolverMultistepScheduler", dict(**SD, use_exponential_sigmas=True, prediction_type="v_prediction"), {}, 10),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True, final_sigmas_type="sigma_min", solver_order=3), {}, 12),
    ("DPMSolverMultistepScheduler", dict(**SD, use_lu_lambdas=True), {}, 10),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2", use_lu_lambdas=True), {}, 10),
]
# LMS, Heun, KDPM2 (ancestral), EDM Euler: every sigma spacing and prediction type at least once (img2img starts:
# test_img2img_start_matches_diffusers runs every case).
CASES += [
    ("LMSDiscreteScheduler", {}, {}, 10),
    ("LMSDiscreteScheduler", dict(**SD, use_karras_sigmas=True, prediction_type="v_prediction"), {}, 10),
    ("LMSDiscreteScheduler", dict(use_exponential_sigmas=True, timestep_spacing="leading", steps_offset=1), {}, 12),
    ("LMSDiscreteScheduler", dict(use_beta_sigmas=True, prediction_type="sample"), dict(order=3), 9),
    ("HeunDiscreteScheduler", {}, {}, 10),
    (
        "HeunDiscreteScheduler",
        dict(use_karras_sigmas=True, prediction_type="v_prediction", clip_sample=True, clip_sample_range=0.5),
        {},
        8,
    ),
    ("HeunDiscreteScheduler", dict(**SD, use_exponential_sigmas=True, timestep_spacing="trailing"), {}, 8),
    ("HeunDiscreteScheduler", dict(use_beta_sigmas=True, prediction_type="sample", beta_schedule="exp"), {}, 7),
    ("KDPM2DiscreteScheduler", {}, {}, 10),
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction"), {}, 8),
    ("KDPM2DiscreteScheduler", dict(use_beta_sigmas=True, timestep_spacing="leading", steps_offset=1), {}, 8),
    ("KDPM2AncestralDiscreteScheduler", {}, {}, 10),
    (
        "KDPM2AncestralDiscreteScheduler",
        dict(use_karras_sigmas=True, prediction_type="v_prediction", timestep_spacing="trailing"),
        {},
        8,
    ),
    ("KDPM2AncestralDiscreteScheduler", dict(**SD, use_exponential_sigmas=True), {}, 7),
    ("EDMEulerScheduler", {}, {}, 10),
    (
        "EDMEulerScheduler",
        dict(sigma_schedule="exponential", prediction_type="v_prediction", final_sigmas_type="sigma_min"),
        {},
        8,
    ),
    ("EDMEulerScheduler", dict(sigma_max=20.0, rho=5.0, sigma_data=1.0), dict(s_churn=1.0, s_tmin=0.1, s_tmax=10), 8),
]
# The exponential-integrator and consistency schedulers (issue 12): Karras / exponential sigmas, v-prediction, orders,
# the SDE variants. DPMSolverSDE's Brownian tree is seeded by its config (unseeded, it draws from the global RNG).
SOLVER_CASES = [
    ("UniPCMultistepScheduler", {}, {}, 10),
    ("UniPCMultistepScheduler", dict(**SD, solver_order=3, use_karras_sigmas=True), {}, 12),
    (
        "UniPCMultistepScheduler",
        dict(prediction_type="v_prediction", solver_type="bh1", final_sigmas_type="sigma_min"),
        {},
        10,
    ),
    (
        "UniPCMultistepScheduler",
        dict(
            predict_x0=False,
            solver_order=3,
            lower_order_final=False,
            final_sigmas_type="sigma_min",
            timestep_spacing="trailing",
        ),
        {},
        16,
    ),
    (
        "UniPCMultistepScheduler",
        dict(
            disable_corrector=[0, 2],
            thresholding=True,
            prediction_type="sample",
            timestep_spacing="leading",
            steps_offset=1,
        ),
        {},
        10,
    ),
    ("UniPCMultistepScheduler", dict(**SD, use_exponential_sigmas=True, final_sigmas_type="sigma_min"), {}, 8),
    ("DEISMultistepScheduler", {}, {}, 10),
    ("DEISMultistepScheduler", dict(**SD, solver_order=3, use_karras_sigmas=True), {}, 12),
    (
        "DEISMultistepScheduler",
        dict(prediction_type="v_prediction", solver_order=3, timestep_spacing="trailing"),
        {},
        16,
    ),
    (
        "DEISMultistepScheduler",
        dict(thresholding=True, prediction_type="sample", solver_order=1, timestep_spacing="leading"),
        {},
        10,
    ),
    ("DPMSolverSinglestepScheduler", {}, {}, 10),
    ("DPMSolverSinglestepScheduler", dict(**SD, solver_order=3, use_karras_sigmas=True), {}, 12),
    (
        "DPMSolverSinglestepScheduler",
        dict(prediction_type="v_prediction", solver_order=3, solver_type="heun", final_sigmas_type="sigma_min"),
        {},
        9,
    ),
    (
        "DPMSolverSinglestepScheduler",
        dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", prediction_type="sample"),
        {},
        10,
    ),
    ("DPMSolverSinglestepScheduler", dict(thresholding=True, prediction_type="sample", solver_order=3), {}, 10),
    ("DPMSolverSinglestepScheduler", dict(**SD, algorithm_type="sde-dpmsolver++", solver_order=3), {}, 11),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}, 10),
    (
        "DPMSolverMultistepScheduler",
        dict(**SD, algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True),
        {},
        12,
    ),
    (
        "DPMSolverMultistepScheduler",
        dict(
            algorithm_type="sde-dpmsolver",
            solver_type="heun",
            final_sigmas_type="sigma_min",
            prediction_type="v_prediction",
        ),
        {},
        10,
    ),
    ("DPMSolverSDEScheduler", dict(noise_sampler_seed=3), {}, 10),
    ("DPMSolverSDEScheduler", dict(**SD, use_karras_sigmas=True, noise_sampler_seed=5), dict(s_noise=0.9), 8),
    (
        "DPMSolverSDEScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="trailing", noise_sampler_seed=1),
        {},
        6,
    ),
    ("DPMSolverSDEScheduler", dict(**SD, timestep_spacing="leading", steps_offset=1, noise_sampler_seed=[4, 5]), {}, 6),
    ("LCMScheduler", {}, {}, 4),
    (
        "LCMScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=True, set_alpha_to_one=False),
        {},
        6,
    ),
    ("LCMScheduler", dict(prediction_type="sample", thresholding=True), {}, 8),
    ("TCDScheduler", {}, {}, 4),
    ("TCDScheduler", dict(prediction_type="v_prediction", set_alpha_to_one=False), dict(eta=0.0), 6),
    ("TCDScheduler", dict(prediction_type="sample"), dict(eta=1.0), 8),
]
CASES += SOLVER_CASES
IDS = [f"{name[:-9]}-{i}" for i, (name, *_) in enumerate(CASES)]


@functools.cache
def _reference(name: str, config_json: str):
    return getattr(diffusers, name)(**json.loads(config_json))


def pair(name: str, config: dict) -> tuple:
    # Diffusers' KDPM2 schedulers take seconds to build (a Python loop over 1000 sigmas): build each config once
    reference = copy.deepcopy(_reference(name, json.dumps(config, sort_keys=True)))
    return reference, getattr(rapiddiff, name)(**config)


def channels(config: dict) -> int:
    return 3 if config.get("variance_type", "").startswith("learned") else 4  # IF is RGB


def fake_model(x: torch.Tensor, t: float, learned_variance: bool) -> torch.Tensor:
    """A deterministic stand-in for the UNet; IF's outputs a variance channel block too."""
    out = 0.3 * x + torch.cos(0.7 * x + t / 1000)
    return torch.cat([out, 0.5 + 0.4 * torch.tanh(x + t / 500)], dim=1) if learned_variance else out


def step_kwargs(scheduler, kwargs: dict, seed: int) -> dict:
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {**kwargs, "generator": torch.Generator().manual_seed(seed)}
    return kwargs


def assert_same_schedule(ref, ours) -> None:
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    if getattr(ref, "sigmas", None) is not None:
        torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=1e-6, rtol=1e-6)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def run_loop(ref, ours, config: dict, kwargs: dict, sample: torch.Tensor, timesteps, tag: str) -> torch.Tensor:
    """Denoise with both schedulers side by side, comparing every step's outputs."""
    learned = config.get("variance_type", "").startswith("learned")
    ref_kwargs, our_kwargs = step_kwargs(ref, kwargs, 7), step_kwargs(ours, kwargs, 7)
    x_ref, x_ours = sample, sample.clone()
    for i, t in enumerate(timesteps):
        m_ref = fake_model(ref.scale_model_input(x_ref, t), float(t), learned)
        m_ours = fake_model(ours.scale_model_input(x_ours, t), float(t), learned)
        out_ref, out_ours = ref.step(m_ref, t, x_ref, **ref_kwargs), ours.step(m_ours, t, x_ours, **our_kwargs)
        assert_close_rel(out_ours.prev_sample, out_ref.prev_sample, 1e-5, f"{tag} step {i} prev_sample")
        for key in ("pred_original_sample", "denoised", "pred_noised_sample"):  # x0, LCM's and TCD's estimates
            if getattr(out_ref, key, None) is not None:
                assert_close_rel(getattr(out_ours, key), getattr(out_ref, key), 1e-5, f"{tag} step {i} {key}")
        x_ref, x_ours = out_ref.prev_sample, out_ours.prev_sample
    return x_ours


@pytest.mark.parametrize("name,config,kwargs,n", CASES, ids=IDS)
def test_full_loop_matches_diffusers(name, config, kwargs, n):
    ref, ours = pair(name, config)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert_same_schedule(ref, ours)
    assert ours.num_inference_steps == ref.num_inference_steps and ours.order == ref.order
    sample = torch.randn(2, channels(config), 8, 6, generator=torch.Generator().manual_seed(0))
    sample = sample * ours.init_noise_sigma
    run_loop(ref, ours, config, kwargs, sample, ref.timesteps, name)
    assert ours.step_index in (None, len(ours.timesteps))


@pytest.mark.parametrize("name,config,kwargs,n", CASES, ids=IDS)
def test_img2img_start_matches_diffusers(name, config, kwargs, n):
    """Pipelines start mid-schedule: set_begin_index(t_start * order), add_noise at the first timestep, denoise."""
    ref, ours = pair(name, config)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    t_start = n // 3
    if hasattr(ref, "set_begin_index"):  # as Diffusers' img2img pipeline does
        ref.set_begin_index(t_start * ref.order)
    ours.set_begin_index(t_start * ours.order)
    timesteps = ref.timesteps[t_start * ref.order :]
    gen = torch.Generator().manual_seed(1)
    image, noise = (
        torch.randn(2, channels(config), 8, 6, generator=gen),
        torch.randn(2, channels(config), 8, 6, generator=gen),
    )
    start = timesteps[:1].repeat(2)
    assert_close_rel(ours.add_noise(image, noise, start), ref.add_noise(image, noise, start), 1e-5, "add_noise")
    sample = ref.add_noise(image, noise, start)
    run_loop(ref, ours, config, kwargs, sample, timesteps, f"{name} img2img")
    if len(timesteps) > 1:  # inpainting re-noises the image at the next timestep after each step
        nxt = timesteps[1:2].repeat(2)
        assert_close_rel(ours.add_noise(image, noise, nxt), ref.add_noise(image, noise, nxt), 1e-5, "add_noise after")


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler"])
def test_add_noise_and_velocity_at_any_training_timestep(name):
    """IF's super-resolution noises its input at a fixed noise level that is not in the schedule."""
    ref, ours = pair(name, IF_DDPM if name == "DDPMScheduler" else SD)
    x, noise = torch.randn(3, 3, 5, 4), torch.randn(3, 3, 5, 4)
    levels = torch.tensor([250, 0, 999])
    assert_close_rel(ours.add_noise(x, noise, levels), ref.add_noise(x, noise, levels), 1e-6, "add_noise")
    if hasattr(ref, "get_velocity"):
        assert_close_rel(ours.get_velocity(x, noise, levels), ref.get_velocity(x, noise, levels), 1e-6, "velocity")


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_add_noise_looks_up_timesteps_without_begin_index(name):
    ref, ours = pair(name, SD)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x, noise = torch.randn(3, 4, 5, 4), torch.randn(3, 4, 5, 4)
    timesteps = ref.timesteps[[0, 4, 9]]
    assert_close_rel(ours.add_noise(x, noise, timesteps), ref.add_noise(x, noise, timesteps), 1e-6, "add_noise")


def test_custom_timesteps_and_sigmas_match_diffusers():
    for name, custom in [
        ("DDPMScheduler", dict(timesteps=[900, 700, 500, 300, 120, 40, 0])),
        ("DPMSolverMultistepScheduler", dict(timesteps=[999, 800, 600, 400, 200, 50])),
        ("EulerDiscreteScheduler", dict(timesteps=[999.0, 750.5, 500.0, 250.0, 10.0])),
        ("EulerDiscreteScheduler", dict(sigmas=[14.6, 6.0, 2.5, 1.0, 0.3, 0.0])),
        ("EulerDiscreteScheduler", dict(sigmas=[14.6, 6.0, 2.5, 1.0, 0.3, 0.3])),  # final_sigmas_type="sigma_min"
        ("HeunDiscreteScheduler", dict(timesteps=[999.0, 750.5, 500.0, 250.0, 10.0])),
        ("EDMEulerScheduler", dict(sigmas=torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]))),  # ramp points, as Diffusers
    ]:
        ref, ours = pair(name, {} if name.startswith("EDM") else SD)
        ref.set_timesteps(**custom)
        ours.set_timesteps(**custom)
        assert_same_schedule(ref, ours)
        sample = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3)) * ours.init_noise_sigma
        run_loop(ref, ours, SD, {}, sample, ref.timesteps, f"{name} {custom}")


@pytest.mark.parametrize(
    "sigmas, problem",
    [
        ([1.0, 5.0, 14.0], "strictly decreasing"),  # ascending
        ([14.0, 5.0, 5.0, 0.0], "strictly decreasing"),
        ([14.0, 5.0, 0.5, 0.6], "strictly decreasing"),
        ([14.0, -1.0], "non-negative"),
        ([14.0, float("nan"), 0.0], "finite"),
        ([float("inf"), 1.0, 0.0], "finite"),
        ([14.0], "at least 2"),
    ],
)
def test_custom_sigmas_are_checked_like_timesteps(sigmas, problem):
    """Custom sigmas: finite, non-negative, strictly decreasing (a trailing 0 is the usual final level)."""
    scheduler = rapiddiff.EulerDiscreteScheduler(**SD)
    with pytest.raises(ValueError, match=f"sigmas must .*{problem}.*got"):
        scheduler.set_timesteps(sigmas=sigmas)
    scheduler.set_timesteps(sigmas=[14.0, 3.0, 0.5, 0.0])  # valid, with the final 0
    assert scheduler.sigmas.tolist() == [14.0, 3.0, 0.5, 0.0]
    own = rapiddiff.EulerDiscreteScheduler(**SD, final_sigmas_type="sigma_min")
    own.set_timesteps(6)
    assert own.sigmas[-1] == own.sigmas[-2]  # the final step keeps sigma_min
    again = rapiddiff.EulerDiscreteScheduler(**SD, final_sigmas_type="sigma_min")
    again.set_timesteps(sigmas=own.sigmas)  # a scheduler's own table is taken back
    torch.testing.assert_close(again.timesteps, own.timesteps, rtol=1e-5, atol=1e-3)  # sigma -> t in float32
    torch.testing.assert_close(again.sigmas, own.sigmas)


@pytest.mark.parametrize("name", ["PNDMScheduler", "DPMSolverMultistepScheduler"])
def test_history_survives_an_overwritten_model_output_buffer(name):
    """With CUDA graphs the model writes every output into the same buffer: stored outputs must be copies."""
    config = dict(prediction_type="sample") if name.startswith("DPM") else dict(skip_prk_steps=False)
    results = []
    for reuse_buffer in (False, True):
        scheduler = getattr(rapiddiff, name)(**config)
        scheduler.set_timesteps(8)
        x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        buffer = torch.empty_like(x)
        for t in scheduler.timesteps:
            out = fake_model(x, float(t), False)
            if reuse_buffer:
                out = buffer.copy_(out)
            x = scheduler.step(out, t, x).prev_sample
        results.append(x)
    torch.testing.assert_close(results[1], results[0], atol=0, rtol=0)


def test_step_never_reads_tensors_back(monkeypatch):
    """A step must not sync with the device: no .item(), .tolist(), .cpu(), .numpy() or Python conversion."""
    prepared = []
    for name, config, kwargs, n in CASES:
        scheduler = getattr(rapiddiff, name)(**config)
        scheduler.set_timesteps(n)
        scheduler.set_begin_index(0)
        values = [float(t) for t in scheduler.timesteps]
        sample = torch.randn(2, channels(config), 4, 4, generator=torch.Generator().manual_seed(0))
        prepared.append((scheduler, config, step_kwargs(scheduler, kwargs, 0), values, sample))

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a scheduler step read a tensor back to the host")

    for method in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    for scheduler, config, kwargs, values, x in prepared:
        learned = config.get("variance_type", "").startswith("learned")
        for t, value in zip(scheduler.timesteps, values):
            model_output = fake_model(scheduler.scale_model_input(x, t), value, learned)
            x = scheduler.step(model_output, t, x, **kwargs).prev_sample
    monkeypatch.undo()
    assert all(torch.isfinite(p[-1]).all() for p in prepared)


def test_device_timesteps_are_never_read():
    """A timestep on another device (meta here: reading it raises) is not looked up: the loop starts at index 0."""
    ref, ours = pair("EulerDiscreteScheduler", SD)
    ref.set_timesteps(6)
    ours.set_timesteps(6)
    sample = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    x_ref, x_ours = sample, sample.clone()
    for t in ref.timesteps:
        x_ref = ref.step(fake_model(ref.scale_model_input(x_ref, t), float(t), False), t, x_ref).prev_sample
        t_dev = t.to("meta")
        x_in = ours.scale_model_input(x_ours, t_dev)
        x_ours = ours.step(fake_model(x_in, float(t), False), t_dev, x_ours).prev_sample
    assert_close_rel(x_ours, x_ref, 1e-5, "loop with device timesteps")


# --- configs -------------------------------------------------------------------------------------------------------
SWAP_TARGETS = [
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "LMSDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "EDMEulerScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "LCMScheduler",
    "TCDScheduler",
]


def sd15_scheduler_folder() -> Path:
    folder = CONFIGS / "stable-diffusion-v1-5"
    return folder


def fields(scheduler) -> dict:
    """The config's keys and values as Diffusers shows them (lists, where rapiddiff's frozen config keeps tuples)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dict(scheduler.config).items() if not k.startswith("_")
    }


@pytest.mark.parametrize("target", SWAP_TARGETS)
def test_swap_from_sd15_pndm_config_matches_diffusers(target):
    """`Target.from_config(pipe.scheduler.config)`: PNDM-only keys set aside, PNDM's defaults not carried over."""
    folder = sd15_scheduler_folder()
    ref_pndm = diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler")
    our_pndm = rapiddiff.PNDMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert fields(our_pndm) == fields(ref_pndm)
    ref = getattr(diffusers, target).from_config(ref_pndm.config)
    ours = getattr(rapiddiff, target).from_config(our_pndm.config)
    assert fields(ours) == fields(ref)  # e.g. Euler keeps its "linspace" spacing, gets steps_offset=1
    assert dict(ours.config)["_use_default_values"] and ours.config["skip_prk_steps"] is True
    # Diffusers reads our config the same way, and the chain PNDM -> target -> DDIM keeps clip_sample=False
    assert fields(getattr(diffusers, target).from_config(dict(our_pndm.config))) == fields(ref)
    chained_ref, chained = (
        diffusers.DDIMScheduler.from_config(ref.config),
        rapiddiff.DDIMScheduler.from_config(ours.config),
    )
    assert fields(chained) == fields(chained_ref) and chained.config.clip_sample is False
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    sample = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    run_loop(ref, ours, {}, {}, sample, ref.timesteps, f"{target} from PNDM")


@pytest.mark.parametrize("name", sorted({*SWAP_TARGETS, "PNDMScheduler", "DPMSolverSDEScheduler"}))
def test_default_config_is_diffusers(name):
    """Every key and default, the ones declared in shared key groups included, as Diffusers' own class has them."""
    assert fields(getattr(rapiddiff, name)()) == fields(getattr(diffusers, name)())


def test_shipped_configs_load():
    """Real configs carry other schedulers' keys (skip_prk_steps in DDIM, lambda_min_clipped in IF's DDPM)."""
    for model, sub, cls in [
        ("stable-diffusion-inpainting", "scheduler", "DDIMScheduler"),
        ("stable-diffusion-x4-upscaler", "scheduler", "DDIMScheduler"),
        ("stable-diffusion-x4-upscaler", "low_res_scheduler", "DDPMScheduler"),
        ("IF-I-M-v1.0", "scheduler", "DDPMScheduler"),
        ("IF-II-M-v1.0", "image_noising_scheduler", "DDPMScheduler"),
    ]:
        folder = Path(rapiddiff.__file__).parent / "presets" / model
        ours = getattr(rapiddiff, cls).from_pretrained(folder, subfolder=sub)
        ref = getattr(diffusers, cls).from_pretrained(folder, subfolder=sub)
        assert fields(ours) == fields(ref), (model, sub)


def test_swap_from_if_ddpm_config_matches_diffusers():
    folder = Path(rapiddiff.__file__).parent / "presets" / "IF-I-M-v1.0"
    ref_ddpm = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    our_ddpm = rapiddiff.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for target in ("DPMSolverMultistepScheduler", "EulerDiscreteScheduler"):
        ref = getattr(diffusers, target).from_config(ref_ddpm.config)
        ours = getattr(rapiddiff, target).from_config(our_ddpm.config)
        assert fields(ours) == fields(ref)
        assert ours.config.variance_type == ref.config.variance_type == "learned_range"  # IF pipelines read it
    assert ours.config["lambda_min_clipped"] == -5.1
    with pytest.raises(AttributeError, match="no_such_key"):
        _ = ours.config.no_such_key
    clone = copy.deepcopy(ours)
    assert clone.config == ours.config and clone.config.variance_type == "learned_range"


@pytest.mark.parametrize("name", [case[0] for case in CASES[::4]])
def test_save_and_load_roundtrip(name, tmp_path, save_diffusers):
    keys = getattr(rapiddiff, name).config_class._field_names()  # DPM-Solver single-step has no spacing keys
    config = {k: v for k, v in dict(**SD, steps_offset=1, timestep_spacing="trailing").items() if k in keys}
    ref, ours = pair(name, config)
    ours.save_pretrained(tmp_path / "ours" / "scheduler")
    saved = json.loads((tmp_path / "ours" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == name and saved["beta_end"] == 0.012 and saved.get("steps_offset", 1) == 1
    again = getattr(rapiddiff, name).from_pretrained(tmp_path / "ours", subfolder="scheduler")
    # A saved config lists no `_use_default_values` (Diffusers drops them on save), otherwise it compares equal.
    as_built = {k: v for k, v in ours.config.items() if k != "_use_default_values"}
    assert again.config == as_built
    assert fields(getattr(diffusers, name).from_pretrained(tmp_path / "ours", subfolder="scheduler")) == fields(ref)
    from_diffusers = getattr(rapiddiff, name).from_pretrained(save_diffusers(ref, "ref"))
    assert from_diffusers.config == as_built
    overridden = getattr(rapiddiff, name).from_pretrained(tmp_path / "ours", subfolder="scheduler", beta_start=0.001)
    assert overridden.config.beta_start == 0.001 and overridden.config["beta_schedule"] == "scaled_linear"


def test_unknown_and_unsupported_keys_raise(tmp_path):
    with pytest.raises(ConfigError, match="foo_bar"):
        rapiddiff.DDIMScheduler(foo_bar=1)
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"_class_name": "EulerDiscreteScheduler", "warp": 2}))
    with pytest.raises(ConfigError, match="warp"):
        rapiddiff.EulerDiscreteScheduler.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="foo_bar"):  # overrides are checked even on a swap
        rapiddiff.EulerDiscreteScheduler.from_config(rapiddiff.PNDMScheduler().config, foo_bar=1)
    with pytest.raises(ConfigError, match="UNet2DConditionModel"):
        rapiddiff.DDIMScheduler.from_config({"_class_name": "UNet2DConditionModel", "in_channels": 4})
    for cls, key, value in [
        ("EulerDiscreteScheduler", "timestep_type", "edm"),
        ("EulerDiscreteScheduler", "interpolation_type", "cubic"),
        ("EulerDiscreteScheduler", "final_sigmas_type", "one"),
        ("DPMSolverMultistepScheduler", "algorithm_type", "edm"),
        ("DPMSolverMultistepScheduler", "use_flow_sigmas", True),
        ("DDPMScheduler", "variance_type", "fixed_large_log"),
        ("EulerAncestralDiscreteScheduler", "prediction_type", "sample"),
        ("PNDMScheduler", "prediction_type", "sample"),
        ("KDPM2DiscreteScheduler", "prediction_type", "sample"),
        ("LMSDiscreteScheduler", "beta_schedule", "exp"),  # Heun's only
        ("EDMEulerScheduler", "sigma_schedule", "linear"),
        ("EDMEulerScheduler", "final_sigmas_type", "one"),
        ("EDMEulerScheduler", "beta_schedule", "linear"),  # EDM has no betas: not one of its keys
    ]:
        with pytest.raises(ConfigError, match=key):
            getattr(rapiddiff, cls)(**{key: value})
    with pytest.raises(ConfigError, match="final_sigmas_type"):
        rapiddiff.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    # DEIS / UniPC names map onto DPM-Solver++ as in Diffusers
    swapped = rapiddiff.DPMSolverMultistepScheduler.from_config(
        {"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "predict_x0": True}
    )
    assert swapped.config.solver_type == "midpoint" and swapped.config["predict_x0"] is True


@pytest.mark.parametrize("name", sorted({case[0] for case in CASES}))
def test_invalid_values_raise(name):
    cls = getattr(rapiddiff, name)
    with pytest.raises(ValueError, match="beta_schedule"):
        cls(beta_schedule="cosine")
    with pytest.raises(ValueError, match="prediction_type"):
        cls(prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing"):
        cls(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="trained_betas"):
        # Built (and saved) as by Diffusers, but not scheduled; EDM has no betas at all.
        cls(num_train_timesteps=10, trained_betas=[0.1] * 9).set_timesteps(2)
    scheduler = cls(num_train_timesteps=100)
    for n in (0, 101):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(n)
    with pytest.raises(TypeError, match="num_inference_steps"):
        scheduler.set_timesteps(2.5)
    if "timesteps" in inspect.signature(cls.set_timesteps).parameters:
        with pytest.raises(ValueError, match="exactly one"):
            scheduler.set_timesteps(5, timesteps=[50, 10])
        with pytest.raises(ValueError, match="descending"):
            scheduler.set_timesteps(timesteps=[10, 50])
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(-1)


def test_euler_rejects_integer_timesteps_and_finished_loops():
    scheduler = rapiddiff.EulerDiscreteScheduler()
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="integer"):
        scheduler.step(x, 0, x)
    for t in scheduler.timesteps:
        x = scheduler.step(x, t, scheduler.scale_model_input(x, t)).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="set_timesteps"):
        rapiddiff.DDIMScheduler().step(x, 10, x)


def test_outputs_and_config_access():
    scheduler = rapiddiff.DDIMScheduler(**SD)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 2, 2)
    prev, x0 = scheduler.step(x, scheduler.timesteps[0], x, return_dict=False)
    assert prev.shape == x0.shape == x.shape
    assert scheduler.config.num_train_timesteps == scheduler.config["num_train_timesteps"] == len(scheduler) == 1000
    assert scheduler.config["_class_name"] == "DDIMScheduler"
    dpm = rapiddiff.DPMSolverMultistepScheduler()
    dpm.set_timesteps(4)
    assert len(dpm.step(x, dpm.timesteps[0], x, return_dict=False)) == 1


@pytest.mark.parametrize("seeds", [None, 0, [1, 2, 3]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_randn_tensor_matches_diffusers(seeds, dtype):
    def generators():
        if seeds is None:
            torch.manual_seed(5)
            return None
        if isinstance(seeds, list):
            return [torch.Generator().manual_seed(s) for s in seeds]
        return torch.Generator().manual_seed(seeds)

    shape = (3, 4, 5, 2)
    ours = randn_tensor(shape, generator=generators(), device=torch.device("cpu"), dtype=dtype)
    ref = diffusers_randn_tensor(shape, generator=generators(), device=torch.device("cpu"), dtype=dtype)
    assert ours.dtype == dtype and torch.equal(ours, ref)
    with pytest.raises(ValueError, match="generators"):
        randn_tensor(shape, generator=[torch.Generator(), torch.Generator()])


def test_swap_does_not_apply_keys_the_target_class_lacks():
    """PNDM has no rescale_betas_zero_snr: a zero-SNR DDIM config swapped to PNDM keeps it aside, unused."""
    ddim = dict(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ref = diffusers.PNDMScheduler.from_config(diffusers.DDIMScheduler(**ddim).config)
    ours = rapiddiff.PNDMScheduler.from_config(rapiddiff.DDIMScheduler(**ddim).config)
    assert ours.config["rescale_betas_zero_snr"] is True  # kept for later swaps, as Diffusers does
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    assert ours.alphas_cumprod[-1] > 4e-3
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    sample = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(run_loop(ref, ours, {}, {}, sample, ref.timesteps, "PNDM from zero-SNR DDIM")).all()


def test_ddpm_variance_type_none_is_fixed_small(tmp_path):
    """IF-II's image-noising scheduler config has "variance_type": null; Diffusers treats it as fixed_small."""
    config = {"_class_name": "DDPMScheduler", "variance_type": None, "beta_schedule": "squaredcos_cap_v2"}
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    ours = rapiddiff.DDPMScheduler.from_pretrained(tmp_path)
    ref = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert ours.config.variance_type is None and fields(ours) == fields(ref)
    ref.set_timesteps(8)
    ours.set_timesteps(8)
    sample = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    run_loop(ref, ours, {}, {}, sample, ref.timesteps, "DDPM variance_type=None")


def test_sigma_spacing_options_raise_naming_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="use_karras_sigmas, use_beta_sigmas"):
        rapiddiff.EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler"):
        scheduler = getattr(rapiddiff, name)(use_exponential_sigmas=True)
        with pytest.raises(ValueError, match="use_exponential_sigmas"):
            scheduler.set_timesteps(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="use_lu_lambdas"):
        rapiddiff.DPMSolverMultistepScheduler(use_lu_lambdas=True).set_timesteps(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="continuous"):
        rapiddiff.EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction").set_timesteps(
            timesteps=[900.0, 100.0]
        )
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # as if scipy were not installed
    with pytest.raises(ImportError, match="use_beta_sigmas.*scipy"):
        rapiddiff.DPMSolverMultistepScheduler(use_beta_sigmas=True)


def test_new_scheduler_step_options_raise():
    lms = rapiddiff.LMSDiscreteScheduler()
    lms.set_timesteps(4)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="order"):
        lms.step(x, lms.timesteps[0], x, order=5)
    edm = rapiddiff.EDMEulerScheduler()
    with pytest.raises(ValueError, match="sigmas"):
        edm.set_timesteps(sigmas=[0.0, 1.5])
    with pytest.raises(ValueError, match="custom timesteps"):
        rapiddiff.HeunDiscreteScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[900.0, 100.0])


def test_sigma_bounds_of_a_swapped_config_as_diffusers_reads_them():
    """Diffusers' Karras / exponential conversions read config.sigma_min / sigma_max even when they are another
    scheduler's keys (hidden); LMS's Karras conversion does not."""
    euler = dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)
    for target in ("DPMSolverMultistepScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"):
        ref = getattr(diffusers, target).from_config(diffusers.EulerDiscreteScheduler(**euler).config)
        ours = getattr(rapiddiff, target).from_config(rapiddiff.EulerDiscreteScheduler(**euler).config)
        ref.set_timesteps(6)
        ours.set_timesteps(6)
        assert_same_schedule(ref, ours)


# --- the solvers of issue 12: options, swaps, the Brownian tree, the compiled whole step ----------------------------
def test_solver_options_raise_naming_the_key():
    for cls, key, value in [
        ("UniPCMultistepScheduler", "solver_type", "bh3"),
        ("UniPCMultistepScheduler", "solver_order", 4),
        ("UniPCMultistepScheduler", "disable_corrector", ["first"]),
        ("UniPCMultistepScheduler", "use_flow_sigmas", True),
        ("DEISMultistepScheduler", "algorithm_type", "sde-dpmsolver++"),
        ("DEISMultistepScheduler", "solver_order", 0),
        ("DPMSolverSinglestepScheduler", "algorithm_type", "sde-dpmsolver"),
        ("DPMSolverSinglestepScheduler", "timestep_spacing", "trailing"),  # not a key of the single-step solver
        ("DPMSolverSDEScheduler", "prediction_type", "sample"),
        ("LCMScheduler", "prediction_type", "noise"),
        ("TCDScheduler", "beta_schedule", "cosine"),
    ]:
        with pytest.raises(ConfigError, match=key):
            getattr(rapiddiff, cls)(**{key: value})
    with pytest.raises(ConfigError, match="solver_order=3"):
        rapiddiff.DPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"
        )
    with pytest.raises(ConfigError, match="final_sigmas_type"):
        rapiddiff.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver")
    # Diffusers' name mappings on a swap
    assert rapiddiff.UniPCMultistepScheduler(solver_type="midpoint").config.solver_type == "bh2"
    assert rapiddiff.DEISMultistepScheduler(algorithm_type="dpmsolver++").config.algorithm_type == "deis"
    tcd = rapiddiff.TCDScheduler()
    tcd.set_timesteps(4)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta"):
        tcd.step(x, tcd.timesteps[0], x, eta=1.5)
    with pytest.raises(ValueError, match="original_inference_steps"):
        rapiddiff.LCMScheduler().set_timesteps(60)
    with pytest.raises(ValueError, match="mu"):
        rapiddiff.UniPCMultistepScheduler().set_timesteps(10, mu=0.5)
    sde = rapiddiff.DPMSolverSDEScheduler(noise_sampler_seed=[1, 2, 3])
    sde.set_timesteps(3)
    with pytest.raises(ValueError, match="noise_sampler_seed"):
        sde.step(x, sde.timesteps[0], x)


def test_compatibles_are_diffusers_lists():
    """`scheduler.compatibles`: the class and the swaps Diffusers lists for it (those rapiddiff has)."""
    ours_names = {n for n in rapiddiff._EXPORTS if n.endswith("Scheduler")}
    for name in sorted(ours_names):
        ref, ours = getattr(diffusers, name)(), getattr(rapiddiff, name)()
        expected = {c.__name__ for c in ref.compatibles} & ours_names
        assert {c.__name__ for c in ours.compatibles} == expected, name
        assert all(c.__module__.startswith("rapiddiff.") for c in ours.compatibles)
    assert rapiddiff.LCMScheduler().compatibles == [rapiddiff.LCMScheduler]
    assert rapiddiff.UniPCMultistepScheduler in rapiddiff.PNDMScheduler().compatibles


def test_custom_timesteps_of_the_solvers_match_diffusers():
    for name, custom in [
        ("DPMSolverSinglestepScheduler", dict(timesteps=[999, 800, 600, 400, 200, 50])),
        ("LCMScheduler", dict(timesteps=[999, 759, 499, 259])),
        ("LCMScheduler", dict(num_inference_steps=4, original_inference_steps=100, strength=0.6)),
        ("TCDScheduler", dict(timesteps=[999, 759, 499, 259], strength=0.5)),
        ("TCDScheduler", dict(num_inference_steps=5, original_inference_steps=20)),
    ]:
        ref, ours = pair(name, SD)
        ref.set_timesteps(**custom)
        ours.set_timesteps(**custom)
        assert_same_schedule(ref, ours)
        assert ours.num_inference_steps == ref.num_inference_steps
        sample = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
        run_loop(ref, ours, SD, {}, sample, ref.timesteps, f"{name} {custom}")


def test_dpmsolver_sde_unseeded_tree_draws_its_seed_from_the_global_generator():
    ref, ours = pair("DPMSolverSDEScheduler", SD)
    ref.set_timesteps(4)
    ours.set_timesteps(4)
    x_ref = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * ours.init_noise_sigma
    x_ours = x_ref.clone()
    for i, t in enumerate(ref.timesteps):
        torch.manual_seed(123)  # the same global state at each one's first step, where the seed is drawn
        x_ref = ref.step(fake_model(ref.scale_model_input(x_ref, t), float(t), False), t, x_ref).prev_sample
        torch.manual_seed(123)
        x_ours = ours.step(fake_model(ours.scale_model_input(x_ours, t), float(t), False), t, x_ours).prev_sample
        assert_close_rel(x_ours, x_ref, 1e-5, f"unseeded DPMSolverSDE step {i}")


def test_dpmsolver_sde_needs_torchsde(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # as if torchsde were not installed
    with pytest.raises(ImportError, match="pip install torchsde"):
        rapiddiff.DPMSolverSDEScheduler()


# One case per scheduler of issue 12 (LMS's history, Heun / KDPM2's two evaluations per interval included): the whole
# step compiled as one graph gives the eager loop's latents.
WHOLE_STEP_SOLVERS = [
    ("UniPCMultistepScheduler", dict(solver_order=3), {}),
    ("DEISMultistepScheduler", dict(solver_order=3), {}),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3), {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}),
    ("DPMSolverSDEScheduler", dict(noise_sampler_seed=0), {}),
    ("LCMScheduler", {}, {}),
    ("TCDScheduler", {}, dict(eta=0.5)),
    ("LMSDiscreteScheduler", {}, {}),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True), {}),  # two evaluations per interval: one graph
    ("KDPM2AncestralDiscreteScheduler", {}, {}),  # and noise at every second evaluation
    ("EDMEulerScheduler", {}, {}),
]


@pytest.mark.compile
@pytest.mark.parametrize("name,config,kwargs", WHOLE_STEP_SOLVERS, ids=[c[0][:-9] for c in WHOLE_STEP_SOLVERS])
def test_whole_step_of_the_solvers_matches_the_eager_loop(name, config, kwargs):
    """`compile_pipeline(whole_step=True)`'s runner over a stand-in model: one graph for every step and call (img2img
    starts included), the eager loop's latents; the eager loop runs under the host-sync guard."""
    import torch._dynamo

    from rapiddiff.compile import WholeStep, forbid_host_syncs
    from rapiddiff.pipelines.denoise import DenoisingStep, Guidance, StepInput, run_step

    def model(x, t, encoder_hidden_states, return_dict):  # tensor-only: no graph break on t
        return (0.3 * x + torch.cos(0.7 * x + t / 1000),)

    def loop(runner, n, begin, seed):
        scheduler = getattr(rapiddiff, name)(**({} if name.startswith("EDM") else SD), **config)  # EDM: no betas
        scheduler.set_timesteps(n)
        scheduler.set_begin_index(begin * scheduler.order)
        step = DenoisingStep(model, scheduler, Guidance(1.0), step_kwargs(scheduler, kwargs, seed))
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps[begin * scheduler.order :]):
            x = runner(step, StepInput(x, t, i, {"prompt_embeds": None}))
        return x

    def guarded(*args):
        with forbid_host_syncs():
            return run_step(*args)

    torch._dynamo.reset()
    compiled = WholeStep(backend="eager")
    for n, begin, seed, recompiles in [(6, 0, 0, True), (7, 2, 1, False)]:
        expected = loop(guarded, n, begin, seed)
        with torch._dynamo.config.patch(error_on_recompile=not recompiles):  # the second call: the first's graph
            got = loop(compiled, n, begin, seed)
        assert_close_rel(got, expected, 1e-5, f"{name} whole step, {n} steps from {begin}")
    torch._dynamo.reset()
