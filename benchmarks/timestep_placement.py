"""Does placing a sampler's steps densely near t = 0 help a model? (Where does the background haze form?)

    python benchmarks/timestep_placement.py --model models/ddpm-fashion-mnist --num-samples 500 --steps 50 \
        --placements uniform power2 ddim-quadratic --out benchmarks/results/timestep-placement-cpu-500.json

If the faint background haze of the samples (see background_haze.py) came from the sampler's last,
coarse steps (DDIM-50 jumps from t = 20 straight to t = 0), spending more of the same step budget near
t = 0 would thin it. Placements of `--steps` timesteps out of the scheduler's T:
- uniform: the scheduler's own `timestep_spacing` (what the pipeline does by default);
- powerP (e.g. power2): t_i = round((i / (n - 1))^P * (T - 1)), from T - 1 down to 0, denser near 0 as P grows;
- ddim-quadratic: the DDIM paper's quadratic selection (Song et al. 2021, CIFAR-10 code):
  (linspace(0, sqrt(0.8 T), n)^2), which also starts the chain at 0.8 T.
For each, N samples drawn as training.evaluate draws them (same seeds, class labels cycling 0..9), scored
with the offline extractor against Fashion-MNIST's test split, with background_haze.py's pixel bands.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.background_haze import pixel_shares  # noqa: E402
from pipeline_ddpm_custom import DDPMCustomPipeline  # noqa: E402
from training.evaluate import (  # noqa: E402
    SAMPLING_SETTINGS, default_batch_size, load_extractor, reference_metrics, sample, score_images)


def placed_timesteps(placement: str, steps: int, num_train_timesteps: int):
    """The descending chain of `placement` (None: the scheduler's own spacing); repeats from rounding dropped."""
    T = num_train_timesteps
    if placement == "uniform":
        return None
    if placement == "ddim-quadratic":
        chain = (np.linspace(0, np.sqrt(0.8 * T), steps) ** 2).astype(int)
    elif placement.startswith("power"):
        chain = np.round(np.linspace(0, 1, steps) ** float(placement[len("power"):]) * (T - 1)).astype(int)
    else:
        raise ValueError(f"Unknown placement {placement!r}: pass uniform, powerP (e.g. power2) or ddim-quadratic.")
    return np.unique(np.clip(chain, 0, T - 1))[::-1].tolist()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--placements", nargs="+", default=["uniform", "power2", "ddim-quadratic"])
    parser.add_argument("--eta", type=float, default=0.0, help="0 = DDIM, 1 = DDPM ancestral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results (rewritten after every placement)")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (FID needs a covariance).")
    for placement in args.placements:  # fail now, not after the first placement's sampling
        try:
            placed_timesteps(placement, args.steps, 1000)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    extractor = load_extractor("offline", device)
    fid, kid = reference_metrics(extractor, args.num_samples, args.seed, device)
    pipe = DDPMCustomPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    T = pipe.scheduler.config.num_train_timesteps
    results = {"setup": {"model": args.model, "num_samples": args.num_samples, "steps": args.steps, "eta": args.eta,
                         "seed": args.seed, "extractor": "offline", "reference": "fashion-mnist test (10000 images)",
                         "scheduler": {k: pipe.scheduler.config[k] for k in SAMPLING_SETTINGS}},
               "runs": []}
    for placement in args.placements:
        start = time.time()
        chain = placed_timesteps(placement, args.steps, T)
        images = sample(pipe, args.num_samples, args.steps, args.eta, args.seed, default_batch_size(device), 1.0, timesteps=chain)
        run = {"placement": placement, "timesteps": pipe.scheduler.timesteps.tolist(),
               **score_images(fid, kid, images, extractor), "pixels": pixel_shares(images), "seconds": round(time.time() - start, 1)}
        results["runs"].append(run)
        print(f"{placement}: {len(run['timesteps'])} steps {run['timesteps'][:2]}..{run['timesteps'][-3:]}  FID {run['fid']:.2f}  "
              f"KID {run['kid']:.3f}  black {run['pixels']['black (<0.5)']:.3f}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
