"""Property-based tests of hf_kd.losses: finite values and gradients for extreme logits (+-1e4), -inf masked
vocabulary entries, bf16 inputs and fully masked batches; non-negativity; zero on identical inputs; reductions
that agree. A fixed, derandomized budget (about 1,400 cases in total; the fast paths that training runs on get
theirs in test_engine_properties.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kd.losses import forward_kl, generalized_jsd, hidden_cosine, hidden_mse, logit_mse, reverse_kl

from .scripts.tiny import one_thread  # noqa: F401  (autouse fixture)


def budget(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
TEMPERATURES = st.sampled_from([0.5, 1.0, 2.0, 4.0]) | st.floats(0.05, 20.0)
MASKS = st.sampled_from(["none", "random", "all_false", "all_true"])


def make_mask(kind, b, t, g):
    if kind == "none":
        return None
    if kind == "random":
        return torch.rand(b, t, generator=g) < 0.5
    return torch.full((b, t), kind == "all_true")


@st.composite
def logit_pairs(draw, neg_inf=True):
    """Student and teacher logits [B, T, V] (same dtype), a mask over [B, T] or None, and the draw's details."""
    b, t, v = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(2, 24))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 1e4]))
    student, teacher = (torch.randn(b, t, v, generator=g) * scale for _ in range(2))
    extreme = draw(st.sampled_from(["none", "plus", "minus", "mixed"]))
    if extreme != "none":  # some entries at +-1e4
        for x in (student, teacher):
            hit = torch.rand(b, t, v, generator=g) < 0.3
            sign = {"plus": 1.0, "minus": -1.0}.get(extreme)
            values = torch.full_like(x, 1e4) * (sign if sign else torch.randint(0, 2, x.shape, generator=g) * 2 - 1)
            x[hit] = values[hit]
    masked_vocab = neg_inf and draw(st.booleans())
    if masked_vocab:  # vocabulary entries masked with -inf in both models (at least one entry left per position)
        banned = torch.rand(b, t, v, generator=g) < draw(st.sampled_from([0.2, 0.5, 0.9]))
        banned[..., draw(st.integers(0, v - 1))] = False
        student, teacher = student.masked_fill(banned, -math.inf), teacher.masked_fill(banned, -math.inf)
    dtype = draw(DTYPES)
    kind = draw(MASKS)
    return (student.to(dtype), teacher.to(dtype), make_mask(kind, b, t, g),
            {"scale": scale, "masked_vocab": masked_vocab, "mask": kind})


def logit_losses(beta):
    return {"forward_kl": forward_kl, "reverse_kl": reverse_kl,
            "jsd": lambda s, t, **kw: generalized_jsd(s, t, beta=beta, **kw)}


def value_and_grad(fn, student, teacher, **kw):
    student = student.detach().clone().requires_grad_(True)
    loss = fn(student, teacher, **kw)
    loss.sum().backward()
    return loss.detach(), student.grad


@budget(400)
@given(logit_pairs(), TEMPERATURES, st.floats(0.0, 1.0), st.sampled_from(["mean", "sum", "none"]))
def test_distribution_losses_are_finite_non_negative_with_finite_gradients(pair, temperature, beta, reduction):
    student, teacher, mask, info = pair
    for name, fn in logit_losses(beta).items():
        loss, grad = value_and_grad(fn, student, teacher, temperature=temperature, mask=mask, reduction=reduction)
        assert torch.isfinite(loss).all(), (name, info)
        assert (loss >= -1e-4 * temperature**2 * max(loss.numel(), 1)).all(), (name, loss, info)
        assert torch.isfinite(grad).all(), (name, info)
        if info["mask"] == "all_false":
            assert not loss.any() and not grad.any(), name  # a fully masked batch counts nothing


@budget(200)
@given(logit_pairs(neg_inf=False), st.sampled_from(["mean", "sum", "none"]))
def test_logit_mse_is_finite_non_negative_with_finite_gradients(pair, reduction):
    student, teacher, mask, info = pair
    loss, grad = value_and_grad(logit_mse, student, teacher, mask=mask, reduction=reduction)
    assert torch.isfinite(loss).all() and (loss >= 0).all() and torch.isfinite(grad).all(), info


@budget(200)
@given(logit_pairs(), TEMPERATURES, st.floats(0.0, 1.0))
def test_losses_are_zero_on_identical_inputs(pair, temperature, beta):
    student, _, mask, info = pair
    for name, fn in logit_losses(beta).items():
        per_position = fn(student, student, temperature=temperature, mask=mask, reduction="none")
        assert per_position.abs().max() <= 1e-5 * temperature**2, (name, info)
    finite = student.masked_fill(torch.isinf(student), 0.0)
    assert logit_mse(finite, finite, mask=mask, reduction="sum") == 0


@budget(150)
@given(logit_pairs(), TEMPERATURES, st.floats(0.0, 1.0))
def test_reductions_agree(pair, temperature, beta):
    student, teacher, mask, _ = pair
    count = student.shape[0] * student.shape[1] if mask is None else int(mask.sum())
    for fn in list(logit_losses(beta).values()):
        kw = {"temperature": temperature, "mask": mask}
        none, total, mean = (fn(student, teacher, reduction=r, **kw) for r in ("none", "sum", "mean"))
        assert total == pytest.approx(float(none.sum()), rel=1e-5, abs=1e-6)
        assert mean == pytest.approx(float(total) / max(count, 1), rel=1e-5, abs=1e-6)


@budget(150)
@given(logit_pairs(neg_inf=False), TEMPERATURES)
def test_forward_kl_matches_the_textbook_formula(pair, temperature):
    student, teacher, _, _ = pair
    s, t = student.float() / temperature, teacher.float() / temperature
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    got = forward_kl(student, teacher, temperature=temperature, reduction="none")
    assert torch.allclose(got, expected * temperature**2, rtol=1e-4, atol=1e-3 * temperature**2)


@st.composite
def hidden_pairs(draw):
    b, t, d = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 32))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0, 1e4]))
    student, teacher = (torch.randn(b, t, d, generator=g) * scale for _ in range(2))
    if draw(st.booleans()):  # saturate some features at +-1e4
        hit = torch.rand(b, t, d, generator=g) < 0.3
        student[hit] = 1e4 * torch.sign(student[hit] + 1e-12)
    if draw(st.booleans()):  # some all-zero states (padding)
        student[:, 0] = 0.0
    kind, dtype = draw(MASKS), draw(DTYPES)
    return student.to(dtype), teacher.to(dtype), make_mask(kind, b, t, g), kind


@budget(300)
@given(hidden_pairs(), st.sampled_from(["mean", "sum", "none"]))
def test_hidden_losses_are_finite_non_negative_and_zero_on_identical_inputs(pair, reduction):
    student, teacher, mask, kind = pair
    for fn in (hidden_cosine, hidden_mse):
        loss, grad = value_and_grad(fn, student, teacher, mask=mask, reduction=reduction)
        assert torch.isfinite(loss).all() and (loss >= -1e-6).all() and torch.isfinite(grad).all(), (fn, kind)
        if kind == "all_false":
            assert not loss.any() and not grad.any()
    assert (hidden_cosine(student, teacher, reduction="none") <= 2 + 1e-5).all()
    assert hidden_mse(student, student, mask=mask, reduction="sum") == 0
    norms = student.float().norm(dim=-1)
    same = hidden_cosine(student, student, reduction="none")
    assert (same[norms > 1e-3].abs() <= 1e-5).all()  # cosine is undefined for zero vectors


def test_logit_mse_with_shared_minus_inf_entries():
    """Entries that are -inf in both (a masked vocabulary) count as equal, not as NaN; gradients stay finite."""
    x = torch.tensor([[0.0, -math.inf, 1.0]], requires_grad=True)
    y = torch.tensor([[0.5, -math.inf, 1.0]])
    loss = logit_mse(x, y)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.25 / 3) and torch.isfinite(x.grad).all()
