"""The pipeline's stages for a config: the package CLIs they run and their Python steps."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from pipeline_config import ConfigError, synthetic_grid
from pipeline_runner import Stage, cli

Run = Callable[[list[str]], None]

TOOLS = Path(__file__).resolve().parent


def cli_args(*args: Any) -> list[str]:
    """Command-line words of ``args`` (paths and numbers as text)."""
    return [str(a) for a in args]


def _train_flag_defaults() -> dict[str, Any]:
    """The train commands' defaults of the optimiser flags the configs may set, read off
    their parser (so that a changed default cannot silently change what a config trains)."""
    import argparse

    from nudiff_diffusion import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return {key: parser.get_default(key) for key in ("grad_clip", "optimizer", "weight_decay", "lr_cycle", "lr_warmup")}


def _fresh(path: Path) -> Path:
    """``path`` with a ``.partial`` suffix, emptied: where a stage builds a folder before it
    renames it into place (a killed stage leaves no half-written result)."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _pair_files(src_dir: Path, name: str) -> list[Path]:
    """``src_dir/images/name.*`` and ``src_dir/instance_maps/name.*``."""
    from nudiff_postproc._io import IMAGE_SUFFIXES, INSTANCE_MAP_SUFFIXES

    files = []
    for sub, suffixes in (("images", IMAGE_SUFFIXES), ("instance_maps", INSTANCE_MAP_SUFFIXES)):
        found = [src_dir / sub / f"{name}{s}" for s in suffixes if (src_dir / sub / f"{name}{s}").is_file()]
        if not found:
            raise FileNotFoundError(f"'{src_dir / sub}' has no file for '{name}' (one of {list(suffixes)})")
        files.append(found[0])
    return files


def _link_pair(src_dir: Path, name: str, dst_dir: Path) -> None:
    """Link ``src_dir/{images,instance_maps}/name.*`` into ``dst_dir`` (relative links)."""
    for found in _pair_files(src_dir, name):
        (dst_dir / found.parent.name).mkdir(parents=True, exist_ok=True)
        link = dst_dir / found.parent.name / found.name
        link.symlink_to(os.path.relpath(found.resolve(), link.parent.resolve()))


#: in the prepared data: the content digest of each tile file of a dataset folder it was made from
SOURCES = "sources.json"


def check_prepared_data(config: dict[str, Any]) -> None:
    """Refuse to go on from prepared data whose tiles changed since (edited labels or images
    would otherwise leave stale patches, subsets and models beside test tiles that are
    links to the edited files). Prepared data without a record (before 2026-12-03), or
    from another source folder (the prepare stage's settings name that), is not checked."""
    record = Path(config["out"]) / "data" / SOURCES
    if config["data"]["source"] == "procedural" or not record.is_file():
        return
    try:
        saved = json.loads(record.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"it holds {type(saved).__name__}, not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(
            f"'{record}' (the digests of the tiles the data was prepared from) is unreadable ({exc}); "
            "rerun with `--redo prepare` (which redoes every stage) or give another --out"
        ) from None
    source = Path(config["data"]["source"]).resolve()
    if saved.get("source") != str(source):
        return
    remedy = "restore it, or rerun with `--redo prepare` (which redoes every stage) or another --out"
    for relative, digest in saved.get("files", {}).items():
        path = source / relative
        if not path.is_file():
            raise ConfigError(f"'{path}', a tile the data in '{record.parent}' was prepared from, is gone; {remedy}")
        if _file_digest(str(path)) != digest:
            raise ConfigError(f"'{path}' changed since the data in '{record.parent}' was prepared from it; {remedy}")


def _split_names(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    from nudiff_postproc._folders import dataset_pairs, read_name_list

    data = config["data"]
    folder = Path(data["source"])
    names = [n for n, _, _ in dataset_pairs(folder)]
    if data["train_split"]:
        train = read_name_list(folder / data["train_split"], "split file")
        test = [n for f in data["test_split"] for n in read_name_list(folder / f, "split file")]
    else:
        if len(names) <= data["test_tiles"]:
            raise ValueError(
                f"'{folder}' holds {len(names)} tile(s); data.test_tiles = {data['test_tiles']} leaves none"
            )
        train, test = names[: -data["test_tiles"]], names[-data["test_tiles"] :]
    missing = sorted(set(train + test) - set(names))
    if missing:
        raise ValueError(f"'{folder}' lacks {len(missing)} tile(s) of the splits, e.g. {missing[:3]}")
    return train, test


def prepare(run: Run, *, config: dict[str, Any]) -> None:
    """Train/test tiles, 256 px patches of the training tiles and the labelled subset,
    built in ``data.partial`` and renamed to ``data``."""
    from nudiff_postproc import write_synthetic_dataset
    from nudiff_postproc._folders import read_name_list
    from nudiff_postproc._io import replace_folder

    out = Path(config["out"])
    tmp = _fresh(out / "data")
    data = config["data"]
    if data["source"] == "procedural":
        write_synthetic_dataset(tmp / "tiles", data["tiles"], size=data["tile_size"], seed=data["seed"])
        source = tmp / "tiles"
        names = sorted(p.stem for p in (source / "images").iterdir())
        train, test = names[: -data["test_tiles"]], names[-data["test_tiles"] :]
    else:
        source = Path(data["source"]).resolve()
        train, test = _split_names(config)
    for split, names in (("train", train), ("test", test)):
        for name in names:
            _link_pair(source, name, tmp / split)
    if data["source"] != "procedural":  # what check_prepared_data compares with on later runs
        files = [f for name in train + test for f in _pair_files(source, name)]
        digests = {str(f.relative_to(source)): _file_digest(str(f)) for f in files}
        (tmp / SOURCES).write_text(json.dumps({"source": str(source), "files": digests}, indent=1) + "\n")
    p = config["prepare"]
    patches = ["--data", tmp / "train", "--out", tmp / "patches", "--size", p["patch_size"], "--stride", p["stride"]]
    run(cli("nudiff_postproc", "patches", *patches))
    subset = ["--data", tmp / "patches", "--fraction", p["fraction"], "--seed", p["seed"], "--out", tmp / "subset.txt"]
    run(cli("nudiff_postproc", "subset", *subset))
    for name in read_name_list(tmp / "subset.txt"):
        _link_pair(tmp / "patches", name, tmp / "subset")
    replace_folder(tmp, out / "data")


def export_engine(run: Run, *, config: dict[str, Any]) -> None:
    """The histology model as ONNX graphs with the SPADE modulation cached per batch."""
    from nudiff_postproc._io import replace_folder

    out = Path(config["out"])
    tmp = _fresh(out / "engines")
    batch = 2 * config["sample"]["batch"]  # guidance runs the conditional and unconditional halves as one batch
    graph = tmp / "histo" / "model.onnx"
    run(
        cli_args(sys.executable, TOOLS / "export_onnx.py", out / "histo", "-o", graph, "--cached-modulation")
        + cli_args("--batch-max", batch)
    )
    replace_folder(tmp, out / "engines")


def synthetic_for_seg(run: Run, *, config: dict[str, Any]) -> None:
    """Synthetic pairs at the segmentation's scale (``nudiff-histo seg-tiles``): images
    upsampled to the tiles' resolution with the instance maps they were painted for, and
    ``grid`` x ``grid`` of them side by side when one is smaller than a HoVer-Net
    input window."""
    from nudiff_histo import write_seg_tiles

    out = Path(config["out"])
    grid = synthetic_grid(config)
    write_seg_tiles(out / "synthetic", out / "synthetic-seg", preset=config["histo"]["preset"], grid=grid)


def build_stages(config: dict[str, Any]) -> list[Stage]:
    """The stages of ``config`` in a valid order, with their commands and outputs (paths
    under the output folder resolved, as the runner's fingerprints expect them)."""
    out = Path(config["out"]).resolve()
    data = out / "data"
    s, h, smp, seg = config["structure"], config["histo"], config["sample"], config["seg"]
    launch = config["launch"]["nproc_per_node"]

    def trainer(package: str, *args: Any) -> list[str]:
        command = cli(package, "train", *args)
        if launch > 1:  # DDP: every process draws its own --batch, so a step sees batch x processes
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launch}"] + command[1:]
        return command

    defaults = _train_flag_defaults()

    def common(section: dict[str, Any]) -> list[Any]:
        # optimiser flags only where they are not the commands' defaults: earlier runs' commands stay the same
        optimiser_flags = [
            word
            for key, default in defaults.items()
            if section[key] != default
            for word in ("--" + key.replace("_", "-"), section[key])
        ]
        return [
            "--batch",
            section["batch"],
            "--ema",
            section["ema"],
            *optimiser_flags,
            "--save-every",
            section["save_every"],
            "--resume",
        ]

    stages: list[Stage] = []

    def add(stage: Stage, fn: Any = None) -> None:
        if fn is not None:
            stage.python = partial(fn, config=config)
        stages.append(stage)

    legacy = [config["data"], config["prepare"]]  # what markers of the earlier format hashed
    add(Stage("prepare", [], outputs=[data], settings=_prepare_settings(config), legacy_settings=legacy), prepare)
    structure_cmd = trainer("nudiff_structure", "--data", data / "subset", "--out", out / "structure")
    structure_cmd += cli_args("--preset", s["preset"], "--steps", s["steps"], "--lr", s["lr"], *common(s))
    training = ("--save-every",)  # how often a training saves does not change what it trains
    add(
        Stage(
            "structure-train",
            ["prepare"],
            [structure_cmd],
            outputs=[out / "structure"],
            free_flags=training,
            resumable=True,
        )
    )
    pairs = ["--pairs", data / "subset", "--preset", h["preset"]]
    # the flag only where it differs from the default: earlier runs' commands stay the same
    placement = [] if h["spade_layers"] == "decoder" else ["--spade-layers", h["spade_layers"]]
    placement += [] if h["cond_foreground"] == "binary" else ["--cond-foreground", h["cond_foreground"]]
    if h["finetune_steps"] > 0:  # the paper's two phases
        phases = [
            ["--out", out / "histo-pretrain", "--steps", h["pretrain_steps"], "--lr", h["lr"], "--drop-prob", 0]
            + placement,
            ["--out", out / "histo", "--init", out / "histo-pretrain", "--steps", h["finetune_steps"]]
            + ["--lr", h["finetune_lr"], "--drop-prob", h["drop_prob"]],
        ]
    else:
        phases = [
            ["--out", out / "histo", "--steps", h["pretrain_steps"], "--lr", h["lr"], "--drop-prob", h["drop_prob"]]
            + placement
        ]
    histo_cmds = [trainer("nudiff_histo", *pairs, *phase, *common(h)) for phase in phases]
    add(
        Stage(
            "histo-train",
            ["prepare"],
            histo_cmds,
            outputs=[out / "histo-pretrain", out / "histo"],
            free_flags=training,
            resumable=True,
        )
    )
    sampling = ["--sampler", smp["sampler"], "--steps", smp["steps"], "--seed", smp["seed"], "--batch", smp["batch"]]
    structures = out / "synthetic-structures"
    command = cli("nudiff_structure", "sample", "--checkpoint", out / "structure", "--num", smp["num"], *sampling)
    # each sample starts from its own seeded noise, so a deterministic sampler's results do not
    # depend on the batch size (nor, since 2026-12-03, ddpm's, whose step noise is drawn per
    # sample; its --batch stays in the fingerprint so that ddpm stages that finished before
    # keep their markers)
    free = ("--batch",) if smp["sampler"] != "ddpm" else ()
    add(
        Stage(
            "structure-sample",
            ["structure-train"],
            [command + ["--out", str(structures)]],
            outputs=[structures],
            free_flags=free,
            resumable=True,
        )
    )
    if smp["engine"] == "onnx":
        add(Stage("histo-engine", ["histo-train"], outputs=[out / "engines"], settings=smp["batch"]), export_engine)
        source, deps = ["--engine", out / "engines" / "histo" / "model.onnx"], ["structure-sample", "histo-engine"]
    else:
        source, deps = ["--checkpoint", out / "histo"], ["structure-sample", "histo-train"]
    command = cli("nudiff_histo", "sample", "--structures", structures, *source, *sampling)
    command += cli_args("--guidance", smp["guidance"], "--out", out / "synthetic")
    add(Stage("histo-sample", deps, [command], outputs=[out / "synthetic"], free_flags=free, resumable=True))
    add(
        # the labels' making is a setting: tiles made before 2026-12-04 (maps post-processed again
        # from the re-encoded structures) are named as made otherwise, to be redone
        Stage(
            "synthetic-seg",
            ["histo-sample"],
            outputs=[out / "synthetic-seg"],
            settings={"seg_preset": seg["preset"], "labels": "painted-for maps, upsampled"},
        ),
        synthetic_for_seg,
    )
    test = data / "test"
    encoder = _file_digest(seg["encoder_weights"]) if seg["encoder_weights"] else None  # the file's content
    for run in seg["runs"]:
        name = run["name"]
        command = cli("nudiff_seg", "train", "--real", data / "patches")
        command += cli_args("--subset", data / "subset.txt") if run["real"] == "subset" else []
        if run["synthetic"]:
            command += cli_args("--synthetic", out / "synthetic-seg", "--synthetic-ratio", run["synthetic_ratio"])
        command += cli_args("--preset", seg["preset"], "--epochs", run["epochs"], "--batch", seg["batch"])
        command += cli_args("--lr", seg["lr"], "--seed", seg["seed"], "--out", out / "seg" / name, "--resume")
        command += cli_args("--encoder-weights", seg["encoder_weights"]) if seg["encoder_weights"] else []
        command += cli_args("--frozen-epochs", seg["frozen_epochs"]) if seg["frozen_epochs"] >= 0 else []
        command += cli_args("--frozen-batch", seg["frozen_batch"]) if seg["frozen_batch"] > 0 else []
        # always named: stages that ran before these flags (or with only --windows) cut the synthetic
        # tiles otherwise under the same command line, so their markers must not match
        command += cli_args("--windows", seg["windows"], "--synthetic-windows", seg["synthetic_windows"])
        deps = ["prepare"] + (["synthetic-seg"] if run["synthetic"] else [])
        add(
            Stage(
                f"seg-train-{name}",
                deps,
                [command],
                outputs=[out / "seg" / name],
                settings=encoder,
                free_flags=("--encoder-weights",),  # the file's content is in the settings, not its path
                resumable=True,
                legacy_settings=None,
            )
        )
        predictions, scores = out / "predictions" / name, out / "eval" / f"{name}.csv"
        commands = [
            cli("nudiff_seg", "predict", "--checkpoint", out / "seg" / name, "--images", test / "images")
            + cli_args("--out", predictions),
            cli("nudiff_seg", "evaluate", "--true", test / "instance_maps", "--pred", predictions / "instance_maps")
            + cli_args("--out", scores),
        ]
        add(Stage(f"seg-eval-{name}", [f"seg-train-{name}"], commands, outputs=[predictions, scores], resumable=True))
    evals = out / "eval"
    judge = [
        cli(
            "nudiff_structure", "evaluate", "--samples", structures, "--real", test, "--out", evals / "structures.json"
        ),
        cli(
            "nudiff_histo",
            "evaluate",
            "--samples",
            out / "synthetic",
            "--real",
            test,
            "--out",
            evals / "histology.json",
        ),
    ]
    deps = ["histo-sample", "synthetic-seg"]
    real_only = next((r["name"] for r in seg["runs"] if not r["synthetic"]), None)
    if real_only:  # label fidelity: a model that saw real labels only, scored on the synthetic pairs
        judge.append(
            cli("nudiff_seg", "fidelity", "--checkpoint", out / "seg" / real_only, "--pairs", out / "synthetic-seg")
            + cli_args("--real", test, "--out", evals / "fidelity.json")
        )
        deps.append(f"seg-train-{real_only}")
    outputs = [evals / "structures.json", evals / "histology.json", evals / "fidelity.json"]
    add(Stage("judge-synthetic", deps, judge, outputs=outputs))
    from pipeline_report import write_report

    outputs = [out / "report.md", out / "report.html", out / "figures"]
    names = [st.name for st in stages]
    add(
        Stage("report", names, outputs=outputs, settings=config["report"]),
        partial(write_report, stages=[*names, "report"]),
    )
    return stages


def _prepare_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What the prepared data depends on: the data and prepare settings, and for a dataset
    folder the tiles each split holds (an edited split file, or tiles added to a folder
    split by its last ``test_tiles``, make new data) instead of the split files' names."""
    data = dict(config["data"])
    if data["source"] != "procedural":
        try:
            train, test = _split_names(config)
        except ValueError as exc:  # before any work, as the config's own checks
            raise ConfigError(f"data.source: {exc}") from None
        # procedural-only keys, and the split's file names (or count) where the tiles say it all
        unused = ["tiles", "tile_size", "seed", "train_split", "test_split"]
        unused += ["test_tiles"] if data["train_split"] else []
        data = {k: v for k, v in data.items() if k not in unused}
        data.update(source=str(Path(data["source"]).resolve()), train_names=train, test_names=test)
    return {"data": data, "prepare": config["prepare"]}


def _file_digest(path: str) -> str:
    """sha256 of a file's content (16 hex)."""
    from nudiff_postproc._io import file_sha256

    return file_sha256(path)[:16]
