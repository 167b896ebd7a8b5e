"""The histology model as two ONNX graphs, the way :class:`HistoDenoiser` runs it: structures
-> SPADE modulations (once per batch), and ``(x, t, modulations) -> eps`` (every step), with
the ONNX Runtime runtime that feeds the first graph's outputs to the second.

Export and checks are nudiff-diffusion's (:func:`nudiff_diffusion.export_graph`); this
module adds only what is SPADE's: which layers there are, at which resolution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from nudiff_diffusion import (
    GraphRuntime,
    UNet,
    check_batch,
    check_export_folder,
    evaluating,
    export_graph,
    making_parents,
    onnx_session,
    read_graph_config,
    weights_digest,
    write_graph_config,
)
from torch import nn

from ._model import COND_CHANNELS, ModulationCache, SpadeNorm

__all__ = ["spade_layers", "export_histo_onnx", "OnnxModulatedDenoiser"]


def spade_layers(model: UNet) -> list[tuple[SpadeNorm, tuple[int, int]]]:
    """Every SPADE layer of ``model`` with the resolution it normalises at, in the order of
    a forward pass (found by one batch-1 pass that fills a :class:`ModulationCache`)."""
    size = model.config.image_size
    param = next(model.parameters())
    cache = ModulationCache(torch.zeros(1, COND_CHANNELS, size, size, device=param.device))
    with torch.no_grad():
        model(
            torch.zeros(1, model.config.in_channels, size, size, device=param.device),
            torch.zeros(1, dtype=torch.int64, device=param.device),
            cache,
        )
    if not cache.layers:
        raise ValueError("`model` has no SPADE layers: export a histology model (nudiff_histo.build_histo_unet)")
    return list(cache.layers)


class _ModulationGraph(nn.Module):
    """``cond -> (scale_0, shift_0, scale_1, ...)``: every SPADE layer's modulation
    (:meth:`SpadeNorm.modulation`: ``1 + gamma`` and ``beta``)."""

    def __init__(self, layers: list[tuple[SpadeNorm, tuple[int, int]]]) -> None:
        super().__init__()
        self.norms = nn.ModuleList(norm for norm, _ in layers)
        self.sizes = [size for _, size in layers]

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        for norm, size in zip(self.norms, self.sizes, strict=True):
            out.extend(norm.modulation(cond, size))
        return tuple(out)


class _ModulatedEpsGraph(nn.Module):
    """``(x, t, scale_0, shift_0, ...) -> out``: the UNet with its SPADE layers reading a
    :class:`ModulationCache` filled from the inputs."""

    def __init__(self, model: UNet, layers: list[tuple[SpadeNorm, tuple[int, int]]]) -> None:
        super().__init__()
        self.model = model
        self.norms = [norm for norm, _ in layers]  # already submodules of model

    def forward(self, x: torch.Tensor, t: torch.Tensor, *modulations: torch.Tensor) -> torch.Tensor:
        pairs = [(norm, modulations[2 * i], modulations[2 * i + 1]) for i, norm in enumerate(self.norms)]
        return self.model(x, t, ModulationCache.filled(pairs))


def _modulation_names(count: int) -> list[str]:
    return [f"{kind}_{i}" for i in range(count) for kind in ("scale", "shift")]


def export_histo_onnx(
    model: UNet,
    path: str | os.PathLike[str],
    *,
    batch_max: int = 16,
    opset: int = 18,
    settings: dict[str, Any] | None = None,
    precision: Literal["float32", "float16"] = "float32",
    tolerance: float | None = None,
    slim: bool = False,
) -> dict[str, Any]:
    """Export a histology UNet as two graphs checked against PyTorch.

    Parameters
    ----------
    model : UNet
        A SPADE UNet (:func:`build_histo_unet` / :func:`load_histo_model`).
    path : path
        The per-step graph ``NAME.onnx``; the modulation graph is ``NAME.modulation.onnx``
        beside it, and ``config.json`` (layout ``modulated``) names both.
    batch_max : int
        Largest batch of either graph (with guidance: twice the images per call).
    opset, precision, tolerance, slim
        As :func:`nudiff_diffusion.export_onnx`.

    Returns
    -------
    dict
        The written ``config.json``; ``max_abs_diff`` is the worse of the two graphs'.
    """
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"'{path}': the exported graph's name must end in .onnx")
    with evaluating(model):  # the caller's model keeps its mode
        cfg = model.config
        size = cfg.image_size
        layers = spade_layers(model)
        names = _modulation_names(len(layers))
        mod_graph = _ModulationGraph(layers).eval()
        eps_graph = _ModulatedEpsGraph(model, layers).eval()
        g = torch.Generator().manual_seed(0)

        def cond_feed(n: int) -> dict[str, torch.Tensor]:
            return {"cond": torch.rand(n, COND_CHANNELS, size, size, generator=g) * 2 - 1}

        def eps_feed(n: int) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                mods = mod_graph(cond_feed(n)["cond"])
            feed = {"x": torch.randn(n, cfg.in_channels, size, size, generator=g), "t": torch.randint(1000, (n,))}
            return {**feed, **dict(zip(names, mods, strict=True))}

        modulation_path = path.with_name(f"{path.stem}.modulation.onnx")
        common: dict[str, Any] = {
            "batch_max": batch_max,
            "opset": opset,
            "precision": precision,
            "tolerance": tolerance,
            "slim": slim,
        }
        check_export_folder(path)
        # both graphs are exported and checked under hidden names and renamed together: a
        # failure of the second leaves neither (nor a modulation graph beside an old config)
        pending = {final: final.with_name(f".{final.name}.pending") for final in (modulation_path, path)}
        with making_parents(path):
            try:
                worst_mod = export_graph(
                    mod_graph,
                    pending[modulation_path],
                    cond_feed(2),
                    batched=["cond"],
                    feeds=cond_feed,
                    output_names=names,
                    **common,
                )
                example = eps_feed(2)
                worst_eps = export_graph(
                    eps_graph, pending[path], example, batched=list(example), feeds=eps_feed, **common
                )
                for final, tmp in pending.items():
                    os.replace(tmp, final)
            finally:
                for tmp in pending.values():
                    tmp.unlink(missing_ok=True)
        return write_graph_config(
            path,
            {
                "layout": "modulated",
                "modulation_graph": modulation_path.name,
                "modulations": names,
                "precision": precision,
                "unet": cfg.to_dict(),
                "diffusion": settings or {},
                "weights_sha256": weights_digest(model.state_dict()),
                "inputs": ["x", "t", "cond"],
                "cond_channels": COND_CHANNELS,
                "batch_max": batch_max,
                "opset": opset,
                "slim": slim,
                "max_abs_diff": max(worst_mod, worst_eps),
                "max_abs_diff_modulation": worst_mod,
                "max_abs_diff_eps": worst_eps,
            },
        )


class _Modulations:
    """The modulation graph's outputs for one batch of structures (what
    :meth:`OnnxModulatedDenoiser.prepare` returns), fed to every per-step call."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays
        self.batch = next(iter(arrays.values())).shape[0]


class OnnxModulatedDenoiser(GraphRuntime):
    """A ``--cached-modulation`` export in ONNX Runtime: :meth:`prepare` runs the modulation
    graph once per batch of structures, :meth:`eps` the per-step graph on its outputs, as
    :class:`HistoDenoiser`'s :class:`ModulationCache` does in PyTorch. Guidance: the
    library's :func:`nudiff_diffusion.guided` (``GraphRuntime.guided``: both halves as one
    batch, or sequential), with the modulations prepared once."""

    def __init__(self, path: str | os.PathLike[str], *, providers: list[str] | None = None) -> None:
        self.path = Path(path)
        self.config = read_graph_config(self.path)
        if self.config.get("layout") != "modulated":
            raise ValueError(
                f"'{self.path}' is not a --cached-modulation export (layout {self.config.get('layout')!r})"
            )
        self.batch_max = int(self.config["batch_max"])
        self.names = list(self.config["modulations"])
        self.modulation_session = onnx_session(
            self.path.with_name(self.config["modulation_graph"]), providers=providers
        )
        self.session = onnx_session(self.path, providers=providers)

    def _check_layout(self) -> None:  # this class is the one that runs the 'modulated' layout
        return None

    def prepare(self, cond: torch.Tensor) -> _Modulations:
        """The SPADE modulations of structures ``cond`` (N, 3, H, W), computed once."""
        check_batch(self.path, cond.shape[0], self.batch_max)
        outs = self.modulation_session.run(None, {"cond": cond.detach().float().cpu().numpy()})
        return _Modulations(dict(zip(self.names, outs, strict=True)))

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Model output (N, 6, H, W) float32 for x (N, 3, H, W) at t (N,), with ``cond`` the
        structures or (faster) what :meth:`prepare` returned for them."""
        if cond is None:
            raise ValueError(f"'{self.path}' is a conditional graph: give `cond`")
        self.check_eps_inputs(x, t)
        mods = cond if isinstance(cond, _Modulations) else self.prepare(cond)
        check_batch(self.path, x.shape[0], self.batch_max)
        if mods.batch != x.shape[0]:
            raise ValueError(f"{mods.batch} structures for a batch of {x.shape[0]}")
        feed = {"x": x.detach().float().cpu().numpy(), "t": t.detach().to(torch.int64).cpu().numpy(), **mods.arrays}
        return torch.from_numpy(self.session.run(None, feed)[0]).to(x.device)
