import pytest
import torch

from pipeline_ddpm_custom import DDPMCustomScheduler
from pipeline_ddpm_custom.losses import (
    background_haze, garment_dimming, min_snr_weights, offset_as_noise, training_losses, training_target)

from .conftest import tiny_unet


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_loss_is_mse_against_the_scheduler_target(prediction):
    scheduler = DDPMCustomScheduler(num_train_timesteps=100, prediction_type=prediction)
    unet = tiny_unet()
    x0, noise, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8), torch.tensor([0, 40, 99])
    loss = training_losses(unet, scheduler, x0, t, noise=noise)
    with torch.no_grad():
        out = unet(scheduler.add_noise(x0, noise, t), t).sample
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[prediction]
    torch.testing.assert_close(loss, ((out - target) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(training_target(scheduler, x0, noise, t), target)


def test_input_noise_enters_x_t_and_not_the_target():
    """Input perturbation: x_t is formed with `input_noise`, the v target with the plain noise (as in
    diffusers' train_text_to_image.py, whose reference formula this is)."""
    scheduler = DDPMCustomScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    unet = tiny_unet()
    x0, noise, t = torch.rand(3, 1, 8, 8) * 2 - 1, torch.randn(3, 1, 8, 8), torch.tensor([0, 40, 99])
    input_noise = noise + 0.1 * torch.randn_like(noise)
    loss = training_losses(unet, scheduler, x0, t, noise=noise, input_noise=input_noise)
    with torch.no_grad():
        out = unet(scheduler.add_noise(x0, input_noise, t), t).sample
    target = scheduler.get_velocity(x0, noise, t)
    torch.testing.assert_close(loss, ((out - target) ** 2).mean(dim=(1, 2, 3)))
    assert not torch.allclose(loss, training_losses(unet, scheduler, x0, t, noise=noise))


def test_background_haze_lies_only_on_black_pixels_and_within_its_bound():
    torch.manual_seed(0)
    x0 = torch.rand(400, 1, 8, 8) - 0.5  # garment: well above black
    x0[:, :, :4] = -1  # the top half black
    haze = background_haze(x0, 6.0)
    assert torch.equal(haze[:, :, 4:], torch.zeros_like(haze[:, :, 4:]))
    levels = haze * 127.5
    assert levels.min() >= 0 and levels.max() <= 6.0 + 1e-4
    hazy = levels.amax(dim=(1, 2, 3)) > 0
    assert 0.4 < hazy.float().mean() < 0.6  # half the images by default
    assert levels.amax(dim=(1, 2, 3))[hazy].max() > 5  # amplitudes reach towards the bound
    assert not background_haze(x0, 6.0, probability=0.0).any()
    assert (background_haze(x0, 6.0, probability=1.0).amax(dim=(1, 2, 3)) > 0).all()
    torch.manual_seed(1)
    default_device = background_haze(x0, 6.0)
    torch.manual_seed(1)
    torch.testing.assert_close(background_haze(x0, 6.0, draw_on=torch.device("cpu")), default_device)


def test_garment_dimming_takes_one_fraction_of_each_image_and_leaves_black_alone():
    torch.manual_seed(0)
    x0 = torch.rand(400, 1, 8, 8) * 1.5 - 0.5
    x0[:, :, :4] = -1
    offset = garment_dimming(x0, 0.06)
    assert not offset[:, :, :4].any() and offset.max() <= 0
    fraction = (-offset[:, :, 4:] / (x0[:, :, 4:] + 1)).flatten(1)
    torch.testing.assert_close(fraction.amax(1), fraction.amin(1))  # every gray level loses the same share
    dimmed = fraction.amax(1) > 0
    assert 0.4 < dimmed.float().mean() < 0.6 and fraction.max() <= 0.06 + 1e-6 and fraction.max() > 0.05
    assert not garment_dimming(x0, 0.06, probability=0.0).any()
    assert ((x0 + garment_dimming(x0, 0.06, probability=1.0)) >= -1).all()  # never below black
    torch.manual_seed(1)
    default_device = garment_dimming(x0, 0.06)
    torch.manual_seed(1)
    torch.testing.assert_close(garment_dimming(x0, 0.06, draw_on=torch.device("cpu")), default_device)


@pytest.mark.parametrize("t", [0, 1, 20, 300, 999])
def test_offset_as_noise_trains_the_model_to_remove_the_offset(t):
    """With the offset's noise added to the noise of both x_t and the target, x_t is the noised hazy image and
    the target is the one whose x0 (by diffusers' own DDPMScheduler) is the clean image: the haze counts as noise."""
    from diffusers import DDPMScheduler

    ours = DDPMCustomScheduler(prediction_type="v_prediction")
    reference = DDPMScheduler(prediction_type="v_prediction", clip_sample=False)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    offset = torch.rand_like(x0) * 6 / 127.5
    noise, timesteps = torch.randn_like(x0), torch.full((2,), t)
    moved = noise + offset_as_noise(ours, offset, timesteps)
    x_t = ours.add_noise(x0, moved, timesteps)
    torch.testing.assert_close(x_t, reference.add_noise(x0 + offset, noise, timesteps), atol=1e-5, rtol=0)
    target = training_target(ours, x0, moved, timesteps)
    recovered = reference.step(target, t, x_t, generator=torch.Generator().manual_seed(0)).pred_original_sample
    torch.testing.assert_close(recovered, x0, atol=1e-4, rtol=0)


def test_min_snr_weights():
    s = DDPMCustomScheduler()
    t = torch.tensor([0, 500, 999])
    snr = s.alphas_cumprod[t] / (1 - s.alphas_cumprod[t])
    torch.testing.assert_close(min_snr_weights(s, t, 5.0).double(), snr.clamp(max=5) / snr, rtol=1e-6, atol=0)


def test_fp16_inputs_are_noised_in_fp32():
    s = DDPMCustomScheduler(num_train_timesteps=100)
    unet = tiny_unet()
    x0 = (torch.rand(2, 1, 8, 8) * 2 - 1).half()
    noise = torch.randn(2, 1, 8, 8).half()
    t = torch.tensor([0, 1])
    loss16 = training_losses(unet, s, x0, t, noise=noise)
    loss32 = training_losses(unet, s, x0.float(), t, noise=noise.float())
    torch.testing.assert_close(loss16, loss32)


def test_learned_variance_gets_a_gradient():
    s = DDPMCustomScheduler(num_train_timesteps=100, variance_type="learned_range")
    unet = tiny_unet(learned_variance=True).train()
    loss = training_losses(unet, s, torch.rand(2, 1, 8, 8), torch.tensor([10, 60])).mean()
    loss.backward()
    assert torch.isfinite(loss) and unet.conv_out.weight.grad.abs().sum() > 0
