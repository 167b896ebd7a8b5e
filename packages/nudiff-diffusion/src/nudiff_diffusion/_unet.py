"""The ADM UNet of guided-diffusion (Dhariwal & Nichol 2021), with a pluggable normalisation.

The normalisation layers are built by a ``norm_factory(channels) -> nn.Module`` whose modules
are called as ``norm(x, cond)``; the default is GroupNorm(32) computed in float32 (the guard
against fp16 overflow of guided-diffusion) that ignores ``cond``. A ``cond_norm_factory``
builds those of the middle and decoder residual blocks instead, as semantic diffusion models
(and the Nudiff paper's histology UNet) put SPADE only there: the histology package conditions
the UNet on its structure this way without copying this file.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._config import UNetConfig

__all__ = ["UNet", "GroupNorm32", "timestep_embedding"]

NormFactory = Callable[[int], nn.Module]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups, computed in float32 whatever the autocast dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        if x.device.type == "meta":  # shape and FLOP counting: no autocast there
            return super().forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float()).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of (N,) timesteps, (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _Resample(nn.Module):
    """Nearest up-sampling or stride-2 down-sampling, with or without a 3x3 convolution."""

    def __init__(self, channels: int, up: bool, use_conv: bool) -> None:
        super().__init__()
        self.up = up
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=1 if up else 2, padding=1)
        else:
            self.conv = None
            self.pool = None if up else nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            return self.conv(x) if self.conv is not None else x
        return self.conv(x) if self.conv is not None else self.pool(x)


class ResBlock(nn.Module):
    """Residual block with timestep conditioning (scale-shift norm or addition), optionally
    changing resolution (up/down) and channel count."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        out_channels: int,
        norm: NormFactory,
        *,
        dropout: float,
        scale_shift: bool,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.in_norm = norm(channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample = _Resample(channels, up, use_conv=False) if (up or down) else None
        self.scale_shift = scale_shift
        self.emb = nn.Linear(emb_channels, 2 * out_channels if scale_shift else out_channels)
        self.out_norm = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.in_norm(x, cond))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.in_conv(h)
        e = self.emb(F.silu(emb)).to(h.dtype)[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h, cond) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e, cond)
        h = self.out_conv(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels (guided-diffusion's "new order" QKV split);
    the softmax runs in float32."""

    def __init__(self, channels: int, norm: NormFactory, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x, cond).reshape(b, c, -1))
        q, k, v = qkv.chunk(3, dim=1)
        heads, ch = self.num_heads, c // self.num_heads
        q, k, v = (z.reshape(b * heads, ch, -1) for z in (q, k, v))
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        out = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        return x + self.proj(out).reshape(b, c, *spatial)


class UNet(nn.Module):
    """guided-diffusion's UNetModel (2-D, no class conditioning).

    Parameters
    ----------
    config : UNetConfig
    norm_factory : callable, optional
        ``norm_factory(channels)`` -> a module called as ``norm(x, cond)``; default
        :class:`GroupNorm32`.
    cond_norm_factory : callable, optional
        The same for the normalisations of the middle and decoder residual blocks (semantic
        diffusion models' ``SDMResBlock``); default ``norm_factory``. The encoder's blocks,
        the attention blocks and the output normalisation keep ``norm_factory``.

    ``forward(x, t, cond=None)``: x (N, in_channels, H, W) float, t (N,) int64 timesteps,
    ``cond`` passed to every normalisation layer; returns (N, out_channels, H, W), where
    ``out_channels`` is twice ``in_channels`` with ``learn_sigma``.
    """

    def __init__(
        self, config: UNetConfig, norm_factory: NormFactory | None = None, cond_norm_factory: NormFactory | None = None
    ) -> None:
        super().__init__()
        self.config = config
        norm = norm_factory or GroupNorm32
        cond_norm = cond_norm_factory or norm
        mc = config.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))

        def res(ch_in: int, ch_out: int, block_norm: NormFactory = norm, **kw: bool) -> ResBlock:
            return ResBlock(
                ch_in, emb_ch, ch_out, block_norm, dropout=config.dropout, scale_shift=config.use_scale_shift_norm, **kw
            )

        def attn(ch: int) -> AttentionBlock:
            heads = ch // config.num_head_channels if config.num_head_channels > 0 else config.num_heads
            return AttentionBlock(ch, norm, heads)

        attn_ds = {config.image_size // r for r in config.attention_resolutions}
        self.input_conv = nn.Conv2d(config.in_channels, mc, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, ds = [mc], mc, 1
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                layers = nn.ModuleList([res(ch, mult * mc)])
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(attn(ch))
                self.down.append(layers)
                skips.append(ch)
            if level != len(config.channel_mult) - 1:
                if config.resblock_updown:
                    self.down.append(nn.ModuleList([res(ch, ch, down=True)]))
                else:
                    self.down.append(nn.ModuleList([_Resample(ch, up=False, use_conv=True)]))
                skips.append(ch)
                ds *= 2
        self.middle = nn.ModuleList([res(ch, ch, cond_norm), attn(ch), res(ch, ch, cond_norm)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for i in range(config.num_res_blocks + 1):
                layers = nn.ModuleList([res(ch + skips.pop(), mult * mc, cond_norm)])
                ch = mult * mc
                if ds in attn_ds:
                    layers.append(attn(ch))
                if level and i == config.num_res_blocks:
                    layers.append(
                        res(ch, ch, cond_norm, up=True)
                        if config.resblock_updown
                        else _Resample(ch, up=True, use_conv=True)
                    )
                    ds //= 2
                self.up.append(layers)
        self.out_norm = norm(ch)
        self.out_conv = _zero(nn.Conv2d(ch, config.out_channels, 3, padding=1))

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, cond)
            elif isinstance(layer, AttentionBlock):
                h = layer(h, cond)
            else:
                h = layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects x of shape (N, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet input height and width must be multiples of {factor}, got {tuple(x.shape[2:])}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"`t` must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(self.input_conv.weight.dtype))
        h = self.input_conv(x)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, cond)
            hs.append(h)
        h = self._run(self.middle, h, emb, cond)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb, cond)
        return self.out_conv(F.silu(self.out_norm(h, cond)))
