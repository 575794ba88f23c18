"""How much of a model's FID is its garments' brightness? A diagnostic, not a sampler.

    python benchmarks/brightness_headroom.py --model models/ddpm-fashion-mnist --num-samples 2000 \
        --gains 1 1.01 1.02 1.03 1.04 1.06 --out benchmarks/results/brightness-headroom-cpu-2k-ft15.json
    (--guidance-scale and --guidance-interval as in training.evaluate: the same guided images)

The shipped weights' DDIM samples draw every class's garments a few gray levels darker than the data
(docs/bundled-model.md, *Which classes carry the gap*). Before training a remedy for that, this asks
what a remedy could buy at most: it draws N samples once (as training.evaluate draws them: same seeds,
class labels cycling 0..9) and scores them with the offline extractor against Fashion-MNIST's test split
after multiplying every pixel by a gain (black stays black; clamped to white), for each --gains, and
once more with each class's own gain, the one that gives its samples the mean garment gray level of
the class-balanced train subset's images of that class (`per-class matched`: the training data decide,
not the test split). The same gains applied to that real train subset (evaluate's class-balanced floor)
show what the operation costs images whose brightness is already right: a gain that lowers the samples'
FID while raising the real images' is correcting the samples, not flattering the metric. Each run also
records the share of pixels in gray-level bands (`tones`, samples and real images at that gain): where in
the tonal range the gain moves the samples towards the data.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fid_by_class import GARMENT_LEVEL, pixel_statistics  # noqa: E402
from benchmarks.sampler_study import Study, add_sampling_arguments, check_sampling_arguments  # noqa: E402
from pipeline_ddpm_custom.labels import cycling_class_labels  # noqa: E402
from training.evaluate import floor_images  # noqa: E402


def brightened(images: torch.Tensor, gain) -> torch.Tensor:
    """images (N, 1, H, W) in [0, 1] times `gain` (a number, or one per image broadcastable against them),
    clamped to [0, 1]: black stays black, every garment pixel brightens in proportion to its gray level."""
    return (images * gain).clamp(0, 1)


TONE_BANDS = {"black": (0, 0.5), "1-15": (0.5, 15.5), "16-63": (15.5, 63.5), "64-127": (63.5, 127.5),
              "128-191": (127.5, 191.5), "192-239": (191.5, 239.5), "240-254": (239.5, 254.5), "255": (254.5, 256)}


def tone_shares(images: torch.Tensor) -> dict:
    """Share of all pixels in each gray-level band of TONE_BANDS (images in [0, 1], as 8-bit gray levels would round):
    where in the tonal range a gain moves the samples towards the data, e.g. the near-white highlights."""
    levels = images.float() * 255
    return {name: float(((levels >= lo) & (levels < hi)).float().mean()) for name, (lo, hi) in TONE_BANDS.items()}


def garment_gray_by_class(images: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Mean gray level (0-255) of each class's garment pixels (those over GARMENT_LEVEL)."""
    return torch.tensor([pixel_statistics(images[labels == c])["garment_gray"] for c in range(classes)])


def matched_gains(samples, sample_labels, real, real_labels, classes: int) -> torch.Tensor:
    """One gain per class: the real images' mean garment gray over the samples' (the per-class matched row)."""
    return garment_gray_by_class(real, real_labels, classes) / garment_gray_by_class(samples, sample_labels, classes)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser, guidance=True)
    parser.add_argument("--gains", type=float, nargs="+", default=[1.0, 1.02, 1.04, 1.06],
                        help="pixel gains to score (1 = the samples as drawn)")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if min(args.gains) <= 0:
        parser.error("--gains must be positive (1 leaves the images as they are).")
    if args.num_samples % 10:
        parser.error(f"--num-samples must be a multiple of the 10 classes (the class-balanced train subset), "
                     f"got {args.num_samples}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    study = Study.open(args)
    classes = study.pipe.unet.config.num_class_embeds
    if not classes:
        raise ValueError(f"{args.model} is unconditional: the per-class matched gains need a class-conditional model.")
    start = time.time()
    samples = study.draw()
    sample_labels = torch.tensor(cycling_class_labels(range(len(samples)), classes))
    real, real_labels = floor_images("test", args.num_samples, args.seed, study.device, balanced=True,
                                     label_column="label")
    real_labels = torch.from_numpy(real_labels)
    results = {"setup": study.setup(real="class-balanced train subset, seed + 1 (evaluate's --balanced-floor)",
                                    garment_level=GARMENT_LEVEL),
               "sampling_seconds": round(time.time() - start, 1),
               "garment_gray_by_class": {"samples": garment_gray_by_class(samples, sample_labels, classes).tolist(),
                                         "real": garment_gray_by_class(real, real_labels, classes).tolist()},
               "runs": []}
    for gain in args.gains:
        bright_samples, bright_real = brightened(samples, gain), brightened(real, gain)
        run = {"gain": gain, "samples": study.score(bright_samples), "real": study.score(bright_real),
               "tones": {"samples": tone_shares(bright_samples), "real": tone_shares(bright_real)}}
        study.keep(results, run, f"gain {gain}: samples FID {run['samples']['fid']:.2f}  "
                                 f"real FID {run['real']['fid']:.2f}")
    class_gains = matched_gains(samples, sample_labels, real, real_labels, classes)
    per_sample = class_gains[sample_labels].view(-1, 1, 1, 1).to(samples.device)
    run = {"gain": "per-class matched", "class_gains": class_gains.tolist(),
           "samples": study.score(brightened(samples, per_sample))}
    study.keep(results, run, f"per-class matched gains {[round(g, 3) for g in run['class_gains']]}: "
                             f"samples FID {run['samples']['fid']:.2f}")
    return results


if __name__ == "__main__":
    main()
