"""Does the time-shift sampler (Li et al., ICLR 2024, "Alleviating exposure bias in diffusion models through
sampling with shifted time steps") help a model?

    python benchmarks/time_shift.py --model models/ddpm-fashion-mnist --num-samples 2000 \
        --windows 20 0 --out benchmarks/results/time-shift-cpu-2k-ft15-data.json

A sampler's x_t drift from the noised data the model was trained on (x0_mean_along_chain.py: below t = 600 the
shipped weights' x_t hold less variance than the noised data's). The time-shift sampler asks the model about each
x_t at the timestep t_s, within a window of the chain's t, whose noised data have x_t's variance, and steps from
t_s to the chain's next timestep as if x_t were there: the scheduler's own step (DDIM or ancestral, clipping
included) with abar(t_s) in place of abar(t). The variance read is the batch's mean per-image pixel variance (one
t_s per batch and step), matched against
- `data` (default): a noised training image's, abar v0 + 1 - abar, v0 the training images' mean per-image pixel
  variance in the model's [-1, 1];
- `noise`: 1 - abar, what the authors' code compares; it reads any x_t with visible content as noisier, and their
  cutoff (`--above`) keeps it to high t, where the noise dominates.
Per image the data's own variance spreads too widely (standard deviation 0.19 around 0.43 for Fashion-MNIST) to
read a drift of a few hundredths, hence one shift per batch. Window w allows t_s in t - w // 2 .. t + w // 2, kept
above the chain's next timestep; window 0 is the plain sampler.
For each window this samples N images as training.evaluate draws them (same seeds, class labels cycling 0..9) and
reports FID and KID with the offline extractor against Fashion-MNIST's test split, background_haze.py's pixel
shares, and the shifts t_s - t taken at each of the chain's timesteps (their mean, least and greatest over the batches).
"""

import argparse
import contextlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.background_haze import pixel_shares  # noqa: E402
from benchmarks.sampler_study import Study, add_sampling_arguments, check_sampling_arguments, unet_call_changed  # noqa: E402
from pipeline_ddpm_custom import DDPMCustomScheduler  # noqa: E402
from pipeline_ddpm_custom.pictures import enlarge, grid, to_pil  # noqa: E402
from training.evaluate import real_images  # noqa: E402

YARDSTICKS = ("data", "noise")


def mean_image_variance(images: torch.Tensor) -> float:
    """The mean over a batch of each image's pixel variance: the statistic read from x_t and the yardstick alike."""
    return float(images.double().flatten(1).var(dim=1).mean())


def data_variance(count: int = 10000, seed: int = 0) -> float:
    """The training images' mean per-image pixel variance, in the model's [-1, 1] (`count` drawn with `seed`)."""
    return mean_image_variance(real_images("train", count, seed, "cpu") * 2 - 1)


def expected_variance(alphas_cumprod: torch.Tensor, data_var: float) -> torch.Tensor:
    """Per timestep, the mean per-image pixel variance of noised data: abar v0 + (1 - abar) (v0 = 0: the noise alone)."""
    abar = alphas_cumprod.double()
    return abar * data_var + 1 - abar


def shifted_timestep(expected: torch.Tensor, variance: float, t: int, t_next: int, half_window: int) -> int:
    """The timestep in t - half_window .. t + half_window, above t_next (the chain's next timestep, -1 after the last)
    and inside the table, whose expected variance is nearest `variance`."""
    low, high = max(t - half_window, t_next + 1, 0), min(t + half_window, len(expected) - 1)
    candidates = torch.arange(low, high + 1)
    return int(candidates[(expected[candidates] - variance).abs().argmin()])


@contextlib.contextmanager
def time_shifted(pipe, window: int, expected: torch.Tensor, above: int = -1, shifts: dict = None):
    """Within the block, pipe's model scheduler samples with time shifts in windows of `window` at timesteps t > `above`;
    `shifts`, if given, collects t -> [t_s - t of every model call at t]."""
    scheduler, half = pipe.scheduler, window // 2
    if not isinstance(scheduler, DDPMCustomScheduler):
        raise ValueError(f"The time-shift study replaces abar_t in DDPMCustomScheduler's step; this pipeline samples with "
                         f"{type(scheduler).__name__}: load a model saved with DDPMCustomScheduler, or set pipe.scheduler "
                         "= DDPMCustomScheduler.from_config(pipe.scheduler.config).")
    chosen = {}  # the last model call's (t, t_s), for the step that follows it

    def call(forward, x, t, *args, **kwargs):
        t = scheduler._check_timestep(t)
        t_s = t
        if t > above:
            t_s = shifted_timestep(expected, mean_image_variance(x), t, scheduler.previous_timestep(t), half)
        chosen["step"] = (t, t_s)
        if shifts is not None:
            shifts.setdefault(t, []).append(t_s - t)
        return forward(x, t_s, *args, **kwargs)

    own = scheduler._chain_coefficients  # abar_t, abar_prev, beta_t of a step: what step() and q_posterior() read

    def shifted_coefficients(t):
        abar_t, abar_prev, _ = own(t)
        step_t, t_s = chosen.get("step", (None, None))
        if step_t == t:
            abar_t = float(scheduler.alphas_cumprod[t_s])
        return abar_t, abar_prev, 1.0 - abar_t / abar_prev

    scheduler._chain_coefficients = shifted_coefficients
    try:
        with unet_call_changed(pipe, call):
            yield pipe
    finally:
        del scheduler._chain_coefficients  # back to the class's method


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--windows", type=int, nargs="+", default=[0, 20],
                        help="window sizes w (t_s within t +- w // 2); 0 = the plain sampler")
    parser.add_argument("--yardstick", default="data", choices=YARDSTICKS,
                        help="data: the noised training images' variance; noise: 1 - abar, as the authors' code")
    parser.add_argument("--above", type=int, default=-1, metavar="T",
                        help="shift only at timesteps t > T (the authors' cutoff; default: every step)")
    parser.add_argument("--grid", default=None, metavar="PNG",
                        help="picture of each window's first 10 samples (one per class), a row per window in --windows order")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if min(args.windows) < 0:
        parser.error("--windows must be >= 0 (0 = no shift).")
    return args


def main(argv=None):
    args = parse_args(argv)
    study = Study.open(args)
    data_var = data_variance(seed=args.seed) if args.yardstick == "data" else 0.0
    expected = expected_variance(study.pipe.scheduler.alphas_cumprod, data_var)
    results = {"setup": study.setup(yardstick=args.yardstick, data_variance=data_var, above=args.above), "runs": []}
    firsts = []
    for window in args.windows:
        start, shifts = time.time(), {}
        with time_shifted(study.pipe, window, expected, args.above, shifts):
            images = study.draw()
        firsts += to_pil(images[:10] * 2 - 1)
        shift_by_t = {t: {"mean": round(sum(s) / len(s), 2), "min": min(s), "max": max(s)}
                      for t, s in sorted(shifts.items(), reverse=True)}
        run = {"window": window, **study.score(images), "pixels": pixel_shares(images), "shift_by_t": shift_by_t,
               "seconds": round(time.time() - start, 1)}
        study.keep(results, run, f"window {window}: FID {run['fid']:.2f}  KID {run['kid']:.3f}  "
                                 f"black {run['pixels']['black (<0.5)']:.3f}")
    if args.grid:
        picture = grid(firsts, cols=min(10, args.num_samples))
        enlarge(picture, min_side=2 * picture.height).save(args.grid)  # twice the samples' size
    return results


if __name__ == "__main__":
    main()
