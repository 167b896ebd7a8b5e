"""The SPADE UNet: modulation cache, guidance, batched against sequential guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nudiff_diffusion import NoiseSchedule, guided, sample
from nudiff_diffusion.testing import perturbed_copy
from nudiff_histo import HistoDenoiser, ModulationCache, SpadeNorm, build_histo_unet, paint_images


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed_copy(build_histo_unet("tiny-64"), std=0.05).eval()


def _inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, 64, generator=g)
    cond = torch.rand(n, 3, 64, 64, generator=g) * 2 - 1
    t = torch.randint(1000, (n,), generator=g)
    return x, cond, t


def test_spade_sits_in_the_middle_and_decoder_residual_blocks_as_in_the_papers_code(model):
    from nudiff_diffusion import GroupNorm32
    from nudiff_diffusion._unet import AttentionBlock, ResBlock

    def norms(blocks, kind):
        return [
            n
            for layers in blocks
            for b in layers
            if isinstance(b, kind)
            for n in b.children()
            if "Norm" in type(n).__name__
        ]

    # Nudiff's image_syn UNetModel: plain ResBlocks in the encoder, SDMResBlocks (SPADE in
    # both norms) in the middle and the decoder, plain GroupNorm in attention and output
    assert all(isinstance(n, GroupNorm32) for n in norms(model.down, ResBlock))
    assert all(isinstance(n, SpadeNorm) for n in norms([model.middle], ResBlock) + norms(model.up, ResBlock))
    assert all(isinstance(b.norm, GroupNorm32) for b in model.modules() if isinstance(b, AttentionBlock))
    assert isinstance(model.out_norm, GroupNorm32)
    assert sum(isinstance(m, SpadeNorm) for m in model.modules()) == 26  # the reference's count at these flags
    everywhere = build_histo_unet("tiny-64", spade_layers="all")  # nudiff's models before 2026-12-03
    assert sum(isinstance(m, SpadeNorm) for m in everywhere.modules()) == 45
    assert isinstance(everywhere.out_norm, SpadeNorm)
    with pytest.raises(ValueError, match="`spade_layers` must be one of"):
        build_histo_unet("tiny-64", spade_layers="encoder")


def test_a_checkpoint_that_records_no_placement_loads_with_spade_everywhere(tmp_path):
    import json

    from nudiff_diffusion import save_model
    from nudiff_histo import load_histo_model
    from nudiff_histo._model import histo_settings

    old = build_histo_unet("tiny-64", spade_layers="all", model_channels=32)
    settings = histo_settings("tiny-64", old)
    assert settings.pop("spade_layers") == "all"  # as written before 2026-12-03
    save_model(tmp_path / "old", old, diffusion=settings)
    loaded = load_histo_model(tmp_path / "old")
    assert isinstance(loaded.out_norm, SpadeNorm)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), loaded.state_dict().values(), strict=True))
    new = build_histo_unet("tiny-64", model_channels=32)
    save_model(tmp_path / "new", new, diffusion=histo_settings("tiny-64", new))
    assert json.loads((tmp_path / "new" / "config.json").read_text())["diffusion"]["spade_layers"] == "decoder"
    assert not isinstance(load_histo_model(tmp_path / "new").out_norm, SpadeNorm)


def test_spade_layer_is_group_norm_times_one_plus_gamma_plus_beta():
    torch.manual_seed(2)
    layer = SpadeNorm(64, hidden=16).eval()
    x, cond = torch.randn(2, 64, 16, 16), torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        hidden = layer.shared(torch.nn.functional.interpolate(cond, size=(16, 16), mode="nearest"))
        gamma, beta = layer.gamma(hidden), layer.beta(hidden)
        expected = torch.nn.functional.group_norm(x, 32) * (1 + gamma) + beta
        scale, shift = layer.modulation(cond, (16, 16))
        out = layer(x, cond)
    assert torch.equal(scale, 1 + gamma) and torch.equal(shift, beta)  # the cached form of the modulation
    assert (out - expected).abs().max() <= 1e-5


def test_structure_changes_the_output(model):
    x, cond, t = _inputs()
    with torch.no_grad():
        a, b = model(x, t, cond), model(x, t, torch.zeros_like(cond))
    assert (a - b).abs().max() > 1e-3


def test_cached_modulation_gives_the_uncached_eps(model):
    x, cond, t = _inputs()
    cache = ModulationCache(cond)
    with torch.no_grad():
        plain = model(x, t, cond)
        first = model(x, t, cache)
        filled = len(cache)
        x2, _, t2 = _inputs(seed=5)  # later steps: new x and t, same structures
        second = model(x2, t2, cache)
        second_plain = model(x2, t2, cond)
    assert filled == sum(isinstance(m, SpadeNorm) for m in model.modules())
    assert len(cache) == filled  # nothing recomputed
    assert (first - plain).abs().max() <= 1e-5
    assert (second - second_plain).abs().max() <= 1e-5


def test_cache_of_other_batch_size_is_refused(model):
    x, cond, t = _inputs(n=2)
    with torch.no_grad(), pytest.raises(ValueError, match="structures for a batch"):
        model(x, t, ModulationCache(torch.cat([cond, cond])))


def test_guidance_scale_one_is_the_conditional_model(model):
    x, cond, t = _inputs()
    runtime = HistoDenoiser(model)
    eps = guided(runtime.eps, cond, torch.zeros_like(cond), 1.0, prepare=runtime.prepare)(x, t)
    assert torch.allclose(eps, runtime.eps(x, t, cond), atol=1e-5)


def test_batched_guidance_equals_two_calls(model):
    x, cond, t = _inputs()
    runtime = HistoDenoiser(model)
    eps = guided(runtime.eps, cond, torch.zeros_like(cond), 2.0, prepare=runtime.prepare)(x, t)
    c, u = runtime.eps(x, t, cond), runtime.eps(x, t, torch.zeros_like(cond))
    # guidance combines the two halves of one call on 2N images: exactly, up to its own rounding
    with torch.no_grad():
        both = runtime.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
    c2, u2 = both[: len(x)], both[len(x) :]
    assert (eps[:, :3] - (u2[:, :3] + 2.0 * (c2[:, :3] - u2[:, :3]))).abs().max() <= 1e-6
    assert torch.equal(eps[:, 3:], c2[:, 3:])  # the variance from the conditional half
    # and no image sees another: N images alone and beside N others agree to float32 rounding
    # (kernels may sum in another order at another batch size: oneDNN's AVX2 ones give 6.6e-6
    # on |eps| <= 2.8, which u + 2 (c - u) triples)
    assert (c2 - c).abs().max() <= 1e-5 and (u2 - u).abs().max() <= 1e-5
    noise = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    one = paint_images(runtime, cond, guidance=2.0, sampler="ddim", steps=3, x_T=noise)
    two = paint_images(
        HistoDenoiser(model, cache=False),
        cond,
        guidance=2.0,
        sampler="ddim",
        steps=3,
        x_T=noise,
        batched_guidance=False,
    )
    # the eps of the two paths agree to float rounding (1e-5, above); DDIM's first step from
    # t = 999 scales an eps error by sqrt((1 - abar) / abar) into x0, so that bounds the samples
    abar = NoiseSchedule.linear(1000).alphas_bar[-1]
    assert (one - two).abs().max() <= 1e-5 * np.sqrt((1 - abar) / abar)


def test_guidance_below_zero_is_refused(model):
    _, cond, _ = _inputs()
    with pytest.raises(ValueError, match="guidance"):
        paint_images(HistoDenoiser(model), cond, guidance=-0.5)


def test_guided_sampling_matches_the_closed_form():
    """Two Gaussian 'models' mixed by guidance: the guided eps is the eps of the Gaussian
    whose mean is u + s (c - u) when the variances agree, so its samples have that mean."""
    schedule = NoiseSchedule.linear(1000)
    from nudiff_diffusion import gaussian_eps_fn

    cond_fn, null_fn = gaussian_eps_fn(schedule, 0.5, 0.2), gaussian_eps_fn(schedule, 0.1, 0.2)

    def eps_fn(x, t, c):
        half = x.shape[0] // 2
        return torch.cat([cond_fn(x[:half], t[:half]), null_fn(x[half:], t[half:])])

    c = torch.ones(2000, 1, 1, 1)
    fn = guided(eps_fn, c, torch.zeros_like(c), 2.0)
    out = sample(
        fn,
        shape=(2000, 1, 1, 1),
        schedule=schedule,
        method="ddim",
        steps=50,
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(out.mean().item() - 0.9) < 0.02  # 0.1 + 2 * (0.5 - 0.1)
    assert np.isfinite(out.numpy()).all()


def test_a_cached_modulation_export_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    """The modulation graph passes its check, the step graph fails: neither graph is left,
    nor the folder the export made (a half export beside an old config.json would load)."""
    from nudiff_histo import _export, export_histo_onnx

    calls = []

    def export_graph(module, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:  # as the real one: makes the folder, publishes the checked graph
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"a checked modulation graph")
            return 0.0
        raise RuntimeError("the step graph differs from PyTorch")

    monkeypatch.setattr(_export, "export_graph", export_graph)
    model = build_histo_unet("tiny-64").train()
    with pytest.raises(RuntimeError, match="step graph differs"):
        export_histo_onnx(model, tmp_path / "engine" / "deeper" / "model.onnx", batch_max=4)
    assert all(m.training for m in model.modules())  # the caller's model keeps its mode
    assert [p.name for p in calls] == [".model.modulation.onnx.pending", ".model.onnx.pending"]
    assert list(tmp_path.iterdir()) == []
