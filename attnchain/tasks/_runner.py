r"""The task runner: resumable, sharded evaluations with per-item results in one long table.

A task evaluates many *items* (scenes, images, prompts) and records, for each, numbers in one
long table with the columns

``item, method, weighting, metric, value``

(plus a task's own id columns, e.g. ``layer``, and leading constant label columns, e.g. ``model``
and ``level``). :class:`Runner` computes the items in batches, writes each finished batch to a
results file as it goes, and on the next run computes only what is missing. :func:`summarise`
and :func:`compare` turn a table into means with bootstrap confidence intervals
(:func:`attnchain.metrics.bootstrap_ci`, :func:`attnchain.metrics.paired_bootstrap_ci`).

**Results file**

JSON lines. The first line is a header ``{"task", "version", "settings", "columns"}``; every
further line holds one finished item, ``{"item": ..., "rows": [[<id columns>, method, weighting,
metric, value], ...]}``. A batch is appended in one write, flushed and synced, so an interrupted
run loses at most the batch in progress. A line that does not parse (the torn end of an
interrupted write) is dropped and the file rewritten without it when it is next opened for
appending: the interrupted batch is computed once more, and the file is complete afterwards.

The file name holds the task, its label values and a key: the first 12 hex digits of the SHA-1
of ``{"task", "version", "settings"}``. A task bumps its version constant when a change of its
code changes its numbers; any change of a setting starts a new file.

**Sharding**

Several processes or GPUs (``accelerate launch ...``) share the items through
:class:`accelerate.PartialState`: process ``i`` of ``n`` takes items ``i, i + n, i + 2n, ...``
of the requested list, writes its own shard file (``<name>.shard-i-of-n.jsonl``) and, after
``wait_for_everyone``, the main process merges every shard file into the results file. Tests
and manual splits pass ``shard=(i, n)`` instead and call :meth:`Runner.merge` themselves.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Hashable, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .. import metrics

__all__ = ["COLUMNS", "Runner", "select", "summarise", "compare"]

#: The columns of every task table (a task may add id columns between ``item`` and ``method``).
COLUMNS = ("item", "method", "weighting", "metric", "value")


def _slug(x) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(x))


class Runner:
    r"""Run a task over items, resumably, with results in one long table.

    Parameters
    ----------
    task : str
        Name of the task (file names and the header).
    version : int
        The task's version constant; part of the results key.
    settings : mapping
        Every setting that changes the task's numbers (JSON-serialisable); part of the key.
    results_dir : str or Path, optional
        Folder of the results files. None: nothing is written and nothing resumes.
    labels : sequence of str
        Keys of ``settings`` shown as leading constant columns of the table (and in the file
        name), e.g. ``("model", "level")``.
    columns : sequence of str
        The task's own id columns of each row, between ``item`` and ``method`` (e.g.
        ``("layer",)``).

    Examples
    --------
    >>> import tempfile
    >>> def compute(batch):  # one row per item: its square
    ...     return [(i, "square", "-", "value", float(i * i)) for i in batch]
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     runner = Runner("demo", 1, {"power": 2}, results_dir=folder)
    ...     first = runner.run(range(4), compute, batch_size=2, progress=False)
    ...     again = runner.run(range(4), lambda batch: 1 / 0, progress=False)  # all cached
    >>> again.value.tolist()
    [0.0, 1.0, 4.0, 9.0]
    >>> list(again.columns)
    ['item', 'method', 'weighting', 'metric', 'value']

    See Also
    --------
    summarise, compare, select
    """

    def __init__(self, task: str, version: int, settings: Mapping, results_dir=None,
                 labels: Sequence[str] = (), columns: Sequence[str] = ()):
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        missing = [k for k in labels if k not in settings]
        if missing:
            raise ValueError(f"labels {missing} are not keys of settings")
        clash = set(columns) & (set(COLUMNS) | set(labels))
        if clash:
            raise ValueError(f"id columns {sorted(clash)} clash with the table's columns")
        self.task, self.version = str(task), version
        self.settings = json.loads(json.dumps(dict(settings), sort_keys=True))
        self.labels, self.columns = tuple(labels), tuple(columns)
        self.results_dir = None if results_dir is None else Path(results_dir)
        #: The device of this process when the run is sharded over several (else None).
        self.device = None
        self._memory: dict = {}  # item -> rows, when there is no results_dir

    def place(self, module):
        """``module`` moved to this process's device when the run is sharded over several
        (:attr:`device`), unchanged otherwise (it stays where the caller put it)."""
        return module if self.device is None else module.to(self.device)

    # ------------------------------------------------------------------ names
    @property
    def key(self) -> str:
        """12 hex digits of the SHA-1 of the task, its version and its settings."""
        s = json.dumps({"task": self.task, "version": self.version, "settings": self.settings},
                       sort_keys=True)
        return hashlib.sha1(s.encode()).hexdigest()[:12]

    @property
    def path(self) -> Optional[Path]:
        """The merged results file (None without a ``results_dir``)."""
        if self.results_dir is None:
            return None
        parts = [self.task] + [_slug(self.settings[k]) for k in self.labels] + [self.key]
        return self.results_dir / ("-".join(parts) + ".jsonl")

    def shard_path(self, index: int, count: int) -> Path:
        """The file that shard ``index`` of ``count`` writes."""
        return self.path.with_suffix(f".shard-{index}-of-{count}.jsonl")

    def _shard_files(self) -> list:
        return sorted(self.path.parent.glob(self.path.stem + ".shard-*-of-*.jsonl"))

    @property
    def _header(self) -> dict:
        return {"task": self.task, "version": self.version, "settings": self.settings,
                "columns": [*self.columns, *COLUMNS[1:]]}

    # ------------------------------------------------------------------ files
    def _read(self, path: Path, repair: bool) -> dict:
        """Finished items of one file, ``{item: rows}``; with ``repair``, torn lines are removed."""
        if not path.exists():
            return {}
        lines = path.read_bytes().split(b"\n")
        torn = lines.pop() != b""  # the last write did not end its line
        done, header = {}, None
        for n, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                torn = True
                continue
            if n == 0 and isinstance(rec, dict) and "task" in rec:
                header = rec
                if rec != self._header:
                    raise ValueError(f"{path} holds results of other settings: {rec}")
            elif isinstance(rec, dict) and "item" in rec and "rows" in rec:
                done.setdefault(_item_key(rec["item"]), rec["rows"])
            else:
                torn = True
        if repair and (torn or header is None):
            self._write(path, done)
        return done

    def _write(self, path: Path, done: Mapping) -> None:
        """Write ``{item: rows}`` to ``path`` atomically (a temporary file, then a rename)."""
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(self._header) + "\n")
            fh.write("".join(_line(item, rows) for item, rows in done.items()))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _load(self, own: Optional[Path]) -> dict:
        """Every finished item: the results file and all shard files (``own`` is repaired)."""
        if self.path is None:
            return dict(self._memory)
        done = {}
        for f in [self.path, *self._shard_files()]:
            for item, rows in self._read(f, repair=f == own).items():
                done.setdefault(item, rows)
        if own is not None and not own.exists():
            self._write(own, {})
        return done

    def merge(self) -> Optional[Path]:
        """Merge every shard file into the results file and remove the shard files.

        Returns
        -------
        Path or None
            The results file (None without a ``results_dir``).
        """
        if self.path is None:
            return None
        shards = self._shard_files()
        if not shards and self.path.exists():
            return self.path
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self._write(self.path, self._load(own=None))
        for f in shards:
            f.unlink()
        return self.path

    # ------------------------------------------------------------------ running
    def run(self, items: Iterable[Hashable], compute: Callable[[list], Iterable[Sequence]],
            batch_size: int = 1, progress: bool = True, shard: Optional[tuple] = None,
            desc: Optional[str] = None) -> pd.DataFrame:
        r"""Compute what is missing of ``items`` and return their table.

        Parameters
        ----------
        items : iterable of int or str
            The items, in the order of the table.
        compute : callable
            ``compute(batch)`` takes a list of up to ``batch_size`` items and returns their rows,
            each a sequence ``(item, *columns, method, weighting, metric, value)``.
        batch_size : int
            Items per call of ``compute`` (and per write).
        progress : bool
            Show a tqdm bar over items (on the main process).
        shard : (int, int), optional
            Compute only shard ``index`` of ``count`` (items ``index::count``) into its shard file
            and return that shard's table; nothing is merged. Default: this process's share under
            :class:`accelerate.PartialState` (the whole list in a single process), merged by the
            main process when every process is done.
        desc : str, optional
            Label of the progress bar (default the task name).

        Returns
        -------
        pandas.DataFrame
            Columns ``*labels, item, *columns, method, weighting, metric, value``; the rows of
            the items of this call (of this shard with ``shard``) in the order of ``items``.

        Raises
        ------
        ValueError
            A bad ``batch_size`` or ``shard``; ``compute`` returning rows of items outside the
            batch, or rows of the wrong width; a results file of other settings.
        """
        items = [_item_key(i) for i in items]
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        index, count, state = _shard(shard)
        if count > 1 and self.path is None:
            raise ValueError("sharded runs need a results_dir to merge their shard files")
        main = state is None or state.is_main_process
        self.device = getattr(state, "device", None) if count > 1 else None
        mine = items[index::count]
        own = None
        if self.path is not None:
            self.results_dir.mkdir(parents=True, exist_ok=True)
            own = self.path if count == 1 else self.shard_path(index, count)
        done = self._load(own)
        todo = [i for i in mine if i not in done]
        bar = tqdm(total=len(todo), desc=desc or self.task, disable=not (progress and main))
        for s0 in range(0, len(todo), batch_size):
            batch = todo[s0:s0 + batch_size]
            new = self._group(batch, compute(batch))
            if own is not None:
                with open(own, "a") as fh:
                    fh.write("".join(_line(item, rows) for item, rows in new.items()))
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                self._memory.update(new)
            done.update(new)
            bar.update(len(batch))
        bar.close()
        if shard is not None:
            return self._table(mine, done)
        if count > 1:
            state.wait_for_everyone()
        if main and self.path is not None:
            self.merge()
        if count > 1:
            state.wait_for_everyone()
            done = self._load(own=None)
        return self._table(items, done)

    def table(self, items: Optional[Iterable[Hashable]] = None) -> pd.DataFrame:
        """The stored table (of ``items`` in their order; default every finished item)."""
        done = self._load(own=None)
        return self._table(list(done) if items is None else [_item_key(i) for i in items], done)

    def _group(self, batch: list, rows: Iterable[Sequence]) -> dict:
        width = len(self.columns) + len(COLUMNS)
        out = {item: [] for item in batch}
        for r in rows:
            item = _item_key(r[0])
            if item not in out:
                raise ValueError(f"compute returned a row of item {r[0]!r}, not in its batch")
            if len(r) != width:
                raise ValueError(f"a row must be (item, {', '.join(self.columns + COLUMNS[1:])})"
                                 f", got {tuple(r)!r}")
            out[item].append([*r[1:-1], float(r[-1])])
        return out

    def _table(self, items: list, done: Mapping) -> pd.DataFrame:
        missing = [i for i in items if i not in done]
        if missing:
            raise ValueError(f"items not computed: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        data = [(i, *r) for i in items for r in done[i]]
        df = pd.DataFrame(data, columns=["item", *self.columns, *COLUMNS[1:]])
        df["value"] = df["value"].astype(np.float64)
        for k in reversed(self.labels):
            df.insert(0, k, self.settings[k])
        return df


def _item_key(item):
    """Items are ints or strings (as JSON keeps them)."""
    if isinstance(item, (bool, float)) or not isinstance(item, (int, str, np.integer)):
        raise ValueError(f"items must be ints or strings, got {item!r}")
    return int(item) if isinstance(item, (int, np.integer)) else item


def _line(item, rows) -> str:
    return json.dumps({"item": item, "rows": rows}) + "\n"


def _shard(shard):
    """(index, count, state): an explicit shard, or this process's share under accelerate."""
    if shard is not None:
        index, count = shard
        if isinstance(count, bool) or not isinstance(count, int) or count < 1 \
                or isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
        return index, count, None
    from accelerate import PartialState  # imported lazily: it loads slowly

    state = PartialState()
    return state.process_index, state.num_processes, state


# ---------------------------------------------------------------------------------------------
# summaries
def select(table: pd.DataFrame, **where) -> pd.Series:
    """The ``value`` column of the rows matching ``column=value`` conditions, indexed by item.

    Parameters
    ----------
    table : pandas.DataFrame
        A task table.
    **where
        Conditions, e.g. ``method="bounce_2", weighting="lambda2", metric="ap"``.

    Returns
    -------
    pandas.Series
        In the table's order, indexed by ``item``.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"item": [0, 0, 1, 1], "method": ["a", "b", "a", "b"],
    ...                   "weighting": "-", "metric": "ap", "value": [0.1, 0.2, 0.3, 0.4]})
    >>> select(t, method="b").tolist()
    [0.2, 0.4]

    See Also
    --------
    summarise, compare
    """
    mask = np.ones(len(table), dtype=bool)
    for k, v in where.items():
        mask &= (table[k] == v).to_numpy()
    sub = table[mask]
    return pd.Series(sub["value"].to_numpy(), index=pd.Index(sub["item"].to_numpy(), name="item"),
                     name="value")


def _index(keys: list, names: list) -> pd.Index:
    if len(names) > 1:
        return pd.MultiIndex.from_tuples(keys, names=names)
    return pd.Index([k[0] for k in keys], name=names[0])


def summarise(table: pd.DataFrame, by: Sequence[str] = ("method", "weighting", "metric"),
              n_boot: int = 10000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    r"""Mean of ``value`` per group with a percentile bootstrap confidence interval.

    Parameters
    ----------
    table : pandas.DataFrame
        A task table (:meth:`Runner.run`).
    by : sequence of str
        The grouping columns.
    n_boot, level, seed
        As :func:`attnchain.metrics.bootstrap_ci`.

    Returns
    -------
    pandas.DataFrame
        Index ``by`` (in order of first appearance), columns ``n`` (finite values), ``mean``,
        ``low``, ``high``. NaN values are left out; a group without finite values has ``n = 0``
        and NaN statistics.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"item": range(4), "method": "m", "weighting": "-", "metric": "ap",
    ...                   "value": [0.2, 0.4, 0.6, 0.8]})
    >>> s = summarise(t, n_boot=1000)
    >>> int(s.loc[("m", "-", "ap"), "n"]), round(float(s.loc[("m", "-", "ap"), "mean"]), 3)
    (4, 0.5)

    See Also
    --------
    compare, attnchain.metrics.bootstrap_ci
    """
    rows, keys = [], []
    for key, sub in table.groupby(list(by), sort=False):
        x = sub["value"].to_numpy(np.float64)
        x = x[np.isfinite(x)]
        stats = metrics.bootstrap_ci(x, n_boot, level, seed) if len(x) else (np.nan,) * 3
        keys.append(key if isinstance(key, tuple) else (key,))
        rows.append((len(x), *stats))
    return pd.DataFrame(rows, index=_index(keys, list(by)), columns=["n", "mean", "low", "high"])


def compare(table: pd.DataFrame, column: str, a, b,
            by: Sequence[str] = ("method", "weighting", "metric"), n_boot: int = 10000,
            level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    r"""Paired differences ``a − b`` along one column, per group, with bootstrap intervals.

    Rows are paired by every other id column (the labels, ``item`` and the task's id columns);
    pairs with a NaN are left out.

    Parameters
    ----------
    table : pandas.DataFrame
        A task table.
    column : str
        The column whose values ``a`` and ``b`` are compared, e.g. ``"weighting"`` with
        ``"lambda2"`` and ``"uniform"``; it is dropped from ``by``.
    a, b
        The two values of ``column``.
    by : sequence of str
        The grouping columns.
    n_boot, level, seed
        As :func:`attnchain.metrics.paired_bootstrap_ci`.

    Returns
    -------
    pandas.DataFrame
        Index ``by`` without ``column``; columns ``n`` (pairs), ``mean_a``, ``mean_b``, ``diff``
        (the mean of ``a − b``), ``low``, ``high``. Groups where ``a`` or ``b`` is missing are
        left out.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"item": [0, 0, 1, 1, 2, 2], "method": "m", "metric": "ap",
    ...                   "weighting": ["x", "y"] * 3, "value": [0.9, 0.5, 0.8, 0.6, 0.7, 0.5]})
    >>> c = compare(t, "weighting", "x", "y", n_boot=1000)
    >>> int(c.loc[("m", "ap"), "n"]), round(float(c.loc[("m", "ap"), "diff"]), 3)
    (3, 0.267)

    See Also
    --------
    summarise, select, attnchain.metrics.paired_bootstrap_ci
    """
    groups = [c for c in by if c != column]
    keys = [c for c in table.columns if c not in (*by, column, "value")]
    rows, index = [], []
    sub = table[table[column].isin([a, b])]
    for key, g in sub.groupby(groups, sort=False):
        w = g.pivot(index=keys, columns=column, values="value")
        if a not in w or b not in w:
            continue
        w = w[[a, b]].dropna()
        diff = metrics.paired_bootstrap_ci(w[a], w[b], n_boot, level, seed) if len(w) \
            else (np.nan,) * 3
        index.append(key if isinstance(key, tuple) else (key,))
        rows.append((len(w), w[a].mean(), w[b].mean(), *diff))
    return pd.DataFrame(rows, index=_index(index, groups),
                        columns=["n", "mean_a", "mean_b", "diff", "low", "high"])
