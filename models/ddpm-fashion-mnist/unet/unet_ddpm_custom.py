"""The noise predictor of the seed notes: a UNet with sinusoidal time embeddings, residual blocks,
self-attention at chosen resolutions and concatenated skip connections (Ho et al. 2020, Appendix B;
improved-diffusion's layout).

Read top to bottom: SinusoidalPositionEmbeddings -> ResidualBlock -> SelfAttention -> DDPMCustomUNet.
Self-contained (imports only torch and diffusers): it is copied next to saved weights and loaded as
remote code.
"""

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn


# whether torch.compile is tracing the call (torch 2.3 on; before it, never): looked up once, not at every forward
_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)


class SinusoidalPositionEmbeddings(nn.Module):
    """Seed `SinusoidalPositionEmbeddings`: timestep t (B,) -> (B, dim), [sin(t w_k), cos(t w_k)],
    w_k = 10000^(-k / (dim/2)) as in the Transformer (Vaswani et al. 2017, section 3.5)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the time embedding width must be even, got {dim}.")
        half = dim // 2
        self.register_buffer(
            "frequencies", torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half), persistent=False
        )

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        angles = timesteps.float()[:, None] * self.frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    groups = math.gcd(groups, channels)  # the largest group count <= groups that divides the width
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResidualBlock(nn.Module):
    """Seed `ResidualBlock`: GroupNorm, SiLU, conv; + time embedding; GroupNorm, SiLU, dropout, conv;
    plus the input (through a 1x1 conv when the widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as the identity: stabler early training
        nn.init.zeros_(self.conv2.bias)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class SelfAttention(nn.Module):
    """Seed `SelfAttention`: multi-head self-attention over the H*W positions, with a residual.
    Uses torch's scaled_dot_product_attention (flash / memory-efficient kernels where available)."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.num_heads = max(1, channels // head_dim)
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        # (B, heads, head_dim, HW) -> (B, heads, HW, head_dim) as SDPA expects
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, temb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DDPMCustomUNet(ModelMixin, ConfigMixin):
    """Seed `UNet`: eps_theta(x_t, t [, class]) -> (B, out_channels, H, W).

    Levels: one per entry of ``channel_mult`` (width ``base_channels * mult``), each with
    ``num_res_blocks`` residual blocks, halving the resolution between levels; self-attention after
    the residual blocks of every level whose feature-map size is in ``attention_resolutions``;
    a middle of ResidualBlock-SelfAttention-ResidualBlock; an up path that concatenates the skips.
    ``num_class_embeds`` adds a class embedding with one extra learned *null* class (index
    ``num_class_embeds``) for classifier-free guidance. ``learned_variance`` doubles the output
    channels (eps and the variance interpolation of improved-diffusion).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 28,
        in_channels: int = 1,
        out_channels: Optional[int] = None,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (14,),
        attention_head_dim: int = 32,
        dropout: float = 0.0,
        time_embed_dim: Optional[int] = None,
        num_class_embeds: Optional[int] = None,
        learned_variance: bool = False,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        levels = len(channel_mult)
        if levels < 1 or num_res_blocks < 1:
            raise ValueError("channel_mult needs at least one level and num_res_blocks at least 1.")
        factor = 2 ** (levels - 1)
        if sample_size % factor:
            raise ValueError(
                f"sample_size={sample_size} cannot be halved {levels - 1} times ({len(channel_mult)} levels): "
                f"use a multiple of {factor}, or fewer entries in channel_mult."
            )
        resolutions = [sample_size // 2**i for i in range(levels)]
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ValueError(f"attention_resolutions {unknown} are not feature-map sizes of this UNet; pick from {resolutions}.")
        out_channels = out_channels or in_channels
        temb = time_embed_dim or 4 * base_channels
        groups = norm_num_groups
        self.gradient_checkpointing = False

        self.time_sinusoid = SinusoidalPositionEmbeddings(base_channels)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.class_embedding = nn.Embedding(num_class_embeds + 1, temb) if num_class_embeds else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def res_attn(cin, cout, resolution):
            block = [ResidualBlock(cin, cout, temb, dropout, groups)]
            if resolution in attention_resolutions:
                block.append(SelfAttention(cout, attention_head_dim, groups))
            return nn.ModuleList(block)

        # down path: remember each output's width for the matching skip on the way up
        self.down_blocks = nn.ModuleList()
        skip_channels, ch = [base_channels], base_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down_blocks.append(res_attn(ch, base_channels * mult, resolutions[level]))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level < levels - 1:
                self.down_blocks.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)

        self.mid_block = nn.ModuleList(
            [ResidualBlock(ch, ch, temb, dropout, groups), SelfAttention(ch, attention_head_dim, groups),
             ResidualBlock(ch, ch, temb, dropout, groups)]
        )

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up_blocks.append(res_attn(ch + skip_channels.pop(), base_channels * mult, resolutions[level]))
                ch = base_channels * mult
            if level > 0:
                self.up_blocks[-1].append(Upsample(ch))

        self.norm_out = group_norm(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels * (2 if learned_variance else 1), 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def null_class_label(self) -> Optional[int]:
        """The class index meaning "no class" (classifier-free guidance), or None for an unconditional model."""
        return self.config.num_class_embeds

    def _run(self, layer: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(layer, h, temb)
        return layer(h, temb)

    def _timesteps_for_batch(self, timestep, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"timestep must be a number, a 0-d tensor or a 1-d tensor of length {batch}; got shape {tuple(t.shape)}.")
        return t.reshape(-1).expand(batch)

    def _check_inputs(self, sample: torch.Tensor, class_labels) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"expected a sample of shape (batch, {cfg.in_channels}, height, width), got {tuple(sample.shape)}: "
                f"this UNet was built for {cfg.in_channels}-channel images."
            )
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(
                f"height and width must be multiples of {factor} for {len(cfg.channel_mult)} levels; got {tuple(sample.shape[2:])}."
            )
        if self.class_embedding is None and class_labels is not None:
            raise ValueError("class_labels were given to an unconditional UNet (num_class_embeds=None); drop them.")
        if self.class_embedding is not None and class_labels is None:
            raise ValueError(
                f"this UNet is class-conditional: pass class_labels (0..{cfg.num_class_embeds - 1}, "
                f"or {cfg.num_class_embeds} for 'no class')."
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DOutput, tuple]:
        """sample: x_t (B, in_channels, H, W); timestep: number, 0-d or (B,) tensor; class_labels: (B,) ints.
        Returns ``UNet2DOutput(sample=(B, out_channels[*2], H, W))``."""
        self._check_inputs(sample, class_labels)
        t = self._timesteps_for_batch(timestep, sample.shape[0], sample.device)
        # the sinusoid is formed in float32 (t up to 1000 loses digits in fp16), the MLP runs in the model's dtype
        temb = self.time_mlp(self.time_sinusoid(t).to(self.time_mlp[0].weight.dtype))
        if self.class_embedding is not None:
            labels = torch.as_tensor(class_labels, device=sample.device).reshape(-1).expand(sample.shape[0])
            # a check that reads the labels' values: eager only, where it costs nothing; under torch.compile it would
            # split the graph (fullgraph=True fails), and there the embedding's own index check remains
            if not _compiling() and (labels.min() < 0 or labels.max() > self.config.num_class_embeds):
                raise ValueError(f"class_labels must lie in [0, {self.config.num_class_embeds}]; got {labels.tolist()}.")
            temb = temb + self.class_embedding(labels)
        temb = F.silu(temb)  # every consumer (time_proj in each block) takes SiLU(temb)

        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            for layer in block:
                h = self._run(layer, h, temb)
            skips.append(h)
        for layer in self.mid_block:
            h = self._run(layer, h, temb)
        for block in self.up_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            for layer in block:
                h = self._run(layer, h, temb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
