"""Which classes carry a model's FID, and whether in the mean or in the spread of their features.

    python benchmarks/fid_by_class.py --model models/ddpm-fashion-mnist --num-samples 2000 --steps 50 100 \
        --out benchmarks/results/fid-by-class-cpu-2k-ft15.json --plot benchmarks/results/fid_by_class_2k_ft15.png

Samples are drawn as training.evaluate draws them (image i from seed + i, class label i mod 10: N/10 of each
class; --scheduler and --eta pick the sampler, one run per --steps). The floor is evaluate's class-balanced one
(`--balanced-floor`: N train images, N/10 of each class, drawn with seed + 1). Offline features throughout.

For each class, FID(the samples of that class, the test split's 1,000 images of it) beside FID(the floor's images
of it, the same 1,000), and the same for all classes together against the whole test split. Each FID is split
into its two terms, FID = |mu_s - mu_r|^2 + Tr(S_s + S_r - 2 (S_s S_r)^1/2): a large *mean term* says the class's
samples sit in the wrong place on average (too dark, too wide, ...), a large *covariance term* that they vary too
little, too much or in the wrong directions (lost variety, artefacts). At N/10 samples a class's FID is biased
upwards by its small count; its floor, measured at the same count, carries the same bias, so compare each class
with its own floor, and classes with each other through that ratio. Beside the terms, each class's garment area and
gray level (pixels over 15 gray levels) for the samples, the floor and the test images, to put words to a mean term.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.sampler_study import Study, add_sampling_arguments, check_sampling_arguments  # noqa: E402
from pipeline_ddpm_custom.labels import cycling_class_labels  # noqa: E402
from training.data import FASHION_MNIST_CLASSES  # noqa: E402
from training.evaluate import feed, floor_images, make_metrics, real_images  # noqa: E402


def fid_terms(fid) -> dict:
    """A torchmetrics FID that holds both sides, as its value and its two terms."""
    total = float(fid.compute())
    mean_real = fid.real_features_sum / fid.real_features_num_samples
    mean_generated = fid.fake_features_sum / fid.fake_features_num_samples
    mean_term = float(((mean_real - mean_generated) ** 2).sum())
    return {"fid": total, "mean_term": mean_term, "covariance_term": total - mean_term}


class ClassReferences:
    """FID metrics fed the test split once: the whole split and each class's images, their features kept across
    resets (evaluate's make_metrics), for the floor and every run to be compared with (before, each comparison fed
    the 10,000 test images again)."""

    def __init__(self, extractor, test: torch.Tensor, test_labels: np.ndarray, device):
        self.extractor, self.test, self.test_labels = extractor, test, test_labels
        self.labels = [int(label) for label in np.unique(test_labels)]
        self.fids = {"all": self._fed(test, device)}
        for label in self.labels:
            self.fids[label] = self._fed(self.of_class(label), device)

    def _fed(self, reference: torch.Tensor, device):
        fid, _ = make_metrics(self.extractor, 2, device)
        feed((fid,), reference, True, self.extractor, remember=True)  # the same test images in every run
        return fid

    def of_class(self, label: int) -> torch.Tensor:
        return self.test[torch.from_numpy(self.test_labels == label)]

    def terms(self, key, compared: dict) -> dict:
        """{name: fid_terms} of each image set of `compared` against the reference `key` ("all" or a label)."""
        fid = self.fids[key]
        out = {}
        for name, images in compared.items():
            fid.reset()  # the generated side only
            feed((fid,), images, False, self.extractor)
            out[name] = fid_terms(fid)
        return out


GARMENT_LEVEL = 15  # gray levels: a pixel over it is garment (area, gray and ink here; x0_mean_along_chain's regions)


def pixel_statistics(images: torch.Tensor) -> dict:
    """What the eye would check first, to put words to a mean term: the garment's area (pixels over 15 gray levels)
    and its mean gray level, in gray levels of 255."""
    levels = images.float() * 255
    garment = levels > GARMENT_LEVEL
    return {"garment_area": float(garment.float().mean()), "garment_gray": float(levels[garment].mean())}


def by_class(references: ClassReferences, sets: dict) -> dict:
    """`sets` {name: (images, labels)} against the test split: {"all": {name: terms}, "classes": [{"class", "name",
    "test": pixel statistics, name: terms and pixel statistics}, ...]}, each class's images against the test
    images of that class."""
    result = {"all": references.terms("all", {name: images for name, (images, _) in sets.items()}), "classes": []}
    for label in references.labels:
        members = {name: images[torch.from_numpy(labels == label)] for name, (images, labels) in sets.items()}
        terms = references.terms(label, members)
        result["classes"].append({"class": label, "name": FASHION_MNIST_CLASSES[label],
                                  "test": pixel_statistics(references.of_class(label)),
                                  **{name: {**terms[name], **pixel_statistics(members[name])} for name in sets}})
    return result


def plot(results: dict, path: str) -> None:
    """Per class: the floor's FID and each run's, as stacked bars (mean term below, covariance term above)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    guided = ""  # the samples' guidance, where they had any, in their label
    if setup.get("guidance_scale", 1.0) != 1.0:
        interval = setup.get("guidance_interval")
        guided = f", guidance {setup['guidance_scale']:g}" + (f" at t = {interval[0]}-{interval[1]}" if interval else "")
    sets = [("real vs real floor", "floor", results["floor"])] + [
        (f"{run['sampler']}, {run['steps']} steps{guided}", "samples", run) for run in results["runs"]]
    names = [row["name"] for row in results["floor"]["classes"]]
    width = 0.8 / len(sets)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for i, (label, key, rows) in enumerate(sets):
        x = np.arange(len(names)) + (i - (len(sets) - 1) / 2) * width
        mean = [row[key]["mean_term"] for row in rows["classes"]]
        cov = [row[key]["covariance_term"] for row in rows["classes"]]
        bars = ax.bar(x, mean, width, label=f"{label}: mean term", alpha=0.9)
        ax.bar(x, cov, width, bottom=mean, color=bars.patches[0].get_facecolor(), alpha=0.35,
               label=f"{label}: covariance term")
        if key == "samples":  # each class's distance from its own floor
            for xi, m, c, floor in zip(x, mean, cov, results["floor"]["classes"]):
                ax.text(xi, m + c, f"{(m + c) / floor['floor']['fid']:.1f}x", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(np.arange(len(names)), names, rotation=20)
    ax.set(ylabel="FID (offline features)", title=f"FID by class, {results['setup']['num_samples'] // len(names)} "
           "samples a class vs the test split's images of that class")
    ax.legend(fontsize=7, ncol=len(sets), loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below: bars stay clear
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sampling_arguments(parser, num_samples=2000, solvers=True, many_steps=True, guidance=True)
    parser.add_argument("--plot", default=None, help="PNG of the per-class FIDs and their terms")
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    study = Study.open(args, reference=False)  # by_class() feeds the test split its own way
    classes = study.pipe.unet.config.num_class_embeds
    if not classes or args.num_samples % classes or args.num_samples // classes < 2:
        parser.error(f"--num-samples must be a multiple of the model's classes ({classes}) with at least 2 of each: "
                     "a class-conditional model, and e.g. --num-samples 2000.")
    test, test_labels = real_images("test", 10_000, args.seed, study.device, label_column="label")
    floor, floor_labels = floor_images("test", args.num_samples, args.seed, study.device, balanced=True,
                                       label_column="label")
    references = ClassReferences(study.extractor, test, test_labels, study.device)
    floor_terms = by_class(references, {"floor": (floor, floor_labels)})
    results = {"setup": study.setup(floor="class-balanced train subset, seed + 1"), "floor": floor_terms, "runs": []}
    sample_labels = np.asarray(cycling_class_labels(range(args.num_samples), classes))  # as study.draw() labels them
    for steps in args.steps:
        terms = by_class(references, {"samples": (study.draw(steps=steps), sample_labels)})
        run = {"sampler": results["setup"]["sampler"], "steps": steps, **terms}
        worst = max(zip(run["classes"], floor_terms["classes"]),
                    key=lambda pair: pair[0]["samples"]["fid"] / pair[1]["floor"]["fid"])
        overall = run["all"]["samples"]
        study.keep(results, run, f"{steps} steps: FID {overall['fid']:.2f} (mean term {overall['mean_term']:.2f}); "
                                 f"farthest from its floor: {worst[0]['name']}")
        if args.plot:
            plot(results, args.plot)  # after every run, as keep() writes --out
    return 0


if __name__ == "__main__":
    sys.exit(main())
