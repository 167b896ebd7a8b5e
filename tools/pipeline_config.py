"""The pipeline's configuration: a TOML file checked against one schema before any work.

Every key has a default here; a config file overrides what it names. An unknown section
or key, a value of the wrong type or a data folder that does not exist is an error that
names it (``ConfigError``), raised before any stage starts.
"""

from __future__ import annotations

import copy
import math
import os
import tomllib
from pathlib import Path
from typing import Any

SEG_RUN_KEYS = {"name": str, "real": str, "synthetic": bool, "epochs": int}
#: keys a run may leave out, and their defaults: "pool" shuffles real and synthetic windows
#: together (the paper); a number in (0, 1) is the synthetic share of every batch
SEG_RUN_OPTIONAL = {"synthetic_ratio": "pool"}

#: Defaults of every section and key (types are taken from these values).
DEFAULTS: dict[str, Any] = {
    "name": "nudiff",
    "out": "pipeline_out",
    "parallel": 2,  # stages that may run at once (each gets cores / parallel threads)
    "threads": 0,  # cores to use; 0: every usable core (nudiff_postproc.usable_cores)
    "data": {
        "source": "procedural",  # "procedural" or a dataset folder (images/, instance_maps/)
        "tiles": 8,  # procedural: tiles generated
        "tile_size": 512,  # procedural: side in pixels
        "test_tiles": 2,  # the last N tiles (sorted names) are the test set, unless splits are given
        "train_split": "",  # folder source: file (relative to the folder) of training tile names
        "test_split": [""],  # folder source: file(s) of test tile names
        "seed": 0,
    },
    "prepare": {"patch_size": 256, "stride": 128, "fraction": 0.1, "seed": 0},
    "structure": {
        "preset": "tiny-64",
        "steps": 400,
        "batch": 4,
        "lr": 2e-4,
        "ema": 0.999,
        "grad_clip": 1.0,  # the gradients' global norm is clipped to this; 0: not clipped (the paper's code)
        "optimizer": "adamw",  # or "adam" (weight decay as L2: the paper's histology model)
        "weight_decay": 0.05,
        "lr_cycle": 0,  # cosine cycles of this many steps; 0: a constant rate
        "lr_warmup": 0,  # linear warm-up steps at the start of each cycle
        "save_every": 200,
    },
    "histo": {
        "preset": "tiny-64",
        "pretrain_steps": 300,  # the paper's first phase: no condition dropping
        "finetune_steps": 100,  # its second phase: dropping at drop_prob, lr finetune_lr (0: one phase)
        "batch": 4,
        "lr": 2e-4,
        "finetune_lr": 2e-5,
        "drop_prob": 0.2,
        "ema": 0.999,
        "grad_clip": 1.0,  # as structure.grad_clip, and the four below
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "lr_cycle": 0,
        "lr_warmup": 0,
        "save_every": 100,
        # where the SPADE layers sit: "decoder" (the paper's) or "all" (every normalisation:
        # a model of a few hundred CPU steps paints from its structure only this way)
        "spade_layers": "decoder",
        # the conditions' foreground: "binary" (the paper's: zeros, the null condition, are an
        # empty structure) or "signed" (zeros a token of their own)
        "cond_foreground": "binary",
    },
    "sample": {
        "num": 64,
        "sampler": "dpmpp2m",
        "steps": 20,
        "guidance": 2.0,
        "batch": 8,
        "engine": "onnx",  # "onnx" (ONNX Runtime, cached modulation) or "pytorch"
        "seed": 0,
    },
    "seg": {
        "preset": "tiny",
        "batch": 4,
        "lr": 1e-3,
        "seed": 0,
        # ImageNet ResNet-50 weights for the encoder: HoVer-Net's ImageNet-ResNet50-Preact_pytorch.tar or
        # torchvision's .pth / .safetensors; "": from scratch
        "encoder_weights": "",
        # how the real and the synthetic tiles are cut: "valid" (windows inside the tile) or "mirror"
        # (HoVer-Net's extract_patches: the outputs cover the tile, the input mirrored beyond it)
        "windows": "valid",
        "synthetic_windows": "mirror",
        "frozen_epochs": -1,  # phase-1 epochs with the encoder frozen; -1: nudiff-seg's default
        "frozen_batch": 0,  # phase 1's batch; 0: seg.batch
        "runs": [
            {"name": "subset", "real": "subset", "synthetic": False, "epochs": 20},
            {"name": "subset+synthetic", "real": "subset", "synthetic": True, "epochs": 10},
        ],
    },
    # real_pictures = false leaves out the pictures that show real tiles (licensed data that
    # must not be copied, e.g. into a repository)
    "report": {"pictures": 8, "real_pictures": True},
    # paper-scale configs: launch the training stages under torchrun on this many processes
    "launch": {"nproc_per_node": 1},
}


class ConfigError(ValueError):
    """A config that cannot run; the message names the file, key and value."""


def _merge(defaults: dict[str, Any], given: dict[str, Any], where: str, source: str) -> dict[str, Any]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"known keys of {where.rstrip('.') or 'the top level'}: {sorted(defaults)}"
        )
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        default = defaults[key]
        name = where + key
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table, got {value!r}")
            out[key] = _merge(default, value, name + ".", source)
        elif key == "runs":
            out[key] = [_seg_run(r, f"{name}[{i}]", source) for i, r in enumerate(_as_list(value, name, source))]
        elif key == "test_split":
            out[key] = [str(v) for v in ([value] if isinstance(value, str) else _as_list(value, name, source))]
        else:
            out[key] = _typed(value, default, name, source)
    return out


def _as_list(value: Any, name: str, source: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{source}: {name} must be a list, got {value!r}")
    return value


def _typed(value: Any, default: Any, name: str, source: str) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{source}: {name} must be a {type(default).__name__}, got {value!r}")
    return value


def _seg_run(run: Any, name: str, source: str) -> dict[str, Any]:
    if not isinstance(run, dict):
        raise ConfigError(f"{source}: {name} must be a table, got {run!r}")
    unknown = sorted(set(run) - set(SEG_RUN_KEYS) - set(SEG_RUN_OPTIONAL))
    missing = sorted(set(SEG_RUN_KEYS) - set(run))
    if unknown or missing:
        raise ConfigError(
            f"{source}: {name} has unknown key(s) {unknown} / lacks {missing}; a run has {sorted(SEG_RUN_KEYS)} "
            f"and may have {sorted(SEG_RUN_OPTIONAL)}"
        )
    for key, kind in SEG_RUN_KEYS.items():
        if not isinstance(run[key], kind) or (kind is int and isinstance(run[key], bool)):
            raise ConfigError(f"{source}: {name}.{key} must be a {kind.__name__}, got {run[key]!r}")
    if run["real"] not in ("subset", "full"):
        raise ConfigError(f"{source}: {name}.real must be 'subset' or 'full', got {run['real']!r}")
    if not run["name"] or any(c in run["name"] for c in "/\\ |") or run["name"].startswith("."):
        raise ConfigError(
            f"{source}: {name}.name must be a non-empty folder name without '/', '\\', spaces or '|' (the "
            f"report's tables), not hidden, got {run['name']!r}"
        )
    if run["epochs"] < 1:
        raise ConfigError(f"{source}: {name}.epochs must be >= 1, got {run['epochs']}")
    run = {**SEG_RUN_OPTIONAL, **run}
    ratio = run["synthetic_ratio"]
    if ratio != "pool" and (
        not run["synthetic"] or isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1
    ):
        raise ConfigError(
            f"{source}: {name}.synthetic_ratio must be 'pool' or, with synthetic = true, a share of each batch in "
            f"(0, 1), got {ratio!r} (synthetic = {str(run['synthetic']).lower()})"
        )
    return run


def _apply_overrides(given: dict[str, Any], overrides: list[str], source: str) -> None:
    """``section.key=value`` strings (the value in TOML syntax) written into ``given``."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. structure.steps=100")
        try:
            parsed = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()  # a bare string
        *sections, last = key.strip().split(".")
        node = given
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {section} is not a table in {source}")
        node[last] = parsed


def load_config(
    path: str | os.PathLike[str],
    *,
    data: str | None = None,
    out: str | None = None,
    overrides: list[str] = (),
) -> dict[str, Any]:
    """Read, merge with the defaults and check a config file.

    Parameters
    ----------
    path : path
        The TOML file.
    data : str, optional
        A dataset folder that replaces ``data.source`` (the ``--data`` flag or
        ``$NUDIFF_DATA``).
    out : str, optional
        The output folder, replacing ``out``.
    overrides : list of str
        ``section.key=value`` settings (TOML values) that replace the file's.

    Returns
    -------
    dict
        The full config, every key present; ``data.source`` and ``out`` as given (relative
        paths are relative to the working directory).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: '{path}'")
    try:
        given = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"'{path}' is not valid TOML: {exc}") from exc
    _apply_overrides(given, list(overrides), f"'{path}'")
    config = _merge(DEFAULTS, given, "", f"'{path}'")
    if data:
        config["data"]["source"] = data
    if out:
        config["out"] = out
    _check(config, f"'{path}'")
    return config


# (section, key, smallest allowed value) of the counts and sizes
_AT_LEAST = [
    ("data", "tiles", 2),
    ("data", "tile_size", 1),
    ("data", "test_tiles", 1),
    ("prepare", "patch_size", 1),
    ("prepare", "stride", 1),
    ("structure", "steps", 1),
    ("structure", "batch", 1),
    ("structure", "save_every", 1),
    ("histo", "pretrain_steps", 1),
    ("histo", "finetune_steps", 0),
    ("histo", "batch", 1),
    ("histo", "save_every", 1),
    ("structure", "lr_cycle", 0),
    ("structure", "lr_warmup", 0),
    ("histo", "lr_cycle", 0),
    ("histo", "lr_warmup", 0),
    ("sample", "num", 1),
    ("sample", "steps", 1),
    ("sample", "batch", 1),
    ("seg", "batch", 1),
    ("seg", "frozen_batch", 0),
    ("report", "pictures", 0),
    ("launch", "nproc_per_node", 1),
]
# (section, key, low, high, low included, high included) of the real-valued settings
_WITHIN = [
    ("structure", "lr", 0.0, math.inf, False, False),
    ("structure", "ema", 0.0, 1.0, True, False),
    ("structure", "grad_clip", 0.0, math.inf, True, False),
    ("histo", "grad_clip", 0.0, math.inf, True, False),
    ("structure", "weight_decay", 0.0, math.inf, True, False),
    ("histo", "weight_decay", 0.0, math.inf, True, False),
    ("histo", "lr", 0.0, math.inf, False, False),
    ("histo", "finetune_lr", 0.0, math.inf, False, False),
    ("histo", "drop_prob", 0.0, 1.0, True, True),
    ("histo", "ema", 0.0, 1.0, True, False),
    ("sample", "guidance", 0.0, math.inf, True, False),
    ("seg", "lr", 0.0, math.inf, False, False),
]


def synthetic_grid(config: dict[str, Any]) -> int:
    """Synthetic pairs side by side (per axis) in one segmentation tile: enough to cover a
    HoVer-Net input window at the tiles' resolution."""
    from nudiff_histo import seg_tile_grid
    from nudiff_seg import PRESETS as SEG_PRESETS

    return seg_tile_grid(config["histo"]["preset"], SEG_PRESETS[config["seg"]["preset"]].input_size)


def _check_ranges(config: dict[str, Any], source: str) -> None:
    for section, key, least in _AT_LEAST:
        value = config[section][key]
        if value < least:
            raise ConfigError(f"{source}: {section}.{key} must be >= {least}, got {value}")
    for section, key, low, high, low_in, high_in in _WITHIN:
        value = config[section][key]
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (math.isfinite(value) and above and below):
            span = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ConfigError(f"{source}: {section}.{key} must be a finite number in {span}, got {value}")
    if config["prepare"]["stride"] > config["prepare"]["patch_size"]:
        raise ConfigError(
            f"{source}: prepare.stride ({config['prepare']['stride']}) must not exceed prepare.patch_size "
            f"({config['prepare']['patch_size']}): the patches would leave gaps"
        )
    if config["sample"]["steps"] > 1000:  # the models' schedules have 1000 steps
        raise ConfigError(
            f"{source}: sample.steps must be at most 1000 (the schedule's steps), got {config['sample']['steps']}"
        )
    from nudiff_diffusion import check_sampler_settings

    try:
        check_sampler_settings(config["sample"]["sampler"], 1, None)
    except ValueError as exc:
        raise ConfigError(f"{source}: sample.sampler: {exc}") from None


def _check_splits(folder: Path, train_split: str, test_splits: list[str], source: str) -> None:
    """Split files name each tile once, and no tile is in both the training and the test set."""
    from nudiff_postproc._folders import read_name_list

    for i, split in enumerate(test_splits):
        if not split:
            raise ConfigError(f"{source}: data.test_split[{i}] is empty; expected a file name (relative to the folder)")
    seen: dict[str, str] = {}
    for split in [train_split, *test_splits]:
        try:
            names = read_name_list(folder / split, "split file")
        except ValueError as exc:  # no name in it, or not text
            raise ConfigError(f"{source}: split file {exc}") from None
        for name in names:
            if name in seen:
                where = "twice in it" if seen[name] == split else f"also in '{folder / seen[name]}'"
                raise ConfigError(f"{source}: split file '{folder / split}' names {name!r} {where}")
            seen[name] = split


def _check(config: dict[str, Any], source: str) -> None:
    from nudiff_postproc import PATCH_GEOMETRY
    from nudiff_seg import PRESETS as SEG_PRESETS

    _check_ranges(config, source)
    data = config["data"]
    if data["source"] != "procedural":
        folder = Path(data["source"])
        for sub in ("", "images", "instance_maps"):
            if not (folder / sub).is_dir():
                raise ConfigError(
                    f"{source}: data folder '{folder / sub}' not found (data.source, --data or $NUDIFF_DATA: a folder "
                    "with images/ and instance_maps/)"
                )
        for split in [data["train_split"], *data["test_split"]]:
            if split and not (folder / split).is_file():
                raise ConfigError(f"{source}: split file '{folder / split}' not found")
        if bool(data["train_split"]) != any(data["test_split"]):
            raise ConfigError(f"{source}: give both data.train_split and data.test_split, or neither")
        if data["train_split"]:
            _check_splits(folder, data["train_split"], data["test_split"], source)
    else:
        if data["tiles"] <= data["test_tiles"]:
            raise ConfigError(
                f"{source}: data.tiles ({data['tiles']}) must exceed data.test_tiles ({data['test_tiles']})"
            )
        if data["train_split"] or any(data["test_split"]):
            raise ConfigError(
                f"{source}: data.train_split / data.test_split name files of a dataset folder; data.source is "
                "'procedural' (give the folder with --data, or drop the split files)"
            )
        if data["tile_size"] < config["prepare"]["patch_size"]:
            raise ConfigError(
                f"{source}: data.tile_size ({data['tile_size']}) must be at least prepare.patch_size "
                f"({config['prepare']['patch_size']})"
            )
    if data["source"] != "procedural":
        inside = Path(data["source"]).resolve()
        top = Path(config["out"]).resolve()
        if inside == top or top in inside.parents:
            raise ConfigError(
                f"{source}: the data folder '{data['source']}' lies inside the output folder '{config['out']}', whose "
                "folders the stages replace; move it or give another --out"
            )
    from nudiff_diffusion._trainer import OPTIMIZERS

    for section in ("structure", "histo"):
        if config[section]["preset"] not in PATCH_GEOMETRY:
            raise ConfigError(
                f"{source}: {section}.preset {config[section]['preset']!r} is not one of {sorted(PATCH_GEOMETRY)}"
            )
        if config[section]["optimizer"] not in OPTIMIZERS:
            optimizer = config[section]["optimizer"]
            raise ConfigError(f"{source}: {section}.optimizer {optimizer!r} must be one of {OPTIMIZERS}")
        cycle, warmup = config[section]["lr_cycle"], config[section]["lr_warmup"]
        if warmup and warmup >= cycle:
            raise ConfigError(
                f"{source}: {section}.lr_warmup ({warmup}) must be below {section}.lr_cycle ({cycle}): "
                "the warm-up starts each cycle"
            )
    from nudiff_histo import COND_FOREGROUNDS, SPADE_LAYERS

    for key, choices in (("spade_layers", SPADE_LAYERS), ("cond_foreground", COND_FOREGROUNDS)):
        if config["histo"][key] not in choices:
            raise ConfigError(
                f"{source}: histo.{key} {config['histo'][key]!r} must be one of {choices} (the paper's: {choices[0]!r})"
            )
    if config["structure"]["preset"] != config["histo"]["preset"]:
        raise ConfigError(
            f"{source}: structure.preset {config['structure']['preset']!r} and histo.preset "
            f"{config['histo']['preset']!r} must match (the histology model paints the structures' size)"
        )
    if config["seg"]["preset"] not in SEG_PRESETS:
        raise ConfigError(f"{source}: seg.preset {config['seg']['preset']!r} is not one of {sorted(SEG_PRESETS)}")
    patch = config["prepare"]["patch_size"]
    for what, need in (
        (f"seg.preset {config['seg']['preset']!r} (its input window)", SEG_PRESETS[config["seg"]["preset"]].input_size),
        (
            f"structure.preset {config['structure']['preset']!r}",
            PATCH_GEOMETRY[config["structure"]["preset"]].patch_size,
        ),
    ):
        if patch < need:
            raise ConfigError(f"{source}: prepare.patch_size ({patch}) must be at least {need} for {what}")
    if config["sample"]["engine"] not in ("onnx", "pytorch"):
        raise ConfigError(f"{source}: sample.engine must be 'onnx' or 'pytorch', got {config['sample']['engine']!r}")
    if not 0 < config["prepare"]["fraction"] <= 1:
        raise ConfigError(f"{source}: prepare.fraction must be in (0, 1], got {config['prepare']['fraction']}")
    from nudiff_seg._data import WINDOWS

    for key in ("windows", "synthetic_windows"):
        if config["seg"][key] not in WINDOWS:
            raise ConfigError(f"{source}: seg.{key} {config['seg'][key]!r} must be one of {WINDOWS}")
    weights = config["seg"]["encoder_weights"]
    if weights and not Path(weights).is_file():
        raise ConfigError(f"{source}: seg.encoder_weights file '{weights}' not found")
    frozen = config["seg"]["frozen_epochs"]
    if frozen < -1:
        raise ConfigError(f"{source}: seg.frozen_epochs must be >= 0 (or -1: the default), got {frozen}")
    names = [r["name"] for r in config["seg"]["runs"]]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"{source}: seg.runs must be a non-empty list with distinct names, got {names}")
    shortest = min(config["seg"]["runs"], key=lambda r: r["epochs"])
    if frozen > shortest["epochs"]:
        raise ConfigError(
            f"{source}: seg.frozen_epochs ({frozen}) must not exceed the epochs of every run "
            f"(run {shortest['name']!r} has {shortest['epochs']})"
        )
    from nudiff_seg import check_synthetic_ratio

    batches = {"seg.batch": config["seg"]["batch"]}
    if config["seg"]["frozen_batch"] > 0:  # nudiff-seg builds phase 1's batches even for 0 frozen epochs
        batches["seg.frozen_batch"] = config["seg"]["frozen_batch"]
    for i, run in enumerate(config["seg"]["runs"]):
        for key, batch in batches.items():
            try:  # nudiff-seg's own rule, checked here rather than when the training starts, hours in
                check_synthetic_ratio(run["synthetic_ratio"], batch, f"seg.runs[{i}].synthetic_ratio ({key} {batch})")
            except ValueError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    grid = synthetic_grid(config)  # synthetic-seg always runs (the judge scores its tiles)
    if config["sample"]["num"] < grid * grid:
        raise ConfigError(
            f"{source}: sample.num ({config['sample']['num']}) must be >= {grid * grid}: a "
            f"{config['seg']['preset']} HoVer-Net window holds {grid}x{grid} synthetic pairs of the "
            f"{config['histo']['preset']} preset, and fewer pairs give no synthetic training tile"
        )
    for key in ("parallel",):
        if config[key] < 1:
            raise ConfigError(f"{source}: {key} must be >= 1, got {config[key]}")
    if config["threads"] < 0:
        raise ConfigError(f"{source}: threads must be >= 0, got {config['threads']}")
