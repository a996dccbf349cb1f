"""The read-outs against explicit references: indexing, matrix powers, networkx PageRank."""
import networkx as nx
import numpy as np
import pytest
import torch

import attnchain as ac
from attnchain.tasks import readouts as ro


def _chains(B=3, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(B, N, N, generator=g, dtype=torch.float64), -1)


def test_row_and_column_select_are_rows_and_normalised_columns():
    A = _chains()
    targets = [5, 1, 2]
    for i in range(6):
        assert torch.equal(ro.row_select(A, i), A[:, i])
        assert torch.equal(ro.row_select(A, i, targets), A[:, i][:, targets])
        col = A[:, :, i] / A[:, :, i].sum(-1, keepdim=True)
        torch.testing.assert_close(ro.column_select(A, i), col)
        torch.testing.assert_close(ro.column_select(A, i, targets), col[:, targets])
    starts = torch.tensor([4, 0, 2])  # one start per chain
    assert torch.equal(ro.row_select(A, starts), torch.stack([A[b, s] for b, s in enumerate(starts)]))
    assert torch.equal(ro.row_select(A, -1), A[:, 5])
    for bad in (6, torch.tensor([0.5]), torch.tensor([7])):
        with pytest.raises(ValueError):
            ro.row_select(A, bad)
    with pytest.raises(ValueError):
        ro.row_select(A * 2, 0)  # not row-stochastic


def test_column_sum():
    A = _chains()
    assert torch.equal(ro.column_sum(A), A.sum(-2))
    torch.testing.assert_close(ro.column_sum(A, [3, 0]), A.sum(-2)[:, [3, 0]])
    with pytest.raises(ValueError, match="targets"):
        ro.column_sum(A, [6])


@pytest.mark.parametrize("direction", ["sink", "source"])
def test_bounce_maps_are_matrix_powers(direction):
    A = _chains()
    P = A if direction == "sink" else (A / A.sum(-2, keepdim=True)).transpose(-1, -2)
    v = ro.bounce_maps(A, 2, 4, direction=direction)
    assert v.shape == (3, 5, 6)
    for n in range(5):
        torch.testing.assert_close(v[:, n], torch.linalg.matrix_power(P, n)[:, 2])
    torch.testing.assert_close(ro.bounce_maps(A, 2, 4, direction=direction, targets=[0, 4]),
                               v[..., [0, 4]])
    if direction == "sink":
        torch.testing.assert_close(v[:, 1], ro.row_select(A, 2))
    else:
        torch.testing.assert_close(v[:, 1], ro.column_select(A, 2))


def test_token_rank_map_against_networkx_and_the_dense_reference():
    A = _chains(B=2)
    pi = ro.token_rank_map(A, alpha=0.85)
    for b in range(2):
        G = nx.from_numpy_array(A[b].numpy(), create_using=nx.DiGraph)
        ref = nx.pagerank(G, alpha=0.85, weight="weight", tol=1e-13, max_iter=10_000)
        np.testing.assert_allclose(pi[b].numpy(), [ref[i] for i in range(6)], atol=1e-6)
    torch.testing.assert_close(ro.token_rank_map(A, [1, 3]), ac.stationary_dense(A)[:, [1, 3]],
                               atol=1e-6, rtol=0)


def test_metastable_map_recovers_planted_blocks():
    A, planted = ac.planted_chain([4, 5, 3], leak=0.02, shuffle=True, seed=2)
    lab = ro.metastable_map(A, k=3)
    same = planted[:, None] == planted[None, :]
    assert torch.equal(lab[:, None] == lab[None, :], same)
    assert torch.equal(ro.metastable_map(A, [0, 7], k=3), lab[[0, 7]])


def test_upsample():
    m = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    near = ro.upsample(m, (4, 4), "nearest")
    assert torch.equal(near[0, :2, 2:], torch.ones(2, 2)) and near.sum() == 4
    bil = ro.upsample(m, (4, 4), "bilinear")
    assert bil.shape == (1, 4, 4) and float(bil[0, 0, 3]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mode"):
        ro.upsample(m, (4, 4), "cubic")

