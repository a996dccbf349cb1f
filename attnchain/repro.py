"""One command per evaluation of the book: ``python -m attnchain.repro TASK [options]``.

A chapter evaluates a sample small enough to run in two minutes; this command runs the whole
evaluation on the task runner (:class:`attnchain.tasks.Runner`), resumably: results are written
per batch into ``--results-dir``, so an interrupted run continues where it stopped, and the
chapter reads the same files when pointed at them (``ATTNCHAIN_CACHE``).

**Tasks**

``scene_saliency``
    Chapter 7: every method on the held-out synthetic scenes
    (:func:`attnchain.tasks.scene_saliency.evaluate`), printed as mean AP per method and weighting.

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

    for model in args.models:
        for level in args.levels:
            t = ss.evaluate(model, level, n=args.n or scenes.BENCHMARK_SIZE,
                            results_dir=args.results_dir, batch_size=args.batch_size,
                            max_bounces=args.max_bounces, progress=not args.no_progress)
            print(f"=== {model} | {level} | {t.item.nunique()} scenes | results in "
                  f"{args.results_dir}")
            with pd.option_context("display.precision", 3, "display.width", 120):
                print(ss.summarise(t, "ap"))


TASKS = {"scene_saliency": _scene_saliency}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the task."""
    default_dir = Path(os.environ.get("ATTNCHAIN_CACHE", tempfile.gettempdir())) / "attnchain_eval"
    ap = argparse.ArgumentParser(prog="python -m attnchain.repro", description=__doc__.split("\n")[0])
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--models", nargs="+", default=["feature-attention", "scene-vit"])
    ap.add_argument("--levels", nargs="+", default=["easy", "medium", "hard"])
    ap.add_argument("--n", type=int, default=None, help="items per level (default: all)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-bounces", type=int, default=10)
    ap.add_argument("--results-dir", type=Path, default=default_dir)
    ap.add_argument("--no-progress", action="store_true")
    TASKS[(args := ap.parse_args(argv)).task](args)


if __name__ == "__main__":
    main()
