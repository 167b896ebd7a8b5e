"""A checkpoint of one model kind given to the other package's CLI is refused by name."""

from __future__ import annotations

from nudiff_diffusion import UNet, UNetConfig, save_model
from nudiff_histo import build_histo_unet
from nudiff_histo._model import histo_settings
from nudiff_histo.cli import main as histo_main
from nudiff_postproc import synthetic_instance_map, write_instance_map
from nudiff_structure.cli import main as structure_main


def test_structure_sample_refuses_a_histology_checkpoint(tmp_path, capsys):
    histo = build_histo_unet("tiny-64")
    save_model(tmp_path / "histo", histo, diffusion=histo_settings("tiny-64", histo))
    args = ["--quiet", "sample", "--checkpoint", str(tmp_path / "histo"), "--num", "1", "--out", str(tmp_path / "s")]
    assert structure_main(args) == 2
    assert "holds a 'histo' model, not a structure model" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_histo_sample_refuses_a_structure_checkpoint(tmp_path, capsys):
    save_model(tmp_path / "structure", UNet(UNetConfig.preset("tiny-64")), diffusion={"kind": "structure"})
    write_instance_map(tmp_path / "maps" / "instance_maps" / "a.png", synthetic_instance_map((64, 64), n_nuclei=5))
    args = ["--quiet", "sample", "--structures", str(tmp_path / "maps"), "--checkpoint", str(tmp_path / "structure")]
    assert histo_main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "not a histology checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_seg_refuses_a_diffusion_checkpoint(tmp_path, capsys):
    from nudiff_postproc import write_image
    from nudiff_seg.cli import main as seg_main

    save_model(tmp_path / "structure", UNet(UNetConfig.preset("tiny-64")), diffusion={"kind": "structure"})
    write_image(
        tmp_path / "images" / "a.png",
        synthetic_instance_map((64, 64), n_nuclei=3).astype("uint8")[..., None].repeat(3, -1),
    )
    args = ["--quiet", "predict", "--checkpoint", str(tmp_path / "structure"), "--images", str(tmp_path / "images")]
    assert seg_main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "has format 'nudiff-diffusion/unet'" in err and "expected a HoVer-Net checkpoint" in err
    assert not (tmp_path / "o").exists()
