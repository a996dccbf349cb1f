r"""Self-Attention Guidance (SAG) with a replaceable mask: column sum, TokenRank or any read-out.

Chapter 10's task. The sampler (the mask rules, the degradation and
:func:`~attnchain.tasks.sag_sampler.sample`, after SAG :cite:`hong2023sag`) lives in
:mod:`attnchain.tasks.sag_sampler`, the image-set metrics (features, IS / FID / KID, the reference
sets) in :mod:`attnchain.tasks.image_metrics`; this module holds the evaluation and its results
file, and re-exports the public names of both (``sag.sample``, ``sag.metrics_table``, ...).

:func:`evaluate` generates seed-paired samples of several methods on the task runner (resumable,
sharded with accelerate; the images are saved as PNG files beside the results), and
:func:`~attnchain.tasks.image_metrics.metrics_table` computes IS :cite:`salimans2016is`, FID
:cite:`heusel2017fid` and KID :cite:`binkowski2018kid` with torchmetrics from features of a model
(Inception-v3 in the full profile, the project's scene ViT offline), with bootstrap intervals over
samples and paired bootstrap intervals on the differences between methods.

**References**

Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance",
ICCV 2023 :cite:`hong2023sag`; Erel et al., "Attention (as Discrete-Time Markov) Chains",
NeurIPS 2025 :cite:`erel2025attention`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import attnchain as ac

from ._runner import Runner
from .image_metrics import (COCO_VAL2017_URL, Features, coco_val2017, metrics_table,
                            reference_folder, reference_scenes)
from .sag_sampler import (MASK_RULES, MID_LAYER, attention_mask, decode, degrade,
                          gaussian_blur, mask_scores, predict_eps, predict_x0, sample)

__all__ = [
    "MID_LAYER",
    "MASK_RULES",
    "METHODS",
    "PAPER",
    "PAPER_SETTINGS",
    "mask_scores",
    "attention_mask",
    "gaussian_blur",
    "predict_x0",
    "predict_eps",
    "degrade",
    "sample",
    "decode",
    "evaluate",
    "load_images",
    "metrics_table",
    "paired_differences",
    "OFFLINE_RESULTS",
    "export_results",
    "load_results",
    "check_results",
    "Features",
    "reference_scenes",
    "reference_folder",
    "COCO_VAL2017_URL",
    "coco_val2017",
]

#: The methods of the paper's table: guidance off, SAG's column-sum mask, the TokenRank mask.
METHODS = {"none": None, "sag": "column_sum", "sag_tokenrank": "tokenrank"}

#: The paper's table (unconditional SD1.5) :cite:`erel2025attention`.
PAPER = pd.DataFrame({"IS": [16.32, 17.69, 18.37], "FID": [45.77, 52.48, 50.14],
                      "KID": [0.018, 0.023, 0.021]}, index=pd.Index(list(METHODS), name="method"))

#: Sampler settings where the TokenRank paper is silent, with their source.
PAPER_SETTINGS = {
    "sag_scale": (0.75, "diffusers StableDiffusionSAGPipeline default; SAG paper"),
    "guidance_scale": (1.0, "unconditional (empty prompt), no classifier-free guidance"),
    "num_inference_steps": (50, "diffusers SAG pipeline default"),
    "scheduler": ("the pipeline's own (SD1.5: PNDM)", "diffusers SD1.5 configuration"),
    "blur": ("9 taps, sigma 1", "SAG paper / diffusers"),
    "layer": (MID_LAYER, "SAG paper / diffusers: the mid block's self-attention"),
    "alpha": (0.99, "TokenRank damping of the paper"),
}


# ---------------------------------------------------------------------------------------------
# the evaluation: seed-paired samples on the task runner, images as PNG files
TASK = "sag"
#: Bumped when a change of the code changes the samples.
VERSION = 1


def _image_dir(runner: Runner) -> Path:
    return runner.path.with_suffix("") / "images"


def _save_png(img: Tensor, path: Path) -> None:
    from PIL import Image

    arr = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(1, 2, 0).cpu().numpy()
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(arr).save(tmp)
    tmp.replace(path)


def evaluate(model_name: str = "scene-unet", n: int = 64, results_dir=None, *,
             methods: Optional[dict] = None, seed: int = 0, batch_size: int = 16,
             num_inference_steps: int = 50, sag_scale: float = 0.75,
             guidance_scale: float = 1.0, alpha: float = 0.99, prompt: str = "",
             pipe=None, progress: bool = True, shard: Optional[tuple] = None) -> pd.DataFrame:
    r"""Seed-paired samples of every method, resumably; the images are saved as PNG files.

    Sample ``i`` of every method starts from the same noise (a CPU generator seeded with
    ``seed + i``, whatever the batch), so the methods differ only by their guidance.

    Parameters
    ----------
    model_name : str
        A pipeline of :func:`attnchain.zoo.load`: ``"scene-unet"`` (offline), ``"sd15"`` (full)
        or ``"tiny-sd"`` (plumbing).
    n : int
        Samples per method.
    results_dir : str or Path
        Folder of the results (required: the images live beside the results file, in
        ``<results file without .jsonl>/images/<method>/<item>.png``).
    methods : dict, optional
        ``{name: mask rule or None}`` (default :data:`METHODS`: none, SAG, SAG + TokenRank).
    seed, batch_size, num_inference_steps, sag_scale, guidance_scale, alpha, prompt
        Sampler settings (:func:`~attnchain.tasks.sag_sampler.sample`); ``prompt=""`` is
        unconditional generation.
    pipe : optional
        An already loaded pipeline (default ``attnchain.zoo.load(model_name)``).
    progress : bool
        A tqdm bar over samples.
    shard : (int, int), optional
        One shard only (:meth:`attnchain.tasks.Runner.run`); under ``accelerate launch`` each
        process takes its share and the main process merges.

    Returns
    -------
    pandas.DataFrame
        Columns ``model, item, method, weighting, metric, value``: per sample and method the
        ``mask_fraction`` (mean fraction of masked tokens over the steps, NaN without guidance)
        and ``seconds`` (sampling time per image). :func:`load_images` reads the images and
        :func:`~attnchain.tasks.image_metrics.metrics_table` scores them.
    """
    if results_dir is None:
        raise ValueError("evaluate needs a results_dir: the samples are saved there as images")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    methods = dict(METHODS if methods is None else methods)
    settings = dict(model=model_name, methods={k: (v if isinstance(v, str) or v is None
                                                   else getattr(v, "__name__", repr(v)))
                                               for k, v in methods.items()},
                    seed=seed, steps=num_inference_steps, sag_scale=sag_scale,
                    guidance_scale=guidance_scale, alpha=alpha, prompt=prompt)
    runner = Runner(TASK, VERSION, settings, results_dir, labels=("model",))
    folder = _image_dir(runner)
    for m in methods:
        (folder / m).mkdir(parents=True, exist_ok=True)
    state = {}

    def compute(items):
        if not state:
            state["pipe"] = runner.place(ac.zoo.load(model_name)[0] if pipe is None else pipe)
        rows = []
        for name, rule in methods.items():
            gens = [torch.Generator().manual_seed(seed + int(i)) for i in items]
            t0 = time.perf_counter()
            out = sample(state["pipe"], prompt, rule=rule, sag_scale=sag_scale,
                         guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                         num_images_per_prompt=len(items), generator=gens, alpha=alpha)
            dt = (time.perf_counter() - t0) / len(items)
            frac = out["mask_fraction"].cpu().tolist()
            for k, i in enumerate(items):
                _save_png(out["images"][k], folder / name / f"{int(i):06d}.png")
                rows.append((i, name, "-", "mask_fraction", frac[k]))
                rows.append((i, name, "-", "seconds", dt))
        return rows

    return runner.run(range(n), compute, batch_size=batch_size, progress=progress, shard=shard,
                      desc=f"sag/{model_name}")


def load_images(table: pd.DataFrame, results_dir, method: str, **settings) -> Tensor:
    """The saved samples of ``method`` for the items of ``table``: ``(n, 3, H, W)`` uint8.

    ``settings`` are the keyword arguments :func:`evaluate` was called with (they name the
    results file); ``table`` is its return value.
    """
    from PIL import Image

    runner = _runner_of(results_dir, table["model"].iloc[0], settings)
    folder = _image_dir(runner) / method
    items = sorted(int(i) for i in table["item"].unique())
    arrs = [np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in items]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


#: The offline evaluation of ``python -m attnchain.repro sag --profile offline --samples 200``,
#: committed (:func:`export_results`): 200 seed-paired samples per method of the scene UNet;
#: ``tests/test_sag.py`` regenerates a random sample of them and finds them identical.
OFFLINE_RESULTS = Path(__file__).with_name("results") / "sag_offline.npz"


def export_results(table: pd.DataFrame, results_dir, path, **settings) -> Path:
    """Write the samples of an :func:`evaluate` run into one compressed ``.npz`` file.

    The file holds, per method, the images ``(n, 3, H, W)`` uint8 in item order, the
    ``mask_fraction`` and ``seconds`` of every sample, the items and the sampler settings (as
    JSON): everything :func:`~attnchain.tasks.image_metrics.metrics_table` and
    :func:`paired_differences` need, in one small file a chapter can read
    (:func:`load_results`) and a test can check (:func:`check_results`).
    ``settings`` are the keyword arguments :func:`evaluate` was called with.
    """
    import json

    model = str(table["model"].iloc[0])
    runner = _runner_of(results_dir, model, settings)
    items = np.array(sorted(int(i) for i in table["item"].unique()))
    arrays = {"items": items, "settings": np.array(json.dumps(runner.settings, sort_keys=True)),
              "version": np.array(VERSION)}
    for m in runner.settings["methods"]:
        arrays[f"images/{m}"] = load_images(table, results_dir, m, **settings).numpy()
        for metric in ("mask_fraction", "seconds"):
            d = table[(table.method == m) & (table.metric == metric)].set_index("item")
            arrays[f"{metric}/{m}"] = d.loc[items, "value"].to_numpy(np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load_results(path=OFFLINE_RESULTS) -> dict:
    """Read a file of :func:`export_results`.

    Returns
    -------
    dict
        ``settings`` (dict: ``model``, ``methods``, ``seed``, ``steps``, ``sag_scale``,
        ``guidance_scale``, ``alpha``, ``prompt``), ``items`` (list of int), ``images``
        (``{method: (n, 3, H, W) uint8 Tensor}``) and ``table`` (the long table of
        :func:`evaluate`: ``mask_fraction`` and ``seconds`` per sample and method).
    """
    import json

    with np.load(path) as z:
        settings = json.loads(str(z["settings"]))
        if int(z["version"]) != VERSION:
            raise ValueError(f"{path} was made by version {int(z['version'])} of the SAG "
                             f"sampler, this is version {VERSION}: run the repro command again")
        items = [int(i) for i in z["items"]]
        images = {m: torch.from_numpy(z[f"images/{m}"]) for m in settings["methods"]}
        rows = [(settings["model"], i, m, "-", metric, float(v))
                for m in settings["methods"] for metric in ("mask_fraction", "seconds")
                for i, v in zip(items, z[f"{metric}/{m}"])]
    table = pd.DataFrame(rows, columns=["model", "item", "method", "weighting", "metric",
                                        "value"])
    return {"settings": settings, "items": items, "images": images, "table": table}


def check_results(results: dict, items: Sequence[int], pipe=None) -> dict:
    """Regenerate ``items`` of a :func:`load_results` file with
    :func:`~attnchain.tasks.sag_sampler.sample` and compare.

    Returns ``{method: (largest absolute difference in uint8 levels, fraction of values that
    differ)}`` over the items; ``(0, 0.0)``: the file's images are reproduced exactly. A batch of
    other size rounds the convolutions differently in float32, which after the sampler's steps
    and the rounding to uint8 moves an occasional value by one level. ``pipe`` defaults to
    ``attnchain.zoo.load`` of the file's model.
    """
    st = results["settings"]
    pipe = ac.zoo.load(st["model"])[0] if pipe is None else pipe
    pos = [results["items"].index(int(i)) for i in items]
    out = {}
    for m, rule in st["methods"].items():
        gens = [torch.Generator().manual_seed(st["seed"] + int(i)) for i in items]
        imgs = sample(pipe, st["prompt"], rule=rule, sag_scale=st["sag_scale"],
                      guidance_scale=st["guidance_scale"], num_inference_steps=st["steps"],
                      num_images_per_prompt=len(items), generator=gens,
                      alpha=st["alpha"])["images"]
        got = (imgs.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        want = results["images"][m][pos]
        d = (got.int() - want.int()).abs()
        out[m] = (int(d.max()), float((d > 0).double().mean()))
    return out


def _runner_of(results_dir, model_name: str, kw: dict) -> Runner:
    methods = dict(METHODS if kw.get("methods") is None else kw["methods"])
    settings = dict(model=model_name, methods={k: (v if isinstance(v, str) or v is None
                                                   else getattr(v, "__name__", repr(v)))
                                               for k, v in methods.items()},
                    seed=kw.get("seed", 0), steps=kw.get("num_inference_steps", 50),
                    sag_scale=kw.get("sag_scale", 0.75),
                    guidance_scale=kw.get("guidance_scale", 1.0), alpha=kw.get("alpha", 0.99),
                    prompt=kw.get("prompt", ""))
    return Runner(TASK, VERSION, settings, results_dir, labels=("model",))


def paired_differences(table: pd.DataFrame, metric: str = "mask_fraction", a: str = "sag_tokenrank",
                       b: str = "sag", n_boot: int = 10000) -> pd.DataFrame:
    """Paired bootstrap difference of a per-sample number of :func:`evaluate` between methods
    (e.g. how much more of the image TokenRank masks than the column sum)."""
    from ._runner import compare

    return compare(table[table.metric == metric], "method", a, b, n_boot=n_boot)
