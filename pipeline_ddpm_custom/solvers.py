"""Diffusers' multistep ODE/SDE solvers for a model of this project, built from its own scheduler config.

The pipeline runs any diffusers scheduler (``pipe.scheduler = ...``); this module names the ones we
measured (README, "Samplers at 50 steps") so the CLI, the evaluation script and the Space build them alike.
From the model's config they inherit the beta schedule and ``prediction_type`` (v-prediction for the
bundled model); the timestep spacing is ``trailing``, so every chain starts at t = T - 1: the
bundled model's ``leading`` spacing would start DPM-Solver's 50 steps at t = 950 and its 10 at t = 900.
"""

from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

# name -> (label, scheduler class, fixed settings)
SOLVERS = {
    "dpmsolver++": ("DPM-Solver++ 2M", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "sde-dpmsolver++": ("SDE-DPM-Solver++ 2M", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    # Karras et al. (2022) noise levels (rho = 7): steps crowd towards the low-noise end ("DPM++ 2M SDE Karras")
    "sde-dpmsolver++-karras": ("SDE-DPM-Solver++ 2M Karras", DPMSolverMultistepScheduler,
                               {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPC", UniPCMultistepScheduler, {}),
}


def solver_from_config(name: str, config, timestep_spacing: str = "trailing"):
    """The solver `name` (a key of SOLVERS) for a model whose scheduler config is `config`."""
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}; choose one of {', '.join(SOLVERS)}.")
    _, scheduler_class, settings = SOLVERS[name]
    return scheduler_class.from_config(config, timestep_spacing=timestep_spacing, **settings)


def check_eta_applies(scheduler: str, eta_given: bool) -> None:
    """Refuse an eta for a solver: only the model's own scheduler takes one (the solvers' noise is fixed by
    their algorithm), and silently ignoring it would report a setting that never took effect."""
    if scheduler != "model" and eta_given:
        raise ValueError(f"--eta applies to the model's own scheduler; {scheduler} takes none (drop --eta).")
