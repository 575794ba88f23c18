"""How well a pipeline's UNet predicts x0 at each noise level, on real test images: the number that
decides whether deterministic DDIM sampling can work (DDIM follows the x0 prediction from t = T down,
with no fresh noise to wash errors out).

    python benchmarks/x0_error_by_timestep.py models/ddpm-fashion-mnist [--num-images 256]

For an epsilon-predicting model, x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): near t = T the
noise-prediction error is multiplied by sqrt((1 - abar_t) / abar_t) (158 at t = 999 of the linear
schedule). A v-predicting model predicts x0 there almost directly.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_ddpm_custom import DDPMCustomPipeline  # noqa: E402
from pipeline_ddpm_custom.losses import x0_and_eps  # noqa: E402
from training import data  # noqa: E402
from training.atomic_files import write_json_atomically  # noqa: E402

TIMESTEPS = (0, 10, 50, 100, 250, 500, 750, 900, 950, 999)


@torch.no_grad()
def x0_errors(pipe, x0: torch.Tensor, labels, seed: int = 0) -> list:
    scheduler, rows = pipe.scheduler, []
    background = x0 == -1
    generator = torch.Generator().manual_seed(seed)
    for t in TIMESTEPS:
        noise = torch.randn(x0.shape, generator=generator)
        timesteps = torch.full((x0.shape[0],), t)
        x_t = scheduler.add_noise(x0, noise, timesteps)
        output = pipe.unet(x_t, timesteps, class_labels=labels).sample[:, : x0.shape[1]]
        # abar as a float64 scalar: 1 - abar at t = 0 needs the digits; the result stays in x_t's float32
        x0_hat, _ = x0_and_eps(scheduler.config.prediction_type, output, x_t, scheduler.alphas_cumprod[t])
        row = {"t": t, "x0_mse": float(((x0_hat - x0) ** 2).mean()),
               # over all pixels: the brightness bias of one step from the true x_t (a sampler's chain compounds it)
               "x0_mean_error": float((x0_hat - x0).mean()),
               "x0_mse_clipped": float(((x0_hat.clamp(-1, 1) - x0) ** 2).mean())}
        if background.any():  # the exactly black pixels, where a sampled image's haze shows
            error = x0_hat[background] - x0[background]
            row.update(x0_mse_background=float((error**2).mean()), x0_mean_error_background=float(error.mean()))
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    pipe = DDPMCustomPipeline.from_pretrained(args.model)
    test = data.load_training_dataset(None, None, "test")
    x0 = torch.from_numpy(np.stack([np.asarray(test[i]["image"].convert("L")) for i in range(args.num_images)]))
    x0 = x0.float().div(127.5).sub(1).unsqueeze(1)
    labels = torch.tensor(test[: args.num_images]["label"]) if pipe.unet.config.num_class_embeds else None
    rows = x0_errors(pipe, x0, labels)
    print(f"{args.model} ({pipe.scheduler.config.prediction_type}), {args.num_images} test images")
    gray = 127.5  # x0 is in [-1, 1]: one gray level of 255 is 1 / 127.5
    for row in rows:
        print(f"t={row['t']:>4}  x0 MSE {row['x0_mse']:10.4f}   clipped to [-1, 1] {row['x0_mse_clipped']:.4f}   "
              f"RMS {row['x0_mse'] ** 0.5 * gray:6.2f} gray levels (mean {row['x0_mean_error'] * gray:+.2f}), "
              f"on the black background "
              f"{row.get('x0_mse_background', float('nan')) ** 0.5 * gray:6.2f} "
              f"(mean {row.get('x0_mean_error_background', float('nan')) * gray:+.2f})")
    if args.out:
        write_json_atomically(args.out, {"model": args.model, "prediction_type": pipe.scheduler.config.prediction_type, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
