"""Does epsilon scaling (Ning et al., ICLR 2024, "Elucidating the exposure bias in diffusion models") help a model?

    python benchmarks/epsilon_scaling.py --model models/ddpm-fashion-mnist --num-samples 500 \
        --scales 1 1.005 1.01 0.995 --out benchmarks/results/eps-scaling-cpu-500.json

Epsilon scaling is a training-free sampler correction for exposure bias (a sampler's x_t drifting from
the x_t the model was trained on): at every step the noise implied by the model's output is divided
by a constant lambda (> 1 in the paper) and x0 re-derived from it, before the scheduler's usual step.
For each lambda this samples N images as training.evaluate draws them (same seeds, class labels
cycling 0..9) and reports FID and KID with the offline extractor against Fashion-MNIST's test split,
with the share of black and faint pixels (background_haze.py's bands). lambda = 1 is the plain sampler.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.background_haze import pixel_shares  # noqa: E402
from pipeline_ddpm_custom import DDPMCustomPipeline  # noqa: E402
from pipeline_ddpm_custom.losses import training_target  # noqa: E402
from training.evaluate import (  # noqa: E402
    SAMPLING_SETTINGS, default_batch_size, load_extractor, reference_metrics, sample, score_images)


def scale_epsilon(scheduler, model_output, sample_, timestep, scale: float):
    """The model output whose implied noise is eps / scale, with x0 = (x_t - sqrt(1 - abar) eps') / sqrt(abar),
    converted with the scheduler's own prediction-type algebra (the same as its step and training use)."""
    t = scheduler._check_timestep(timestep)
    _, eps = scheduler._predict_x0_and_eps(model_output, sample_, float(scheduler.alphas_cumprod[t]))
    eps = eps / scale
    return training_target(scheduler, scheduler.predict_start_from_noise(sample_, t, eps), eps, torch.tensor(t))


@contextlib.contextmanager
def epsilon_scaled(pipe, scale: float):
    """Within the block, pipe.unet's outputs are epsilon-scaled by `scale` for pipe.scheduler's noise levels."""
    unet, forward = pipe.unet, pipe.unet.forward

    def scaled_forward(x, t, *args, **kwargs):
        out = forward(x, t, *args, **kwargs)
        out.sample = scale_epsilon(pipe.scheduler, out.sample.float(), x.float(), t, scale).to(out.sample.dtype)
        return out

    patched_already = "forward" in vars(unet)  # e.g. an accelerate hook's wrapper: put it back as it was
    unet.forward = scaled_forward
    try:
        yield pipe
    finally:
        if patched_already:
            unet.forward = forward
        else:
            del unet.forward  # back to the class's forward


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.005, 1.01, 0.995])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=0.0, help="0 = DDIM, 1 = DDPM ancestral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results (rewritten after every scale)")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (FID needs a covariance).")
    if min(args.scales) <= 0:
        parser.error("--scales must be positive (1 = no scaling).")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    extractor = load_extractor("offline", device)
    fid, kid = reference_metrics(extractor, args.num_samples, args.seed, device)
    pipe = DDPMCustomPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    results = {"setup": {"model": args.model, "num_samples": args.num_samples, "steps": args.steps, "eta": args.eta,
                         "seed": args.seed, "extractor": "offline", "reference": "fashion-mnist test (10000 images)",
                         "scheduler": {k: pipe.scheduler.config[k] for k in SAMPLING_SETTINGS}},
               "runs": []}
    for scale in args.scales:
        start = time.time()
        with epsilon_scaled(pipe, scale):
            images = sample(pipe, args.num_samples, args.steps, args.eta, args.seed, default_batch_size(device), 1.0)
        run = {"scale": scale, **score_images(fid, kid, images, extractor), "pixels": pixel_shares(images),
               "seconds": round(time.time() - start, 1)}
        results["runs"].append(run)
        print(f"scale {scale}: FID {run['fid']:.2f}  KID {run['kid']:.3f}  black {run['pixels']['black (<0.5)']:.3f}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
