"""Does epsilon scaling (Ning et al., ICLR 2024, "Elucidating the exposure bias in diffusion models") help a model?

    python benchmarks/epsilon_scaling.py --model models/ddpm-fashion-mnist --num-samples 500 \
        --scales 1 1.005 1.01 0.995 --out benchmarks/results/eps-scaling-cpu-500.json

Epsilon scaling is a training-free sampler correction for exposure bias (a sampler's x_t drifting from
the x_t the model was trained on): at every step the noise implied by the model's output is divided
by a constant lambda (> 1 in the paper) and x0 re-derived from it, before the scheduler's usual step.
For each lambda this samples N images as training.evaluate draws them (same seeds, class labels
cycling 0..9) and reports FID and KID with the offline extractor against Fashion-MNIST's test split,
with the share of black and faint pixels (background_haze.py's bands). lambda = 1 is the plain sampler.
`--below T` scales only the steps at t < T (e.g. 600, where x0_mean_along_chain.py finds the chain drifting).
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.background_haze import pixel_shares  # noqa: E402
from benchmarks.sampler_study import (  # noqa: E402
    Study, add_sampling_arguments, check_sampling_arguments, unet_output_changed)
from pipeline_ddpm_custom.losses import training_target  # noqa: E402


def scale_epsilon(scheduler, model_output, sample_, timestep, scale: float):
    """The model output whose implied noise is eps / scale, with x0 = (x_t - sqrt(1 - abar) eps') / sqrt(abar),
    converted with the scheduler's own prediction-type algebra (the same as its step and training use)."""
    t = scheduler._check_timestep(timestep)
    _, eps = scheduler._predict_x0_and_eps(model_output, sample_, float(scheduler.alphas_cumprod[t]))
    eps = eps / scale
    return training_target(scheduler, scheduler.predict_start_from_noise(sample_, t, eps), eps, torch.tensor(t))


def epsilon_scaled(pipe, scale: float, below: int = None):
    """Within the block, pipe.unet's outputs are epsilon-scaled by `scale` for pipe.scheduler's noise levels;
    with `below`, only at timesteps t < below (the rest of the chain as the model has it)."""
    def change(out, x, t, *args, **kwargs):
        if below is not None and pipe.scheduler._check_timestep(t) >= below:  # t as scale_epsilon reads it
            return out
        return scale_epsilon(pipe.scheduler, out.float(), x.float(), t, scale).to(out.dtype)

    return unet_output_changed(pipe, change)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.005, 1.01, 0.995])
    parser.add_argument("--below", type=int, default=None, metavar="T",
                        help="scale only at timesteps t < T, where a chain drifts (default: every step)")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if min(args.scales) <= 0:
        parser.error("--scales must be positive (1 = no scaling).")
    if args.below is not None and args.below < 1:
        parser.error(f"--below {args.below} scales no step: pass a timestep of the chain (1 to the training steps).")
    return args


def main(argv=None):
    args = parse_args(argv)
    study = Study.open(args)
    results = {"setup": study.setup(), "runs": []}
    for scale in args.scales:
        start = time.time()
        with epsilon_scaled(study.pipe, scale, args.below):
            images = study.draw()
        window = {"below": args.below} if args.below is not None else {}
        run = {"scale": scale, **window, **study.score(images), "pixels": pixel_shares(images),
               "seconds": round(time.time() - start, 1)}
        study.keep(results, run, f"scale {scale}: FID {run['fid']:.2f}  KID {run['kid']:.3f}  "
                                 f"black {run['pixels']['black (<0.5)']:.3f}")
    return results


if __name__ == "__main__":
    main()
