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
        print(f"\npooled scores of every method with 95% bootstrap intervals over concepts "
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


TASKS = {"scene_saliency": _scene_saliency, "masking": _masking, "segmentation": _segmentation}


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
                    help="items per batch (default: scene_saliency 100, masking 50)")
    ap.add_argument("--max-bounces", type=int, default=None, help="default 10")
    ap.add_argument("--seeds", type=int, default=3, help="masking: random rankings per image")
    ap.add_argument("--mode", choices=["remove", "mask"], default="remove")
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
