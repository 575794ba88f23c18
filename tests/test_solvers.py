"""The named solvers are diffusers' schedulers with the settings their names promise, built from the model's config."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from pipeline_ddpm_custom import DDPMCustomScheduler
from pipeline_ddpm_custom.solvers import SOLVERS, solver_from_config

from .conftest import tiny_pipeline

# written out independently of SOLVERS: what each name must mean
BY_HAND = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "sde-dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "sde-dpmsolver++-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def test_every_solver_is_described_here():
    assert set(SOLVERS) == set(BY_HAND)


@pytest.mark.parametrize("name", sorted(BY_HAND))
def test_named_solver_samples_like_diffusers_set_by_hand(name):
    model_config = DDPMCustomScheduler(num_train_timesteps=100, prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2").config
    ours = solver_from_config(name, model_config)
    scheduler_class, settings = BY_HAND[name]
    by_hand = scheduler_class.from_config(model_config, timestep_spacing="trailing", **settings)
    assert type(ours) is scheduler_class
    assert ours.config.prediction_type == "v_prediction" and ours.config.beta_schedule == "squaredcos_cap_v2"

    pipe = tiny_pipeline(num_train_timesteps=100)
    images = {}
    for label, scheduler in (("ours", ours), ("by hand", by_hand)):
        pipe.scheduler = scheduler
        images[label] = pipe(batch_size=2, num_inference_steps=8, output_type="pt",
                             generator=torch.Generator().manual_seed(5)).images
    torch.testing.assert_close(images["ours"], images["by hand"], rtol=0, atol=0)


def test_karras_sigmas_change_the_chain():
    """The Karras variant is not the plain SDE solver under another name: its chain reaches lower noise levels and
    spends more of its steps there (the plain one's last step jumps from t = 49 to 0)."""
    config = DDPMCustomScheduler(num_train_timesteps=1000).config
    plain, karras = solver_from_config("sde-dpmsolver++", config), solver_from_config("sde-dpmsolver++-karras", config)
    for scheduler in (plain, karras):
        scheduler.set_timesteps(20)
    assert karras.sigmas[:-1].min() < plain.sigmas[:-1].min()
    assert (karras.sigmas[:-1] < 0.5).sum() > (plain.sigmas[:-1] < 0.5).sum()


def test_unknown_solver_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        solver_from_config("euler", DDPMCustomScheduler().config)
