"""The task runner: resume after an interruption (a torn line included), two-shard merge, summaries
with bootstrap intervals against an independent computation."""
import json

import numpy as np
import pandas as pd
import pytest

from attnchain import metrics
from attnchain.tasks import Runner, compare, select, summarise


class _Stop(Exception):
    pass


class _Compute:
    """Rows of two methods per item, counting the items computed; may stop after some batches."""

    def __init__(self, stop_after=None):
        self.items, self.stop_after, self.batches = [], stop_after, 0

    def __call__(self, batch):
        if self.stop_after is not None and self.batches == self.stop_after:
            raise _Stop
        self.batches += 1
        self.items += batch
        return [(i, f"L{i % 2}", m, "uniform", "score", float(i) * k)
                for i in batch for k, m in ((1.0, "a"), (0.5, "b"))]


def _runner(folder, **kw):
    return Runner("toy", 1, {"model": "m/1", "level": "easy", "n": 3}, folder,
                  labels=("model", "level"), columns=("layer",), **kw)


def test_table_format_and_file(tmp_path):
    r = _runner(tmp_path)
    t = r.run(range(5), _Compute(), batch_size=2, progress=False)
    assert list(t.columns) == ["model", "level", "item", "layer", "method", "weighting", "metric",
                               "value"]
    assert t.item.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and set(t.model) == {"m/1"}
    assert r.path.name == f"toy-m_1-easy-{r.key}.jsonl"
    lines = r.path.read_text().splitlines()
    assert json.loads(lines[0])["settings"] == {"model": "m/1", "level": "easy", "n": 3}
    assert [json.loads(x)["item"] for x in lines[1:]] == [0, 1, 2, 3, 4]
    assert r.table().equals(t)
    # the key is the settings and the version, not the code
    assert Runner("toy", 1, {"n": 3, "model": "m/1", "level": "easy"}).key == r.key
    assert Runner("toy", 2, {"n": 3, "model": "m/1", "level": "easy"}).key != r.key


def test_resume_after_interruption(tmp_path):
    full = _runner(None).run(range(7), _Compute(), batch_size=3, progress=False)
    with pytest.raises(_Stop):
        _runner(tmp_path).run(range(7), _Compute(stop_after=1), batch_size=3, progress=False)
    again = _Compute()
    t = _runner(tmp_path).run(range(7), again, batch_size=3, progress=False)
    assert again.items == [3, 4, 5, 6]  # the first batch was kept
    pd.testing.assert_frame_equal(t, full)
    assert _runner(tmp_path).run(range(7), _Compute(stop_after=0), progress=False).equals(full)


@pytest.mark.parametrize("damage", ["torn_tail", "fragment_then_line"])
def test_torn_line_costs_one_recomputation(tmp_path, damage):
    r = _runner(tmp_path)
    full = r.run(range(6), _Compute(), batch_size=2, progress=False)
    raw = r.path.read_bytes()
    cut = raw.rstrip(b"\n").rfind(b"\n") + 1  # start of the last line (item 5)
    if damage == "torn_tail":  # an interrupted write
        r.path.write_bytes(raw[: cut + 9])
    else:  # what the old cache did: a fragment with a good line appended to it
        prev = raw[:cut].rstrip(b"\n").rfind(b"\n") + 1  # start of item 4's line
        r.path.write_bytes(raw[:prev] + raw[prev:prev + 9] + raw[cut:])
    c = _Compute()
    assert _runner(tmp_path).run(range(6), c, batch_size=2, progress=False).equals(full)
    assert c.items == ([5] if damage == "torn_tail" else [4, 5])  # once: the damaged batch
    c = _Compute()
    assert _runner(tmp_path).run(range(6), c, batch_size=2, progress=False).equals(full)
    assert c.items == []  # and the file is complete again
    assert r.path.read_bytes().endswith(b"\n") and len(r.path.read_text().splitlines()) == 7


def test_two_shard_merge(tmp_path):
    full = _runner(None).run(range(9), _Compute(), batch_size=2, progress=False)
    parts = []
    for index in (0, 1):
        c = _Compute()
        parts.append(_runner(tmp_path).run(range(9), c, batch_size=2, progress=False,
                                           shard=(index, 2)))
        assert c.items == list(range(index, 9, 2))
    assert sorted(parts[0].item.unique()) == [0, 2, 4, 6, 8]
    r = _runner(tmp_path)
    assert len(list(tmp_path.glob("*.shard-*-of-2.jsonl"))) == 2 and not r.path.exists()
    # a shard interrupted and resumed computes only its own missing items
    assert r.merge() == r.path
    assert list(tmp_path.glob("*.shard-*")) == []
    c = _Compute()
    merged = _runner(tmp_path).run(range(9), c, progress=False)
    assert c.items == []
    pd.testing.assert_frame_equal(merged, full)


def test_accelerate_single_process(tmp_path):
    # without an explicit shard the runner asks accelerate; alone, the process takes every item
    r = _runner(tmp_path)
    t = r.run(range(3), _Compute(), progress=False)
    assert r.device is None and sorted(t.item.unique()) == [0, 1, 2]


def test_leftover_shards_are_merged_by_a_single_process_run(tmp_path):
    _runner(tmp_path).run(range(4), _Compute(), progress=False, shard=(1, 3))
    c = _Compute()
    t = _runner(tmp_path).run(range(4), c, progress=False, shard=None)
    assert c.items == [0, 2, 3] and sorted(t.item.unique()) == [0, 1, 2, 3]
    assert list(tmp_path.glob("*.shard-*")) == []


def test_bad_input(tmp_path):
    r = _runner(tmp_path)
    with pytest.raises(ValueError, match="batch_size"):
        r.run(range(2), _Compute(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="shard"):
        r.run(range(2), _Compute(), shard=(2, 2), progress=False)
    with pytest.raises(ValueError, match="not in its batch"):
        r.run(range(2), lambda b: [(9, "L", "a", "u", "s", 1.0)], progress=False)
    with pytest.raises(ValueError, match="row must be"):
        r.run(range(2), lambda b: [(b[0], "a", "u", "s", 1.0)], progress=False)
    with pytest.raises(ValueError, match="items"):
        r.run([0.5], _Compute(), progress=False)
    with pytest.raises(ValueError, match="results_dir"):
        _runner(None).run(range(2), _Compute(), shard=(0, 2), progress=False)
    with pytest.raises(ValueError, match="labels"):
        Runner("x", 1, {}, labels=("model",))
    other = Runner("toy", 1, {"model": "m/1", "level": "easy", "n": 3}, tmp_path,
                   labels=("model", "level"))  # same file name, other columns
    r.run(range(1), _Compute(), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        other.run(range(1), _Compute(), progress=False)


def test_summaries_against_an_independent_computation():
    rng = np.random.default_rng(0)
    n = 40
    a, b = rng.normal(0.7, 0.1, n), rng.normal(0.6, 0.1, n)
    a[3] = np.nan
    t = pd.DataFrame({"item": np.tile(np.arange(n), 2), "method": "bounce_2",
                      "weighting": ["lambda2"] * n + ["uniform"] * n, "metric": "ap",
                      "value": np.concatenate([a, b])}).sample(frac=1, random_state=1)
    s = summarise(t, n_boot=800, seed=3)
    for w, x in (("lambda2", a), ("uniform", b)):
        order = t[t.weighting == w].item.to_numpy()  # summarise resamples in table order
        x = x[order]
        x = x[np.isfinite(x)]
        row = s.loc[("bounce_2", w, "ap")]
        draws = np.random.default_rng(3).integers(0, len(x), size=(800, len(x)))
        lo, hi = np.quantile(x[draws].mean(1), [0.025, 0.975])
        assert row["n"] == len(x) and row["mean"] == pytest.approx(x.mean())
        assert (row["low"], row["high"]) == pytest.approx((lo, hi))
    c = compare(t, "weighting", "lambda2", "uniform", n_boot=800, seed=3)
    keep = np.isfinite(a)
    row = c.loc[("bounce_2", "ap")]
    ref = metrics.paired_bootstrap_ci(a[keep], b[keep], n_boot=800, seed=3)
    assert row["n"] == keep.sum()
    assert (row["diff"], row["low"], row["high"]) == pytest.approx(ref, abs=0)
    assert row["mean_a"] == pytest.approx(a[keep].mean()) and row["mean_b"] == pytest.approx(b[keep].mean())
    v = select(t, weighting="uniform")
    assert v.sort_index().to_numpy() == pytest.approx(b)
