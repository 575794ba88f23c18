import os
import sys
from pathlib import Path

# Offline by construction: no telemetry, no analytics, no Hub calls (set before anything imports huggingface_hub)
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomScheduler, DDPMCustomUNet  # noqa: E402

# benchmarks/ holds scripts, not a package: put it on the path once so tests import their functions directly
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

TINY_UNET = dict(sample_size=8, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 attention_head_dim=8, norm_num_groups=8)


def tiny_unet(seed: int = 0, **overrides) -> DDPMCustomUNet:
    """A small UNet with random weights everywhere (the zero-initialised output layers too), so
    that its outputs depend on the input, the timestep and the class."""
    torch.manual_seed(seed)
    unet = DDPMCustomUNet(**{**TINY_UNET, **overrides})
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return unet.eval()


def tiny_pipeline(num_train_timesteps: int = 100, **unet_overrides) -> DDPMCustomPipeline:
    pipe = DDPMCustomPipeline(tiny_unet(**unet_overrides), DDPMCustomScheduler(num_train_timesteps=num_train_timesteps))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe():
    return tiny_pipeline()


def public_config(config) -> dict:
    """A config as it reads back from JSON (tuples as lists), without diffusers' private keys."""
    import json

    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))
