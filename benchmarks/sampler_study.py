"""What the sampler studies share (epsilon_scaling.py, time_shift.py, timestep_placement.py, autoguidance.py,
background_haze.py, fid_by_class.py, brightness_headroom.py).

Each draws N samples from a saved pipeline as training.evaluate draws them (same seeds, class labels
cycling 0..9), scores them with the offline extractor against Fashion-MNIST's test split, and writes
its results as JSON that starts with the same `setup` block. This module holds those common parts:
the command-line options, the loaded model and metrics, the setup block, the sampling call and the
patching of the UNet's calls that epsilon_scaling.py, autoguidance.py and time_shift.py study.
"""

import argparse
import contextlib
from dataclasses import dataclass

import torch

# imported by the study scripts, which have already put the repository root on sys.path
from pipeline_ddpm_custom import DDPMCustomPipeline
from pipeline_ddpm_custom.scheduling_ddpm_custom import TIMESTEP_SPACINGS
from pipeline_ddpm_custom.solvers import check_eta_applies
from training.atomic_files import write_json_atomically
from training.evaluate import (
    SAMPLING_SETTINGS, SCHEDULER_CHOICES, add_guidance_arguments, check_guidance_arguments, default_batch_size,
    guidance_setup, load_extractor, reference_metrics, sample, sampler_label, score_images, use_scheduler)

REFERENCE = "fashion-mnist test (10000 images)"


def add_sampling_arguments(parser: argparse.ArgumentParser, num_samples: int = 500, solvers: bool = False,
                           many_steps: bool = False, guidance: bool = False) -> None:
    """The options every study takes: the model, how many samples, the sampler, the seed, where to run and write.
    `solvers`: also --scheduler and --timestep-spacing, for a study that works with diffusers' solvers as well as the
    model's own scheduler, on the scheduler's own chain of timesteps (a study that changes the model scheduler's steps
    or timesteps does not); `many_steps`: --steps takes a list, one run each; `guidance`: also evaluate's
    --guidance-scale and --guidance-interval, for a study whose samples may be guided (one that changes the UNet's
    calls does not)."""
    parser.add_argument("--model", required=True, help="pipeline folder or Hub repo id")
    parser.add_argument("--num-samples", type=int, default=num_samples)
    parser.add_argument("--steps", type=int, default=[50] if many_steps else 50, nargs="+" if many_steps else None)
    parser.add_argument("--eta", type=float, default=None, help="0 = DDIM (the default), 1 = DDPM ancestral")
    if solvers:
        parser.add_argument("--scheduler", default="model", choices=SCHEDULER_CHOICES,
                            help="'model': the model's own scheduler (with --eta); else one of diffusers' solvers")
        parser.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
                            help="the chain's spacing (default: the model scheduler's own; trailing for a solver)")
    if guidance:
        add_guidance_arguments(parser)
    else:  # a study that changes the UNet's calls samples unguided
        parser.set_defaults(guidance_scale=1.0, guidance_interval=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results (rewritten atomically after every run)")


def check_sampling_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (FID needs a covariance).")
    args.scheduler = getattr(args, "scheduler", "model")
    args.timestep_spacing = getattr(args, "timestep_spacing", None)
    try:
        check_eta_applies(args.scheduler, args.eta is not None)
    except ValueError as error:
        parser.error(str(error))
    if args.scheduler == "model" and args.eta is None:
        args.eta = 0.0
    check_guidance_arguments(parser, args)


@contextlib.contextmanager
def unet_call_changed(pipe, call):
    """Within the block, every call of pipe.unet(x, t, ...) returns call(forward, x, t, ...), `forward` being the
    UNet's own (a study that changes what the model is asked, not only its answer); afterwards the UNet is as it was."""
    unet, forward = pipe.unet, pipe.unet.forward

    def changed_forward(x, t, *args, **kwargs):
        return call(forward, x, t, *args, **kwargs)

    patched_already = "forward" in vars(unet)  # e.g. an accelerate hook's wrapper: put it back as it was
    unet.forward = changed_forward
    try:
        yield pipe
    finally:
        if patched_already:
            unet.forward = forward
        else:
            del unet.forward  # back to the class's forward


def unet_output_changed(pipe, change):
    """Within the block, every call of pipe.unet returns its output with `.sample` replaced by
    change(sample, x, t, *args, **kwargs); afterwards the UNet is as it was."""
    def call(forward, x, t, *args, **kwargs):
        out = forward(x, t, *args, **kwargs)
        out.sample = change(out.sample, x, t, *args, **kwargs)
        return out

    return unet_call_changed(pipe, call)


@dataclass
class Study:
    """The loaded model, the extractor and the FID/KID metrics already holding the reference statistics;
    `pipe` samples with the study's --scheduler, `model_scheduler` is the model's own either way."""
    args: argparse.Namespace
    device: torch.device
    pipe: DDPMCustomPipeline
    model_scheduler: object
    extractor: torch.nn.Module
    fid: object
    kid: object

    @classmethod
    def open(cls, args: argparse.Namespace, reference: bool = True) -> "Study":
        """`reference`: feed the test split to FID and KID for score() (a study that scores otherwise skips it)."""
        device = torch.device(args.device)
        extractor = load_extractor("offline", device)
        fid, kid = reference_metrics(extractor, args.num_samples, args.seed, device) if reference else (None, None)
        pipe = DDPMCustomPipeline.from_pretrained(args.model).to(device)
        pipe.set_progress_bar_config(disable=True)
        model_scheduler = pipe.scheduler
        use_scheduler(pipe, args.scheduler, args.timestep_spacing)
        return cls(args, device, pipe, model_scheduler, extractor, fid, kid)

    def setup(self, **extra) -> dict:
        """The header of the results: what was sampled, how, and scored against what."""
        a = self.args
        guided = guidance_setup(a) if a.guidance_scale != 1.0 else {}  # absent unguided, as in every earlier file
        return {"model": a.model, "num_samples": a.num_samples, "sampler": sampler_label(a.scheduler, a.eta),
                "steps": a.steps, "eta": a.eta, "seed": a.seed, **guided, "extractor": "offline", "reference": REFERENCE, **extra,
                "scheduler": {"class": type(self.pipe.scheduler).__name__,
                              **{k: self.pipe.scheduler.config.get(k) for k in SAMPLING_SETTINGS}}}

    def draw(self, steps: int = None, **pipeline_kwargs) -> torch.Tensor:
        """args.num_samples images in [0, 1], (N, 1, H, W), with the study's steps (or `steps`), eta, seed and
        guidance (1 and no interval for a study without guidance options)."""
        a = self.args
        return sample(self.pipe, a.num_samples, steps or a.steps, a.eta, a.seed, default_batch_size(self.device),
                      a.guidance_scale, guidance_interval=a.guidance_interval, **pipeline_kwargs)

    def score(self, images: torch.Tensor) -> dict:
        return score_images(self.fid, self.kid, images, self.extractor)

    def keep(self, results: dict, run: dict, summary: str) -> None:
        """Add a finished run to the results, print its one-line summary and rewrite --out, so that a killed study
        keeps every run it finished."""
        results["runs"].append(run)
        print(summary, flush=True)
        if self.args.out:
            write_json_atomically(self.args.out, results)
