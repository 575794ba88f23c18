"""Post-hoc weight averaging: a pipeline whose UNet weights are the mean of several saved pipelines' (a stand-in
for a longer EMA, or a "model soup" of fine-tunes from the same start), to be evaluated like any other.

    python benchmarks/average_weights.py /tmp/averaged models/ddpm-fashion-mnist outputs/ft3-plain
    python -m training.evaluate --model /tmp/averaged --num-samples 2000 --steps 50 --eta 0 --out averaged.json

Each source is a pipeline folder (its default weights: the EMA weights of a training export); all must share one
UNet config. The result takes the first source's scheduler, is averaged and saved in float32 and loads all three ways.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomUNet  # noqa: E402

def architecture(unet: DDPMCustomUNet) -> dict:
    """The UNet's config without diffusers' private keys (its class, version and source folder)."""
    return {k: v for k, v in unet.config.items() if not k.startswith("_")}


def average_state_dicts(unets: list) -> dict:
    """The float32 mean of the UNets' parameters and buffers, which must share one architecture."""
    first = architecture(unets[0])
    for i, unet in enumerate(unets[1:], start=1):
        other = architecture(unet)
        differing = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
        if differing:
            raise ValueError(f"source {i + 1} is a different UNet from source 1 (config keys {differing} differ): "
                             "only models with one architecture can be averaged.")
    states = [unet.state_dict() for unet in unets]
    return {key: sum(state[key].float() for state in states) / len(states) for key in states[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="the averaged pipeline's folder (written; must not be a source)")
    parser.add_argument("sources", nargs="+", help="two or more pipeline folders")
    args = parser.parse_args(argv)
    if len(args.sources) < 2:
        parser.error("give at least two sources to average")
    if any(os.path.abspath(s) == os.path.abspath(args.target) for s in args.sources):
        parser.error("the target folder is one of the sources: pick a new folder")
    pipes = [DDPMCustomPipeline.from_pretrained(source) for source in args.sources]
    try:
        averaged = average_state_dicts([pipe.unet for pipe in pipes])
    except ValueError as error:
        parser.error(str(error))
    result = pipes[0]
    result.unet.to(torch.float32).load_state_dict(averaged)
    result.save_pretrained(args.target)
    print(f"averaged {len(args.sources)} UNets into {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
