"""The histology model: nudiff-diffusion's ADM UNet with SPADE normalisation, and a
modulation cache that computes the structure's scales and shifts once per batch.

SPADE (Park et al. 2019, as used by semantic diffusion models and the Nudiff paper): a
GroupNorm without affine parameters, then ``x * (1 + gamma) + beta`` where ``gamma`` and
``beta`` are predicted from the structure, resized (nearest) to the layer's resolution, by
``conv3x3 -> ReLU -> conv3x3``. As in the Nudiff paper's code (semantic diffusion models'
``SDMResBlock``), the normalisations of the middle and decoder residual blocks are SPADE
layers, while the encoder, the attention blocks and the output keep GroupNorm: the encoder
sees the noisy image alone. The timestep scale-shift of the residual blocks applies on top,
unchanged. (Models trained before 2026-12-03 have SPADE in every normalisation, ``spade_layers
= "all"`` in their config, and load as they were trained.) A layer's modulation
is kept as the scale ``1 + gamma`` and the shift ``beta``, so that a cached modulation costs
every later step one multiplication and one addition, not two additions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from nudiff_diffusion import (
    ENGINE_SUFFIXES,
    PRECISIONS,
    TorchDenoiser,
    UNet,
    UNetConfig,
    check_runtime_options,
    load_denoiser,
    load_model,
    read_config,
)
from nudiff_postproc import PATCH_GEOMETRY, PatchGeometry
from torch import nn

__all__ = [
    "HistoPreset",
    "PRESETS",
    "SpadeNorm",
    "ModulationCache",
    "build_histo_unet",
    "histo_settings",
    "load_histo_model",
    "HistoDenoiser",
    "load_histo_denoiser",
]

COND_CHANNELS = 3  # the structure: [fg, h, v] (fg in {0, 1}; {-1, 1} before 2026-12-03)
#: where the SPADE layers sit: "decoder" (the middle and decoder residual blocks, as the
#: paper's code) or "all" (every normalisation, the models trained before 2026-12-03)
SPADE_LAYERS = ("decoder", "all")


@dataclass(frozen=True)
class HistoPreset:
    """A histology preset: the patch geometry (shared with the structure model), the
    nudiff-diffusion UNet preset and the hidden width of each SPADE layer's MLP."""

    geometry: PatchGeometry
    unet: str
    spade_hidden: int

    @property
    def image_size(self) -> int:
        return self.geometry.image_size


PRESETS: dict[str, HistoPreset] = {
    "tiny-64": HistoPreset(PATCH_GEOMETRY["tiny-64"], "tiny-64", spade_hidden=32),
    "small-128": HistoPreset(PATCH_GEOMETRY["small-128"], "small-128", spade_hidden=64),
    # the paper's UNet flags; 128 hidden channels as semantic diffusion models' SPADE
    "paper-256": HistoPreset(PATCH_GEOMETRY["paper-256"], "paper-256", spade_hidden=128),
}


class ModulationCache:
    """SPADE scales (``1 + gamma``) and shifts (``beta``) of one batch of structures, filled
    on the first UNet call and reused by every later call (every sampling step).

    Parameters
    ----------
    cond : (N, 3, H, W) float tensor
        The structures (for guidance: the conditional half and the zero half together).
    """

    def __init__(self, cond: torch.Tensor) -> None:
        if cond.ndim != 4 or cond.shape[1] != COND_CHANNELS:
            raise ValueError(f"`cond` must be (N, {COND_CHANNELS}, H, W) structures, got {tuple(cond.shape)}")
        self.cond: torch.Tensor | None = cond
        self._entries: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: list[tuple[SpadeNorm, tuple[int, int]]] = []  # in the order of first use

    @classmethod
    def filled(cls, modulations: list[tuple[SpadeNorm, torch.Tensor, torch.Tensor]]) -> ModulationCache:
        """A cache holding given ``(layer, scale, shift)`` modulations (what
        :meth:`SpadeNorm.modulation` returns) and no structures (the inputs of an exported
        per-step graph)."""
        cache = cls.__new__(cls)
        cache.cond = None
        cache._entries = {id(norm): (scale, shift) for norm, scale, shift in modulations}
        cache.layers = [(norm, (scale.shape[-2], scale.shape[-1])) for norm, scale, _ in modulations]
        return cache

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, norm: SpadeNorm, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        key = id(norm)
        if key not in self._entries:
            if self.cond is None:
                raise ValueError("this modulation cache was filled from outside and holds no entry for a SPADE layer")
            self._entries[key] = norm.modulation(self.cond, size)
            self.layers.append((norm, size))
        return self._entries[key]


class SpadeNorm(nn.Module):
    """GroupNorm(32, affine=False) in float32, then ``* (1 + gamma) + beta`` from the structure.

    ``forward(x, cond)``: x (N, C, h, w); cond (N, 3, H, W) structures, or a
    :class:`ModulationCache` of them.
    """

    def __init__(self, channels: int, hidden: int, cond_channels: int = COND_CHANNELS) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def modulation(self, cond: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 + gamma, beta)``, each (N, C, *size), of structures ``cond`` at resolution
        ``size``: the scale and the shift of the normalised input."""
        dtype = self.shared[0].weight.dtype
        c = F.interpolate(cond.to(dtype), size=tuple(size), mode="nearest")
        hidden = self.shared(c)
        return 1 + self.gamma(hidden), self.beta(hidden)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | ModulationCache | None) -> torch.Tensor:
        if cond is None:
            raise ValueError("a SPADE layer needs the structure `cond` (zeros for no condition)")
        size = (x.shape[-2], x.shape[-1])
        scale, shift = cond.get(self, size) if isinstance(cond, ModulationCache) else self.modulation(cond, size)
        if scale.shape[0] != x.shape[0]:
            raise ValueError(f"{scale.shape[0]} structures for a batch of {x.shape[0]}")
        if x.device.type == "meta":  # shape and FLOP counting: no autocast there
            normalized = self.norm(x)
        else:
            with torch.autocast(device_type=x.device.type, enabled=False):
                normalized = self.norm(x.float()).to(x.dtype)
        return normalized * scale.to(x.dtype) + shift.to(x.dtype)


def _spade_norms(hidden: int, layers: str) -> dict[str, Any]:
    """The norm factories of :class:`UNet` for SPADE layers of width ``hidden`` at ``layers``."""
    if layers not in SPADE_LAYERS:
        raise ValueError(f"`spade_layers` must be one of {SPADE_LAYERS}, got {layers!r}")
    key = "cond_norm_factory" if layers == "decoder" else "norm_factory"
    return {key: lambda ch: SpadeNorm(ch, hidden)}


def build_histo_unet(preset: str, *, spade_layers: str = "decoder", **overrides: Any) -> UNet:
    """A fresh histology UNet of ``preset`` (RGB in, eps and learned variance out, SPADE in
    the middle and decoder residual blocks; ``spade_layers="all"``: in every normalisation,
    as nudiff's models before 2026-12-03). ``overrides`` change UNet flags (e.g.
    ``model_channels`` for tests) or ``spade_hidden``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown histology preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    hidden = int(overrides.pop("spade_hidden", p.spade_hidden))
    config = UNetConfig.preset(p.unet, **{"image_size": p.image_size, "in_channels": 3, **overrides})
    return UNet(config, **_spade_norms(hidden, spade_layers))


def histo_settings(preset: str, model: UNet, cond_foreground: str = "binary") -> dict[str, Any]:
    """The ``diffusion`` entry of a histology checkpoint's ``config.json``
    (``cond_foreground``: how its conditions encode the foreground, see
    ``nudiff_histo.COND_FOREGROUNDS``)."""
    p = PRESETS[preset]
    spade = next(m for m in model.modules() if isinstance(m, SpadeNorm))
    return {
        "spade_layers": "all" if isinstance(model.out_norm, SpadeNorm) else "decoder",
        "kind": "histo",
        "schedule": "linear",
        "num_timesteps": 1000,
        "histo_preset": preset,
        "geometry": asdict(p.geometry),
        "spade_hidden": spade.shared[0].out_channels,
        "cond_channels": COND_CHANNELS,
        "null_cond": "zeros",
        "cond_foreground": cond_foreground,
    }


def read_histo_settings(directory: str | os.PathLike[str]) -> dict:
    """The ``diffusion`` settings of a histology checkpoint's ``config.json``; another
    kind of checkpoint (a structure model) is refused by name."""
    settings = read_config(directory).get("diffusion", {})
    if settings.get("kind") != "histo":
        raise ValueError(
            f"'{directory}' is not a histology checkpoint (its config.json has diffusion.kind="
            f"{settings.get('kind')!r}, expected 'histo'); a structure model cannot paint images"
        )
    return settings


def load_histo_model(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> UNet:
    """Rebuild a histology UNet from a checkpoint directory (no flags) and load its weights."""
    settings = read_histo_settings(directory)
    hidden = settings.get("spade_hidden")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(
            f"'{Path(directory) / 'config.json'}': diffusion.spade_hidden must be a positive integer (the SPADE "
            f"layers' width), got {hidden!r}"
        )
    layers = settings.get("spade_layers", "all")  # recorded since 2026-12-03; SPADE was everywhere before
    if layers not in SPADE_LAYERS:
        raise ValueError(
            f"'{Path(directory) / 'config.json'}': diffusion.spade_layers must be one of {SPADE_LAYERS}, got {layers!r}"
        )
    return load_model(directory, **_spade_norms(hidden, layers), device=device)


class HistoDenoiser(TorchDenoiser):
    """A histology UNet in PyTorch as a runtime: ``eps(x, t, cond)`` with ``cond`` the
    structures or what :meth:`prepare` made of them; no gradients.

    Parameters
    ----------
    model : UNet
        A SPADE UNet (:func:`build_histo_unet` / :func:`load_histo_model`).
    config : dict, optional
        The checkpoint's ``config.json``.
    cache : bool
        Whether :meth:`prepare` builds a :class:`ModulationCache` (else every call
        recomputes the SPADE modulation, as the paper's code does).
    dtype : torch.dtype, optional
        Autocast dtype (e.g. ``torch.bfloat16``); None runs in float32.
    compile, cuda_graphs : bool
        As in ``nudiff_diffusion.TorchDenoiser`` (GPU options); a CUDA graph captures the
        step with the prepared modulations of a run, which :meth:`prepare` computes outside it.
    channels_last : bool
        As in ``nudiff_diffusion.TorchDenoiser`` (the histology UNet ran 14% faster so on
        this project's CPU at small-128, 22% at tiny-64); :func:`load_histo_denoiser` turns
        it on for the CPU.
    """

    def __init__(
        self,
        model: UNet,
        config: dict[str, Any] | None = None,
        *,
        cache: bool = True,
        dtype: torch.dtype | None = None,
        compile: bool = False,
        cuda_graphs: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            model, config, dtype=dtype, compile=compile, cuda_graphs=cuda_graphs, channels_last=channels_last
        )
        self.cache = cache

    def prepare(self, cond: torch.Tensor) -> torch.Tensor | ModulationCache:
        """The condition argument for a run of calls on the same structures."""
        cond = cond.to(self.device)
        return ModulationCache(cond) if self.cache else cond


def load_histo_denoiser(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    cuda_graphs: bool = False,
) -> Any:
    """The runtime for a histology checkpoint directory (PyTorch, with the modulation cache,
    channels-last on the CPU; ``precision``, ``compile`` and ``cuda_graphs`` as in
    ``nudiff_diffusion.load_denoiser``),
    an exported ``*.onnx`` graph of one (ONNX Runtime; a ``--cached-modulation`` export runs
    in :class:`OnnxModulatedDenoiser`) or a TensorRT engine (``*.plan`` / ``*.engine``;
    without TensorRT or a GPU: ``EngineUnavailableError`` with the install message)."""
    path = Path(path)
    check_runtime_options(path, precision=precision, compile=compile, cuda_graphs=cuda_graphs)
    if path.suffix.lower() == ".onnx" or path.suffix.lower() in ENGINE_SUFFIXES:
        if path.suffix.lower() == ".onnx" and path.is_file():
            from nudiff_diffusion import providers_for, read_graph_config
            from nudiff_diffusion._onnx import require_unet_graph

            config = read_graph_config(path)
            require_unet_graph(path, config)  # not a HoVer-Net graph
            if config.get("layout") == "modulated":
                from ._export import OnnxModulatedDenoiser

                return OnnxModulatedDenoiser(path, providers=providers_for(device))
        runtime = load_denoiser(path, device=device, cuda_graphs=cuda_graphs)
        kind = runtime.config.get("diffusion", {}).get("kind")
        if kind != "histo":
            raise ValueError(f"'{path}' is a graph of a {kind or 'structure'!r} model, not of a histology model")
        return runtime
    model = load_histo_model(path, device=device)
    return HistoDenoiser(
        model,
        read_config(path),
        dtype=PRECISIONS[precision],
        compile=compile,
        cuda_graphs=cuda_graphs,
        channels_last=next(model.parameters()).device.type == "cpu",
    )
