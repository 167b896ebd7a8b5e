"""Tiled inference, and the train -> predict -> evaluate round trip of the CLI on real tiles."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from nudiff_postproc import read_image, read_instance_map, to_geojson, write_image, write_instance_map
from nudiff_seg import build_hovernet, load_hovernet, predict_structure
from nudiff_seg.cli import main


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_hovernet("tiny").eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that eval mode matters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
    return m


def _direct(model, window):
    x = torch.from_numpy(window[None]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        out = model(x)
    return torch.cat([out["np"].softmax(1)[:, 1:], out["hv"]], 1)[0].permute(1, 2, 0).numpy()


def test_tiled_inference_places_each_window_where_it_belongs(model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    pred = predict_structure(model, image, batch=3)
    assert pred.shape == (300, 400, 3) and pred.dtype == np.float32
    padded = np.pad(image, ((46, 2 * 164 - 300 + 46), (46, 3 * 164 - 400 + 46), (0, 0)), mode="reflect")
    for i in range(2):
        for j in range(3):
            r, c = i * 164, j * 164
            expected = _direct(model, padded[r : r + 256, c : c + 256])[: 300 - r, : 400 - c]
            np.testing.assert_allclose(pred[r : r + 164, c : c + 164], expected, atol=1e-5)


def test_a_tile_of_one_output_window_equals_untiled_inference(model):
    image = np.random.default_rng(1).integers(0, 256, (164, 164, 3), dtype=np.uint8)
    untiled = _direct(model, np.pad(image, ((46, 46), (46, 46), (0, 0)), mode="reflect"))
    np.testing.assert_allclose(predict_structure(model, image), untiled, atol=1e-5)
    with pytest.raises(ValueError, match="must be an \\(H, W, 3\\) uint8 RGB array"):
        predict_structure(model, image[..., 0])
    for bad, message in ((True, "`batch` must be an integer >= 1, got True"), (2.5, "got 2.5"), (0, "got 0")):
        with pytest.raises(ValueError, match=message):
            predict_structure(model, image, batch=bad)
    with pytest.raises(ValueError, match="`image` is empty"):
        predict_structure(model, image[:0])
    with pytest.raises(TypeError, match="`model` must be a HoVerNet or an OnnxHoVerNet"):
        predict_structure("runs/seg", image)
    from nudiff_seg import HoVerNetConfig

    for config in ({"blocks": (1.9, 1, 1, 1)}, {"width_divisor": 8.0}, {"width_divisor": True}):
        with pytest.raises(ValueError, match="`blocks`|`width_divisor`"):
            HoVerNetConfig(**config)


def _crop_folder(kumar, folder, names, size):
    for name in names:
        image = read_image(next((kumar / "images").glob(f"{name}.*")))
        inst = read_instance_map(next((kumar / "instance_maps").glob(f"{name}.*")))
        write_image(folder / "images" / f"{name}.png", image[:size, :size])
        write_instance_map(folder / "instance_maps" / f"{name}.png", inst[:size, :size])


def test_train_predict_evaluate_round_trip_on_real_tiles(kumar, tmp_path, capsys):
    names = (kumar / "splits" / "kumar_train.txt").read_text().split()[:2]
    _crop_folder(kumar, tmp_path / "real", names, 420)  # 4 windows per tile
    args = ["--quiet", "train", "--real", str(tmp_path / "real"), "--preset", "tiny", "--epochs", "2", "--batch", "4"]
    # an interrupted run resumed gives exactly the weights of an uninterrupted one
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "--max-batches", "3"]) == 0
    assert (
        not (tmp_path / "split" / "model.safetensors").exists()
        or json.loads((tmp_path / "split" / "config.json").read_text())["epoch"] == 1
    )
    assert main([*args, "--out", str(tmp_path / "split")]) == 2  # exists: needs --resume
    assert "pass --resume" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0
    whole, split = load_hovernet(tmp_path / "whole").state_dict(), load_hovernet(tmp_path / "split").state_dict()
    assert [k for k in whole if not torch.equal(whole[k], split[k])] == []
    with open(tmp_path / "split" / "log.csv") as fh:
        log = list(csv.DictReader(fh))
    assert [r["epoch"] for r in log] == ["1", "2"]

    assert (
        main(
            [
                "--quiet",
                "predict",
                "--checkpoint",
                str(tmp_path / "whole"),
                "--images",
                str(tmp_path / "real" / "images"),
                "--out",
                str(tmp_path / "pred"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    for name in names:
        for sub, suffix in (("instance_maps", ".png"), ("mat", ".mat"), ("geojson", ".geojson"), ("overlays", ".png")):
            assert (tmp_path / "pred" / sub / f"{name}{suffix}").is_file()
        inst = read_instance_map(tmp_path / "pred" / "instance_maps" / f"{name}.png")
        assert inst.shape == (420, 420)
        # the outlines of that map, as QuPath detections without a name each (it was the image's)
        assert json.loads((tmp_path / "pred" / "geojson" / f"{name}.geojson").read_text()) == to_geojson(inst)
    capsys.readouterr()
    out_csv = tmp_path / "scores.csv"
    assert (
        main(
            [
                "evaluate",
                "--true",
                str(tmp_path / "real" / "instance_maps"),
                "--pred",
                str(tmp_path / "pred" / "instance_maps"),
                "--out",
                str(out_csv),
            ]
        )
        == 0
    )
    with open(out_csv) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == [*sorted(names), "mean"]
    # the CSV holds nudiff-postproc's metrics of the written maps, as HoVer-Net's compute_stats
    # scores them (0 where a 2-epoch tiny model finds no nuclei)
    from nudiff_postproc import evaluate

    for row in rows[:-1]:
        expected = evaluate(
            read_instance_map(tmp_path / "real" / "instance_maps" / f"{row['name']}.png"),
            read_instance_map(tmp_path / "pred" / "instance_maps" / f"{row['name']}.png"),
            one_empty="zero",
        )
        np.testing.assert_allclose(
            [float(row[k]) for k in ("dice", "aji", "pq")], [expected[k] for k in ("dice", "aji", "pq")], atol=1e-6
        )
    capsys.readouterr()

    assert (
        main(
            [
                "fidelity",
                "--checkpoint",
                str(tmp_path / "whole"),
                "--pairs",
                str(tmp_path / "real"),
                "--real",
                str(tmp_path / "real"),
                "--out",
                str(tmp_path / "fidelity.json"),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "synthetic" and lines[2].split()[0] == "real"
    assert lines[1].split()[1:] == lines[2].split()[1:]  # the same folder scores the same
    scores = json.loads((tmp_path / "fidelity.json").read_text())
    assert scores["synthetic"]["images"] == len(names)
    assert json.dumps(scores["synthetic"]) == json.dumps(scores["real"])  # NaN-safe: a tiny model may find none
    # strict JSON: a metric undefined on every image (NaN on screen) is null in the file
    shown = [
        "nan" if scores["real"][k] is None else f"{scores['real'][k]:.4f}"
        for k in ("dice", "aji", "aji_plus", "dq", "sq", "pq")
    ]
    assert shown == lines[2].split()[2:]


def test_predict_works_on_a_whole_tile_larger_than_any_window(kumar, model, tmp_path):
    name = (kumar / "splits" / "kumar_test_same.txt").read_text().split()[0]
    image = read_image(next((kumar / "images").glob(f"{name}.*")))
    assert image.shape[:2] == (1000, 1000)
    pred = predict_structure(model, image, batch=16)
    assert pred.shape == (1000, 1000, 3) and np.isfinite(pred).all()


def test_bad_inputs_fail_cleanly(tmp_path, capsys):
    write_image(tmp_path / "d" / "images" / "a.png", np.zeros((300, 300, 3), np.uint8))
    write_instance_map(tmp_path / "d" / "instance_maps" / "b.png", np.zeros((300, 300), np.int32))
    out = tmp_path / "run"
    assert main(["--quiet", "train", "--real", str(tmp_path / "d"), "--preset", "tiny", "--out", str(out)]) == 2
    assert "have no instance map" in capsys.readouterr().err and not out.exists()
    assert (
        main(
            [
                "--quiet",
                "predict",
                "--checkpoint",
                str(tmp_path / "nowhere"),
                "--images",
                str(tmp_path / "d" / "images"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "checkpoint directory not found" in capsys.readouterr().err and not out.exists()
    # an --out file that is a folder is named before any work (the scores would be lost after it)
    for command in (
        ["fidelity", "--checkpoint", str(tmp_path / "nowhere"), "--pairs", str(tmp_path / "d")],
        ["features", "--data", str(tmp_path / "d"), "--weights", str(tmp_path / "none.pth")],
    ):
        assert main(["--quiet", *command, "--out", str(tmp_path)]) == 2
        assert "is a folder; expected the path of the file to write" in capsys.readouterr().err
    # evaluate forwards to nudiff-postproc's, but errors name the command the user ran
    maps = tmp_path / "d" / "instance_maps"
    assert main(["evaluate", "--true", str(maps), "--pred", str(maps), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nudiff-seg evaluate: error: --out") and "is a folder" in err
    # a mixing ratio without synthetic pairs would train on real pairs alone, silently
    args = ["--quiet", "train", "--real", str(tmp_path / "d"), "--preset", "tiny", "--out", str(out)]
    assert main([*args, "--synthetic-ratio", "0.5"]) == 2
    assert "--synthetic-ratio 0.5 mixes synthetic pairs into each batch: give --synthetic FOLDER too" in (
        capsys.readouterr().err
    )
    assert not out.exists()


def test_predict_names_every_unreadable_image_before_the_first_prediction(model, tmp_path, capsys):
    from nudiff_seg import save_hovernet

    save_hovernet(tmp_path / "run", model)
    images = tmp_path / "images"
    for name in ("a", "c"):
        write_image(images / f"{name}.png", np.full((40, 40, 3), 200, np.uint8))
    import imageio.v3 as iio

    iio.imwrite(images / "b_grey.png", np.zeros((40, 40), np.uint8))
    iio.imwrite(images / "d_translucent.png", np.zeros((40, 40, 4), np.uint8))
    args = ["--quiet", "predict", "--checkpoint", str(tmp_path / "run"), "--images", str(images)]
    assert main([*args, "--out", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert "2 of the 4 image(s) to predict in" in err and "cannot be read as RGB" in err
    assert "b_grey.png' is a grayscale image" in err and "d_translucent.png' has an alpha channel" in err
    assert not (tmp_path / "pred").exists()  # nothing predicted, no folder claimed
    (images / "b_grey.png").unlink()
    (images / "d_translucent.png").unlink()
    assert main([*args, "--out", str(tmp_path / "pred")]) == 0
    assert sorted(p.name for p in (tmp_path / "pred" / "instance_maps").iterdir()) == ["a.png", "c.png"]
    # a resume with another model is refused for that first, before any image is read
    iio.imwrite(images / "e_grey.png", np.zeros((40, 40), np.uint8))
    other = build_hovernet("tiny")
    save_hovernet(tmp_path / "other", other)
    other_args = ["--quiet", "predict", "--checkpoint", str(tmp_path / "other"), "--images", str(images)]
    assert main([*other_args, "--out", str(tmp_path / "pred")]) == 2
    err = capsys.readouterr().err
    assert "was started with the model" in err and "cannot be read" not in err


@pytest.mark.parametrize("device", ["tpu", "cuda:0"])
def test_an_unusable_device_fails_before_any_work(tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: cuda:0 is usable")
    write_image(tmp_path / "d" / "images" / "a.png", np.zeros((300, 300, 3), np.uint8))
    write_instance_map(tmp_path / "d" / "instance_maps" / "a.png", np.zeros((300, 300), np.int32))
    out = tmp_path / "run"
    common = ["--device", device, "--out", str(out)]
    for args in (
        ["train", "--real", str(tmp_path / "d"), "--preset", "tiny"],
        ["predict", "--checkpoint", str(tmp_path / "nowhere"), "--images", str(tmp_path / "d" / "images")],
    ):
        assert main(["--quiet", *args, *common]) == 2
        err = capsys.readouterr().err
        assert f"`device` {device!r}" in err or f"got {device!r}" in err, err
        assert not out.exists()


def test_onnx_engine_predicts_like_pytorch(model, tmp_path, capsys):
    from nudiff_seg import save_hovernet

    save_hovernet(tmp_path / "run", model)
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "g" / "hovernet.onnx"),
                "--batch-max",
                "4",
            ]
        )
        == 0
    )
    assert "max abs diff" in capsys.readouterr().out
    image = np.random.default_rng(2).integers(0, 256, (200, 330, 3), dtype=np.uint8)
    from nudiff_seg._onnx import load_engine

    engine = load_engine(tmp_path / "g" / "hovernet.onnx")
    # a random model's h/v maps reach ~40, where float32 summation order moves them ~3e-6 relative
    np.testing.assert_allclose(
        predict_structure(engine, image, batch=4), predict_structure(model, image, batch=4), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match="exported for batches of at most 4, got 6"):
        predict_structure(engine, image, batch=8)
    write_image(tmp_path / "images" / "a.png", image)
    args = [
        "--quiet",
        "predict",
        "--engine",
        str(tmp_path / "g" / "hovernet.onnx"),
        "--images",
        str(tmp_path / "images"),
    ]
    assert main([*args, "--out", str(tmp_path / "pred5"), "--batch", "5"]) == 2  # before --out is made
    assert "exported for batches of at most 4, got 5" in capsys.readouterr().err
    assert not (tmp_path / "pred5").exists()
    assert main([*args, "--out", str(tmp_path / "pred"), "--batch", "4"]) == 0
    assert read_instance_map(tmp_path / "pred" / "instance_maps" / "a.png").shape == (200, 330)
    # the graph and its checkpoint are one model (the same weights' digest): a rerun may switch
    common = ["--quiet", "predict", "--images", str(tmp_path / "images"), "--out", str(tmp_path / "pred")]
    assert main([*common, "--checkpoint", str(tmp_path / "run")]) == 0
    assert "(1 already done)" in capsys.readouterr().out
    # another model must not skip the maps this one wrote
    other = load_hovernet(tmp_path / "run")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_hovernet(tmp_path / "other", other)
    assert main([*common, "--checkpoint", str(tmp_path / "other")]) == 2
    assert "was started with the model (the weights' sha256) of --checkpoint / --engine" in capsys.readouterr().err
    # given to the diffusion packages' samplers, a HoVer-Net graph is named as one
    from nudiff_diffusion import load_denoiser

    histo = pytest.importorskip("nudiff_histo")  # not a dependency of nudiff-seg; installed with the monorepo
    for load in (load_denoiser, histo.load_histo_denoiser):
        with pytest.raises(ValueError, match="hovernet.onnx' is a HoVer-Net graph \\(nudiff-seg export\\), not a diff"):
            load(tmp_path / "g" / "hovernet.onnx")
    # a graph whose config.json describes another network is refused when loaded
    import shutil

    shutil.copytree(tmp_path / "g", tmp_path / "g2")
    config = json.loads((tmp_path / "g2" / "config.json").read_text())
    for hovernet, message in (
        ({**config["hovernet"], "mode": "original"}, "takes images of shape"),
        (5, "not a HoVer-Net graph config"),
    ):
        (tmp_path / "g2" / "config.json").write_text(json.dumps({**config, "hovernet": hovernet}))
        with pytest.raises(ValueError, match=message):
            load_engine(tmp_path / "g2" / "hovernet.onnx")
    (tmp_path / "g" / "hovernet.onnx").write_bytes(b"not a graph")
    assert main([*args, "--out", str(tmp_path / "pred2")]) == 2
    assert "hovernet.onnx' could not be loaded as an ONNX graph" in capsys.readouterr().err


def test_write_prediction_checks_everything_before_writing(tmp_path):
    from nudiff_seg import write_prediction

    image = np.zeros((64, 64, 3), np.uint8)
    inst = np.zeros((64, 64), np.int32)
    inst[10:20, 10:20] = 1
    for args, message in (
        ((image, inst[:32]), "`image` is \\(64, 64\\) but `inst` is \\(32, 64\\)"),
        ((image.astype(np.float64), inst), "`image` must be an \\(H, W, 3\\) uint8 RGB array"),
        ((image, np.where(inst > 0, np.nan, 0.0)), "inst"),
    ):
        with pytest.raises((ValueError, TypeError), match=message):
            write_prediction(tmp_path / "out", "x", *args)
    with pytest.raises(ValueError, match="`name` must be a plain file stem"):
        write_prediction(tmp_path / "out", "../x", image, inst)
    assert not (tmp_path / "out").exists()  # nothing half-written
    paths = write_prediction(tmp_path / "out", "x", image, inst)
    assert all(p.is_file() for p in paths.values())
