"""Chain operators: DenseChain gives the tensor call's results bit for bit; DampedChain and
SourceChain match explicit dense matrices; operators that are not dense inside (a circulant
chain multiplied with torch.roll, a low-rank-plus-diagonal chain) work with bounce, token_rank
and lambda2 and match float64 references (numpy matrix powers and eigenvalues, networkx)."""
import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnchain as ac
from attnchain.operators import ChainOperator, DampedChain, DenseChain, SourceChain, as_operator


def rand_chain(*shape, seed=0, temp=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * temp,
                         -1).to(dtype)


def identical(a, b):
    """Bit-identical tensors (or tuples/dicts of them)."""
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------ toy operators, not dense
class CirculantChain(ChainOperator):
    """A_ij = w[(j - i) mod N]: a random walk on a ring of N tokens, step s with probability
    w_s. Products are sums of torch.roll; the N x N matrix is never stored."""

    def __init__(self, w):
        self.w = w / w.sum(-1, keepdim=True)  # (..., N)
        self.n, self.batch_shape = w.shape[-1], w.shape[:-1]
        self.dtype, self.device = w.dtype, w.device

    def left(self, X):  # (X A)_j = sum_s w_s X_{j - s}
        w = self.w.unsqueeze(-2)  # (..., 1, N): broadcasts over the k rows of X
        return sum(w[..., s:s + 1] * torch.roll(X, s, -1) for s in range(self.n))

    def right(self, X):  # (A X)_i = sum_s w_s X_{i + s}
        w = self.w.unsqueeze(-1)  # (..., N, 1)
        return sum(w[..., s:s + 1, :] * torch.roll(X, -s, -2) for s in range(self.n))

    def map_batch(self, fn):
        return CirculantChain(fn(self.w, 1))

    def matrix(self):
        N = self.n
        idx = (torch.arange(N)[None, :] - torch.arange(N)[:, None]) % N
        return self.w[..., idx]


class LowRankChain(ChainOperator):
    """A = D + (I - D) R C^T with D = diag(d), 0 <= d < 1: R (N, r) rows are distributions over
    r "topics", C (N, r) columns distributions over tokens, so rows sum to d_i + (1 - d_i) = 1.
    Products cost O(N r), never O(N^2)."""

    def __init__(self, R, C, d):
        self.R, self.C, self.d = R, C, d  # (..., N, r), (..., N, r), (..., N)
        self.n, self.batch_shape = R.shape[-2], R.shape[:-2]
        self.dtype, self.device = R.dtype, R.device

    def left(self, X):
        d = self.d.unsqueeze(-2)
        return X * d + ((X * (1 - d)) @ self.R) @ self.C.mT

    def right(self, X):
        d = self.d.unsqueeze(-1)
        return d * X + (1 - d) * (self.R @ (self.C.mT @ X))

    def map_batch(self, fn):
        return LowRankChain(fn(self.R, 2), fn(self.C, 2), fn(self.d, 1))

    def matrix(self):
        d = self.d.unsqueeze(-1)
        return torch.diag_embed(self.d) + (1 - d) * (self.R @ self.C.mT)


def circulant(*batch, N=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return CirculantChain(torch.rand(*batch, N, generator=g, dtype=torch.float64) ** 3)


def low_rank(*batch, N=30, r=4, stay=0.6, seed=0):
    """A low-rank-plus-diagonal chain; the diagonal is uniform on [0, stay)."""
    g = torch.Generator().manual_seed(seed)
    R = torch.softmax(3 * torch.randn(*batch, N, r, generator=g, dtype=torch.float64), -1)
    C = torch.softmax(3 * torch.randn(*batch, N, r, generator=g, dtype=torch.float64), -2)
    d = stay * torch.rand(*batch, N, generator=g, dtype=torch.float64)
    return LowRankChain(R, C, d)


TOYS = {"circulant": lambda: circulant(2, N=12, seed=1), "low-rank": lambda: low_rank(3, seed=2)}


def nx_pagerank(a, alpha, p=None):
    G = nx.DiGraph()
    G.add_nodes_from(range(a.shape[0]))
    for i, j in zip(*np.nonzero(a)):
        G.add_edge(int(i), int(j), weight=float(a[i, j]))
    pers = None if p is None else {i: float(p[i]) for i in range(len(p))}
    pr = nx.pagerank(G, alpha=alpha, personalization=pers, tol=1e-14, max_iter=100000)
    return np.array([pr[i] for i in range(a.shape[0])])


def np_lambda2(a):
    ev = np.abs(np.linalg.eigvals(np.asarray(a, dtype=np.float64)))
    return np.sort(ev, axis=-1)[..., -2]


# ------------------------------------------------------------------ DenseChain == tensor
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("direction", ["sink", "source"])
def test_bounce_dense_chain_is_the_tensor_call(dtype, direction):
    A = rand_chain(2, 3, 9, 9, seed=1, dtype=dtype)
    for start in (4, torch.tensor([[0, 1, 8], [2, 3, 4]]), torch.full((9,), 1 / 9, dtype=dtype)):
        assert identical(ac.bounce(DenseChain(A), start, 5, direction=direction),
                         ac.bounce(A, start, 5, direction=direction))


@pytest.mark.parametrize("method", ["krylov", "power", "dense"])
@pytest.mark.parametrize("alpha", [0.85, 1.0])
def test_token_rank_dense_chain_is_the_tensor_call(method, alpha):
    A = rand_chain(4, 40, 40, seed=2, temp=3.0, dtype=torch.float32)
    P = torch.eye(40)[:3, None]  # (3, 1, 40): broadcasts against the batch of 4
    for kw in ({}, {"personalization": P}, {"dtype": torch.float32}):
        want = ac.token_rank(A, alpha=alpha, method=method, return_info=True, **kw)
        got = ac.token_rank(DenseChain(A), alpha=alpha, method=method, return_info=True, **kw)
        assert identical(got[0], want[0]) and identical(got[1]["residual"], want[1]["residual"])
        assert got[1]["passes"] == want[1]["passes"]


def test_token_rank_dense_chain_in_cache_groups(monkeypatch):
    import attnchain.stationary as stationary
    A = rand_chain(5, 30, 30, seed=3)
    monkeypatch.setattr(stationary, "TOKEN_RANK_GROUP_BYTES", 2 * 30 * 30 * 8)  # 2 per group
    assert identical(ac.token_rank(DenseChain(A), return_info=True)[0],
                     ac.token_rank(A, return_info=True)[0])


@pytest.mark.parametrize("method", ["krylov", "dense", "auto"])
def test_lambda2_dense_chain_is_the_tensor_call(method, monkeypatch):
    import attnchain.spectral as spectral
    A = torch.cat([rand_chain(3, 60, 60, temp=t, seed=i, dtype=torch.float32)
                   for i, t in enumerate((0.5, 3.0))])
    assert identical(ac.lambda2(DenseChain(A), method=method, return_info=True),
                     ac.lambda2(A, method=method, return_info=True))
    monkeypatch.setattr(spectral, "KRYLOV_GROUP_BYTES", 1)  # one matrix per group
    assert identical(ac.lambda2(DenseChain(A), method=method), ac.lambda2(A, method=method))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 30), b=st.integers(1, 3),
       temp=st.floats(0.2, 5.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_dense_chain_is_the_tensor_call(seed, n, b, temp, dtype):
    A = rand_chain(b, n, n, seed=seed, temp=temp, dtype=dtype)
    op, tol = DenseChain(A), 1e-6 if dtype == torch.float32 else 1e-10
    assert identical(ac.token_rank(op, tol=tol), ac.token_rank(A, tol=tol))
    assert identical(ac.lambda2(op, method="krylov"), ac.lambda2(A, method="krylov"))
    assert identical(ac.bounce(op, 0, 3), ac.bounce(A, 0, 3))


def test_dense_chain_checks_and_half_precision():
    A = rand_chain(2, 6, 6, seed=4, dtype=torch.float16)
    op = DenseChain(A)
    assert op.dtype == torch.float32
    torch.testing.assert_close(op.A.sum(-1), torch.ones(2, 6))
    with pytest.raises(ValueError, match="not summing to 1"):
        DenseChain(torch.ones(3, 3))
    with pytest.raises(ValueError, match="square"):
        DenseChain(torch.ones(3, 2) / 2)
    with pytest.raises(ValueError, match="dtype"):
        ac.token_rank(DenseChain(rand_chain(4, 4, dtype=torch.float32)), dtype=torch.float64)
    assert as_operator(op) is op


def test_batch_views_of_an_operator():
    A = rand_chain(2, 3, 5, 5, seed=5)
    op = DenseChain(A)
    assert tuple(op.reshape(-1).batch_shape) == (6,)
    assert torch.equal(op.reshape(-1)[4].dense(), A[1, 1])
    assert torch.equal(op[1].dense(), A[1])
    assert tuple(DenseChain(A[0, 0]).expand(4).batch_shape) == (4,)
    assert "DenseChain(n=5" in repr(op)


# ------------------------------------------------------------------ DampedChain, SourceChain
def test_damped_chain_against_the_explicit_matrix():
    A = rand_chain(3, 7, 7, seed=6)
    p = torch.rand(2, 1, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    G = DampedChain(A, 0.8, p)  # p's batch (2, 1) broadcasts with A's (3,)
    assert tuple(G.batch_shape) == (2, 3)
    a, pn = A.numpy(), (p / p.sum(-1, keepdim=True)).numpy()
    ref = 0.8 * a[None] + 0.2 * pn[..., None, :]  # alpha A + (1 - alpha) 1 p^T, explicit
    np.testing.assert_allclose(G.dense().numpy(), ref, atol=1e-14)
    np.testing.assert_allclose(ac.damped(A, 0.8, p).numpy(), ref, atol=1e-14)
    X = torch.rand(2, 3, 4, 7, dtype=torch.float64)
    np.testing.assert_allclose(G.left(X).numpy(), X.numpy() @ ref, atol=1e-13)
    np.testing.assert_allclose(G.right(X.mT).numpy(), ref @ X.mT.numpy(), atol=1e-13)
    ac.check_stochastic(G.dense())
    assert torch.equal(DampedChain(A, 1.0).dense(), A)
    with pytest.raises(ValueError, match="alpha"):
        DampedChain(A, 1.5)
    with pytest.raises(ValueError, match="last dim"):
        DampedChain(A, 0.5, torch.ones(6))


def test_source_chain_against_the_normalised_transpose():
    A = rand_chain(2, 8, 8, seed=7)
    a = A.numpy()
    S_ref = np.swapaxes(a / a.sum(-2, keepdims=True), -1, -2)  # column-normalised A^T
    for op in (SourceChain(A), SourceChain(DampedChain(A, 1.0))):  # dense, and products only
        np.testing.assert_allclose(op.dense().numpy(), S_ref, atol=1e-14)
        X = torch.rand(2, 3, 8, dtype=torch.float64)
        np.testing.assert_allclose(op.left(X).numpy(), X.numpy() @ S_ref, atol=1e-13)
        np.testing.assert_allclose(op.right(X.mT).numpy(), S_ref @ X.mT.numpy(), atol=1e-13)
        np.testing.assert_allclose(op.colsum.numpy(), a.sum(-2), atol=1e-14)
    np.testing.assert_allclose(ac.source_chain(A).numpy(), S_ref, atol=1e-14)
    with pytest.raises(ValueError, match="zero columns"):
        SourceChain(torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.3, 0.7, 0.0]]))


def test_source_of_a_non_dense_operator_is_never_transposed_densely():
    toy = low_rank(2, seed=8)
    S = SourceChain(toy)
    assert S._S is None  # the products come from toy.left / toy.right alone
    a = toy.matrix().numpy()
    np.testing.assert_allclose(S.dense().numpy(),
                               np.swapaxes(a / a.sum(-2, keepdims=True), -1, -2), atol=1e-13)


# ------------------------------------------------------------------ toys: not dense inside
@pytest.mark.parametrize("toy", TOYS)
def test_toy_operator_products_match_its_matrix(toy):
    op = TOYS[toy]()
    M = op.matrix()
    X = torch.rand(*op.batch_shape, 3, op.n, dtype=torch.float64)
    torch.testing.assert_close(op.left(X), X @ M, atol=1e-13, rtol=0)
    torch.testing.assert_close(op.right(X.mT), M @ X.mT, atol=1e-13, rtol=0)
    torch.testing.assert_close(M.sum(-1), torch.ones(op.batch_shape + (op.n,),
                                                     dtype=torch.float64))


@pytest.mark.parametrize("toy", TOYS)
@pytest.mark.parametrize("direction", ["sink", "source"])
def test_bounce_on_a_toy_operator(toy, direction):
    op = TOYS[toy]()
    a = op.matrix().numpy()
    P = a if direction == "sink" else np.swapaxes(a / a.sum(-2, keepdims=True), -1, -2)
    out = ac.bounce(op, 1, 6, direction=direction)
    for k in range(7):
        ref = np.eye(op.n)[1] @ np.linalg.matrix_power(P, k)
        np.testing.assert_allclose(out[..., k, :].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("toy", TOYS)
@pytest.mark.parametrize("method", ["krylov", "power", "dense"])
def test_token_rank_on_a_toy_operator(toy, method):
    op = TOYS[toy]()
    a = op.matrix().numpy()
    p = torch.rand(op.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for alpha, pers in ((0.85, None), (0.99, p)):
        pi = ac.token_rank(op, alpha=alpha, personalization=pers, tol=1e-12, method=method)
        for b in range(op.batch_shape[0]):
            ref = nx_pagerank(a[b], alpha, None if pers is None else pers.numpy())
            assert np.abs(pi[b].numpy() - ref).sum() < 1e-9


def test_token_rank_of_a_circulant_chain_is_uniform():
    op = circulant(3, N=9, seed=2)  # doubly stochastic: uniform stationary law
    for method in ("krylov", "power", "dense"):
        torch.testing.assert_close(ac.token_rank(op, alpha=1.0, method=method, tol=1e-12),
                                   torch.full((3, 9), 1 / 9, dtype=torch.float64))


@pytest.mark.parametrize("toy", TOYS)
@pytest.mark.parametrize("method", ["krylov", "dense"])
def test_lambda2_on_a_toy_operator(toy, method):
    op = TOYS[toy]()
    got = ac.lambda2(op, method=method, tol=1e-10)
    np.testing.assert_allclose(got.numpy(), np_lambda2(op.matrix().numpy()), atol=1e-8)


def test_lambda2_toy_members_stop_on_their_own():
    # a batch of chains mixing at different speeds: the members that stop early are left out
    # of later products through sub-batches op[i] of the flat operator
    parts = [low_rank(N=40, r=4, stay=stay, seed=s)
             for s, stay in enumerate([0.1, 0.95, 0.5, 0.99])]
    op = LowRankChain(*(torch.stack([getattr(p, a) for p in parts]) for a in "RCd"))
    got, info = ac.lambda2(op, method="krylov", tol=1e-10, return_info=True)
    np.testing.assert_allclose(got.numpy(), np_lambda2(op.matrix().numpy()), atol=1e-8)
    per = [ac.lambda2(op[i], method="krylov", tol=1e-10, return_info=True)[1]["products"]
           for i in range(4)]
    assert info["products"] == sum(per) and min(per) < max(per)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(4, 40), r=st.integers(1, 5),
       stay=st.floats(0.0, 0.95))
def test_property_low_rank_chain_against_dense_references(seed, n, r, stay):
    op = low_rank(N=n, r=r, stay=stay, seed=seed)
    a = op.matrix()
    torch.testing.assert_close(ac.token_rank(op, tol=1e-12), ac.stationary_dense(a),
                               atol=1e-10, rtol=0)
    torch.testing.assert_close(ac.bounce(op, 0, 3), ac.bounce(a, 0, 3), atol=1e-12, rtol=0)
    np.testing.assert_allclose(ac.lambda2(op, method="krylov", tol=1e-10).item(),
                               np_lambda2(a.numpy()), atol=1e-7)
