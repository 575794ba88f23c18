"""The sampling loop (seed `p_sample_loop` and `sample(start_step, prior)`) as a diffusers pipeline.

Self-contained (imports only torch and diffusers): ``save_pretrained`` copies this file, and the
files of any non-diffusers component, next to the weights in diffusers' remote-code layout, so that
``DiffusionPipeline.from_pretrained(path, trust_remote_code=True)`` loads it without this package.
"""

import inspect
import json
import os
import shutil
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import diffusers
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import deprecate
from diffusers.utils.torch_utils import is_compiled_module, randn_tensor

# components whose classes come from these libraries are loaded from the library, not from copied code
_LIBRARY_MODULES = ("diffusers", "transformers")
# the model-loading options of DiffusionPipeline.from_pretrained that it hands to every model component as they are
_MODEL_LOADING_KEYS = ("variant", "use_safetensors", "low_cpu_mem_usage", "disable_mmap")


def guidance_bounds(guidance_interval) -> tuple:
    """(lowest, highest) timesteps that guidance applies to: the interval as ints, every timestep for None."""
    if guidance_interval is None:
        return 0, float("inf")
    try:
        low, high = (int(t) for t in guidance_interval)
    except (TypeError, ValueError):
        low = high = -1
    if not 0 <= low <= high:
        raise ValueError("guidance_interval must be two timesteps (lowest, highest) with 0 <= lowest <= highest, "
                         f"e.g. (80, 580); got {guidance_interval!r}.")
    return low, high


class DDPMCustomPipeline(DiffusionPipeline):
    """Unconditional or class-conditional image generation with a UNet and a DDPM/DDIM (or any diffusers) scheduler.

    Components: ``unet`` (predicts the scheduler's target from x_t and t), ``scheduler``. ``id2label`` names a
    class-conditional model's classes (as diffusers' DiTPipeline does; saved in model_index.json), so that
    ``class_labels`` may be names and ``get_label_ids`` maps names to ids.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    # diffusers' loader checks the annotations: id2label's keys may be ints or, as model_index.json keeps them, text
    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin, id2label: Optional[Dict[Union[int, str], str]] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        # JSON keeps the ids as text: back to ints, in id order
        id2label = None if id2label is None else {int(i): str(name) for i, name in sorted(id2label.items(), key=lambda kv: int(kv[0]))}
        classes = getattr(unet.config, "num_class_embeds", None) if unet is not None else None
        if id2label and (not classes or not all(0 <= i < classes for i in id2label)):
            raise ValueError(f"id2label names the classes {sorted(id2label)}, but the unet has "
                             f"{classes or 'no'} classes{f' (0..{classes - 1})' if classes else ''}.")
        self.register_to_config(id2label=id2label)
        self.labels = {name: i for i, name in (id2label or {}).items()}  # DiTPipeline's name -> id
        self._guidance_scale, self._num_timesteps, self._interrupt = 1.0, 0, False

    # ---- diffusers' in-loop state: what a step-end callback reads, and may change --------------

    @property
    def guidance_scale(self) -> float:
        """The scale of the step being run; a callback may set ``pipe._guidance_scale`` (diffusers' cutoff callbacks
        set 0): at 1 or below the following steps are unguided."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """Steps the current (or last) call runs."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to stop after that step; the call returns the images the
        latents make at that point (diffusers' convention). Each call starts uninterrupted."""
        return self._interrupt

    def get_label_ids(self, label: Union[str, List[str]]) -> List[int]:
        """The class ids of one name or a list of names (``id2label``'s values), as DiTPipeline's method of that name."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            known = ", ".join(repr(name) for name in self.labels) or "none: this pipeline has no id2label"
            raise ValueError(f"Unknown class names {unknown}; this model's classes are {known}.")
        return [self.labels[name] for name in names]

    # ---- inputs ------------------------------------------------------------------------------

    def _image_processor(self) -> VaeImageProcessor:
        gray = self.unet.config.in_channels == 1
        return VaeImageProcessor(
            vae_scale_factor=1, vae_latent_channels=-1, do_convert_grayscale=gray, do_convert_rgb=not gray
        )

    def _class_labels(self, class_labels, batch_size: int) -> Optional[torch.Tensor]:
        num_classes = getattr(self.unet.config, "num_class_embeds", None)
        if class_labels is None:
            if num_classes:  # a conditional model without labels samples from the unconditional (null) class
                # which trained only on the label-dropped images; said once per process (Python's default filter);
                # stacklevel: the caller of __call__, past torch.no_grad's wrapper
                warnings.warn("No class_labels: sampling this class-conditional model's null class, its unconditional "
                              "model, which is usually far weaker. Pass class_labels (one per image, e.g. "
                              f"[i % {num_classes} for i in range(batch_size)]) for its best samples.", stacklevel=4)
                return torch.full((batch_size,), num_classes, device=self._execution_device, dtype=torch.long)
            return None
        if not num_classes:
            raise ValueError("class_labels were given but this model is unconditional (unet.config.num_class_embeds is None).")
        if isinstance(class_labels, str) or (isinstance(class_labels, (list, tuple)) and any(isinstance(c, str) for c in class_labels)):
            class_labels = self.get_label_ids(class_labels)  # names, as id2label gives them
        labels = torch.as_tensor(class_labels, device=self._execution_device, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"class_labels has {labels.numel()} entries for batch_size={batch_size}: pass one label or one per image.")
        outside = sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))
        if outside:  # named once each: a batch of 16 copies of one wrong label is one mistake
            raise ValueError(f"class_labels must lie in [0, {num_classes - 1}] (this model's classes); got {outside}.")
        return labels

    def check_inputs(self, batch_size, generator, strength, guidance_scale, output_type, callback_inputs):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for batch_size={batch_size}: pass one per image, or a single one.")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1] (0 returns the image, 1 ignores it), got {strength}.")
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1 (1 disables guidance), got {guidance_scale}.")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}.")
        unknown = set(callback_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} unknown; choose from {self._callback_tensor_inputs}.")

    def _model_output(self, latents, t, labels, guidance_scale):
        """The UNet's prediction; with guidance, eps = uncond + s * (cond - uncond) (Ho & Salimans 2022).
        Only the prediction channels are guided; a learned variance comes from the conditional half."""
        model_input = self.scheduler.scale_model_input(latents, t)
        if labels is None or guidance_scale <= 1.0:
            return self.unet(model_input, t, class_labels=labels).sample
        null = torch.full_like(labels, self.unet.config.num_class_embeds)
        both = self.unet(torch.cat([model_input] * 2), t, class_labels=torch.cat([labels, null])).sample
        cond, uncond = both.chunk(2)
        c = latents.shape[1]
        guided = uncond[:, :c] + guidance_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)

    def _set_chain(self, num_inference_steps, timesteps, device):
        """Set the scheduler's timesteps, ``num_inference_steps`` of its own spacing or the caller's list, and
        return the number of steps (what ``strength`` is a fraction of)."""
        if timesteps is None:
            if num_inference_steps is None:
                num_inference_steps = getattr(self.scheduler.config, "num_train_timesteps", 1000)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            return num_inference_steps
        if num_inference_steps is not None:
            raise ValueError("Pass either num_inference_steps or timesteps, not both.")
        if "timesteps" not in inspect.signature(self.scheduler.set_timesteps).parameters:
            raise ValueError(f"{type(self.scheduler).__name__} does not take custom timesteps; pass num_inference_steps, "
                             "or use a scheduler whose set_timesteps accepts timesteps (DDPMCustomScheduler).")
        self.scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
        return len(timesteps)

    # ---- the loop ----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        num_inference_steps: Optional[int] = None,
        timesteps: Optional[List[int]] = None,
        eta: float = 1.0,
        class_labels: Union[int, str, List[int], List[str], torch.Tensor, None] = None,
        guidance_scale: float = 1.0,
        guidance_interval: Optional[Sequence[int]] = None,
        image=None,
        strength: float = 1.0,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Union[Callable[..., Dict], PipelineCallback, MultiPipelineCallbacks, None] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["latents"],
    ) -> Union[ImagePipelineOutput, tuple]:
        """Seed `p_sample_loop`: x_T ~ N(0, I) * init_noise_sigma, then scheduler.step for every timestep.

        num_inference_steps: chain length (default: the scheduler's full training chain).
        timesteps: your own descending chain instead (e.g. denser near t = 0), for schedulers whose
        ``set_timesteps`` takes ``timesteps`` (this one, diffusers' DDPMScheduler).
        eta: 1 = DDPM ancestral, 0 = DDIM (passed to schedulers that take it).
        class_labels, guidance_scale: class conditioning (one label, or one per image; ids, or names where the
        pipeline has ``id2label``) with classifier-free
        guidance (scale > 1). Without labels a class-conditional model samples its null class, its unconditional
        model, which is usually far weaker (a warning says so once).
        guidance_interval: (lowest, highest) timestep: guide only the steps whose t lies in it (inclusive), the
        others taking the conditional prediction alone (Kynkaanniemi et al. 2024, "Applying guidance in a limited
        interval"): guidance at high noise narrows variety, at low noise it is not needed. Default: every step.
        image, strength: seed `sample(start_step, prior)`: noise ``image`` to the step ``strength`` of the way up
        the chain and denoise from there. One image or one per sample (a list, or a batch: (B, H, W, C) arrays,
        (B, C, H, W) tensors); PIL images, uint8 arrays or float arrays in [0, 1]; color images become gray for a
        grayscale model (PIL's luma) and gray ones are repeated for a color model.
        latents: your own starting noise (B, C, H, W). generator: one, or one per image.
        callback_on_step_end(pipe, i, t, tensors) -> dict may replace "latents"; a diffusers ``PipelineCallback`` (or
        ``MultiPipelineCallbacks``) brings its own tensor inputs. A callback may also set ``pipe._interrupt = True`` (stop
        after this step) or ``pipe._guidance_scale`` (the scale from the next step on; 1 or less: unguided).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if image is not None and not isinstance(image, list) and not (hasattr(image, "ndim") and image.ndim == 4):
            image = [image]
        if image is not None and batch_size == 1:  # one sample per image given
            batch_size = len(image)
        self.check_inputs(batch_size, generator, strength, guidance_scale, output_type, callback_on_step_end_tensor_inputs)
        guided_from, guided_to = guidance_bounds(guidance_interval)  # checked here, read at every step
        device = self._execution_device
        dtype = self.unet.dtype
        cfg = self.unet.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        labels = self._class_labels(class_labels, batch_size)

        num_inference_steps = self._set_chain(num_inference_steps, timesteps, device)
        timesteps = self.scheduler.timesteps

        if image is not None:  # start part-way up the chain from a noised image
            image = [_as_unit_floats(i) for i in image] if isinstance(image, list) else _as_unit_floats(image)
            prior = self._image_processor().preprocess(image, height=cfg.sample_size, width=cfg.sample_size)
            prior = _match_channels(prior, cfg.in_channels).to(device=device, dtype=dtype)
            if prior.shape[0] not in (1, batch_size):
                raise ValueError(f"Got {prior.shape[0]} images for batch_size={batch_size}: pass one image or one per sample.")
            prior = prior.expand(batch_size, -1, -1, -1)
            kept = min(int(round(num_inference_steps * strength)), num_inference_steps)
            timesteps = timesteps[(num_inference_steps - kept) * self.scheduler.order :]
            if len(timesteps) == 0:
                latents = prior
            else:
                noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                latents = self.scheduler.add_noise(prior, noise, timesteps[:1].repeat(batch_size))
        elif latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        step_params = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}

        self._num_timesteps, self._guidance_scale, self._interrupt = len(timesteps), guidance_scale, False
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:  # a callback asked to stop (diffusers' convention: the images of the latents so far)
                break
            scale = self._guidance_scale if guided_from <= int(t) <= guided_to else 1.0
            model_output = self._model_output(latents, t, labels, scale)
            out = self.scheduler.step(model_output, t, latents, **step_kwargs)
            latents = out.prev_sample
            if callback_on_step_end is not None:
                available = {"latents": latents, "pred_original_sample": getattr(out, "pred_original_sample", None)}
                tensors = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, i, t, tensors) or {}
                latents = returned.get("latents", latents)

        images = self._image_processor().postprocess(latents.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    # ---- loading with this class (already imported) ------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DDPMCustomPipeline.from_pretrained(dir_or_repo)`` with this package imported.

        The saved folder names its classes as remote code (``["unet_ddpm_custom", "DDPMCustomUNet"]``),
        for which diffusers would demand ``trust_remote_code`` even though the caller already imported
        the classes. Diffusers trusts modules that are already imported; so do we: each component is
        built from the imported class of the same file stem and the copied code is never executed.
        ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)`` takes diffusers' own path.
        Takes what diffusers' path takes for a pipeline of models on one device: the Hub's download options,
        ``dtype`` (or ``torch_dtype``; one dtype or a dict by component), ``variant``, ``use_safetensors``,
        ``low_cpu_mem_usage``, ``disable_mmap`` and components to use instead of the saved ones; anything else is
        refused by name, with where to find it.
        """
        if cls is DiffusionPipeline or kwargs.get("trust_remote_code"):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            from huggingface_hub import snapshot_download
            from huggingface_hub.errors import HFValidationError

            try:
                folder = snapshot_download(folder, **hub_kwargs)
            except HFValidationError:  # its message speaks of repo ids only, where a folder was usually meant
                raise OSError(f"{folder!r} is neither a folder here nor a Hub repo id (user/name): pass a folder saved "
                              "with save_pretrained, or a repo id.") from None
        _check_is_pipeline_folder(folder)
        index = cls.load_config(folder)
        dtype = _requested_dtype(kwargs)
        model_kwargs = {k: kwargs.pop(k) for k in _MODEL_LOADING_KEYS if k in kwargs}
        expected, optional = cls._get_signature_keys(cls)
        components = {name: kwargs.pop(name, index.get(name)) for name in optional}  # id2label, as diffusers reads it
        for name in expected:
            if name in kwargs:
                components[name] = kwargs.pop(name)
                continue
            library, class_name = index[name]
            component_cls = _imported_class(library, class_name, name)
            if issubclass(component_cls, SchedulerMixin):
                components[name] = component_cls.from_pretrained(folder, subfolder=name)
            else:
                components[name] = component_cls.from_pretrained(
                    folder, subfolder=name, dtype=_component_dtype(dtype, name), **model_kwargs
                )
        if kwargs:
            raise TypeError(
                f"{cls.__name__}.from_pretrained does not take {sorted(kwargs)}. It takes the Hub's download options "
                f"({', '.join(hub_keys)}), dtype (or its older name torch_dtype), {', '.join(_MODEL_LOADING_KEYS)} and "
                "components or id2label to use instead of the saved ones (unet=..., scheduler=...). To place the pipeline on a "
                "device, call pipe.to(device) after loading; for the rest of diffusers' loading options (device_map, "
                "quantization_config, ...) load with DiffusionPipeline.from_pretrained(..., trust_remote_code=True)."
            )
        pipe = cls(**components)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' ``from_pipe``: a new pipeline sharing ``pipeline``'s components (and ``id2label``), with those
        given replaced, e.g. ``DDPMCustomPipeline.from_pipe(pipe, scheduler=DDIMScheduler.from_config(...))``.
        diffusers moves a model over only when its class is the one annotated, which this self-contained file cannot
        name (its UNet's code lives in another file), so the UNet is handed over here."""
        if "unet" not in kwargs and isinstance(getattr(pipeline, "unet", None), ModelMixin):
            kwargs["unet"] = pipeline.unet
        return super().from_pipe(pipeline, **kwargs)

    # ---- saving: weights + configs + code in diffusers' remote-code layout -------------------

    def save_config(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs):
        """Write model_index.json so the folder loads with ``DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)``: this class and every non-diffusers component are named as
        ``["<file stem>", "<class>"]`` and their source files are copied beside them.

        ``save_pretrained`` and ``push_to_hub`` both end here, so every saved copy carries its code,
        including copies saved from a pipeline that was itself loaded as remote code.
        """
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index.pop("_name_or_path", None)  # where it came from is not part of what it is
        index["_class_name"] = [_copy_source(type(self), save_directory), type(self).__name__]
        for name in self.components:
            component = getattr(self, name)
            if is_compiled_module(component):  # torch.compile's wrapper: the code is the wrapped model's
                component = component._orig_mod
            if component is None or type(component).__module__.split(".")[0] in _LIBRARY_MODULES:
                continue
            index[name] = [_copy_source(type(component), os.path.join(save_directory, name)), type(component).__name__]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")


# ITU-R 601-2 luma, the weights of PIL's convert("L"), which PIL inputs to a grayscale model already go through
_LUMA = (0.299, 0.587, 0.114)


def _as_unit_floats(image):
    """An array or tensor image as floats in [0, 1]: 8-bit ones (np.array of a PIL image) are divided by 255; floats
    beyond 1 are refused rather than clipped into a white image. PIL images pass as they are."""
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        too_bright = image.is_floating_point() and image.numel() > 0 and float(image.max()) > 1.0 + 1e-3
    elif hasattr(image, "dtype") and hasattr(image, "max"):  # a numpy array
        if image.dtype.name == "uint8":
            return image.astype("float32") / 255.0
        too_bright = image.dtype.kind == "f" and image.size > 0 and float(image.max()) > 1.0 + 1e-3
    else:
        return image
    if too_bright:
        raise ValueError(f"image arrays of floats must lie in [0, 1], got values up to {float(image.max()):g}: divide "
                         "0-255 values by 255, or pass them as uint8 (or a PIL image).")
    return image


def _match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, C, H, W) images with the model's channel count: color ones become their luma for a grayscale model, gray
    ones are repeated for a color model, as PIL inputs are converted; an alpha channel is dropped."""
    have = images.shape[1]
    if have == channels:
        return images
    if channels == 1 and have == 2:  # gray and alpha
        return images[:, :1]
    if channels == 1 and have in (3, 4):
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device)
        return (images[:, :3] * weights[None, :, None, None]).sum(1, keepdim=True)
    if channels == 3 and have in (1, 2, 4):
        return images[:, :1].expand(-1, 3, -1, -1) if have in (1, 2) else images[:, :3]
    raise ValueError(f"images with {have} channels cannot be given to this {channels}-channel model: pass "
                     f"{'grayscale' if channels == 1 else 'RGB'} images (or PIL images, which are converted).")


def _check_is_pipeline_folder(folder: str) -> None:
    """A folder without model_index.json: say what it is instead (a training checkpoint, one component of a pipeline)
    and what to pass, where diffusers would only say the file is missing."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return
    if os.path.isfile(os.path.join(folder, "training_state.json")):
        raise OSError(f"{folder} is a training checkpoint (accelerate's state), not a saved pipeline: export it with "
                      f"`python -m training.export_checkpoint {folder} --out DIR` and load DIR.")
    if os.path.isfile(os.path.join(folder, "config.json")) or os.path.isfile(os.path.join(folder, "scheduler_config.json")):
        raise OSError(f"{folder} holds one component of a pipeline (no model_index.json): pass the folder above it, "
                      "which save_pretrained wrote.")
    raise OSError(f"{folder} has no model_index.json: pass a folder written by save_pretrained (a training run's "
                  "--output_dir, not its checkpoints/ or logs/).")


def _requested_dtype(kwargs: dict):
    """Pop the dtype asked for, read as ``DiffusionPipeline.from_pretrained`` reads it: ``dtype``, or ``torch_dtype``,
    the name diffusers 0.42 deprecates (with diffusers' warning); a torch.dtype, or a dict of them by component
    name with "default" for the components it does not name."""
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError("Pass dtype or torch_dtype, not both: torch_dtype is diffusers' deprecated name for dtype.")
        # diffusers' own warning and removal version; stacklevel 4: the caller of from_pretrained
        deprecate("torch_dtype", "1.0.0", "Please use `dtype` instead.", stacklevel=4)
        dtype = torch_dtype
    values = dtype.values() if isinstance(dtype, dict) else [] if dtype is None else [dtype]
    if not all(isinstance(value, torch.dtype) for value in values):
        raise ValueError(f"dtype must be a torch.dtype (e.g. torch.float16) or a dict of them by component name "
                         f"(e.g. {{'unet': torch.float16}}, 'default' for the rest); got {dtype!r}.")
    return dtype


def _component_dtype(dtype, component: str):
    """One component's dtype: diffusers' rule for a dict is its entry, else its "default", else float32."""
    if isinstance(dtype, dict):
        return dtype.get(component, dtype.get("default", torch.float32))
    return dtype


def _imported_class(library: str, class_name: str, component: str):
    """The class ``class_name`` from diffusers or from an already-imported module named ``library``
    (``<stem>``, the remote-code form, or a full module path ending in it)."""
    if library in _LIBRARY_MODULES:
        return getattr(sys.modules.get(library) or diffusers, class_name)
    for module_name, module in list(sys.modules.items()):
        if module_name == library or module_name.endswith("." + library):
            found = getattr(module, class_name, None)
            if found is not None:
                return found
    raise ValueError(
        f"The {component} is {class_name} from {library}.py, which is not imported in this process: import the "
        "package that defines it, or load with DiffusionPipeline.from_pretrained(..., trust_remote_code=True) "
        "to run the copy saved with the model."
    )


def _copy_source(cls, folder: str) -> str:
    """Copy the file that defines ``cls`` into ``folder``; returns its stem (the remote-code module name)."""
    source = inspect.getsourcefile(cls)
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, os.path.basename(source))
    if os.path.abspath(source) != os.path.abspath(target):
        shutil.copyfile(source, target)
    return os.path.splitext(os.path.basename(source))[0]
