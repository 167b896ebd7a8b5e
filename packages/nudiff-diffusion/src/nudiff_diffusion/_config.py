"""Model configuration: a frozen dataclass saved as ``config.json`` beside the weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["UNetConfig", "PRESETS"]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the ADM UNet (guided-diffusion's flags).

    ``attention_resolutions`` are feature-map sizes (e.g. 32, 16, 8 for a 256 px model),
    ``num_head_channels`` > 0 fixes the channels per head (else ``num_heads`` heads).
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 32
    learn_sigma: bool = True
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_head_channels: int = 32
    num_heads: int = 4
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True

    def __post_init__(self) -> None:
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks", "num_heads"):
            if not whole(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(
                    f"invalid UNetConfig: `{name}` must be a positive integer, got {getattr(self, name)!r}"
                )
        if not whole(self.num_head_channels) or self.num_head_channels < -1:
            raise ValueError(
                f"invalid UNetConfig: `num_head_channels` must be an integer (> 0, or -1: use num_heads), "
                f"got {self.num_head_channels!r}"
            )
        for name in ("learn_sigma", "use_scale_shift_norm", "resblock_updown"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"invalid UNetConfig: `{name}` must be true or false, got {getattr(self, name)!r}")
        for name in ("attention_resolutions", "channel_mult"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not all(whole(v) and v >= 1 for v in value):
                raise ValueError(f"invalid UNetConfig: `{name}` must be a list of positive integers, got {value!r}")
        if not self.channel_mult:
            raise ValueError("invalid UNetConfig: `channel_mult` must name at least one level")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"invalid UNetConfig: `dropout` must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        problems = []
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            problems.append(f"image_size {self.image_size} is not a multiple of 2^{len(self.channel_mult) - 1}")
        widths = {self.model_channels * m for m in self.channel_mult} | {self.model_channels}
        if any(w % 32 for w in widths):
            problems.append(f"every width {sorted(widths)} must be a multiple of 32 (GroupNorm with 32 groups)")
        if self.num_head_channels > 0 and any(w % self.num_head_channels for w in widths):
            problems.append(f"num_head_channels {self.num_head_channels} must divide every width {sorted(widths)}")
        if self.num_head_channels <= 0 and any(w % self.num_heads for w in widths):
            problems.append(f"num_heads {self.num_heads} must divide every width {sorted(widths)}")
        levels = {self.image_size // 2**i for i in range(len(self.channel_mult))}
        unused = sorted(set(self.attention_resolutions) - levels)
        if unused:
            problems.append(f"attention_resolutions {unused} match no feature-map size (those are {sorted(levels)})")
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named preset (``paper-256``, ``small-128``, ``tiny-64``) with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # the paper's flags (guided-diffusion's 256 x 256 model)
    "paper-256": dict(
        image_size=256,
        model_channels=256,
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
    ),
    "small-128": dict(
        image_size=128,
        model_channels=64,
        num_res_blocks=2,
        attention_resolutions=(16, 8),
        channel_mult=(1, 1, 2, 3, 4),
        num_head_channels=32,
        learn_sigma=True,
    ),
    "tiny-64": dict(
        image_size=64,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(8,),
        channel_mult=(1, 2, 2, 2),
        num_head_channels=32,
        learn_sigma=True,
    ),
}
