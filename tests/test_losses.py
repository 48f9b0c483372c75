"""Reference values and properties of the pure loss functions."""

import math

import pytest
import torch

from hf_kd import losses
from hf_kd.losses import forward_kl, generalized_jsd, hidden_cosine, hidden_mse, logit_mse, reverse_kl


def ref_kl(p, q):
    """KL(p || q) for plain probability lists, the textbook way."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def softmax(row, t):
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


def logits(*shape, scale=3.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("t", [0.5, 1.0, 2.0, 4.0])
def test_forward_and_reverse_kl_match_textbook(t):
    s, te = logits(5, 7, seed=1), logits(5, 7, seed=2)
    want_f = sum(ref_kl(softmax(te[i].tolist(), t), softmax(s[i].tolist(), t)) for i in range(5)) / 5 * t * t
    want_r = sum(ref_kl(softmax(s[i].tolist(), t), softmax(te[i].tolist(), t)) for i in range(5)) / 5 * t * t
    assert forward_kl(s, te, temperature=t).item() == pytest.approx(want_f, rel=1e-5)
    assert reverse_kl(s, te, temperature=t).item() == pytest.approx(want_r, rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_textbook(beta):
    s, te = logits(4, 6, seed=3), logits(4, 6, seed=4)
    total = 0.0
    for i in range(4):
        ps, pt = softmax(s[i].tolist(), 2.0), softmax(te[i].tolist(), 2.0)
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        total += beta * ref_kl(pt, m) + (1 - beta) * ref_kl(ps, m)
    assert generalized_jsd(s, te, beta=beta, temperature=2.0).item() == pytest.approx(total / 4 * 4.0, rel=1e-5)


def test_jsd_ends_are_forward_and_reverse_kl():
    s, te = logits(3, 9, seed=5), logits(3, 9, seed=6)
    assert torch.equal(generalized_jsd(s, te, beta=0.0), forward_kl(s, te))
    assert torch.equal(generalized_jsd(s, te, beta=1.0), reverse_kl(s, te))
    with pytest.raises(ValueError):
        generalized_jsd(s, te, beta=1.5)


@pytest.mark.parametrize("fn", list(losses.LOGIT_LOSSES.values()) + list(losses.HIDDEN_LOSSES.values()))
def test_zero_for_identical_and_non_negative(fn):
    x = logits(2, 5, 11, seed=7)
    assert fn(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    for seed in range(5):
        assert fn(logits(2, 5, 11, seed=seed), logits(2, 5, 11, seed=seed + 50)).item() >= 0


def test_t_squared_scaling():
    """T^2 * KL: at high T the soft loss tends to (z_s - z_t)^2 / (2V) per token (Hinton's limit), so the T^2
    factor keeps it from vanishing like 1/T^2."""
    s, te = logits(4, 10, scale=0.5, seed=8), logits(4, 10, scale=0.5, seed=9)
    zs, zt = s - s.mean(-1, keepdim=True), te - te.mean(-1, keepdim=True)
    limit = ((zs - zt) ** 2).sum(-1).mean() / (2 * 10)
    assert forward_kl(s, te, temperature=100.0).item() == pytest.approx(limit.item(), rel=2e-2)
    raw = forward_kl(s, te, temperature=3.0) / 9.0
    assert raw.item() == pytest.approx(torch.nn.functional.kl_div(
        torch.log_softmax(s / 3, -1), torch.log_softmax(te / 3, -1), log_target=True, reduction="batchmean").item(),
        rel=1e-5)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd, logit_mse, hidden_cosine, hidden_mse])
def test_masking_invariance(fn):
    """Masked positions can hold anything: the loss equals the loss on the kept positions alone."""
    s, te = logits(3, 6, 8, seed=10), logits(3, 6, 8, seed=11)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    s2, te2 = s.clone(), te.clone()
    s2[~mask] = 1e4
    te2[~mask] = -1e4
    want = fn(s[mask], te[mask])
    assert fn(s2, te2, mask=mask).item() == pytest.approx(want.item(), rel=1e-5)
    assert fn(s, te, mask=mask, reduction="sum").item() == pytest.approx(want.item() * mask.sum().item(), rel=1e-5)
    per = fn(s, te, mask=mask, reduction="none")
    assert per.shape == (3, 6) and torch.all(per[~mask] == 0)


def test_fully_masked_is_zero_not_nan():
    s, te = logits(2, 4, 5), logits(2, 4, 5, seed=1)
    out = forward_kl(s, te, mask=torch.zeros(2, 4, dtype=torch.bool))
    assert out.item() == 0.0


def test_minus_inf_vocabulary_entries():
    """Entries that are -inf in both models (a masked vocabulary) contribute nothing and give no NaN."""
    s, te = logits(3, 8, seed=12), logits(3, 8, seed=13)
    s[:, -2:] = float("-inf")
    te[:, -2:] = float("-inf")
    s.requires_grad_(True)
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        out = fn(s, te, temperature=2.0)
        ref = fn(s[:, :-2].detach(), te[:, :-2], temperature=2.0)
        assert out.item() == pytest.approx(ref.item(), rel=1e-5)
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(grad).all()


def test_gradient_of_forward_kl_is_t_times_prob_difference():
    s, te = logits(4, 7, seed=14).requires_grad_(True), logits(4, 7, seed=15)
    t = 2.0
    forward_kl(s, te, temperature=t, reduction="sum").backward()
    want = t * (torch.softmax(s.detach() / t, -1) - torch.softmax(te / t, -1))
    torch.testing.assert_close(s.grad, want, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_compute_in_float32():
    s, te = logits(4, 16, seed=16), logits(4, 16, seed=17)
    out = forward_kl(s.bfloat16(), te.bfloat16(), temperature=2.0)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(forward_kl(s.bfloat16().float(), te.bfloat16().float(), temperature=2.0).item())


def test_hidden_losses_reference():
    a, b = logits(2, 3, 4, seed=18), logits(2, 3, 4, seed=19)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert hidden_cosine(a, b).item() == pytest.approx((1 - cos).mean().item(), rel=1e-6)
    assert hidden_mse(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    assert logit_mse(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)


def test_registry_names():
    """Exactly these names, each mapped to the function it names, checked by value against the textbook formulas
    (not by identity alone: a registry entry that pointed at another loss would compute something else)."""
    assert set(losses.LOGIT_LOSSES) == {"forward_kl", "reverse_kl", "jsd", "mse", "skew_forward_kl", "skew_reverse_kl",
                                        "tvd", "entropy_kl"}
    assert set(losses.HIDDEN_LOSSES) == {"cosine", "mse"}
    s, te = logits(3, 5, seed=20), logits(3, 5, seed=21)
    ps = [softmax(row, 1.0) for row in s.tolist()]
    pt = [softmax(row, 1.0) for row in te.tolist()]
    mix = [[(a + b) / 2 for a, b in zip(x, y)] for x, y in zip(pt, ps)]
    skew = lambda x, y: [[0.1 * a + 0.9 * b for a, b in zip(u, v)] for u, v in zip(x, y)]  # noqa: E731
    h = [-sum(x * math.log(x) for x in t) / math.log(5) for t in pt]
    want = {
        "forward_kl": sum(ref_kl(t, q) for t, q in zip(pt, ps)) / 3,
        "reverse_kl": sum(ref_kl(q, t) for t, q in zip(pt, ps)) / 3,
        "jsd": sum(0.5 * ref_kl(t, m) + 0.5 * ref_kl(q, m) for t, q, m in zip(pt, ps, mix)) / 3,
        "mse": sum((a - b) ** 2 for a, b in zip(s.flatten().tolist(), te.flatten().tolist())) / 15,
        "skew_forward_kl": sum(ref_kl(t, m) for t, m in zip(pt, skew(pt, ps))) / 3,  # default skew_alpha 0.1
        "skew_reverse_kl": sum(ref_kl(q, m) for q, m in zip(ps, skew(ps, pt))) / 3,
        "tvd": sum(0.5 * sum(abs(a - b) for a, b in zip(t, q)) for t, q in zip(pt, ps)) / 3,
        "entropy_kl": sum(w * ref_kl(t, q) + (1 - w) * ref_kl(q, t) for w, t, q in zip(h, pt, ps)) / 3,
    }
    assert len(set(round(v, 6) for v in want.values())) == 8  # the eight losses tell each other apart here
    for name, fn in losses.LOGIT_LOSSES.items():
        assert float(fn(s, te)) == pytest.approx(want[name], rel=1e-5), name
    assert losses.LOGIT_LOSSES["forward_kl"] is forward_kl and losses.LOGIT_LOSSES["reverse_kl"] is reverse_kl
    assert losses.LOGIT_LOSSES["jsd"] is generalized_jsd and losses.LOGIT_LOSSES["mse"] is logit_mse
    a, b = logits(2, 3, 4, seed=22), logits(2, 3, 4, seed=23)
    rows = list(zip(a.reshape(-1, 4).tolist(), b.reshape(-1, 4).tolist()))
    cos = [sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v)) for u, v in rows]
    hidden_want = {"cosine": sum(1 - c for c in cos) / 6,
                   "mse": sum(sum((x - y) ** 2 for x, y in zip(u, v)) / 4 for u, v in rows) / 6}
    for name, fn in losses.HIDDEN_LOSSES.items():
        assert float(fn(a, b)) == pytest.approx(hidden_want[name], rel=1e-5), name
    assert losses.HIDDEN_LOSSES["cosine"] is hidden_cosine and losses.HIDDEN_LOSSES["mse"] is hidden_mse
    with pytest.raises(ValueError):
        losses.reduce(torch.ones(2), None, "median")
