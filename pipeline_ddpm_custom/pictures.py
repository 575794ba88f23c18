"""Pictures of both processes (seed `show_forward` and the sampling GIF), used by the CLI and the Space.

Grids and GIFs are diffusers' own ``make_image_grid`` / ``export_to_gif``; this module only decides
what goes into them.
"""

import math
from typing import List, Optional, Sequence

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import export_to_gif, make_image_grid
from PIL import Image


def to_pil(images: torch.Tensor) -> List[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> PIL images (grayscale for C = 1)."""
    array = VaeImageProcessor.pt_to_numpy((images.float() / 2 + 0.5).clamp(0, 1))
    return VaeImageProcessor.numpy_to_pil(array)


def to_model_input(image: Image.Image, size: int, channels: int) -> torch.Tensor:
    """A PIL image -> (1, C, size, size) in [-1, 1], as the scheduler's forward process expects."""
    image = image.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array)
    return (tensor[None, None] if channels == 1 else tensor.permute(2, 0, 1)[None]).contiguous()


def enlarge(image: Image.Image, min_side: int = 256) -> Image.Image:
    """Nearest-neighbour upscaling by a whole factor until the shorter side reaches ``min_side``:
    28-pixel samples become viewable without invented detail."""
    factor = max(1, math.ceil(min_side / min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def grid(images: List[Image.Image], cols: Optional[int] = None) -> Image.Image:
    """A near-square grid of equally sized images."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new(images[0].mode, images[0].size)
    return make_image_grid(list(images) + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def forward_process_strip(
    scheduler, x0: torch.Tensor, timesteps: Sequence[int] = (0, 50, 100, 200, 400, 600, 800, 999), seed: int = 0
) -> Image.Image:
    """Seed `show_forward`: one image (1, C, H, W) in [-1, 1] at several noise levels, left to right,
    each x_t ~ q(x_t | x_0) drawn with the same noise."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(list(timesteps))
    noisy = scheduler.add_noise(x0.expand(len(t), -1, -1, -1), noise.expand(len(t), -1, -1, -1), t)
    return make_image_grid(to_pil(noisy), rows=1, cols=len(t))


def signal_to_noise_ratio(scheduler, t: int) -> float:
    """SNR(t) = abar_t / (1 - abar_t) of the forward process."""
    abar = float(scheduler.alphas_cumprod[int(t)])
    return abar / max(1.0 - abar, 1e-20)


class DenoisingRecorder:
    """A ``callback_on_step_end`` that keeps a grid of the current x_0 prediction every ``every`` steps.

    Pass it as ``pipe(..., callback_on_step_end=recorder,
    callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])``; then ``save_gif``.
    """

    def __init__(self, every: int = 1, cols: Optional[int] = None):
        self.every, self.cols, self.frames = max(1, every), cols, []

    def __call__(self, pipe, i, t, tensors):
        last = i == getattr(pipe, "_num_timesteps", i + 1) - 1
        if i % self.every == 0 or last:
            x0 = tensors.get("pred_original_sample")
            x0 = tensors["latents"] if x0 is None else x0  # schedulers without an x0 estimate
            self.frames.append(grid(to_pil(x0), self.cols))
        return {}

    def save_gif(self, path: str, fps: int = 10, hold_last: int = 10, min_side: int = 256) -> str:
        """Write the frames as a GIF (enlarged to ``min_side``), holding the final image for ``hold_last`` frames."""
        if not self.frames:
            raise ValueError("No frames were recorded: pass the recorder as callback_on_step_end.")
        frames = [enlarge(f, min_side) for f in self.frames]
        frames += [frames[-1]] * hold_last
        return export_to_gif(frames, path, fps=fps)
