"""The training loop: AdamW, EMA, mixed precision, checkpoints with exact resume, DDP."""

from __future__ import annotations

import copy
import csv
import dataclasses
import gc
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn

from ._checkpoint import CONFIG_NAME, WEIGHTS_NAME, _atomic_write, read_config, save_model
from ._losses import training_losses
from ._resume import check_resume_settings, read_train_state, refuse_train_state
from ._runtime import resolve_device
from ._sampling import seeded_generator
from ._schedule import NoiseSchedule
from ._unet import UNet

__all__ = ["TrainConfig", "train", "latest_checkpoint", "learning_rate", "setup_distributed"]

STATE_NAME = "train_state.pt"
#: ``TrainConfig.optimizer``'s choices: AdamW (decoupled weight decay) or Adam (L2 penalty)
OPTIMIZERS = ("adamw", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. By default AdamW at a constant rate, lr 1e-4, weight decay
    0.05 and batch 4 (the paper code's structure model), gradients clipped to a global norm
    of 1 (``grad_clip``; None or 0: no clipping, as neither of the paper's models does). The
    paper code's histology model: ``optimizer="adam"`` (Adam with ``weight_decay`` as an L2
    penalty added to the gradient), weight decay 0.01, batch 1, ``lr_cycle=10000`` and
    ``lr_warmup=2000`` (:func:`learning_rate`)."""

    steps: int = 1000
    batch_size: int = 4
    microbatch: int = 0  # split each batch into chunks of this size (0: no split)
    lr: float = 1e-4
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "adam"] = "adamw"  # adam: weight decay as L2 in the gradient
    lr_cycle: int = 0  # 0: a constant rate; else cosine cycles of this many steps
    lr_warmup: int = 0  # steps of linear warm-up from 0 at the start of each cycle
    ema_rate: float = 0.9999
    ema_warmup: bool = True  # rate min(ema_rate, (1 + step) / (10 + step)): the EMA forgets the random init
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_clip: float | None = 1.0
    save_every: int = 500
    keep_last: int = 3
    log_every: int = 10
    seed: int = 0
    cond_drop_prob: float = 0.0  # conditional models: replace the condition by zeros this often
    device: str = "auto"  # where to train: "auto" (the CUDA GPU if there is one), "cpu", "cuda", "cuda:N"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"`precision` must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        for name in ("steps", "batch_size", "save_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"`ema_rate` must be in [0, 1), got {self.ema_rate}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"`cond_drop_prob` must be in [0, 1], got {self.cond_drop_prob}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"`lr` must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"`weight_decay` must be a finite number >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_cycle < 0 or self.lr_warmup < 0 or (self.lr_warmup and self.lr_warmup >= self.lr_cycle):
            raise ValueError(
                f"`lr_cycle` and `lr_warmup` must be >= 0 with lr_warmup < lr_cycle when warming up, "
                f"got lr_cycle {self.lr_cycle}, lr_warmup {self.lr_warmup}"
            )
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"`grad_clip` must be None or 0 (no clipping) or finite > 0, got {self.grad_clip}")


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of training step ``step`` (0-based): ``config.lr`` throughout, or
    with ``lr_cycle`` the schedule of the paper code's histology model
    (``CosineAnnealingWarmupRestarts`` with ``min_lr`` 0, stepped once per step): each cycle
    of ``lr_cycle`` steps rises linearly from 0 over ``lr_warmup`` steps, then falls to 0
    along half a cosine, and the next cycle starts again from 0. A function of the step
    alone, so a resume continues it exactly."""
    if not config.lr_cycle:
        return config.lr
    k, warm = step % config.lr_cycle, config.lr_warmup
    if k < warm:
        return config.lr * k / warm
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * (k - warm) / (config.lr_cycle - warm)))


def setup_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE`` and
    ``MASTER_ADDR`` in the environment); without torchrun, nothing happens. With CUDA (and
    ``device`` not ``"cpu"``) and a GPU for every local process: nccl, and this process's
    current CUDA device is ``LOCAL_RANK`` (which ``"auto"`` and ``"cuda"`` then name);
    otherwise gloo. Returns ``(rank, world_size)``."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        use_cuda = device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() >= local_world
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return _rank_world()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The randomness of one step (batch, timesteps, noise) depends only on (seed, rank,
    step): a resumed run draws exactly what the uninterrupted run drew."""
    return seeded_generator((seed * 1_000_003 + rank) * 10_000_019 + step)


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete ``checkpoints/step_NNNNNNN`` directory of a run, if any."""
    root = Path(out_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def _save(
    out: Path,
    step: int,
    model: nn.Module,
    ema: UNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    schedule: NoiseSchedule,
    config: TrainConfig,
    diffusion: dict,
) -> Path:
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".step_{step:07d}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(tmp, ema, diffusion=diffusion, extra={"train": dataclasses.asdict(config), "step": step})
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "betas": torch.from_numpy(schedule.betas.copy()),
    }
    torch.save(state, tmp / STATE_NAME)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # a checkpoint directory appears whole or not at all
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[: -config.keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    _publish(out, final)
    return final


def _publish(out: Path, ckpt: Path) -> None:
    """The run folder holds the latest model: the checkpoint's two files, copied (not
    serialised and hashed again), weights first as ``save_model`` writes them."""
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        _atomic_write(out / name, lambda p, name=name: shutil.copyfile(ckpt / name, p))


def _remove_leftovers(out: Path) -> None:
    """What a killed run left half-written: temporary files of the run folder (the model,
    its config, the log's rewrite) and checkpoint folders that were never renamed into place."""
    from nudiff_postproc._io import remove_stale_parts

    remove_stale_parts(out)
    if (out / "checkpoints").is_dir():
        for staging in (out / "checkpoints").glob(".step_*.part"):
            shutil.rmtree(staging, ignore_errors=True)


#: the optimiser settings added on 2026-12-04, as every run saved before then trained
_BEFORE_2026_12_04 = {"optimizer": "adamw", "lr_cycle": 0, "lr_warmup": 0}
_RESUMABLE_CHANGES = ("steps", "save_every", "keep_last", "log_every", "microbatch", "device")
_TRAIN_FLAGS = {
    "batch_size": "--batch",
    "ema_rate": "--ema",
    "cond_drop_prob": "--drop-prob",
    "grad_clip": "--grad-clip",
}
_DIFFUSION_FLAGS = {
    "patches": "the patches of the data (--data / --pairs, --subset)",
    "structure_preset": "--preset",
    "histo_preset": "--preset",
    "preset": "the preset's settings",
    "holdout": "the held-out patches (chosen with --seed)",
}


def _restore(
    ckpt: Path,
    model: UNet,
    ema: UNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    config: TrainConfig,
    settings: dict,
    device: torch.device,
) -> int:
    """Load a checkpoint's weights, EMA and optimiser into the run (in place) after checking
    it was trained with ``config`` and ``settings``; returns its step."""
    from safetensors.torch import load_file

    saved, run = read_config(ckpt), ckpt.parent.parent
    given_train = dataclasses.asdict(config)
    # runs saved before these settings existed trained with what they were then
    saved_train = {**_BEFORE_2026_12_04, **saved.get("train", {})}
    check_resume_settings(run, saved_train, given_train, may_change=_RESUMABLE_CHANGES, flags=_TRAIN_FLAGS)
    # folders move and init only starts a run; the data's patches are compared first (the
    # held-out names, chosen from them, would differ too and hide the cause)
    given = {k: v for k, v in settings.items() if k not in ("data", "init")}
    given = {**({"patches": given.pop("patches")} if "patches" in given else {}), **given}
    check_resume_settings(run, saved.get("diffusion", {}), given, flags=_DIFFUSION_FLAGS)
    path = ckpt / STATE_NAME
    state = read_train_state(path, device=device, keys=("step", "model", "optimizer", "scaler"))
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        ema.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(device)))
        return int(state["step"])
    except (RuntimeError, ValueError, TypeError, KeyError, OSError) as exc:
        refuse_train_state(path, exc)


def _drop_log_rows_after(path: Path, step: int) -> None:
    """Keep the rows of ``log.csv`` up to ``step`` (a resumed run logs the rest again)."""
    if not path.exists():
        return
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(kept) == len(rows):
        return
    _atomic_write(path, lambda tmp: _write_rows(tmp, kept))


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def train(
    model: UNet,
    data: torch.Tensor,
    schedule: NoiseSchedule,
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    resume: bool = False,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    batch_fn: Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
    callback: Callable[[int, UNet], None] | None = None,
    diffusion: dict | None = None,
    progress: bool = True,
) -> UNet:
    """Train ``model`` on ``data`` and return the EMA model.

    Parameters
    ----------
    model : UNet
        The network; with ``config.learn_sigma`` the hybrid loss is used, else the simple one.
    data : (M, C, H, W) float tensor in [-1, 1]
        The training examples; each step draws ``batch_size`` of them (with replacement).
        With ``batch_fn``, whatever ``batch_fn`` turns into ``(x0, cond)``.
    schedule : NoiseSchedule
        The training schedule (timesteps drawn uniformly).
    out_dir : path
        The run directory: ``config.json`` + ``model.safetensors`` (the latest EMA weights,
        loadable with :func:`load_model`), ``checkpoints/step_NNNNNNN/`` (the same plus
        ``train_state.pt``: raw weights, optimiser, step; the last ``keep_last`` kept),
        ``log.csv`` (and ``tensorboard/`` when TensorBoard is installed).
    config : TrainConfig
        ``config.device`` is where the model is moved (in place) and trained; the data stay
        where they are and each batch is moved.
    resume : bool
        Continue from the newest checkpoint of ``out_dir``: on a CPU, 10 + 10 resumed steps
        give the same weights, bit for bit, as 20 uninterrupted ones. A resume may raise
        ``steps`` and change how often it saves, logs and keeps checkpoints, ``microbatch``
        and ``device``; any other setting of ``config`` or of ``diffusion`` (but the data
        folder and ``init``) must be the run's, else a ``ValueError`` names it. Rows of
        ``log.csv`` after the checkpoint (written before a kill) are dropped, so none is
        logged twice.
    augment : callable, optional
        ``augment(batch, generator)`` -> batch, e.g. random dihedral transforms.
    batch_fn : callable, optional
        Conditional models: ``batch_fn(rows, generator) -> (x0, cond)`` makes the images and
        their conditions from the drawn rows of ``data`` (augmenting both together); the model
        is called as ``model(x_t, t, cond)``, and ``config.cond_drop_prob`` of the conditions
        (drawn per sample) are replaced by zeros, the "no condition" of classifier-free
        guidance.
    callback : callable, optional
        ``callback(step, ema_model)`` after every checkpoint (sample grids, metrics), and
        again for the checkpoint a resume starts from (a kill may have come between the two),
        so it must replace, not append, what it writes for a step.
    diffusion : dict, optional
        Diffusion settings written to ``config.json`` (e.g. ``{"schedule": "linear",
        "num_timesteps": 1000}``); the exact betas are kept in ``train_state.pt``.

    Under ``torchrun`` (``torch.distributed`` initialised) the model is wrapped in DDP,
    every rank draws its own batches and noise, and only rank 0 writes.
    """
    if data.ndim != 4 or (batch_fn is None and data.shape[1] != model.config.in_channels):
        raise ValueError(f"`data` must be (M, {model.config.in_channels}, H, W), got {tuple(data.shape)}")
    rank, world = _rank_world()
    out = Path(out_dir)
    device = resolve_device(config.device)
    model.to(device)  # in place, as the training itself
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    adam = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    start = 0
    settings = {"num_timesteps": schedule.num_timesteps, **(diffusion or {})}
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not resume:
        raise FileExistsError(
            f"'{out}' already holds a training run (checkpoints up to {ckpt.name}); pass --resume to continue it "
            "or choose another --out"
        )
    if resume and ckpt is not None:
        start = _restore(ckpt, model, ema, optimizer, scaler, config, settings, device)
        if rank == 0:  # a kill after the checkpoint, before the run folder's copies: redo them
            _publish(out, ckpt)
    if rank == 0:  # a killed run's leftovers: its temporary files, log rows past the checkpoint
        _remove_leftovers(out)
        _drop_log_rows_after(out / "log.csv", start)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    micro = config.microbatch or config.batch_size
    log_path = out / "log.csv"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    writer_tb = None
    if rank == 0:
        try:  # TensorBoard when it is installed; the CSV log always
            from torch.utils.tensorboard import SummaryWriter

            writer_tb = SummaryWriter(str(out / "tensorboard"), purge_step=start if resume else None)
        except ImportError:
            writer_tb = None
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step")
    if start > 0 and rank == 0 and callback is not None:
        # a kill between the checkpoint and its callback would lose the callback's output for
        # good: it runs again for the resumed checkpoint (callbacks replace what they wrote)
        callback(start, ema)
    t_last, logged = time.perf_counter(), []
    for step in range(start, config.steps):
        g = _step_generator(config.seed, rank, step)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))  # dropout
        idx = torch.randint(len(data), (config.batch_size,), generator=g)
        x0, cond = data[idx], None
        if batch_fn is not None:
            x0, cond = batch_fn(x0, g)
            keep = torch.rand(config.batch_size, generator=g) >= config.cond_drop_prob
            cond = (cond * keep.to(cond.dtype)[:, None, None, None]).to(device)
        if augment is not None:
            x0 = augment(x0, g)
        t = torch.randint(schedule.num_timesteps, (config.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, t, noise = x0.to(device), t.to(device), noise.to(device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, config.batch_size, micro):
            sl = slice(i, i + micro)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                c = None if cond is None else cond[sl]
                losses = training_losses(
                    lambda x, tt, c=c: net(x, tt, c),
                    schedule,
                    x0[sl],
                    t[sl],
                    noise[sl],
                    learn_sigma=model.config.learn_sigma,
                )
            loss = losses["loss"].float().mean() * (x0[sl].shape[0] / config.batch_size)
            if not torch.isfinite(loss) and scaler is None:  # fp16: the scaler skips such steps
                raise FloatingPointError(f"loss became {loss.item()} at step {step} (precision {config.precision})")
            (scaler.scale(loss) if scaler is not None else loss).backward()
            total += loss.item()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        took_step = True
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if scaler.get_scale() == 0:  # halved on every skipped step: 166 in a row from 2^16
                raise FloatingPointError(
                    f"the fp16 loss scale fell to 0 at step {step}: the gradients have been inf or NaN on every "
                    f"step for the last ~166 steps (precision {config.precision})"
                )
            took_step = scaler.get_scale() >= scale  # the scale drops when inf/NaN gradients skipped the step
        else:
            optimizer.step()
        if took_step:  # as guided-diffusion: a skipped fp16 step moves neither the weights nor their EMA
            rate = min(config.ema_rate, (1 + step) / (10 + step)) if config.ema_warmup else config.ema_rate
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                    p_ema.lerp_(p, 1.0 - rate)
        logged.append(total)
        done = step + 1
        if rank == 0:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}")
            if done % config.log_every == 0 or done == config.steps:
                now = time.perf_counter()
                new = not log_path.exists()
                with open(log_path, "a", newline="") as fh:
                    writer = csv.writer(fh)
                    if new:
                        writer.writerow(["step", "loss", "steps_per_s"])
                    writer.writerow([done, sum(logged) / len(logged), len(logged) / (now - t_last)])
                if writer_tb is not None:
                    writer_tb.add_scalar("loss", sum(logged) / len(logged), done)
                t_last, logged = now, []
            if done % config.save_every == 0 or done == config.steps:
                _save(out, done, model, ema, optimizer, scaler, schedule, config, settings)
                if callback is not None:
                    callback(done, ema)
    if bar is not None:
        bar.close()
    if writer_tb is not None:
        writer_tb.close()
    if net is not model:
        # release DDP's reducer (and the gloo work it holds) now, while the process group
        # lives: left to interpreter shutdown, gloo can abort the process (SIGABRT)
        del net
        gc.collect()
    return ema
