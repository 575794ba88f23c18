"""DDPM / DDIM noise scheduler (Ho et al. 2020; Song et al. 2021) as a diffusers scheduler.

One class covers both samplers: ``step(..., eta=1)`` is the DDPM ancestral step, ``eta=0`` is
deterministic DDIM, values in between interpolate as in the DDIM paper (eq. 16). With fewer
inference steps than training steps the chain is *respaced* (improved-diffusion): the betas of
the shorter chain are recomputed from alphas_cumprod at the kept timesteps.

Seed-note names and where they live here:
  q_sample                  -> ``add_noise``              x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps   (Ho eq. 4)
  _extract                  -> ``_extract``               gather per-timestep coefficients, broadcast
  predict_start_from_noise  -> ``predict_start_from_noise`` x_0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
  q_posterior               -> ``q_posterior``            mean/variance of q(x_{t-1} | x_t, x_0) (Ho eq. 6-7)
  p_mean_variance, p_sample -> ``step``

This file is self-contained (imports only torch, numpy and diffusers) because it is copied next to
saved weights and loaded as remote code by ``DiffusionPipeline.from_pretrained(trust_remote_code=True)``.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class DDPMCustomSchedulerOutput(BaseOutput):
    """Output of ``DDPMCustomScheduler.step``.

    prev_sample: x_{t_prev}, shape (B, C, H, W): the next model input of the denoising loop.
    pred_original_sample: the model's estimate of x_0, shape (B, C, H, W) (previews, GIFs).
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """The training betas in float64, one per timestep."""
    T = num_train_timesteps
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if schedule == "scaled_linear":  # linear in sqrt(beta), as latent-diffusion uses
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if schedule == "squaredcos_cap_v2":  # cosine schedule, Nichol & Dhariwal 2021 eq. 17
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])
    if schedule == "sigmoid":  # GeoDiff
        s = 1.0 / (1.0 + np.exp(-np.linspace(-6, 6, T, dtype=np.float64)))
        return s * (beta_end - beta_start) + beta_start
    raise ValueError(f"Unknown beta_schedule {schedule!r}: pass one of {', '.join(BETA_SCHEDULES)}, or trained_betas.")


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_bar = sqrt_ab**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


class DDPMCustomScheduler(SchedulerMixin, ConfigMixin):
    """DDPM ancestral sampling and DDIM in one scheduler, drop-in wherever diffusers expects one.

    The config is the constructor; names and defaults follow diffusers' ``DDPMScheduler`` so configs
    move between the two with ``from_config``. All tables are float64 and are applied in the
    sample's dtype, promoted to at least float32, so half-precision inputs lose nothing.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        for name, value, allowed in (
            ("variance_type", variance_type, VARIANCE_TYPES),
            ("prediction_type", prediction_type, PREDICTION_TYPES),
            ("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}: pass one of {', '.join(allowed)}.")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")

        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float64)
            if betas.shape != (num_train_timesteps,):
                raise ValueError(
                    f"trained_betas has shape {betas.shape}; pass one beta per training step ({num_train_timesteps},)."
                )
        else:
            betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("Every beta must lie in (0, 1]; check beta_start, beta_end or trained_betas.")

        self.betas = torch.from_numpy(betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.init_noise_sigma = 1.0
        self._device_tables = {}
        self.set_timesteps(num_train_timesteps)
        self.num_inference_steps = None  # None: the full training chain (as diffusers reports it)

    # ---- timesteps ---------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[List[int]] = None,
    ):
        """Choose the inference chain: ``num_inference_steps`` spaced per ``timestep_spacing``, or
        explicit descending ``timesteps``. The chain's betas are respaced (see ``respaced_betas``)."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Pass either num_inference_steps or timesteps, not both.")
        if timesteps is not None:
            steps = np.asarray([int(t) for t in timesteps], dtype=np.int64)
            if len(steps) == 0 or np.any(steps[1:] >= steps[:-1]):
                raise ValueError("timesteps must be a non-empty, strictly descending list.")
            if steps[0] >= T or steps[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {T - 1}]; got {steps[0]} .. {steps[-1]}.")
        else:
            n = T if num_inference_steps is None else int(num_inference_steps)
            if not 1 <= n <= T:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} is out of range: pass 1 to {T} "
                    "(the scheduler's num_train_timesteps)."
                )
            steps = self._spaced_timesteps(n)
        self.num_inference_steps = len(steps)
        self.timesteps = torch.from_numpy(steps).to(device)
        # previous timestep of each kept step; -1 means "x_0" (alpha_cumprod = 1)
        self._prev_of = dict(zip(steps.tolist(), steps[1:].tolist() + [-1]))

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        T, spacing = self.config.num_train_timesteps, self.config.timestep_spacing
        if spacing == "linspace":
            steps = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "leading":
            steps = (np.arange(0, n) * (T // n)).round()[::-1] + self.config.steps_offset
        else:  # trailing
            steps = np.round(np.arange(T, 0, -T / n)) - 1
        steps = np.clip(steps.astype(np.int64), 0, T - 1)
        # rounding can repeat a step when n is close to T: keep each once (still descending)
        return np.unique(steps)[::-1].copy()

    def previous_timestep(self, timestep: Union[int, torch.Tensor]) -> int:
        """The timestep the chain goes to from ``timestep`` (-1 after the last step)."""
        t = self._check_timestep(timestep)
        if t not in self._prev_of:
            raise ValueError(
                f"timestep {t} is not in this scheduler's chain; step through scheduler.timesteps "
                "(call set_timesteps first) or pass it in set_timesteps(timesteps=[...])."
            )
        return self._prev_of[t]

    def respaced_betas(self) -> torch.Tensor:
        """Betas of the current chain, ascending in time: 1 - abar(t_i) / abar(t_{i-1}) (improved-diffusion)."""
        kept = self.timesteps.cpu().flip(0)
        abar = self.alphas_cumprod[kept]
        prev = torch.cat([torch.ones(1, dtype=abar.dtype), abar[:-1]])
        return 1.0 - abar / prev

    def __len__(self):
        return self.config.num_train_timesteps

    def _check_timestep(self, timestep) -> int:
        t = int(timestep.item() if torch.is_tensor(timestep) else timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep {t} is out of range [0, {self.config.num_train_timesteps - 1}].")
        return t

    # ---- forward process ---------------------------------------------------------------------

    def _extract(self, table: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Seed `_extract`: table[timesteps], shaped (B, 1, 1, ...) to broadcast against ``like``,
        in ``like``'s dtype promoted to at least float32."""
        timesteps = torch.as_tensor(timesteps, device=like.device).long().reshape(-1)
        if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() >= len(table)):
            raise ValueError(f"timesteps must lie in [0, {len(table) - 1}]; got {timesteps.tolist()}.")
        values = self._on_device(table, like.device)[timesteps]
        dtype = torch.promote_types(like.dtype, torch.float32)
        return values.to(dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def _on_device(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        # cache each float64 table once per device (MPS has no float64: float32 there)
        key = (id(table), str(device))
        if key not in self._device_tables:
            dtype = torch.float32 if torch.device(device).type == "mps" else torch.float64
            self._device_tables[key] = table.to(device=device, dtype=dtype)
        return self._device_tables[key]

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Seed `q_sample` (Ho eq. 4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.

        Shapes: x_0 and noise (B, C, H, W), timesteps (B,) or scalar. Returns x_t in x_0's dtype;
        the sum is formed in float32 or wider so fp16 inputs still get noise at t = 0.
        """
        sqrt_ab = self._extract(self.alphas_cumprod.sqrt(), timesteps, original_samples)
        sqrt_1mab = self._extract((1 - self.alphas_cumprod).sqrt(), timesteps, original_samples)
        return (sqrt_ab * original_samples + sqrt_1mab * noise).to(original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022), the v-prediction target."""
        sqrt_ab = self._extract(self.alphas_cumprod.sqrt(), timesteps, sample)
        sqrt_1mab = self._extract((1 - self.alphas_cumprod).sqrt(), timesteps, sample)
        return (sqrt_ab * noise - sqrt_1mab * sample).to(sample.dtype)

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """DDPM needs no input scaling; present so pipelines can treat every scheduler alike."""
        return sample

    # ---- reverse process ---------------------------------------------------------------------

    def predict_start_from_noise(self, sample: torch.Tensor, timestep: int, noise: torch.Tensor) -> torch.Tensor:
        """Seed `predict_start_from_noise`: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = float(self.alphas_cumprod[self._check_timestep(timestep)])
        return (sample - math.sqrt(1 - abar) * noise) / math.sqrt(abar)

    def q_posterior(self, x0: torch.Tensor, sample: torch.Tensor, timestep: int) -> Tuple[torch.Tensor, float]:
        """Seed `q_posterior` (Ho eq. 6-7) on the current chain: mean and variance of q(x_prev | x_t, x_0)."""
        t = self._check_timestep(timestep)
        abar_t, abar_prev, beta_t = self._chain_coefficients(t)
        mean = (math.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + (
            math.sqrt(1 - beta_t) * (1 - abar_prev) / (1 - abar_t)
        ) * sample
        variance = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)
        return mean, variance

    def _chain_coefficients(self, t: int) -> Tuple[float, float, float]:
        """abar_t, abar_prev and the respaced beta_t = 1 - abar_t / abar_prev, as Python floats (float64)."""
        prev = self.previous_timestep(t)
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
        return abar_t, abar_prev, 1.0 - abar_t / abar_prev

    def _predict_x0_and_eps(self, model_output, sample, abar_t):
        a, s = math.sqrt(abar_t), math.sqrt(1 - abar_t)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - s * model_output) / a, model_output
        if kind == "sample":
            return model_output, (sample - a * model_output) / s
        x0 = a * sample - s * model_output  # v_prediction
        return x0, s * sample + a * model_output

    def _clip_or_threshold(self, x0: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return self._threshold_sample(x0)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            return x0.clamp(-r, r)
        return x0

    def _threshold_sample(self, x0: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Imagen, Saharia et al. 2022): clamp to the per-sample quantile s of |x0|, divide by s."""
        flat = x0.reshape(x0.shape[0], -1).float()
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (flat.clamp(-s, s) / s).reshape(x0.shape).to(x0.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        eta: float = 1.0,
        return_dict: bool = True,
        variance_noise: Optional[torch.Tensor] = None,
    ) -> Union[DDPMCustomSchedulerOutput, Tuple]:
        """Seeds `p_mean_variance` + `p_sample`: one reverse step x_t -> x_prev on the current chain.

        model_output: (B, C, H, W), or (B, 2C, H, W) with variance_type "learned_range" (second half:
        the interpolation value v in [-1, 1] of improved-diffusion eq. 15). sample: x_t, (B, C, H, W).
        eta=1: DDPM ancestral step with the posterior variance per ``variance_type``.
        eta=0: deterministic DDIM. 0 < eta < 1: DDIM eq. 12 with sigma = eta * sqrt(posterior variance).
        Noise is drawn with diffusers' ``randn_tensor`` (sample shape and dtype), so seeds carry over
        from DDPMScheduler / DDIMScheduler; no noise is added on the last step of the chain.
        variance_noise: this step's standard normal noise instead of drawing it (DDIMScheduler's argument, which
        methods that recover a chain's noise, such as edit-friendly DDPM inversion, replay); not with a generator.
        """
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass generator or variance_noise, not both: variance_noise is the noise the generator would draw.")
        if variance_noise is not None and tuple(variance_noise.shape) != tuple(sample.shape):
            raise ValueError(f"variance_noise must have the sample's shape {tuple(sample.shape)}, got {tuple(variance_noise.shape)}.")
        t = self._check_timestep(timestep)
        channels = sample.shape[1]
        predicted_variance = None
        if self.config.variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"variance_type='learned_range' needs a model output with 2x the sample's channels "
                    f"({2 * channels}), got {model_output.shape[1]}: build the UNet with learned_variance=True, "
                    "or use variance_type='fixed_small'."
                )
            model_output, predicted_variance = model_output.split(channels, dim=1)
        elif model_output.shape[1] != channels:
            raise ValueError(
                f"model_output has {model_output.shape[1]} channels but the sample has {channels}; "
                "a model with learned variance needs variance_type='learned_range'."
            )
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0: DDIM, 1: DDPM), got {eta}.")

        out_dtype = sample.dtype
        dtype = torch.promote_types(out_dtype, torch.float32)
        model_output, sample = model_output.to(dtype), sample.to(dtype)
        abar_t, abar_prev, beta_t = self._chain_coefficients(t)
        is_last = self.previous_timestep(t) < 0

        x0, eps = self._predict_x0_and_eps(model_output, sample, abar_t)
        x0 = self._clip_or_threshold(x0)
        posterior_var = max((1 - abar_prev) / (1 - abar_t) * beta_t, 1e-20)

        if eta == 1.0:  # DDPM: posterior mean (Ho eq. 7) + noise of the chosen variance
            mean, _ = self.q_posterior(x0, sample, t)
            if self.config.variance_type == "fixed_small":
                std = math.sqrt(posterior_var)
            elif self.config.variance_type == "fixed_large":
                std = math.sqrt(beta_t)
            else:  # learned_range: log-variance between log(posterior var) and log(beta), improved-diffusion eq. 15
                frac = (predicted_variance.to(dtype) + 1) / 2
                std = torch.exp(0.5 * (frac * math.log(beta_t) + (1 - frac) * math.log(posterior_var)))
        else:  # DDIM eq. 12, direction from the eps consistent with the (clipped) x0, as improved-diffusion
            if self.config.clip_sample or self.config.thresholding:
                eps = (sample - math.sqrt(abar_t) * x0) / math.sqrt(1 - abar_t)
            std = eta * math.sqrt(posterior_var)
            mean = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - std**2, 0.0)) * eps

        prev_sample = mean
        if not is_last and eta > 0:
            noise = variance_noise if variance_noise is not None else randn_tensor(
                sample.shape, generator=generator, device=sample.device, dtype=out_dtype)
            prev_sample = mean + std * noise.to(device=sample.device, dtype=dtype)

        prev_sample, x0 = prev_sample.to(out_dtype), x0.to(out_dtype)
        if not return_dict:
            return (prev_sample, x0)
        return DDPMCustomSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
