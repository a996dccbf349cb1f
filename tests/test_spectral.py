"""Tests for attnchain.spectral against float64 numpy eigenvalues and planted block chains."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import adjusted_rand_score

from attnchain.chain import check_stochastic, planted_chain
from attnchain.errors import ConvergenceError
from attnchain.spectral import (K_MAX, choose_bounces, eigenvalues, head_mean, head_weights,
                                lambda2, metastable_states)


def rand_chain(*shape, seed=0, temp=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * temp,
                         -1).to(dtype)


def np_lambda2(A):
    ev = np.abs(np.linalg.eigvals(np.asarray(A, dtype=np.float64)))
    return np.sort(ev, axis=-1)[..., -2]


def block_chain(sizes, inside=0.9, seed=0, perm=True):
    """Chain with planted blocks: mass `inside` stays in the token's block."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    if perm:
        lab = lab[torch.randperm(len(lab), generator=g)]
    same = (lab[:, None] == lab[None, :]).double()
    W = torch.rand(len(lab), len(lab), generator=g, dtype=torch.float64) + 0.5
    In = W * same
    Out = W * (1 - same)
    A = inside * In / In.sum(-1, keepdim=True) + (1 - inside) * Out / Out.sum(-1, keepdim=True)
    return A, lab


def rotating_chain(n, eps=0.1, seed=0):
    """Near-cyclic chain: complex λ2 close to the unit circle."""
    cyc = torch.roll(torch.eye(n, dtype=torch.float64), 1, 1)
    return (1 - eps) * cyc + eps * rand_chain(n, n, seed=seed)


def block_cycle_chain(n, blocks=3, eps=0.2, seed=0):
    """Mass moves from block b to block b + 1: complex λ2 ~ (1 - eps) exp(2πi / blocks), the
    rest of the spectrum near 0 (like attention)."""
    lab = torch.arange(n) * blocks // n
    nxt = (lab[:, None] + 1) % blocks == lab[None, :]
    W = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    T = W * nxt
    return (1 - eps) * T / T.sum(-1, keepdim=True) + eps * rand_chain(n, n, seed=seed + 1)


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_lambda2_vs_numpy_random(method):
    A = torch.cat([rand_chain(3, 40, 40, temp=t, seed=i) for i, t in enumerate((0.5, 2.0, 5.0))])
    ref = np_lambda2(A.numpy())
    got = lambda2(A.float(), method=method)
    assert got.dtype == torch.float32 and got.shape == (9,)
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-4)
    got64 = lambda2(A, method=method, tol=1e-10)
    np.testing.assert_allclose(got64.numpy(), ref, atol=1e-8)


@pytest.mark.parametrize("method", ["dense", "krylov"])
def test_lambda2_complex_and_near_degenerate(method):
    rot = rotating_chain(36, seed=1)
    ev = np.linalg.eigvals(rot.numpy())
    second = ev[np.argsort(-np.abs(ev))[1]]
    assert abs(second.imag) > 0.1  # the test case really has a complex λ2
    # three identical-looking blocks: |λ2| = |λ3| up to tiny differences
    blk, _ = block_chain([12, 12, 12], inside=0.95, seed=2)
    evb = np.sort(np.abs(np.linalg.eigvals(blk.numpy())))[::-1]
    assert evb[1] - evb[2] < 0.05
    A = torch.stack([rot, blk])
    got = lambda2(A, method=method, tol=1e-10)
    np.testing.assert_allclose(got.numpy(), np_lambda2(A.numpy()), atol=1e-7)


def test_lambda2_krylov_large_and_structured():
    # N above the auto threshold, a mixture of block and random chains
    b1, _ = block_chain([100, 80, 120], inside=0.8, seed=3)
    A = torch.stack([b1, rand_chain(300, 300, temp=3.0, seed=4), block_cycle_chain(300, seed=5)])
    ev = np.linalg.eigvals(A[2].numpy())
    assert abs(ev[np.argsort(-np.abs(ev))[1]].imag) > 0.3  # complex λ2
    got, info = lambda2(A.float(), method="auto", return_info=True)
    assert info["passes"] > 0  # auto picked Krylov
    np.testing.assert_allclose(got.numpy(), np_lambda2(A.numpy()), atol=1e-4)


def test_lambda2_krylov_thick_restarts_converge():
    # a random chain: λ2 is a complex pair at the edge of a disc crowded with eigenvalues of
    # nearly the same magnitude, so a 21-dimensional basis must be restarted many times;
    # Krylov-Schur restarts keep an invariant subspace and still converge
    A = rand_chain(300, 300, temp=3.0, seed=4)
    ev = np.sort(np.abs(np.linalg.eigvals(A.numpy())))[::-1]
    assert ev[1] - ev[3] < 0.02
    got, info = lambda2(A, method="krylov", krylov_dim=21, max_restarts=60, return_info=True)
    assert info["products"] > 21 // 3 + 1  # more passes than one basis holds: it restarted
    np.testing.assert_allclose(got.item(), ev[1], atol=1e-5)
    with pytest.raises(ConvergenceError, match="restarts"):
        lambda2(A, method="krylov", krylov_dim=21, max_restarts=2)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), n=st.integers(6, 40), passes=st.integers(1, 8),
       restart=st.integers(1, 6), block=st.integers(1, 3),
       kind=st.sampled_from(["random", "rotating", "block-cycle"]))
def test_krylov_residual_from_the_decomposition_is_the_ritz_residual(seed, n, passes, restart,
                                                                      block, kind):
    # the stopping rule reads ||P A z - θ z|| off the Krylov-Schur coefficients T, F with no
    # length-N work; that is exact only because P A K^T = K^T T + Q^T F holds, also after a
    # thick restart: compare with the residual of z itself, for every Ritz value
    from attnchain._solvers.block_krylov import (leading_schur_rows, new_directions, project,
                                                 ritz_check, zero_mean_rows)
    A = {"random": rand_chain(n, n, seed=seed), "rotating": rotating_chain(n, 0.3, seed),
         "block-cycle": block_cycle_chain(n, seed=seed)}[kind][None]

    def products(X):
        W = X @ A.mT
        return W - W.mean(-1, keepdim=True)
    K = new_directions(zero_mean_rows(block, n, seed, A), A[:, :0], block,
                       torch.ones(1, block, dtype=A.dtype))[0]
    R, H = project(products(K), K)
    Q, F = new_directions(R, K, n - 1 - block, torch.ones(1, block, dtype=A.dtype))
    T, F = H.mT, F.mT
    for p in range(passes):
        m, q = K.shape[-2], Q.shape[-2]
        if not q:
            break
        # the decomposition itself, and the residual of every Ritz vector
        np.testing.assert_allclose(products(K).numpy(), (T.mT @ K + F.mT @ Q).numpy(),
                                   atol=1e-11)
        ev, vecs = torch.linalg.eig(T)
        for i in range(m):
            y = vecs[0, :, i:i + 1]
            Ritz = (y.mT @ K[0].to(y.dtype))
            want = (y.mT @ products(K)[0].to(y.dtype) - ev[0, i] * Ritz).norm().item()
            got = torch.sqrt(((T[0].to(y.dtype) @ y - ev[0, i] * y).norm() ** 2 +
                              (F[0].to(y.dtype) @ y).norm() ** 2)).item()
            assert got == pytest.approx(want, abs=1e-10)
        _, done, value, res = ritz_check(T, F, tol=1e-300)
        assert value.item() == pytest.approx(ev.abs().max().item(), abs=1e-12)
        if p + 1 == restart and m >= 4:  # cut back to the leading Schur vectors
            evs = ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True).indices)
            C = leading_schur_rows(T, evs, m // 2)
            K, T, F = C @ K, C @ T @ C.mT, F @ C.mT
            m = K.shape[-2]
        W = products(Q)
        Kn = torch.cat([K, Q], -2)
        R, H = project(W, Kn)
        Q, Fq = new_directions(R, Kn, n - 1 - m - q, W.norm(dim=-1))
        T = torch.cat([torch.cat([T, H[..., :m].mT], -1), torch.cat([F, H[..., m:].mT], -1)],
                      -2)
        F = torch.cat([F.new_zeros(1, Q.shape[-2], m), Fq.mT], -1)
        K = Kn


def test_lambda2_special_cases():
    cyc = torch.roll(torch.eye(6), 1, 1)  # periodic: all eigenvalues on the unit circle
    red = torch.block_diag(rand_chain(3, 3).float(), rand_chain(4, 4, seed=1).float())
    for m in ("dense", "krylov"):
        torch.testing.assert_close(lambda2(cyc, method=m), torch.tensor(1.0))
        torch.testing.assert_close(lambda2(red, method=m), torch.tensor(1.0), atol=1e-5,
                                   rtol=0)
        assert lambda2(torch.ones(1, 1), method=m) == 0
        A2 = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
        torch.testing.assert_close(lambda2(A2, method=m), torch.tensor(0.3))
    rank1 = torch.full((5, 5), 0.2)  # every row the same: λ2 = 0
    assert lambda2(rank1, method="krylov") < 1e-6


def test_lambda2_errors_and_nonconvergence():
    with pytest.raises(ValueError, match="method"):
        lambda2(rand_chain(4, 4), method="arpack")
    with pytest.raises(ValueError, match="square"):
        lambda2(torch.rand(3, 4))
    with pytest.raises(ValueError, match="negative"):
        lambda2(torch.tensor([[1.5, -0.5], [0.5, 0.5]]))
    with pytest.raises(ConvergenceError, match="did not converge"):
        lambda2(rotating_chain(60, 0.5), method="krylov", krylov_dim=3, max_restarts=1,
                tol=1e-14)


def test_eigenvalues_sorted_vs_numpy():
    A = rand_chain(2, 20, 20, seed=7)
    ev = eigenvalues(A, dtype=torch.float64)
    assert ev.is_complex() and ev.shape == (2, 20)
    for b in range(2):
        ref = np.linalg.eigvals(A[b].numpy())
        ref = ref[np.argsort(-np.abs(ref), kind="stable")]
        np.testing.assert_allclose(np.abs(ev[b].numpy()), np.abs(ref), atol=1e-10)
        # same multiset of eigenvalues
        for z in ref:
            assert np.min(np.abs(ev[b].numpy() - z)) < 1e-9
    assert (ev.abs()[..., :-1] >= ev.abs()[..., 1:] - 1e-12).all()
    np.testing.assert_allclose(ev[..., 0].numpy(), 1.0, atol=1e-10)
    top = eigenvalues(A, k=3)
    assert top.shape == (2, 3)
    with pytest.raises(ValueError, match="k must be"):
        eigenvalues(A, k=21)


def test_head_weights_and_weighted_mean():
    A = rand_chain(2, 4, 16, 16, temp=3.0, seed=8).float()
    w = head_weights(A)
    assert w.shape == (2, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    l2 = np_lambda2(A.double().numpy())
    np.testing.assert_allclose(w.numpy(), l2 / l2.sum(-1, keepdims=True), atol=1e-5)
    M = head_mean(A, "lambda2")
    assert M.shape == (2, 16, 16)
    ref = np.einsum("bh,bhij->bij", l2 / l2.sum(-1, keepdims=True), A.double().numpy())
    np.testing.assert_allclose(M.numpy(), ref, atol=1e-5)
    check_stochastic(M)
    # heads along another dimension
    Ah = A.transpose(0, 1)  # (H, B, N, N)
    torch.testing.assert_close(head_weights(Ah, head_dim=0), w.T)
    torch.testing.assert_close(head_mean(Ah, "lambda2", head_dim=0), M)
    # all heads rank one: λ2 = 0 everywhere -> uniform weights
    flat = torch.full((3, 5, 5), 0.2)
    torch.testing.assert_close(head_weights(flat), torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="head_dim"):
        head_weights(A, head_dim=-2)
    with pytest.raises(ValueError, match="no head dimension"):
        head_weights(A[0, 0])


@pytest.mark.parametrize("sizes", [[10, 14, 8], [20, 5, 9, 12]])
def test_metastable_states_recovers_planted_blocks(sizes):
    A, lab = block_chain(sizes, inside=0.9, seed=len(sizes))
    got, k = metastable_states(A.float(), return_k=True)
    assert int(k) == len(sizes)
    assert adjusted_rand_score(lab.numpy(), got.numpy()) == 1.0
    # groups numbered in order of their first token
    first = [int(np.nonzero(got.numpy() == g)[0][0]) for g in range(len(sizes))]
    assert first == sorted(first)
    given_k = metastable_states(A, k=len(sizes))
    assert adjusted_rand_score(lab.numpy(), given_k.numpy()) == 1.0


def test_metastable_states_batched_and_unstructured():
    A1, l1 = block_chain([8, 8, 8], seed=1)
    A2, l2 = block_chain([12, 12], seed=2)
    A2 = torch.nn.functional.pad(A2, (0, 0, 0, 0))  # same N = 24
    labels, ks = metastable_states(torch.stack([A1, A2]), return_k=True)
    assert ks.tolist() == [3, 2]
    assert adjusted_rand_score(l1.numpy(), labels[0].numpy()) == 1.0
    assert adjusted_rand_score(l2.numpy(), labels[1].numpy()) == 1.0
    # an exactly reducible chain: the closed classes are the states
    red = torch.block_diag(rand_chain(5, 5), rand_chain(7, 7, seed=1))
    r = metastable_states(red)
    assert r.tolist() == [0] * 5 + [1] * 7
    # a fast-mixing chain has no metastable split
    fast = rand_chain(30, 30, temp=0.1, seed=3)
    assert metastable_states(fast).unique().tolist() == [0]
    with pytest.raises(ValueError, match="k must be"):
        metastable_states(fast, k=0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 30), temp=st.floats(0.2, 6.0))
def test_property_lambda2_methods_agree_and_batch(seed, n, temp):
    A = rand_chain(3, n, n, seed=seed, temp=temp)
    ref = np_lambda2(A.numpy())
    dense = lambda2(A, method="dense")
    kry = lambda2(A, method="krylov", tol=1e-10)
    np.testing.assert_allclose(dense.numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(kry.numpy(), ref, atol=1e-6)
    assert ((dense >= 0) & (dense <= 1)).all()
    single = lambda2(A[1], method="krylov", tol=1e-10)
    np.testing.assert_allclose(single.numpy(), ref[1], atol=1e-6)


@pytest.mark.parametrize("fn", [lambda2, eigenvalues, head_weights, lambda A: head_mean(A, "lambda2"),
                                metastable_states])
@pytest.mark.parametrize("bad, match", [
    (torch.full((2, 4, 4), float("nan")), "NaN or Inf"),
    (torch.full((2, 4, 4), -0.25), "negative"),
    (torch.zeros(2, 4, 4), "zero rows"),
    (torch.full((2, 4, 4), 0.3), "not summing to 1"),
    (torch.full((2, 4, 3), 1 / 3), "square"),
])
def test_every_function_rejects_bad_input(fn, bad, match):
    with pytest.raises(ValueError, match=match):
        fn(bad)


def test_half_precision_input_is_upcast():
    A = rand_chain(2, 24, 24, seed=3, dtype=torch.float16)
    ref = np_lambda2(A.double().numpy())
    for m in ("dense", "krylov"):
        got = lambda2(A, method=m)
        assert got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-2)
    assert head_mean(A[None], "lambda2").dtype == torch.float32


# ------------------------------------------------------------------ choose_bounces
def np_choose_bounces(a, eps=0.1, max_bounces=10, k_max=K_MAX):
    """numpy float64 reference of the rule."""
    ev = np.sort(np.abs(np.linalg.eigvals(np.asarray(a, dtype=np.float64))))[::-1]
    kk = min(k_max + 1, len(ev))
    gaps = ev[: kk - 1] - ev[1:kk]
    k = int(np.argmax(gaps)) + 1
    if k == 1:
        return 1
    return int(np.clip(np.ceil(np.log(eps) / np.log(ev[k])), 1, max_bounces))


def test_choose_bounces_matches_formula():
    a, _ = planted_chain([10, 10, 10], leak=0.05, concentration=0.3, seed=4, dtype=torch.float64)
    ev = np.sort(np.abs(np.linalg.eigvals(a.numpy())))[::-1]
    k = int(np.argmax(ev[:K_MAX] - ev[1:K_MAX + 1])) + 1
    assert k == 3
    expect = int(np.clip(np.ceil(np.log(0.1) / np.log(ev[k])), 1, 10))
    assert expect > 1
    out = choose_bounces(a)
    assert out.dtype == torch.long and out.shape == () and int(out) == expect
    assert int(choose_bounces(a.float())) == expect
    assert int(choose_bounces(a, eps=0.01, max_bounces=50)) == np_choose_bounces(a, 0.01, 50)
    # batched, and a structureless chain (uniform rows: |λ2| = 0, k = 1) gets row select
    u = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    both = choose_bounces(torch.stack([a[:6, :6] / a[:6, :6].sum(-1, keepdim=True), u]))
    assert both.shape == (2,) and int(both[1]) == 1


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), leak=st.floats(0.01, 0.3), conc=st.floats(0.1, 2.0),
       eps=st.floats(0.01, 0.5), max_bounces=st.integers(1, 20))
def test_choose_bounces_property_against_numpy(seed, leak, conc, eps, max_bounces):
    a, _ = planted_chain([4, 5, 6], leak=leak, concentration=conc, shuffle=True, seed=seed,
                         dtype=torch.float64)
    ev = np.sort(np.abs(np.linalg.eigvals(a.numpy())))[::-1]
    gaps = (ev[:-1] - ev[1:])[:K_MAX]  # the drops the rule looks at
    if np.sort(gaps)[-1] - np.sort(gaps)[-2] < 1e-6:  # a tie for the largest drop: ambiguous
        return
    got = int(choose_bounces(a, eps=eps, max_bounces=max_bounces, dtype=torch.float64))
    assert 1 <= got <= max_bounces
    assert got == np_choose_bounces(a, eps, max_bounces)


def test_choose_bounces_edge_cases_and_bad_input():
    assert int(choose_bounces(torch.ones(1, 1))) == 1  # N = 1: nothing to bounce over
    assert choose_bounces(torch.ones(3, 1, 1)).shape == (3,)
    a = rand_chain(4, 4)
    for kw, msg in [(dict(eps=1.5), "eps"), (dict(eps=0.0), "eps"), (dict(max_bounces=0), "max_bounces"),
                    (dict(k_max=0), "k_max"), (dict(max_bounces=2.5), "max_bounces")]:
        with pytest.raises(ValueError, match=msg):
            choose_bounces(a, **kw)
    with pytest.raises(ValueError, match="square"):
        choose_bounces(torch.ones(2, 3) / 3)
    with pytest.raises(ValueError, match="not summing"):
        choose_bounces(torch.ones(3, 3))
