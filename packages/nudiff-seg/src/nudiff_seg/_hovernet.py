"""HoVer-Net (Graham et al., Medical Image Analysis 2019): model, presets and checkpoints.

The layout follows the reference PyTorch implementation (github vqdang/hover_net,
``models/hovernet/net_desc.py``): a pre-activation ResNet-50 encoder whose first stage
keeps the full resolution (``conv0`` 7x7 stride 1, no max-pooling), a 1x1 bottleneck
``conv_bot``, and one decoder per branch (NP: nuclear pixels, HV: horizontal/vertical
distance maps) of three upsampling stages with dense blocks of valid convolutions. The
module and parameter names are the reference's except the batch norms inside units
(``preact/bn``, ``conv1/bn``, ``conv2/bn`` of residual units and ``preact_bna/bn`` of dense
units are ``preact_bn``, ``conv1_bn``, ``conv2_bn``, ``preact_bn`` here):
:mod:`._reference_weights` loads the reference's released weights through that renaming.

Two modes, as in the reference: ``original`` (270 px in, 80 px out, 5x5 decoder
convolutions) and ``fast`` (256 px in, 164 px out, 3x3 decoder convolutions). The
``light`` preset is the fast mode with every channel count divided by 8 (for CPUs).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HoVerNet",
    "HoVerNetConfig",
    "PRESETS",
    "build_hovernet",
    "load_hovernet",
    "save_hovernet",
    "load_encoder_from_torchvision",
]

FORMAT = "nudiff-seg/hovernet"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class HoVerNetConfig:
    """What rebuilds a HoVer-Net with no flags.

    Attributes
    ----------
    mode : {"original", "fast"}
        ``original``: 270 px in, 80 px out; ``fast``: 256 px in, 164 px out.
    width_divisor : int
        Every channel count of the reference divided by this (1: HoVer-Net itself).
    blocks : tuple of 4 int
        Residual units per encoder stage (ResNet-50: 3, 4, 6, 3).
    """

    mode: Literal["original", "fast"] = "fast"
    width_divisor: int = 1
    blocks: tuple[int, int, int, int] = (3, 4, 6, 3)

    def __post_init__(self) -> None:
        if self.mode not in ("original", "fast"):
            raise ValueError(f"`mode` must be 'original' or 'fast', got {self.mode!r}")
        if (
            isinstance(self.width_divisor, bool)
            or not isinstance(self.width_divisor, int)
            or self.width_divisor not in (1, 2, 4, 8)
        ):
            raise ValueError(
                f"`width_divisor` must be 1, 2, 4 or 8 (dense blocks use 4 groups), got {self.width_divisor!r}"
            )
        whole = all(isinstance(b, int) and not isinstance(b, bool) for b in self.blocks)
        if len(self.blocks) != 4 or not whole or any(b < 1 for b in self.blocks):
            raise ValueError(f"`blocks` must be 4 positive unit counts, got {self.blocks!r}")
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    @property
    def input_size(self) -> int:
        """Side of the input window in pixels."""
        return 270 if self.mode == "original" else 256

    @property
    def output_size(self) -> int:
        """Side of the predicted centre in pixels."""
        return 80 if self.mode == "original" else 164

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "blocks": list(self.blocks)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HoVerNetConfig:
        unknown = sorted(set(data) - {"mode", "width_divisor", "blocks"})
        if unknown:
            raise ValueError(f"unknown HoVer-Net config keys {unknown}")
        return cls(**{**data, "blocks": tuple(data.get("blocks", (3, 4, 6, 3)))})


#: the three presets of ``nudiff-seg train --preset``
PRESETS: dict[str, HoVerNetConfig] = {
    "hovernet-original": HoVerNetConfig("original", 1),
    "hovernet-fast": HoVerNetConfig("fast", 1),
    "light": HoVerNetConfig("fast", 8),
    "tiny": HoVerNetConfig("fast", 8, (1, 1, 1, 1)),  # tests and the demo
}


def _tf_same_pad(x: torch.Tensor, ksize: int, stride: int) -> torch.Tensor:
    """TensorFlow's ``same`` padding (the extra pixel, if any, at the bottom/right)."""
    rest = x.shape[2] % stride
    pad = max(ksize - (stride if rest == 0 else rest), 0)
    start = pad // 2
    return F.pad(x, (start, pad - start, start, pad - start))


class TFSamePad(nn.Module):
    def __init__(self, ksize: int, stride: int) -> None:
        super().__init__()
        self.ksize, self.stride = ksize, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tf_same_pad(x, self.ksize, self.stride)


def _bn_relu(channels: int) -> list[tuple[str, nn.Module]]:
    return [("bn", nn.BatchNorm2d(channels, eps=1e-5)), ("relu", nn.ReLU(inplace=True))]


class ResidualBlock(nn.Module):
    """Pre-activation bottleneck units (1x1, 3x3, 1x1); the first unit carries the stride
    and has no pre-activation (the previous stage ends with BN-ReLU)."""

    def __init__(self, in_ch: int, unit_ch: tuple[int, int, int], count: int, stride: int) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        unit_in = in_ch
        for i in range(count):
            s = stride if i == 0 else 1
            layers: list[tuple[str, nn.Module]] = [
                ("preact_bn", nn.BatchNorm2d(unit_in, eps=1e-5)),
                ("preact_relu", nn.ReLU(inplace=True)),
                ("conv1", nn.Conv2d(unit_in, unit_ch[0], 1, bias=False)),
                ("conv1_bn", nn.BatchNorm2d(unit_ch[0], eps=1e-5)),
                ("conv1_relu", nn.ReLU(inplace=True)),
                ("conv2_pad", TFSamePad(3, s)),
                ("conv2", nn.Conv2d(unit_ch[0], unit_ch[1], 3, stride=s, bias=False)),
                ("conv2_bn", nn.BatchNorm2d(unit_ch[1], eps=1e-5)),
                ("conv2_relu", nn.ReLU(inplace=True)),
                ("conv3", nn.Conv2d(unit_ch[1], unit_ch[2], 1, bias=False)),
            ]
            self.units.append(nn.Sequential(OrderedDict(layers if i else layers[2:])))
            unit_in = unit_ch[2]
        need_projection = in_ch != unit_ch[2] or stride != 1
        self.shortcut = nn.Conv2d(in_ch, unit_ch[2], 1, stride=stride, bias=False) if need_projection else None
        self.blk_bna = nn.Sequential(OrderedDict(_bn_relu(unit_ch[2])))

    def forward(self, x: torch.Tensor, *, freeze_units: bool = False) -> torch.Tensor:
        """``freeze_units``: the units run without gradients, the projection shortcut and
        the closing BN-ReLU with them (HoVer-Net's ``ResidualBlock.forward(freeze=True)``)."""
        shortcut = x if self.shortcut is None else self.shortcut(x)
        for unit in self.units:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_units):
                new = unit(x)
            x = new + shortcut
            shortcut = x
        return self.blk_bna(x)


class DenseBlock(nn.Module):
    """Dense units (BN-ReLU-1x1, BN-ReLU-kxk grouped, valid): each unit's output is
    concatenated to its centre-cropped input."""

    def __init__(self, in_ch: int, ksize: int, unit_ch: tuple[int, int], count: int, split: int = 4) -> None:
        super().__init__()
        self.units = nn.ModuleList()
        ch = in_ch
        for _ in range(count):
            self.units.append(
                nn.Sequential(
                    OrderedDict(
                        [
                            ("preact_bn", nn.BatchNorm2d(ch, eps=1e-5)),
                            ("preact_relu", nn.ReLU(inplace=True)),
                            ("conv1", nn.Conv2d(ch, unit_ch[0], 1, bias=False)),
                            ("conv1_bn", nn.BatchNorm2d(unit_ch[0], eps=1e-5)),
                            ("conv1_relu", nn.ReLU(inplace=True)),
                            ("conv2", nn.Conv2d(unit_ch[0], unit_ch[1], ksize, groups=split, bias=False)),
                        ]
                    )
                )
            )
            ch += unit_ch[1]
        self.out_ch = ch
        self.blk_bna = nn.Sequential(OrderedDict(_bn_relu(ch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            new = unit(x)
            x = torch.cat([crop_to(x, new.shape[-1]), new], dim=1)
        return self.blk_bna(x)


def crop_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop of an NCHW tensor to ``size`` x ``size`` (the extra pixel, if any, is
    taken from the bottom/right, as the reference's ``crop_op``)."""
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    return x[..., top : top + size, left : left + size]


def _upsample2x(x: torch.Tensor) -> torch.Tensor:
    """TensorPack's FixedUnpooling with a 2x2 matrix of ones: nearest-neighbour 2x."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)


class HoVerNet(nn.Module):
    """HoVer-Net with the NP and HV branches (no type branch).

    ``forward(images)``: images ``(N, 3, S, S)`` float32 RGB in [0, 1] (the reference
    divides uint8 by 255), ``S = config.input_size``. Returns ``{"np": (N, 2, s, s)
    logits, "hv": (N, 2, s, s)}`` with ``s = config.output_size`` (HV channels: h, v).
    """

    def __init__(self, config: HoVerNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width_divisor
        c = [64 // w, 256 // w, 512 // w, 1024 // w, 2048 // w]
        stem: list[tuple[str, nn.Module]] = [
            ("/", nn.Conv2d(3, c[0], 7, bias=False)),
            ("bn", nn.BatchNorm2d(c[0], eps=1e-5)),
            ("relu", nn.ReLU(inplace=True)),
        ]
        if config.mode == "fast":
            stem.insert(0, ("pad", TFSamePad(7, 1)))
        self.conv0 = nn.Sequential(OrderedDict(stem))
        b = config.blocks
        self.d0 = ResidualBlock(c[0], (c[0], c[0], c[1]), b[0], 1)
        self.d1 = ResidualBlock(c[1], (c[1] // 2, c[1] // 2, c[2]), b[1], 2)
        self.d2 = ResidualBlock(c[2], (c[2] // 2, c[2] // 2, c[3]), b[2], 2)
        self.d3 = ResidualBlock(c[3], (c[3] // 2, c[3] // 2, c[4]), b[3], 2)
        self.conv_bot = nn.Conv2d(c[4], c[3], 1, bias=False)
        k = 5 if config.mode == "original" else 3
        self.decoder = nn.ModuleDict({"np": self._branch(c, k, w), "hv": self._branch(c, k, w)})
        self._init_weights()

    @staticmethod
    def _branch(c: list[int], k: int, w: int) -> nn.Sequential:
        dense3 = DenseBlock(256 // w, k, (128 // w, 32 // w), 8)
        dense2 = DenseBlock(128 // w, k, (128 // w, 32 // w), 4)
        u3 = OrderedDict(
            [
                ("conva", nn.Conv2d(c[3], 256 // w, k, bias=False)),
                ("dense", dense3),
                ("convf", nn.Conv2d(dense3.out_ch, c[2], 1, bias=False)),
            ]
        )
        u2 = OrderedDict(
            [
                ("conva", nn.Conv2d(c[2], 128 // w, k, bias=False)),
                ("dense", dense2),
                ("convf", nn.Conv2d(dense2.out_ch, c[1], 1, bias=False)),
            ]
        )
        u1 = OrderedDict([("conva_pad", TFSamePad(k, 1)), ("conva", nn.Conv2d(c[1], 64 // w, k, bias=False))])
        u0 = OrderedDict([*_bn_relu(64 // w), ("conv", nn.Conv2d(64 // w, 2, 1, bias=True))])
        return nn.Sequential(
            OrderedDict([(n, nn.Sequential(m)) for n, m in (("u3", u3), ("u2", u2), ("u1", u1), ("u0", u0))])
        )

    def _init_weights(self) -> None:
        # the reference's scheme: He-normal (fan_out) convolutions, unit BN
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # ...except the output convolutions, which start at zero: without a pretrained
        # encoder the reference's init gives logits and h/v of magnitude 40-150, whose first
        # MSE gradients drove the HV branch of CPU runs (lr 1e-3) into a constant 0 output
        for branch in self.decoder.values():
            nn.init.zeros_(branch.u0.conv.weight)

    def encoder_modules(self) -> list[nn.Module]:
        """The modules HoVer-Net's first training phase keeps frozen: the units of the
        four residual stages and the later stages' shortcuts and BN-ReLU. As in the
        reference (``net_desc.py``: ``conv0`` and ``d0`` run outside its
        ``set_grad_enabled(not freeze)``, and ``d0`` freezes only its units), the stem,
        the first stage's projection shortcut and its closing BN-ReLU keep training."""
        return [self.d0.units, self.d1, self.d2, self.d3]

    def encode(self, images: torch.Tensor, *, freeze: bool = False) -> list[torch.Tensor]:
        """The four encoder features; ``freeze``: as :meth:`encoder_modules` says."""
        d0 = self.d0(self.conv0(images), freeze_units=freeze)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze):
            d1 = self.d1(d0)
            d2 = self.d2(d1)
            d3 = self.d3(d2)
        return [d0, d1, d2, d3]

    def forward(self, images: torch.Tensor, *, freeze_encoder: bool = False) -> dict[str, torch.Tensor]:
        expected = self.config.input_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (expected, expected):
            raise ValueError(
                f"HoVer-Net ({self.config.mode}) takes (N, 3, {expected}, {expected}) images, got {tuple(images.shape)}"
            )
        d = self.encode(images, freeze=freeze_encoder)
        d[3] = self.conv_bot(d[3])
        # centre crops: the reference's crop_op amounts (184, 72 / 92, 36) as output sizes
        out = self.config.output_size
        d[0] = crop_to(d[0], out)
        d[1] = crop_to(d[1], d[1].shape[-1] - (72 if self.config.mode == "original" else 36))
        result = {}
        for name, branch in self.decoder.items():
            u3 = branch.u3(_upsample2x(d[3]) + d[2])
            u2 = branch.u2(_upsample2x(u3) + d[1])
            u1 = branch.u1(_upsample2x(u2) + d[0])
            result[name] = branch.u0(u1)
        return result


def build_hovernet(preset: str | HoVerNetConfig) -> HoVerNet:
    """A freshly initialised HoVer-Net from a preset name or a config."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    return HoVerNet(preset)


def load_encoder_from_torchvision(model: HoVerNet, path: str | os.PathLike[str]) -> HoVerNet:
    """Initialise the encoder from torchvision ImageNet ResNet-50 weights (``.pth`` state
    dict or ``.safetensors``; nothing is downloaded). Only for the full-width presets.

    Every convolution maps one to one (``conv1`` -> ``conv0``, ``layerK[i].convJ`` ->
    ``d{K-1}.units[i].convJ``, ``layerK[0].downsample.0`` -> ``d{K-1}.shortcut``). The
    batch norms map by the channels they normalise: ``bn1``/``bn2`` of a unit ->
    ``conv1_bn``/``conv2_bn``; ``bn3`` of unit i (after its last convolution) -> the
    pre-activation of unit i+1, or the stage's closing ``blk_bna`` for the last unit.
    torchvision's ResNet is post-activation, so the result is an initialisation with
    ImageNet filters, not the same function (the reference starts from TensorPack's
    pre-activation ResNet-50, ``ImageNet-ResNet50-Preact_pytorch.tar``, which
    :func:`nudiff_seg.load_encoder_from_reference` loads as it is).
    """
    from ._weights_file import read_state_dict

    return _encoder_from_torchvision_state(model, read_state_dict(path), path)


def _encoder_from_torchvision_state(
    model: HoVerNet, state: dict[str, torch.Tensor], path: str | os.PathLike[str]
) -> HoVerNet:
    """:func:`load_encoder_from_torchvision` of a file's tensors already read (``path``
    names them in messages)."""
    from ._resnet import _fit_resnet_state, resnet50

    if model.config.width_divisor != 1 or model.config.blocks != (3, 4, 6, 3):
        raise ValueError(
            "ImageNet ResNet-50 weights fit only the full-width presets (hovernet-fast, hovernet-original)"
        )
    src = _fit_resnet_state(resnet50(), state, path).state_dict()
    dst = model.state_dict()
    pairs = {"conv0./.weight": "conv1.weight"}
    for suffix in ("weight", "bias", "running_mean", "running_var"):
        pairs[f"conv0.bn.{suffix}"] = f"bn1.{suffix}"
    for stage, count in enumerate(model.config.blocks):
        tv = f"layer{stage + 1}"
        pairs[f"d{stage}.shortcut.weight"] = f"{tv}.0.downsample.0.weight"
        for i in range(count):
            for j in (1, 2, 3):
                pairs[f"d{stage}.units.{i}.conv{j}.weight"] = f"{tv}.{i}.conv{j}.weight"
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                pairs[f"d{stage}.units.{i}.conv1_bn.{suffix}"] = f"{tv}.{i}.bn1.{suffix}"
                pairs[f"d{stage}.units.{i}.conv2_bn.{suffix}"] = f"{tv}.{i}.bn2.{suffix}"
                closing = f"d{stage}.units.{i + 1}.preact_bn" if i + 1 < count else f"d{stage}.blk_bna.bn"
                pairs[f"{closing}.{suffix}"] = f"{tv}.{i}.bn3.{suffix}"
    for ours, theirs in pairs.items():
        if dst[ours].shape != src[theirs].shape:  # pragma: no cover - the layouts are fixed
            raise ValueError(
                f"'{path}': {theirs} has shape {tuple(src[theirs].shape)}, {ours} needs {tuple(dst[ours].shape)}"
            )
        dst[ours] = src[theirs].clone()
    model.load_state_dict(dst)
    return model


def save_hovernet(directory: str | os.PathLike[str], model: HoVerNet, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory``, each atomically."""
    from nudiff_diffusion import weights_digest
    from nudiff_postproc._io import atomic_path
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "format": FORMAT,
        "hovernet": model.config.to_dict(),
        "weights_sha256": weights_digest(state),
        **(extra or {}),
    }
    text = json.dumps(config, indent=2) + "\n"  # a config that cannot be written fails before any file changes
    directory.mkdir(parents=True, exist_ok=True)
    # weights first, then their config: a kill between the two leaves a pair whose digests
    # differ, which load_hovernet refuses
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    with atomic_path(directory / CONFIG_NAME) as tmp:
        tmp.write_text(text)
    return directory


def read_hovernet_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed ``config.json`` of a HoVer-Net checkpoint, refusing other kinds by name."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: '{directory}'")
    if not path.is_file():
        raise FileNotFoundError(f"'{directory}' has no {CONFIG_NAME}; expected a nudiff-seg checkpoint directory")
    from nudiff_diffusion import read_json_object

    config = read_json_object(path)
    if config.get("format") != FORMAT:
        got = config.get("format")
        kind = f" (a '{config.get('kind')}' model)" if config.get("kind") else ""
        raise ValueError(
            f"'{path}' has format {got!r}{kind}; expected a HoVer-Net checkpoint ('{FORMAT}') from nudiff-seg train"
        )
    return config


def load_hovernet(directory: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> HoVerNet:
    """Rebuild a HoVer-Net from a checkpoint directory and load its weights (safetensors:
    no code runs). Returns the model in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_hovernet_config(directory)
    try:
        model = HoVerNet(HoVerNetConfig.from_dict(config["hovernet"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"'{directory / CONFIG_NAME}': {exc}") from exc
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"'{directory}' has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"'{weights}' could not be read as safetensors ({exc}); is it truncated?") from exc
    expected = model.state_dict()
    bad = sorted(set(expected) ^ set(state)) + sorted(
        k for k in set(expected) & set(state) if expected[k].shape != state[k].shape
    )
    if bad:
        raise ValueError(
            f"'{weights}' does not fit the config in '{directory / CONFIG_NAME}' (first mismatches: {bad[:3]})"
        )
    from nudiff_diffusion import check_weights_digest

    check_weights_digest(state, config, weights)
    model.load_state_dict(state)
    return model.to(device).eval()
