"""Fidelity metrics against values known in closed form."""

import math

import pytest
import torch

from astraea.search.fidelity import FidelityReport, compare, fidelity, psnr, relative_l2, ssim
from astraea.search.workload import Trajectory


def video(seed=0, shape=(1, 4, 3, 16, 16)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_videos_are_perfect():
    x = video()
    f = compare(x, x.clone())
    assert f.psnr == math.inf
    assert f.ssim == pytest.approx(1.0, abs=1e-12)
    assert f.rel_l2 == 0.0


def test_known_noise_gives_known_psnr():
    # A reference spanning exactly [0, 1] and an error of exactly +-sigma everywhere:
    # MSE = sigma^2, so PSNR = 20 log10(1 / sigma).
    reference = video()
    reference.view(-1)[0], reference.view(-1)[1] = 0.0, 1.0
    sigma = 0.05
    signs = torch.where(video(1) < 0.5, -1.0, 1.0).double()
    assert psnr(reference + sigma * signs, reference) == pytest.approx(20 * math.log10(1 / sigma), abs=1e-9)
    assert relative_l2(reference + sigma * signs, reference) == pytest.approx(
        sigma * math.sqrt(reference.numel()) / reference.norm().item(), rel=1e-9
    )


def test_ssim_falls_with_noise_and_is_frame_wise():
    reference = video(shape=(1, 3, 2, 12, 12))
    reference[0, 0, :, 0, 0], reference[0, 0, :, 0, 1] = 0.0, 1.0  # every frame spans the data range
    slightly = ssim(reference + 0.01 * video(2, reference.shape), reference)
    heavily = ssim(reference + 0.5 * video(3, reference.shape), reference)
    assert 1.0 > slightly > heavily
    # Frames are scored on their own: a wrong second frame costs half the score of both wrong.
    wrong = reference.clone()
    wrong[:, :, 1] = video(4, wrong[:, :, 1].shape)
    one_wrong = ssim(wrong, reference)
    assert one_wrong == pytest.approx((1.0 + ssim(wrong[:, :, 1:], reference[:, :, 1:])) / 2)


def test_ssim_of_one_window_is_the_formula_on_its_statistics():
    """A 7x7 frame holds one window: SSIM is Wang et al.'s formula on the frame's means, sample
    variances and covariance, each channel's value averaged (scikit-image's defaults)."""
    reference, test = video(5, (1, 2, 1, 7, 7)), video(6, (1, 2, 1, 7, 7))
    r = float(reference.max() - reference.min())
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    values = []
    for c in range(2):
        x, y = reference[0, c, 0].flatten(), test[0, c, 0].flatten()
        mx, my = x.mean(), y.mean()
        vx, vy, vxy = x.var(), y.var(), ((x - mx) * (y - my)).sum() / (x.numel() - 1)
        values.append(float((2 * mx * my + c1) * (2 * vxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))
    assert ssim(test, reference) == pytest.approx(sum(values) / 2, rel=1e-12)


def test_ssim_shrinks_its_window_to_small_latents_and_refuses_tiny_ones():
    small = video(shape=(1, 4, 2, 4, 6))
    assert ssim(small, small) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 3x3"):
        ssim(video(shape=(1, 4, 2, 2, 8)), video(shape=(1, 4, 2, 2, 8)))


def test_layout_is_checked():
    with pytest.raises(ValueError, match="batch, channels, frames, height, width"):
        psnr(torch.zeros(4, 8, 8, 8), torch.zeros(4, 8, 8, 8))


def test_packed_latents_are_compared_as_tokens_by_channels():
    """LTX's pipelines keep latents as [batch, tokens, channels]: one frame of tokens by channels."""
    reference = torch.randn(2, 48, 8, generator=torch.Generator().manual_seed(0))
    test = reference + 0.01 * torch.randn(2, 48, 8, generator=torch.Generator().manual_seed(1))
    assert psnr(test, reference) == pytest.approx(psnr(test[:, None, None], reference[:, None, None]))
    assert 0.9 < ssim(test, reference) < 1.0


def test_contribution_view_is_not_flattered_by_shared_noise():
    # Both runs share large noise; the model part differs by 10%. The latent view looks good
    # because of the noise; the contribution view shows the 10%.
    noise = 10 * video(5)
    model = video(6)
    dense = Trajectory(noise, noise + model)
    sparse = Trajectory(noise, noise + 1.1 * model)
    report = fidelity([sparse], [dense])
    assert report.contribution.rel_l2 == pytest.approx(0.1, rel=1e-6)
    assert report.latent.psnr > report.contribution.psnr + 10
    assert report.score == report.contribution.psnr
    assert report.decoded is None


def test_decoded_view_and_mean_over_seeds():
    def decoder(x):
        return x.clamp(0.0, 1.0)

    runs, references = [], []
    for seed, error in ((0, 0.0), (1, 0.1)):
        noise = video(10 + seed)
        references.append(Trajectory(noise, noise + video(20 + seed)))
        runs.append(Trajectory(noise, references[-1].latent + error))
    report = fidelity(runs, references, decoder)
    per_seed = [fidelity([r], [d], decoder) for r, d in zip(runs, references)]
    assert report.decoded is not None and report.score == report.decoded.psnr
    assert report.decoded.ssim == pytest.approx((per_seed[0].decoded.ssim + per_seed[1].decoded.ssim) / 2)
    assert per_seed[0].decoded.psnr == math.inf
    # PSNR over seeds is that of the mean error: an identical seed halves the other's, +3 dB.
    assert report.decoded.psnr == pytest.approx(per_seed[1].decoded.psnr + 10 * math.log10(2))
    assert FidelityReport.from_json(report.to_json()) == report


def test_runs_from_other_seeds_are_refused():
    a, b = Trajectory(video(1), video(2)), Trajectory(video(3), video(2))
    with pytest.raises(ValueError, match="different seeds"):
        fidelity([a], [b])
    with pytest.raises(ValueError, match="one dense reference per generation"):
        fidelity([a], [])
