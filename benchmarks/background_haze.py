"""Where a model's offline-FID gap comes from: faint pixels that real Fashion-MNIST images do not have.

    python benchmarks/background_haze.py --model models/ddpm-fashion-mnist --num-samples 2000 \
        --out benchmarks/results/haze-cpu-2k.json

Three measurements, each with the offline extractor against Fashion-MNIST's test split (10,000 images):
1. the yardstick: FID of N real train images with Gaussian pixel noise of a few gray levels added,
   clamped to [0, 255] as generated images are;
2. the pixels: the share of exactly black pixels (below half a gray level) and of faint ones
   (1-3 and 4-15 gray levels), for real images and for N samples drawn as training.evaluate draws
   them (same seeds, class labels cycling 0..9);
3. a diagnostic, not a score: FID of the same samples and real images after every pixel fainter than
   --haze-threshold gray levels is set to black. How far the samples' FID falls says how much of it
   the faint pixels carry; the real images' change says what the operation itself costs.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_ddpm_custom import DDPMCustomPipeline  # noqa: E402
from training.evaluate import (  # noqa: E402
    SAMPLING_SETTINGS, default_batch_size, load_extractor, real_images, reference_metrics, sample, score_images)


def pixel_shares(images: torch.Tensor) -> dict:
    """Shares of all pixels by brightness band, images (N, 1, H, W) in [0, 1]."""
    levels = images.float() * 255
    bands = {"black (<0.5)": (0, 0.5), "1-3": (0.5, 3.5), "4-15": (3.5, 15.5), "16-255": (15.5, 256)}
    return {name: float(((levels >= lo) & (levels < hi)).float().mean()) for name, (lo, hi) in bands.items()}


def dehaze(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every pixel fainter than `threshold` gray levels set to black (a diagnostic, never applied to outputs)."""
    return images.masked_fill(images * 255 < threshold, 0.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--eta", type=float, default=0.0, help="0 = DDIM, 1 = DDPM ancestral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-levels", type=float, nargs="+", default=[0, 1, 2, 4, 8],
                        help="standard deviations, in gray levels, of the noise added to real images")
    parser.add_argument("--haze-threshold", type=float, default=16.0, help="gray levels; see 3. above")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (FID needs a covariance).")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    extractor = load_extractor("offline", device)
    fid, kid = reference_metrics(extractor, args.num_samples, args.seed, device)

    def score(images):
        return score_images(fid, kid, images, extractor)

    # the same train subset as training.evaluate's real-vs-real floor
    real = real_images("train", args.num_samples, args.seed + 1, device)
    noise_generator = torch.Generator(device=device).manual_seed(args.seed)
    calibration = []
    for level in args.noise_levels:
        noisy = (real + level / 255 * torch.randn(real.shape, generator=noise_generator, device=device)).clamp(0, 1)
        calibration.append({"noise_gray_levels": level, **score(noisy), "pixels": pixel_shares(noisy)})
        print(f"real + noise of {level:g} gray levels: FID {calibration[-1]['fid']:.2f}", flush=True)

    pipe = DDPMCustomPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    samples = sample(pipe, args.num_samples, args.steps, args.eta, args.seed, default_batch_size(device), 1.0)
    results = {
        "setup": {"model": args.model, "num_samples": args.num_samples, "steps": args.steps, "eta": args.eta,
                  "seed": args.seed, "extractor": "offline", "reference": "fashion-mnist test (10000 images)",
                  "haze_threshold": args.haze_threshold, "device": str(device),
                  "scheduler": {k: pipe.scheduler.config[k] for k in SAMPLING_SETTINGS}},
        "noise_calibration": calibration,
        "pixels": {"real": pixel_shares(real), "samples": pixel_shares(samples)},
        "samples": score(samples),
        "dehazed_diagnostic": {"samples": score(dehaze(samples, args.haze_threshold)),
                               "real": score(dehaze(real, args.haze_threshold))},
    }
    for name, shares in results["pixels"].items():
        print(f"{name:>8} pixels: " + ", ".join(f"{band} {share:.3f}" for band, share in shares.items()))
    print(f"samples: FID {results['samples']['fid']:.2f}; a diagnostic, with every pixel under {args.haze_threshold:g} gray "
          f"levels set to black: samples {results['dehazed_diagnostic']['samples']['fid']:.2f}, "
          f"real {results['dehazed_diagnostic']['real']['fid']:.2f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
