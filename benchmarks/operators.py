"""Dense vs matrix-free chains: time, peak memory and agreement of TokenRank, bounce and λ2.

For each N (``--sizes``) and head dimension d (``--dims``), H heads (``--heads``, 24 as in
FLUX) of planted attention (:func:`attnchain.testing.qk.planted_qk`): tokens in 8 planted
groups, ``q_i = t_h (0.5 c_g(i) + z_i)``, ``k_i = 0.5 c_g(i) + z'_i`` with group centroids
``c ~ N(0, I_d)``, noise ``z ~ N(0, I_d)`` and a per-head temperature ``t_h`` from 0.5 to 1.5
(the attention of ``benchmarks/markov_core.py``), scale ``d^-1/2``, float32.

* **dense**: ``A = attention_probs(q, k, d^-1/2)`` (H x N x N float32, formed once: "build"),
  then ``token_rank(A)``, ``bounce(A, 0, 10)`` and ``lambda2(A, method="krylov")``.
* **matrix-free**: ``op = AttentionChain(q, k)`` (one pass for the row log-sum-exp: "build"),
  then the same three calls on ``op``: the same solvers, products computed block by block from
  q and k (on CPU every pass recomputes the blocks of QKᵀ and their exponentials).

Peak memory is measured by :class:`attnchain.testing.memory.PeakMemory`: on the CPU the
process's peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) minus its
resident set before the path, with glibc's mmap threshold at 128 KiB so that freed blocks leave
the resident set; on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the
path. Either way it counts everything the path allocates (the operator's copies of q and k,
the solvers' vectors, blocks, the map and its softmax), the inputs q and k excluded. The dense path is
skipped where the map alone exceeds ``--dense-max-gib`` (its softmax needs about twice the map);
the agreement is then measured against the dense map of ``--ref-heads`` heads only (marked ``*``).
Agreement: TokenRank and bounce as the largest L1 distance (over heads and the 11 bounce
steps), |λ2| as the largest absolute difference. Times are the process's CPU seconds (all
threads) of each call, steadier than wall-clock seconds on a machine shared with other work;
the total wall-clock seconds of each path are printed too, and both are in ``--out``.

A warm-up at N = 128 runs first, so that one-time costs (lazy imports, thread pools, allocator
arenas) are not counted. Results are appended to ``--out`` (JSON lines) as each (N, d) finishes; a rerun skips the ones
there (``--fresh`` starts over), so a long run can be resumed. The table is printed at the end.

Run:  python benchmarks/operators.py [--sizes 1024,2048,4096,4608,8192,16384] [--dims 64,128]
      [--heads 24] [--threads 2] [--device cpu] [--pairs 4608:64,16384:64] [--table-only]
Not part of the test run. Ratios are from one run on one machine; say which when quoting them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from attnchain.operators import AttentionChain, attention_probs
from attnchain.testing.memory import measure_chain
from attnchain.testing.qk import planted_qk

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30


def agreement(a, b):
    return dict(token_rank_l1=float((a["pi"] - b["pi"]).abs().sum(-1).max()),
                bounce_l1=float((a["bounce"] - b["bounce"]).abs().sum(-1).max()),
                lambda2_abs=float((a["lambda2"] - b["lambda2"]).abs().max()))


def one(N, d, H, args, device):
    q, k = planted_qk(H, N, d, seed=args.seed, device=device)
    scale = d ** -0.5
    mf = measure_chain(lambda: AttentionChain(q, k, scale=scale), device)
    row = dict(N=N, d=d, H=H, device=str(device), threads=torch.get_num_threads(),
               dense_map_bytes=H * N * N * 4, qk_bytes=2 * q.numel() * 4)
    row.update({f"mf_{key}": v for key, v in mf.items() if not torch.is_tensor(v)})
    if H * N * N * 4 <= args.dense_max_gib * GiB:
        dense = measure_chain(lambda: attention_probs(q, k, scale), device)
        row.update({f"dense_{key}": v for key, v in dense.items() if not torch.is_tensor(v)})
        row.update(agreement(mf, dense), ref_heads=H)
    else:  # the dense map of a few heads only: agreement there
        h = args.ref_heads
        ref = measure_chain(lambda: attention_probs(q[:h], k[:h], scale), device)
        sub = {key: mf[key][:h] for key in ("pi", "bounce", "lambda2")}
        row.update(agreement(sub, ref), ref_heads=h)
    return row


def fmt_bytes(b):
    return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2 ** 20:.0f} MiB"


TASKS = (("build", "build"), ("token_rank", "TokenRank"), ("bounce", "bounce(10)"),
         ("lambda2", "λ2"))


def table(rows):
    """Markdown: per (N, d) a dense and a matrix-free line (CPU seconds of each call, passes in
    parentheses), then the ratios and the agreement."""
    head = ("| N | d | path | peak memory | " + " | ".join(f"{t} cpu s" for _, t in TASKS)
            + " | wall s, all |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ratios = ["| N | d | dense peak / m-free peak | " + " | ".join(
        f"{t} m-free / dense cpu" for _, t in TASKS) + " | agreement TR L1 / bounce L1 / λ2 abs |",
        "|" + "---|" * (len(TASKS) + 4)]
    for r in rows:
        for path in ("dense", "mf"):
            if f"{path}_peak_bytes" not in r:
                lines.append(f"| {r['N']:,} | {r['d']} | dense | skipped: the maps need "
                             f"{fmt_bytes(r['dense_map_bytes'])} |" + " – |" * (len(TASKS) + 1))
                continue
            cells = []
            for key, _ in TASKS:
                c = f"{r[f'{path}_{key}_cpu_s']:.1f}"
                if key in ("token_rank", "lambda2"):
                    c += f" ({r[f'{path}_{key}_passes']:g})"
                cells.append(c)
            wall = sum(r[f"{path}_{key}_s"] for key, _ in TASKS)
            lines.append(f"| {r['N']:,} | {r['d']} | {'matrix-free' if path == 'mf' else path} "
                         f"| {fmt_bytes(r[f'{path}_peak_bytes'])} | " + " | ".join(cells)
                         + f" | {wall:.0f} |")
        star = "" if r["ref_heads"] == r["H"] else f" (vs the dense map of {r['ref_heads']} " \
            f"head{'s' if r['ref_heads'] > 1 else ''})"
        agree = (f"{r['token_rank_l1']:.1e} / {r['bounce_l1']:.1e} / {r['lambda2_abs']:.1e}"
                 + star)
        if "dense_peak_bytes" in r:
            ratio = r['dense_peak_bytes'] / max(r['mf_peak_bytes'], 1)
            peak = f"{ratio:.0f}" if ratio >= 10 else f"{ratio:.1f}"
            cpu = [f"{r[f'mf_{k}_cpu_s'] / max(r[f'dense_{k}_cpu_s'], 1e-9):.1f}"
                   for k, _ in TASKS]
        else:
            peak, cpu = "–", ["–"] * len(TASKS)
        ratios.append(f"| {r['N']:,} | {r['d']} | {peak} | " + " | ".join(cpu)
                      + f" | {agree} |")
    return "\n".join(lines) + "\n\n" + "\n".join(ratios)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1024,2048,4096,4608,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dense-max-gib", type=float, default=4.0,
                    help="skip the dense path where the H x N x N map exceeds this")
    ap.add_argument("--ref-heads", type=int, default=1,
                    help="heads of the dense reference where the dense path is skipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "_build" / "benchmarks" / "operators.jsonl"))
    ap.add_argument("--fresh", action="store_true", help="ignore the results already in --out")
    ap.add_argument("--pairs", default="",
                    help="N:d pairs in the order to run them (e.g. 4608:64,16384:64), instead of "
                         "every --sizes x --dims; the table is sorted by N and d either way")
    ap.add_argument("--table-only", action="store_true",
                    help="print the table of the results in --out and run nothing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.fresh and out.exists():
        out.unlink()
    done = {}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done[(r["N"], r["d"], r["H"], r["device"])] = r
    if args.pairs:
        pairs = [tuple(int(x) for x in p.split(":")) for p in args.pairs.split(",")]
    else:
        pairs = [(int(N), int(d)) for N in args.sizes.split(",") for d in args.dims.split(",")]
    if args.table_only:
        print(table(sorted((r for r in done.values() if r["H"] == args.heads
                            and r["device"] == str(device)), key=lambda r: (r["N"], r["d"]))))
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, {args.threads} threads, device {device}", flush=True)
    # one-time costs (lazy imports, thread pools, allocator arenas) before anything is measured
    one(128, 16, 2, argparse.Namespace(**{**vars(args), "dense_max_gib": 1.0}), device)
    rows = []
    for N, d in pairs:
        key = (N, d, args.heads, str(device))
        if key not in done:
            t = time.perf_counter()
            done[key] = one(N, d, args.heads, args, device)
            done[key]["wall_s"] = time.perf_counter() - t
            with out.open("a") as f:
                f.write(json.dumps(done[key]) + "\n")
            print(f"N={N} d={d}: {done[key]['wall_s']:.0f} s", flush=True)
        rows.append(done[key])
    print(table(sorted(rows, key=lambda r: (r["N"], r["d"]))))


if __name__ == "__main__":
    main()
