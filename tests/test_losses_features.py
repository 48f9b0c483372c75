"""hf_kd.losses.features against references written out with loops (FitNets hints, attention transfer, adaptive
pooling, attention-probability KL / MSE), on fixed cases and hypothesis draws; their invariances, masks,
reductions and gradients."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_kd.losses import (attention_probs_loss, attention_transfer, hint_loss, match_spatial,
                          spatial_attention_map)


from .scripts.tiny import one_thread  # noqa: F401, E402  (autouse fixture: one intra-op thread)


def budget(n=25):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def ref_reduce(values, counted, reduction):
    """values, counted: flat Python lists (counted: bools)."""
    kept = [v if c else 0.0 for v, c in zip(values, counted)]
    if reduction == "none":
        return kept
    total = sum(kept)
    return total if reduction == "sum" else total / max(sum(counted), 1)


def flat_mask(mask, n):
    return [True] * n if mask is None else [bool(x) for x in mask.reshape(-1).tolist()]


def unit(vec):
    n = math.sqrt(sum(x * x for x in vec))
    return [x / n for x in vec] if n > 0 else [0.0] * len(vec)


# ---- hints ---------------------------------------------------------------------------------------------------

def ref_vectors(x):
    """Token states [B, T, D] -> B*T vectors; maps [B, C, H, W] -> B vectors of C*H*W, built element by element."""
    if x.dim() == 3:
        return [[float(x[b, t, d]) for d in range(x.shape[2])] for b in range(x.shape[0]) for t in range(x.shape[1])]
    b_, c_, h_, w_ = x.shape
    return [[float(x[b, c, h, w]) for c in range(c_) for h in range(h_) for w in range(w_)] for b in range(b_)]


def ref_hint(s, t, normalize=False, mask=None, reduction="sum"):
    values = []
    for vs, vt in zip(ref_vectors(s), ref_vectors(t)):
        if normalize:
            us, ut = unit(vs), unit(vt)
            values.append(sum((a - b) ** 2 for a, b in zip(us, ut)))
        else:
            values.append(sum((a - b) ** 2 for a, b in zip(vs, vt)) / len(vs))
    return ref_reduce(values, flat_mask(mask, len(values)), reduction)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_hint_matches_reference_tokens_and_maps(normalize, reduction):
    s, t = rand(2, 3, 5, seed=1), rand(2, 3, 5, seed=2, scale=3.0)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    got = hint_loss(s, t, normalize=normalize, mask=mask, reduction=reduction)
    want = ref_hint(s, t, normalize, mask, reduction)
    assert got.flatten().tolist() == pytest.approx(want if reduction == "none" else [want], rel=1e-5, abs=1e-7)
    fs, ft = rand(3, 2, 3, 4, seed=3), rand(3, 2, 3, 4, seed=4, scale=0.5)
    emask = torch.tensor([True, False, True])
    got = hint_loss(fs, ft, normalize=normalize, mask=emask, reduction=reduction)
    want = ref_hint(fs, ft, normalize, emask, reduction)
    assert got.flatten().tolist() == pytest.approx(want if reduction == "none" else [want], rel=1e-5, abs=1e-7)


def test_hint_fixed_values():
    s = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])
    t = torch.tensor([[[0.0, 1.0], [6.0, 8.0]]])
    # plain: ((1)^2 + (1)^2) / 2 = 1 and (9 + 16) / 2 = 12.5
    assert hint_loss(s, t, reduction="none").tolist() == [[1.0, 12.5]]
    # normalised: orthogonal unit vectors differ by 2, parallel ones by 0; opposite ones reach the maximum 4
    assert hint_loss(s, t, normalize=True, reduction="none")[0].tolist() == pytest.approx([2.0, 0.0], abs=1e-6)
    assert float(hint_loss(s[:, :1], -s[:, :1], normalize=True)) == pytest.approx(4.0)


@st.composite
def hint_cases(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 6)))
        lead = shape[:2]
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        lead = shape[:1]
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    mask = None if draw(st.booleans()) else torch.rand(*lead, generator=g) < 0.6
    return s, t, mask


@budget()
@given(hint_cases(), st.booleans())
def test_hint_properties(case, normalize):
    s, t, mask = case
    for reduction in ("sum", "mean"):
        got = float(hint_loss(s, t, normalize=normalize, mask=mask, reduction=reduction))
        assert got == pytest.approx(ref_hint(s, t, normalize, mask, reduction), rel=1e-4, abs=1e-9)
    total = float(hint_loss(s, t, normalize=normalize, mask=mask))
    count = s.shape[0] * (s.shape[1] if s.dim() == 3 else 1) if mask is None else int(mask.sum())
    assert float(hint_loss(s, t, normalize=normalize, mask=mask, reduction="mean")) == pytest.approx(
        total / max(count, 1), rel=1e-6, abs=1e-12)
    per = hint_loss(s, t, normalize=normalize, mask=mask, reduction="none")
    assert (per >= 0).all() and (not normalize or (per <= 4 + 1e-6).all())
    assert float(hint_loss(s, s.clone(), normalize=normalize, mask=mask)) == 0.0
    if normalize:  # invariant to a positive rescaling of either side; zero for parallel vectors
        assert float(hint_loss(s * 7.0, t * 0.01, normalize=True, mask=mask)) == pytest.approx(total, rel=1e-6,
                                                                                                abs=1e-9)
        assert float(hint_loss(s, s * 3.0, normalize=True, mask=mask)) == pytest.approx(0.0, abs=1e-9)
    lead = s.shape[:2] if s.dim() == 3 else s.shape[:1]
    counted = torch.ones(lead, dtype=torch.bool) if mask is None else mask
    if mask is not None:  # what sits at masked positions does not matter; 'none' is zero there
        junk = torch.where(mask.reshape(*mask.shape, *[1] * (s.dim() - mask.dim())), t, t + 1e3)
        assert float(hint_loss(s, junk, normalize=normalize, mask=mask)) == pytest.approx(total, rel=1e-9, abs=1e-12)
        assert (per[~mask] == 0).all()
    if counted.any():  # one counted vector turned around (anti-parallel, so also seen when normalised): > 0
        first = tuple(counted.nonzero()[0].tolist())
        flipped = s.clone()
        flipped[first] = -s[first]
        assert float(hint_loss(s, flipped, normalize=normalize, mask=mask)) > 0


def test_hint_gradcheck_and_float32_compute():
    for shape, mask in (((2, 3, 4), torch.tensor([[True, False, True], [False, True, True]])), ((2, 2, 2, 3), None)):
        s = rand(*shape, seed=5, dtype=torch.float64).requires_grad_()
        t = rand(*shape, seed=6, dtype=torch.float64)
        for normalize in (False, True):
            assert torch.autograd.gradcheck(lambda x: hint_loss(x, t, normalize=normalize, mask=mask), (s,))
    # plain hint: d/ds sum_positions mean_D (s - t)^2 = 2 (s - t) / D
    s, t = rand(2, 3, 4, seed=7).requires_grad_(), rand(2, 3, 4, seed=8)
    hint_loss(s, t).backward()
    torch.testing.assert_close(s.grad, 2 * (s.detach() - t) / 4)
    out = hint_loss(s.detach().bfloat16(), t.bfloat16(), normalize=True)
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        hint_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


# ---- spatial attention maps, pooling, attention transfer ------------------------------------------------------

def ref_map(f, p=2):
    b_, c_, h_, w_ = f.shape
    out = []
    for b in range(b_):
        q = [sum(abs(float(f[b, c, h, w])) ** p for c in range(c_)) / c_ for h in range(h_) for w in range(w_)]
        out.append(unit(q))
    return out


def ref_adaptive_pool(f, size):
    """Textbook adaptive average pooling: output cell i covers rows floor(i*H/h) .. ceil((i+1)*H/h) - 1."""
    b_, c_, h_in, w_in = f.shape
    h_out, w_out = size
    out = torch.zeros(b_, c_, h_out, w_out, dtype=torch.float64)
    for b in range(b_):
        for c in range(c_):
            for i in range(h_out):
                r0, r1 = (i * h_in) // h_out, -(-(i + 1) * h_in // h_out)
                for j in range(w_out):
                    c0, c1 = (j * w_in) // w_out, -(-(j + 1) * w_in // w_out)
                    cells = [float(f[b, c, r, k]) for r in range(r0, r1) for k in range(c0, c1)]
                    out[b, c, i, j] = sum(cells) / len(cells)
    return out


def ref_at(fs, ft, p=2, mask=None, reduction="sum"):
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    qs, qt = ref_map(ref_adaptive_pool(fs.double(), size), p), ref_map(ref_adaptive_pool(ft.double(), size), p)
    values = [sum((a - b) ** 2 for a, b in zip(x, y)) for x, y in zip(qs, qt)]
    return ref_reduce(values, flat_mask(mask, len(values)), reduction)


def test_spatial_attention_map_fixed():
    f = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # [1, 2, 1, 2]: channel means of a^2 = [5, 2]
    q = spatial_attention_map(f)
    torch.testing.assert_close(q, torch.tensor([[5.0, 2.0]]) / math.sqrt(29.0))
    q1 = spatial_attention_map(f, p=1)  # |a| means [2, 1]
    torch.testing.assert_close(q1, torch.tensor([[2.0, 1.0]]) / math.sqrt(5.0))
    assert spatial_attention_map(torch.zeros(1, 3, 2, 2)).abs().sum() == 0  # an all-zero map stays zero


def test_match_spatial_pools_the_larger_only():
    big, small = rand(2, 3, 6, 4, seed=9), rand(2, 5, 3, 2, seed=10)
    a, b = match_spatial(big, small)
    assert b is small and a.shape == (2, 3, 3, 2)
    torch.testing.assert_close(a.double(), ref_adaptive_pool(big, (3, 2)))
    # 3-D maps and a mixed case (taller student, wider teacher): both pooled to (min H, min W)
    m3, n3 = match_spatial(rand(2, 5, 7, seed=11), rand(2, 3, 9, seed=12))
    assert m3.shape == n3.shape == (2, 3, 7)
    torch.testing.assert_close(m3.double(), ref_adaptive_pool(rand(2, 5, 7, seed=11)[:, None], (3, 7))[:, 0])
    same = rand(1, 2, 3, 3, seed=13)
    x, y = match_spatial(same, same)
    assert x is same and y is same


@pytest.mark.parametrize("p", [1, 2, 4])
def test_attention_transfer_matches_reference(p):
    fs, ft = rand(3, 4, 6, 6, seed=14), rand(3, 9, 3, 3, seed=15)  # different widths and sizes
    mask = torch.tensor([True, False, True])
    for reduction in ("sum", "mean", "none"):
        got = attention_transfer(fs, ft, p=p, mask=mask, reduction=reduction)
        want = ref_at(fs, ft, p, mask, reduction)
        assert got.flatten().tolist() == pytest.approx(want if reduction == "none" else [want], rel=1e-5, abs=1e-7)


@st.composite
def feature_pairs(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    b = draw(st.integers(1, 3))
    fs = torch.randn(b, draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5)), generator=g,
                     dtype=torch.float64)
    ft = torch.randn(b, draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5)), generator=g,
                     dtype=torch.float64) * draw(st.sampled_from([1e-2, 1.0, 50.0]))
    mask = None if draw(st.booleans()) else torch.rand(b, generator=g) < 0.6
    return fs, ft, mask, draw(st.sampled_from([1, 2, 3]))


@budget()
@given(feature_pairs())
def test_attention_transfer_properties(case):
    fs, ft, mask, p = case
    total = float(attention_transfer(fs, ft, p=p, mask=mask))
    assert total == pytest.approx(ref_at(fs, ft, p, mask), rel=1e-4, abs=1e-9)
    per = attention_transfer(fs, ft, p=p, mask=mask, reduction="none")
    assert (per >= 0).all() and (per <= 2 + 1e-9).all()  # unit vectors with non-negative entries
    count = fs.shape[0] if mask is None else int(mask.sum())
    assert float(attention_transfer(fs, ft, p=p, mask=mask, reduction="mean")) == pytest.approx(
        total / max(count, 1), rel=1e-9, abs=1e-12)
    # scale invariance (either side, any positive factor), sign invariance, zero on equal features
    assert float(attention_transfer(fs * 1e3, -ft * 1e-2, p=p, mask=mask)) == pytest.approx(total, rel=1e-6,
                                                                                           abs=1e-9)
    assert float(attention_transfer(fs, fs.clone(), p=p, mask=mask)) == 0.0
    q = spatial_attention_map(fs, p)
    torch.testing.assert_close(spatial_attention_map(fs * 5.0, p), q)
    assert torch.linalg.vector_norm(q, dim=1).tolist() == pytest.approx([1.0] * fs.shape[0])
    if mask is not None:
        junk = torch.where(mask[:, None, None, None], ft, torch.rand_like(ft) * 9)
        assert float(attention_transfer(fs, junk, p=p, mask=mask)) == pytest.approx(total, rel=1e-9, abs=1e-12)
        assert (per[~mask] == 0).all()


def test_attention_transfer_sees_a_moved_peak_and_gradients():
    f = torch.zeros(1, 2, 3, 3)
    f[0, :, 0, 0] = 1.0
    g = torch.zeros(1, 2, 3, 3)
    g[0, :, 2, 2] = 1.0
    assert float(attention_transfer(f, g)) == pytest.approx(2.0)  # disjoint one-hot maps: |e1 - e9|^2
    fs = rand(2, 3, 4, 4, seed=16, dtype=torch.float64).requires_grad_()
    ft = rand(2, 5, 2, 2, seed=17, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: attention_transfer(x, ft, mask=torch.tensor([True, False])), (fs,))
    assert torch.autograd.gradcheck(lambda x: attention_transfer(x, ft, p=3), (fs,))


# ---- attention probabilities ---------------------------------------------------------------------------------

def ref_attn(s, t, kind="kl", mask=None, reduction="sum"):
    b_, hs, n, _ = s.shape
    ht = t.shape[1]
    tiny = torch.finfo(s.dtype).tiny  # the documented clamp of the student's probabilities
    if hs != ht:  # average over heads first, written out
        s = [[[[sum(float(s[b, h, q, k]) for h in range(hs)) / hs for k in range(n)] for q in range(n)]]
             for b in range(b_)]
        t = [[[[sum(float(t[b, h, q, k]) for h in range(ht)) / ht for k in range(n)] for q in range(n)]]
             for b in range(b_)]
        heads = 1
    else:
        s, t, heads = s.tolist(), t.tolist(), hs
    values = []
    for b in range(b_):
        for q in range(n):
            per_head = []
            for h in range(heads):
                ps, pt = s[b][h][q], t[b][h][q]
                if kind == "kl":
                    per_head.append(sum(a * (math.log(a) - math.log(max(c, tiny))) for a, c in zip(pt, ps) if a > 0))
                else:
                    per_head.append(sum((a - c) ** 2 for a, c in zip(ps, pt)) / n)
            values.append(sum(per_head) / heads)
    return ref_reduce(values, flat_mask(mask, len(values)), reduction)


def probs(b, h, n, seed, zeros=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, h, n, n, generator=g, dtype=torch.float64) * 2
    if zeros:
        banned = torch.rand(b, h, n, n, generator=g) < zeros
        banned[..., 0] = False  # one key left per row
        z = z.masked_fill(banned, -math.inf)
    return torch.softmax(z, -1).to(dtype)


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("heads", [(2, 2), (2, 3)])
def test_attention_probs_matches_reference(kind, heads):
    s, t = probs(2, heads[0], 4, seed=18), probs(2, heads[1], 4, seed=19, zeros=0.4)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    for reduction in ("sum", "mean", "none"):
        got = attention_probs_loss(s, t, kind=kind, mask=mask, reduction=reduction)
        want = ref_attn(s, t, kind, mask, reduction)
        assert got.flatten().tolist() == pytest.approx(want if reduction == "none" else [want], rel=1e-5, abs=1e-9)


def test_attention_probs_fixed_kl_and_head_handling():
    t = torch.tensor([0.5, 0.5, 0.0]).expand(1, 1, 3, 3)
    s = torch.tensor([0.25, 0.25, 0.5]).expand(1, 1, 3, 3)
    per = attention_probs_loss(s, t, reduction="none")
    assert per[0].tolist() == pytest.approx([math.log(2.0)] * 3)  # 2 * 0.5 * log(0.5 / 0.25)
    # equal head counts: head by head (swapped heads cost something although the head means agree) ...
    a, b = probs(1, 1, 3, seed=20), probs(1, 1, 3, seed=21)
    assert float(attention_probs_loss(torch.cat([a, b], 1), torch.cat([b, a], 1))) > 1e-3
    # ... different counts: only the head means are compared
    three = torch.cat([a, b, (a + b) / 2], 1)  # mean over 3 heads = (a + b) / 2
    for kind in ("kl", "mse"):
        assert float(attention_probs_loss(torch.cat([a, b], 1), three, kind=kind)) == pytest.approx(0.0, abs=1e-12)
        assert float(attention_probs_loss(three, torch.cat([a, b], 1), kind=kind)) == pytest.approx(0.0, abs=1e-12)
        avg = attention_probs_loss(torch.cat([a, b], 1).mean(1, keepdim=True), probs(1, 1, 3, seed=22), kind=kind)
        assert float(attention_probs_loss(torch.cat([a, b], 1), torch.cat([probs(1, 1, 3, seed=22)] * 3, 1),
                                          kind=kind)) == pytest.approx(float(avg), rel=1e-9)
    with pytest.raises(ValueError, match="kind"):
        attention_probs_loss(a, b, kind="l1")
    with pytest.raises(ValueError, match="sequence"):
        attention_probs_loss(a, probs(1, 1, 4, seed=0))


def test_attention_probs_exact_zeros_stay_finite():
    """Teacher zeros (0 log 0 = 0), student zeros under teacher zeros (free) and under teacher mass (large but
    finite), in float32, with finite gradients."""
    t = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]]])
    s = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.2, 0.3, 0.5]]]], requires_grad=True)
    per = attention_probs_loss(s, t, reduction="none")
    assert torch.isfinite(per).all()
    per, out = per.detach(), per
    assert float(per[0, 0]) == 0.0  # identical rows with zeros
    assert float(per[0, 2]) == pytest.approx(math.log(2.0), rel=1e-6)
    tiny = torch.finfo(torch.float32).tiny
    assert float(per[0, 1]) == pytest.approx(0.5 * math.log(0.5 / tiny), rel=1e-5)  # clamped, not inf
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert float(attention_probs_loss(t, t.clone())) == 0.0


@st.composite
def prob_pairs(draw):
    b, n = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    hs, ht = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    zs, zt = draw(st.sampled_from([0.0, 0.5])), draw(st.sampled_from([0.0, 0.5, 0.9]))
    s, t = probs(b, hs, n, seed, zeros=zs), probs(b, ht, n, seed + 1, zeros=zt)
    mask = None if draw(st.booleans()) else torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < 0.6
    return s, t, mask, draw(st.sampled_from(["kl", "mse"]))


@budget()
@given(prob_pairs())
def test_attention_probs_properties(case):
    s, t, mask, kind = case
    total = float(attention_probs_loss(s, t, kind=kind, mask=mask))
    assert math.isfinite(total)
    assert total == pytest.approx(ref_attn(s, t, kind, mask), rel=1e-6, abs=1e-9)
    per = attention_probs_loss(s, t, kind=kind, mask=mask, reduction="none")
    assert per.shape == (s.shape[0], s.shape[2]) and (per >= -1e-12).all()
    count = per.numel() if mask is None else int(mask.sum())
    assert float(attention_probs_loss(s, t, kind=kind, mask=mask, reduction="mean")) == pytest.approx(
        total / max(count, 1), rel=1e-9, abs=1e-12)
    assert float(attention_probs_loss(t, t.clone(), kind=kind, mask=mask)) == pytest.approx(0.0, abs=1e-12)
    if mask is not None:  # rows of masked queries do not matter
        other = probs(*s.shape[:3], seed=99)
        junk = torch.where(mask[:, None, :, None], s, other)
        assert float(attention_probs_loss(junk, t, kind=kind, mask=mask)) == pytest.approx(total, rel=1e-9,
                                                                                          abs=1e-12)
        assert (per[~mask] == 0).all()


def test_attention_probs_gradcheck():
    s = probs(1, 2, 3, seed=23).requires_grad_()
    for t in (probs(1, 2, 3, seed=24, zeros=0.5), probs(1, 3, 3, seed=25)):
        for kind in ("kl", "mse"):
            mask = torch.tensor([[True, False, True]])
            assert torch.autograd.gradcheck(lambda x: attention_probs_loss(x, t, kind=kind, mask=mask), (s,))
    # KL's gradient w.r.t. the student is -a_T / a_S, per query row and head (then the mean over 2 heads)
    t = probs(1, 2, 3, seed=26)
    attention_probs_loss(s, t).backward()
    torch.testing.assert_close(s.grad, -t / s.detach() / 2)
