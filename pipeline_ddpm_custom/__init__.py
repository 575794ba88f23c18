"""DDPM (Ho et al. 2020) for diffusers: scheduler, UNet and pipeline that ``from_pretrained`` loads."""

from .pipeline_ddpm_custom import DDPMCustomPipeline
from .scheduling_ddpm_custom import DDPMCustomScheduler, DDPMCustomSchedulerOutput
from .unet_ddpm_custom import DDPMCustomUNet

__all__ = ["DDPMCustomPipeline", "DDPMCustomScheduler", "DDPMCustomSchedulerOutput", "DDPMCustomUNet"]
__version__ = "0.1.0"
