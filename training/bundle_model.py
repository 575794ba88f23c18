"""Turn a training run's export into the repository's bundled model: fp16 EMA weights only (a few MB),
configs and code, a sample grid, a denoising GIF, and a model card carrying the evaluation results.

    python -m training.bundle_model outputs/ft-v models/ddpm-fashion-mnist \
        --evaluation benchmarks/results/fid-cpu-10k.json benchmarks/results/fid-cpu-1k.json --eta 0 --steps 50

The folder is assembled beside the target and swapped in at the end, so an interrupted run leaves the
old bundle intact.
"""

import argparse
import json
import os
import shutil

import torch
from huggingface_hub import EvalResult

from pipeline_ddpm_custom import DDPMCustomPipeline
from pipeline_ddpm_custom.labels import cycling_class_labels
from pipeline_ddpm_custom.pictures import DenoisingRecorder, grid
from training import data, export
from training.evaluate import add_guidance_arguments, check_guidance_arguments


def guidance_words(setup: dict) -> str:
    """", classifier-free guidance ..." for a guided evaluation, "" otherwise (files from before guidance was
    recorded were unguided)."""
    guidance = setup.get("guidance_scale", 1.0)
    return f", {export.guidance_description(guidance, setup.get('guidance_interval'))}" if guidance != 1.0 else ""


def floor_kind(evaluation: dict) -> str:
    """A class-balanced train subset is another floor than a random one, and is named so."""
    return "class-balanced " if evaluation["floor"].get("draw") == "class-balanced" else ""


def card_metrics(evaluation: dict) -> dict:
    """The model card's table: one row per evaluated sampler and step count, with the floor beside it."""
    setup = evaluation["setup"]
    where = f"{setup['extractor']} features, {setup['num_samples']} samples vs {setup['reference']}"
    rows = {}
    if "floor" in evaluation:
        rows[f"FID real vs real ({floor_kind(evaluation)}floor; {where})"] = f"{evaluation['floor']['fid']:.2f}"
    for run in evaluation["runs"]:
        shares = run["class_histogram"]
        rows[f"FID {run['sampler']}, {run['steps']} steps{guidance_words(setup)} ({where})"] = (
            f"{run['fid']:.2f} (class shares {min(shares):.1%}..{max(shares):.1%})")
    return rows


# model-index metric types: "fid" is the standard Inception FID that leaderboards compare across models; the
# offline extractor's FIDs (a Fashion-MNIST classifier's features) are another scale and get their own type
METRIC_TYPES = {"inception": "fid", "offline": "fid-offline"}


def card_eval_results(evaluation: dict) -> list:
    """The same FIDs as structured model-index entries (the Hub shows them as the model's evaluation results), each
    named with its sampler, guidance, extractor, sample count and the floor it should be read against, and typed by
    its extractor (METRIC_TYPES)."""
    setup = evaluation["setup"]
    split = setup["reference"].split(" ")[1]  # evaluate writes "fashion-mnist SPLIT (N images)"
    floor = ""
    if "floor" in evaluation:
        floor = f"; {floor_kind(evaluation)}real-vs-real floor {evaluation['floor']['fid']:.2f}"
    return [EvalResult(task_type="unconditional-image-generation", task_name="Image generation",
                       dataset_type=data.FASHION_MNIST_HUB, dataset_name="Fashion-MNIST", dataset_split=split,
                       metric_type=METRIC_TYPES[setup["extractor"]], metric_value=round(run["fid"], 2),
                       metric_name=f"FID, {run['sampler']} {run['steps']} steps{guidance_words(setup)} "
                                   f"({setup['extractor']} features, {setup['num_samples']} samples{floor})")
            for run in evaluation["runs"]]


def write_pictures(pipe, folder: str, eta: float, steps: int, seed: int, guidance_scale: float = 1.0,
                   guidance_interval=None) -> None:
    """samples.png (16 images; classes 0..9 cycling for a class-conditional model) and denoising.gif."""
    classes = pipe.unet.config.num_class_embeds
    recorder = DenoisingRecorder(every=max(1, steps // 25), cols=8)
    images = pipe(batch_size=16, generator=[torch.Generator().manual_seed(seed + i) for i in range(16)],
                  num_inference_steps=steps, eta=eta, class_labels=cycling_class_labels(range(16), classes),
                  guidance_scale=guidance_scale, guidance_interval=guidance_interval,
                  callback_on_step_end=recorder, callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"]).images
    grid(images, cols=8).save(os.path.join(folder, "samples.png"))
    recorder.save_gif(os.path.join(folder, "denoising.gif"), min_side=112)  # 4x: small enough to commit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder exported by training/train_ddpm.py")
    parser.add_argument("target", help="the bundled model's folder (replaced)")
    parser.add_argument("--evaluation", nargs="*", default=[], help="JSON files written by training.evaluate, for the model card")
    parser.add_argument("--eta", type=float, default=0.0, help="the sampler of the pictures and of the card's example")
    parser.add_argument("--steps", type=int, default=50)
    add_guidance_arguments(parser)  # like --eta and --steps: the pictures' sampling and the card's example
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trained-on", default=None, help="hardware and history, recorded in training_config.json")
    parser.add_argument("--card-notes", default=None,
                        help="a Markdown file appended to the model card (kept outside the target, which is replaced)")
    parser.add_argument("--repo-id", default=None, help="the name the card uses (default: the target folder's name)")
    args = parser.parse_args(argv)
    check_guidance_arguments(parser, args)
    notes = None
    if args.card_notes:
        if not os.path.isfile(args.card_notes):
            parser.error(f"--card-notes {args.card_notes}: no such file; pass a Markdown file or leave the option out")
        with open(args.card_notes) as f:
            notes = f.read()

    pipe = DDPMCustomPipeline.from_pretrained(args.source)  # the EMA weights, in float32
    with open(os.path.join(args.source, "training_config.json")) as f:
        config = json.load(f)
    names = data.recorded_class_names(config)
    if pipe.config.id2label is None and names:  # exports from before id2label: name the classes from the record
        pipe = DDPMCustomPipeline(pipe.unet, pipe.scheduler, id2label=dict(enumerate(names)))
    if args.guidance_scale != 1.0 and pipe.unet.config.num_class_embeds is None:
        parser.error(f"--guidance-scale {args.guidance_scale:g}: {args.source} is not class-conditional, so there is "
                     "nothing to guide towards; leave the guidance options out.")
    pipe.set_progress_bar_config(disable=True)
    staging = os.path.abspath(args.target).rstrip("/") + ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    write_pictures(pipe, staging, args.eta, args.steps, args.seed, args.guidance_scale, args.guidance_interval)
    pipe.to(torch.float16).save_pretrained(staging)  # fp16 halves the size; loading upcasts to float32
    if args.trained_on:
        config["trained_on"] = args.trained_on
    with open(os.path.join(staging, "training_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    metrics, eval_results, evaluations = {}, [], []
    for path in args.evaluation:
        with open(path) as f:
            evaluations.append(json.load(f))
        metrics.update(card_metrics(evaluations[-1]))
        eval_results += card_eval_results(evaluations[-1])
    if evaluations:
        with open(os.path.join(staging, "metrics.json"), "w") as f:
            json.dump(evaluations, f, indent=2)
    dataset = config.get("dataset_name") or data.FASHION_MNIST_HUB
    export.write_model_card(staging, args.repo_id or os.path.basename(os.path.normpath(args.target)), config, dataset,
                            metrics=metrics or None, eval_results=eval_results or None, eta=args.eta, notes=notes,
                            steps=args.steps,
                            guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval)
    shutil.rmtree(args.target, ignore_errors=True)
    os.replace(staging, args.target)
    print(f"bundled {args.source} into {args.target}")


if __name__ == "__main__":
    main()
