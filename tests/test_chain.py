"""Tests for attnchain.chain against independent references (networkx, numpy float64, explicit
matrix powers) plus hypothesis property tests."""
import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnchain.chain import (bipartite_chain, bounce, check_stochastic, planted_chain, rollout,
                             source_chain, to_stochastic)
from attnchain.errors import ConvergenceError, ReducibleChainError
from attnchain.stationary import damped, stationary_dense, token_rank


def rand_chain(*shape, seed=0, sparsity=0.0, temp=2.0, dtype=torch.float32):
    """Random row-stochastic matrices (softmax of scaled Gaussians, optional exact zeros)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * temp
    A = torch.softmax(x, -1)
    if sparsity:
        keep = torch.rand(*shape, generator=g, dtype=torch.float64) > sparsity
        keep |= torch.eye(shape[-1], dtype=torch.bool)  # no zero rows
        A = A * keep
        A = A / A.sum(-1, keepdim=True)
    return A.to(dtype)


def nx_pagerank(A, alpha, p=None):
    """networkx reference: DiGraph with edge i -> j of weight A[i, j]."""
    a = np.asarray(A, dtype=np.float64)
    n = a.shape[0]
    G = nx.DiGraph()
    G.add_nodes_from(range(n))
    for i, j in zip(*np.nonzero(a)):
        G.add_edge(int(i), int(j), weight=float(a[i, j]))
    pers = None if p is None else {i: float(p[i]) for i in range(n)}
    pr = nx.pagerank(G, alpha=alpha, personalization=pers, weight="weight", tol=1e-14,
                     max_iter=100000)
    return np.array([pr[i] for i in range(n)])


# ------------------------------------------------------------------ check_stochastic
def test_check_stochastic_accepts_valid_and_half():
    A = rand_chain(2, 7, 7)
    check_stochastic(A)
    check_stochastic(A.half(), atol=1e-2)
    check_stochastic(A.double().numpy())


@pytest.mark.parametrize("make, match", [
    (lambda A: A[..., :-1], "square"),
    (lambda A: A[0, 0, 0], "square"),
    (lambda A: torch.zeros(0, 0), "empty"),
    (lambda A: A.masked_fill(torch.rand_like(A) > 0.9, float("nan")), "NaN or Inf"),
    (lambda A: A.index_put((torch.tensor(0), torch.tensor(1), torch.tensor(2)),
                           torch.tensor(float("inf"))), "NaN or Inf"),
    (lambda A: A - 0.05, "negative"),
    (lambda A: A.index_fill(-2, torch.tensor([2]), 0.0), "zero rows"),
    (lambda A: A * 1.01, "not summing to 1"),
    (lambda A: A.to(torch.complex64), "real"),
])
def test_check_stochastic_errors(make, match):
    A = rand_chain(2, 5, 5)
    with pytest.raises(ValueError, match=match):
        check_stochastic(make(A))


def test_check_stochastic_atol():
    A = rand_chain(4, 4) * (1 + 1e-3)
    with pytest.raises(ValueError, match="not summing to 1"):
        check_stochastic(A)
    check_stochastic(A, atol=1e-2)


# ------------------------------------------------------------------ to_stochastic
def test_to_stochastic_logits_matches_explicit_softmax_and_mask():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 6, generator=g) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)
    A = to_stochastic(x, mask=mask, dtype=torch.float64)
    e = np.exp(x.numpy()) * mask.numpy()
    ref = e / e.sum(-1, keepdims=True)
    np.testing.assert_allclose(A.numpy(), ref, atol=1e-12)
    assert A.dtype == torch.float64
    # 1-D key mask removes keys for every query
    km = torch.tensor([True, False, True, True, False, True])
    A1 = to_stochastic(x.float(), mask=km)
    assert torch.all(A1[..., ~km] == 0)
    check_stochastic(A1)


def test_to_stochastic_weights():
    w = torch.rand(3, 5, 5) + 0.1
    A = to_stochastic(w, kind="weights")
    torch.testing.assert_close(A, w / w.sum(-1, keepdim=True))
    assert to_stochastic(w.half(), kind="weights").dtype == torch.float32


@pytest.mark.parametrize("x, kw, match", [
    (torch.zeros(3, 3), {"kind": "probs"}, "kind"),
    (torch.zeros(3, 4), {}, "square"),
    (torch.full((3, 3), float("nan")), {}, "NaN"),
    (torch.zeros(3, 3), {"mask": torch.zeros(3, 3, dtype=torch.bool)}, "every key is masked"),
    (torch.zeros(3, 3), {"mask": torch.ones(3, 3)}, "bool"),
    (torch.zeros(3, 3), {"mask": torch.ones(4, dtype=torch.bool)}, "broadcast"),
    (-torch.ones(3, 3), {"kind": "weights"}, "negative"),
    (torch.zeros(3, 3), {"kind": "weights"}, "zero rows"),
    (torch.full((3, 3), float("inf")), {"kind": "weights"}, "Inf"),
    (torch.full((3, 3), float("inf")), {}, r"\+inf"),
])
def test_to_stochastic_errors(x, kw, match):
    with pytest.raises(ValueError, match=match):
        to_stochastic(x, **kw)


# ------------------------------------------------------------------ bounce / source_chain
def test_bounce_matches_matrix_powers_sink():
    A = rand_chain(2, 3, 9, 9, seed=2, dtype=torch.float64)
    out = bounce(A, 4, 5)
    assert out.shape == (2, 3, 6, 9)
    e = np.zeros(9)
    e[4] = 1
    for k in range(6):
        ref = e @ np.linalg.matrix_power(A.numpy(), k)
        np.testing.assert_allclose(out[..., k, :].numpy(), ref, atol=1e-12)
    # n = 1 is row select
    torch.testing.assert_close(out[..., 1, :], A[..., 4, :])


def test_bounce_source_is_normalised_transpose():
    A = rand_chain(8, 8, seed=3, sparsity=0.3, dtype=torch.float64)
    a = A.numpy()
    S_ref = (a / a.sum(0, keepdims=True)).T  # column-normalised, transposed
    S = source_chain(A)
    np.testing.assert_allclose(S.numpy(), S_ref, atol=1e-12)
    check_stochastic(S)
    out = bounce(A, 2, 3, direction="source")
    for k in range(4):
        ref = np.eye(8)[2] @ np.linalg.matrix_power(S_ref, k)
        np.testing.assert_allclose(out[..., k, :].numpy(), ref, atol=1e-12)
    # first step of the source chain is column select, normalised: "who attends to j"
    np.testing.assert_allclose(out[..., 1, :].numpy(), a[:, 2] / a[:, 2].sum(), atol=1e-12)


def test_bounce_start_forms_agree_and_broadcast():
    A = rand_chain(3, 6, 6, seed=4)
    by_int = bounce(A, 1, 3)
    by_onehot = bounce(A, torch.eye(6)[1], 3)
    torch.testing.assert_close(by_int, by_onehot)
    idx = torch.tensor([0, 1, 5])
    by_idx = bounce(A, idx, 2)
    assert by_idx.shape == (3, 3, 6)
    for b in range(3):
        torch.testing.assert_close(by_idx[b], bounce(A[b], int(idx[b]), 2))
    v = torch.softmax(torch.randn(6), 0)
    out = bounce(A, v, 2)
    torch.testing.assert_close(out[:, 2], torch.einsum("i,bij,bjk->bk", v, A, A),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 3))


@pytest.mark.parametrize("kw, match", [
    ({"start": 6, "n": 1}, "out of range"),
    ({"start": 0, "n": -1}, "non-negative"),
    ({"start": 0, "n": 1, "direction": "up"}, "direction"),
    ({"start": torch.ones(6), "n": 1}, "sum to 1"),
    ({"start": -torch.eye(6)[0], "n": 1}, "negative"),
    ({"start": torch.ones(5) / 5, "n": 1}, "last dim"),
])
def test_bounce_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        bounce(rand_chain(6, 6), **kw)


def test_source_chain_zero_column():
    A = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.3, 0.7, 0.0]])
    with pytest.raises(ValueError, match="zero columns"):
        source_chain(A)


# ------------------------------------------------------------------ damped / token_rank
def test_damped_formula():
    A = rand_chain(5, 5, dtype=torch.float64)
    p = torch.rand(5, dtype=torch.float64)
    G = damped(A, 0.85, p)
    ref = 0.85 * A + 0.15 * (p / p.sum())[None, :]
    torch.testing.assert_close(G, ref)
    check_stochastic(G)


@pytest.mark.parametrize("seed, sparsity", [(0, 0.0), (1, 0.5), (2, 0.8)])
@pytest.mark.parametrize("personalised", [False, True])
def test_token_rank_vs_networkx(seed, sparsity, personalised):
    A = rand_chain(40, 40, seed=seed, sparsity=sparsity, temp=3.0, dtype=torch.float64)
    p = torch.rand(40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    p = p if personalised else None
    for alpha in (0.85, 0.99):
        ref = nx_pagerank(A.numpy(), alpha, None if p is None else p.numpy())
        pi = token_rank(A, alpha=alpha, personalization=p, tol=1e-12, dtype=torch.float64)
        assert np.abs(pi.numpy() - ref).sum() < 1e-9
        pi32 = token_rank(A.float(), alpha=alpha, personalization=p)
        assert pi32.dtype == torch.float32
        assert np.abs(pi32.double().numpy() - ref).sum() < 2e-5
        dense = stationary_dense(A, alpha=alpha, personalization=p)
        assert np.abs(dense.numpy() - ref).sum() < 1e-9


@pytest.mark.parametrize("method", ["krylov", "power"])
def test_token_rank_methods_agree_with_dense(method):
    A = rand_chain(3, 64, 64, seed=5, temp=4.0, dtype=torch.float64)
    pi, info = token_rank(A, method=method, tol=1e-11, dtype=torch.float64, return_info=True)
    ref = stationary_dense(A)
    assert (pi - ref).abs().sum(-1).max() < 1e-8
    assert (info["residual"] < 1e-11).all() and info["passes"] >= 1


def test_token_rank_krylov_uses_fewer_passes_on_slow_chain():
    # two weakly coupled blocks: power iteration converges slowly, Krylov does not care
    n = 50
    blocks = torch.block_diag(rand_chain(25, 25, seed=6), rand_chain(25, 25, seed=7)).double()
    A = 0.995 * blocks + 0.005 * rand_chain(n, n, seed=8).double()
    _, ik = token_rank(A, tol=1e-8, dtype=torch.float64, return_info=True)
    _, ip = token_rank(A, tol=1e-8, dtype=torch.float64, method="power", return_info=True)
    assert ik["passes"] * 3 < ip["passes"]


def test_token_rank_periodic_chain_alpha_one():
    # bipartite (period-2) chain with a non-uniform stationary law; plain power iteration
    # from a point mass would oscillate forever
    B = torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]], dtype=torch.float64)
    C = torch.tensor([[0.1, 0.3, 0.6], [0.7, 0.2, 0.1]], dtype=torch.float64)
    A = torch.zeros(5, 5, dtype=torch.float64)
    A[:3, 3:] = B
    A[3:, :3] = C
    ref = stationary_dense(A, alpha=1.0)
    w, v = np.linalg.eig(A.numpy().T)  # independent check: left eigenvector of eigenvalue 1
    v1 = np.real(v[:, np.argmin(np.abs(w - 1))])
    np.testing.assert_allclose(ref.numpy(), v1 / v1.sum(), atol=1e-12)
    for method in ("krylov", "power"):
        pi = token_rank(A, alpha=1.0, method=method, tol=1e-12, dtype=torch.float64)
        np.testing.assert_allclose(pi.numpy(), ref.numpy(), atol=1e-10)
    cyc = torch.roll(torch.eye(7), 1, 1)
    torch.testing.assert_close(token_rank(cyc, alpha=1.0), torch.full((7,), 1 / 7))
    x = torch.eye(7)[0]
    assert (x @ cyc @ cyc - x).abs().sum() > 1  # the oscillation the method avoids


def test_token_rank_reducible_alpha_one_raises():
    A = torch.block_diag(rand_chain(4, 4, seed=1), rand_chain(3, 3, seed=2))
    with pytest.raises(ReducibleChainError, match="reducible.*2 closed classes"):
        token_rank(A, alpha=1.0)
    with pytest.raises(ValueError, match="not unique"):
        stationary_dense(A, alpha=1.0)
    pi = token_rank(A, alpha=0.9)  # damping makes it unique
    torch.testing.assert_close(pi, stationary_dense(A, alpha=0.9).float(), atol=1e-5, rtol=0)


def test_token_rank_transient_states_have_unique_answer_alpha_one():
    # state 0 is transient, {1, 2} is the single closed class: unique π = (0, 1/2, 1/2)
    A = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    pi = token_rank(A, alpha=1.0, tol=1e-12, dtype=torch.float64)
    np.testing.assert_allclose(pi.numpy(), [0, 0.5, 0.5], atol=1e-10)


def test_token_rank_does_not_converge_raises():
    A = torch.block_diag(rand_chain(20, 20, seed=1), rand_chain(20, 20, seed=2))
    A = 0.999 * A + 0.001 / 40
    with pytest.raises(ConvergenceError, match="did not converge in 3 passes"):
        token_rank(A, max_iter=3, method="power")
    with pytest.raises(RuntimeError, match="did not converge"):
        token_rank(A, max_iter=2)


@pytest.mark.parametrize("kw, match", [
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"personalization": -torch.ones(5)}, "negative"),
    ({"personalization": torch.zeros(5)}, "sums to 0"),
    ({"personalization": torch.ones(4)}, "last dim"),
    ({"tol": 0}, "tol"),
    ({"max_iter": 0}, "max_iter"),
    ({"method": "eig"}, "method"),
    ({"dtype": torch.float16}, "dtype"),
])
def test_token_rank_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        token_rank(rand_chain(5, 5), **kw)


def test_token_rank_bad_matrix():
    with pytest.raises(ValueError, match="negative"):
        token_rank(torch.tensor([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        token_rank(torch.tensor([[float("nan"), 1.0], [0.5, 0.5]]))


def test_token_rank_dtypes_and_personalisation_batch():
    A = rand_chain(2, 16, 16, seed=9)
    assert token_rank(A.half()).dtype == torch.float32
    assert token_rank(A.bfloat16()).dtype == torch.float32
    assert token_rank(A, dtype=torch.float64).dtype == torch.float64
    P = torch.eye(16)[:3]  # three personalisations broadcast against one matrix
    pi = token_rank(A[0], personalization=P, tol=1e-7)
    assert pi.shape == (3, 16)
    for i in range(3):
        torch.testing.assert_close(pi[i], token_rank(A[0], personalization=P[i], tol=1e-7),
                                   atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_kept():  # pragma: no cover - no GPU in CI
    A = rand_chain(2, 32, 32).cuda()
    assert token_rank(A).device.type == "cuda"
    assert bounce(A, 0, 2).device.type == "cuda"
    torch.testing.assert_close(token_rank(A).cpu(), token_rank(A.cpu()), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ properties
chains = st.builds(
    lambda seed, n, b, temp, sp: rand_chain(b, n, n, seed=seed, temp=temp, sparsity=sp,
                                            dtype=torch.float64),
    st.integers(0, 2**31 - 1), st.integers(1, 24), st.integers(1, 3),
    st.floats(0.1, 6.0), st.sampled_from([0.0, 0.5, 0.9]))


@settings(max_examples=40, deadline=None)
@given(A=chains, alpha=st.floats(0.5, 0.99))
def test_property_stationary(A, alpha):
    pi = token_rank(A, alpha=alpha, tol=1e-10, dtype=torch.float64)
    assert (pi >= 0).all()
    torch.testing.assert_close(pi.sum(-1), torch.ones(A.shape[0], dtype=torch.float64))
    G = damped(A, alpha)
    step = (pi.unsqueeze(-2) @ G).squeeze(-2)
    assert (step - pi).abs().sum(-1).max() < 1e-9  # fixed point
    # batching does not change results
    for b in range(A.shape[0]):
        single = token_rank(A[b], alpha=alpha, tol=1e-10, dtype=torch.float64)
        assert (single - pi[b]).abs().sum() < 1e-8
    assert (pi - stationary_dense(A, alpha=alpha)).abs().sum(-1).max() < 1e-7


@settings(max_examples=30, deadline=None)
@given(A=chains, n=st.integers(0, 4), direction=st.sampled_from(["sink", "source"]))
def test_property_bounce_distributions(A, n, direction):
    try:
        out = bounce(A, 0, n, direction=direction)
    except ValueError as e:  # a key nobody attends to has no source step
        assert "zero columns" in str(e) and direction == "source"
        return
    assert out.shape == (*A.shape[:-2], n + 1, A.shape[-1])
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1], dtype=out.dtype))
    single = bounce(A[0], 0, n, direction=direction)
    torch.testing.assert_close(single, out[0])


# ------------------------------------------------------------------ planted_chain
@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       leak=st.floats(0.0, 1.0), conc=st.floats(0.1, 5.0), shuffle=st.booleans(),
       seed=st.integers(0, 10_000))
def test_planted_chain_rows_and_leak(sizes, leak, conc, shuffle, seed):
    a, lab = planted_chain(sizes, leak=leak, concentration=conc, shuffle=shuffle, seed=seed,
                           dtype=torch.float64)
    n = sum(sizes)
    assert a.shape == (n, n) and lab.shape == (n,) and a.dtype == torch.float64
    assert (a >= 0).all()
    np.testing.assert_allclose(a.sum(-1).numpy(), 1.0, atol=1e-12)
    same = (lab[:, None] == lab[None, :]).double()
    out = (a * (1 - same)).sum(-1).numpy()
    np.testing.assert_allclose(out, leak, atol=1e-9)
    assert np.bincount(lab.numpy()).tolist() == sizes


def test_planted_chain_deterministic_seed_sensitive_and_dtypes():
    a1, _ = planted_chain([3, 4], leak=0.2, seed=1)
    a2, _ = planted_chain([3, 4], leak=0.2, seed=1)
    a3, _ = planted_chain([3, 4], leak=0.2, seed=2)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)
    assert a1.dtype == torch.float32
    a64, _ = planted_chain([3, 4], leak=0.2, seed=1, dtype=torch.float64)
    torch.testing.assert_close(a64.float(), a1)  # same draw in both precisions
    check_stochastic(a1)


def test_planted_chain_lumped_eigenvalue_matches_theory():
    # With huge concentration, rows are uniform inside and outside: the lumped chain of k equal
    # blocks has second eigenvalue 1 - leak * k / (k - 1); compare with numpy's dense eig.
    k, leak = 3, 0.3
    a, _ = planted_chain([5] * k, leak=leak, concentration=1e6, seed=0, dtype=torch.float64)
    ev = np.sort(np.abs(np.linalg.eigvals(a.numpy())))[::-1]
    assert ev[0] == pytest.approx(1.0, abs=1e-9)
    assert ev[1] == pytest.approx(1 - leak * k / (k - 1), abs=1e-3)
    assert ev[2] == pytest.approx(1 - leak * k / (k - 1), abs=1e-3)
    assert ev[3] < 1e-2


@pytest.mark.parametrize("kw, msg", [
    (dict(sizes=[]), "sizes"), (dict(sizes=[0, 2]), "sizes"), (dict(sizes="ab"), "sizes"),
    (dict(sizes=[2, 2], leak=1.5), "leak"), (dict(sizes=[3], leak=0.1), "single block"),
    (dict(sizes=[2, 2], concentration=0), "concentration"),
    (dict(sizes=[2, 2], dtype=torch.float16), "dtype")])
def test_planted_chain_rejects_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        planted_chain(**kw)


# ------------------------------------------------------------------ bipartite_chain
def test_bipartite_chain_structure_against_numpy():
    rng = np.random.default_rng(0)
    w = rng.random((3, 5))
    a = w / w.sum(1, keepdims=True)
    p = bipartite_chain(torch.tensor(a)).numpy()
    assert p.shape == (8, 8)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p[:3, 3:], a)
    assert np.all(p[:3, :3] == 0) and np.all(p[3:, 3:] == 0)
    b = a.T / a.T.sum(1, keepdims=True)
    np.testing.assert_allclose(p[3:, :3], b)
    # period 2: -1 is an eigenvalue; two steps on the queries is the explicit product A B
    ev = np.linalg.eigvals(p)
    assert np.min(np.abs(ev + 1)) < 1e-9
    np.testing.assert_allclose(np.linalg.matrix_power(p, 2)[:3, :3], a @ b, atol=1e-12)


def test_bipartite_chain_unattended_key_batch_and_dtypes():
    a = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]]).repeat(2, 1, 1)
    p = bipartite_chain(a)
    assert p.shape == (2, 5, 5) and p.dtype == torch.float32
    torch.testing.assert_close(p[0, 4, :2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 5))
    assert bipartite_chain(a, dtype=torch.float64).dtype == torch.float64
    ph = bipartite_chain(a.half())
    assert ph.dtype == torch.float32
    torch.testing.assert_close(ph, p)
    with pytest.raises(ValueError, match="Nq, Nk"):
        bipartite_chain(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="negative"):
        bipartite_chain(-a)
    with pytest.raises(ValueError, match="NaN"):
        bipartite_chain(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="not summing to 1"):
        bipartite_chain(torch.ones(2, 3))
    with pytest.raises(ValueError, match="empty"):
        bipartite_chain(torch.ones(0, 3))


# ------------------------------------------------------------------ rollout
def test_rollout_matches_explicit_products():
    rng = np.random.default_rng(3)
    mats = []
    for _ in range(3):
        w = rng.random((4, 4))
        mats.append(w / w.sum(1, keepdims=True))
    r = rollout([torch.tensor(m) for m in mats], residual=0.5)
    assert r.dtype == torch.float64
    r = r.numpy()
    hat = [0.5 * np.eye(4) + 0.5 * m for m in mats]
    np.testing.assert_allclose(r, hat[2] @ hat[1] @ hat[0], atol=1e-12)
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-12)
    # residual = 0 is the plain product; a mapping keeps its order
    r0 = rollout({"a": torch.tensor(mats[0]), "b": torch.tensor(mats[1])}, residual=0.0)
    np.testing.assert_allclose(r0.numpy(), mats[1] @ mats[0], atol=1e-12)
    # residual = 1 is the identity
    np.testing.assert_allclose(rollout([torch.tensor(m) for m in mats], residual=1.0).numpy(),
                               np.eye(4), atol=1e-12)


def test_rollout_batched_float32_and_stacked():
    layers = rand_chain(3, 2, 5, 5, seed=7)  # 3 layers of a batch of 2
    r = rollout(layers)  # a stacked tensor is read as layers along dim 0
    assert r.shape == (2, 5, 5) and r.dtype == torch.float32
    m = [0.5 * np.eye(5) + 0.5 * layers[i].double().numpy() for i in range(3)]
    ref = np.einsum("bij,bjk,bkl->bil", m[2], m[1], m[0])
    np.testing.assert_allclose(r.double().numpy(), ref, atol=1e-5)
    r64 = rollout(list(layers), dtype=torch.float64)
    np.testing.assert_allclose(r64.numpy(), ref, atol=1e-5)


def test_rollout_rejects_bad_input():
    with pytest.raises(ValueError, match="no attention"):
        rollout([])
    with pytest.raises(ValueError, match="square"):
        rollout([torch.ones(2, 3) / 3])
    with pytest.raises(ValueError, match="residual"):
        rollout([torch.eye(3)], residual=1.5)
    with pytest.raises(ValueError, match=r"attentions\[1\].*not summing"):
        rollout([torch.eye(3), torch.ones(3, 3)])
    with pytest.raises(ValueError, match="N = 4"):
        rollout([torch.eye(3), torch.eye(4)])


@pytest.mark.parametrize("atol", [float("nan"), float("inf"), -1e-3, "0.1", True])
def test_check_stochastic_rejects_a_tolerance_that_accepts_anything(atol):
    """Regression (issue 17): atol=nan made every comparison False, so any matrix passed."""
    with pytest.raises(ValueError, match="atol must be"):
        check_stochastic(torch.full((3, 3), 5.0), atol=atol)
    import attnchain as ac  # every entry point with an atol goes through the same row check

    bad = torch.full((2, 3, 3), 5.0)
    for call in (lambda: ac.token_rank(bad, atol=atol), lambda: ac.lambda2(bad, atol=atol),
                 lambda: ac.bounce(bad, start=0, n=1, atol=atol)):
        with pytest.raises(ValueError, match="atol must be"):
            call()
