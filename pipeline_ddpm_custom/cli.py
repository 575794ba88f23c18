"""Command line: ``python -m pipeline_ddpm_custom generate --model DIR_OR_REPO --out grid.png``."""

import argparse
import os
import sys

import torch
from tqdm.auto import tqdm

from .labels import null_class_on_purpose, requested_labels
from .solvers import SOLVERS, check_eta_applies, solver_from_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline_ddpm_custom", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="sample a grid of images (and optionally a denoising GIF)")
    gen.add_argument("--model", required=True, help="a folder saved with save_pretrained, or a Hub repo id")
    gen.add_argument("--num-images", type=int, default=16)
    gen.add_argument("--batch-size", type=int, default=64,
                     help="images sampled at once (memory); the images do not depend on it. With several batches the "
                          "GIF shows the first")
    gen.add_argument("--steps", type=int, default=50, help="inference steps (respaced chain)")
    gen.add_argument("--eta", type=float, default=None,
                     help="the model's own scheduler: 0 = DDIM (deterministic, the default: at 50 steps far better than "
                          "1 = DDPM ancestral, which wants 250 steps or more); 0.5 lies between (better than both at 50 "
                          "for earlier weights, not for the bundled ones)")
    gen.add_argument("--scheduler", default="model", choices=["model", *SOLVERS],
                     help="model: the model's own scheduler (DDIM/DDPM by --eta); or one of diffusers' multistep solvers "
                          "(sde-dpmsolver++ gave the bundled model's best unguided FID at 50 steps; guided DDIM, "
                          "--guidance-scale 1.2 --guidance-interval 80 580, the best guided one)")
    gen.add_argument("--seed", type=int, default=0,
                     help="image i is drawn from seed SEED + i, as in the Space, training.evaluate and the model cards: "
                          "an image is the same whatever the number of images around it")
    which = gen.add_mutually_exclusive_group()
    which.add_argument("--class-label", default=None,
                       help="one class for every image of a class-conditional model, by id or by name where the model "
                            "names its classes (id2label; e.g. Dress for the bundled one) (default: every class in turn)")
    which.add_argument("--null-class", action="store_true",
                       help="sample a class-conditional model's null class, its unconditional model (far weaker: "
                            "pipeline_ddpm_custom/labels.py)")
    gen.add_argument("--guidance-scale", type=float, default=1.0)
    gen.add_argument("--guidance-interval", type=int, nargs=2, default=None, metavar=("LOWEST", "HIGHEST"),
                     help="guide only the steps whose timestep lies in [LOWEST, HIGHEST] (e.g. 80 580: the bundled "
                          "model's FID fell with guidance 1.2 there, rose with it everywhere)")
    gen.add_argument("--out", default="grid.png", help="where to write the image grid (PNG)")
    gen.add_argument("--gif", default=None, help="also write the denoising of the x0 predictions as a GIF")
    gen.add_argument("--save-images", default=None, metavar="DIR",
                     help="also write each image as DIR/NNNNN.png (image i, from seed SEED + i), for tools that read folders")
    gen.add_argument("--device", default=None, help="cpu, cuda, mps (default: cuda when available)")
    return parser


def class_labels(args, classes):
    """The labels of the request: the class asked for, the null class (None), or every class in turn; refused where
    the model has no classes or the null class is asked to be guided."""
    if not classes and (args.class_label is not None or args.null_class):
        raise ValueError("this model is unconditional: drop --class-label / --null-class.")
    if args.null_class and args.guidance_scale != 1.0:
        raise ValueError("--null-class has no class to guide towards: drop --guidance-scale or name a --class-label.")
    if args.guidance_interval is not None and args.guidance_scale == 1.0:
        raise ValueError("--guidance-interval says where to guide, but --guidance-scale is 1 (no guidance): give both.")
    return requested_labels(args.num_images, classes, args.class_label, args.null_class)


def generate(args) -> int:
    from .pictures import DenoisingRecorder, grid
    from .pipeline_ddpm_custom import DDPMCustomPipeline

    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be at least 1.")
    check_eta_applies(args.scheduler, args.eta is not None)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DDPMCustomPipeline.from_pretrained(args.model).to(device)
    if args.scheduler != "model":
        pipe.scheduler = solver_from_config(args.scheduler, pipe.scheduler.config)
    if args.class_label is not None:  # an id, or a name the pipeline knows (its error lists the names)
        by_id = args.class_label.lstrip("-").isdigit()
        args.class_label = int(args.class_label) if by_id else pipe.get_label_ids(args.class_label)[0]
    labels = class_labels(args, pipe.unet.config.num_class_embeds)
    recorder = DenoisingRecorder(every=max(1, args.steps // 25)) if args.gif else None
    starts = range(0, args.num_images, args.batch_size)
    if len(starts) > 1:  # one bar over the batches instead of one per batch
        pipe.set_progress_bar_config(disable=True)
    images = []
    for start in tqdm(starts, desc="batches", disable=len(starts) == 1):
        chunk = range(start, min(start + args.batch_size, args.num_images))  # image i: seed + i, label i, any batching
        with null_class_on_purpose():  # the CLI samples it only when --null-class asks for it
            images += pipe(
                batch_size=len(chunk),
                generator=[torch.Generator(device="cpu").manual_seed(args.seed + i) for i in chunk],
                num_inference_steps=args.steps,
                eta=args.eta or 0.0,  # None (not given) is DDIM; the solvers take no eta
                class_labels=None if labels is None else labels[chunk.start:chunk.stop],
                guidance_scale=args.guidance_scale,
                guidance_interval=args.guidance_interval,
                callback_on_step_end=recorder if start == 0 else None,
                callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
            ).images
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid(images).save(args.out)
    print(f"wrote {len(images)} images to {args.out}")
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(args.save_images, f"{i:05d}.png"))
        print(f"wrote each image to {args.save_images}")
    if recorder is not None:
        recorder.save_gif(args.gif)
        print(f"wrote the denoising GIF to {args.gif}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": generate}[args.command](args)
    except (ValueError, OSError) as error:  # bad model path, bad arguments: say what, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
