"""MFM / RLC / HTB and the COMIC criterion against hand-worked formulas (Eqs. 2-3, 5-6, 11; comic-method.md §5-§8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comic.config import load_config
from comic.losses import BCE, ComicCriterion, HTBLoss, LossCriterion, MFMLoss, RLCLoss
from comic.models import ComicOutput

COUNTS = torch.tensor([400.0, 60.0, 12.0, 3.0])


def _data(seed: int = 0, batch: int = 6, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, len(COUNTS), generator=gen, dtype=torch.float64) * scale
    observed = (torch.rand(batch, len(COUNTS), generator=gen) < 0.4).double()
    return logits, observed


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _mfm_reference(z, y, counts, gamma_pos=0.0, gamma_neg=3.0, clip=0.05, exponent=1 / 3):
    """Eq. 5-6 in the released code's form, written out element-wise with numpy."""
    w = (1 - np.log(counts / counts.max())) ** exponent  # gamma_ht = w_c
    p = _sigmoid(z)
    p_neg = np.minimum(1.0, 1 - p + clip)
    p_t = np.where(y == 1, p, p_neg)
    gamma = np.where(y == 1, gamma_pos, gamma_neg + w)  # w+ = 0, w- = 1
    return -np.sum((1 - p_t) ** gamma * w * (y * np.log(p) + (1 - y) * np.log(p_neg)))


def test_mfm_matches_hand_formula():
    z, y = _data()
    expected = _mfm_reference(z.numpy(), y.numpy(), COUNTS.double().numpy())
    assert MFMLoss(COUNTS)(z, y).item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_mfm_without_focusing_clip_and_weights_is_bce():
    z, y = _data(1)
    mfm = MFMLoss(COUNTS, gamma_pos=0.0, gamma_neg=0.0, use_ht=False, clip=0.0)
    p = _sigmoid(z.numpy())
    bce = -np.sum(y.numpy() * np.log(p) + (1 - y.numpy()) * np.log(1 - p))
    assert mfm(z, y).item() == pytest.approx(bce, rel=1e-6, abs=1e-6)
    assert BCE()(z, y).item() == pytest.approx(bce, rel=1e-6, abs=1e-6)


def test_mfm_focusing_factor_gets_no_gradient():
    z, y = _data(2)
    z.requires_grad_(True)
    MFMLoss(COUNTS)(z, y).backward()
    zn, yn, clip = z.detach().numpy(), y.numpy(), 0.05
    w = (1 - np.log(COUNTS.numpy() / COUNTS.numpy().max())) ** (1 / 3)
    p = _sigmoid(zn)
    p_neg = np.minimum(1.0, 1 - p + clip)
    focus = np.where(yn == 1, 1.0, (1 - p_neg) ** (3 + w))  # gamma_pos = 0: factor 1 on positives
    # d/dz of -F w log p = -F w (1 - p); of -F w log(1 - p + clip) = F w p (1 - p) / (1 - p + clip) below the clamp
    d_neg = np.where(1 - p + clip < 1, p * (1 - p) / (1 - p + clip), 0.0)
    expected = focus * w * np.where(yn == 1, -(1 - p), d_neg)
    np.testing.assert_allclose(z.grad.numpy(), expected, rtol=1e-6, atol=1e-9)


def test_mfm_factor_switches():
    gamma_ht = (1 - torch.log(COUNTS / COUNTS.max())) ** (1 / 3)
    pn_only = MFMLoss(COUNTS, use_ht=False)  # Table 4 "P-N only"
    torch.testing.assert_close(pn_only.gamma_neg, torch.full((4,), 3.0))
    torch.testing.assert_close(pn_only.weight, torch.ones(4))
    ht_only = MFMLoss(COUNTS, use_pn=False)  # Table 4 "H-T only"
    torch.testing.assert_close(ht_only.gamma_pos, torch.zeros(4))
    torch.testing.assert_close(ht_only.gamma_neg, gamma_ht)
    torch.testing.assert_close(ht_only.weight, gamma_ht)
    paper = MFMLoss(COUNTS, class_weight=False, ht_weight_pos=0.5)  # no w_c multiplier; Eq. 5's w+ used
    torch.testing.assert_close(paper.weight, torch.ones(4))
    torch.testing.assert_close(paper.gamma_pos, 0.5 * gamma_ht)


def test_mfm_cooccurrence_prior_matches_hand_formula():
    cooc = torch.tensor([[5.0, 2.0, 0.0], [2.0, 4.0, 1.0], [0.0, 1.0, 3.0]])
    z = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    counts = torch.tensor([10.0, 5.0, 2.0])
    m = (cooc / cooc.sum(0, keepdim=True)).double().numpy()
    a = np.stack([m[0], (m[0] + m[1]) / 2])  # mean of the positives' rows
    a = a / a.sum(1, keepdims=True)
    w = (1 - np.log(counts.numpy() / 10.0)) ** (1 / 3)
    p = _sigmoid(z.numpy())
    p_pos = p * (1 - a)
    p_neg = np.minimum(1.0, 1 - p + 0.05)
    p_neg = np.where(a > 0, np.minimum(1.0, 1.2 * p_neg), p_neg)  # relaxed negatives of co-occurring classes
    assert (a == 0).any() and (a > 0).any()
    yn = y.numpy()
    p_t = np.where(yn == 1, p_pos, p_neg)
    gamma = np.where(yn == 1, 0.0, 3.0 + w)
    expected = -np.sum((1 - p_t) ** gamma * w * (yn * np.log(p_pos) + (1 - yn) * np.log(p_neg)))
    assert MFMLoss(counts, cooccurrence=cooc)(z, y).item() == pytest.approx(expected, rel=1e-6)


def _rlc_reference(z, y, static, tau=0.7, margin=1.0, exponent=1 / 6, clip=0.05, dynamic=True):
    """Eq. 2-3 in the released code's form: returns (loss, corrections, D_t)."""
    zm = z - margin * y
    p = _sigmoid(zm)
    new = ((y == 0) & (p > np.maximum(tau, p.mean(0)))).astype(float)
    dyn = static + new.sum(0)
    dist = dyn if dynamic else static
    w = (1 - np.log(dist / dist.max())) ** exponent
    t = y + new
    p_neg = np.minimum(1.0, 1 - p + clip)
    p_t = np.where(t == 1, p, p_neg)
    gamma = np.where(t == 1, 0.0, 3.0 + w)
    loss = -np.sum((1 - p_t) ** gamma * w * (t * np.log(p) + (1 - t) * np.log(p_neg)))
    return loss * z.shape[0] / t.sum(), new, dyn


def test_rlc_matches_hand_formula_and_flips_exactly_above_threshold():
    z, y = _data(3, batch=8, scale=4.0)
    rlc = RLCLoss(COUNTS)
    rlc.start_epoch(1)
    loss, corrected = rlc(z, y)
    expected, new, dyn = _rlc_reference(z.numpy(), y.numpy(), COUNTS.double().numpy())
    assert new.sum() > 0, "the test data must produce corrections"
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    np.testing.assert_array_equal(corrected.numpy(), y.numpy() + new)
    np.testing.assert_allclose(rlc.dynamic_counts.numpy(), dyn, rtol=1e-6)
    assert not corrected.requires_grad


def test_rlc_never_removes_an_observed_positive():
    z, y = _data(4, batch=32, scale=8.0)
    z = z - 20 * y  # observed positives with very low scores must stay positive
    _, corrected = RLCLoss(COUNTS)(z, y)
    assert torch.all(corrected[y == 1] == 1)
    assert set(torch.unique(corrected).tolist()) <= {0.0, 1.0}


def test_rlc_dynamic_distribution_accumulates_within_and_resets_between_epochs():
    rlc = RLCLoss(COUNTS)
    rlc.start_epoch(1)
    made = torch.zeros(4, dtype=torch.float64)
    for seed in (5, 6):
        z, y = _data(seed, batch=8, scale=4.0)
        _, corrected = rlc(z, y)
        made += (corrected - y).sum(0)
    assert made.sum() > 0
    torch.testing.assert_close(rlc.dynamic_counts.double(), COUNTS.double() + made)
    rlc.start_epoch(2)
    torch.testing.assert_close(rlc.dynamic_counts, COUNTS)


def test_rlc_options():
    z, y = _data(7, batch=8, scale=4.0)
    late = RLCLoss(COUNTS, start_epoch=2)
    late.start_epoch(1)
    assert torch.equal(late(z, y)[1], y)  # no correction before rlc.start_epoch
    late.start_epoch(2)
    assert not torch.equal(late(z, y)[1], y)
    expected, new, _ = _rlc_reference(z.numpy(), y.numpy(), COUNTS.double().numpy(), dynamic=False)
    assert RLCLoss(COUNTS, distribution="static")(z, y)[0].item() == pytest.approx(expected, rel=1e-6)
    positives, corrections = (y.numpy() + new).sum(), new.sum()
    code = RLCLoss(COUNTS)(z, y)[0].item()  # B_s / N_pos
    paper = RLCLoss(COUNTS, normalizer="corrected")(z, y)[0].item()  # B_s / N_t
    assert paper == pytest.approx(code * positives / corrections, rel=1e-6)
    running = RLCLoss(COUNTS, class_mean="running")
    running(z, y)
    running(z, y)
    torch.testing.assert_close(running.prob_sum.double(), 2 * torch.sigmoid(z - y).sum(0))
    assert running.seen.item() == 2 * len(z)
    running.start_epoch(2)
    assert running.seen.item() == 0 and running.prob_sum.abs().sum().item() == 0


def _kappa(a_h: float, a_t: float, alpha: float = 2.0) -> float:
    return a_h**alpha / (a_h**alpha + a_t**alpha)


def test_htb_kd_matches_hand_formula_and_teachers_get_no_gradient():
    z_h, y = _data(8)
    z_t, _ = _data(9)
    z_b, _ = _data(10)
    z_h.requires_grad_(True), z_t.requires_grad_(True), z_b.requires_grad_(True)
    base = BCE()
    loss, kappa_h = HTBLoss(base, alpha=2.0)(z_h, z_t, z_b, y)
    loss.backward()
    zh, zt, zb, yn = (t.detach().numpy() for t in (z_h, z_t, z_b, y))

    def bce(z, q):
        return -np.sum(q * np.log(_sigmoid(z)) + (1 - q) * np.log(1 - _sigmoid(z)))

    k = _kappa(bce(zh, yn), bce(zt, yn))
    assert kappa_h.item() == pytest.approx(k, rel=1e-6)
    assert loss.item() == pytest.approx(k * bce(zb, _sigmoid(zh)) + (1 - k) * bce(zb, _sigmoid(zt)), rel=1e-6)
    assert z_h.grad is None and z_t.grad is None  # Eq. 11: teachers (and kappa) detached
    assert z_b.grad is not None and torch.isfinite(z_b.grad).all()


def test_htb_literal_matches_hand_formula():
    z_h, y = _data(11)
    z_t, _ = _data(12)
    z_b, _ = _data(13)
    mfm = MFMLoss(COUNTS)
    loss, kappa_h = HTBLoss(mfm, alpha=3.0, variant="literal")(z_h, z_t, z_b, y)
    zh, zt, zb, yn, c = (t.numpy() for t in (z_h, z_t, z_b, y, COUNTS.double()))

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    k = _kappa(_mfm_reference(zh, yn, c), _mfm_reference(zt, yn, c), alpha=3.0)
    expected = (k * _mfm_reference(softmax(zh) * softmax(zb), yn, c)
                + (1 - k) * _mfm_reference(softmax(zt) * softmax(zb), yn, c))
    assert kappa_h.item() == pytest.approx(k, rel=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_htb_kappas_sum_to_one_for_any_loss_size():
    htb = HTBLoss(BCE(), alpha=8.0)
    for scale in (1e-3, 1.0, 50.0):
        z_h, y = _data(14, scale=scale)
        z_t, _ = _data(15, scale=scale)
        kappa_h = htb.kappa_head(z_h, z_t, y)
        assert 0.0 <= kappa_h.item() <= 1.0
        assert (kappa_h + (1 - kappa_h)).item() == pytest.approx(1.0, abs=1e-6)


def _bce_rows(z, q):
    """Soft-target BCE of logits z against targets q, per row (numpy)."""
    return -np.sum(q * np.log(_sigmoid(z)) + (1 - q) * np.log(1 - _sigmoid(z)), axis=1)


@pytest.mark.parametrize("rule", ["paper", "inverse", "per-sample", "head", "tail"])
def test_htb_kappa_rules_match_hand_formulas(rule):
    z_h, y = _data(21)
    z_t, _ = _data(22)
    z_b, _ = _data(23)
    loss, kappa_mean = HTBLoss(BCE(), alpha=2.0, kappa=rule)(z_h, z_t, z_b, y)
    zh, zt, zb, yn = (t.numpy() for t in (z_h, z_t, z_b, y))
    a_h, a_t = _bce_rows(zh, yn), _bce_rows(zt, yn)  # the classification loss per image
    k = {"paper": _kappa(a_h.sum(), a_t.sum()), "inverse": 1 - _kappa(a_h.sum(), a_t.sum()),
         "per-sample": a_h**2 / (a_h**2 + a_t**2), "head": 1.0, "tail": 0.0}[rule]
    d_h, d_t = _bce_rows(zb, _sigmoid(zh)), _bce_rows(zb, _sigmoid(zt))
    assert loss.item() == pytest.approx(np.sum(k * d_h + (1 - k) * d_t), rel=1e-6)
    assert kappa_mean.item() == pytest.approx(np.mean(k), rel=1e-6)


def test_htb_mfm_variant_is_kd_when_mfm_is_plain_bce():
    """Soft targets through the classification loss: with MFM reduced to BCE (no focusing, clip or weights) the
    `mfm` distillation is the `kd` one; with MFM's factors it weighs entries differently."""
    z_h, y = _data(24)
    z_t, _ = _data(25)
    z_b, _ = _data(26)
    plain = MFMLoss(COUNTS, gamma_pos=0.0, gamma_neg=0.0, use_ht=False, clip=0.0)
    kd, _ = HTBLoss(plain, variant="kd")(z_h, z_t, z_b, y)
    through_loss, _ = HTBLoss(plain, variant="mfm")(z_h, z_t, z_b, y)
    assert through_loss.item() == pytest.approx(kd.item(), rel=1e-6)
    focal, _ = HTBLoss(MFMLoss(COUNTS), variant="mfm")(z_h, z_t, z_b, y)
    assert 0 < focal.item() < kd.item()  # the focusing factors (< 1) shrink the terms


def _comic_out(seed: int, dtype=torch.float64, scale: float = 3.0) -> tuple[ComicOutput, torch.Tensor]:
    fields = []
    for k in range(5):
        z, y = _data(seed + k, scale=scale)
        fields.append(z.to(dtype))
    _, observed = _data(seed)
    return ComicOutput(*fields), observed.float()


def _criterion(*overrides: str) -> ComicCriterion:
    crit = ComicCriterion.from_config(load_config("synthetic", list(overrides)), COUNTS)
    crit.start_epoch(1)
    return crit


def test_criterion_combines_terms_per_model():
    crit = _criterion()
    total, parts = crit(*_comic_out(20))
    assert parts["corrected"].shape == (6, 4)
    for key in ("b", "h", "t"):
        assert parts[f"mfm_{key}"].dim() == 0 and parts[f"rlc_{key}"].dim() == 0
    assert parts["balanced"].item() == pytest.approx(
        (parts["mfm_b"] + 0.2 * parts["rlc_b"] + 0.5 * parts["htb"]).item(), rel=1e-6)
    assert parts["head"].item() == pytest.approx((parts["mfm_h"] + 0.2 * parts["rlc_h"]).item(), rel=1e-6)
    assert total.item() == pytest.approx((parts["balanced"] + parts["head"] + parts["tail"]).item(), rel=1e-6)
    assert all(not v.requires_grad for v in parts.values())


@pytest.mark.parametrize("overrides, absent", [
    (("rlc.enabled=false",), {"rlc_b", "rlc_h", "rlc_t"}),
    (("htb.enabled=false",), {"htb", "kappa_h"}),
    (("mfm.enabled=false",), set()),
])
def test_criterion_disabled_terms(overrides, absent):
    crit = _criterion(*overrides)
    out, observed = _comic_out(30)
    total, parts = crit(out, observed)
    assert not absent & parts.keys() and torch.isfinite(total)
    if "rlc.enabled=false" in overrides:
        assert torch.equal(parts["corrected"], observed)
    if "mfm.enabled=false" in overrides:
        assert parts["mfm_b"].item() == pytest.approx(F.binary_cross_entropy_with_logits(
            out.logits, observed.double(), reduction="sum").item(), rel=1e-6)


def test_cooccurrence_prior_needs_the_matrix():
    with pytest.raises(ValueError, match="co-occurrence"):
        ComicCriterion.from_config(load_config("synthetic", ["mfm.cooccurrence_prior=true"]), COUNTS)
    crit = ComicCriterion.from_config(load_config("synthetic", ["mfm.cooccurrence_prior=true"]), COUNTS,
                                      cooccurrence=torch.ones(4, 4))
    assert torch.isfinite(crit(*_comic_out(35))[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("overrides", [(), ("htb.variant=literal", "rlc.class_mean=running"), ("mfm.enabled=false",),
                                       ("mfm.cooccurrence_prior=true",)])
def test_losses_finite_for_extreme_and_half_precision_logits(dtype, overrides):
    crit = ComicCriterion.from_config(load_config("synthetic", list(overrides)), COUNTS, cooccurrence=torch.ones(4, 4))
    crit.start_epoch(1)
    out, observed = _comic_out(40, scale=50.0)
    out = ComicOutput(*(z.clamp(-50, 50).to(dtype).requires_grad_(True) for z in out))
    total, parts = crit(out, observed)
    assert total.dtype == torch.float32
    assert torch.isfinite(total) and all(torch.isfinite(v).all() for v in parts.values())
    total.backward()
    assert all(z.grad is None or torch.isfinite(z.grad).all() for z in out)


def test_loss_criterion_wraps_a_plain_loss():
    out, observed = _comic_out(50)
    loss, parts = LossCriterion(BCE(), "bce")(out, observed)
    expected = F.binary_cross_entropy_with_logits(out.logits, observed.double(), reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(parts["corrected"], observed.float()) and set(parts) == {"bce", "corrected"}
    mean_loss, _ = LossCriterion(BCE(reduction="mean"))(out, observed)
    assert mean_loss.item() == pytest.approx(expected.item() / observed.numel(), rel=1e-6)
