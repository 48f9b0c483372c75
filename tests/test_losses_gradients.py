"""hf_kd.losses.gradients against the textbook formulas written with loops and math: Sobolev input-gradient
matching (per example and per token) and GREAT's discriminator / generator losses; masks, reductions, stability
at large logits, and gradients."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kd.losses import great_discriminator_loss, great_generator_loss, input_gradient_matching


from .scripts.tiny import one_thread  # noqa: F401, E402  (autouse fixture: one intra-op thread)


def budget(n=25):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def rand(*shape, seed=0, scale=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def finish(values, counted, reduction):
    kept = [v if c else 0.0 for v, c in zip(values, counted)]
    if reduction == "none":
        return kept
    return sum(kept) if reduction == "sum" else sum(kept) / max(sum(counted), 1)


# ---- Sobolev: input-gradient matching -------------------------------------------------------------------------

def ref_per_example(gs, gt):
    """sum over every entry of example b of (g_T - g_S)^2, entry by entry."""
    out = []
    for b in range(gs.shape[0]):
        xs, xt = gs[b].reshape(-1).tolist(), gt[b].reshape(-1).tolist()
        out.append(sum((t - s) ** 2 for s, t in zip(xs, xt)))
    return out


def ref_per_token(gs, gt):
    return [sum((float(gt[b, i, d]) - float(gs[b, i, d])) ** 2 for d in range(gs.shape[2]))
            for b in range(gs.shape[0]) for i in range(gs.shape[1])]


def test_input_gradient_matching_fixed():
    gs = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 0.0], [1.0, 1.0]]])
    gt = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[3.0, 4.0], [1.0, 1.0]]])
    assert input_gradient_matching(gs, gt, reduction="none").tolist() == [6.0, 16.0]  # 1 + 4 + 1, 16
    assert float(input_gradient_matching(gs, gt)) == 22.0
    assert float(input_gradient_matching(gs, gt, reduction="mean")) == 11.0  # per example
    mask = torch.tensor([[True, False], [True, True]])
    assert input_gradient_matching(gs, gt, mask=mask, reduction="none").tolist() == [[5.0, 0.0], [16.0, 0.0]]
    assert float(input_gradient_matching(gs, gt, mask=mask, reduction="mean")) == 7.0  # 21 over 3 positions
    assert float(input_gradient_matching(gs, gt, mask=torch.tensor([False, True]))) == 16.0  # [B] mask: examples
    with pytest.raises(ValueError, match="same shape"):
        input_gradient_matching(gs, gt[:, :1])
    with pytest.raises(ValueError, match="does not match"):
        input_gradient_matching(gs, gt, mask=torch.ones(2, 3, dtype=torch.bool))


@st.composite
def gradient_pairs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = [draw(st.integers(1, 3))] + [draw(st.integers(1, 4)) for _ in range(draw(st.integers(1, 3)))]
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gs = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    gt = torch.randn(*shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    token_mask = torch.rand(*shape[:2], generator=g) < 0.6 if len(shape) == 3 and draw(st.booleans()) else None
    return gs, gt, token_mask


@budget()
@given(gradient_pairs())
def test_input_gradient_matching_properties(case):
    gs, gt, token_mask = case
    b = gs.shape[0]
    for reduction in ("sum", "mean", "none"):
        got = input_gradient_matching(gs, gt, reduction=reduction)
        want = finish(ref_per_example(gs, gt), [True] * b, reduction)
        assert got.flatten().tolist() == pytest.approx(want if reduction == "none" else [want], rel=1e-9)
    total = float(input_gradient_matching(gs, gt))
    assert total > 0 and float(input_gradient_matching(gs, gs.clone())) == 0.0
    assert float(input_gradient_matching(gs, gt, reduction="mean")) == pytest.approx(total / b, rel=1e-12)
    assert float(input_gradient_matching(gt, gs)) == pytest.approx(total, rel=1e-12)  # symmetric
    if token_mask is not None:
        counted = token_mask.reshape(-1).tolist()
        per_token = ref_per_token(gs, gt)
        for reduction in ("sum", "mean", "none"):
            got = input_gradient_matching(gs, gt, mask=token_mask, reduction=reduction)
            want = finish(per_token, counted, reduction)
            assert got.flatten().tolist() == pytest.approx(want if reduction == "none" else [want], rel=1e-9)
        masked_sum = float(input_gradient_matching(gs, gt, mask=token_mask))
        junk = torch.where(token_mask[..., None], gt, gt + 1e4)  # values at masked tokens do not matter
        assert float(input_gradient_matching(gs, junk, mask=token_mask)) == pytest.approx(masked_sum, rel=1e-12)
        all_true = torch.ones_like(token_mask)
        assert float(input_gradient_matching(gs, gt, mask=all_true)) == pytest.approx(total, rel=1e-12)


def test_input_gradient_matching_gradients():
    gs, gt = rand(2, 3, 4, seed=1).requires_grad_(), rand(2, 3, 4, seed=2)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert torch.autograd.gradcheck(lambda x: input_gradient_matching(x, gt, mask=mask), (gs,))
    assert torch.autograd.gradcheck(lambda x: input_gradient_matching(x, gt, reduction="mean"), (gs,))
    input_gradient_matching(gs, gt, mask=mask).backward()
    torch.testing.assert_close(gs.grad, 2 * (gs.detach() - gt) * mask[..., None])  # zero at masked tokens
    out = input_gradient_matching(gs.detach().bfloat16(), gt.bfloat16())
    assert out.dtype == torch.float32


# ---- GREAT -----------------------------------------------------------------------------------------------------

def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def ref_discriminator(dt, ds):
    """Binary cross-entropy, teacher logits labelled 1 and student logits labelled 0, summed per example
    (1 - sigmoid(c) written as sigmoid(-c), which keeps its precision at large c)."""
    return [sum(-math.log(sigmoid(a)) for a in dt[b].reshape(-1).tolist())
            + sum(-math.log(sigmoid(-c)) for c in ds[b].reshape(-1).tolist()) for b in range(dt.shape[0])]


def ref_generator(ds):
    return [sum(-math.log(sigmoid(c)) for c in ds[b].reshape(-1).tolist()) for b in range(ds.shape[0])]


def test_great_fixed_values_and_bce_agreement():
    dt, ds = torch.tensor([0.0, 2.0]), torch.tensor([0.0, -1.0])
    per = great_discriminator_loss(dt, ds, reduction="none")
    want = [2 * math.log(2.0), -math.log(sigmoid(2.0)) - math.log(1 - sigmoid(-1.0))]
    assert per.tolist() == pytest.approx(want, rel=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert float(great_discriminator_loss(dt, ds)) == pytest.approx(
        float(bce(dt, torch.ones(2), reduction="sum") + bce(ds, torch.zeros(2), reduction="sum")), rel=1e-6)
    assert great_generator_loss(torch.tensor([0.0, 3.0]), reduction="none").tolist() == pytest.approx(
        [math.log(2.0), -math.log(sigmoid(3.0))], rel=1e-6)
    # [B, 1] logits (a discriminator's usual output) are summed per example: same as [B]
    assert great_discriminator_loss(dt[:, None], ds[:, None], reduction="none").tolist() == pytest.approx(per.tolist())
    with pytest.raises(ValueError, match="examples"):
        great_discriminator_loss(dt, torch.zeros(3))


def test_great_is_stable_at_large_logits():
    big = torch.tensor([1e4, -1e4, 80.0, -80.0])
    d = great_discriminator_loss(big, -big, reduction="none")
    # softplus(-x) + softplus(-x): 0 for x = 1e4, 2e4 for x = -1e4 (log sigmoid(-1e4) = -1e4, not -inf)
    assert d.tolist() == pytest.approx([0.0, 2e4, 2 * math.log1p(math.exp(-80.0)), 160.0], rel=1e-6, abs=1e-30)
    gen = great_generator_loss(big, reduction="none")
    assert torch.isfinite(gen).all() and gen.tolist() == pytest.approx([0.0, 1e4, 0.0, 80.0], rel=1e-6, abs=1e-30)
    x = big.clone().requires_grad_()
    great_generator_loss(x).backward()
    torch.testing.assert_close(x.grad, -torch.sigmoid(-big))  # d/dx softplus(-x) = -sigmoid(-x), finite


@budget()
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31 - 1), st.sampled_from([0.1, 1.0, 10.0]))
def test_great_properties(b, k, seed, scale):
    g = torch.Generator().manual_seed(seed)
    dt, ds = (torch.randn(b, k, generator=g, dtype=torch.float64) * scale for _ in range(2))
    per = great_discriminator_loss(dt, ds, reduction="none")
    assert per.tolist() == pytest.approx(ref_discriminator(dt, ds), rel=1e-9)
    assert (per > 0).all()  # a BCE of finite logits is positive
    total = float(great_discriminator_loss(dt, ds))
    assert float(great_discriminator_loss(dt, ds, reduction="mean")) == pytest.approx(total / b, rel=1e-12)
    gen = great_generator_loss(ds, reduction="none")
    assert gen.tolist() == pytest.approx(ref_generator(ds), rel=1e-9)
    assert float(great_generator_loss(ds, reduction="mean")) == pytest.approx(float(gen.sum()) / b, rel=1e-12)
    # the discriminator wants large teacher logits and small student ones; the generator large student ones
    assert float(great_discriminator_loss(dt + 1.0, ds - 1.0)) < total
    assert float(great_generator_loss(ds + 1.0)) < float(gen.sum())


def test_great_gradcheck():
    dt, ds = rand(3, 2, seed=3).requires_grad_(), rand(3, 2, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, c: great_discriminator_loss(a, c, reduction="mean"), (dt, ds))
    assert torch.autograd.gradcheck(lambda c: great_generator_loss(c), (ds,))
    great_discriminator_loss(dt, ds).backward()
    torch.testing.assert_close(dt.grad, torch.sigmoid(dt.detach()) - 1)  # BCE: p - label
    torch.testing.assert_close(ds.grad, torch.sigmoid(ds.detach()))
