"""The nudiff-histo CLI: train -> sample -> evaluate, resumable and sharded painting, bad input."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from nudiff_diffusion import RUN_STAMP, TrainConfig, structures_to_tensor
from nudiff_histo import _sample as sample_module
from nudiff_histo import build_pairs, paired_batch, pairs_to_rows
from nudiff_histo.cli import main
from nudiff_postproc import (
    DIHEDRAL,
    encode_structure,
    read_image,
    read_instance_map,
    synthetic_instance_map,
    transform_image,
    transform_structure,
    write_image,
    write_instance_map,
)


def _tile(seed: int, size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    inst = synthetic_instance_map((size, size), n_nuclei=18, seed=seed)
    rng = np.random.default_rng(seed)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = (230, 170, 200)  # eosin pink
    image[inst > 0] = (80, 50, 140)  # haematoxylin purple
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    return image, inst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("histo")
    for i in range(3):
        image, inst = _tile(i)
        write_image(root / "pairs" / "images" / f"t{i}.png", image)
        write_instance_map(root / "pairs" / "instance_maps" / f"t{i}.png", inst)
    args = ["--quiet", "train", "--pairs", str(root / "pairs"), "--out", str(root / "run")]
    assert main([*args, "--steps", "4", "--batch", "2", "--save-every", "2"]) == 0
    return root


def _sample(root, out, *extra):
    return main(
        [
            "--quiet",
            "sample",
            "--structures",
            str(root / "pairs"),
            "--checkpoint",
            str(root / "run"),
            "--sampler",
            "ddim",
            "--steps",
            "3",
            "--batch",
            "3",
            "--out",
            str(out),
            *extra,
        ]
    )


def test_round_trip(run, capsys):
    assert (run / "run" / "config.json").is_file()
    config = json.loads((run / "run" / "config.json").read_text())
    assert config["diffusion"]["kind"] == "histo" and config["train"]["cond_drop_prob"] == 0.2
    assert sorted(p.name for p in (run / "run" / "previews").iterdir()) == ["step_0000002.png", "step_0000004.png"]
    out = run / "synthetic"
    assert _sample(run, out) == 0
    names = sorted(p.stem for p in (out / "images").iterdir())
    assert len(names) == 12  # 3 tiles of 192 px: 2 x 2 patches of 128 px each, downscaled to 64
    for sub, suffix in (("instance_maps", ".png"), ("structures", ".npy")):
        assert sorted(p.stem for p in (out / sub).iterdir() if p.suffix == suffix) == names
    image = read_image(out / "images" / f"{names[0]}.png")
    inst = read_instance_map(out / "instance_maps" / f"{names[0]}.png")
    structure = np.load(out / "structures" / f"{names[0]}.npy")
    assert image.shape == (64, 64, 3) and inst.shape == (64, 64) and structure.shape == (64, 64, 3)
    np.testing.assert_array_equal(structure, encode_structure(inst, min_size=8, centre="nearest"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["guidance"] == 2.0 and manifest["drawn_now"] == 12 and (out / "preview.png").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(out), "--real", str(run / "pairs")]) == 0
    printed = capsys.readouterr().out
    assert "alignment" in printed and "h_wasserstein" in printed
    result = json.loads((out / "evaluation.json").read_text())
    assert result["samples"] == 12 and result["real_patches"] == 12
    assert result["real_alignment"] > 2.0  # the real tiles: nuclei far darker in haematoxylin


def test_real_patches_against_themselves_measure_zero(run, tmp_path):
    from nudiff_histo._evaluate import evaluate_histology

    images, maps, names = build_pairs(run / "pairs", "tiny-64")
    for image, inst, name in zip(images, maps, names, strict=True):
        write_image(tmp_path / "images" / f"{name}.png", image)
        write_instance_map(tmp_path / "instance_maps" / f"{name}.png", inst)
    result = evaluate_histology(tmp_path, run / "pairs")
    assert result["h_wasserstein"] == 0 and result["e_wasserstein"] == 0 and result["h_mean_wasserstein"] == 0
    assert result["alignment"] == result["real_alignment"] > 2.0


def test_evaluation_refuses_non_square_samples_and_writes_into_a_new_folder(run, tmp_path, capsys):
    from nudiff_histo._evaluate import evaluate_histology

    images, maps, names = build_pairs(run / "pairs", "tiny-64")
    for image, inst, name in zip(images[:2], maps[:2], names[:2], strict=True):
        write_image(tmp_path / "s" / "images" / f"{name}.png", image)
        write_instance_map(tmp_path / "s" / "instance_maps" / f"{name}.png", inst)
    out = tmp_path / "not" / "yet" / "eval.json"  # was written only after the work, then failed
    assert main(["evaluate", "--samples", str(tmp_path / "s"), "--real", str(run / "pairs"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["samples"] == 2
    for k, (image, inst) in enumerate(((images[0][:, :48], maps[0][:, :48]), (images[0][:48], maps[0][:48]))):
        write_image(tmp_path / f"w{k}" / "images" / "a.png", image)  # 64 x 48 was taken as 64 x 64
        write_instance_map(tmp_path / f"w{k}" / "instance_maps" / "a.png", inst)
        with pytest.raises(ValueError, match=r"a.png' is \d\d x \d\d px; the samples of .* must all be square"):
            evaluate_histology(tmp_path / f"w{k}", run / "pairs")
    with pytest.raises(ValueError, match=r"`max_real` must be an integer >= 1 .*, got 0"):
        evaluate_histology(tmp_path / "s", run / "pairs", max_real=0)


def test_resume_after_a_kill_loses_and_duplicates_nothing(run, monkeypatch, capsys):
    full, killed = run / "full", run / "killed"
    assert _sample(run, full) == 0
    calls = {"n": 0}
    original = sample_module.write_image

    def dying_write(path, image):
        if "images" in str(path.parent.name):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt  # killed while writing the fifth image
        return original(path, image)

    monkeypatch.setattr(sample_module, "write_image", dying_write)
    assert _sample(run, killed) == 130  # one line, no traceback
    assert "nudiff-histo sample: interrupted; what it finished is kept, rerun it to go on" in capsys.readouterr().err
    monkeypatch.setattr(sample_module, "write_image", original)
    assert len(list((killed / "images").iterdir())) == 4
    assert [p.name for p in killed.rglob("*") if p.name.startswith(".")] == [RUN_STAMP]  # no partial files
    assert _sample(run, killed) == 0
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["drawn_now"] == 8 and manifest["this_rank"] == 12
    for path in sorted((full / "images").iterdir()):
        a, b = read_image(path), read_image(killed / "images" / path.name)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same noise; batches round differently
    # the preview shows the first pairs by name, whichever call painted them
    a, b = read_image(full / "preview.png"), read_image(killed / "preview.png")
    assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_two_ranks_give_the_single_run(run):
    single, sharded = run / "full2", run / "sharded"
    assert _sample(run, single) == 0
    for rank in (0, 1):
        assert _sample(run, sharded, "--rank", str(rank), "--world-size", "2") == 0
    names = sorted(p.name for p in (single / "images").iterdir())
    assert sorted(p.name for p in (sharded / "images").iterdir()) == names
    for name in names:
        a, b = read_image(single / "images" / name), read_image(sharded / "images" / name)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert (sharded / "manifest-rank1.json").is_file()


def test_paired_batch_moves_image_and_structure_together():
    image, inst = _tile(7, 64)
    rows = pairs_to_rows(image[None], inst[None].astype(np.int32))
    seen = set()
    for step in range(12):
        x0, cond = paired_batch(30)(rows, torch.Generator().manual_seed(step))
        moved = ((x0[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        k = next(
            i for i, (r, f) in enumerate(DIHEDRAL) if np.array_equal(moved, transform_image(image, rot90=r, flip=f))
        )
        seen.add(k)
        r, f = DIHEDRAL[k]
        expected = transform_structure(encode_structure(inst, min_size=30, centre="nearest"), rot90=r, flip=f)
        np.testing.assert_allclose(cond[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)  # foreground in {0, 1}
        _, older = paired_batch(30, "signed")(
            rows, torch.Generator().manual_seed(step)
        )  # the encoding before 2026-12-03
        np.testing.assert_allclose(older[0].numpy(), structures_to_tensor(expected[None])[0].numpy(), atol=1e-6)
    assert len(seen) > 3


def test_cond_drop_prob_is_checked():
    with pytest.raises(ValueError, match="cond_drop_prob"):
        TrainConfig(cond_drop_prob=1.5)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unlabelled", "no instance map"),
        ("sizes", "instance map"),
        ("channels", "(H, W, 3)"),
        ("guidance", "must be a finite number >= 0"),
        ("structure-checkpoint", "not a histology checkpoint"),
    ],
)
def test_bad_input_is_refused_clearly(run, tmp_path, capsys, case, message):
    if case in ("unlabelled", "sizes"):
        image, inst = _tile(3)
        write_image(tmp_path / "pairs" / "images" / "a.png", image)
        if case == "sizes":
            write_instance_map(tmp_path / "pairs" / "instance_maps" / "a.png", inst[:-8])
        else:
            write_image(tmp_path / "pairs" / "images" / "b.png", image)
            write_instance_map(tmp_path / "pairs" / "instance_maps" / "a.png", inst)
        code = main(["--quiet", "train", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "r")])
    elif case == "channels":
        (tmp_path / "s" / "structures").mkdir(parents=True)
        np.save(tmp_path / "s" / "structures" / "x.npy", np.zeros((64, 64, 2), np.float32))
        write_instance_map(tmp_path / "s" / "instance_maps" / "x.png", np.zeros((64, 64), np.int32))
        code = _sample(run, tmp_path / "o", "--structures", str(tmp_path / "s"))
    elif case == "guidance":
        with pytest.raises(SystemExit) as exc:
            _sample(run, tmp_path / "o", "--guidance", "-1")
        code = exc.value.code
    else:
        from nudiff_diffusion import UNet, UNetConfig, save_model

        save_model(tmp_path / "structure_run", UNet(UNetConfig.preset("tiny-64")), diffusion={"schedule": "linear"})
        code = main(
            [
                "--quiet",
                "sample",
                "--structures",
                str(run / "pairs"),
                "--checkpoint",
                str(tmp_path / "structure_run"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "o" / "images").exists() or not any((tmp_path / "o" / "images").iterdir())


def test_build_pairs_cuts_and_downscales(run):
    images, maps, names = build_pairs(run / "pairs", "tiny-64")
    assert images.shape == (12, 64, 64, 3) and maps.shape == (12, 64, 64) and len(names) == 12
    assert names[0] == "t0_r00000_c00000" and maps.max() >= 1


def test_images_never_start_from_their_structures_noise():
    """Structure i and image i of runs with the same seed must not share their noise (they
    did: an untrained model's 'images' then correlated with the structures' masks)."""
    from nudiff_diffusion import initial_noise
    from nudiff_histo._sample import HISTO_NOISE_STREAM

    a = initial_noise(0, [0, 1, 2], (3, 8, 8))
    b = initial_noise(0, [0, 1, 2], (3, 8, 8), stream=HISTO_NOISE_STREAM)
    assert HISTO_NOISE_STREAM != 0
    assert abs(float(torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1])) < 0.2


def test_cuda_only_options_are_refused_on_the_cpu(run, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _sample(run, tmp_path / "o", "--cuda-graphs", "--device", "cpu") == 2
    assert "`cuda_graphs` needs the model on a CUDA device, got device cpu" in capsys.readouterr().err
    assert _sample(run, tmp_path / "o", "--device", "cuda") == 2
    assert "asks for a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_rerun_with_other_settings_is_refused_not_mixed(run, tmp_path, capsys):
    out = tmp_path / "painted"
    assert _sample(run, out, "--num", "3") == 0
    before = sorted(p.name for p in (out / "images").iterdir())
    for extra, message in (
        (["--guidance", "3"], "was started with --guidance 2.0, this resume gives 3.0"),
        (["--steps", "4"], "was started with --steps 3, this resume gives 4"),
        (["--seed", "2"], "was started with --seed 0, this resume gives 2"),
    ):
        assert _sample(run, out, "--num", "6", *extra) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in (out / "images").iterdir()) == before  # nothing added
    assert _sample(run, out, "--num", "6", "--batch", "2") == 0  # more images, another batch: fine
    assert len(list((out / "images").iterdir())) == 6


def test_ddpm_images_do_not_depend_on_batches(run, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _sample(run, whole, "--num", "5", "--sampler", "ddpm", "--batch", "5") == 0
    assert _sample(run, cut, "--num", "2", "--sampler", "ddpm", "--batch", "2") == 0
    assert _sample(run, cut, "--num", "5", "--sampler", "ddpm", "--batch", "3") == 0
    names = sorted(p.name for p in (whole / "images").iterdir())
    assert len(names) == 5 and sorted(p.name for p in (cut / "images").iterdir()) == names
    for name in names:
        a, b = read_image(whole / "images" / name), read_image(cut / "images" / name)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # same noise; batches round differently


def test_moved_folders_resume_and_changed_structures_are_refused(run, tmp_path, capsys):
    """The folder records the map each image was painted for, not where the structures
    were: both folders may move; a structure changed under a finished name is refused."""
    structures, out = tmp_path / "pairs", tmp_path / "painted"
    shutil.copytree(run / "pairs", structures)
    args = ["--quiet", "sample", "--checkpoint", str(run / "run"), "--sampler", "ddim", "--steps", "2"]
    assert main([*args, "--structures", str(structures), "--out", str(out), "--num", "3"]) == 0
    structures.rename(tmp_path / "moved-pairs")
    out.rename(tmp_path / "moved-painted")
    structures, out = tmp_path / "moved-pairs", tmp_path / "moved-painted"
    assert main([*args, "--structures", str(structures), "--out", str(out), "--num", "5"]) == 0
    assert len(list((out / "images").iterdir())) == 5
    # another tile's structures would move every name's noise (it is keyed by position)
    write_image(structures / "images" / "t9.png", read_image(structures / "images" / "t0.png"))
    maps = structures / "instance_maps"
    write_instance_map(maps / "t9.png", read_instance_map(maps / "t0.png"))
    assert main([*args, "--structures", str(structures), "--out", str(out), "--num", "6"]) == 2
    assert "was started with the --structures '12 structures, names sha256" in capsys.readouterr().err
    for sub in ("images", "instance_maps"):
        (structures / sub / "t9.png").unlink()
    inst = read_instance_map(structures / "instance_maps" / "t0.png")
    write_instance_map(structures / "instance_maps" / "t0.png", np.where(inst == inst.max(), 0, inst))
    assert main([*args, "--structures", str(structures), "--out", str(out), "--num", "6"]) == 2
    err = capsys.readouterr().err
    painted = re.escape(str(out / "images"))
    assert re.search(rf"'{painted}/(t0_r\d{{5}}_c\d{{5}})\.png' was painted for another instance map than the one", err)
    assert f"'{structures}' now holds under 't0_r" in err
    assert "the structures changed since this folder was started; paint them into another --out" in err
    assert len(list((out / "images").iterdir())) == 5


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--num", "0"], "`num` (--num) must be an integer >= 1 or None (every structure), got 0"),
        (["--num", "-1"], "`num` (--num) must be an integer >= 1"),
        (["--steps", "0"], "`steps` (--steps) must be an integer in [1, 1000], got 0"),
        (["--sampler", "euler"], "`method` (--sampler) must be 'ddpm', 'ddim' or 'dpmpp2m', got 'euler'"),
    ],
)
def test_bad_sampling_settings_are_named_before_any_folder_is_made(run, tmp_path, capsys, extra, message):
    if extra[0] == "--sampler":  # argparse knows the samplers
        with pytest.raises(SystemExit):
            _sample(run, tmp_path / "o", *extra)
        return
    assert _sample(run, tmp_path / "o", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_guidance_must_be_finite(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _sample(run, tmp_path / "o", "--guidance", "inf")
    assert "must be a finite number >= 0, got 'inf'" in capsys.readouterr().err


def test_painting_into_the_structures_folder_is_refused(run, tmp_path, capsys):
    structures = tmp_path / "structures-run"
    shutil.copytree(run / "pairs", structures)
    before = {p: p.read_bytes() for p in structures.rglob("*") if p.is_file()}
    assert _sample(run, structures, "--structures", str(structures)) == 2
    assert "is the --structures folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in structures.rglob("*") if p.is_file()} == before


def test_paint_images_checks_its_conditions(run):
    from nudiff_histo import load_histo_denoiser, paint_images

    runtime = load_histo_denoiser(run / "run")
    with pytest.raises(ValueError, match=r"`cond` must be \(N, 3, 64, 64\) structures for this 64 px model"):
        paint_images(runtime, torch.zeros(1, 3, 32, 32), steps=2)
    with pytest.raises(ValueError, match="`cond` holds 1 NaN or inf value"):
        bad = torch.zeros(1, 3, 64, 64)
        bad[0, 0, 0, 0] = float("nan")
        paint_images(runtime, bad, steps=2)
    with pytest.raises(ValueError, match="`guidance` \\(--guidance\\) must be a finite number >= 0, got inf"):
        paint_images(runtime, torch.zeros(1, 3, 64, 64), guidance=float("inf"), steps=2)


def test_a_corrupt_pair_cache_is_rebuilt(run, tmp_path):
    pairs = tmp_path / "pairs"
    shutil.copytree(run / "pairs", pairs)
    images, maps, names = build_pairs(pairs, "tiny-64")
    (cache,) = (pairs / ".nudiff-cache").glob("pairs-*.npz")
    cache.write_bytes(cache.read_bytes()[:1000])  # truncated by a full disk or a kill
    again = build_pairs(pairs, "tiny-64")
    np.testing.assert_array_equal(again[0], images)
    np.testing.assert_array_equal(again[1], maps)
    assert again[2] == names
    assert build_pairs(pairs, "tiny-64")[2] == names  # and the rebuilt cache reads back


def test_pairs_to_rows_refuses_ids_that_are_not_instance_ids():
    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="negative instance id -1"):
        pairs_to_rows(images, np.full((2, 8, 8), -1))
    for bad in (np.full((2, 8, 8), np.nan), np.full((2, 8, 8), 1.5)):
        with pytest.raises(TypeError, match="`instance_maps` must hold integer instance ids"):
            pairs_to_rows(images, bad)
    with pytest.raises(ValueError, match="`images` must be \\(N, s, s, 3\\) uint8"):
        pairs_to_rows(images.astype(np.float32), np.zeros((2, 8, 8), np.int32))


def test_init_from_a_structure_model_is_named_before_the_pairs_are_read(run, tmp_path, capsys, monkeypatch):
    from nudiff_histo import _train

    structure = tmp_path / "structure-run"
    shutil.copytree(run / "run", structure)
    config = json.loads((structure / "config.json").read_text())
    config["diffusion"]["kind"] = "structure"
    (structure / "config.json").write_text(json.dumps(config))

    def no_pairs(*args, **kwargs):
        raise AssertionError("the pairs were read before --init was checked")

    monkeypatch.setattr(_train, "build_pairs", no_pairs)
    args = ["--quiet", "train", "--pairs", str(run / "pairs"), "--out", str(tmp_path / "h"), "--init"]
    assert main([*args, str(structure), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert f"'{structure}' is not a histology checkpoint (its config.json has diffusion.kind='structure'" in err


def test_seg_tiles_upsample_and_lay_pairs_side_by_side(tmp_path, capsys):
    """tiny-64 pairs are 64 px at half the tiles' resolution: 2 x 2 of them, upsampled 2x,
    make one 256 px tile for HoVer-Net's window, each image with the map it was painted for."""
    from nudiff_postproc import downscale_instance_map, upsample, upsample_instance_map

    samples = tmp_path / "samples"
    rng = np.random.default_rng(0)
    maps = [synthetic_instance_map((64, 64), n_nuclei=6, seed=i) for i in range(5)]
    for i, inst in enumerate(maps):  # the fifth cannot fill a tile: left out
        write_instance_map(samples / "instance_maps" / f"s{i}.png", inst)
        (samples / "structures").mkdir(parents=True, exist_ok=True)
        np.save(samples / "structures" / f"s{i}.npy", encode_structure(inst, min_size=8, centre="nearest"))
        write_image(samples / "images" / f"s{i}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = tmp_path / "seg"
    assert main(["seg-tiles", "--samples", str(samples), "--out", str(out)]) == 0
    assert "wrote 1 tiles of 256 px (2 x 2 pairs upsampled 2x)" in capsys.readouterr().out
    image = read_image(out / "images" / "mosaic_0000.png")
    inst = read_instance_map(out / "instance_maps" / "mosaic_0000.png")
    assert image.shape == (256, 256, 3) and inst.shape == (256, 256)
    for j in range(4):  # s0 top left, s1 top right, s2 bottom left, s3 bottom right
        rows, cols = slice(128 * (j // 2), 128 * (j // 2 + 1)), slice(128 * (j % 2), 128 * (j % 2 + 1))
        np.testing.assert_array_equal(image[rows, cols], upsample(read_image(samples / "images" / f"s{j}.png"), 2))
        got = inst[rows, cols]
        # the painted-for map, upsampled: same nuclei (numbered apart from the other cells), same outlines
        np.testing.assert_array_equal(got > 0, upsample_instance_map(maps[j], 2) > 0)
        assert len(np.unique(got)) == len(np.unique(maps[j]))
        _, first = np.unique(downscale_instance_map(got, 2), return_inverse=True)
        _, want = np.unique(maps[j], return_inverse=True)
        np.testing.assert_array_equal(first, want)  # the same partition as the painted-for map
    cells = [set(np.unique(inst[r : r + 128, c : c + 128])) - {0} for r in (0, 128) for c in (0, 128)]
    assert all(not (a & b) for k, a in enumerate(cells) for b in cells[k + 1 :])
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["pairs_used"], manifest["tiles"], manifest["grid"]) == (4, 1, 2)
    write_image(samples / "images" / "s0.png", np.zeros((32, 32, 3), np.uint8))  # not what tiny-64 paints
    assert main(["seg-tiles", "--samples", str(samples), "--out", str(out), "--preset", "tiny-64"]) == 2
    assert "s0.png' is 32x32; the tiny-64 preset paints 64x64" in capsys.readouterr().err
    assert (out / "images" / "mosaic_0000.png").is_file()  # the earlier tiles stay until a run succeeds


def test_seg_tiles_refuse_an_out_that_would_delete_the_samples_or_another_folder(tmp_path, capsys):
    samples = tmp_path / "par" / "samples"
    for i in range(4):
        write_instance_map(
            samples / "instance_maps" / f"s{i}.png", synthetic_instance_map((64, 64), n_nuclei=4, seed=i)
        )
        write_image(samples / "images" / f"s{i}.png", np.full((64, 64, 3), 200, np.uint8))
    before = sorted(p.relative_to(samples) for p in samples.rglob("*"))
    for out in (samples, tmp_path / "par", samples / "seg"):  # is, holds, lies inside --samples
        assert main(["seg-tiles", "--samples", str(samples), "--out", str(out)]) == 2
        assert "is, holds or lies inside --samples" in capsys.readouterr().err
    other = tmp_path / "other"
    (other / "notes").mkdir(parents=True)
    assert main(["seg-tiles", "--samples", str(samples), "--out", str(other)]) == 2
    assert "already exists and is not a seg-tiles output" in capsys.readouterr().err
    assert (other / "notes").is_dir() and sorted(p.relative_to(samples) for p in samples.rglob("*")) == before
    out = tmp_path / "seg"
    assert main(["seg-tiles", "--samples", str(samples), "--out", str(out)]) == 0
    assert main(["seg-tiles", "--samples", str(samples), "--out", str(out)]) == 0  # its own output: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "par", "seg"]  # nothing left aside


def test_seg_tiles_keep_nuclei_whose_ids_exceed_int32(tmp_path):
    from nudiff_histo import write_seg_tiles

    samples = tmp_path / "samples"
    for i in range(4):
        inst = np.zeros((64, 64), np.int64)
        inst[4:14, 4:14], inst[30:40, 30:40] = 1, 2**32 + 1  # 2**32 + 1 wrapped to 1 in int32
        (samples / "instance_maps").mkdir(parents=True, exist_ok=True)
        np.save(samples / "instance_maps" / f"s{i}.npy", inst)
        write_image(samples / "images" / f"s{i}.png", np.full((64, 64, 3), 200, np.uint8))
    write_seg_tiles(samples, tmp_path / "seg", preset="tiny-64", grid=2)
    tile = read_instance_map(tmp_path / "seg" / "instance_maps" / "mosaic_0000.png")
    assert len(np.unique(tile)) - 1 == 8  # two nuclei in each of the four cells


def test_a_first_try_that_fails_before_its_first_image_leaves_nothing(run, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("the first batch did not fit")

    out = tmp_path / "painted"
    monkeypatch.setattr(sample_module, "paint_images", out_of_memory)
    with pytest.raises(MemoryError):
        _sample(run, out)
    assert not out.exists()  # no record of the settings binds the next try
    monkeypatch.undo()
    assert _sample(run, out, "--steps", "2", "--num", "2") == 0  # other settings: accepted
    assert json.loads((out / RUN_STAMP).read_text())["steps"] == 2


def test_a_run_started_with_spade_everywhere_resumes_with_it(run, tmp_path):
    from nudiff_diffusion import TrainConfig as Config
    from nudiff_diffusion import read_config
    from nudiff_histo import SpadeNorm, train_histo_model

    out = tmp_path / "old"
    config = Config(steps=2, batch_size=2, save_every=2)
    overrides = {"spade_layers": "all", "model_channels": 32}
    train_histo_model(run / "pairs", out, "tiny-64", config, progress=False, model_overrides=overrides)
    for stamp in out.glob("checkpoints/*/config.json"):  # as a run of before 2026-12-03 recorded it
        saved = json.loads(stamp.read_text())
        del saved["diffusion"]["spade_layers"], saved["diffusion"]["cond_foreground"]
        stamp.write_text(json.dumps(saved))
    config = Config(steps=4, batch_size=2, save_every=2)
    model = train_histo_model(
        run / "pairs", out, "tiny-64", config, resume=True, progress=False, model_overrides={"model_channels": 32}
    )
    assert isinstance(model.out_norm, SpadeNorm)
    resumed = read_config(out / "checkpoints" / "step_0000004")["diffusion"]
    assert resumed["spade_layers"] == "all" and resumed["cond_foreground"] == "signed"  # as it was trained


def test_conditions_encode_the_foreground_as_the_model_was_trained(run, tmp_path, monkeypatch):
    from nudiff_histo import condition_to_structures, encode_condition

    inst = synthetic_instance_map((64, 64), n_nuclei=6, seed=0)
    new, old = encode_condition([inst], 10), encode_condition([inst], 10, "signed")
    assert set(new[0, 0].unique().tolist()) == {0.0, 1.0} and set(old[0, 0].unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(new[:, 1:], old[:, 1:])
    for cond, foreground in ((new, "binary"), (old, "signed")):
        np.testing.assert_array_equal(
            condition_to_structures(cond, foreground)[0], encode_structure(inst, min_size=10, centre="nearest")
        )
    # the paper's null condition (zeros) is the structure of a patch without nuclei
    assert not encode_condition([np.zeros((64, 64), np.int32)], 10).any()
    with pytest.raises(ValueError, match="`foreground` must be one of"):
        encode_condition([inst], 10, "0/255")

    seen = []
    original = sample_module.paint_images

    def spy(runtime, cond, **kwargs):
        seen.append(float(cond[:, 0].min()))
        return original(runtime, cond, **kwargs)

    monkeypatch.setattr(sample_module, "paint_images", spy)
    assert _sample(run, tmp_path / "new", "--num", "1") == 0
    older = tmp_path / "older-run"  # a model trained before 2026-12-03: no cond_foreground recorded
    shutil.copytree(run / "run", older)
    config = json.loads((older / "config.json").read_text())
    assert config["diffusion"].pop("cond_foreground") == "binary"
    (older / "config.json").write_text(json.dumps(config))
    args = ["--quiet", "sample", "--structures", str(run / "pairs"), "--checkpoint", str(older)]
    assert main([*args, "--sampler", "ddim", "--steps", "2", "--num", "1", "--out", str(tmp_path / "old")]) == 0
    assert seen == [0.0, -1.0]  # background pixels: 0 for the new model, -1 for the older one
    saved = np.load(next((tmp_path / "old" / "structures").glob("*.npy")))
    assert set(np.unique(saved[..., 0]).tolist()) == {0.0, 1.0}  # saved as [fg in {0, 1}, h, v] either way


def test_spade_layers_are_chosen_for_a_new_model_only(run, tmp_path, capsys):
    args = ["--quiet", "train", "--pairs", str(run / "pairs"), "--steps", "2", "--batch", "2", "--save-every", "2"]
    assert main([*args, "--out", str(tmp_path / "all"), "--spade-layers", "all", "--cond-foreground", "signed"]) == 0
    settings = json.loads((tmp_path / "all" / "config.json").read_text())["diffusion"]
    assert settings["spade_layers"] == "all" and settings["cond_foreground"] == "signed"
    # fine-tuning keeps the placement of the model it starts from
    assert main([*args, "--out", str(tmp_path / "ft"), "--init", str(run / "run"), "--spade-layers", "all"]) == 2
    assert "has its SPADE layers at 'decoder'; leave it out" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "ft"), "--init", str(run / "run"), "--cond-foreground", "signed"]) == 2
    assert "encodes its conditions' foreground as binary" in capsys.readouterr().err
