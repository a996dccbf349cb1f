"""One command per evaluation of the book: ``python -m attnchain.repro TASK [options]``.

A chapter evaluates a sample small enough to run in two minutes; this command runs the whole
evaluation on the task runner (:class:`attnchain.tasks.Runner`), resumably: results are written
per batch into ``--results-dir``, so an interrupted run continues where it stopped, and the
chapter reads the same files when pointed at them (``ATTNCHAIN_CACHE``).

**Tasks**

``scene_saliency``
    Chapter 7: every method on the held-out synthetic scenes
    (:func:`attnchain.tasks.scene_saliency.evaluate`), printed as mean AP per method and weighting.
``segmentation``
    Chapter 8: zero-shot segmentation from the joint text-image attention of a FLUX
    pipeline (:func:`attnchain.tasks.concept_segmentation.evaluate`): ``--profile full``,
    FLUX.1-schnell on ImageNet-segmentation (``--data-path gtsegs_ijcv.mat`` or
    ``--data-root DIR``, downloaded when missing) with ConceptAttention's protocol;
    ``--profile offline``, the project's ``scene-flux`` on held-out scenes, one concept per
    object. Prints ours beside the paper's table and every protocol setting.
``masking``
    Chapter 9: token masking (:func:`attnchain.tasks.token_masking.evaluate`), the AUC of every
    ranking with bootstrap intervals beside the paper's, and TokenRank's paired differences.
    ``--profile offline``: the scene ViT on the held-out scenes; ``--profile full``: the paper's
    four backbones on ImageNetV2 (``--dataset imagenet-val --data-root DIR`` for ImageNet).
``sag``
    Chapter 10: Self-Attention Guidance with the column-sum and the TokenRank mask
    (:func:`attnchain.tasks.sag.evaluate`): ``--samples`` seed-paired unconditional samples per
    method, then IS, FID and KID with bootstrap intervals and paired differences, beside the
    paper's table. ``--profile offline``: the project's scene UNet, scene-ViT features, held-out
    scenes as reference; ``--profile full``: SD1.5, Inception features, COCO-2017 val as
    reference (``--reference DIR``, downloaded to ``--data-root`` when not given). The samples
    and per-sample results are also written to one ``.npz`` file
    (:func:`attnchain.tasks.sag.export_results`); the offline one of 200 samples ships with the
    package (:data:`attnchain.tasks.sag.OFFLINE_RESULTS`) and chapter 10 reads it.

``diffseg``
    Chapter 11: DiffSeg (:func:`attnchain.tasks.diffseg_eval.evaluate`) with every anchor
    sampler and the distance-matched kernel control, ACC and mIoU as DiffSeg computes them with
    bootstrap intervals, beside the paper's table. ``--profile full``: SD1.4 on COCO-Stuff-27
    (downloaded into ``--data-root``, default ``~/.cache/attnchain/data/coco-stuff``), DiffSeg's
    settings; ``--profile offline``: the feature-attention model and the project's diffusion
    model on the 500 held-out easy scenes, thresholds chosen on validation scenes.

``--profile`` sets ``ATTNCHAIN_PROFILE`` and the defaults of ``--models`` and ``--dataset``;
``--limit`` is ``--n`` and ``--out`` is ``--results-dir``. Under ``accelerate launch`` the items are
sharded over the processes (:class:`attnchain.tasks.Runner`).

**Examples**

>>> main(["scene_saliency", "--models", "feature-attention", "--levels", "easy", "--n", "2",
...       "--no-progress"])  # doctest: +ELLIPSIS
=== feature-attention | easy | 2 scenes ...
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main"]


def _scene_saliency(args) -> None:
    import pandas as pd

    from .data import scenes
    from .tasks import scene_saliency as ss

    for model in args.models or ["feature-attention", "scene-vit"]:
        for level in args.levels:
            t = ss.evaluate(model, level, n=args.n or scenes.BENCHMARK_SIZE,
                            results_dir=args.results_dir, batch_size=args.batch_size or 100,
                            max_bounces=args.max_bounces or 10,
                            progress=not args.no_progress)
            print(f"=== {model} | {level} | {t.item.nunique()} scenes | results in "
                  f"{args.results_dir}")
            with pd.option_context("display.precision", 3, "display.width", 120):
                print(ss.summarise(t, "ap"))


def _masking(args) -> None:
    import pandas as pd

    from .tasks import token_masking as tm

    full = args.profile == "full"
    models = args.models or (list(tm.BACKBONES) if full else ["scene-vit"])
    dataset = args.dataset or ("imagenetv2-matched-frequency" if full else "scenes")
    for model in models:
        t = tm.evaluate(model, dataset, n=args.n, results_dir=args.results_dir,
                        batch_size=args.batch_size or 50, seeds=args.seeds, mode=args.mode,
                        data_root=args.data_root, progress=not args.no_progress)
        print(f"=== token masking | profile {args.profile} | {model} | {dataset} | "
              f"{t.item.nunique()} images | fractions {tm.FRACTIONS[0]}..{tm.FRACTIONS[-1]} "
              f"step 0.1 | last layer, head mean, alpha 0.99 | {args.seeds} random seeds | "
              f"mode {args.mode} | results in {args.results_dir}")
        with pd.option_context("display.precision", 3, "display.width", 120):
            print(tm.summarise(t))
            print(tm.versus(t))


def _sag(args) -> None:
    from .tasks import sag as S

    full = args.profile == "full"
    model = (args.models or ["sd15" if full else "scene-unet"])[0]
    n = args.samples or args.n or (1000 if full else 500)
    steps = args.steps or (50 if full else 20)
    kw = dict(seed=0, num_inference_steps=steps, sag_scale=0.75, guidance_scale=1.0)
    t = S.evaluate(model, n, args.results_dir, batch_size=args.batch_size or 25,
                   progress=not args.no_progress, **kw)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    feats = S.Features("inception" if full else "scene-vit")
    if full:
        ref_dir = args.reference or S.coco_val2017(args.data_root or args.results_dir / "coco")
        ref = S.reference_folder(ref_dir, n=args.n_reference or 5000, size=512)
    else:
        ref = S.reference_scenes(args.n_reference or 1000)
    reference = feats(ref)
    features = {m: feats(S.load_images(t, args.results_dir, m, **kw)) for m in S.METHODS}
    pairs = [("sag", "none"), ("sag_tokenrank", "none"), ("sag_tokenrank", "sag")]
    table, diffs = S.metrics_table(features, reference, n_boot=args.n_boot, pairs=pairs)
    print(f"=== SAG | profile {args.profile} | {model} | {n} seed-paired unconditional samples per "
          f"method (seeds 0..{n - 1}) | {steps} steps of the pipeline's scheduler | sag_scale 0.75, "
          f"blur 9 taps sigma 1, mid-block self-attention, TokenRank alpha 0.99 | features "
          f"{feats.name} | reference {len(ref)} "
          f"{'COCO-2017 val images (512 px centre crops)' if full else 'held-out easy scenes'}"
          f" | IS {10} splits, KID subsets of min(1000, n) | {args.n_boot} bootstrap resamples, "
          f"95% intervals | results in {args.results_dir}")
    with pd_options():
        print("paper (SD1.5, unconditional):")
        print(S.PAPER)
        print("ours:")
        print(table)
        print("paired differences (same seeds):")
        print(diffs)
        print("fraction of tokens masked (paired, TokenRank - column sum):")
        print(S.paired_differences(t))
    path = S.export_results(t, args.results_dir, args.results_dir / f"sag_{args.profile}_{model}_"
                            f"n{n}_steps{steps}.npz", **kw)
    print(f"samples and per-sample results in one file (sag.load_results): {path}")


def pd_options():
    import pandas as pd

    return pd.option_context("display.precision", 3, "display.width", 160,
                             "display.max_columns", 30)


def _diffseg(args) -> None:
    import pandas as pd

    from .errors import UnavailableModelError
    from .tasks import diffseg as ds
    from .tasks import diffseg_eval as de

    full = args.profile == "full"
    dataset = args.dataset or ("coco-stuff-27" if full else "scenes-easy")
    if dataset == "coco-stuff-27":
        from .data import coco_stuff

        root = args.data_root or coco_stuff.default_root()
        if not (Path(root) / coco_stuff.CURATED_LIST).exists() or args.download:
            coco_stuff.download(root, limit=args.n, progress=not args.no_progress)
        args.data_root = root
    models = args.models or (["sd14"] if full else ["feature-attention", "scene-unet"])
    samplers = args.samplers or list(ds.SAMPLERS)
    points = args.points or (ds.POINTS if full else de.OFFLINE_POINTS)
    from accelerate import PartialState

    from . import zoo

    state = PartialState()
    device = state.device if state.num_processes > 1 else None
    print(f"=== diffseg | profile {args.profile}")
    print(de.paper_table().to_string())
    for model in models:
        if args.models is None and model not in zoo.REGISTRY:
            print(f"--- {model}: not in this version's zoo; skipped")
            continue
        try:
            net = zoo.load(model, device=device)
        except UnavailableModelError as err:
            print(f"--- {model}: not available ({err}); skipped")
            continue
        if args.threshold is not None:
            threshold = args.threshold
        elif dataset.startswith("scenes-"):
            threshold, sweep = de.tune_threshold(model, dataset.split("-", 1)[1], points=points,
                                                 timestep=args.timestep, model=net)
            print(f"--- {model}: thresholds chosen on {sweep.chain.nunique()} chains x "
                  f"{sweep.threshold.nunique()} values, 100 validation scenes (seed "
                  f"{de.VALIDATION_SEED}), uniform grid, best mIoU: {threshold}")
        else:
            threshold = ds.KL_THRESHOLD
        t = de.evaluate(model, dataset, n=args.n, results_dir=args.results_dir,
                        samplers=samplers, threshold=threshold, points=points,
                        timestep=args.timestep, control=not args.no_control,
                        batch_size=args.batch_size or (4 if full else 50), model=net,
                        data_root=args.data_root, progress=not args.no_progress)
        n = t.item.nunique()
        print(f"--- ours, profile {args.profile}: "
              + de.settings_line(model, dataset, n, threshold, points, timestep=args.timestep))
        print(f"    results in {args.results_dir}")
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            summary = de.summarise(t)
            print(de.beside_paper(summary).to_string())
            print(de.ours_table(summary).to_string())
            for a, b in ((("attention", "tokenrank"), ("attention", "grid")),
                         (("attention", "tokenrank_nms"), ("attention", "grid")),
                         (("attention", "random"), ("attention", "grid")),
                         (("attention", "tokenrank"), ("attention", "random")),
                         (("attention", "grid"), ("kernel", "grid")),
                         (("attention", "tokenrank"), ("kernel", "tokenrank"))):
                if {a[1], b[1]} <= set(samplers) and (not args.no_control or b[0] != "kernel"):
                    print((100 * de.versus(t, a, b)[["a", "b", "diff", "low", "high"]])
                          .round(2).to_string())



def _segmentation(args) -> None:
    import dataclasses

    import pandas as pd

    from .tasks import concept_segmentation as cs

    full = args.profile == "full"
    model = (args.models or ["flux-schnell" if full else "scene-flux"])[0]
    dataset = args.dataset or ("imagenet-segmentation" if full else "scenes-easy")
    base = cs.FULL if dataset == "imagenet-segmentation" else cs.OFFLINE
    changes = {k: v for k, v in dict(
        resolution=args.resolution, pre_resize=args.pre_resize, eval_size=args.eval_size,
        layers=tuple(args.layers) if args.layers else None,
        seeds=tuple(args.noise_seeds) if args.noise_seeds else None,
        noise_steps=tuple(args.noise_steps) if args.noise_steps else None,
        max_sequence_length=args.max_sequence_length,
        max_bounces=args.max_bounces).items() if v is not None}
    protocol = dataclasses.replace(base, **changes)
    data_path = args.data_path
    if data_path is None and args.data_root is not None and dataset == "imagenet-segmentation":
        from .data import imagenet_seg
        data_path = imagenet_seg.load(root=args.data_root).path
    t = cs.evaluate(model, dataset, n=args.n, results_dir=args.results_dir,
                    batch_size=args.batch_size or (1 if full else 25), protocol=protocol,
                    data_path=data_path, class_map=args.class_map,
                    progress=not args.no_progress)
    print(f"=== zero-shot segmentation | profile {args.profile} | {model} | {dataset} | "
          f"{t.item.nunique()} items, {t[t.object > 0].groupby(['item', 'object']).ngroups} "
          f"concepts | results in {args.results_dir}")
    from .zoo import weights
    if full and weights() == "random":
        print("ATTNCHAIN_WEIGHTS=random: the model is a random-weight stand-in (for "
              "flux-schnell the reduced one of attnchain.zoo.flux_standin); numbers mean nothing")
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in protocol.settings().items())
          + " | threshold: map > mean(map) | acc, IoU pooled over the dataset; mAP = mean "
          "per-image AP | miou = mean of foreground and background IoU; miou_ca = "
          "ConceptAttention's pooled two-channel IoU, acc / (2 - acc)")
    if changes and full:
        print("changed from the full protocol: " + ", ".join(f"{k}={v}" for k, v in
                                                            changes.items()))
    with pd.option_context("display.precision", 2, "display.width", 200,
                           "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print("\nours beside the paper's table (FLUX.1-schnell, ImageNet-segmentation):")
        print(cs.paper_comparison(t))
        print("\nmulti-bounce by n and direction (mAP):")
        print(cs.bounce_table(t, "map"))
        for metric in ("acc", "miou"):
            print(f"\nmulti-bounce by n and direction ({metric}):")
            print(cs.bounce_table(t, metric))
        s = cs.summarise(t, n_boot=2000)
        cols = ["acc", "acc_low", "acc_high", "miou", "miou_low", "miou_high", "miou_ca",
                "map", "map_low", "map_high", "n"]
        print("\npooled scores of every method with 95% bootstrap intervals over concepts "
              "(percent; bounce_sink_1 is row select, bounce_source_1 column select):")
        print(s[cols].to_string())
        pairs = [(("bounce_sink_2", w), ("bounce_sink_1", w)) for w in cs.WEIGHTINGS]
        pairs += [(("bounce_source_2", w), ("bounce_source_1", w)) for w in cs.WEIGHTINGS]
        pairs += [((f"bounce_{d}_2", "uniform"), ("column_select", "uniform"))
                  for d in ("sink", "source")]
        pairs += [((m, "lambda2"), (m, "uniform")) for m in
                  ("column_select", "bounce_sink_2", "bounce_source_2")]
        print("\npaired differences per concept (percentage points, 95% bootstrap CI; "
              "bounce_source_1 is column select, bounce_sink_1 row select):")
        v = cs.versus(t, pairs, ("ap", "iou"), n_boot=2000)
        print(v.to_string())
    if args.results_dir is not None:
        import hashlib
        import json
        key = hashlib.sha1(json.dumps(protocol.settings(), sort_keys=True).encode()).hexdigest()
        stem = f"segmentation_{model}_{dataset}_{len(t.item.unique())}_{key[:8]}"
        s.to_csv(Path(args.results_dir) / f"{stem}_summary.csv")
        v.to_csv(Path(args.results_dir) / f"{stem}_paired.csv")
        print(f"\nsummary and paired differences written to {args.results_dir}/{stem}_*.csv")


TASKS = {"scene_saliency": _scene_saliency, "masking": _masking, "segmentation": _segmentation,
         "sag": _sag, "diffseg": _diffseg}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the task."""
    default_dir = Path(os.environ.get("ATTNCHAIN_CACHE", tempfile.gettempdir())) / "attnchain_eval"
    ap = argparse.ArgumentParser(prog="python -m attnchain.repro", description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--profile", choices=["offline", "full"], default=None,
                    help="sets ATTNCHAIN_PROFILE (default: the environment's profile)")
    ap.add_argument("--models", nargs="+", default=None, help="default: the task's models")
    ap.add_argument("--levels", nargs="+", default=["easy", "medium", "hard"])
    ap.add_argument("--dataset", default=None, help="masking: scenes or an ImageNet-class set")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--n", "--limit", type=int, default=None, help="items (default: all)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="items per batch (default: scene_saliency 100, masking 50, diffseg "
                         "4 full / 50 offline)")
    ap.add_argument("--max-bounces", type=int, default=None, help="default 10")
    ap.add_argument("--seeds", type=int, default=3, help="masking: random rankings per image")
    ap.add_argument("--mode", choices=["remove", "mask"], default="remove")
    ap.add_argument("--samples", type=int, default=None, help="sag: samples per method")
    ap.add_argument("--steps", type=int, default=None,
                    help="sag: sampler steps (default: 50 full, 20 offline)")
    ap.add_argument("--reference", type=Path, default=None,
                    help="sag, full profile: folder of reference images (default COCO-2017 val)")
    ap.add_argument("--n-reference", type=int, default=None,
                    help="sag: reference images (default: 5000 full, 1000 offline)")
    ap.add_argument("--n-boot", type=int, default=200, help="sag: bootstrap resamples")
    ap.add_argument("--samplers", nargs="+", default=None,
                    help="diffseg: anchor samplers (default all of attnchain.tasks.diffseg."
                         "SAMPLERS)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="diffseg: KL threshold (default 1.1 for COCO-Stuff; chosen on "
                         "validation scenes offline)")
    ap.add_argument("--points", type=int, default=None,
                    help="diffseg: anchor grid points per side (default 16 full, 8 offline)")
    ap.add_argument("--timestep", type=int, default=300, help="diffseg: UNet timestep")
    ap.add_argument("--no-control", action="store_true",
                    help="diffseg: skip the distance-matched kernel control")
    ap.add_argument("--download", action="store_true",
                    help="diffseg: fetch missing COCO-Stuff files even if the list exists")
    ap.add_argument("--results-dir", "--out", type=Path, default=default_dir)
    seg = ap.add_argument_group("segmentation (defaults: the profile's protocol)")
    seg.add_argument("--data-path", type=Path, default=None, help="gtsegs_ijcv.mat")
    seg.add_argument("--class-map", type=Path, default=None,
                     help="ConceptAttention's imagenet_class_map.json (default: downloaded)")
    seg.add_argument("--resolution", type=int, default=None)
    seg.add_argument("--pre-resize", type=int, default=None)
    seg.add_argument("--eval-size", type=int, default=None)
    seg.add_argument("--layers", nargs="+", default=None, help="capture layer patterns")
    seg.add_argument("--noise-seeds", type=int, nargs="+", default=None)
    seg.add_argument("--noise-steps", type=int, nargs="+", default=None)
    seg.add_argument("--max-sequence-length", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.profile is not None:
        os.environ["ATTNCHAIN_PROFILE"] = args.profile
    from .zoo import profile

    args.profile = profile()
    TASKS[args.task](args)


if __name__ == "__main__":
    main()
