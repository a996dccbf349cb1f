"""The same-object AUC protocol against the inline computation chapters 3 and 5 used to carry."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import attnchain as ac
from attnchain.data import scenes
from attnchain.tasks.same_object import rule_bounce_auc, rule_summary, same_object_auc


def _old_mask_to_grid(mask, grid):  # viz.mask_to_grid of 7bbbab2
    m = torch.as_tensor(np.asarray(mask.numpy(), dtype=np.float64))
    return torch.nn.functional.adaptive_avg_pool2d(m[None, None], grid)[0, 0]


def _old_chapter_rows(P_all, masks, grid, max_n):
    """Chapter 3's cell (and chapter 5's, with n in (1, 2)) before the protocol moved."""
    rows = []
    for obj in range(1, int(masks.max()) + 1):
        frac = torch.stack([_old_mask_to_grid(m == obj, grid).flatten() for m in masks])
        vv = ac.bounce(P_all, frac.argmax(-1), max_n)
        for i in range(len(masks)):
            target = (frac[i] > 0.5).numpy()
            if target.sum() == 0 or target.all():
                continue
            for n in range(1, max_n + 1):
                rows.append((i, obj, n, roc_auc_score(target, vv[i, n].numpy())))
    return rows


def test_same_object_auc_equals_the_chapters_inline_computation():
    data = scenes.generate(6, seed=3, level="easy")
    g = torch.Generator().manual_seed(0)
    P = torch.softmax(3 * torch.randn(6, 64, 64, generator=g), -1)
    res = same_object_auc(P, data.masks, (8, 8), bounces=range(1, 5))
    old = _old_chapter_rows(P, data.masks, (8, 8), 4)
    assert list(res.columns) == ["scene", "object", "start", "n", "AUC"]
    assert [tuple(r) for r in res[["scene", "object", "n", "AUC"]].itertuples(index=False)] == old
    two = same_object_auc(P, data.masks, (8, 8), bounces=(1, 2))
    assert two.AUC.tolist() == res[res.n <= 2].AUC.tolist()  # chapter 5 reads n = 1, 2


def test_same_object_auc_ideal_chain_and_bad_input():
    data = scenes.generate(4, seed=1)
    objects = scenes.patch_objects(data.masks).flatten(1)  # (B, 64)
    same = (objects[:, :, None] == objects[:, None, :]).float()
    ideal = same / same.sum(-1, keepdim=True)  # never leaves its object
    res = same_object_auc(ideal, data.masks, (8, 8), bounces=(1, 3))
    assert len(res) > 0 and (res.AUC == 1.0).all()
    with pytest.raises(ValueError, match="grid"):
        same_object_auc(ideal, data.masks, (4, 4))
    with pytest.raises(ValueError, match="scenes"):
        same_object_auc(ideal[:2], data.masks, (8, 8))
    with pytest.raises(ValueError, match="bounces"):
        same_object_auc(ideal, data.masks, (8, 8), bounces=[0])


def test_rule_bounce_auc_is_the_fixed_table_plus_the_rule_rows():
    """Chapter 3's test of the bounce rule: every fixed n, and per scene the rows of the n that
    choose_bounces picks for that scene's chain (computed here scene by scene)."""
    data = scenes.generate(5, seed=2, level="easy")
    g = torch.Generator().manual_seed(1)
    objects = scenes.patch_objects(data.masks).flatten(1)
    same = (objects[:, :, None] == objects[:, None, :]).double()
    P = 0.7 * same / same.sum(-1, keepdim=True) + \
        0.3 * torch.softmax(2 * torch.randn(5, 64, 64, generator=g, dtype=torch.float64), -1)
    res = rule_bounce_auc(P, data.masks, (8, 8), max_bounces=6)
    fixed = same_object_auc(P, data.masks, (8, 8), bounces=range(1, 7))
    top = res[res.n != "rule n*"]
    assert top.n.tolist() == fixed.n.astype(str).tolist()
    assert top.AUC.tolist() == fixed.AUC.tolist()
    assert top.n_rule.isna().all()
    rule = res[res.n == "rule n*"]
    assert len(rule) == len(fixed[fixed.n == 1])  # one rule row per scored object
    for row in rule.itertuples():
        n_star = int(ac.choose_bounces(P[row.scene], max_bounces=6))
        assert row.n_rule == n_star
        expect = fixed[(fixed.scene == row.scene) & (fixed.object == row.object)
                       & (fixed.n == n_star)]
        assert row.AUC == expect.AUC.item()
    assert set(rule.n_rule) != {1.0}  # the rule is not constant on these chains


def test_rule_summary_equals_the_chapters_inline_summary():
    """Chapter 3's printed summary, as its cell computed it before it moved to the package."""
    data = scenes.generate(4, seed=5, level="easy")
    g = torch.Generator().manual_seed(2)
    frames = [rule_bounce_auc(torch.softmax(t * torch.randn(4, 64, 64, generator=g), -1),
                              data.masks, (8, 8), 5).assign(layer=f"L{i}")
              for i, t in enumerate((1.0, 3.0, 6.0))]
    res = pd.concat(frames, ignore_index=True)
    got = rule_summary(res, 5)
    layers, order = ["L0", "L1", "L2"], [str(n) for n in range(1, 6)] + ["rule n*"]
    table = res.pivot_table(index="layer", columns="n", values="AUC",
                            aggfunc="mean").loc[layers, order]
    overall = res.groupby("n")["AUC"].mean().reindex(order)
    pd.testing.assert_frame_equal(got["table"], table)
    pd.testing.assert_series_equal(got["mean"], overall)
    assert got["best_n"] == overall.iloc[:5].idxmax() and got["best"] == overall.iloc[:5].max()
    assert got["rule"] == overall["rule n*"]
    assert got["oracle"] == table[order[:5]].max(axis=1).mean()
    rule_ns = res.dropna(subset=["n_rule"]).drop_duplicates(["layer", "scene"]).n_rule
    assert got["rule_counts"] == rule_ns.astype(int).value_counts().sort_index().to_dict()
