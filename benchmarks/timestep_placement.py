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
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.background_haze import pixel_shares  # noqa: E402
from benchmarks.sampler_study import Study, add_sampling_arguments, check_sampling_arguments  # noqa: E402


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
    add_sampling_arguments(parser)
    parser.add_argument("--placements", nargs="+", default=["uniform", "power2", "ddim-quadratic"])
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    for placement in args.placements:  # fail now, not after the first placement's sampling
        try:
            placed_timesteps(placement, args.steps, 1000)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    study = Study.open(args)
    T = study.pipe.scheduler.config.num_train_timesteps
    results = {"setup": study.setup(), "runs": []}
    for placement in args.placements:
        start = time.time()
        images = study.draw(timesteps=placed_timesteps(placement, args.steps, T))
        run = {"placement": placement, "timesteps": study.pipe.scheduler.timesteps.tolist(), **study.score(images),
               "pixels": pixel_shares(images), "seconds": round(time.time() - start, 1)}
        study.keep(results, run, f"{placement}: {len(run['timesteps'])} steps {run['timesteps'][:2]}..{run['timesteps'][-3:]}  "
                                 f"FID {run['fid']:.2f}  KID {run['kid']:.3f}  black {run['pixels']['black (<0.5)']:.3f}")
    return results


if __name__ == "__main__":
    main()
