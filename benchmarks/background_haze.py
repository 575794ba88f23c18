"""Where a model's offline-FID gap comes from: faint pixels that real Fashion-MNIST images do not have.

    python benchmarks/background_haze.py --model models/ddpm-fashion-mnist --num-samples 2000 \
        --out benchmarks/results/haze-cpu-2k.json

What it measures (FIDs with the offline extractor against Fashion-MNIST's test split, 10,000 images):
1. the yardstick: FID of N real train images with Gaussian pixel noise of a few gray levels added,
   clamped to [0, 255] as generated images are;
2. the pixels: the share of exactly black pixels (below half a gray level) and of faint ones
   (1-3 and 4-15 gray levels), for real images and for N samples drawn as training.evaluate draws
   them (same seeds, class labels cycling 0..9; --scheduler and --eta pick the sampler);
3. a diagnostic, not a score: FID of the same samples and real images after every pixel fainter than
   --haze-threshold gray levels is set to black. How far the samples' FID falls says how much of it
   the faint pixels carry; the real images' change says what the operation itself costs;
4. the same shares over the far background only: pixels more than --far-distance pixels (in every direction)
   from any pixel brighter than --garment-level gray levels. Real images are black there; a haze that
   shows there too is a background floor, not a halo of blurred garment edges;
5. whose haze it is: samples and real images re-noised with fresh noise to each of --renoise-timesteps and
   denoised by one x0 prediction of the model (its null class), then the far background's shares and mean
   gray level as in 4. Noise that the sampling chain carried to the end is replaced by fresh noise here, so
   a haze that survives is one the model predicts for those images, while the real images show what it
   predicts for a black background;
6. when the haze enters: the model's x0 prediction along the sampling chain (every --trajectory-every steps and
   the last; the model's own scheduler only, diffusers' solvers report none), rounded as saved, over the far
   background of the finished sample: the shares and mean gray level as in 4. A haze that its x0 predictions
   carry from mid-chain to the end is one the model never learned to remove;
7. the samples as the 8-bit images a user saves (`output_type="pil"`, rounded as diffusers rounds them):
   training.evaluate scores the pipeline's float output, and this says whether that number stands for
   the PNGs too (real images are 8-bit already).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.sampler_study import Study, add_sampling_arguments, check_sampling_arguments  # noqa: E402
from training.atomic_files import write_json_atomically  # noqa: E402
from training.evaluate import floor_images  # noqa: E402


def pixel_shares(images: torch.Tensor, mask: torch.Tensor = None) -> dict:
    """Shares of all pixels (or of those in `mask`) by brightness band, images (N, 1, H, W) in [0, 1]."""
    levels = images.float() * 255
    levels = levels if mask is None else levels[mask]
    bands = {"black (<0.5)": (0, 0.5), "1-3": (0.5, 3.5), "4-15": (3.5, 15.5), "16-255": (15.5, 256)}
    return {name: float(((levels >= lo) & (levels < hi)).float().mean()) for name, (lo, hi) in bands.items()}


def far_from_garment(images: torch.Tensor, distance: int, garment_level: float) -> torch.Tensor:
    """Mask of the pixels more than `distance` pixels (Chebyshev) from every pixel brighter than
    `garment_level` gray levels, images (N, 1, H, W) in [0, 1]."""
    garment = (images.float() * 255 > garment_level).float()
    near = torch.nn.functional.max_pool2d(garment, 2 * distance + 1, stride=1, padding=distance) > 0
    return ~near


def masked_summary(images: torch.Tensor, mask: torch.Tensor) -> dict:
    """Pixel shares by brightness band and mean gray level of `images` where `mask` holds (nothing for an empty mask)."""
    if not mask.any():
        return {}
    return {**pixel_shares(images, mask), "mean_gray_level": float(images[mask].float().mean() * 255)}


def far_background_shares(images: torch.Tensor, far: torch.Tensor) -> dict:
    """How much of the images is far background (`far`, far_from_garment's mask of them), its pixel shares by
    brightness band and its mean gray level (the last two only where it has any)."""
    return {"share_of_pixels": float(far.float().mean()), **masked_summary(images, far)}


def check_renoise_timesteps(scheduler, timesteps) -> None:
    last = len(scheduler.alphas_cumprod) - 1
    for timestep in timesteps:
        if not 0 <= timestep <= last:
            raise ValueError(f"--renoise-timesteps: {timestep} is not a timestep of this model (0..{last}).")


@torch.no_grad()
def renoised_far_background(unet, scheduler, images: torch.Tensor, timestep: int, seed: int, distance: int,
                            garment_level: float, batch_size: int = 250) -> dict:
    """`images` (N, 1, H, W) in [0, 1] noised to `timestep` with fresh noise and denoised by one x0 prediction
    (null class label for a class-conditional UNet), rounded as saved: the far background's shares and mean.
    `scheduler` is the model's own (its noise schedule and prediction type), whatever sampled the images."""
    check_renoise_timesteps(scheduler, [timestep])
    null_class = unet.config.num_class_embeds
    generator = torch.Generator(device=images.device).manual_seed(seed + timestep)
    abar = float(scheduler.alphas_cumprod[timestep])
    denoised = []
    for batch in images.split(batch_size):
        x0 = batch * 2 - 1
        t = torch.full((len(batch),), timestep, device=images.device)
        x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator, device=images.device), t)
        labels = None if null_class is None else torch.full_like(t, null_class)
        output = unet(x_t.to(unet.dtype), t, class_labels=labels).sample[:, : x0.shape[1]].float()
        x0_hat, _ = scheduler._predict_x0_and_eps(output, x_t, abar)
        denoised.append(x0_as_saved(x0_hat))
    far = far_from_garment(images, distance, garment_level)  # where the input is far background
    return {"t": timestep, **masked_summary(torch.cat(denoised), far)}


class X0Trajectory:
    """A `callback_on_step_end` that keeps the x0 prediction (clamped, as 8-bit levels) at every `every`-th step
    and at the last, across the batches of one sampling run; `far_background` summarises each kept step."""

    def __init__(self, every: int):
        self.every, self.timesteps, self.kept = every, {}, {}

    def __call__(self, pipe, i, t, tensors):
        if i % self.every == 0 or i == pipe._num_timesteps - 1:
            x0 = tensors["pred_original_sample"]
            self.timesteps[i] = int(t)
            levels = (x0_as_saved(x0.float()) * 255).round()  # uint8 keeps a long chain's copies small
            self.kept.setdefault(i, []).append(levels.to(torch.uint8).cpu())
        return {}

    def far_background(self, mask: torch.Tensor) -> list:
        """One row per kept step (in chain order): its timestep and the x0 prediction's summary where `mask` holds."""
        return [{"step": i, "t": self.timesteps[i], **masked_summary(torch.cat(self.kept[i]).float() / 255, mask.cpu())}
                for i in sorted(self.kept)]


def dehaze(images: torch.Tensor, threshold: float) -> torch.Tensor:
    """Every pixel fainter than `threshold` gray levels set to black (a diagnostic, never applied to outputs)."""
    return images.masked_fill(images * 255 < threshold, 0.0)


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """images (N, C, H, W) in [0, 1] rounded to the 8-bit levels that diffusers' PIL output holds."""
    return (images * 255).round() / 255


def x0_as_saved(x0: torch.Tensor) -> torch.Tensor:
    """A model's x0 prediction (in [-1, 1] up to its errors) as the [0, 1] image the pipeline would save."""
    return as_saved((x0.clamp(-1, 1) + 1) / 2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser, num_samples=2000, solvers=True)
    parser.add_argument("--noise-levels", type=float, nargs="+", default=[0, 1, 2, 4, 8],
                        help="standard deviations, in gray levels, of the noise added to real images")
    parser.add_argument("--haze-threshold", type=float, default=16.0, help="gray levels; see 3. above")
    parser.add_argument("--far-distance", type=int, default=4, help="pixels; see 4. above")
    parser.add_argument("--garment-level", type=float, default=30.0, help="gray levels; see 4. above")
    parser.add_argument("--renoise-timesteps", type=int, nargs="*", default=[20, 100],
                        help="training timesteps; see 5. above (none to skip)")
    parser.add_argument("--trajectory-every", type=int, default=None,
                        help="steps; see 6. above (default 5 with the model's own scheduler, off with a solver; 0: off)")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if args.trajectory_every is None:
        args.trajectory_every = 5 if args.scheduler == "model" else 0
    elif args.trajectory_every < 0:
        parser.error(f"--trajectory-every must be >= 0 steps (0 turns it off), got {args.trajectory_every}.")
    elif args.trajectory_every > 0 and args.scheduler != "model":
        parser.error("--trajectory-every needs the model's own scheduler: diffusers' solvers report no x0 prediction. "
                     "Leave it out or pass 0 with --scheduler.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    study = Study.open(args)
    check_renoise_timesteps(study.model_scheduler, args.renoise_timesteps)  # before the long sampling, not after
    device = study.device

    # the same train subset as training.evaluate's real-vs-real floor
    real = floor_images("test", args.num_samples, args.seed, device)
    noise_generator = torch.Generator(device=device).manual_seed(args.seed)
    calibration = []
    for level in args.noise_levels:
        noisy = (real + level / 255 * torch.randn(real.shape, generator=noise_generator, device=device)).clamp(0, 1)
        calibration.append({"noise_gray_levels": level, **study.score(noisy), "pixels": pixel_shares(noisy)})
        print(f"real + noise of {level:g} gray levels: FID {calibration[-1]['fid']:.2f}", flush=True)

    trajectory = X0Trajectory(args.trajectory_every) if args.trajectory_every else None
    samples = study.draw() if trajectory is None else study.draw(
        callback_on_step_end=trajectory, callback_on_step_end_tensor_inputs=["pred_original_sample"])
    samples_far = far_from_garment(samples, args.far_distance, args.garment_level)
    results = {
        "setup": study.setup(haze_threshold=args.haze_threshold, far_distance=args.far_distance,
                             garment_level=args.garment_level, trajectory_every=args.trajectory_every,
                             device=str(device)),
        "noise_calibration": calibration,
        "pixels": {"real": pixel_shares(real), "samples": pixel_shares(samples)},
        "pixels_far_background": {
            "real": far_background_shares(real, far_from_garment(real, args.far_distance, args.garment_level)),
            "samples": far_background_shares(samples, samples_far)},
        "samples": study.score(samples),
        "renoised_far_background": {
            name: [renoised_far_background(study.pipe.unet, study.model_scheduler, images, t, args.seed,
                                           args.far_distance, args.garment_level) for t in args.renoise_timesteps]
            for name, images in (("real", real), ("samples", samples))},
        "x0_trajectory_far_background": [] if trajectory is None else trajectory.far_background(samples_far),
        "samples_8bit": study.score(as_saved(samples)),
        "dehazed_diagnostic": {"samples": study.score(dehaze(samples, args.haze_threshold)),
                               "real": study.score(dehaze(real, args.haze_threshold))},
    }
    for name, shares in results["pixels"].items():
        print(f"{name:>8} pixels: " + ", ".join(f"{band} {share:.3f}" for band, share in shares.items()))
    for name, shares in results["pixels_far_background"].items():
        print(f"{name:>8} far background (more than {args.far_distance} px from a pixel over {args.garment_level:g} gray "
              "levels): " + ", ".join(f"{band} {share:.3f}" for band, share in shares.items()))
    for real_row, sample_row in zip(*results["renoised_far_background"].values()):
        real_mean, sample_mean = real_row.get("mean_gray_level", 0), sample_row.get("mean_gray_level", 0)
        print(f"re-noised to t={real_row['t']} and denoised once, far background: real {real_mean:.2f} gray levels "
              f"({real_row.get('black (<0.5)', 0):.3f} black), samples {sample_mean:.2f} "
              f"({sample_row.get('black (<0.5)', 0):.3f} black)")
    if results["x0_trajectory_far_background"]:
        print("x0 prediction along the chain, far background of the finished samples (mean gray level): " + ", ".join(
            f"t={row['t']} {row.get('mean_gray_level', 0):.2f}" for row in results["x0_trajectory_far_background"]))
    dehazed = results["dehazed_diagnostic"]
    print(f"samples: FID {results['samples']['fid']:.2f} ({results['samples_8bit']['fid']:.2f} as 8-bit images); "
          f"a diagnostic, with every pixel under {args.haze_threshold:g} gray levels set to black: "
          f"samples {dehazed['samples']['fid']:.2f}, real {dehazed['real']['fid']:.2f}", flush=True)
    if args.out:
        write_json_atomically(args.out, results)
    return results


if __name__ == "__main__":
    main()
