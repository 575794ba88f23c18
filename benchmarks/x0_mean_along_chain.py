"""Where along the sampling chain a model's samples lose brightness: the class-average gray level of its x0
prediction at every step, against the training images' class average.

    python benchmarks/x0_mean_along_chain.py --model models/ddpm-fashion-mnist --num-samples 2000 \
        --steps 50 --etas 0 1 --out benchmarks/results/x0-mean-chain-cpu-2k-ft15.json \
        --plot benchmarks/results/x0_mean_chain_2k_ft15.png

The yardstick needs no model: for x_t drawn from the data's noised marginal q(x_t | class), the average over x_t of
the exact posterior mean E[x0 | x_t, class] is E[x0 | class] (the tower property). So a model whose x0 prediction is
unbiased, run on a chain whose x_t follows q, gives at every step a class-average x0 prediction equal to the class's
average training image. At the first step x_T is pure noise, which is q's marginal there to within sqrt(abar_T), so
only the model's own bias shows; a gap that grows along the chain is the chain drifting from q (exposure bias), and
the last step's gap is the samples'. Per pixel average, under q: mean(x_t) = sqrt(abar) mean(x0) and
mean(x_t^2) = abar mean(x0^2) + 1 - abar, which the chain's x_t are checked against too.

Only the model's own scheduler (--etas: 0 = DDIM, 1 = DDPM ancestral): diffusers' solvers report no x0 prediction.
Samples are drawn as training.evaluate draws them (image i from seed + i, class label i % classes, guidance 1).
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.fid_by_class import GARMENT_LEVEL  # noqa: E402
from pipeline_ddpm_custom import DDPMCustomPipeline  # noqa: E402
from training.atomic_files import write_json_atomically  # noqa: E402
from training.evaluate import default_batch_size, real_images, sample, sampler_label  # noqa: E402

GRAY = 127.5  # x0 lives in [-1, 1]: one gray level of 255 is 1 / 127.5


def class_means(values: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes,): the mean of the per-image `values` (N,) over each class's images."""
    return torch.stack([values[labels == c].mean() for c in range(classes)])


def class_regions(images: torch.Tensor, labels: np.ndarray, classes: int) -> dict:
    """Fixed pixel masks per class, (classes, H * W) each: "all"; "garment core", the pixels that are garment in at
    least half the class's images; "elsewhere", the rest. Fixed masks keep each region's average linear in x0, so
    the tower property holds for it as for the whole image, and the two tell dim garments from a bright haze."""
    labels = torch.from_numpy(np.asarray(labels))
    missing = [c for c in range(classes) if not (labels == c).any()]
    if missing:
        raise ValueError(f"The reference images have no image of class(es) {missing}; every sampled class needs them.")
    garment = images.flatten(1) * 255 > GARMENT_LEVEL
    core = torch.stack([garment[labels == c].float().mean(0) >= 0.5 for c in range(classes)])
    empty = [c for c in range(classes) if not core[c].any()]
    if empty:
        raise ValueError(f"Class(es) {empty} have no pixel that is garment in half their images: no garment core.")
    return {"all": torch.ones_like(core), "garment core": core, "elsewhere": ~core}


def region_means(x: torch.Tensor, labels: torch.Tensor, regions: dict) -> dict:
    """Per image, the average of x (N, ...) over each region of its class."""
    x = x.double().flatten(1)
    return {name: (x * masks[labels]).sum(1) / masks[labels].sum(1) for name, masks in regions.items()}


def reference_statistics(images: torch.Tensor, labels: np.ndarray, classes: int) -> tuple:
    """What the chain is held to, from real images (N, 1, H, W in [0, 1]) and their labels: the regions of each class,
    each region's class-average image value in [-1, 1] ({region: (classes,)}), and each class's pixel-averaged
    mean square in [-1, 1] ((classes,))."""
    regions = class_regions(images, labels, classes)
    labels = torch.from_numpy(np.asarray(labels))
    x = images.double() * 2 - 1
    means = {name: class_means(values, labels, classes) for name, values in region_means(x, labels, regions).items()}
    return regions, means, class_means((x.flatten(1) ** 2).mean(1), labels, classes)


class ChainMoments:
    """A `callback_on_step_end` that keeps, for every image and step, the averages of the x0 prediction over the
    regions of its class, and the pixel average and mean square of the x_t the step hands on. Batches come in
    sampling order and image k has class label k % classes, as training.evaluate draws them."""

    def __init__(self, regions: dict, classes: int):
        self.regions, self.classes, self.next_image, self.timesteps, self.batch_labels = regions, classes, 0, None, None
        self.x0, self.xt_mean, self.xt_square = {}, {}, {}

    def __call__(self, pipe, i, t, tensors):
        x0, latents = tensors["pred_original_sample"], tensors["latents"].double().flatten(1)
        if i == 0:  # a new batch
            self.timesteps = [int(s) for s in pipe.scheduler.timesteps]
            self.batch_labels = (self.next_image + torch.arange(len(x0))) % self.classes
            self.next_image += len(x0)
        for name, means in region_means(x0.cpu(), self.batch_labels, self.regions).items():
            self.x0.setdefault(i, {}).setdefault(name, []).append(means)
        self.xt_mean.setdefault(i, []).append(latents.mean(1).cpu())
        self.xt_square.setdefault(i, []).append((latents**2).mean(1).cpu())
        return {}

    def rows(self, labels: torch.Tensor, reference: dict, reference_square: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> list:
        """One row per step: per region, the x0 prediction's average gray level and its gap to the reference images'
        (over all images, with its standard error, and class by class) and the gap's change since the first step
        (paired image by image, with its standard error); and the x_t that the step hands on (to the
        next step's timestep) against q: its mean read as gray levels of x0, and its mean square over q's."""
        rows, first = [], {name: torch.cat(parts) for name, parts in self.x0[0].items()}
        for i in sorted(self.x0):
            row = {"step": i, "t": self.timesteps[i], "regions": {}}
            for name, parts in self.x0[i].items():
                values = torch.cat(parts)
                row["regions"][name] = gap_summary(values, reference[name][labels], labels, self.classes)
                # image by image against its own first prediction (a blurred class average, nearly the same for
                # every image): in the early steps far less noisy than the gap, which carries the spread between
                # images, so it says whether the gap has moved yet; late in the chain the two noises are alike
                change = (values - first[name]) * GRAY
                row["regions"][name].update(change_since_first_step=float(change.mean()),
                                            change_standard_error=float(change.std() / len(change) ** 0.5))
            if i + 1 < len(self.timesteps):  # the last step hands on the sample, not a noised image
                t_next = self.timesteps[i + 1]
                abar = float(alphas_cumprod[t_next])
                mean, square = torch.cat(self.xt_mean[i]), torch.cat(self.xt_square[i])
                expected_square = abar * reference_square[labels] + 1 - abar
                row["x_next"] = {"t": t_next, "x0_gray": float((mean.mean() / abar**0.5 + 1) * GRAY),
                                 "reference_gray": row["regions"]["all"]["reference_gray"],
                                 "square_over_q": float(square.mean() / expected_square.mean())}
            rows.append(row)
        return rows


def gap_summary(values: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, classes: int) -> dict:
    """Per-image averages in [-1, 1] against each image's class reference, as gray levels of 255."""
    gap = (values - reference) * GRAY
    return {"gray": float((values.mean() + 1) * GRAY), "reference_gray": float((reference.mean() + 1) * GRAY),
            "gap": float(gap.mean()), "gap_standard_error": float(gap.std() / len(gap) ** 0.5),
            "gap_by_class": class_means(gap, labels, classes).tolist()}


def rounded(value, digits: int = 4):
    """Every float in a nest of dicts and lists to `digits` decimals: a ten-thousandth of a gray level is far below
    any standard error here, and a 50-step run's rows stay a small file."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="+", default=[50])
    parser.add_argument("--etas", type=float, nargs="+", default=[0.0, 1.0], help="0 = DDIM, 1 = DDPM ancestral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results (rewritten after every run)")
    parser.add_argument("--plot", default=None, help="PNG of the gap along the chain, one line per run")
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (a standard error needs two images).")
    if min(args.steps) < 1:
        parser.error("--steps must be positive.")
    if min(args.etas) < 0:
        parser.error("--etas must be 0 or more (0 = DDIM, 1 = DDPM ancestral).")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    pipe = DDPMCustomPipeline.from_pretrained(args.model).to(device)
    pipe.set_progress_bar_config(disable=True)
    classes = pipe.unet.config.num_class_embeds or 1  # an unconditional model: one class, every image
    image_shape = tuple(real_images("train", 1, args.seed, "cpu").shape[1:])  # before converting all 60,000
    if image_shape != (pipe.unet.config.in_channels, *[pipe.unet.config.sample_size] * 2):
        raise ValueError(f"{args.model} draws {pipe.unet.config.in_channels}x{pipe.unet.config.sample_size}x"
                         f"{pipe.unet.config.sample_size} images, Fashion-MNIST's are {image_shape}: this study "
                         "holds a model to Fashion-MNIST's train split, so it needs a model of those images.")
    images, train_labels = real_images("train", None, args.seed, "cpu", label_column="label")
    regions, reference, reference_square = reference_statistics(
        images, train_labels if classes > 1 else np.zeros(len(images), int), classes)
    labels = torch.arange(args.num_samples) % classes  # as training.evaluate labels its samples
    results = {"setup": {"model": args.model, "num_samples": args.num_samples, "seed": args.seed, "guidance_scale": 1.0,
                         "reference": f"fashion-mnist train ({len(images)} images), class by class",
                         "device": str(device)}, "runs": []}
    for steps in args.steps:
        for eta in args.etas:
            moments = ChainMoments(regions, classes)
            samples = sample(pipe, args.num_samples, steps, eta, args.seed, default_batch_size(device), 1.0,
                             callback_on_step_end=moments,
                             callback_on_step_end_tensor_inputs=["pred_original_sample", "latents"])
            rows = moments.rows(labels, reference, reference_square, pipe.scheduler.alphas_cumprod.double())
            finished = region_means(samples.cpu() * 2 - 1, labels, regions)  # clamped to [0, 1], as saved
            run = {"sampler": sampler_label("model", eta), "steps": steps, "eta": eta, "rows": rows,
                   "samples": {name: gap_summary(means, reference[name][labels], labels, classes)
                               for name, means in finished.items()}}
            results["runs"].append(rounded(run))
            shown = [rows[i] for i in sorted({*range(0, len(rows), max(1, len(rows) // 10)), len(rows) - 1})]
            for name in regions:
                print(f"{run['sampler']}, {steps} steps, {name}: x0 prediction minus the training images (gray levels) "
                      "at t = " + ", ".join(f"{r['t']} {r['regions'][name]['gap']:+.2f}" for r in shown)
                      + f"; samples {run['samples'][name]['gap']:+.2f} "
                      f"(standard error {run['samples'][name]['gap_standard_error']:.2f})", flush=True)
            if args.out:
                write_json_atomically(args.out, results, indent=None)  # one line: 50 steps x 3 regions x 10 classes a run
    if args.plot:
        plot(results, args.plot)
    return results


def plot(results: dict, path: str) -> None:
    """One panel per region: the gap of the x0 prediction along the chain (chain order, t falling), each run with a
    band of two standard errors; the last panel: the x_t each step hands on, its mean square over q's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = list(results["runs"][0]["rows"][0]["regions"])
    fig, axes = plt.subplots(1, len(regions) + 1, figsize=(4.2 * (len(regions) + 1), 4.2))
    for run in results["runs"]:
        label = f"{run['sampler']}, {run['steps']} steps"
        t = [r["t"] for r in run["rows"]]
        for ax, name in zip(axes, regions):
            gap = np.array([r["regions"][name]["gap"] for r in run["rows"]])
            band = 2 * np.array([r["regions"][name]["gap_standard_error"] for r in run["rows"]])
            line, = ax.plot(t, gap, label=label)
            ax.fill_between(t, gap - band, gap + band, color=line.get_color(), alpha=0.2)
            ax.set(title=f"x0 prediction minus the data: {name}", xlabel="timestep t (the chain runs right to left)",
                   ylabel="gray levels of 255")
        handed_on = [r["x_next"] for r in run["rows"] if "x_next" in r]
        axes[-1].plot([x["t"] for x in handed_on], [x["square_over_q"] for x in handed_on], label=label)
    axes[-1].set(title="the chain's x_t against the noised data", xlabel="timestep t of the x_t handed on",
                 ylabel="mean(x_t^2) / its value under q")
    for ax in axes:
        ax.axhline(1 if ax is axes[-1] else 0, color="gray", lw=0.8)
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['setup']['model']}, {results['setup']['num_samples']} samples; bands: two standard errors",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
