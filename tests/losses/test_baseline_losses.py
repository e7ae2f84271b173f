"""Baseline losses (issue 7): each against a hand-worked formula, plus registry-style checks over all of them.

Reference values are written as explicit per-entry formulas with `math`, never by calling the implementation again.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from comic.losses.baselines import ASL, BCE, ElementwiseLoss, Focal, Hill
from comic.losses.baselines_partial import SPLC, PartialASL, PseudoLabel
from comic.losses.baselines_reweight import DB, DBFocal

Z = [[2.0, -1.0, 0.5], [-0.3, 1.5, -2.5]]
Y = [[1, 0, 0], [0, 1, 1]]
ENTRIES = [(k, i) for k in range(2) for i in range(3)]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def logits() -> torch.Tensor:
    return torch.tensor(Z)


def targets() -> torch.Tensor:
    return torch.tensor(Y, dtype=torch.float32)


def expected_sum(entry: Callable[[float, int], float]) -> float:
    return sum(entry(Z[k][i], Y[k][i]) for k, i in ENTRIES)


def assert_value(loss: torch.Tensor, expected: float) -> None:
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------------------------------ hand formulas


@pytest.mark.parametrize("reduction,divisor", [("sum", 1), ("mean", 6)])
def test_bce_formula(reduction: str, divisor: int) -> None:
    expected = expected_sum(lambda z, y: -(y * math.log(sig(z)) + (1 - y) * math.log(1 - sig(z))))
    assert_value(BCE(reduction=reduction)(logits(), targets()), expected / divisor)


def test_focal_formula() -> None:
    def entry(z: float, y: int) -> float:
        p = sig(z)
        return -(1 - p) ** 2 * math.log(p) if y else -(p**2) * math.log(1 - p)

    assert_value(Focal()(logits(), targets()), expected_sum(entry))

    def entry_alpha(z: float, y: int) -> float:  # Lin et al.'s alpha_t = 0.25 for positives, 0.75 for negatives
        return (0.25 if y else 0.75) * entry(z, y)

    assert_value(Focal(alpha=0.25)(logits(), targets()), expected_sum(entry_alpha))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_focal_gamma_zero_equals_bce(reduction: str) -> None:
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 4
    y = (torch.rand(5, 7, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    torch.testing.assert_close(Focal(gamma=0.0, reduction=reduction)(z, y), BCE(reduction=reduction)(z, y))


def test_asl_formula() -> None:
    def entry(z: float, y: int) -> float:  # gamma_pos 0, gamma_neg 4, clip 0.05
        p = sig(z)
        if y:
            return -math.log(p)
        p_m = max(p - 0.05, 0.0)
        return -(p_m**4) * math.log(1 - p_m)

    assert_value(ASL()(logits(), targets()), expected_sum(entry))


def test_asl_clip_gives_exact_zero_for_easy_negatives() -> None:
    # p = sigmoid(z) < 0.05 for z < -2.944: these negatives must contribute exactly 0 and no gradient.
    z = torch.tensor([[-3.0, -4.0, -10.0, -50.0, -2.0]], requires_grad=True)
    y = torch.zeros_like(z)
    loss = ASL(reduction="sum")
    entries = loss.entries(z, y)
    assert entries[0, :4].eq(0).all()
    assert entries[0, 4] > 0  # p = 0.119 > clip
    loss(z, y).backward()
    assert z.grad[0, :4].eq(0).all()
    assert loss(z[:, :4].detach(), y[:, :4]).item() == 0.0


def test_asl_focus_is_constant_weight() -> None:
    # Detached focusing: d/dz [-w log(1 - p_m)] = w p (1 - p) / (1 - p_m) with w = p_m^4 held constant.
    z0 = 0.7
    z = torch.tensor([[z0]], requires_grad=True)
    ASL()(z, torch.zeros_like(z)).backward()
    p = sig(z0)
    p_m = p - 0.05
    assert z.grad.item() == pytest.approx(p_m**4 * p * (1 - p) / (1 - p_m), rel=1e-5)


def test_asl_without_focus_or_clip_equals_bce() -> None:
    z, y = logits() * 7, targets()
    torch.testing.assert_close(ASL(gamma_neg=0.0, gamma_pos=0.0, clip=0.0)(z, y), BCE()(z, y))


def test_hill_formula_and_negative_term() -> None:
    def entry(z: float, y: int) -> float:  # lambda 1.5, margin 1, gamma 2
        if y:
            p_m = sig(z - 1.0)
            return -(1 - p_m) ** 2 * math.log(p_m)
        p = sig(z)
        return (1.5 - p) * p**2

    assert_value(Hill()(logits(), targets()), expected_sum(entry))
    # The negative term alone, its value and its hill-shaped gradient 3 p^2 (1 - p)^2 (lambda = 1.5).
    values = [-3.0, -0.5, 0.0, 1.0, 4.0]
    z = torch.tensor([values], requires_grad=True)
    hill = Hill()
    negative = hill.entries(z, torch.zeros_like(z))
    negative.sum().backward()
    for i, v in enumerate(values):
        p = sig(v)
        assert negative[0, i].item() == pytest.approx(1.5 * p**2 - p**3, rel=1e-5, abs=1e-8)
        assert z.grad[0, i].item() == pytest.approx(3 * p**2 * (1 - p) ** 2, rel=1e-4, abs=1e-8)


# ------------------------------------------------------------------------------------------------ DB family

COUNTS, N_IMAGES = [0.0, 5.0, 10.0], 10  # clamped to [1, 5, 9]


def db_reference(z_row: list[float], y_row: list[int], counts: list[float], n: int | None, focal_gamma: float = 0.0,
                 balance: float = 1.0, alpha: float = 0.1, beta: float = 10.0, mu: float = 0.2,
                 lam: float = 2.0, kappa: float = 0.05) -> list[float]:
    """DB / DB-Focal entries of one image by the §4 formulas (counts already clamped; n=None: no shift)."""
    inv = [1 / c for c in counts]
    denominator = sum(v for v, y in zip(inv, y_row, strict=True) if y)
    out = []
    for z, y, v, c in zip(z_row, y_row, inv, counts, strict=True):
        w = alpha + sig(beta * (v / denominator - mu)) if denominator > 0 else alpha + 1
        zs = z - (kappa / lam) * math.log(n / c - 1) if n is not None else z
        if y:
            out.append(balance * w * (1 - sig(zs)) ** focal_gamma * softplus(-zs))
        else:
            out.append(balance * (w / lam) * sig(lam * zs) ** focal_gamma * softplus(lam * zs))
    return out


def test_db_counts_clamped_and_shift() -> None:
    db = DB(class_counts=torch.tensor(COUNTS), num_images=N_IMAGES)
    # s_i = -(kappa / lambda) log(N / n_i - 1) with n = [1, 5, 9]: log 9, log 1, log(1/9).
    expected_shift = [-0.025 * math.log(9), 0.0, 0.025 * math.log(9)]
    torch.testing.assert_close(db.logit_shift, torch.tensor(expected_shift))
    torch.testing.assert_close(db.inverse_counts, torch.tensor([1.0, 1 / 5, 1 / 9]))


def test_db_weights_and_image_without_positive() -> None:
    db = DB(class_counts=torch.tensor(COUNTS), num_images=N_IMAGES)
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    weights = db.rebalance_weights(y)
    r = [1 / 1.2, 0.2 / 1.2, (1 / 9) / 1.2]  # (1/n_i) / (1/1 + 1/5)
    torch.testing.assert_close(weights[0], torch.tensor([0.1 + sig(10 * (v - 0.2)) for v in r]))
    torch.testing.assert_close(weights[1], torch.full((3,), 1.1))  # no observed positive: alpha + 1, no NaN
    z = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 1.5, -2.5]])
    expected = [e for k in range(2) for e in db_reference(z[k].tolist(), y[k].int().tolist(), [1, 5, 9], N_IMAGES)]
    assert_value(db(z, y), sum(expected) / 6)
    assert torch.isfinite(db(z * 25, y))


def test_db_uniform_default() -> None:
    expected = [e for k in range(2) for e in db_reference(Z[k], Y[k], [1, 1, 1], None)]
    assert_value(DB()(logits(), targets()), sum(expected) / 6)
    assert_value(DB(reduction="sum")(logits(), targets()), sum(expected))


def test_db_focal_formula() -> None:
    loss = DBFocal(class_counts=torch.tensor(COUNTS), num_images=N_IMAGES)
    expected = [e for k in range(2) for e in db_reference(Z[k], Y[k], [1, 5, 9], N_IMAGES, focal_gamma=2.0,
                                                          balance=2.0)]
    assert_value(loss(logits(), targets()), sum(expected) / 6)


def test_db_needs_counts_and_images_together() -> None:
    with pytest.raises(ValueError):
        DB(class_counts=torch.tensor(COUNTS))


# ------------------------------------------------------------------------------------------------ partial labels


def focal_entry(z: float, positive: bool, gamma: float = 2.0) -> float:
    p = sig(z)
    return -(1 - p) ** gamma * math.log(p) if positive else -(p**gamma) * math.log(1 - p)


def test_splc_correction_schedule() -> None:
    z = torch.tensor([[2.0, 0.5, -1.0], [0.3, 1.0, 3.0]])  # sigmoid: .88 .62 .27 / .57 .73 .95
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    splc = SPLC()
    before = [focal_entry(2.0 - 1, True), focal_entry(0.5, False), focal_entry(-1.0, False),
              focal_entry(0.3, False), focal_entry(1.0, False), focal_entry(3.0 - 1, True)]
    assert_value(splc(z, y), sum(before))
    splc.start_epoch(1)  # correction on: zeros with p > 0.6 become positives with the unshifted logit
    after = [focal_entry(2.0 - 1, True), focal_entry(0.5, True), focal_entry(-1.0, False),
             focal_entry(0.3, False), focal_entry(1.0, True), focal_entry(3.0 - 1, True)]
    assert_value(splc(z, y), sum(after))
    torch.testing.assert_close(splc.corrected_targets(z, y), torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]))


def bce_entry(z: float, t: float) -> float:
    return -(t * math.log(sig(z)) + (1 - t) * math.log(1 - sig(z)))


def test_pseudo_label_ramp_and_targets() -> None:
    loss = PseudoLabel(tau=0.7, ramp_start=1, ramp_end=5)
    assert [loss.ramp(e) for e in range(7)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    z = torch.tensor([[2.0, 1.0, -1.0]])  # sigmoid .88 .73 .27
    y = torch.tensor([[1.0, 0.0, 0.0]])
    assert_value(loss(z, y), bce_entry(2.0, 1) + bce_entry(1.0, 0) + bce_entry(-1.0, 0))  # epoch 0: plain BCE
    loss.start_epoch(3)
    assert_value(loss(z, y), bce_entry(2.0, 1) + bce_entry(1.0, 0.5) + bce_entry(-1.0, 0))
    teacher = torch.tensor([[0.0, -3.0, 3.0]])  # the teacher is confident about the third entry, not the second
    assert_value(loss(z, y, teacher), bce_entry(2.0, 1) + bce_entry(1.0, 0) + bce_entry(-1.0, 0.5))


def test_partial_asl_selection() -> None:
    # Un-annotated entries (0,1) p=.27, (0,2) p=.62, (1,0) p=.43; likelihood_topk=1 -> K=2 ignored: (0,2), (1,0).
    def unannotated(z: float) -> float:  # gamma_unann 4, clip 0
        return -(sig(z) ** 4) * math.log(1 - sig(z))

    positives = -math.log(sig(2.0)) - math.log(sig(1.5)) - math.log(sig(-2.5))
    assert_value(PartialASL(likelihood_topk=1)(logits(), targets()), positives + unannotated(-1.0))
    # Prior rule alone: class 1 (prior .6 > .5) ignored, the others kept.
    prior = PartialASL.prior_from_counts(torch.tensor([1.0, 6.0, 2.0]), 10)
    loss = PartialASL(class_prior=prior, likelihood_topk=0)
    assert_value(loss(logits(), targets()), positives + unannotated(0.5) + unannotated(-0.3))


# ------------------------------------------------------------------------------------------------ every loss

COUNTS_C = torch.tensor([40.0, 12.0, 5.0, 1.0, 0.0])


def _started(loss: torch.nn.Module) -> torch.nn.Module:
    loss.start_epoch(3)  # correction / ramp active, so those code paths run too
    return loss


FACTORIES: dict[str, Callable[[str], torch.nn.Module]] = {
    "bce": lambda r: BCE(reduction=r),
    "focal": lambda r: Focal(reduction=r),
    "asl": lambda r: ASL(reduction=r),
    "hill": lambda r: Hill(reduction=r),
    "db": lambda r: DB(class_counts=COUNTS_C, num_images=50, reduction=r),
    "db-uniform": lambda r: DB(reduction=r),
    "db-focal": lambda r: DBFocal(class_counts=COUNTS_C, num_images=50, reduction=r),
    "splc": lambda r: _started(SPLC(reduction=r)),
    "pseudo-label": lambda r: _started(PseudoLabel(tau=0.6, reduction=r)),
    "p-asl": lambda r: PartialASL(class_prior=COUNTS_C / 50, prior_threshold=0.3, likelihood_topk=1, reduction=r),
}
PLAIN = [BCE, Focal, ASL, DB, DBFocal, Hill]


def batch(scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=g) * scale
    y = (torch.rand(6, 5, generator=g) < 0.35).float()
    y[0] = 0  # an image with no observed positive
    return z, y


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_loss_finite_scalar_backward(name: str) -> None:
    z, y = batch()
    z[1] = torch.tensor([50.0, -50.0, 50.0, -50.0, 0.0])
    z[2] = torch.tensor([-50.0, 50.0, -50.0, 50.0, 50.0])
    z.requires_grad_(True)
    z_before, y_before = z.detach().clone(), y.clone()
    loss = FACTORIES[name]("sum")(z, y)
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert torch.equal(z.detach(), z_before) and torch.equal(y, y_before)  # inputs not edited in place


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_mean_is_sum_over_entries(name: str) -> None:
    z, y = batch()
    torch.testing.assert_close(FACTORIES[name]("mean")(z, y), FACTORIES[name]("sum")(z, y) / z.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_half_precision_logits_computed_in_fp32(name: str, dtype: torch.dtype) -> None:
    z, y = batch(scale=20.0)
    z = z.clamp(-50, 50).to(dtype)
    loss = FACTORIES[name]("sum")
    low = loss(z, y.to(torch.uint8))
    assert low.dtype == torch.float32 and torch.isfinite(low)
    torch.testing.assert_close(low, loss(z.float(), y))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_global_grad_mode_change(name: str) -> None:
    z, y = batch()
    with torch.no_grad():
        out = FACTORIES[name]("sum")(z.requires_grad_(True), y)
        assert not torch.is_grad_enabled()
    assert not out.requires_grad


@pytest.mark.parametrize("name", ["asl", "db", "db-focal", "p-asl", "splc", "pseudo-label"])
def test_forward_has_no_graph_break(name: str) -> None:
    # fullgraph=True fails on any host sync (.item()) or Python branch on a tensor value: the step stays capturable.
    torch._dynamo.reset()
    loss = FACTORIES[name]("sum")
    z, y = batch()
    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(z, y), loss(z, y))


@pytest.mark.parametrize("cls", PLAIN)
def test_plain_losses_work_with_defaults(cls: type[ElementwiseLoss]) -> None:
    assert torch.isfinite(cls()(*batch()))


def test_buffers_follow_the_module() -> None:
    loss = DB(class_counts=COUNTS_C, num_images=50).to(torch.float64)
    assert loss.inverse_counts.dtype == torch.float64
    assert torch.isfinite(loss(*batch()))
    assert set(dict(loss.named_buffers())) == {"inverse_counts", "logit_shift"}


@pytest.mark.parametrize("cls", [BCE, Focal, ASL, Hill, DB, DBFocal, SPLC, PseudoLabel, PartialASL])
def test_bad_reduction_and_shapes_raise(cls: type[ElementwiseLoss]) -> None:
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="none")
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        cls()(torch.zeros(2, 3), torch.zeros(3, 2))
