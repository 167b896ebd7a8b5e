"""HoVer-Net training: two phases, mixed real/synthetic batches, validation, resumable.

Phase 1 trains the decoders (and ``conv_bot``) with the encoder frozen; phase 2 trains
everything; each phase has its own Adam (lr 1e-4) whose rate drops 10x halfway (the
reference: 50 + 50 epochs, step at 25). Freezing only makes sense with a pretrained
encoder, so without ``encoder_weights`` phase 1 defaults to no epochs.

A run directory holds ``config.json`` + ``model.safetensors`` (the best epoch by
validation AJI when validation data is given, else the latest), ``last/`` (the latest
weights), ``train_state.pt`` (weights, optimiser, epoch, batch; loaded with
``weights_only=True``) and ``log.csv``. Every random draw of an epoch comes from
``(seed, epoch, batch)``, so a killed run resumes at the batch it saved last with the
same data it would have seen; the state also holds the epoch's running loss sums, so the
resumed epoch's row of ``log.csv`` is the uninterrupted one. A resume must be given the
settings the run was started with (all but ``save_every``) and the same real and
synthetic images: anything else is refused, naming the flag.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nudiff_diffusion import check_resume_settings, names_digest, read_train_state, refuse_train_state
from nudiff_postproc._io import remove_stale_parts

from ._data import WINDOWS, Augment, MixedBatches, Tiles
from ._hovernet import CONFIG_NAME, HoVerNet, build_hovernet, save_hovernet
from ._losses import MSGE_GRADIENTS, hovernet_loss
from ._predict import score_pairs
from ._reference_weights import load_encoder_weights

__all__ = ["SegTrainConfig", "train_hovernet", "STATE_NAME"]

STATE_NAME = "train_state.pt"
DEFAULT_AUGMENT = Augment()
NO_AFFINE = Augment(scale=0.0, shear=0.0, rotate=0.0, translate=0.0)  # --no-affine: the rest as DEFAULT_AUGMENT
_LOG_FIELDS = [
    "epoch",
    "phase",
    "batches",
    "windows",
    "seconds",
    "ce",
    "dice",
    "mse",
    "msge",
    "loss",
    "val_dice",
    "val_aji",
    "val_pq",
]


@dataclass(frozen=True)
class SegTrainConfig:
    """Training settings (what ``nudiff-seg train`` takes)."""

    preset: str = "light"
    epochs: int = 20
    frozen_epochs: int | None = None  # phase 1; None: epochs // 2 with encoder weights, else 0
    batch: int = 4
    frozen_batch: int | None = None  # phase 1's batch; None: ``batch`` (HoVer-Net trains it larger)
    lr: float = 1e-4
    synthetic_ratio: float | str = "pool"
    precision: str = "fp32"  # or "bf16" (autocast)
    seed: int = 0
    save_every: int = 50  # batches between resumable saves
    encoder_weights: str | None = None
    windows: str = "valid"  # how the real tiles are cut into windows (window_origins)
    synthetic_windows: str = "mirror"  # and the synthetic ones ("valid" before 2026-12-04)

    def __post_init__(self) -> None:
        for flag, value in (("--windows", self.windows), ("--synthetic-windows", self.synthetic_windows)):
            if value not in WINDOWS:
                raise ValueError(f"`{flag}` must be one of {WINDOWS}, got {value!r}")
        if self.epochs < 1:
            raise ValueError(f"`--epochs` must be >= 1, got {self.epochs}")
        if self.frozen_epochs is not None and not 0 <= self.frozen_epochs <= self.epochs:
            raise ValueError(f"`--frozen-epochs` must be in [0, epochs={self.epochs}], got {self.frozen_epochs}")
        if self.batch < 1:
            raise ValueError(f"`--batch` must be >= 1, got {self.batch}")
        if self.frozen_batch is not None and self.frozen_batch < 1:
            raise ValueError(f"`--frozen-batch` must be >= 1, got {self.frozen_batch}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`--lr` must be a positive finite number, got {self.lr}")
        if self.save_every < 1:
            raise ValueError(f"`save_every` must be >= 1, got {self.save_every}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"`--precision` must be 'fp32' or 'bf16', got {self.precision!r}")

    @property
    def phase1_epochs(self) -> int:
        if self.frozen_epochs is not None:
            return self.frozen_epochs
        return self.epochs // 2 if self.encoder_weights else 0


def _optimizer(model: HoVerNet, phase: int, lr: float) -> torch.optim.Adam:
    encoder = {id(p) for m in model.encoder_modules() for p in m.parameters()}
    params = [p for p in model.parameters() if phase == 2 or id(p) not in encoder]
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def _phase_lr(config: SegTrainConfig, epoch: int) -> tuple[int, float]:
    """Phase (1 or 2) and learning rate of ``epoch`` (0-based)."""
    p1 = config.phase1_epochs
    phase, start, length = (1, 0, p1) if epoch < p1 else (2, p1, config.epochs - p1)
    decayed = epoch - start >= max(length // 2, 1) and length > 1
    return phase, config.lr * (0.1 if decayed else 1.0)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    from nudiff_postproc._io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


_STATE_KEYS = ("model", "optimizer", "phase", "epoch", "batch", "best_aji", "settings")
_LOSS_KEYS = ("ce", "dice", "mse", "msge", "loss")
_FLAG_NAMES = {
    "real_images": "the images of --real (and --subset)",
    "synthetic_images": "the images of --synthetic",
    "msge_gradients": "MSGE gradient directions",
    "rng_streams": "random streams of the epoch plans and batches",
    "augment": "augmentation",
}

#: how an epoch's random streams derive from the seed (recorded: a resume must not switch):
#: the plan (windows, order) from SeedSequence [seed, epoch, 0], batch b's augmentation from
#: [seed, epoch, 1, b]. Runs before 2026-12-03 drew batch b from [seed, epoch, b]: batch 0
#: then drew the plan's own numbers, as SeedSequence pads its entropy with zeros.
RNG_STREAMS = "plan [seed, epoch, 0], batch b [seed, epoch, 1, b]"


def _plan_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator of an epoch's plan (see :data:`RNG_STREAMS`)."""
    return np.random.default_rng([seed, epoch, 0])


def _batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The generator of batch ``batch``'s augmentation in ``epoch`` (see :data:`RNG_STREAMS`)."""
    return np.random.default_rng([seed, epoch, 1, batch])


def _image_set(tiles: Tiles | None) -> str | None:
    """The images a run trains on, as one comparable string (count and a digest of the names)."""
    return None if tiles is None else names_digest(tiles.names, "images")


def _check_finite(model: HoVerNet, where: str) -> None:
    """Refuse to save weights that are no longer finite (a diverged step)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(
            f"{len(bad)} weight tensor(s) are NaN or inf {where} (e.g. {bad[0]}); they were not saved; "
            "lower --lr or use fp32"
        )


def _running(sums: dict[str, float], seen: int, seconds: float) -> dict[str, Any]:
    """The part of an epoch done so far, saved with a mid-epoch state."""
    return {"epoch_sums": dict(sums), "epoch_seen": seen, "epoch_seconds": seconds}


def _validate(model: HoVerNet, val: Tiles | None, batch: int) -> dict[str, float]:
    if val is None:
        return {}
    _, mean = score_pairs(model, zip(val.names, val.images, val.maps, strict=True), batch=batch)
    return {"val_dice": mean["dice"], "val_aji": mean["aji"], "val_pq": mean["pq"]}


def train_hovernet(
    real: Tiles,
    out: str | os.PathLike[str],
    config: SegTrainConfig,
    *,
    synthetic: Tiles | None = None,
    val: Tiles | None = None,
    augment: Augment | None = DEFAULT_AUGMENT,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool = True,
    max_batches: int | None = None,
) -> Path:
    """Train HoVer-Net on ``real`` (+ ``synthetic``) tiles into the run directory ``out``.

    ``max_batches`` stops after that many batches in this call (the run stays
    resumable); it exists for tests and for time-boxed runs. Returns ``out``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state_path = out / STATE_NAME
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"`--max-batches` must be >= 1, got {max_batches}")
    train_settings = {
        **asdict(config),
        "real": str(real.folder),
        "synthetic": str(synthetic.folder) if synthetic else None,
        "real_images": _image_set(real),
        "synthetic_images": _image_set(synthetic),
        "msge_gradients": MSGE_GRADIENTS,
        "rng_streams": RNG_STREAMS,
        # since 2026-12-04 (HoVer-Net's affine transform added): a run must keep its augmentation
        "augment": asdict(augment) if augment is not None else None,
    }
    settings = {"train": train_settings}
    if state_path.exists() and not resume:
        raise FileExistsError(
            f"'{out}' already holds a training run; pass --resume to continue it or choose another --out"
        )
    with torch.random.fork_rng(devices=[]):  # the initial weights follow the seed
        torch.manual_seed(config.seed)
        model = build_hovernet(config.preset).to(device)
    if config.encoder_weights:
        try:
            load_encoder_weights(model, config.encoder_weights)
        except (ValueError, OSError) as exc:  # the messages name the file: name the setting too
            raise type(exc)(f"--encoder-weights: {exc}") from exc
    batches = {  # per phase: its batch size
        phase: MixedBatches(
            real,
            synthetic,
            ratio=config.synthetic_ratio,
            batch=size,
            input_size=model.config.input_size,
            output_size=model.config.output_size,
            augment=augment,
            windows=config.windows,
            synthetic_windows=config.synthetic_windows,
        )
        for phase, size in ((1, config.frozen_batch or config.batch), (2, config.batch))
    }
    epoch, start_batch, best_aji = 0, 0, -1.0
    optimizer, optimizer_phase = None, 0
    resumed_sums: dict[str, float] | None = None
    resumed_seen, resumed_seconds = 0, 0.0
    if resume and state_path.exists():
        state = read_train_state(state_path, device=device, keys=_STATE_KEYS)
        try:
            saved = json.loads(state["settings"])["train"]
        except (TypeError, ValueError, KeyError) as exc:
            refuse_train_state(state_path, exc)
        if not isinstance(saved, dict):
            refuse_train_state(state_path, TypeError(f"its settings hold a {type(saved).__name__}, not an object"))
        # the folders may move; what must not change is the images they hold
        ignore = {"real", "synthetic"} if "real_images" in saved else set()
        given = {k: v for k, v in train_settings.items() if k not in ignore}
        # what older runs did without recording it: before the windows flags every tile was cut
        # valid; from their first version until the two were separate, one mode cut both sets
        saved.setdefault("windows", "valid")
        saved.setdefault("synthetic_windows", saved["windows"])
        if saved.get("encoder_weights") and given.get("encoder_weights"):
            given["encoder_weights"] = saved["encoder_weights"]  # the state holds the weights: their file may move
        check_resume_settings(
            out,
            saved,
            given,
            may_change=("save_every",),
            flags=_FLAG_NAMES,
            required=("msge_gradients", "rng_streams", "augment"),
        )
        try:
            model.load_state_dict(state["model"])
            epoch, start_batch, best_aji = int(state["epoch"]), int(state["batch"]), float(state["best_aji"])
            optimizer_phase = int(state["phase"])
            if epoch < config.epochs and _phase_lr(config, epoch)[0] == optimizer_phase:  # else a fresh Adam
                optimizer = _optimizer(model, optimizer_phase, config.lr)
                saved_params = sum(len(g["params"]) for g in state["optimizer"]["param_groups"])
                expected = sum(len(g["params"]) for g in optimizer.param_groups)
                if optimizer_phase == 1 and saved_params != expected:
                    raise ValueError(
                        f"its phase-1 optimizer holds {saved_params} parameters, this version's {expected}: it was "
                        "saved by a nudiff-seg whose phase 1 also froze the stem and the first stage's shortcut "
                        "(HoVer-Net trains them); finish it with that version"
                    )
                optimizer.load_state_dict(state["optimizer"])
            if start_batch > 0 and "epoch_sums" in state:
                resumed_sums = {k: float(state["epoch_sums"][k]) for k in _LOSS_KEYS}
                resumed_seen, resumed_seconds = int(state["epoch_seen"]), float(state["epoch_seconds"])
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            refuse_train_state(state_path, exc)
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "last"):  # what a killed call left half-written (one writer per run folder)
        remove_stale_parts(folder)
    done = 0

    def save_state(next_epoch: int, next_batch: int, phase: int, running: dict[str, Any] | None = None) -> None:
        _check_finite(model, f"after {done} batch(es) of this call (epoch {epoch + 1})")
        _atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "phase": phase,
                "epoch": next_epoch,
                "batch": next_batch,
                "best_aji": best_aji,
                "settings": json.dumps(settings),
                **(running or {}),
            },
            state_path,
        )

    while epoch < config.epochs:
        phase, lr = _phase_lr(config, epoch)
        if optimizer is None or optimizer_phase != phase:  # each phase starts a fresh Adam
            optimizer, optimizer_phase = _optimizer(model, phase, config.lr), phase
        for group in optimizer.param_groups:
            group["lr"] = lr
        plan = batches[phase].epoch(_plan_rng(config.seed, epoch))
        model.train()
        sums, seen, earlier_seconds = dict.fromkeys(_LOSS_KEYS, 0.0), 0, 0.0
        if resumed_sums is not None:  # the part of this epoch an earlier call did
            sums, seen, earlier_seconds, resumed_sums = resumed_sums, resumed_seen, resumed_seconds, None
        t0 = time.perf_counter()
        bar = tqdm(
            range(start_batch, len(plan)),
            desc=f"epoch {epoch + 1}/{config.epochs} (phase {phase})",
            disable=not progress,
            leave=False,
        )
        for b in bar:
            images, np_t, hv_t = batches[phase].materialise(plan[b], _batch_rng(config.seed, epoch, b))
            x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            np_target = torch.from_numpy(np_t).to(device)
            hv_target = torch.from_numpy(hv_t).to(device).permute(0, 3, 1, 2)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                pred = model(x, freeze_encoder=phase == 1)
            loss, parts = hovernet_loss({k: v.float() for k, v in pred.items()}, np_target, hv_target)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss became {float(loss)} at epoch {epoch + 1}, batch {b + 1}; lower --lr or use fp32"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in parts.items():
                sums[k] += v
            sums["loss"] += float(loss.detach())
            seen += 1
            done += 1
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
            if (b + 1) % config.save_every == 0 and b + 1 < len(plan):
                save_state(epoch, b + 1, phase, _running(sums, seen, earlier_seconds + time.perf_counter() - t0))
            if max_batches is not None and done >= max_batches and b + 1 < len(plan):
                save_state(epoch, b + 1, phase, _running(sums, seen, earlier_seconds + time.perf_counter() - t0))
                return out
        _check_finite(model, f"at the end of epoch {epoch + 1}")
        metrics = _validate(model, val, config.batch)
        seconds = earlier_seconds + time.perf_counter() - t0
        windows = sum(len(batch) for batch in plan)  # the last batch of an epoch may be short
        row = {"epoch": epoch + 1, "phase": phase, "batches": seen, "windows": windows, "seconds": round(seconds, 1)}
        row.update({k: round(v / max(seen, 1), 5) for k, v in sums.items()})
        row.update({k: round(v, 5) for k, v in metrics.items()})
        extra = {**settings, "epoch": epoch + 1, **({"validation": metrics} if metrics else {})}
        save_hovernet(out / "last", model, extra=extra)
        aji = metrics.get("val_aji", math.nan)
        # the best epoch by validation AJI; a NaN (no nuclei in any validation map or
        # prediction) is never the best, but the run folder always holds a model
        if val is None or aji > best_aji or not (out / CONFIG_NAME).is_file():
            save_hovernet(out, model, extra=extra)
            best_aji = aji if aji > best_aji else best_aji
        _append_log(out / "log.csv", row)
        epoch, start_batch = epoch + 1, 0
        save_state(epoch, 0, phase)
        if progress:
            shown = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("epoch", "phase"))
            print(f"epoch {epoch}/{config.epochs} (phase {phase}): {shown}", flush=True)
        if max_batches is not None and done >= max_batches:
            return out
    return out


def _append_log(path: Path, row: dict[str, Any]) -> None:
    """Add one epoch to ``log.csv``, replacing a row of the same epoch (after a resume)."""
    rows = []
    if path.exists():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["epoch"]) != row["epoch"]]
    rows.append({k: row.get(k, "") for k in _LOG_FIELDS})
    from nudiff_postproc._io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
