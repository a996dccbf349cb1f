"""Krylov |λ2|: per-matrix stopping, cache-sized groups and the group-wise input check."""
import numpy as np
import pytest
import torch

import attnchain.spectral as spectral
from attnchain.spectral import lambda2


def rand_chain(*shape, seed=0, temp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * temp, -1)


def np_lambda2(A):
    ev = np.abs(np.linalg.eigvals(np.asarray(A, dtype=np.float64)))
    return np.sort(ev, axis=-1)[..., -2]


def mixed_batch():
    # fast-mixing (small |λ2|) and slow-mixing (large |λ2|) chains in one batch
    return torch.stack([rand_chain(60, 60, temp=t, seed=i)
                        for i, t in enumerate((0.3, 4.0, 0.5, 6.0, 1.0))])


def test_groups_do_not_change_results(monkeypatch):
    A = mixed_batch()
    ref = np_lambda2(A.numpy())
    whole, info = lambda2(A, method="krylov", tol=1e-10, return_info=True)
    monkeypatch.setattr(spectral, "KRYLOV_GROUP_BYTES", 1)  # one matrix per group
    single, info1 = lambda2(A, method="krylov", tol=1e-10, return_info=True)
    monkeypatch.setattr(spectral, "KRYLOV_GROUP_BYTES", 2 * A[0].numel() * 8)  # groups of 2
    pairs = lambda2(A, method="krylov", tol=1e-10)
    for got in (whole, single, pairs):
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-8)
    np.testing.assert_allclose(single.numpy(), whole.numpy(), atol=1e-12)
    assert info["products"] == info1["products"]


def test_each_matrix_stops_on_its_own():
    A = mixed_batch()
    _, info = lambda2(A, method="krylov", tol=1e-8, return_info=True)
    per = [lambda2(A[i], method="krylov", tol=1e-8, return_info=True)[1]["products"]
           for i in range(len(A))]
    assert info["products"] == sum(per)  # frozen matrices are not read again
    assert min(per) < max(per)  # the fast chains really stopped earlier
    assert info["passes"] == pytest.approx(sum(per) / len(A), abs=0.006)


@pytest.mark.parametrize("value, match", [(-0.1, r"negative entries .*index \(3, 5, 7\)"),
                                          (float("nan"), r"NaN or Inf .*index \(3, 5, 7\)")])
def test_bad_matrix_in_a_later_group_named_in_whole_batch(monkeypatch, value, match):
    A = mixed_batch().float()
    A[3, 5, 7] = value
    monkeypatch.setattr(spectral, "KRYLOV_GROUP_BYTES", 1)
    with pytest.raises(ValueError, match=match):
        lambda2(A, method="krylov")
    B = mixed_batch().float()
    B[4, 2] *= 1.01
    with pytest.raises(ValueError, match=r"not summing to 1 .*index \(4, 2\)"):
        lambda2(B, method="krylov")


def test_token_rank_groups_do_not_change_results(monkeypatch):
    import attnchain.stationary as stationary
    from attnchain.stationary import stationary_dense, token_rank
    A = mixed_batch()
    exact = torch.stack([stationary_dense(a) for a in A])
    whole, info = token_rank(A, tol=1e-12, return_info=True)
    monkeypatch.setattr(stationary, "TOKEN_RANK_GROUP_BYTES", 2 * A[0].numel() * 8)  # 2 per group
    grouped, ginfo = token_rank(A, tol=1e-12, return_info=True)
    for got in (whole, grouped):
        assert (got - exact).abs().sum(-1).max() < 1e-10
    per = [token_rank(A[s:s + 2], tol=1e-12, return_info=True)[1]["passes"] for s in (0, 2, 4)]
    assert ginfo["passes"] == pytest.approx((2 * per[0] + 2 * per[1] + per[2]) / 5, abs=0.006)
    assert (ginfo["residual"] < 1e-12).all()
    A32 = A.float()
    A32[3, 5, 7] = -0.1
    with pytest.raises(ValueError, match=r"negative entries .*index \(3, 5, 7\)"):
        token_rank(A32)
    A32[3, 5, 7] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or Inf .*index \(3, 5, 7\)"):
        token_rank(A32)
