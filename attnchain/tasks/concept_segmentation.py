r"""Concept segmentation (chapter 8): zero-shot masks from the joint text-image attention of FLUX.

The task in three modules: :mod:`attnchain.tasks.concept_chains` (the
:class:`~attnchain.tasks.concept_chains.Protocol`, the model call, the running-mean joint chain
and the concept maps of every read-out), :mod:`attnchain.tasks.concept_scores`
(ConceptAttention's scoring, the pooled scores and the summaries beside the paper's table) and
this one: the data sources (:class:`Source`: the captioned scenes and ImageNet-segmentation), the
resumable evaluation (:func:`evaluate`) and the training probe of scene-flux
(:func:`word_attention_report`). Every public name of the other two is importable from here as
well (``cs.concept_maps``, ``cs.summarise``, ...).

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
:cite:`erel2025attention`; Helbling et al., "ConceptAttention", ICML 2025
:cite:`helbling2025conceptattention`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import attnchain as ac

from .concept_chains import (FULL, OFFLINE, WEIGHTINGS, ChainAccumulator, Protocol,
                             concept_maps, joint_chains, method_names, pipeline_device,
                             planted_two_step_chain, prepare_inputs, to_pixels, token_positions)
from .concept_scores import (PAPER, bounce_table, paper_comparison, pooled_scores, score_maps,
                             summarise, versus)

__all__ = ["TASK", "VERSION", "WEIGHTINGS", "Protocol", "OFFLINE", "FULL", "ChainAccumulator",
           "token_positions", "prepare_inputs", "joint_chains", "method_names", "concept_maps",
           "score_maps", "pooled_scores", "word_attention_report", "to_pixels", "Source",
           "planted_two_step_chain", "pipeline_device",
           "evaluate", "PAPER", "summarise", "versus", "bounce_table", "paper_comparison"]

TASK = "concept_segmentation"
VERSION = 1


# ----------------------------------------------------------------------------------------------
# the training probe: do word tokens attend to their objects?
def _blob_maps(maps: Tensor) -> Tensor:
    """Distance-matched kernel of each grid map: a Gaussian on the grid centred at the map's
    centre of mass whose mean distance from that centre equals the map's."""
    B, r, c = maps.shape
    v = maps.clamp_min(0).double().flatten(1)
    v = v / v.sum(-1, keepdim=True).clamp_min(1e-30)
    yy, xx = torch.meshgrid(torch.arange(r, dtype=torch.float64, device=maps.device),
                            torch.arange(c, dtype=torch.float64, device=maps.device),
                            indexing="ij")
    p = torch.stack([yy.flatten(), xx.flatten()], -1)              # (n, 2)
    centre = v @ p                                                  # (B, 2)
    d = torch.cdist(centre[:, None], p[None].expand(B, -1, -1))[:, 0]  # (B, n)
    spread = (v * d).sum(-1)
    sig = torch.logspace(-2, 2, 400, dtype=torch.float64, device=maps.device)
    K = torch.softmax(-0.5 * d[:, None] ** 2 / sig[None, :, None] ** 2, -1)   # (B, S, n)
    md = (K * d[:, None]).sum(-1)                                   # (B, S) increasing in sig
    best = (md - spread[:, None]).abs().argmin(-1)
    return K[torch.arange(B), best].reshape(B, r, c).float()


@torch.no_grad()
def word_attention_report(pipe, n: int = 100, seed: int = 0, level: str = "easy",
                          noise_steps: Sequence[int] = (1, 2, 3), num_steps: int = 4,
                          untrained: Optional[Callable] = None) -> dict:
    """Column-select AP of each object's words against its mask, per layer and noise level.

    On the first ``n`` held-out scenes of ``level``, for each object, the map of
    :func:`~attnchain.tasks.concept_chains.concept_maps` ``column_select`` (the image tokens that
    attend to the object's colour and shape tokens, uniform head mean of one block, one noise
    sample) is scored against that object's own mask (other objects are negatives): mean AP
    over objects, per block and :math:`\\sigma`. Beside it: the same for the untrained twin (same
    architecture, seeded initialisation), a distance-matched kernel of each map (a Gaussian
    centred at the map's centre of mass with the same mean distance, :func:`_blob_maps`: what a
    blob at the right place scores), and chance (the object's area fraction).
    """
    from ..data import scenes as S
    from ..zoo import scene_flux as SF

    if untrained is None:
        untrained = SF.make_pipeline(SF.make_transformer(pipe.transformer.config, seed=seed),
                                     pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor,
                                     device=pipeline_device(pipe),
                                     text=(pipe.text_encoder_2, pipe.tokenizer_2))
    sc = S.benchmark(level, n=n)
    caps = S.captions(sc)
    prompts = [t for t, _ in caps]
    tokens = token_positions(pipe.tokenizer_2, prompts,
                             [[[o["colour"], o["shape"]] for o in spans] for _, spans in caps],
                             SF.MAX_SEQUENCE_LENGTH)
    items = [(s, k) for s in range(n) for k in range(len(tokens[s]))]
    gt = torch.stack([sc.masks[s] == k + 1 for s, k in items])
    K = max(len(t) for t in tokens)
    padded = [t + [t[0]] * (K - len(t)) for t in tokens]
    bi = torch.tensor([s for s, _ in items])
    ki = torch.tensor([k for _, k in items])
    chance = float(gt.flatten(1).float().mean(-1).mean())
    device = pipeline_device(pipe)
    pixels = (sc.images * 2 - 1).to(device)
    report = {"n_scenes": n, "n_objects": len(items), "chance": chance, "level": level,
              "what": "mean over objects of the AP of column select of the object's colour and "
                      "shape tokens (uniform head mean, one block, noise seed 0) against the "
                      "object's mask; blob = distance-matched Gaussian of each trained map",
              "sigma": {}}
    for step in noise_steps:
        per = {}
        for name, p in (("trained", pipe), ("untrained", untrained)):
            inputs = prepare_inputs(p, pixels, prompts, step, 0, num_steps,
                                    SF.MAX_SEQUENCE_LENGTH)
            with ac.capture(p.transformer, weighting="uniform") as rec:
                p.transformer(**inputs)
            for layer, A in rec.attentions.items():
                A = A.float() / A.float().sum(-1, keepdim=True)
                m = concept_maps(A[:, None], rec.tokens[layer], padded, 1)
                m = m[("column_select", "uniform")]
                maps = m[bi.to(m.device), ki.to(m.device)]
                ap = float(np.nanmean(score_maps(maps, gt)["ap"]))
                per.setdefault(layer, {})[name] = round(ap, 4)
                if name == "trained":
                    blob = float(np.nanmean(score_maps(_blob_maps(maps), gt)["ap"]))
                    per[layer]["blob"] = round(blob, 4)
        sig = float(np.linspace(1.0, 1 / num_steps, num_steps)[step])
        report["sigma"][f"{sig:.2f}"] = per
    return report


# ----------------------------------------------------------------------------------------------
# data sources: one interface for the scenes and ImageNet-segmentation
class Source:
    """The images, prompts, concepts and masks of a segmentation run.

    Parameters
    ----------
    dataset : str
        ``"scenes-<level>"`` (held-out synthetic scenes: one concept per object, its colour and
        shape words in the scene's caption, scored against that object's mask) or
        ``"imagenet-segmentation"`` (``gtsegs_ijcv.mat``: the caption ``"a <name>"`` with
        ConceptAttention's short class name, its words the concept, the foreground mask).
    n : int, optional
        The first ``n`` items (default all: 500 scenes, 4,276 images).
    path : str or Path, optional
        ImageNet-segmentation: the ``.mat`` file (default ``<data root>/gtsegs_ijcv.mat``,
        downloaded when missing).
    class_map : dict or str or Path, optional
        ImageNet-segmentation: ``{first lemma: short name}`` or a JSON file of it (default
        ConceptAttention's, downloaded).
    eval_size : int, optional
        ImageNet-segmentation: masks are resized to this square with PIL's nearest neighbour,
        as ConceptAttention resizes its labels.
    """

    def __init__(self, dataset: str, n: Optional[int] = None, path=None, class_map=None,
                 eval_size: Optional[int] = 224):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.dataset, self.eval_size = dataset, eval_size
        if dataset.startswith("scenes-"):
            from ..data import scenes as S
            level = dataset[len("scenes-"):]
            if level not in S.LEVELS:
                raise ValueError(f"unknown scene level {level!r} in {dataset!r}")
            self._scenes = S.benchmark(level, n=S.BENCHMARK_SIZE if n is None else n)
            self._captions = S.captions(self._scenes)
            self.n = len(self._scenes)
        elif dataset == "imagenet-segmentation":
            from ..data import imagenet_seg as IS
            self._data = IS.load(path=path) if path is not None else IS.load()
            if isinstance(class_map, dict):
                self._names = class_map
            else:
                self._names = IS.class_map(path=class_map)
            self.n = len(self._data) if n is None else min(n, len(self._data))
        else:
            raise ValueError(f"unknown dataset {dataset!r}: 'scenes-<level>' or "
                             "'imagenet-segmentation'")

    def concept_name(self, i: int) -> str:
        """ImageNet-segmentation: the short class name of image ``i``."""
        from ..data import imagenet_seg as IS
        lemma = IS.english_name(self._data.synset(i))
        if lemma not in self._names:
            raise ValueError(f"image {i}: {lemma!r} is not in the class map")
        return self._names[lemma]

    def batch(self, items: Sequence[int]) -> tuple:
        """``(images, prompts, spans, masks)``: images (a tensor in [0, 1] or PIL images),
        prompts, per item a list of concepts (each a list of character spans) and per item a
        list of masks (one per concept, bool tensors)."""
        if self.dataset.startswith("scenes-"):
            idx = torch.tensor(list(items))
            sc = self._scenes
            prompts, spans, masks = [], [], []
            for i in items:
                text, objs = self._captions[i]
                prompts.append(text)
                spans.append([[o["colour"], o["shape"]] for o in objs])
                masks.append([sc.masks[i] == k + 1 for k in range(len(objs))])
            return sc.images[idx], prompts, spans, masks
        from PIL import Image
        images, prompts, spans, masks = [], [], [], []
        for i in items:
            image, mask, _ = self._data[i]
            name = self.concept_name(i)
            images.append(image)
            prompts.append(f"a {name}")
            spans.append([[(2, 2 + len(name))]])
            m = Image.fromarray(mask.astype(np.uint8))
            if self.eval_size:
                m = m.resize((self.eval_size, self.eval_size), Image.NEAREST)
            masks.append([torch.from_numpy(np.asarray(m) > 0)])
        return images, prompts, spans, masks


def _reference_maps(source: Source, items, masks, grid) -> dict:
    """Chapter 7's reference maps for the scenes, one per object: colour contrast, the centre
    prior, and ground truth on the token grid (the object's mask averaged on the grid)."""
    from ..data import scenes as S
    sc = source._scenes
    idx = torch.tensor(list(items))
    cc = S.colour_contrast(sc.images[idx])
    centre = S.centre_prior(len(items), size=sc.images.shape[-1])
    out = {"colour_contrast": [], "centre_prior": [], "gt_grid": []}
    for b, per in enumerate(masks):
        for m in per:
            out["colour_contrast"].append(cc[b])
            out["centre_prior"].append(centre[b])
            out["gt_grid"].append(S.mask_to_grid(m, grid).float())
    return {k: torch.stack(v) for k, v in out.items()}


def _batch_rows(pipe, source: Source, items, protocol: Protocol) -> list:
    images, prompts, spans, masks = source.batch(items)
    device = pipeline_device(pipe)
    pixels = to_pixels(images, protocol, device)
    concepts = token_positions(pipe.tokenizer_2, prompts, spans, protocol.max_sequence_length)
    K = max(len(c) for c in concepts)
    padded = [c + [c[0]] * (K - len(c)) for c in concepts]
    chains, layout = joint_chains(pipe, pixels, prompts, protocol)
    maps = concept_maps(chains, layout, padded, protocol.max_bounces)
    keep = [(b, k) for b, c in enumerate(concepts) for k in range(len(c))]
    bi = torch.tensor([b for b, _ in keep])
    ki = torch.tensor([k for _, k in keep])
    gt = torch.stack([masks[b][k] for b, k in keep])
    eval_size = None if source.dataset == "imagenet-segmentation" else protocol.eval_size
    rows = []

    def add(method, weighting, scores):
        for j, (b, k) in enumerate(keep):
            for metric, vals in scores.items():
                rows.append((items[b], k + 1, method, weighting, metric, float(vals[j])))

    for (method, w), m in maps.items():
        add(method, w, score_maps(m[bi.to(m.device), ki.to(m.device)], gt, eval_size))
    if source.dataset.startswith("scenes-"):
        for method, m in _reference_maps(source, items, masks, tuple(layout.grid)).items():
            add(method, "-", score_maps(m, gt, eval_size))
        from ..data import scenes as S
        from . import locality
        idx = torch.tensor(list(items))
        objects = S.patch_objects(source._scenes.masks[idx], grid=tuple(layout.grid))
        img = list(layout.image)
        for wi, w in enumerate(WEIGHTINGS):
            ret = locality.retention(ac.restrict(chains[:, wi], img), objects, tuple(layout.grid))
            for metric in ("retention", "kernel_retention", "distance"):
                for b, item in enumerate(items):
                    rows.append((item, 0, "locality", w, metric, float(ret[metric][b])))
    return rows


def evaluate(model_name: str = "scene-flux", dataset: str = "scenes-easy",
             n: Optional[int] = None, results_dir=None, batch_size: int = 25,
             protocol: Optional[Protocol] = None, model=None, data_path=None, class_map=None,
             progress: bool = True, shard: Optional[tuple] = None) -> pd.DataFrame:
    """Segment every item with every method, resumably (:class:`attnchain.tasks.Runner`).

    Parameters
    ----------
    model_name : str
        ``"scene-flux"`` (offline), ``"flux-schnell"`` (full) or any FLUX pipeline of the zoo.
    dataset : str
        See :class:`Source`.
    n : int, optional
        The first ``n`` items.
    results_dir : str or Path, optional
        Folder of the resumable results file. Its key holds the model name, the dataset, every
        protocol setting and, for ``scene-flux``, the digest of the shipped weights
        (:func:`attnchain.zoo.scene_flux.weights_digest`), so retrained weights start anew.
    batch_size : int
        Items per transformer call (1 for FLUX.1-schnell at 1024 pixels).
    protocol : Protocol, optional
        Default :data:`~attnchain.tasks.concept_chains.OFFLINE` for the scenes,
        :data:`~attnchain.tasks.concept_chains.FULL` for ImageNet-segmentation.
    model : (pipeline, preprocess), optional
        Already loaded; default ``attnchain.zoo.load(model_name)``.
    data_path, class_map
        ImageNet-segmentation's file and class map (see :class:`Source`).
    progress : bool
    shard : (int, int), optional
        One shard of the items (:meth:`attnchain.tasks.Runner.run`).

    Returns
    -------
    pandas.DataFrame
        Columns ``model, dataset, item, object, method, weighting, metric, value``: per item
        and concept (``object``, 1-based; 0 for per-scene rows) the counts, ``ap`` and ``iou``
        of :func:`~attnchain.tasks.concept_scores.score_maps` for every method of
        :func:`~attnchain.tasks.concept_chains.method_names` and weighting, the reference maps
        (scenes) and the locality of the chain (``locality`` rows,
        :func:`attnchain.tasks.locality.retention`).

    Examples
    --------
    >>> t = evaluate("scene-flux-untrained", "scenes-easy", n=2, batch_size=2, progress=False,
    ...              protocol=Protocol(resolution=64, seeds=(0,), max_sequence_length=16,
    ...                                max_bounces=2, eval_size=None))
    >>> sorted(t.method.unique())[:4]
    ['bounce_sink_1', 'bounce_sink_2', 'bounce_source_1', 'bounce_source_2']
    """
    if protocol is None:
        protocol = FULL if dataset == "imagenet-segmentation" else OFFLINE
    source = Source(dataset, n, path=data_path, class_map=class_map,
                    eval_size=protocol.eval_size)
    settings = dict(model=model_name, dataset=dataset, **protocol.settings())
    if model_name == "scene-flux":
        from ..zoo import scene_flux as SF
        settings["weights"] = SF.weights_digest()   # new weights never reuse old results
    from ._runner import Runner
    runner = Runner(TASK, VERSION, settings, results_dir, labels=("model", "dataset"),
                    columns=("object",))
    state = {}

    def compute(items):
        if not state:
            pipe, _ = ac.zoo.load(model_name) if model is None else model
            state["pipe"] = runner.place(pipe)
        return _batch_rows(state["pipe"], source, list(items), protocol)

    return runner.run(range(source.n), compute, batch_size=batch_size, progress=progress,
                      shard=shard, desc=f"{model_name}/{dataset}")
