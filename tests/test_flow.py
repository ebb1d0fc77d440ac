"""Tests of the flow-matching maths: expected values are computed by hand, from the spec's formulas or by
scipy/diffusers, never copied from fluxlora's own output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from fluxlora import flow
from fluxlora.errors import ConfigError

N = 20_000  # KS critical value at p=0.01 is ~0.0115 for this many samples
P_MIN = 0.01


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logit(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 1e-300, 1 - 1e-16)
    return np.log(x) - np.log1p(-x)


def _shifted_sigmoid_normal_cdf(shift: float, scale: float):
    """CDF of shift_S(sigmoid(scale·n)), n ~ N(0,1): invert the shift, then the sigmoid."""

    def cdf(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        sigma0 = x / (shift - (shift - 1.0) * x)  # inverse of S·u/(1+(S−1)u)
        return stats.norm.cdf(_logit(sigma0) / scale)

    return cdf


# --------------------------------------------------------------------------------------------- packing


def test_pack_matches_hand_loop_and_round_trips():
    b, c, h, w = 2, 3, 4, 6
    x = torch.randn(b, c, h, w, generator=_gen())
    packed = flow.pack_latents(x)
    assert packed.shape == (b, (h // 2) * (w // 2), c * 4)
    expected = torch.empty_like(packed)
    for bi in range(b):
        for ci in range(c):
            for r in range(h // 2):
                for col in range(w // 2):
                    for py in range(2):
                        for px in range(2):
                            expected[bi, r * (w // 2) + col, ci * 4 + py * 2 + px] = x[
                                bi, ci, 2 * r + py, 2 * col + px
                            ]
    assert torch.equal(packed, expected)
    assert torch.equal(flow.unpack_latents(packed, h, w), x)


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        flow.pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match="do not fit"):
        flow.unpack_latents(torch.zeros(1, 6, 64), 4, 4)


def test_image_and_text_ids():
    ids = flow.image_ids(2, 3, 5)
    assert ids.shape == (2, 15, 3) and ids.dtype == torch.float32
    for b in range(2):
        for r in range(3):
            for c in range(5):
                assert ids[b, r * 5 + c].tolist() == [0.0, float(r), float(c)]
    t = flow.text_ids(2, 7)
    assert t.shape == (2, 7, 3) and not t.any()


# ------------------------------------------------------------------------------------ shift helpers


def test_flux_shift_mu_line():
    assert flow.flux_shift_mu(256) == pytest.approx(0.5)
    assert flow.flux_shift_mu(4096) == pytest.approx(1.15)
    assert flow.flux_shift_mu(1024) == pytest.approx(0.5 + 768 * 0.65 / 3840)
    # 1024² image: e^1.15 ≈ 3.158 (the guide's recommended discrete_flow_shift 3.1582)
    assert math.exp(flow.flux_shift_mu(4096)) == pytest.approx(3.1582, abs=1e-4)


def test_time_shift_equals_shift_sigma_and_hand_values():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(flow.time_shift(1.15, 1.0, t), flow.shift_sigma(math.exp(1.15), t), atol=1e-6)
    # S=3, u=0.5: 1.5 / 2 = 0.75
    assert flow.shift_sigma(3.0, torch.tensor([0.5])).item() == pytest.approx(0.75)
    # BFL time_shift(mu, sigma, t) with sigma=2: e^mu / (e^mu + (1/t − 1)^2); t=0.25 ⇒ (3)^2 = 9
    assert flow.time_shift(0.0, 2.0, torch.tensor([0.25])).item() == pytest.approx(1 / 10)


def test_discrete_table_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    table = flow.discrete_sigma_table(3.0)
    assert table.dtype == torch.float32 and table.shape == (1000,)
    assert torch.allclose(table, sched.sigmas[:1000].float(), atol=1e-6)
    assert table[0].item() == 1.0
    assert table[999].item() == pytest.approx(3 * 0.001 / (1 + 2 * 0.001))


# ------------------------------------------------------------------------------ σ distributions (KS)


@pytest.mark.parametrize(
    ("mode", "kwargs", "cdf"),
    [
        ("uniform", {}, lambda x: np.clip(x, 0, 1)),
        ("sigmoid", {"sigmoid_scale": 1.0}, _shifted_sigmoid_normal_cdf(1.0, 1.0)),
        ("sigmoid", {"sigmoid_scale": 2.5}, _shifted_sigmoid_normal_cdf(1.0, 2.5)),
        (
            "shift",
            {"discrete_flow_shift": 3.1582, "sigmoid_scale": 1.0},
            _shifted_sigmoid_normal_cdf(3.1582, 1.0),
        ),
        (
            "flux_shift",
            {"seq_len": 256, "sigmoid_scale": 1.0},
            _shifted_sigmoid_normal_cdf(math.exp(0.5), 1.0),
        ),
        (
            "flux_shift",
            {"seq_len": 4096, "sigmoid_scale": 1.0},
            _shifted_sigmoid_normal_cdf(math.exp(1.15), 1.0),
        ),
    ],
    ids=["uniform", "sigmoid", "sigmoid_s2.5", "shift", "flux_shift_256", "flux_shift_4096"],
)
def test_continuous_modes_follow_their_cdf(mode, kwargs, cdf):
    sig = flow.sample_sigmas(mode, N, generator=_gen(1), **kwargs)
    assert sig.dtype == torch.float32 and sig.shape == (N,)
    assert ((sig >= 0) & (sig <= 1)).all()
    assert stats.kstest(sig.double().numpy(), cdf).pvalue > P_MIN


def test_ks_has_power_flux_shift_resolutions_differ():
    """The KS checks above would notice a wrong μ: 256-token samples are rejected against the 4096-token CDF."""
    sig = flow.sample_sigmas("flux_shift", N, generator=_gen(1), seq_len=256)
    assert stats.kstest(sig.double().numpy(), _shifted_sigmoid_normal_cdf(math.exp(1.15), 1.0)).pvalue < 1e-6


def _table_numpy(shift: float) -> np.ndarray:
    u = (1000 - np.arange(1000)) / 1000.0
    return shift * u / (1 + (shift - 1) * u)


def _sigma_mode_cdf(shift: float, u_cdf):
    """CDF of σ_i with i = floor(1000u): P(σ ≤ x) = P(i ≥ k(x)) = 1 − F_u(k(x)/1000), k(x) = first i with σ_i ≤ x."""
    table = _table_numpy(shift)  # decreasing in i

    def cdf(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64) + 1e-6  # float32 samples vs float64 table
        k = np.searchsorted(-table, -x, side="left")  # first index with table[k] <= x
        return np.where(k >= 1000, 0.0, 1.0 - u_cdf(k / 1000.0))

    return cdf


def test_sigma_mode_logit_normal_follows_table_indexed_cdf():
    mean, std, shift = 0.3, 1.2, 3.0
    sig = flow.sample_sigmas(
        "sigma",
        N,
        generator=_gen(2),
        discrete_flow_shift=shift,
        weighting_scheme="logit_normal",
        logit_mean=mean,
        logit_std=std,
    )
    assert sig.dtype == torch.float32
    table = _table_numpy(shift)
    # every sample is one of the table's levels
    assert np.abs(sig.double().numpy()[:, None] - table[None, :]).min(axis=1).max() < 1e-6

    def u_cdf(u: np.ndarray) -> np.ndarray:
        return stats.norm.cdf((_logit(u) - mean) / std)

    assert stats.kstest(sig.double().numpy(), _sigma_mode_cdf(shift, u_cdf)).pvalue > P_MIN
    # exact check without KS's tie bias: jitter the table index back into a continuous u and test it
    index = np.abs(sig.double().numpy()[:, None] - table[None, :]).argmin(axis=1)
    u = (index + np.random.default_rng(0).random(N)) / 1000.0
    assert stats.kstest(u, u_cdf).pvalue > P_MIN


def test_sigma_mode_uniform_weighting_is_uniform_over_the_table():
    sig = flow.sample_sigmas(
        "sigma", N, generator=_gen(3), discrete_flow_shift=3.0, weighting_scheme="uniform"
    )
    assert stats.kstest(sig.double().numpy(), _sigma_mode_cdf(3.0, lambda u: np.clip(u, 0, 1))).pvalue > P_MIN


def test_mode_density_follows_its_cdf():
    scale = 1.29
    u = flow.sample_density("mode", N, generator=_gen(4), mode_scale=scale).double().numpy()
    # u = g(r) = 1 − r − s(cos²(πr/2) − 1 + r), r ~ U; g is decreasing for s=1.29 ⇒ P(u ≤ x) = 1 − g⁻¹(x)
    r = np.linspace(0, 1, 200_001)
    g = 1 - r - scale * (np.cos(np.pi * r / 2) ** 2 - 1 + r)
    assert np.all(np.diff(g) < 0)

    def cdf(x: np.ndarray) -> np.ndarray:
        return 1.0 - np.interp(x, g[::-1], r[::-1])

    assert stats.kstest(u, cdf).pvalue > P_MIN


def test_sample_sigmas_is_deterministic_per_generator_and_rejects_bad_modes():
    a = flow.sample_sigmas("flux_shift", 8, generator=_gen(5), seq_len=1024)
    b = flow.sample_sigmas("flux_shift", 8, generator=_gen(5), seq_len=1024)
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="--timestep_sampling"):
        flow.sample_sigmas("logsnr", 4, generator=_gen())
    with pytest.raises(ValueError, match="seq_len"):
        flow.sample_sigmas("flux_shift", 4, generator=_gen())


# ------------------------------------------------------------------------------------------ noising


def test_noisy_latents_hand_values_and_float32():
    x0 = torch.full((2, 1, 2, 2), 2.0, dtype=torch.bfloat16)
    noise = torch.full((2, 1, 2, 2), 4.0)
    sig = torch.tensor([0.25, 1.0], dtype=torch.bfloat16)
    xt = flow.noisy_latents(x0, noise, sig)
    assert xt.dtype == torch.float32
    assert torch.allclose(xt[0], torch.full((1, 2, 2), 0.75 * 2 + 0.25 * 4))
    assert torch.allclose(xt[1], torch.full((1, 2, 2), 4.0))
    xt_ip = flow.noisy_latents(x0, noise, sig, ip_noise=torch.full((2, 1, 2, 2), 8.0))
    assert torch.allclose(xt_ip[0], torch.full((1, 2, 2), 0.75 * 2 + 0.25 * (4 + 8)))
    assert torch.equal(flow.flow_target(x0, noise), torch.full((2, 1, 2, 2), 2.0))


def test_sample_noise_float32_and_seeded():
    a = flow.sample_noise((2, 3), generator=_gen(7))
    assert a.dtype == torch.float32 and torch.equal(a, flow.sample_noise((2, 3), generator=_gen(7)))


def test_ip_noise_strength():
    assert flow.ip_noise_strength(0.1, False, _gen()) == 0.1
    draws = np.array([flow.ip_noise_strength(0.2, True, g) for g in [_gen(i) for i in range(400)]])
    assert ((draws >= 0) & (draws <= 0.2)).all()
    assert stats.kstest(draws / 0.2, "uniform").pvalue > P_MIN


# ------------------------------------------------------------------------------ prediction and loss


def test_prediction_types_hand_values():
    pred = torch.full((2, 1, 1, 1), 2.0, dtype=torch.bfloat16)
    xt = torch.full((2, 1, 1, 1), 5.0)
    sig = torch.tensor([0.5, 0.25])
    value, w = flow.apply_prediction_type("raw", pred, xt, sig, "sigma_sqrt")
    assert value.dtype == torch.float32 and torch.equal(value, torch.full((2, 1, 1, 1), 2.0)) and w is None
    value, w = flow.apply_prediction_type("additive", pred, xt, sig, "cosmap")
    assert torch.equal(value, torch.full((2, 1, 1, 1), 7.0)) and w is None
    value, w = flow.apply_prediction_type("sigma_scaled", pred, xt, sig, "sigma_sqrt")
    assert value.flatten().tolist() == [5 - 0.5 * 2, 5 - 0.25 * 2]
    assert w.tolist() == [4.0, 16.0]
    _, w = flow.apply_prediction_type("sigma_scaled", pred, xt, sig, "cosmap")
    expected = [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.5, 0.25)]
    assert w.tolist() == pytest.approx(expected)
    _, w = flow.apply_prediction_type("sigma_scaled", pred, xt, sig, "logit_normal")
    assert w is None
    with pytest.raises(ConfigError, match="--model_prediction_type"):
        flow.apply_prediction_type("v", pred, xt, sig, None)


def test_elementwise_losses_hand_values():
    # sample 0: differences 3 and 0, c=4 ⇒ √(9+16)=5; sample 1: differences 5 and 0, c=12 ⇒ √(25+144)=13
    pred = torch.tensor([[[[3.0, 1.0]]], [[[5.0, -2.0]]]])
    target = torch.tensor([[[[0.0, 1.0]]], [[[0.0, -2.0]]]])
    c = torch.tensor([4.0, 12.0])
    assert flow.elementwise_loss("l2", pred, target).flatten().tolist() == [9, 0, 25, 0]
    assert flow.elementwise_loss("l1", pred, target).flatten().tolist() == [3, 0, 5, 0]
    assert flow.elementwise_loss("huber", pred, target, c).flatten().tolist() == [2 * 4 * 1, 0, 2 * 12 * 1, 0]
    assert flow.elementwise_loss("smooth_l1", pred, target, c).flatten().tolist() == [2, 0, 2, 0]
    assert flow.elementwise_loss("l2", pred.bfloat16(), target).dtype == torch.float32
    with pytest.raises(ValueError, match="huber_c"):
        flow.elementwise_loss("huber", pred, target)
    with pytest.raises(ConfigError, match="--loss_type"):
        flow.elementwise_loss("l3", pred, target)


def test_huber_c_schedules():
    sig = torch.tensor([0.0, 0.5, 1.0])
    assert flow.huber_c("constant", 0.1, 2.0, sig).tolist() == pytest.approx([0.2, 0.2, 0.2])
    # huber_scale · huber_c^(t/1000), t = 1000σ
    assert flow.huber_c("exponential", 0.1, 2.0, sig).tolist() == pytest.approx(
        [2.0, 2 * math.sqrt(0.1), 0.2]
    )
    with pytest.raises(ConfigError, match="alphas_cumprod.*constant or exponential"):
        flow.huber_c("snr", 0.1, 1.0, sig)


def test_mask_normalisation_half_mask_gives_mean_of_kept_half():
    loss = torch.tensor([[[[1.0, 10.0], [3.0, 20.0]], [[5.0, 30.0], [7.0, 40.0]]]])  # [1, 2, 2, 2]
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])  # keep the left column
    assert flow.reduce_loss(loss, mask=mask).item() == pytest.approx((1 + 3 + 5 + 7) / 4)
    # sd-scripts' unnormalised mean (spec §12.5) is available for compatibility
    assert flow.reduce_loss(loss, mask=mask, normalize_mask=False).item() == pytest.approx(
        (1 + 3 + 5 + 7) / 8
    )
    # an empty mask contributes 0, not NaN
    per = flow.per_sample_loss(
        torch.ones(2, 1, 2, 2), mask=torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    )
    assert per.tolist() == [0.0, 1.0]


def test_reduce_loss_weights_then_batch_mean():
    loss = torch.stack([torch.full((2, 2, 2), 1.0), torch.full((2, 2, 2), 3.0)])
    assert flow.reduce_loss(loss).item() == pytest.approx(2.0)
    assert flow.reduce_loss(loss, sample_weights=torch.tensor([1.0, 0.5])).item() == pytest.approx(
        (1 + 1.5) / 2
    )


def test_latent_mask_area_resize():
    mask = torch.tensor(
        [[[[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0]]]]
    )
    small = flow.latent_mask(mask, 2, 2)
    assert small.shape == (1, 1, 2, 2)
    assert small.flatten().tolist() == [0.75, 0.0, 1.0, 0.75]


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", None])
def test_sample_density_equals_diffusers(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = flow.sample_density(scheme, 64, generator=_gen(9), logit_mean=0.2, logit_std=0.7, mode_scale=1.29)
    ref = compute_density_for_timestep_sampling(
        scheme or "none", 64, logit_mean=0.2, logit_std=0.7, mode_scale=1.29, generator=_gen(9)
    )
    assert torch.equal(ours, ref.float())
