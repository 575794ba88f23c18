"""Does autoguidance (Karras et al., NeurIPS 2024, "Guiding a diffusion model with a bad version of itself") help?

    python benchmarks/autoguidance.py --model models/ddpm-fashion-mnist --guide GUIDE_FOLDER \
        --num-samples 2000 --weights 1 1.5 2 --out benchmarks/results/autoguidance-cpu-2k.json

Autoguidance samples with guide + w (model - guide) in place of the model's output, where the guide is a weaker
model of the same task (smaller, shorter trained): like classifier-free guidance it extrapolates away from a worse
prediction, but the worse one makes the same kinds of errors, only more of them, so the extrapolation removes errors
rather than variety. w = 1 is the model alone. The guide must share the model's noise schedule, prediction type,
image shape and classes (it sees the same x_t, t and labels). Each weight costs two model calls per step. For each
weight this samples N images as training.evaluate draws them (same seeds, class labels cycling 0..9) and reports
FID and KID with the offline extractor against Fashion-MNIST's test split.
"""

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.sampler_study import (  # noqa: E402
    Study, add_sampling_arguments, check_sampling_arguments, unet_output_changed)
from pipeline_ddpm_custom import DDPMCustomPipeline  # noqa: E402
from training.evaluate import class_histogram  # noqa: E402

# what the guide must share with the model for its output to be a prediction of the same quantity
SHARED_UNET = ("in_channels", "sample_size", "num_class_embeds", "learned_variance")
SHARED_SCHEDULE = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                   "prediction_type", "rescale_betas_zero_snr")


def check_guide_fits(pipe, guide_pipe) -> None:
    """A clear error naming every setting in which the guide differs from the model."""
    differences = []
    for part, keys in (("unet", SHARED_UNET), ("scheduler", SHARED_SCHEDULE)):
        ours, guides = getattr(pipe, part).config, getattr(guide_pipe, part).config
        differences += [f"{part}.{k}: model {ours.get(k)!r}, guide {guides.get(k)!r}" for k in keys if ours.get(k) != guides.get(k)]
    if differences:
        raise ValueError("The guide must be a model of the same task (same noise schedule, prediction type, image "
                         "shape and classes); train it with the model's settings. It differs in: " + "; ".join(differences))


def autoguided(pipe, guide, weight: float):
    """Within the block, pipe.unet's outputs are guide + weight (output - guide); weight 1 is the model alone, so the
    UNet is left unpatched and the guide never called."""
    if weight == 1.0:
        return contextlib.nullcontext(pipe)

    def guided(out, x, t, *args, **kwargs):
        weak = guide(x.to(guide.dtype), t, *args, **kwargs).sample.to(out.dtype)
        return weak + weight * (out - weak)

    return unet_output_changed(pipe, guided)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--guide", required=True, help="the weaker pipeline's folder or Hub repo id")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    args = parser.parse_args(argv)
    check_sampling_arguments(parser, args)
    if min(args.weights) < 1:
        parser.error("--weights must be at least 1 (1 = the model alone; above 1 extrapolates away from the guide).")
    return args


def main(argv=None):
    args = parse_args(argv)
    study = Study.open(args)
    guide_pipe = DDPMCustomPipeline.from_pretrained(args.guide)
    check_guide_fits(study.pipe, guide_pipe)
    guide = guide_pipe.unet.to(study.device)  # from_pretrained leaves it in eval mode
    results = {"setup": study.setup(guide=args.guide, guide_parameters=sum(p.numel() for p in guide.parameters())),
               "runs": []}
    for weight in args.weights:
        start = time.time()
        with autoguided(study.pipe, guide, weight):
            images = study.draw()
        run = {"weight": weight, **study.score(images), "class_histogram": class_histogram(images, study.extractor),
               "seconds": round(time.time() - start, 1)}
        study.keep(results, run, f"weight {weight}: FID {run['fid']:.2f}  KID {run['kid']:.5f}  "
                                 f"classes {min(run['class_histogram']):.3f}..{max(run['class_histogram']):.3f}")
    return results


if __name__ == "__main__":
    main()
