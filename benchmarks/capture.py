"""Time and peak memory of a forward pass with and without ``attnchain.capture``.

Models (random weights, timm ``VisionTransformer`` so the timm adapter is measured):

* ``vit-b16``: ViT-B/16 at 224² -- 12 blocks, 12 heads × 64 dims, N = 197 tokens, batch 1.
* ``flux-size``: the attention size of FLUX.1 at 512 px (1024 image + 512 text = 1536 tokens,
  24 heads), with a narrower width to stay CPU-friendly: 2 blocks, 24 heads × 32 dims
  (dim 768), N = 1536 (1 CLS + 1535 tokens fed as a 1535-token sequence), batch 1.
* ``tiny``: the zoo's ``tiny-timm-vit`` (N = 19), a seconds-long smoke run of every option:
  ``python benchmarks/capture.py --models tiny --repeats 1``.

Method: every (model, option) pair runs in its own fresh subprocess. Memory: resident set size
before the measured forward (model and input built, nothing run yet) is subtracted from the
process's peak RSS after it (``resource.getrusage(...).ru_maxrss``), so the number is the forward
pass's own peak, including the stored maps. Time: plain and captured forwards alternate
``--repeats`` times in the same process (each captured one in a fresh capture context); the
table gives the best captured time and its ratio to the best plain time of the same process
(paired, and the minimum, because the machine is shared and timings are noisy). ``torch.no_grad``, float32, CPU,
``--threads`` threads (default 1, the machine is shared). 

Run: ``python benchmarks/capture.py`` (about a minute); ``--quick`` runs fewer options.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

OPTIONS = {
    "no capture": None,
    "full (all layers, all heads)": {},
    "last layer only": {"layers": -1},
    "one head": {"heads": [0]},
    "head mean": {"weighting": "uniform"},
    "λ2-weighted head mean": {"weighting": "lambda2"},
    "CLS row + image cols": {"rows": "cls", "cols": "image"},
    "float16 storage": {"dtype": "float16"},
    "keep='qk'": {"keep": "qk"},
}
QUICK = ["no capture", "full (all layers, all heads)", "head mean", "keep='qk'"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _build(model_name: str):
    import torch
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    if model_name == "vit-b16":
        m = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                              num_classes=1000)
        x = torch.randn(1, 3, 224, 224)
        return m.eval(), (lambda: m(x))
    if model_name == "flux-size":
        # feed a (1, 1536, 768) token sequence straight to the blocks (what capture hooks);
        # the recorder sees the layout CLS + 1535 "image" tokens (no grid).
        m = VisionTransformer(img_size=16, patch_size=8, embed_dim=768, depth=2, num_heads=24,
                              num_classes=0, class_token=True)
        x = torch.randn(1, 1536, 768)
        return m.eval(), (lambda: m.blocks(x))
    if model_name == "tiny":
        from attnchain.zoo.registry import build_tiny_timm_vit
        m = build_tiny_timm_vit()
        x = torch.randn(2, 3, 32, 32)
        return m.eval(), (lambda: m(x))
    raise ValueError(model_name)


def child(model_name: str, option: str, repeats: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    import attnchain.capture as cap
    opts = OPTIONS[option]
    if opts is not None:
        opts = dict(opts)
        if "dtype" in opts:
            opts["dtype"] = getattr(torch, opts["dtype"])
    model, run = _build(model_name)
    base = _rss_mb()

    def run_plain():
        with torch.no_grad():
            run()

    def once():
        with torch.no_grad():
            if opts is None:
                run()
                return 0
            with cap.capture(model, **opts) as rec:
                run()
            stored = sum(t.numel() * t.element_size() for t in rec.attentions.values())
            stored += sum(q.q.numel() * q.q.element_size() + q.k.numel() * q.k.element_size()
                          for q in rec.qk.values())
            return stored

    stored = once()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB -> MiB on Linux
    # time: plain and captured forwards interleaved in this process, best of `repeats` each
    # (the minimum is the least disturbed by other work on a shared machine)
    plain, captured = [], []
    for _ in range(repeats):
        for fn, bucket in ((run_plain, plain), (once, captured)):
            t0 = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - t0)
    return {"time_s": min(captured), "plain_s": min(plain), "peak_mb": peak - base,
            "stored_mb": stored / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["vit-b16", "flux-size"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.repeats, args.threads)))
        return
    options = QUICK if args.quick else list(OPTIONS)
    print(f"torch threads: {args.threads}; repeats: {args.repeats}; float32, CPU, no_grad")
    for model_name in args.models:
        rows = []
        for option in options:
            out = subprocess.run([sys.executable, __file__, "--child", model_name, option,
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                err = (out.stderr.strip().splitlines() or ["?"])[-1]
                rows.append((option, None, err))
                continue
            rows.append((option, json.loads(out.stdout.strip().splitlines()[-1]), None))
        print(f"\n{model_name}")
        print(f"{'option':32s} {'time s':>8s} {'× time':>7s} {'peak MB':>9s} {'stored MB':>10s}")
        for option, r, err in rows:
            if r is None:
                print(f"{option:32s} failed: {err}")
                continue
            ratio = r["time_s"] / r["plain_s"]
            print(f"{option:32s} {r['time_s']:8.3f} {ratio:7.2f} {r['peak_mb']:9.1f} "
                  f"{r['stored_mb']:10.1f}")


if __name__ == "__main__":
    main()
