"""The torchvision-layout ResNet and patch embeddings; the subset CLI with ResNet features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nudiff_postproc import synthetic_instance_map, write_image, write_instance_map
from nudiff_postproc.cli import main as postproc_main
from nudiff_seg import load_backbone, patch_embeddings, resnet18, resnet50
from nudiff_seg.cli import main


def test_parameter_counts_are_torchvisions():
    # the published parameter counts of torchvision.models.resnet18 / resnet50
    assert sum(p.numel() for p in resnet18().parameters()) == 11_689_512
    assert sum(p.numel() for p in resnet50().parameters()) == 25_557_032


def test_state_dict_names_follow_torchvision():
    keys = set(resnet50().state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_var",
        "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.num_batches_tracked",
        "layer3.5.conv3.weight",
        "layer4.2.bn3.bias",
        "fc.weight",
    ):
        assert key in keys
    assert len(keys) == 320  # torchvision's resnet50 state dict has 320 entries


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = resnet50().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    root = tmp_path_factory.mktemp("weights")
    torch.save(model.state_dict(), root / "resnet50.pth")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "resnet50.safetensors"))
    return root, model


def test_weights_load_from_pth_and_safetensors(weights):
    root, model = weights
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.features(x)
        for name in ("resnet50.pth", "resnet50.safetensors"):
            np.testing.assert_array_equal(load_backbone(root / name).features(x).numpy(), expected.numpy())


def test_weights_saved_before_pytorch_0_4_1_load(weights, tmp_path):
    """torchvision's resnet50-19c8e357.pth predates BatchNorm's num_batches_tracked."""
    root, model = weights
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_array_equal(
            load_backbone(tmp_path / "old.pth").features(x).numpy(), model.features(x).numpy()
        )


def test_wrong_weights_are_refused(weights, tmp_path):
    root, _ = weights
    with pytest.raises(ValueError, match="not a torchvision ResNet of this depth"):
        load_backbone(root / "resnet50.pth", arch="resnet18")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_backbone(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_backbone(tmp_path / "absent.pth")


def test_embeddings_are_per_patch_and_batch_independent(weights):
    _, model = weights
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    a = patch_embeddings(images, model, batch=5)
    b = patch_embeddings(images, model, batch=2)
    assert a.shape == (5, 2048) and a.dtype == np.float32
    # batched convolutions round differently: float32 rounding, relative to the features' scale
    scale = np.abs(a).max()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * scale)
    single = patch_embeddings(images[3:4], model)
    np.testing.assert_allclose(a[3], single[0], rtol=0, atol=1e-5 * scale)
    with pytest.raises(ValueError, match="uint8"):
        patch_embeddings(images.astype(np.float32), model)
    with pytest.raises(ValueError, match="`batch` must be an integer >= 1, got 0"):
        patch_embeddings(images, model, batch=0)
    # a model in training mode: embedded in eval mode (batch statistics would make each patch's
    # features depend on its batch and move the running means), and left in training mode
    model.train()
    try:
        means = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
        np.testing.assert_allclose(patch_embeddings(images, model, batch=2), a, rtol=0, atol=1e-5 * scale)
        assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in means.items())
    finally:
        model.eval()


def test_features_cli_feeds_the_subset_cli(weights, tmp_path, capsys):
    root, _ = weights
    data = tmp_path / "patches"
    rng = np.random.default_rng(1)
    for i in range(12):
        inst = synthetic_instance_map((64, 64), n_nuclei=3 + i % 5, seed=i)
        write_instance_map(data / "instance_maps" / f"p{i:02d}.png", inst)
        write_image(data / "images" / f"p{i:02d}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert (
        main(
            ["features", "--data", str(data), "--weights", str(root / "resnet50.pth"), "--out", str(tmp_path / "f.npz")]
        )
        == 0
    )
    with np.load(tmp_path / "f.npz") as f:
        assert f["features"].shape == (12, 2048) and list(f["names"]) == [f"p{i:02d}" for i in range(12)]
    args = ["subset", "--data", str(data), "--fraction", "0.3", "--out", str(tmp_path / "s.txt")]
    assert postproc_main([*args, "--features", str(tmp_path / "f.npz")]) == 0
    chosen = (tmp_path / "s.txt").read_text().split()
    assert chosen and set(chosen) <= {f"p{i:02d}" for i in range(12)}
    assert postproc_main([*args, "--features", str(tmp_path / "f.npz")]) == 0
    assert (tmp_path / "s.txt").read_text().split() == chosen  # deterministic for a seed
    np.savez(tmp_path / "short.npz", names=np.array(["p00"]), features=np.zeros((1, 4)))
    capsys.readouterr()
    assert postproc_main([*args, "--features", str(tmp_path / "short.npz")]) == 2
    assert "has no features for 11 patches" in capsys.readouterr().err
