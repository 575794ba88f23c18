#!/usr/bin/env python
"""Train a DDPM: ``accelerate launch training/train_ddpm.py --output_dir DIR [options]``.

One process or many (``--multi_gpu --num_processes N``), fp32 / fp16 / bf16, gradient accumulation,
EMA, atomic checkpoints with exact resume, validation grids from the EMA weights, export of a
pipeline that loads three ways, and an optional push to the Hub.

Reproducibility: all randomness of a training micro-step (noise, timesteps, flips, condition
dropping, dropout) comes from a seed derived from (--seed, micro-step, rank), and the data order
from accelerate's seedable sampler (--seed + epoch). A resumed run therefore needs only the saved
weights, optimizer, EMA and data position to continue exactly as the uninterrupted run.
"""

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `python training/train_ddpm.py` from a checkout

from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomScheduler, DDPMCustomUNet  # noqa: E402
from pipeline_ddpm_custom.losses import (  # noqa: E402
    background_haze, garment_dimming, offset_as_noise, rollout_noise, training_losses)
from pipeline_ddpm_custom.labels import cycling_class_labels  # noqa: E402
from pipeline_ddpm_custom.pictures import grid  # noqa: E402
from training import checkpoints, data, export, precision  # noqa: E402
from training.evaluate import default_batch_size  # noqa: E402
from training.window_log import WindowLog  # noqa: E402

logger = get_logger("train_ddpm")
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]


# --report_to's trackers: accelerate's names, which are also the packages they need
TRACKERS = ("comet_ml", "mlflow", "tensorboard", "wandb")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="Hub id, save_to_disk folder or parquet file(s); default Fashion-MNIST")
    g.add_argument("--train_data_dir", default=None, help="a folder of images (datasets' imagefolder)")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--image_column", default=None, help="auto-detected when only one column holds images")
    g.add_argument("--label_column", default=None, help="auto-detected when only one column holds class labels")
    g.add_argument("--max_train_samples", type=int, default=None, help="train on the first N examples (quick runs)")
    g.add_argument("--resolution", type=int, default=28)
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--cache_dir", default=None)
    g = p.add_argument_group("model and diffusion")
    g.add_argument("--model_config", default=None, help="JSON file of DDPMCustomUNet arguments (overrides the size options)")
    g.add_argument("--pretrained_model", default=None,
                   help="fine-tune: start from the UNet of this pipeline (folder or Hub id); its config replaces the size options")
    g.add_argument("--base_channels", type=int, default=64)
    g.add_argument("--channel_mult", default="1,2,2", help="width multiplier per level, comma-separated")
    g.add_argument("--num_res_blocks", type=int, default=2)
    g.add_argument("--attention_resolutions", default=None,
                   help="feature-map sizes with self-attention, comma-separated ('' for none; default: half of "
                        "--resolution, 14 at 28 pixels, 16 at 32)")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument("--beta_schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
    g.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "sample", "v_prediction"])
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting (5.0 is the paper's choice): the loss of a step at signal-to-noise "
                        "ratio SNR times min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR + 1) for v-prediction")
    g.add_argument("--input_perturbation", type=float, default=0.0,
                   help="input perturbation (Ning et al. 2023; 0.1 is the paper's choice): x_t is formed with noise + "
                        "gamma * extra noise while the target keeps the plain noise, against exposure bias (0: off)")
    g.add_argument("--haze_perturbation", type=float, default=0.0,
                   help="max gray levels of a faint smooth haze put over the black background of a share "
                        "(--haze_share) of the training images as part of the noise, so that the model learns to "
                        "remove it (0: off)")
    g.add_argument("--haze_share", type=float, default=0.5,
                   help="share of the training images that get the --haze_perturbation haze (the rest stay clean)")
    g.add_argument("--dim_perturbation", type=float, default=0.0,
                   help="max fraction by which a share (--dim_share) of the training images is darkened towards black "
                        "in x_t as part of the noise, so that the model learns to restore garments that a sampling "
                        "chain drew too dark (0: off; 0.06 darkens a 150-gray garment by up to 9 levels)")
    g.add_argument("--dim_share", type=float, default=0.5,
                   help="share of the training images that get the --dim_perturbation darkening (the rest stay as they are)")
    g.add_argument("--rollout_hops", type=int, default=0,
                   help="scheduled sampling against exposure bias: a share (--rollout_share) of each batch is noised "
                        "--rollout_hops * --rollout_stride steps above its timestep and brought down to it by the "
                        "model's own DDIM steps, and trained to lead that x_t back to the real image (0: off)")
    g.add_argument("--rollout_stride", type=int, default=20,
                   help="timesteps per rollout hop (20: the spacing of a 50-step chain over 1000 steps)")
    g.add_argument("--rollout_share", type=float, default=0.5, help="share of each batch that gets a rollout")
    g.add_argument("--rollout_timesteps", type=int, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="only images whose timestep lies in [LOW, HIGH] get a rollout (default: every timestep); "
                        "at small t the rollout's noise is the chain's error divided by sqrt(1 - abar_t), so a LOW "
                        "keeps the targets near the forward process's")
    g.add_argument("--class_conditional", action="store_true", help="condition on the label column (classifier-free guidance)")
    g.add_argument("--cond_drop_prob", type=float, default=0.1, help="probability of training with the null class")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=64, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_epochs")
    g.add_argument("--num_epochs", type=int, default=10)
    g.add_argument("--learning_rate", type=float, default=2e-4)
    g.add_argument("--lr_scheduler", default="cosine", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=500, help="in optimizer steps")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="default: the accelerate config's, except that bf16 on a CPU without fast bf16 becomes fp32 (training/precision.py)")
    g.add_argument("--max_nonfinite_steps", type=int, default=20, help="stop after this many non-finite losses in a row")
    g = p.add_argument_group("EMA")
    g.add_argument("--ema_max_decay", type=float, default=0.9999)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=3 / 4)
    g.add_argument("--ema_min_decay", type=float, default=0.0,
                   help="floor of the EMA decay, which otherwise warms up from 0; equal to --ema_max_decay, the decay "
                        "is constant from the second step (diffusers' EMAModel copies the weights at the first): for "
                        "fine-tuning, where the starting weights are already good and the warm-up would forget them")
    g = p.add_argument_group("progress, validation and checkpoints")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--report_to", default="tensorboard", choices=[*TRACKERS, "all", "none"],
                   help="where losses, learning rate, EMA decay, FIDs and validation grids are logged (accelerate's "
                        "trackers, under OUTPUT_DIR/logs); all: every tracker installed; none: the console and the "
                        "PNG grids in logs/samples only")
    g.add_argument("--validation_steps", type=int, default=1000, help="0 disables validation grids")
    g.add_argument("--num_validation_images", type=int, default=16)
    g.add_argument("--validation_inference_steps", type=int, default=50, help="DDIM steps for validation grids")
    g.add_argument("--eval_steps", type=int, default=0,
                   help="FID of the EMA model every N steps with the offline Fashion-MNIST extractor (0: off)")
    g.add_argument("--eval_num_samples", type=int, default=2000)
    g.add_argument("--eval_inference_steps", type=int, default=50)
    g.add_argument("--eval_eta", type=float, default=0.0, help="0 = DDIM, 1 = DDPM ancestral")
    g.add_argument("--eval_reference_split", default="test", help="the split whose statistics FID compares against")
    g.add_argument("--checkpointing_steps", type=int, default=1000)
    g.add_argument("--checkpoints_total_limit", type=int, default=3)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder anywhere")
    g.add_argument("--export_at_checkpoints", action="store_true", help="also export the pipeline at every checkpoint")
    g = p.add_argument_group("Hub")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None, help="user/name (default: the output folder's name)")
    g.add_argument("--hub_private_repo", action="store_true")
    g.add_argument("--hub_token", default=None)
    g.add_argument("--license", default="apache-2.0")
    return validate_args(p.parse_args(argv))


def int_list(text: str, flag: str):
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}.")


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Every mistake found here is reported before any data is loaded or model built."""
    if args.dataset_name and args.train_data_dir:
        raise ValueError("Pass --dataset_name or --train_data_dir, not both.")
    positive = ["train_batch_size", "gradient_accumulation_steps", "resolution", "num_train_timesteps", "num_epochs",
                "logging_steps", "checkpointing_steps", "num_validation_images", "validation_inference_steps",
                "eval_inference_steps"]
    for name in positive + ["max_train_steps", "checkpoints_total_limit", "max_train_samples"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be at least 1, got {value}.")
    if args.validation_steps < 0 or args.lr_warmup_steps < 0 or args.eval_steps < 0:
        raise ValueError("--validation_steps, --eval_steps and --lr_warmup_steps must be >= 0.")
    if args.eval_num_samples < 2:
        raise ValueError(f"--eval_num_samples must be at least 2 (FID needs a covariance), got {args.eval_num_samples}.")
    if not 0.0 <= args.cond_drop_prob < 1.0:
        raise ValueError(f"--cond_drop_prob must lie in [0, 1), got {args.cond_drop_prob}.")
    if args.input_perturbation < 0:
        raise ValueError(f"--input_perturbation must be >= 0 (0 turns it off; 0.1 is the paper's choice), got {args.input_perturbation}.")
    if args.haze_perturbation < 0:
        raise ValueError(f"--haze_perturbation must be >= 0 gray levels (0 turns it off), got {args.haze_perturbation}.")
    if not 0.0 < args.haze_share <= 1.0:
        raise ValueError(f"--haze_share must lie in (0, 1] (the share of images that get the haze), got {args.haze_share}.")
    if not 0.0 <= args.dim_perturbation < 1.0:
        raise ValueError(f"--dim_perturbation must lie in [0, 1) (the largest fraction of brightness taken; 0 turns it "
                         f"off), got {args.dim_perturbation}.")
    if not 0.0 < args.dim_share <= 1.0:
        raise ValueError(f"--dim_share must lie in (0, 1] (the share of images that get darkened), got {args.dim_share}.")
    if args.rollout_hops < 0 or args.rollout_stride < 1:
        raise ValueError(f"--rollout_hops must be >= 0 (0 turns it off) and --rollout_stride >= 1, got "
                         f"{args.rollout_hops} and {args.rollout_stride}.")
    if not 0.0 < args.rollout_share <= 1.0:
        raise ValueError(f"--rollout_share must lie in (0, 1] (the share of images that get a rollout), got {args.rollout_share}.")
    if args.rollout_timesteps is not None and not 0 <= args.rollout_timesteps[0] <= args.rollout_timesteps[1]:
        raise ValueError(f"--rollout_timesteps LOW HIGH must satisfy 0 <= LOW <= HIGH, got {args.rollout_timesteps}.")
    if not 0.0 <= args.ema_min_decay <= args.ema_max_decay < 1.0:
        raise ValueError(f"The EMA decays must satisfy 0 <= --ema_min_decay <= --ema_max_decay < 1, got "
                         f"{args.ema_min_decay} and {args.ema_max_decay}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")
    tracker = args.report_to
    if tracker in TRACKERS and importlib.util.find_spec(tracker) is None:  # accelerate would only warn, and log nothing
        raise ValueError(f"--report_to {tracker} needs the {tracker} package: pip install {tracker}, or pass "
                         "--report_to tensorboard (installed with this package's train extra) or none.")
    if max(args.validation_inference_steps, args.eval_inference_steps) > args.num_train_timesteps:
        raise ValueError("--validation_inference_steps and --eval_inference_steps cannot exceed --num_train_timesteps.")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a GPU; on CPU use --mixed_precision bf16 (or no).")
    if args.model_config and not os.path.isfile(args.model_config):
        raise ValueError(f"--model_config {args.model_config} does not exist.")
    if args.model_config and args.pretrained_model:
        raise ValueError("Pass --model_config (a new model) or --pretrained_model (fine-tune one), not both.")
    args.channel_mult = int_list(args.channel_mult, "--channel_mult")
    halvings = len(args.channel_mult) - 1
    if not (args.model_config or args.pretrained_model) and args.resolution % 2**halvings:
        raise ValueError(f"--resolution {args.resolution} cannot be halved {halvings} times (--channel_mult has "
                         f"{halvings + 1} levels): use a multiple of {2**halvings}, or fewer levels.")
    sizes = [args.resolution // 2**i for i in range(halvings + 1)]  # the UNet's feature-map sizes, level by level
    if args.attention_resolutions is None:  # the level at half the resolution, where the default of 14 came from
        args.attention_resolutions = [args.resolution // 2] if args.resolution % 2 == 0 and args.resolution // 2 in sizes else []
    else:
        args.attention_resolutions = int_list(args.attention_resolutions, "--attention_resolutions")
    unknown = sorted(set(args.attention_resolutions) - set(sizes))
    if unknown and not (args.model_config or args.pretrained_model):  # those bring their own
        raise ValueError(f"--attention_resolutions {unknown} are not feature-map sizes at --resolution {args.resolution} "
                         f"with {len(sizes)} levels: pick from {sizes}.")
    if args.resume_from_checkpoint not in (None, "latest"):
        checkpoints.resolve_resume(args.resume_from_checkpoint, "")  # raises if it is not a checkpoint
    if args.pretrained_model:  # before the data is read: a wrong path or size should not wait for it
        pretrained = pretrained_unet_config(args.pretrained_model)
        if pretrained.get("sample_size") != args.resolution:
            raise ValueError(f"--pretrained_model {args.pretrained_model} takes {pretrained.get('sample_size')}-pixel images, "
                             f"but --resolution is {args.resolution}: match --resolution to it.")
    return args


def build_unet(args, channels: int, num_classes) -> DDPMCustomUNet:
    if args.pretrained_model:
        return load_pretrained_unet(args.pretrained_model, args.resolution, channels, num_classes)
    config = dict(sample_size=args.resolution, in_channels=channels, base_channels=args.base_channels,
                  channel_mult=args.channel_mult, num_res_blocks=args.num_res_blocks,
                  attention_resolutions=args.attention_resolutions, dropout=args.dropout)
    if args.model_config:
        with open(args.model_config) as f:
            config.update(json.load(f))
    if config["in_channels"] != channels:
        raise ValueError(f"The model config says in_channels={config['in_channels']} but the images are converted to {channels} channels.")
    if config.get("sample_size") != args.resolution:
        raise ValueError(f"The model's sample_size {config.get('sample_size')} differs from --resolution {args.resolution}.")
    config["num_class_embeds"] = num_classes
    return DDPMCustomUNet(**config)


def pretrained_unet_config(source: str) -> dict:
    try:
        return DDPMCustomUNet.load_config(source, subfolder="unet")
    except OSError as error:
        raise ValueError(f"--pretrained_model {source}: not a pipeline folder or Hub repo with a unet/ ({error}).") from error


def load_pretrained_unet(source: str, resolution: int, channels: int, num_classes) -> DDPMCustomUNet:
    """The UNet of a saved pipeline, in float32 whatever it was stored in (training needs fp32 master weights).
    validate_args has checked the path and the resolution; the images are converted to the model's channels."""
    unet = DDPMCustomUNet.from_pretrained(source, subfolder="unet", dtype=torch.float32)
    config = unet.config
    if config.num_class_embeds != num_classes:
        wanted = "pass --class_conditional" if config.num_class_embeds else "drop --class_conditional"
        raise ValueError(f"--pretrained_model {source} has num_class_embeds={config.num_class_embeds} but the data gives "
                         f"{num_classes}: {wanted}.")
    return unet


# scheduler settings that only change how a trained model is sampled, never what it is trained on
SAMPLING_ONLY_SETTINGS = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                          "sample_max_value", "timestep_spacing", "steps_offset")


def build_noise_scheduler(args) -> DDPMCustomScheduler:
    """The noise schedule the arguments train on. A fine-tune keeps the pretrained pipeline's sampling-only
    settings (the bundled model's clip_sample=False, say), so that its export samples as the pipeline it came
    from did; the schedule itself and the prediction type are the arguments', with a warning where the
    schedule differs from the one the pretrained model learnt."""
    sampling = {}
    if args.pretrained_model:
        try:
            pretrained = DDPMCustomScheduler.load_config(args.pretrained_model, subfolder="scheduler")
        except OSError:  # a pipeline saved without a scheduler: nothing to keep
            pretrained = {}
        sampling = {k: pretrained[k] for k in SAMPLING_ONLY_SETTINGS if k in pretrained}
        for key in ("num_train_timesteps", "beta_schedule"):
            if key in pretrained and pretrained[key] != getattr(args, key):
                logger.warning(f"--pretrained_model {args.pretrained_model} was trained with {key}={pretrained[key]!r}, this "
                               f"fine-tune uses --{key} {getattr(args, key)!r}: pass --{key} {pretrained[key]!r} to keep its noise schedule.")
    return DDPMCustomScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                               prediction_type=args.prediction_type, **sampling)


def step_seed(seed: int, micro_step: int, rank: int) -> int:
    """The seed of one micro-step on one rank: a pure function, so a resumed run draws the same numbers."""
    return (seed * 1_000_003 + micro_step * 8191 + rank) % (2**63 - 1)


def draw_step_inputs(x0: torch.Tensor, labels, args, num_classes, draw_on=None, scheduler=None):
    """The random part of one training step, in the order that a resumed run's per-step seed relies on:
    flips, noise, timesteps, label drops (to the null class, for classifier-free guidance), then the
    input perturbation, the background haze and the garments' darkening, last so that the earlier draws do not depend
    on them. Returns x0, the target's noise, timesteps, labels and the noise x_t is formed with. The haze and the
    darkening (`scheduler` needed) enter both noises: x_t holds the hazy or darkened image while the target's x0 is
    the clean one. `draw_on` draws the numbers (the offsets' too) on another device and moves them to x0's
    (benchmarks/training_by_device.py)."""
    device = x0.device
    draw_on = draw_on or device
    if args.random_flip:
        flips = torch.rand(x0.shape[0], device=draw_on).to(device) < 0.5
        x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
    noise = torch.randn(x0.shape, device=draw_on).to(device)
    timesteps = torch.randint(0, args.num_train_timesteps, (x0.shape[0],), device=draw_on).to(device)
    if labels is not None:
        drop = torch.rand(labels.shape[0], device=draw_on).to(device) < args.cond_drop_prob
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    input_noise = noise
    if args.input_perturbation > 0:
        input_noise = noise + args.input_perturbation * torch.randn(x0.shape, device=draw_on).to(device)
    # offsets of x0 that x_t holds and the target does not (the haze, then the darkening: this order keeps the
    # haze's draws those of a run without the darkening), each counted as part of both noises
    offsets = (("--haze_perturbation", args.haze_perturbation,
                lambda: background_haze(x0, args.haze_perturbation, args.haze_share, draw_on)),
               ("--dim_perturbation", args.dim_perturbation,
                lambda: garment_dimming(x0, args.dim_perturbation, args.dim_share, draw_on)))
    for flag, amount, draw_offset in offsets:
        if amount > 0:
            if scheduler is None:
                raise ValueError(f"{flag} needs the noise scheduler (its alphas turn the offset into noise).")
            moved = offset_as_noise(scheduler, draw_offset(), timesteps)
            noise, input_noise = noise + moved, input_noise + moved
    return x0, noise, timesteps, labels, input_noise


def with_rollouts(model, scheduler, x0, noise, input_noise, timesteps, labels, args, draw_on=None):
    """--rollout_hops: for a --rollout_share of the batch (of its images in --rollout_timesteps, if given), both
    noises replaced by the one that puts x0 where the model's own chain lands (losses.rollout_noise); drawn after
    draw_step_inputs' numbers, which stay a plain run's. Returns the two noises."""
    device = x0.device
    draw_on = draw_on or device
    chosen = torch.rand(x0.shape[0], device=draw_on).to(device) < args.rollout_share
    start_noise = torch.randn(x0.shape, device=draw_on).to(device)
    if args.rollout_timesteps is not None:  # after the draws, so that they do not depend on the window
        low, high = args.rollout_timesteps
        chosen &= (timesteps >= low) & (timesteps <= high)
    if not chosen.any():
        return noise, input_noise
    rolled = rollout_noise(model, scheduler, x0[chosen], start_noise[chosen], timesteps[chosen],
                           None if labels is None else labels[chosen], args.rollout_hops, args.rollout_stride)
    noise, input_noise = noise.clone(), input_noise.clone()
    noise[chosen] = rolled.to(noise.dtype)
    input_noise[chosen] = rolled.to(input_noise.dtype)
    return noise, input_noise


@contextlib.contextmanager
def ema_weights(accelerator, unet, ema):
    """The unwrapped model with the EMA weights swapped in (and the training weights put back after)."""
    model = accelerator.unwrap_model(unet)
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    model.eval()
    try:
        yield model
    finally:
        ema.restore(model.parameters())
        model.train()


@torch.no_grad()
def sample_on_all_ranks(accelerator, model, noise_scheduler, count, steps, eta, output_type) -> list:
    """Images 0..count-1 (image i from seed i, class i mod classes), shared out over the ranks so that
    nobody waits idle; every rank gets the whole list back, in order. Batched as training.evaluate does."""
    batch_size = default_batch_size(accelerator.device)
    pipe = DDPMCustomPipeline(unet=model, scheduler=DDPMCustomScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    classes = model.config.num_class_embeds
    with accelerator.split_between_processes(list(range(count))) as mine:
        images = []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            with accelerator.autocast():
                out = pipe(batch_size=len(chunk), generator=[torch.Generator().manual_seed(i) for i in chunk],
                           num_inference_steps=steps, eta=eta, output_type=output_type,
                           class_labels=cycling_class_labels(chunk, classes)).images
            images.extend(out.cpu() if output_type == "pt" else out)
    return gather_object(images)


def validation_grid_path(output_dir: str, step: int) -> str:
    """Where validation keeps the grid it drew at `step`."""
    return os.path.join(output_dir, "logs", "samples", f"step-{step:07d}.png")


def draw_validation_grid(accelerator, unet, ema, noise_scheduler, args):
    """The validation grid: DDIM samples from the EMA weights (every rank samples its share and gets the grid)."""
    with ema_weights(accelerator, unet, ema) as model:
        return grid(sample_on_all_ranks(accelerator, model, noise_scheduler, args.num_validation_images,
                                        args.validation_inference_steps, 0.0, "pil"))


def sample_validation_grid(accelerator, unet, ema, noise_scheduler, args, step):
    """The validation grid, saved to logs/samples and to the trackers that take images (TensorBoard, W&B), on rank 0."""
    picture = draw_validation_grid(accelerator, unet, ema, noise_scheduler, args)
    if not accelerator.is_main_process:
        return None
    path = validation_grid_path(args.output_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture.save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_image("validation/samples", np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":  # its log_images takes PIL images; other trackers keep the PNG only
            tracker.log_images({"validation/samples": [picture]}, step=step)
    return picture


def evaluate_fid(accelerator, unet, ema, noise_scheduler, args, step, fid) -> None:
    """--eval_steps: FID of eval_num_samples EMA samples against the cached reference statistics,
    logged as eval/fid and appended to logs/fid.jsonl (rank 0 computes; every rank samples)."""
    start = time.perf_counter()
    with ema_weights(accelerator, unet, ema) as model:
        images = sample_on_all_ranks(accelerator, model, noise_scheduler, args.eval_num_samples,
                                     args.eval_inference_steps, args.eval_eta, "pt")
    if not accelerator.is_main_process:
        return
    value = fid(torch.stack(images).float())
    record = {"step": step, "fid": value, "num_samples": args.eval_num_samples, "steps": args.eval_inference_steps,
              "eta": args.eval_eta, "extractor": "offline", "reference": fid.reference,
              "seconds": round(time.perf_counter() - start, 1)}
    accelerator.log({"eval/fid": value}, step=step)
    with open(os.path.join(args.output_dir, "logs", "fid.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.info(f"step {step}: FID {value:.3f} ({args.eval_num_samples} samples, {args.eval_inference_steps} steps, "
                f"eta {args.eval_eta}, offline features vs {fid.reference})", main_process_only=True)


def check_ranks_in_sync(accelerator, unet, ema) -> None:
    """Weights and EMA must be identical on every rank; a silent divergence would waste the run."""
    model = accelerator.unwrap_model(unet)
    fingerprint = torch.stack([
        sum(p.double().sum() for p in model.parameters()),
        sum(p.double().sum() for p in ema.shadow_params),
    ]).to(accelerator.device)
    everyone = accelerator.gather(fingerprint[None]).reshape(-1, 2)
    if not torch.all(everyone == everyone[0]):
        raise RuntimeError(f"Ranks disagree on the weights or EMA: {everyone.tolist()}")
    logger.info(f"weights and EMA identical on all {accelerator.num_processes} ranks", main_process_only=True)


def hub_repo_id(args) -> str:
    """The repo the model card names and --push_to_hub fills: --hub_model_id, else the output folder's name."""
    return args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))


def export_pipeline(accelerator, unet, ema, noise_scheduler, args, config_record, sample_grid):
    """output_dir/: the EMA pipeline (raw weights as the `non_ema` variant), model card, samples."""
    model = accelerator.unwrap_model(unet)
    names = config_record.get("class_names")  # the pipeline names its classes (id2label) where the data did
    pipe = DDPMCustomPipeline(unet=model, scheduler=noise_scheduler, id2label=dict(enumerate(names)) if names else None)
    pipe.save_pretrained(args.output_dir, variant="non_ema")
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        pipe.save_pretrained(args.output_dir)
    finally:
        ema.restore(model.parameters())
    if sample_grid is not None:
        sample_grid.save(os.path.join(args.output_dir, "samples.png"))
    with open(os.path.join(args.output_dir, "training_config.json"), "w") as f:
        json.dump(config_record, f, indent=2, sort_keys=True, default=str)
    repo_id = hub_repo_id(args)
    dataset = args.dataset_name or (None if args.train_data_dir else data.FASHION_MNIST_HUB)
    # the card's example samples as the grid beside it was drawn (sample_validation_grid: DDIM); at 50 steps
    # ancestral sampling (eta 1) is far worse
    export.write_model_card(args.output_dir, repo_id, config_record, dataset, license=args.license, eta=0.0,
                            steps=args.validation_inference_steps)


def prepare_dataset(args, accelerator, global_batch: int):
    """The training split with its transform set: (dataset, image column, label column or None, number of classes
    or None, channels). Channels follow the model when one is given (--model_config, --pretrained_model)."""
    with accelerator.main_process_first():  # rank 0 downloads / converts first, the others reuse its cache
        dataset = data.load_training_dataset(args.dataset_name, args.train_data_dir, args.dataset_split, args.cache_dir)
    if args.max_train_samples:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    image_column, label_column = data.pick_columns(dataset, args.image_column, args.label_column, args.class_conditional)
    if args.class_conditional:
        dataset = data.labels_as_class_ids(dataset, label_column)
    num_classes = data.num_classes(dataset, label_column) if args.class_conditional else None
    channels = data.image_channels(dataset, image_column)
    if args.model_config:
        with open(args.model_config) as f:
            channels = json.load(f).get("in_channels", channels)
    elif args.pretrained_model:
        channels = pretrained_unet_config(args.pretrained_model).get("in_channels", channels)
    dataset.set_transform(data.make_transform(image_column, label_column, args.resolution, channels))
    if len(dataset) < global_batch:
        raise ValueError(f"The dataset has {len(dataset)} images, fewer than one global batch ({global_batch}): lower --train_batch_size.")
    if len(dataset) < 1000:
        logger.warning(f"Only {len(dataset)} training images: expect memorisation (samples copying the training set).")
    return dataset, image_column, label_column, num_classes, channels


def main(argv=None):
    """Exit status 2 with the message for anything the user can fix (arguments, data, model), not a traceback."""
    try:
        return train(parse_args(argv))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def train(args) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("accelerate.checkpointing", "accelerate.accelerator"):  # one line per saved file otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    checkpoints_dir = os.path.join(args.output_dir, "checkpoints")
    mixed_precision, precision_warning = precision.resolve_mixed_precision(
        args.mixed_precision, precision.runs_on_cpu(), precision.cpu_has_fast_bf16(), precision.configured_mixed_precision())
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    set_seed(args.seed)
    if precision_warning:
        logger.warning(precision_warning, main_process_only=True)

    # ---- data ---------------------------------------------------------------------------------
    global_batch = args.train_batch_size * accelerator.num_processes
    dataset, image_column, label_column, num_classes, channels = prepare_dataset(args, accelerator, global_batch)
    loader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=data.collate,
                        num_workers=args.dataloader_num_workers, drop_last=True)

    # ---- model, diffusion, optimisation -------------------------------------------------------
    unet = build_unet(args, channels, num_classes)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    noise_scheduler = build_noise_scheduler(args)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, min_decay=args.ema_min_decay, use_ema_warmup=True,
                   inv_gamma=args.ema_inv_gamma, power=args.ema_power, foreach=True, model_cls=DDPMCustomUNet, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    ema.to(accelerator.device)

    # counted in optimizer steps on each process (the LR scheduler is stepped by us, once per step)
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_train_steps)
    accelerator.register_for_checkpointing(lr_scheduler, ema)

    size_flags = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions", "dropout")
    config_record = {k: v for k, v in vars(args).items() if k != "hub_token" and not ((args.model_config or args.pretrained_model) and k in size_flags)}
    config_record["unet_config"] = {k: v for k, v in accelerator.unwrap_model(unet).config.items() if not k.startswith("_")}
    config_record.update(num_processes=accelerator.num_processes, global_batch_size=global_batch * args.gradient_accumulation_steps,
                         resolved_max_train_steps=max_train_steps, num_classes=num_classes,
                         class_names=data.class_names(dataset, label_column), image_column=image_column,
                         label_column=label_column, channels=channels, mixed_precision=accelerator.mixed_precision,
                         num_parameters=sum(p.numel() for p in unet.parameters()), train_images=len(dataset))
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "training_config.json"), "w") as f:
            json.dump(config_record, f, indent=2, sort_keys=True, default=str)
        tb_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_record.items()}
        accelerator.init_trackers("ddpm", config=tb_config)
    logger.info("configuration:\n" + json.dumps(config_record, indent=2, sort_keys=True, default=str), main_process_only=True)

    fid = None
    if args.eval_steps and accelerator.is_main_process:
        from training.evaluate import CachedReferenceFID  # torchmetrics is only needed when evaluating

        fid = CachedReferenceFID(os.path.join(args.output_dir, "logs", "fid_reference.pt"), accelerator.device,
                                 args.dataset_name, args.train_data_dir, image_column, args.eval_reference_split)

    # ---- resume ------------------------------------------------------------------------------
    global_step, micro_step, nonfinite_total = 0, 0, 0
    data_reading = checkpoints.data_record(len(dataset), global_batch, len(loader))
    resume_path = checkpoints.resolve_resume(args.resume_from_checkpoint, checkpoints_dir)
    if resume_path:
        state = checkpoints.load_checkpoint(accelerator, resume_path)
        ema.to(accelerator.device)  # accelerate restores custom objects on the CPU
        global_step, nonfinite_total = state["global_step"], state["nonfinite_total"]
        micro_step, moved = checkpoints.resumed_micro_step(state, data_reading)
        if moved:  # another batch size or process count than the checkpoint's
            logger.warning(moved, main_process_only=True)
        # accelerate's gradient-accumulation count (micro-steps into this epoch), the same on every rank: a rank with
        # no saved RNG file of its own (more processes than the checkpoint's run) would restart it at 0 and hang DDP
        accelerator.step = micro_step % len(loader)
        logger.info(f"resumed from {resume_path} at step {global_step}", main_process_only=True)
    elif args.resume_from_checkpoint == "latest":
        logger.info("no checkpoint yet: starting from scratch", main_process_only=True)

    # ---- train -------------------------------------------------------------------------------
    progress = tqdm(total=max_train_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
    sample_grid, step_finite, consecutive_nonfinite = None, True, 0
    window = WindowLog(accelerator, logger, global_batch)
    unet.train()
    first_epoch = micro_step // len(loader)
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        loader.set_epoch(epoch)
        skip = micro_step - epoch * len(loader)
        batches = accelerator.skip_first_batches(loader, skip) if skip > 0 else loader
        for batch in batches:
            torch.manual_seed(step_seed(args.seed, micro_step, accelerator.process_index))
            micro_step += 1
            with accelerator.accumulate(unet):
                x0, noise, timesteps, labels, input_noise = draw_step_inputs(
                    batch["pixel_values"].float(), batch.get("labels"), args, num_classes, scheduler=noise_scheduler)
                if args.rollout_hops > 0:
                    with accelerator.autocast():
                        noise, input_noise = with_rollouts(accelerator.unwrap_model(unet), noise_scheduler, x0, noise,
                                                           input_noise, timesteps, labels, args)
                with accelerator.autocast():
                    loss = training_losses(unet, noise_scheduler, x0, timesteps, noise=noise, class_labels=labels,
                                           snr_gamma=args.snr_gamma, input_noise=input_noise).mean()
                # every rank must take the same branch, or the gradient all-reduce would hang
                bad = accelerator.reduce((~torch.isfinite(loss.detach())).float().reshape(1), "sum").item() > 0
                if bad:
                    step_finite = False
                else:
                    accelerator.backward(loss)
                    window.add_loss(loss.detach())
                if accelerator.sync_gradients:
                    grad_norm = None
                    if step_finite:
                        grad_norm = accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                        optimizer.step()
                        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped it
                            lr_scheduler.step()
                        ema.step(accelerator.unwrap_model(unet).parameters())
                        consecutive_nonfinite = 0
                    else:
                        nonfinite_total += 1
                        consecutive_nonfinite += 1
                        logger.warning(f"non-finite loss at step {global_step}: step skipped ({nonfinite_total} so far)", main_process_only=True)
                        if consecutive_nonfinite >= args.max_nonfinite_steps:
                            raise RuntimeError(
                                f"{consecutive_nonfinite} non-finite losses in a row: lower --learning_rate, use bf16 "
                                "instead of fp16, or resume from an earlier checkpoint."
                            )
                    optimizer.zero_grad(set_to_none=True)
            window.add_images(x0.shape[0] * accelerator.num_processes)
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            step_finite = True
            progress.update(1)
            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                logs = window.emit(global_step, lr_scheduler.get_last_lr()[0], ema.cur_decay_value or 0.0, nonfinite_total,
                                   grad_norm)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}", lr=f"{logs['train/lr']:.2e}",
                                     img_s=f"{logs['train/images_per_second']:.0f}")

            if args.validation_steps and (global_step % args.validation_steps == 0 or global_step == max_train_steps):
                sample_grid = sample_validation_grid(accelerator, unet, ema, noise_scheduler, args, global_step)
            if args.eval_steps and (global_step % args.eval_steps == 0 or global_step == max_train_steps):
                evaluate_fid(accelerator, unet, ema, noise_scheduler, args, global_step, fid)
            if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                check_ranks_in_sync(accelerator, unet, ema)
                state = {"global_step": global_step, "micro_step": micro_step, "nonfinite_total": nonfinite_total,
                         "data": data_reading}
                path = checkpoints.save_checkpoint(accelerator, checkpoints_dir, global_step, state, args.checkpoints_total_limit)
                logger.info(f"saved {path}", main_process_only=True)
                if args.export_at_checkpoints and accelerator.is_main_process:
                    export_pipeline(accelerator, unet, ema, noise_scheduler, args, config_record, sample_grid)
            if global_step >= max_train_steps:
                break
    progress.close()

    # ---- export and push ---------------------------------------------------------------------
    accelerator.wait_for_everyone()
    check_ranks_in_sync(accelerator, unet, ema)
    if accelerator.is_main_process:
        export_pipeline(accelerator, unet, ema, noise_scheduler, args, config_record, sample_grid)
        logger.info(f"pipeline exported to {args.output_dir}")
        if args.push_to_hub:
            repo_id = hub_repo_id(args)
            commit = export.push_folder(args.output_dir, repo_id, private=args.hub_private_repo, token=args.hub_token)
            logger.info(f"pushed to {repo_id}: {commit}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
