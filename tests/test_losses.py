import pytest
import torch

from pipeline_ddpm_custom import DDPMCustomScheduler
from pipeline_ddpm_custom.losses import min_snr_weights, training_losses, training_target

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
