"""What the demo does, without any Gradio: load the pipeline, check requests, sample with live
previews, show the forward process, image-to-image. The UI in app.py only wires these up."""

import os
import queue
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from PIL import Image, UnidentifiedImageError

from pipeline_ddpm_custom import DDPMCustomPipeline, DDPMCustomScheduler
from pipeline_ddpm_custom.pipeline_ddpm_custom import guidance_bounds
from pipeline_ddpm_custom.labels import requested_labels
from pipeline_ddpm_custom.solvers import solver_from_config
from pipeline_ddpm_custom.pictures import DenoisingRecorder, enlarge, signal_to_noise_ratio, to_model_input, to_pil

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_MODEL = os.path.join(os.path.dirname(HERE), "models", "ddpm-fashion-mnist")

SAMPLERS = {  # label -> (scheduler factory from the model's scheduler config, eta)
    "DDIM (deterministic)": (lambda cfg: DDPMCustomScheduler.from_config(cfg), 0.0),
    "DDPM (ancestral)": (lambda cfg: DDPMCustomScheduler.from_config(cfg), 1.0),
    # diffusers' solvers ignore eta; the SDE one gave the bundled model's best unguided FID at 50 steps (README)
    "DPM-Solver++ (multistep)": (lambda cfg: solver_from_config("dpmsolver++", cfg), 0.0),
    "SDE-DPM-Solver++ (multistep)": (lambda cfg: solver_from_config("sde-dpmsolver++", cfg), 0.0),
}
MAX_IMAGES, MAX_STEPS = 16, 1000
MAX_UPLOAD_PIXELS = 4096 * 4096
WORKER_THREAD_NAME = "ddpm-generate"  # the thread each generation runs in (tests look for it)
ACCEPTED_MODES = ("1", "L", "P", "LA", "RGB", "RGBA", "I", "I;16", "F")
# the guidance that measured best for the bundled model: scale 1.2 only at t = 80..580 of its 1000 timesteps (README,
# "Samplers at 50 steps"); the interval is kept as shares of T so that a model with another T gets the same stretch
BEST_GUIDANCE_SCALE, BEST_GUIDANCE_SHARES = 1.2, (0.08, 0.58)


def best_guidance_interval(num_train_timesteps: int) -> Tuple[int, int]:
    """The measured-best guidance interval (lowest, highest timestep) for a model with this many timesteps."""
    low, high = BEST_GUIDANCE_SHARES
    return round(low * num_train_timesteps), round(high * num_train_timesteps)


class RequestError(ValueError):
    """A request the demo cannot serve; the message says what to change (shown as gr.Error)."""


def load_pipeline(model_id: Optional[str] = None) -> DDPMCustomPipeline:
    """MODEL_ID (a Hub repo id or a folder), else the bundled Fashion-MNIST pipeline; on GPU when there is one."""
    model_id = model_id or os.environ.get("MODEL_ID") or BUNDLED_MODEL
    pipe = DDPMCustomPipeline.from_pretrained(model_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class GenerateRequest:
    num_images: int = 16
    sampler: str = "DDPM (ancestral)"
    steps: int = 50
    eta: Optional[float] = None  # None: the sampler's own (0 for DDIM, 1 for DDPM)
    seed: int = 0
    class_label: Optional[int] = None  # None: every class in turn (a class-conditional model)
    null_class: bool = False  # the null class instead: the unconditional model, far weaker (labels.py)
    guidance_scale: float = 1.0
    guidance_interval: Optional[Tuple[int, int]] = None  # (lowest, highest) t guided; None: every step
    image: Optional[Image.Image] = None  # image to image: every sample starts from this image noised to `strength`
    strength: float = 1.0

    def check(self, pipe: DDPMCustomPipeline) -> None:
        T = pipe.scheduler.config.num_train_timesteps
        if self.image is not None and not 0.0 <= float(self.strength) <= 1.0:
            raise RequestError(f"Strength must be between 0 and 1; got {self.strength}.")
        if not 1 <= int(self.num_images) <= MAX_IMAGES:
            raise RequestError(f"Number of images must be between 1 and {MAX_IMAGES}; got {self.num_images}.")
        if self.sampler not in SAMPLERS:
            raise RequestError(f"Unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
        if not 1 <= int(self.steps) <= min(T, MAX_STEPS):
            raise RequestError(f"Steps must be between 1 and {min(T, MAX_STEPS)}; got {self.steps}.")
        if self.eta is not None and not 0.0 <= float(self.eta) <= 1.0:
            raise RequestError(f"eta must be between 0 (DDIM) and 1 (DDPM); got {self.eta}.")
        if not 0 <= int(self.seed) < 2**63:
            raise RequestError(f"Seed must be a non-negative integer; got {self.seed}.")
        classes = pipe.unet.config.num_class_embeds
        if (self.class_label is not None or self.null_class) and not classes:
            raise RequestError("This model is unconditional: leave the class empty.")
        if self.null_class and self.class_label is not None:
            raise RequestError("Choose one class or the null class, not both.")
        if self.null_class and float(self.guidance_scale) != 1.0:
            raise RequestError("The null class has no class to guide towards: set the guidance scale to 1, or choose a class.")
        if self.class_label is not None and not 0 <= int(self.class_label) < classes:
            raise RequestError(f"Class must be between 0 and {classes - 1}; got {self.class_label}.")
        if not 1.0 <= float(self.guidance_scale) <= 20.0:
            raise RequestError(f"Guidance scale must be between 1 and 20; got {self.guidance_scale}.")
        if self.guidance_interval is not None:
            try:  # the pipeline's check, and the model's last timestep, which the pipeline does not ask for
                within = guidance_bounds(self.guidance_interval)[1] < T
            except ValueError:
                within = False
            if not within:
                raise RequestError(f"The guidance interval must run from a lowest to a highest timestep within 0..{T - 1}, "
                                   f"lowest first; got {self.guidance_interval}.")


def pipeline_for(pipe: DDPMCustomPipeline, sampler: str) -> DDPMCustomPipeline:
    """A pipeline sharing the weights with its own scheduler: concurrent requests never share state."""
    make, _ = SAMPLERS[sampler]
    request_pipe = DDPMCustomPipeline(unet=pipe.unet, scheduler=make(pipe.scheduler.config))
    request_pipe.set_progress_bar_config(disable=True)
    return request_pipe


def generate_stream(pipe: DDPMCustomPipeline, request: GenerateRequest, preview_every: int = 1,
                    animate: bool = True) -> Iterator[dict]:
    """Yields {"step", "total", "preview"} while denoising (preview: grid of the current x0 prediction),
    then {"images", "gif", "labels", "seeds"} at the end (gif: a file, None unless `animate`; labels: each image's
    class, None for the null class or an unconditional model; seeds: each image's seed, request.seed + i). With
    request.image it is image to image, the same stream with the chain starting part-way up. The pipeline runs in a
    worker thread; previews come through a queue. Closing the generator early (Gradio does when the visitor presses
    Stop or leaves) interrupts the pipeline at its next step, so an abandoned request stops taking the CPU that the
    queue has already given to the next one."""
    request.check(pipe)
    request_pipe = pipeline_for(pipe, request.sampler)
    eta = SAMPLERS[request.sampler][1] if request.eta is None else float(request.eta)
    recorder = DenoisingRecorder(every=max(1, int(request.steps) // 25))
    updates: "queue.Queue" = queue.Queue()
    result: dict = {}
    abandoned = threading.Event()

    def on_step(p, i, t, tensors):
        if abandoned.is_set():
            p._interrupt = True  # diffusers' way to end the loop after this step
            return {}
        recorder(p, i, t, tensors)
        if i % preview_every == 0 or i == p.num_timesteps - 1:
            updates.put({"step": i + 1, "total": p.num_timesteps, "preview": recorder.frames[-1]})
        return {}

    def work():
        try:
            n = int(request.num_images)
            labels = result["labels"] = requested_labels(n, pipe.unet.config.num_class_embeds, request.class_label,
                                                         request.null_class)
            seeds = result["seeds"] = [int(request.seed) + i for i in range(n)]
            result["images"] = request_pipe(
                batch_size=n,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                num_inference_steps=int(request.steps), eta=eta, class_labels=labels,
                guidance_scale=float(request.guidance_scale), guidance_interval=request.guidance_interval,
                **({} if request.image is None else {"image": request.image, "strength": float(request.strength)}),
                callback_on_step_end=on_step,
                callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
            ).images
        except Exception as error:  # surfaced in the caller's thread
            result["error"] = error
        finally:
            updates.put(None)

    thread = threading.Thread(target=work, daemon=True, name=WORKER_THREAD_NAME)
    thread.start()
    try:
        while (update := updates.get()) is not None:
            yield update
    finally:  # also on close() at a yield: nobody reads on, so the worker stops
        abandoned.set()
    thread.join()
    if "error" in result:
        raise result["error"]
    gif = None
    if animate:  # a file Gradio serves to the page; image to image shows none
        gif = tempfile.NamedTemporaryFile(suffix=".gif", delete=False).name
        recorder.save_gif(gif, fps=12)
    yield {"images": result["images"], "gif": gif, "labels": result["labels"], "seeds": result["seeds"]}


def check_upload(image) -> Image.Image:
    """An uploaded image as PIL, or a RequestError saying what is wrong with it."""
    if image is None:
        raise RequestError("Upload an image (or pick an example) first.")
    if isinstance(image, str):
        try:
            image = Image.open(image)
            image.load()
        except (UnidentifiedImageError, OSError):
            raise RequestError("That file is not an image Pillow can read: upload a PNG or JPEG.")
    if image.width * image.height > MAX_UPLOAD_PIXELS:
        raise RequestError(f"The image is {image.width}x{image.height}; upload one of at most 4096x4096 pixels.")
    if image.mode not in ACCEPTED_MODES:
        raise RequestError(f"The image has {len(image.getbands())} channels ({image.mode}); upload a grayscale or RGB image.")
    return image


def forward_process(pipe: DDPMCustomPipeline, image, t: int, seed: int = 0):
    """q(x_t | x_0) for one image at timestep t: (x_t as PIL, SNR(t), sqrt(abar_t))."""
    image = check_upload(image)
    scheduler = pipe.scheduler
    T = scheduler.config.num_train_timesteps
    if not 0 <= int(t) < T:
        raise RequestError(f"t must lie between 0 and {T - 1}; got {t}.")
    cfg = pipe.unet.config
    x0 = to_model_input(image, cfg.sample_size, cfg.in_channels)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed)))
    x_t = DDPMCustomScheduler.from_config(scheduler.config).add_noise(x0, noise, torch.tensor([int(t)]))
    snr = signal_to_noise_ratio(DDPMCustomScheduler.from_config(scheduler.config), int(t))
    return enlarge(to_pil(x_t)[0], 224), snr


def image_to_image_request(pipe: DDPMCustomPipeline, image, strength: float, steps: int, seed: int,
                           sampler: str = "DDIM (deterministic)", class_label: Optional[int] = None) -> GenerateRequest:
    """The seed notes' sample(start_step, prior) as a request for generate_stream (so it streams and stops as a
    generation does): noise the image to `strength` and denoise from there, towards `class_label` for a
    class-conditional model (None: its null class, for an image whose class is unknown)."""
    image = check_upload(image)
    mode = "L" if pipe.unet.config.in_channels == 1 else "RGB"
    request = GenerateRequest(num_images=1, sampler=sampler, steps=steps, seed=seed, class_label=class_label,
                              null_class=class_label is None and bool(pipe.unet.config.num_class_embeds),
                              image=image.convert(mode), strength=strength)
    request.check(pipe)
    return request


def upscale(images: List[Image.Image], size: int = 112) -> List[Image.Image]:
    """Small samples shown at a viewable size (nearest neighbour: no invented detail)."""
    return [enlarge(im, size) for im in images]
