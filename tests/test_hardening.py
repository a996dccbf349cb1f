"""Regression tests of the adversarial review (issue 17): each failed on the code before its fix.

Wrong answers (TokenRank at alpha = 1 on nearly reducible chains, gradients), empty batches,
and inputs that crashed with torch's own errors instead of a ValueError that names the problem.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attnchain as ac
from attnchain.errors import ConvergenceError
from attnchain.operators import DenseChain, SourceChain


def nearly_reducible(coupling, dtype=torch.float64):
    """Two blocks of two states; block 1 leaks ``coupling`` into block 2, block 2 three times
    as much back: the true pi puts 3/4 of the mass on block 1, far from uniform."""
    A = torch.zeros(4, 4, dtype=dtype)
    A[:2, :2] = 0.5
    A[2:, 2:] = 0.5
    A[0, 2], A[0, 0] = coupling, 0.5 - coupling
    A[2, 1], A[2, 2] = 3 * coupling, 0.5 - 3 * coupling
    return A


@pytest.mark.parametrize("coupling", [1e-4, 1e-6, 1e-8])
def test_token_rank_alpha_one_certified_on_nearly_reducible_chains(coupling):
    A = nearly_reducible(coupling)
    exact = ac.stationary_dense(A, alpha=1.0)
    assert exact[:2].sum() == pytest.approx(0.75, abs=1e-4)
    pi = ac.token_rank(A, alpha=1.0, dtype=torch.float64)
    assert (pi - exact).abs().sum() < 1e-6  # the step-change rule alone gave 0.03 to 0.5
    pi32 = ac.token_rank(A.float(), alpha=1.0)  # float32 cannot certify it: solved in float64
    assert pi32.dtype == torch.float32 and (pi32.double() - exact).abs().sum() < 1e-6
    try:  # power iteration needs ~1/coupling passes: either certified or an honest error
        pw = ac.token_rank(A, alpha=1.0, method="power", dtype=torch.float64)
        assert (pw - exact).abs().sum() < 1e-6
    except ConvergenceError as err:
        assert err.passes == 1000


@settings(max_examples=25, deadline=None)
@given(n1=st.integers(2, 12), n2=st.integers(2, 12), log_c=st.floats(-9, -2),
       seed=st.integers(0, 10 ** 6))
def test_token_rank_alpha_one_within_tol_of_dense(n1, n2, log_c, seed):
    """Random two-block chains with weak, asymmetric coupling (property test)."""
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.softmax(torch.randn(n, n, generator=g, dtype=torch.float64), -1)
              for n in (n1, n2)]
    A = torch.block_diag(*blocks)
    c = 10.0 ** log_c
    A[:n1, n1:] += c * torch.rand(n1, n2, generator=g, dtype=torch.float64)
    A[n1:, :n1] += 5 * c * torch.rand(n2, n1, generator=g, dtype=torch.float64)
    A = A / A.sum(-1, keepdim=True)
    exact = ac.stationary_dense(A, alpha=1.0)
    try:
        pi = ac.token_rank(A, alpha=1.0, dtype=torch.float64)
    except ConvergenceError as err:  # allowed only where float64 cannot certify
        assert "mixes too slowly" in str(err)
        return
    assert (pi - exact).abs().sum() < 1e-6


def test_token_rank_alpha_one_refuses_what_float64_cannot_certify():
    with pytest.raises(ConvergenceError, match="mixes too slowly"):
        ac.token_rank(nearly_reducible(1e-12), alpha=1.0, dtype=torch.float64)


@pytest.mark.parametrize("method", ["krylov", "power"])
@pytest.mark.parametrize("alpha", [0.85, 0.99, 1.0])
def test_token_rank_gradient_is_the_dense_solve_gradient(method, alpha):
    g = torch.Generator().manual_seed(1)
    A0 = torch.softmax(torch.randn(3, 7, 7, generator=g, dtype=torch.float64), -1)
    p0 = torch.rand(7, generator=g, dtype=torch.float64)
    w = torch.randn(3, 7, generator=g, dtype=torch.float64)
    grads = []
    for fn in (lambda a, p: ac.token_rank(a, alpha, p, tol=1e-12, method=method),
               lambda a, p: ac.stationary_dense(a, alpha, p)):
        A, p = A0.clone().requires_grad_(), p0.clone().requires_grad_()
        (fn(A, p) * w).sum().backward()
        grads.append((A.grad, p.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-10, rtol=0)
    if alpha < 1:
        torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("alpha", [0.9, 1.0])
def test_token_rank_gradcheck_through_softmax(alpha):
    """Finite differences on the logits: perturbations that keep A row-stochastic."""
    g = torch.Generator().manual_seed(2)
    L = torch.randn(2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    p = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda l, q: ac.token_rank(torch.softmax(l, -1), alpha, q, tol=1e-13), (L, p))


def test_gradients_refused_where_there_are_none():
    L = torch.randn(2, 300, 300, requires_grad=True)
    with pytest.raises(ValueError, match="has no gradient"):
        ac.lambda2(torch.softmax(L, -1), method="krylov")
    S = SourceChain(DenseChain(torch.softmax(L[:, :5, :5], -1)))
    with pytest.raises(ValueError, match="differentiates through a tensor A or a DenseChain"):
        ac.token_rank(S)
    with torch.no_grad():
        ac.token_rank(S)  # no gradient asked for: fine


ZERO = torch.zeros(0, 6, 6)
EMPTY_RESULTS = {
    "token_rank": (lambda: ac.token_rank(ZERO), (0, 6)),
    "token_rank power": (lambda: ac.token_rank(ZERO, method="power"), (0, 6)),
    "token_rank dense": (lambda: ac.token_rank(ZERO, method="dense"), (0, 6)),
    "stationary_dense": (lambda: ac.stationary_dense(ZERO), (0, 6)),
    "bounce": (lambda: ac.bounce(ZERO, 0, 3), (0, 4, 6)),
    "lambda2": (lambda: ac.lambda2(ZERO), (0,)),
    "lambda2 krylov": (lambda: ac.lambda2(ZERO, method="krylov"), (0,)),
    "lambda2 krylov N=300": (lambda: ac.lambda2(torch.zeros(2, 0, 300, 300)), (2, 0)),
    "eigenvalues": (lambda: ac.eigenvalues(ZERO), (0, 6)),
    "damped": (lambda: ac.damped(ZERO), (0, 6, 6)),
    "source_chain": (lambda: ac.source_chain(ZERO), (0, 6, 6)),
    "bipartite_chain": (lambda: ac.bipartite_chain(ZERO), (0, 12, 12)),
    "metastable_states": (lambda: ac.metastable_states(ZERO, 2), (0, 6)),
    "choose_bounces": (lambda: ac.choose_bounces(ZERO), (0,)),
}


@pytest.mark.parametrize("name", list(EMPTY_RESULTS))
def test_zero_heads_give_empty_results(name):
    fn, shape = EMPTY_RESULTS[name]
    assert tuple(fn().shape) == shape
    ac.check_stochastic(ZERO)  # nothing to reject


@pytest.mark.parametrize("fn", [ac.head_weights, ac.head_mean])
def test_zero_heads_cannot_be_averaged(fn):
    with pytest.raises(ValueError, match="has no heads"):
        fn(ZERO)


def test_batch_shapes_that_do_not_broadcast_are_named():
    A = torch.softmax(torch.randn(3, 6, 6), -1)
    with pytest.raises(ValueError, match=r"batch shape \(2,\) of personalization does not "
                                         r"broadcast with the batch shape \(3,\) of A"):
        ac.token_rank(A, personalization=torch.ones(2, 6))
    with pytest.raises(ValueError, match="of personalization does not broadcast"):
        ac.stationary_dense(A, personalization=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"batch shape \(2,\) of start does not broadcast"):
        ac.bounce(A, torch.ones(2, 6) / 6, 3)


@pytest.mark.parametrize("N", [5, 300])
def test_errors_name_the_callers_index(N):
    X = torch.softmax(torch.randn(2, 3, N, N), -1)
    X[1, 2, 3, 4] = float("nan")
    for fn in (ac.check_stochastic, ac.token_rank, ac.lambda2, ac.damped,
               lambda a: ac.lambda2(a, method="krylov"), lambda a: ac.bounce(a, 0, 2)):
        with pytest.raises(ValueError, match=r"first at index \(1, 2, 3, 4\)"):
            fn(X)
    Y = torch.softmax(torch.randn(2, 3, N, N), -1)
    Y[1, 2, 3] *= 2
    with pytest.raises(ValueError, match=r"first at batch/row index \(1, 2, 3\)"):
        ac.token_rank(Y)


def test_start_in_small_dtypes():
    A = torch.softmax(torch.randn(6, 6), -1)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        out = ac.bounce(A, torch.tensor(2, dtype=dtype), 1)
        torch.testing.assert_close(out[-1], A[2])
    third = torch.full((3,), 1 / 3).half()  # sums to 0.99976 in float16
    out = ac.bounce(torch.softmax(torch.randn(3, 3), -1), third, 1)
    torch.testing.assert_close(out[0].sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="does not sum to 1"):
        ac.bounce(A, torch.full((6,), 0.2).half(), 1)


def test_weights_whose_row_sums_overflow():
    x = torch.full((3, 3), 3e38)
    x[0, 0] = 1e38
    A = ac.to_stochastic(x, kind="weights")
    torch.testing.assert_close(A[0], torch.tensor([1.0, 3.0, 3.0]) / 7)
    torch.testing.assert_close(A.sum(-1), torch.ones(3))


def test_planted_chain_sizes_and_small_concentration():
    with pytest.raises(ValueError, match="sizes must be a sequence of positive ints"):
        ac.planted_chain([2.5, 3])
    with pytest.raises(ValueError, match="sizes must be a sequence of positive ints"):
        ac.planted_chain([True, 3])
    import numpy as np
    assert ac.planted_chain(np.array([2, 3]))[0].shape == (5, 5)
    A, _ = ac.planted_chain([4, 4], leak=0.0, concentration=1e-3, seed=0)
    assert bool((A.amax(-1) > 0.99).all())  # Dirichlet(0.001) rows are nearly one-hot
    A, _ = ac.planted_chain([4, 4], leak=0.2, concentration=1e-3, seed=0)
    torch.testing.assert_close(A[:, 4:].sum(-1)[:4], torch.full((4,), 0.2))
