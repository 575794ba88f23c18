"""A training checkpoint as a pipeline: ``python -m training.export_checkpoint OUTPUT_DIR/checkpoints/checkpoint-N --out DIR``.

Writes the folder training would have exported had it stopped at that step (EMA weights, the raw ones as the
``non_ema`` variant, class names, model card, sample grid, training configuration), for sampling, evaluating or
publishing a checkpoint of a run that is still going or went past its best step. A checkpoint holds accelerate's
state (the raw weights, the optimizer, the EMA as a pickled state dict); the run's ``training_config.json`` beside
``checkpoints/`` says what model and noise schedule they belong to. The grid is the one validation drew at that
step, or one drawn the way validation draws it.
"""

import argparse
import json
import os
import sys

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from pipeline_ddpm_custom import DDPMCustomUNet  # noqa: E402
from training import checkpoints, export  # noqa: E402
from training.train_ddpm import (  # noqa: E402
    build_noise_scheduler, draw_validation_grid, export_pipeline, hub_repo_id, validation_grid_path)

MODEL_FILE = "model.safetensors"  # accelerate's save_state name for the one prepared model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a checkpoint-N folder written by training/train_ddpm.py")
    p.add_argument("--out", required=True, help="the folder to write the pipeline to (made if missing)")
    p.add_argument("--training_config", default=None,
                   help="the run's training_config.json (default: the one in the folder above checkpoints/)")
    p.add_argument("--push_to_hub", action="store_true", help="upload the exported files to --hub_model_id")
    p.add_argument("--hub_model_id", default=None,
                   help="user/name: the repo the card names and --push_to_hub fills (default: the run's, else the --out folder's name)")
    p.add_argument("--hub_private_repo", action="store_true")
    p.add_argument("--hub_token", default=None)
    return p.parse_args(argv)


def run_folder(checkpoint: str) -> str:
    """The training run's --output_dir: the folder above checkpoints/."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def read_run_record(checkpoint: str, training_config=None) -> dict:
    """The run's configuration record (train_ddpm.py writes it at the start of every run, resumes included)."""
    path = training_config or os.path.join(run_folder(checkpoint), "training_config.json")
    if not os.path.isfile(path):
        raise ValueError(f"No training configuration at {path}: pass the run's training_config.json with --training_config.")
    with open(path) as f:
        record = json.load(f)
    if "unet_config" not in record:
        raise ValueError(f"{path} has no unet_config: it is not the record of a training/train_ddpm.py run.")
    return record


def load_ema_state(checkpoint: str) -> dict:
    """The EMA's state dict among the checkpoint's custom objects (the one holding shadow parameters)."""
    for name in sorted(os.listdir(checkpoint)):
        if name.startswith("custom_checkpoint_") and name.endswith(".pkl"):
            state = torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=False)
            if isinstance(state, dict) and "shadow_params" in state:
                return state
    raise ValueError(f"{checkpoint} holds no EMA state (custom_checkpoint_*.pkl with shadow_params).")


def export_checkpoint(checkpoint: str, out: str, training_config=None, hub_model_id=None) -> str:
    """Write the pipeline of ``checkpoint`` to ``out``; returns the repo id its card names: ``hub_model_id``, else the
    run's, else the folder's name (training's rule)."""
    if not os.path.isfile(os.path.join(checkpoint, checkpoints.STATE_FILE)):
        raise ValueError(f"{checkpoint} is not a complete checkpoint (no {checkpoints.STATE_FILE}): pass a checkpoint-N "
                         "folder from OUTPUT_DIR/checkpoints.")
    record = read_run_record(checkpoint, training_config)
    step = checkpoints.load_state_file(checkpoint)["global_step"]
    args = argparse.Namespace(**{**record, "output_dir": out, "hub_model_id": hub_model_id or record.get("hub_model_id")})

    unet = DDPMCustomUNet(**record["unet_config"])
    unet.load_state_dict(load_file(os.path.join(checkpoint, MODEL_FILE)))
    ema = EMAModel(unet.parameters(), model_cls=DDPMCustomUNet, model_config=unet.config)
    ema.load_state_dict(load_ema_state(checkpoint))
    noise_scheduler = build_noise_scheduler(args)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())

    drawn = validation_grid_path(run_folder(checkpoint), step)
    if os.path.isfile(drawn):  # validation's grid of this very step
        sample_grid = Image.open(drawn)
        sample_grid.load()
    else:
        unet.to(accelerator.device)
        ema.to(accelerator.device)
        sample_grid = draw_validation_grid(accelerator, unet, ema, noise_scheduler, args)
    os.makedirs(out, exist_ok=True)
    export_pipeline(accelerator, unet, ema, noise_scheduler, args, record, sample_grid)
    return hub_repo_id(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        repo_id = export_checkpoint(args.checkpoint, args.out, args.training_config, args.hub_model_id)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pipeline of {args.checkpoint} written to {args.out}")
    if args.push_to_hub:  # the repo its card names
        commit = export.push_folder(args.out, repo_id, private=args.hub_private_repo, token=args.hub_token,
                                    commit_message=f"Upload {os.path.basename(os.path.normpath(args.checkpoint))}")
        print(f"pushed to {repo_id}: {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
