"""Label I/O: instance-map files, MoNuSeg XML, GeoJSON."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from nudiff_postproc import (
    evaluate,
    overlap_table,
    read_image,
    read_instance_map,
    read_monuseg_xml,
    synthetic_instance_map,
    to_geojson,
    write_image,
    write_instance_map,
)
from skimage.draw import polygon


@pytest.mark.parametrize("suffix", [".png", ".tif", ".mat", ".npy"])
def test_round_trip(tmp_path, suffix):
    inst = synthetic_instance_map((64, 72), n_nuclei=30, seed=2) * 1000  # ids up to ~30,000
    path = write_instance_map(tmp_path / f"map{suffix}", inst)
    back = read_instance_map(path)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, inst)
    assert [p.name for p in tmp_path.iterdir()] == [f"map{suffix}"]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_more_than_65535_nuclei_need_tiff(tmp_path):
    inst = np.arange(300 * 300, dtype=np.int64).reshape(300, 300)
    with pytest.raises(ValueError, match=r"largest id is 89999.*write a \.tif"):
        write_instance_map(tmp_path / "big.png", inst)
    assert not list(tmp_path.iterdir())  # nothing partial
    np.testing.assert_array_equal(read_instance_map(write_instance_map(tmp_path / "big.tif", inst)), inst)


@pytest.mark.parametrize(
    ("suffix", "largest", "instead"), [(".tif", 2**32 - 1, r"\.npy"), (".mat", 2**31 - 1, r"\.npy")]
)
def test_ids_a_format_cannot_hold_are_refused_not_wrapped(tmp_path, suffix, largest, instead):
    inst = np.zeros((4, 4), np.int64)
    inst[0, 0], inst[3, 3] = 5, largest
    np.testing.assert_array_equal(read_instance_map(write_instance_map(tmp_path / f"ok{suffix}", inst)), inst)
    inst[3, 3] = largest + 6  # wrapped, it would merge with nucleus 5 (or turn negative in int32)
    with pytest.raises(ValueError, match=rf"big{suffix}': the largest id is {largest + 6}, more than .*{instead}"):
        write_instance_map(tmp_path / f"big{suffix}", inst)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ok{suffix}"]  # nothing partial
    inst[3, 3] = 2**40
    np.testing.assert_array_equal(read_instance_map(write_instance_map(tmp_path / "any.npy", inst)), inst)


def test_ids_beyond_int64_are_refused(tmp_path):
    huge = np.zeros((4, 4), np.uint64)
    huge[1, 1] = 2**63 + 5
    np.save(tmp_path / "huge.npy", huge)
    with pytest.raises(ValueError, match=r"huge\.npy'` has instance id 9223372036854775813; ids must be at most"):
        read_instance_map(tmp_path / "huge.npy")
    from scipy.io import savemat

    savemat(tmp_path / "huge.mat", {"inst_map": np.full((4, 4), 1e30)})
    with pytest.raises(ValueError, match=r"huge\.mat' holds the id 1e\+30; instance ids must fit int64"):
        read_instance_map(tmp_path / "huge.mat")


def test_truncated_mat_files_name_the_file(tmp_path):
    whole = write_instance_map(tmp_path / "whole.mat", synthetic_instance_map((40, 40), n_nuclei=8, seed=0))
    data = whole.read_bytes()
    for n in range(20, len(data), 7):  # scipy raises IndexError, MatReadError, ValueError... by where it stops
        (tmp_path / "cut.mat").write_bytes(data[:n])
        with pytest.raises(ValueError, match=r"cut\.mat' could not be read as a MATLAB \.mat file"):
            read_instance_map(tmp_path / "cut.mat")


def test_hovernet_mat_layout(tmp_path):
    from scipy.io import loadmat, savemat

    inst = synthetic_instance_map((40, 40), n_nuclei=8, seed=0)
    mat = loadmat(write_instance_map(tmp_path / "a.mat", inst))
    assert set(mat) >= {"inst_map", "inst_uid", "inst_centroid"}
    assert mat["inst_centroid"].shape == (inst.max(), 2)
    # HoVer-Net's files may store the map as double
    savemat(tmp_path / "b.mat", {"inst_map": inst.astype(np.float64)})
    np.testing.assert_array_equal(read_instance_map(tmp_path / "b.mat"), inst)
    savemat(tmp_path / "c.mat", {"something": inst})
    with pytest.raises(ValueError, match=r"c\.mat' has no 'inst_map'.*something"):
        read_instance_map(tmp_path / "c.mat")
    # .npy maps of whole-number floats, which HoVer-Net's compute_stats.py reads (astype int32)
    np.save(tmp_path / "d.npy", inst.astype(np.float32))
    got = read_instance_map(tmp_path / "d.npy")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, inst)
    np.save(tmp_path / "e.npy", inst + 0.5)
    with pytest.raises(TypeError, match="e.npy'` must hold integer instance ids"):
        read_instance_map(tmp_path / "e.npy")


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_instance_map(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.png' is an empty file"):
        read_instance_map(tmp_path / "empty.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="corrupt.png' could not be read"):
        read_instance_map(tmp_path / "corrupt.png")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="unsupported instance map format '.bmp'"):
        read_instance_map(tmp_path / "x.bmp")
    write_image(tmp_path / "rgb.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="rgb.png' is a colour image"):
        read_instance_map(tmp_path / "rgb.png")
    np.save(tmp_path / "f.npy", np.full((4, 4), 0.5))
    with pytest.raises(TypeError, match="f.npy'.*integer instance ids"):
        read_instance_map(tmp_path / "f.npy")


def test_image_round_trip(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    for suffix in (".png", ".tif"):
        np.testing.assert_array_equal(read_image(write_image(tmp_path / f"i{suffix}", img)), img)
    with pytest.raises(ValueError, match="uint8 RGB"):
        write_image(tmp_path / "bad.png", img.astype(np.float32))


def test_cmyk_and_palette_images_are_read_as_their_rgb_colours(tmp_path):
    from PIL import Image

    rgb = np.zeros((16, 24, 3), np.uint8)
    rgb[:, :8], rgb[:, 8:16], rgb[:, 16:] = (200, 60, 120), (30, 90, 210), (250, 240, 10)
    cmyk = Image.fromarray(rgb).convert("CMYK")  # 4 channels: C, M, Y and black (read as alpha before)
    cmyk.save(tmp_path / "ink.jpg", quality=100, subsampling=0)
    cmyk.save(tmp_path / "ink.tif")
    palette = Image.fromarray(rgb).quantize(3)
    palette.save(tmp_path / "palette.tif")  # tifffile gives the indices: refused as grey before
    palette.save(tmp_path / "palette.png")
    for name in ("ink.tif", "palette.tif", "palette.png"):
        for strict in (False, True):
            np.testing.assert_array_equal(read_image(tmp_path / name, strict=strict), rgb, err_msg=name)
    jpeg = read_image(tmp_path / "ink.jpg", strict=True).astype(int)
    assert np.abs(jpeg - rgb).max() <= 3  # JPEG rounding, not C, M, Y read as R, G, B
    Image.fromarray(rgb).convert("YCbCr").save(tmp_path / "ycc.tif")  # tifffile gave the raw Y, Cb, Cr
    assert np.abs(read_image(tmp_path / "ycc.tif").astype(int) - rgb).max() <= 3  # YCbCr rounding
    import tifffile

    tifffile.imwrite(tmp_path / "lab.tif", rgb, photometric="cielab")
    with pytest.raises(ValueError, match=r"lab\.tif' could not be read .*CIELAB TIFF: its channels are L\*a\*b\*"):
        read_image(tmp_path / "lab.tif")


def test_palette_pngs_are_read_as_their_indices(tmp_path):
    from PIL import Image

    ids = np.array([[0, 1, 2], [3, 0, 200]], np.uint8)
    image = Image.fromarray(ids, mode="P")
    image.putpalette([v for k in range(256) for v in ((37 * k) % 256, (91 * k) % 256, k)])  # colours, not ids
    image.save(tmp_path / "labels.png")
    got = read_instance_map(tmp_path / "labels.png")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ids)


def test_monuseg_xml_agrees_with_the_instance_maps(kumar):
    """The maps distributed with MoNuSeg keep the earlier region where outlines overlap and
    leave pixel centres on a left or top edge out: with later-wins and inclusive edges
    the mean AJI was 0.962 (min 0.881, TCGA-B0-5710, whose vertices are mostly integers),
    nuclei with IoU < 0.5 numbered 10."""
    ious, fg_agreement, ajis = [], [], []
    for xml in sorted((kumar / "annotations_xml").glob("*.xml")):
        ref = read_instance_map(kumar / "instance_maps" / f"{xml.stem}.png")
        got = read_monuseg_xml(xml, ref.shape)
        assert abs(int(got.max()) - len(np.unique(ref)) + 1) <= 1, xml.name
        assert np.array_equal(np.unique(got), np.arange(got.max() + 1)), xml.name  # ids 1..N, none lost
        table = overlap_table(ref, got)
        best = np.zeros(table.n_true + 1)
        np.maximum.at(best, table.true_index, table.intersection / table.union)
        ious.append(best[1:])
        fg_agreement.append(((ref > 0) == (got > 0)).mean())
        ajis.append(evaluate(ref, got)["aji"])
    assert len(ious) == 13
    assert min(ajis) >= 0.99 and np.mean(ajis) >= 0.994, ajis
    assert np.median(np.concatenate(ious)) >= 0.99 and (np.concatenate(ious) < 0.5).sum() <= 1
    assert min(fg_agreement) >= 0.998


def test_monuseg_xml_edges_overlaps_ellipses_and_negative_regions(tmp_path):
    def region(vertices, rid, **attrs):
        extra = "".join(f' {k}="{v}"' for k, v in attrs.items())
        points = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
        return f'<Region Id="{rid}"{extra}><Vertices>{points}</Vertices></Region>'

    def square(x0, y0, x1, y1):
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]

    regions = [
        region(square(1, 1, 4, 4), 1),  # abutting integer squares of side 3: 9 pixels each
        region(square(4, 1, 7, 4), 2),
        region(square(2, 2, 9, 9), 3),  # overlaps both: the earlier regions keep their pixels
        region(square(20, 20, 24, 24), 4, NegativeROA="1"),  # a cut-out area, not a nucleus
        region([(11, 11), (19, 15)], 5, Type="2"),  # an ellipse in the box (10..18, 10..14)
    ]
    (tmp_path / "a.xml").write_text(f"<Annotations><Regions>{''.join(regions)}</Regions></Annotations>")
    inst = read_monuseg_xml(tmp_path / "a.xml", (30, 30))
    assert (inst == 1).sum() == 9 and inst[1:4, 1:4].all() and (inst[1:4, 1:4] == 1).all()
    assert (inst == 2).sum() == 9 and (inst[1:4, 4:7] == 2).all()
    assert (inst == 3).sum() == 7 * 7 - 2 * 2 - 2 * 3  # square 2..9 minus what 1 and 2 hold
    assert inst[19:24, 19:24].max() == 0  # the negative region
    ellipse = np.argwhere(inst == 4)
    assert inst.max() == 4 and 20 <= len(ellipse) <= 32  # pi * 4 * 2 = 25
    # the same edge rule: the box's top row (10) out, its bottom row (14) in at the centre column
    assert ellipse[:, 0].min() == 11 and ellipse[:, 0].max() == 14 and ellipse[:, 1].min() >= 11


def test_xml_errors(tmp_path):
    (tmp_path / "none.xml").write_text("<Annotations><Annotation/></Annotations>")
    with pytest.raises(ValueError, match="none.xml' has no <Region>"):
        read_monuseg_xml(tmp_path / "none.xml", (10, 10))
    (tmp_path / "broken.xml").write_text("<Annotations><Region>")
    with pytest.raises(ValueError, match="broken.xml' is not valid XML"):
        read_monuseg_xml(tmp_path / "broken.xml", (10, 10))
    (tmp_path / "ok.xml").write_text(
        '<Annotations><Annotation><Regions><Region Id="1"><Vertices>'
        '<Vertex X="2" Y="2"/><Vertex X="8" Y="2"/><Vertex X="8" Y="6"/><Vertex X="2" Y="6"/>'
        "</Vertices></Region></Regions></Annotation></Annotations>"
    )
    inst = read_monuseg_xml(tmp_path / "ok.xml", (10, 10))
    assert inst.max() == 1 and inst[2:6, 2:8].all() and inst.sum() == 4 * 6  # 1-based vertices, area 6 x 4
    with pytest.raises(ValueError, match="shape"):
        read_monuseg_xml(tmp_path / "ok.xml", (10,))
    region = '<Region Id="{}"><Vertices>{}</Vertices></Region>'
    vertices = '<Vertex X="{}" Y="2"/><Vertex X="8" Y="2"/><Vertex X="8" Y="6"/>'
    (tmp_path / "nan.xml").write_text(
        f"<Regions>{region.format(1, vertices.format(2))}{region.format(7, vertices.format('nan'))}</Regions>"
    )
    with pytest.raises(ValueError, match=r"nan\.xml': region 7 has a vertex at X=nan, Y=2\.0; expected finite"):
        read_monuseg_xml(tmp_path / "nan.xml", (10, 10))
    two = '<Vertex X="2" Y="2"/><Vertex X="8" Y="2"/>'
    (tmp_path / "lines.xml").write_text(f"<Regions>{region.format(1, two)}{region.format(2, two)}</Regions>")
    with pytest.raises(ValueError, match=r"lines\.xml': none of its 2 <Region> elements is a nucleus outline"):
        read_monuseg_xml(tmp_path / "lines.xml", (10, 10))


def _redraw(collection: dict, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a FeatureCollection back: pixels whose centres lie inside a polygon's
    outer ring and outside its holes take the feature's instance id."""
    redrawn = np.zeros(shape, np.int64)
    for feature in collection["features"]:
        assert feature["properties"]["objectType"] == feature["properties"]["object_type"] == "detection"
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        mask = np.zeros(shape, bool)
        for rings in polygons:
            for k, ring in enumerate(np.array(r) for r in rings):
                assert (ring[0] == ring[-1]).all()
                rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape)  # corners -> pixel centres
                mask[rr, cc] = k == 0  # the outer ring, then its holes
        redrawn[mask] = feature["properties"]["measurements"]["instance_id"]
    return redrawn


def test_geojson_polygons_redraw_the_nuclei_exactly():
    inst = synthetic_instance_map((80, 90), n_nuclei=25, seed=4)
    inst[0:6, 0:6] = inst.max() + 1  # a nucleus at the corner
    ragged = inst.copy()  # holes and parts that touch only at a corner
    ragged[(np.random.default_rng(0).random(inst.shape) < 0.08) & (inst > 0)] = 0
    for labels in (inst, ragged):
        fc = json.loads(json.dumps(to_geojson(labels)))
        assert fc["type"] == "FeatureCollection"
        assert len(fc["features"]) == len(np.unique(labels)) - 1
        np.testing.assert_array_equal(_redraw(fc, labels.shape), labels)


def test_geojson_of_large_ids_equals_that_of_small_ones_with_the_ids_kept():
    inst = synthetic_instance_map((64, 64), n_nuclei=12, seed=2)
    large = np.where(inst > 0, inst.astype(np.int64) + 5_000_000, 0)  # ids >> pixels: another path before
    small, big = to_geojson(inst), to_geojson(large)
    assert [f["geometry"] for f in big["features"]] == [f["geometry"] for f in small["features"]]
    np.testing.assert_array_equal(_redraw(big, large.shape), large)


def test_geojson_cells_carry_their_nucleus_and_other_kinds_do_not():
    inst = synthetic_instance_map((48, 48), n_nuclei=6, seed=1)
    detections = to_geojson(inst)["features"]
    for kind in ("detection", "annotation", "cell"):
        features = json.loads(json.dumps(to_geojson(inst, object_type=kind)))["features"]
        assert [f["geometry"] for f in features] == [f["geometry"] for f in detections]
        assert {f["properties"]["objectType"] for f in features} == {kind}
        if kind == "cell":  # QuPath's cell: its outline, and the nucleus beside the properties
            assert [f["nucleusGeometry"] for f in features] == [f["geometry"] for f in detections]
        else:
            assert not any("nucleusGeometry" in f for f in features)


def test_geojson_keeps_parts_touching_at_a_corner_and_holes():
    corner = np.zeros((10, 10), np.int32)
    corner[1:4, 1:4] = corner[4:7, 4:7] = 5
    (feature,) = to_geojson(corner)["features"]
    assert feature["geometry"]["type"] == "MultiPolygon" and len(feature["geometry"]["coordinates"]) == 2
    np.testing.assert_array_equal(_redraw(to_geojson(corner), corner.shape), corner)
    ring = np.zeros((12, 12), np.int32)
    ring[2:10, 2:10] = 3
    ring[5:7, 5:7] = 0
    (feature,) = to_geojson(ring)["features"]
    assert feature["geometry"]["type"] == "Polygon" and len(feature["geometry"]["coordinates"]) == 2  # outer, hole
    np.testing.assert_array_equal(_redraw(to_geojson(ring), ring.shape), ring)


def test_replace_folder_never_leaves_a_mix(tmp_path, monkeypatch):
    """A kill between renaming the old folder aside and the new one in leaves no target
    (not half of each); the next replacement removes what was left aside."""
    import os

    from nudiff_postproc._io import replace_folder

    target, staging = tmp_path / "out", tmp_path / "out.partial"
    for folder, name in ((target, "old.png"), (staging, "new.png")):
        folder.mkdir()
        (folder / name).write_text(name)
    real_replace, calls = os.replace, []

    def killed_at_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_second_rename)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(staging, target)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists() and (staging / "new.png").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.old.")]  # the old one aside, whole
    replace_folder(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "new.png").is_file()


def test_an_output_folder_inside_an_input_folder_is_refused(tmp_path):
    from nudiff_postproc._io import check_output_outside

    data = tmp_path / "data"
    for out in (data, data / "run", data / "a" / ".." / "run"):
        with pytest.raises(ValueError, match=r"--out '.*' is or lies inside --data '.*data'"):
            check_output_outside(out, {"--init": None, "--data": data})
    check_output_outside(tmp_path / "run", {"--data": data})  # beside it
    check_output_outside(tmp_path, {"--data": data})  # holding it: nothing of the data is replaced


def test_replace_folder_clears_a_symlink_left_aside(tmp_path):
    from nudiff_postproc._io import replace_folder

    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.png").write_text("x")
    (tmp_path / ".out.old.999").symlink_to(real)  # a kill left the replaced link aside
    staging = tmp_path / "staging"
    staging.mkdir()
    replace_folder(staging, tmp_path / "out")
    assert (tmp_path / "out").is_dir() and not (tmp_path / ".out.old.999").exists() and (real / "keep.png").is_file()
