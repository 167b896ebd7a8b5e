"""HoVer-Net's losses against values worked out by hand, and the crop semantics of the targets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nudiff_postproc import hv_maps
from nudiff_seg._losses import dice_loss, hovernet_loss, mse_loss, msge_loss, sobel_kernels_5x5, targets, xentropy_loss


def test_cross_entropy_by_hand():
    # two pixels: true class 0 with p0 = 0.8, true class 1 with p1 = 0.25
    true = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    prob = torch.tensor([[[[0.8, 0.75]], [[0.2, 0.25]]]])
    assert xentropy_loss(true, prob).item() == pytest.approx(-(math.log(0.8) + math.log(0.25)) / 2, rel=1e-6)
    # probabilities are clamped at 1e-7 as in the reference
    zero = torch.tensor([[[[0.0]], [[1.0]]]])
    assert xentropy_loss(torch.tensor([[[[1.0]], [[0.0]]]]), zero).item() == pytest.approx(-math.log(1e-7), rel=1e-5)


def test_dice_by_hand():
    true = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0]]]])
    prob = torch.tensor([[[[0.5, 1.0, 0.0, 0.5]], [[0.5, 0.0, 1.0, 0.5]]]])
    # class 0: inter 1.5, |p| 2, |t| 2 -> 1 - (3 + s) / (4 + s); class 1: the same
    s = 1e-3
    assert dice_loss(true, prob).item() == pytest.approx(2 * (1 - (3 + s) / (4 + s)), rel=1e-6)
    assert mse_loss(torch.zeros(2, 3), torch.full((2, 3), 0.5)).item() == pytest.approx(0.25)


def test_gradient_kernels_and_msge_on_ramps():
    kx, ky = sobel_kernels_5x5()
    assert kx[2, 2] == 0 and kx[2, 3] == pytest.approx(1.0) and kx[2, 4] == pytest.approx(0.5)
    assert kx[1, 3] == pytest.approx(0.5) and torch.equal(ky, kx.T)
    # a ramp of slope a has gradient a * sum x^2 / (x^2 + y^2) = 12 a along it away from borders
    ramp = torch.arange(16.0)
    along_y, along_x = ramp[:, None].expand(16, 16), ramp.expand(16, 16)
    zero = torch.zeros(16, 16)
    focus = torch.zeros(1, 16, 16)
    focus[:, 4:12, 4:12] = 1

    def msge(h_true, h_pred, v_true, v_pred):
        return msge_loss(torch.stack([h_true, v_true])[None], torch.stack([h_pred, v_pred])[None], focus).item()

    # HoVer-Net's code differentiates h along y and v along x (the TensorFlow original's
    # get_gradient_hv(pred, 1, 0), the PyTorch port's "ij" meshgrid): an error of slope 0.05
    # there costs (12 * 0.05)^2 on the 64 focus pixels of one channel, divided by 2 * 64
    assert msge(0.1 * along_y, 0.15 * along_y, zero, zero) == pytest.approx((12 * 0.05) ** 2 / 2, rel=1e-5)
    assert msge(zero, zero, 0.1 * along_x, 0.15 * along_x) == pytest.approx((12 * 0.05) ** 2 / 2, rel=1e-5)
    # and not h along x nor v along y (the paper's equation)
    assert msge(0.1 * along_x, 0.15 * along_x, 0.1 * along_y, 0.3 * along_y) == pytest.approx(0.0, abs=1e-10)


def test_targets_are_cropped_after_the_distance_maps():
    inst = np.zeros((40, 40), np.int32)
    inst[5:15, 8:30] = 1  # crosses the border of the 20 px centre
    inst[18:24, 16:26] = 2
    np_t, hv_t = targets(inst, 20)
    assert np.array_equal(np_t, (inst[10:30, 10:30] > 0).astype(np.float32))
    assert np.array_equal(hv_t, hv_maps(inst)[10:30, 10:30])
    with pytest.raises(ValueError, match="square map at least 50 px"):
        targets(inst, 50)


def _reference_hv(ann: np.ndarray, crop: int) -> np.ndarray:
    """HoVer-Net's gen_instance_hv_map (models/hovernet/targets.py) then the centre crop of
    gen_targets, transcribed; the map is padded by 2 px first, as HoVer-Net's windows are
    (its boxes grow by 2 px); remove_small_objects(min_size=30) as in the scikit-image
    0.17.2 HoVer-Net pins (sizes under 30 removed)."""
    from scipy import ndimage as ndi

    ann = np.pad(ann, 2)
    fixed, top_id = ann.copy(), ann.max()
    for inst_id in np.unique(ann)[1:]:  # fix_mirror_padding
        parts = ndi.label(ann == inst_id)[0]
        parts[parts > 1] += top_id
        fixed[parts > 1] = parts[parts > 1]
        top_id = fixed.max()
    r0 = (fixed.shape[0] - crop) // 2
    cropped = fixed[r0 : r0 + crop, r0 : r0 + crop]
    ids, counts = np.unique(cropped, return_counts=True)
    x_map, y_map = np.zeros(ann.shape, np.float32), np.zeros(ann.shape, np.float32)
    for inst_id in ids[(ids > 0) & (counts >= 30)]:
        inst_map = (fixed == inst_id).astype(np.uint8)
        rows, cols = np.flatnonzero(inst_map.any(axis=1)), np.flatnonzero(inst_map.any(axis=0))
        box = [rows[0] - 2, rows[-1] + 3, cols[0] - 2, cols[-1] + 3]
        inst_map = inst_map[box[0] : box[1], box[2] : box[3]]
        com = [int(c + 0.5) for c in ndi.center_of_mass(inst_map)]
        inst_x, inst_y = np.meshgrid(
            np.arange(1, inst_map.shape[1] + 1) - com[1], np.arange(1, inst_map.shape[0] + 1) - com[0]
        )
        inst_x, inst_y = (np.where(inst_map > 0, v, 0).astype(np.float32) for v in (inst_x, inst_y))
        for v in (inst_x, inst_y):
            if v.min() < 0:
                v[v < 0] /= -v[v < 0].min()
            if v.max() > 0:
                v[v > 0] /= v[v > 0].max()
        x_map[box[0] : box[1], box[2] : box[3]][inst_map > 0] = inst_x[inst_map > 0]
        y_map[box[0] : box[1], box[2] : box[3]][inst_map > 0] = inst_y[inst_map > 0]
    hv = np.dstack([x_map, y_map])[2:-2, 2:-2]
    r0 = (hv.shape[0] - crop) // 2
    return hv[r0 : r0 + crop, r0 : r0 + crop]


def test_targets_are_hovernets_gen_targets():
    """Nuclei in two parts get a centre each; a nucleus cut by the output border has
    distance maps only when more than 30 of its pixels are inside the output."""
    from nudiff_postproc import synthetic_instance_map

    inst = np.zeros((40, 40), np.int32)
    inst[2:12, 14:22] = 1  # 80 px, of which 2 rows x 8 = 16 inside the 20 px output: no maps
    inst[20:27, 12:17] = inst[20:27, 20:26] = 2  # one id, two parts of 35 and 42 px
    inst[12:18, 23:28] = 3  # 30 px, all inside: HoVer-Net keeps it
    _, hv_t = targets(inst, 20)
    assert not hv_t[:2].any()
    assert hv_t[10:17, 2:7, 0].min() == -1 and hv_t[10:17, 2:7, 0].max() == 1  # each part spans -1..1
    assert hv_t[10:17, 10:16, 0].min() == -1 and hv_t[10:17, 10:16, 0].max() == 1
    assert hv_t[:, :, 0][inst[10:30, 10:30] == 3].min() == -1
    np.testing.assert_array_equal(hv_t, _reference_hv(inst, 20))
    # nuclei one pixel tall or wide get maps too (their boxes grow by 2 px before the test
    # that would skip them): h from -1 to 1 along a row and v = +1 (one row below the zero)
    lines = np.zeros((80, 80), np.int32)
    lines[20, 15:55] = 1  # 40 px
    lines[25:60, 60] = 2  # 35 px
    _, hv_t = targets(lines, 60)
    row, col = hv_t[10, 5:45], hv_t[15:50, 50]
    assert row[0, 0] == -1 and row[-1, 0] == 1 and (row[:, 1] == 1).all()
    assert col[0, 1] == -1 and col[-1, 1] == 1 and (col[:, 0] == 1).all()
    np.testing.assert_array_equal(hv_t, _reference_hv(lines, 60))
    for seed in range(12):
        inst = synthetic_instance_map((164, 164), n_nuclei=60, seed=seed)
        inst[:, 40 + seed] = 0  # cut some nuclei in two
        inst[70 + seed] = 0
        np.testing.assert_array_equal(targets(inst, 80)[1], _reference_hv(inst, 80), err_msg=str(seed))


def test_total_loss_is_the_sum_of_its_parts():
    torch.manual_seed(0)
    out = {"np": torch.randn(2, 2, 8, 8), "hv": torch.randn(2, 2, 8, 8)}
    np_t = (torch.rand(2, 8, 8) > 0.5).float()
    hv_t = torch.rand(2, 2, 8, 8) * 2 - 1
    total, parts = hovernet_loss(out, np_t, hv_t)
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-6)
    prob = out["np"].softmax(1)
    onehot = torch.stack([1 - np_t, np_t], 1)
    assert parts["ce"] == pytest.approx(torch.nn.functional.nll_loss(prob.log(), np_t.long()).item(), rel=1e-5)
    assert parts["dice"] == pytest.approx(dice_loss(onehot, prob).item(), rel=1e-6)
