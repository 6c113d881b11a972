"""Each distillation loss against a naive reference (Python loops over positions and vocabulary)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from stillhouse.distill import losses

B, T, V = 2, 5, 7


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 2
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    return s, t, mask


def _softmax(row: list[float], temp: float = 1.0) -> list[float]:
    m = max(x / temp for x in row)
    e = [math.exp(x / temp - m) for x in row]
    z = sum(e)
    return [x / z for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _naive_mean(fn, s, t, mask) -> float:
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                total += fn(s[b, i].tolist(), t[b, i].tolist())
                count += 1
    return total / count


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_forward_and_reverse_kl_match_naive(temp):
    s, t, mask = _tensors(1)
    fkl = _naive_mean(lambda a, b: _kl(_softmax(b, temp), _softmax(a, temp)), s, t, mask)
    rkl = _naive_mean(lambda a, b: _kl(_softmax(a, temp), _softmax(b, temp)), s, t, mask)
    assert losses.forward_kl(s, t, mask, temp).item() == pytest.approx(fkl, rel=1e-5)
    assert losses.reverse_kl(s, t, mask, temp).item() == pytest.approx(rkl, rel=1e-5)
    assert fkl != pytest.approx(rkl, rel=1e-3)  # the two directions differ on these inputs


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_naive(beta):
    s, t, mask = _tensors(2)
    temp = 1.5

    def jsd(a, b):
        ps, pt = _softmax(a, temp), _softmax(b, temp)
        m = [beta * x + (1 - beta) * y for x, y in zip(pt, ps)]
        return beta * _kl(pt, m) + (1 - beta) * _kl(ps, m)

    ref = _naive_mean(jsd, s, t, mask)
    assert losses.generalized_jsd(s, t, mask, beta=beta, temperature=temp).item() == pytest.approx(ref, rel=1e-5)


def test_generalized_jsd_end_points_are_the_kls():
    s, t, mask = _tensors(3)
    assert losses.generalized_jsd(s, t, mask, beta=0.0).item() == pytest.approx(
        losses.forward_kl(s, t, mask).item())
    assert losses.generalized_jsd(s, t, mask, beta=1.0).item() == pytest.approx(
        losses.reverse_kl(s, t, mask).item())


def test_sft_loss_matches_naive_and_ignores_prompt():
    s, _, mask = _tensors(4)
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[~mask] = losses.IGNORE_INDEX
    ref = _naive_mean(lambda a, lab: -math.log(_softmax(a)[int(lab[0])]), s,
                      labels.unsqueeze(-1).float().expand(B, T, 1), mask)
    assert losses.sft_loss(s, labels).item() == pytest.approx(ref, rel=1e-5)


def test_topk_with_k_equal_vocab_equals_forward_kl():
    s, t, mask = _tensors(5)
    t_lp = torch.log_softmax(t, -1)
    vals, ids = t_lp.sort(-1, descending=True)
    got = losses.topk_kd(s, ids, vals, mask)
    assert got.item() == pytest.approx(losses.forward_kl(s, t, mask).item(), rel=1e-5)


def test_topk_with_tail_bucket_matches_naive():
    s, t, mask = _tensors(6)
    k = 3
    t_lp = torch.log_softmax(t, -1)
    vals, ids = t_lp.topk(k, -1)

    def ref_at(b, i):
        pt = t_lp[b, i].exp().tolist()
        ps = _softmax(s[b, i].tolist())
        top = ids[b, i].tolist()
        p = [pt[j] for j in top] + [1 - sum(pt[j] for j in top)]
        q = [ps[j] for j in top] + [1 - sum(ps[j] for j in top)]
        return _kl(p, q)

    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if mask[b, i]:
                total += ref_at(b, i)
                count += 1
    assert losses.topk_kd(s, ids, vals, mask).item() == pytest.approx(total / count, rel=1e-5)


def test_topk_padding_slots_and_one_hot_equals_ce():
    s, _, mask = _tensors(7)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, V, (B, T), generator=g)
    ids = torch.zeros(B, T, 4, dtype=torch.long)
    lps = torch.full((B, T, 4), -math.inf)
    ids[..., 0] = labels
    lps[..., 0] = 0.0  # a one-hot teacher: all its mass on the label
    lab = labels.clone()
    lab[~mask] = losses.IGNORE_INDEX
    kd = losses.topk_kd(s, ids, lps, mask)
    assert kd.item() == pytest.approx(losses.sft_loss(s, lab).item(), rel=1e-5)


def test_topk_gradients_are_finite_with_empty_tail_and_padding():
    s, t, mask = _tensors(8)
    s = s.clone().requires_grad_(True)
    vals, ids = torch.log_softmax(t, -1).sort(-1, descending=True)
    vals = vals.clone()
    vals[1, 2, :] = -math.inf  # a fully padded position
    losses.topk_kd(s, ids, vals, mask).backward()
    assert torch.isfinite(s.grad).all()


def test_empty_mask_gives_zero_and_bad_arguments_raise():
    s, t, _ = _tensors(9)
    none = torch.zeros(B, T, dtype=torch.bool)
    assert losses.forward_kl(s, t, none).item() == 0.0
    with pytest.raises(ValueError, match="beta"):
        losses.generalized_jsd(s, t, none, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        losses.forward_kl(s, t, none, temperature=0.0)
    with pytest.raises(ValueError, match="tokenizer"):
        losses.forward_kl(s, t[..., :-1], none)
    with pytest.raises(ValueError, match="alpha"):
        losses.mix_losses(torch.tensor(1.0), torch.tensor(1.0), 2.0)
    assert losses.mix_losses(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(3.5)


# -- on-policy (GKD) losses for a teacher known through top-k or sampled-token logprobs ---------------

def _jsd_naive(p: list[float], q: list[float], beta: float) -> float:
    """Generalized JSD of teacher p and student q (beta=0 forward KL, beta=1 reverse KL)."""
    if beta == 0.0:
        return _kl(p, q)
    if beta == 1.0:
        return _kl(q, p)
    m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_topk_jsd_with_k_equal_vocab_equals_dense(beta):
    s, t, mask = _tensors(10)
    vals, ids = torch.log_softmax(t, -1).sort(-1, descending=True)
    got = losses.topk_generalized_jsd(s, ids, vals, mask, beta=beta)
    assert got.item() == pytest.approx(losses.generalized_jsd(s, t, mask, beta=beta).item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_topk_jsd_with_tail_bucket_matches_naive(beta):
    s, t, mask = _tensors(11)
    k = 3
    t_lp = torch.log_softmax(t, -1)
    vals, ids = t_lp.topk(k, -1)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            pt, ps, top = t_lp[b, i].exp().tolist(), _softmax(s[b, i].tolist()), ids[b, i].tolist()
            p = [pt[j] for j in top] + [1 - sum(pt[j] for j in top)]
            q = [ps[j] for j in top] + [1 - sum(ps[j] for j in top)]
            total += _jsd_naive(p, q, beta)
            count += 1
    got = losses.topk_generalized_jsd(s, ids, vals, mask, beta=beta)
    assert got.item() == pytest.approx(total / count, rel=1e-4)


def test_topk_jsd_beta0_is_topk_kd_and_bounded_by_dense():
    s, t, mask = _tensors(12)
    vals, ids = torch.log_softmax(t, -1).topk(2, -1)
    assert losses.topk_generalized_jsd(s, ids, vals, mask, beta=0.0).item() == pytest.approx(
        losses.topk_kd(s, ids, vals, mask).item(), rel=1e-5)
    for beta in (0.0, 0.5, 1.0):  # folding onto buckets never increases a divergence
        assert (losses.topk_generalized_jsd(s, ids, vals, mask, beta=beta).item()
                <= losses.generalized_jsd(s, t, mask, beta=beta).item() + 1e-6)


def test_topk_jsd_padding_gives_finite_gradients():
    s, t, mask = _tensors(13)
    s = s.clone().requires_grad_(True)
    vals, ids = torch.log_softmax(t, -1).sort(-1, descending=True)
    vals = vals.clone()
    vals[1, 2, :] = -math.inf  # nothing known at this position: all mass in the tail, on both sides
    vals[0, 1, 3:] = -math.inf  # some slots padding
    losses.topk_generalized_jsd(s, ids, vals, mask, beta=0.5).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="beta"):
        losses.topk_generalized_jsd(s, ids, vals, mask, beta=-0.1)


def test_sampled_reverse_kl_value_and_gradient_match_naive():
    s, t, mask = _tensors(14)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, V, (B, T), generator=g)
    t_tok = torch.gather(torch.log_softmax(t, -1), -1, tokens.unsqueeze(-1)).squeeze(-1)
    s = s.clone().requires_grad_(True)
    loss = losses.sampled_reverse_kl(s, tokens, t_tok, mask)
    loss.backward()
    # naive: value = mean (log s(y) - log t(y)); gradient wrt logits = mean gap * (onehot(y) - softmax)
    count = int(mask.sum())
    value, grad = 0.0, torch.zeros(B, T, V)
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            ps = _softmax(s[b, i].tolist())
            y = int(tokens[b, i])
            gap = math.log(ps[y]) - float(t_tok[b, i])
            value += gap
            for v in range(V):
                grad[b, i, v] = gap * ((1.0 if v == y else 0.0) - ps[v]) / count
    assert loss.item() == pytest.approx(value / count, rel=1e-5)
    assert torch.allclose(s.grad, grad, atol=1e-6)


def test_sampled_reverse_kl_averages_to_the_reverse_kl():
    """Sampling many tokens from the student: the mean estimate approaches the exact reverse KL."""
    g = torch.Generator().manual_seed(6)
    s_row, t_row = torch.randn(V, generator=g), torch.randn(V, generator=g)
    n = 20000
    tokens = torch.multinomial(torch.softmax(s_row, -1), n, replacement=True, generator=g).view(1, n)
    s = s_row.expand(1, n, V)
    t_tok = torch.log_softmax(t_row, -1)[tokens]
    est = losses.sampled_reverse_kl(s, tokens, t_tok, torch.ones(1, n, dtype=torch.bool)).item()
    exact = losses.reverse_kl(s_row.view(1, 1, V), t_row.view(1, 1, V), torch.ones(1, 1, dtype=torch.bool)).item()
    assert est == pytest.approx(exact, abs=0.05)
