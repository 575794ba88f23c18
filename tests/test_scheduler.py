"""The scheduler against diffusers' own DDPMScheduler and DDIMScheduler (the independent reference)."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from pipeline_ddpm_custom import DDPMCustomScheduler

from .conftest import public_config

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]
VARIANCES = ["fixed_small", "fixed_large", "learned_range"]
PREDICTIONS = ["epsilon", "sample", "v_prediction"]


def oracle_output(x_t, t, x0_target, prediction_type, alphas_cumprod):
    """What a perfect model that knows x_0 would output at (x_t, t): keeps long chains bounded, so
    differences between the schedulers show up instead of being swamped by blow-up."""
    a, s = alphas_cumprod[t].sqrt(), (1 - alphas_cumprod[t]).sqrt()
    eps = (x_t - a * x0_target) / s
    return {"epsilon": eps, "sample": x0_target, "v_prediction": a * eps - s * x0_target}[prediction_type]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_add_noise_and_velocity_match_diffusers(schedule):
    ours, ref = DDPMCustomScheduler(beta_schedule=schedule), DDPMScheduler(beta_schedule=schedule)
    x0, noise = torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("schedule,variance,prediction", list(itertools.product(SCHEDULES, VARIANCES, PREDICTIONS)))
@pytest.mark.parametrize("clip", [True, False])
def test_full_ddpm_chain_matches_diffusers(schedule, variance, prediction, clip):
    config = dict(beta_schedule=schedule, variance_type=variance, prediction_type=prediction, clip_sample=clip)
    ours, ref = DDPMCustomScheduler(**config), DDPMScheduler(**config)
    gen = torch.Generator().manual_seed(0)
    x0_target = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    x = y = torch.randn(2, 3, 8, 8, generator=gen)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(ours.timesteps, ref.timesteps) and len(ref.timesteps) == 1000
    for t in ref.timesteps:
        out_x = oracle_output(x, t, x0_target, prediction, ref.alphas_cumprod)
        out_y = oracle_output(y, t, x0_target, prediction, ref.alphas_cumprod)
        if variance == "learned_range":
            v = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
            out_x, out_y = torch.cat([out_x, v], 1), torch.cat([out_y, v], 1)
        step_ours = ours.step(out_x, t, x, generator=g_ours)
        step_ref = ref.step(out_y, t, y, generator=g_ref)
        x, y = step_ours.prev_sample, step_ref.prev_sample
    torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(step_ours.pred_original_sample, step_ref.pred_original_sample, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_chain_matches_diffusers(spacing, steps, eta, prediction):
    config = dict(timestep_spacing=spacing, prediction_type=prediction)
    ours, ref = DDPMCustomScheduler(**config), DDIMScheduler(**config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    gen = torch.Generator().manual_seed(0)
    x = y = torch.randn(2, 3, 8, 8, generator=gen)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        out = torch.randn(2, 3, 8, 8, generator=gen)
        x = ours.step(out, t, x, eta=eta, generator=g_ours).prev_sample
        # ours takes DDIM's direction from the eps consistent with the clipped x0 (improved-diffusion)
        y = ref.step(out, t, y, eta=eta, generator=g_ref, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_given_variance_noise_steps_as_ddim_does(eta):
    """step(variance_noise=z), DDIMScheduler's argument (what DDPM inversion replays): a chain given fresh z at every
    step matches DDIMScheduler given the same z (eta 1 here is our DDPM step, the same posterior); the noise a
    generator would draw, given as variance_noise, is the generator's step exactly."""
    ours, ref = DDPMCustomScheduler(), DDIMScheduler()
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    x = y = torch.randn(2, 3, 8, 8, generator=gen)
    for t in ref.timesteps:
        out, z = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
        x = ours.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        y = ref.step(out, t, y, eta=eta, variance_noise=z, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x, y, atol=1e-5, rtol=0)

    out, x = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    t = ours.timesteps[3]
    drawn = ours.step(out, t, x, eta=eta, generator=torch.Generator().manual_seed(5)).prev_sample
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours.step(out, t, x, eta=eta, variance_noise=z).prev_sample, drawn, atol=0, rtol=0)
    assert not torch.allclose(ours.step(out, t, x, eta=eta, variance_noise=-z).prev_sample, drawn)
    with pytest.raises(ValueError, match="generator or variance_noise, not both"):
        ours.step(out, t, x, generator=torch.Generator(), variance_noise=z)
    with pytest.raises(ValueError, match=r"variance_noise must have the sample's shape \(2, 3, 8, 8\)"):
        ours.step(out, t, x, variance_noise=z[:1])


def chains_with_the_same_inputs(ours, reference, x0_target, prediction, eta=None, reference_kwargs=None):
    """Step both schedulers through ``reference.timesteps`` from the same x_T, each with the same imperfect model (the
    output that knows x0_target, scaled by 1.3 so that clipping and thresholding have work to do, plus an error
    drawn anew at every step, so that the chain does not forget a wrong step) and the same noise stream; returns the
    two final samples. Our tables are float64 and diffusers' float32, so over a chain that the
    scaled oracle does not pull together they part by a few 1e-5: compare with CHAIN_TOLERANCE."""
    gen = torch.Generator().manual_seed(0)
    x = y = torch.randn(x0_target.shape, generator=gen)
    g_ours, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ours_kwargs = {} if eta is None else {"eta": eta}
    for t in reference.timesteps:
        error = 0.3 * torch.randn(x0_target.shape, generator=gen)
        out_x = 1.3 * oracle_output(x, int(t), x0_target, prediction, ours.alphas_cumprod.float()) + error
        out_y = 1.3 * oracle_output(y, int(t), x0_target, prediction, ours.alphas_cumprod.float()) + error
        x = ours.step(out_x, t, x, generator=g_ours, **ours_kwargs).prev_sample
        y = reference.step(out_y, t, y, generator=g_ref, **(reference_kwargs or {})).prev_sample
    return x, y


CHAIN_TOLERANCE = dict(atol=1e-4, rtol=1e-5)  # a wrong previous timestep or option parts them by 1e-2 or more
X0_TARGET = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 333])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_steps_to_the_chains_next_timestep_for_any_step_count(spacing, steps, prediction):
    """DDIM (eta 0) goes from each timestep to the chain's next one, also when the step count does not divide T.
    Reference: diffusers' first-order DPM-Solver++, which is DDIM, given the same timesteps. (DDIMScheduler itself
    steps to t - T // n, which is not the next timestep of an uneven chain: trailing or linspace with such n.)"""
    ours = DDPMCustomScheduler(timestep_spacing=spacing, prediction_type=prediction, clip_sample=False)
    ours.set_timesteps(steps)
    reference = DPMSolverMultistepScheduler(prediction_type=prediction, solver_order=1, algorithm_type="dpmsolver++",
                                            final_sigmas_type="zero")
    reference.set_timesteps(timesteps=ours.timesteps.tolist())
    assert torch.equal(reference.timesteps.long(), ours.timesteps)
    x, y = chains_with_the_same_inputs(ours, reference, X0_TARGET, prediction, eta=0.0)
    torch.testing.assert_close(x, y, **CHAIN_TOLERANCE)


@pytest.mark.parametrize("chain", [dict(steps=37, spacing="leading"), dict(steps=37, spacing="trailing"),
                                   dict(steps=37, spacing="linspace"), dict(timesteps=[999, 800, 500, 200, 50, 10, 0])])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_respaced_ancestral_chain_matches_diffusers(chain, prediction):
    """eta 1 on a shortened or hand-picked chain equals DDPMScheduler's respaced chain (same noise stream)."""
    config = dict(prediction_type=prediction, timestep_spacing=chain.get("spacing", "leading"))
    ours, reference = DDPMCustomScheduler(**config), DDPMScheduler(**config)
    for scheduler in (ours, reference):
        scheduler.set_timesteps(num_inference_steps=chain.get("steps"), timesteps=chain.get("timesteps"))
    assert torch.equal(ours.timesteps, reference.timesteps)
    x, y = chains_with_the_same_inputs(ours, reference, X0_TARGET, prediction)
    torch.testing.assert_close(x, y, **CHAIN_TOLERANCE)


CONFIG_OPTIONS = [
    dict(thresholding=True, sample_max_value=1.5),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(steps_offset=1),
]


@pytest.mark.parametrize("config", CONFIG_OPTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_chain_matches_diffusers_with_config_options(config, eta):
    """Dynamic thresholding, zero terminal SNR and steps_offset in DDIM chains, against DDIMScheduler."""
    ours, reference = DDPMCustomScheduler(**config), DDIMScheduler(**config)
    ours.set_timesteps(50)
    reference.set_timesteps(50)
    assert torch.equal(ours.timesteps, reference.timesteps)
    x, y = chains_with_the_same_inputs(ours, reference, X0_TARGET, config.get("prediction_type", "epsilon"), eta=eta,
                                       reference_kwargs=dict(eta=eta, use_clipped_model_output=True))
    torch.testing.assert_close(x, y, **CHAIN_TOLERANCE)


@pytest.mark.parametrize("config", CONFIG_OPTIONS)
def test_ddpm_chain_matches_diffusers_with_config_options(config):
    """The same options in ancestral chains (a respaced one, where steps_offset matters), against DDPMScheduler."""
    ours, reference = DDPMCustomScheduler(**config), DDPMScheduler(**config)
    for scheduler in (ours, reference):
        scheduler.set_timesteps(20)
    assert torch.equal(ours.timesteps, reference.timesteps)
    x, y = chains_with_the_same_inputs(ours, reference, X0_TARGET, config.get("prediction_type", "epsilon"))
    torch.testing.assert_close(x, y, **CHAIN_TOLERANCE)


def test_eta_one_on_full_chain_is_ddpm_and_eta_zero_is_deterministic():
    s = DDPMCustomScheduler(num_train_timesteps=50)
    x, out = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4)
    a = s.step(out, 30, x, eta=0.0, generator=torch.Generator().manual_seed(0)).prev_sample
    b = s.step(out, 30, x, eta=0.0, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a, b)
    c = s.step(out, 30, x, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    d = s.step(out, 30, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
    assert not torch.allclose(c, d)
    # eta=1 through the DDIM formula equals the DDPM posterior step (fixed_small): same mean, same noise
    e = s.step(out, 30, x, eta=0.999999999, generator=torch.Generator().manual_seed(0)).prev_sample
    torch.testing.assert_close(c, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [7, 50, 333])
def test_respaced_chain_reproduces_alphas_cumprod(spacing, steps):
    s = DDPMCustomScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
    s.set_timesteps(steps)
    kept = s.timesteps.flip(0)
    # improved-diffusion's space_timesteps: new betas from consecutive kept alphas_cumprod
    last, expected = 1.0, []
    for abar in s.alphas_cumprod[kept].tolist():
        expected.append(1 - abar / last)
        last = abar
    betas = s.respaced_betas()
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(torch.cumprod(1 - betas, 0).numpy(), s.alphas_cumprod[kept].numpy(), rtol=1e-8)
    # and the step uses the chain's previous timestep, not t - T // n (step counts that do not divide T)
    for t, prev in zip(s.timesteps[:-1].tolist(), s.timesteps[1:].tolist()):
        assert s.previous_timestep(t) == prev
    assert s.previous_timestep(s.timesteps[-1]) == -1


def test_fp16_add_noise_keeps_noise_at_t0():
    s = DDPMCustomScheduler()
    x0 = torch.zeros(2, 1, 4, 4, dtype=torch.float16)
    noise = torch.ones(2, 1, 4, 4, dtype=torch.float16)
    x_t = s.add_noise(x0, noise, torch.tensor([0, 1]))
    assert x_t.dtype == torch.float16
    expected = (1 - s.alphas_cumprod[[0, 1]]).sqrt().float()
    torch.testing.assert_close(x_t[:, 0, 0, 0].float(), expected, rtol=1e-3, atol=0)
    assert (x_t > 0).all()


def test_config_round_trip_and_interop(tmp_path):
    s = DDPMCustomScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    s.save_pretrained(tmp_path)
    loaded = DDPMCustomScheduler.from_pretrained(tmp_path)
    assert public_config(loaded.config) == public_config(s.config)
    torch.testing.assert_close(loaded.alphas_cumprod, s.alphas_cumprod)
    # diffusers schedulers read our config and back
    ddim = DDIMScheduler.from_config(s.config)
    assert ddim.config.prediction_type == "v_prediction"
    back = DDPMCustomScheduler.from_config(DDPMScheduler(beta_schedule="sigmoid").config)
    assert back.config.beta_schedule == "sigmoid"
    assert DPMSolverMultistepScheduler in s.compatibles and len(s) == 1000 and s.order == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(variance_type="learned"), "variance_type"),
        (dict(prediction_type="noise"), "prediction_type"),
        (dict(timestep_spacing="even"), "timestep_spacing"),
        (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMCustomScheduler(**kwargs)


def test_bad_calls_raise():
    s = DDPMCustomScheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="1 to 100"):
        s.set_timesteps(101)
    with pytest.raises(ValueError, match="1 to 100"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[10, 20])
    with pytest.raises(ValueError, match="out of range"):
        s.step(torch.zeros(1, 1, 2, 2), 100, torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match=r"lie in \[0, 99\]"):
        s.add_noise(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.tensor([-1]))
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in this scheduler's chain"):
        s.step(torch.zeros(1, 1, 2, 2), 55, torch.zeros(1, 1, 2, 2))
    learned = DDPMCustomScheduler(variance_type="learned_range")
    with pytest.raises(ValueError, match="2x the sample's channels"):
        learned.step(torch.zeros(1, 1, 2, 2), 5, torch.zeros(1, 1, 2, 2))


def test_thresholding_bounds_x0():
    s = DDPMCustomScheduler(thresholding=True, sample_max_value=3.0, prediction_type="sample")
    out = s.step(torch.randn(2, 1, 8, 8) * 10, 500, torch.zeros(2, 1, 8, 8))
    assert out.pred_original_sample.abs().max() <= 1.0 + 1e-6
