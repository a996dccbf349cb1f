"""token_rank, bounce and lambda2 of this checkout against those of an earlier commit, in one run.

The earlier commit's ``attnchain`` is unpacked from git (``git archive REV attnchain``) into a
temporary folder under another package name (its ``__init__`` emptied, so that only the Markov
modules load) and imported next to this checkout's package. Both versions then run on the same
attention (``markov_core.realistic_attention``: H heads with planted groups), in the same
process, with calls alternated (A B, B A, ...) so that drift of the machine falls on both sides
alike. Printed per function and N: the median and the best wall time of each version over
``--repeats`` calls; the median over rounds of the paired ratio (earlier / now, the two calls of
one round; > 1 means this checkout is faster) with a bootstrap 95% interval; and the largest
difference between the two results.

Run:  python benchmarks/against_commit.py --rev 7bbbab2 [--sizes 256,1024,2048] [--repeats 20]
Not part of the test run. Ratios are from one run on one machine; say which when quoting them.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markov_core import realistic_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = {"token_rank": ("stationary", "chain"), "bounce": ("chain",),
             "lambda2": ("spectral",)}


def load_commit(rev: str, into: Path) -> dict:
    """The Markov functions of ``attnchain`` at ``rev``, imported as package ``attnchain_old``."""
    archive = into / "old.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "attnchain"], stdout=f,
                       check=True)
    with tarfile.open(archive) as t:
        t.extractall(into, filter="data")
    pkg = into / "attnchain_old"
    (into / "attnchain").rename(pkg)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(into))
    found = {}
    for name, modules in FUNCTIONS.items():
        for mod in modules:
            if (pkg / f"{mod}.py").exists():
                m = importlib.import_module(f"attnchain_old.{mod}")
                if hasattr(m, name):
                    found[name] = getattr(m, name)
                    break
    return found


def current() -> dict:
    import attnchain
    return {name: getattr(attnchain, name) for name in FUNCTIONS}


def calls(fns: dict, A: torch.Tensor) -> dict:
    start = torch.zeros(A.shape[-1])
    start[0] = 1.0
    return {"token_rank": lambda: fns["token_rank"](A),
            "bounce": lambda: fns["bounce"](A, start, 10),
            "lambda2": lambda: fns["lambda2"](A, method="krylov")}


def alternate(old, new, repeats: int):
    """Wall times of ``old()`` and ``new()`` called in turn (order swapped every round)."""
    old(), new()
    times = {"old": [], "new": []}
    for r in range(repeats):
        pair = [("old", old), ("new", new)]
        for key, fn in (pair if r % 2 == 0 else pair[::-1]):
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return times


def paired_ratio(old: list, new: list, n_boot: int = 2000, seed: int = 0):
    """Median of the per-round ratios old/new and its bootstrap 95% interval."""
    r = np.asarray(old) / np.asarray(new)
    rng = np.random.default_rng(seed)
    boot = np.median(r[rng.integers(0, len(r), (n_boot, len(r)))], axis=1)
    return float(np.median(r)), *np.percentile(boot, [2.5, 97.5])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rev", required=True, help="the earlier commit (any git revision)")
    ap.add_argument("--sizes", default="256,1024,2048")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.rev],
                         capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        old = load_commit(rev, Path(tmp))
        new = current()
        print(f"{rev} (old) against this checkout (new); {args.heads} heads, "
              f"{args.threads} threads, {args.repeats} alternated calls each, on "
              f"{os.cpu_count()} cores")
        print(f"{'function':>10} {'N':>5} {'old med ms':>10} {'new med ms':>10} {'old min':>8} "
              f"{'new min':>8} {'old/new':>7} {'95% CI':>13} {'max |diff|':>10}")
        for N in [int(s) for s in args.sizes.split(",")]:
            A = realistic_attention(args.heads, N)
            c_old, c_new = calls(old, A), calls(new, A)
            for name in FUNCTIONS:
                t = alternate(c_old[name], c_new[name], args.repeats)
                diff = (c_old[name]() - c_new[name]()).abs().max().item()
                mo, mn = statistics.median(t["old"]), statistics.median(t["new"])
                ratio, lo, hi = paired_ratio(t["old"], t["new"])
                print(f"{name:>10} {N:>5} {1e3 * mo:>10.2f} {1e3 * mn:>10.2f} "
                      f"{1e3 * min(t['old']):>8.2f} {1e3 * min(t['new']):>8.2f} "
                      f"{ratio:>6.2f}x  [{lo:.2f}, {hi:.2f}] {diff:>10.1e}")


if __name__ == "__main__":
    main()
