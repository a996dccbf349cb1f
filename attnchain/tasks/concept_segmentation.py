r"""Concept segmentation (chapter 8): zero-shot masks from the joint text-image attention of FLUX.

A multimodal diffusion transformer such as FLUX attends jointly over ``[text; image]`` tokens, so
one row-stochastic chain :math:`M` (``N = N_txt + N_img``) links a caption's words with image
patches. This task encodes a real image, adds noise as a denoising step would, runs the
transformer once per noise sample with the image's caption, and reads a map over the image
tokens from the *concept* token(s) (the class name; in the scenes, an object's colour and shape
words) with every read-out of the paper :cite:`erel2025attention`:

``row_select``
    :math:`M_{c, j}`: what the concept token attends to (one *sink* step from :math:`e_c`).
``column_select``
    :math:`M_{j, c} / \sum_i M_{i, c}`: who attends to the concept token (one *source* step).
``bounce_sink_n``, ``bounce_source_n`` (``n = 1 .. max_bounces``)
    :math:`v_n = v_0 P^n` with :math:`v_0 = e_c` (uniform over the concept's tokens when it has
    several) and :math:`P = M` (sink; ``n = 1`` is row select) or the source chain (``n = 1`` is
    column select), :func:`attnchain.bounce`, read on the image tokens.

The chain :math:`M` is the mean over the selected blocks, denoising steps and noise samples of
each block's head mean, uniform or :math:`|\lambda_2|`-weighted (:func:`attnchain.head_mean`).
It is reduced *while the model runs*: every block's ``(H, N, N)`` map exists only inside its own
call, and the evaluation keeps one ``(2, N, N)`` running sum per image, so memory does not grow
with blocks or steps (:class:`ChainAccumulator`).

**Scoring** (:func:`score_maps`), ConceptAttention's protocol :cite:`helbling2025conceptattention`
where the paper is silent: the map is min-max normalised, thresholded at its mean on the token
grid, and both map and mask are brought to the evaluation size by nearest-neighbour resizing.
Per image the table stores the pixel counts, so that pixel accuracy and IoU are *pooled over the
dataset* (sums of correct pixels, intersections and unions, then the ratio), and the per-image
average precision (:func:`sklearn.metrics.average_precision_score` of the map against the
mask), whose mean over images is mAP.

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
:cite:`erel2025attention`; Helbling et al., "ConceptAttention", ICML 2025
:cite:`helbling2025conceptattention`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

import attnchain as ac

from ..capture.recorder import Recorder
from . import readouts

__all__ = ["TASK", "VERSION", "WEIGHTINGS", "Protocol", "OFFLINE", "FULL", "ChainAccumulator",
           "token_positions", "prepare_inputs", "joint_chains", "method_names", "concept_maps",
           "score_maps", "pooled_scores", "word_attention_report", "to_pixels", "Source",
           "planted_two_step_chain", "pipeline_device",
           "evaluate", "PAPER", "summarise", "versus", "bounce_table", "paper_comparison"]

TASK = "concept_segmentation"
VERSION = 1
#: Head weightings, in table order.
WEIGHTINGS = ("uniform", "lambda2")


@dataclass(frozen=True)
class Protocol:
    """Every setting of a segmentation run (the profile changes only these and the data).

    Parameters
    ----------
    resolution : int
        Side of the (square) image the model sees, in pixels.
    num_steps : int
        Steps of the denoising schedule (FluxPipeline's ``sigmas = linspace(1, 1/num_steps)``).
    noise_steps : tuple of int
        Indices into that schedule: one forward pass per index and seed, at its noise level.
    seeds : tuple of int
        Seeds of the noise samples.
    layers : tuple of str
        Capture layer patterns (``fnmatch``) of the blocks whose attention is averaged.
    max_sequence_length : int
        Text tokens (the prompt padded as the pipeline pads it).
    max_bounces : int
        Largest ``n``.
    eval_size : int or None
        Side of the square the maps and masks are scored at (None: the mask's own size).
    pre_resize : int or None
        Images are first resized (bicubic) to this square, then (nearest) to ``resolution``.
    sources : dict
        Where each setting comes from (printed by the chapter; not part of the results key).
    """

    resolution: int
    num_steps: int = 4
    noise_steps: tuple = (2,)
    seeds: tuple = (4, 5, 6, 7, 8)
    layers: tuple = ("transformer_blocks.*",)
    max_sequence_length: int = 256
    max_bounces: int = 10
    eval_size: Optional[int] = 224
    pre_resize: Optional[int] = None
    sources: dict = field(default_factory=dict, compare=False, hash=False)

    def settings(self) -> dict:
        """The settings as a JSON-friendly dict (part of the results key)."""
        return {"resolution": self.resolution, "pre_resize": self.pre_resize,
                "num_steps": self.num_steps,
                "noise_steps": list(self.noise_steps), "seeds": list(self.seeds),
                "layers": list(self.layers), "max_sequence_length": self.max_sequence_length,
                "max_bounces": self.max_bounces, "eval_size": self.eval_size}


#: The full profile (FLUX.1-schnell on ImageNet-segmentation): ConceptAttention's protocol.
FULL = Protocol(
    resolution=1024, num_steps=4, noise_steps=(2,), seeds=(4, 5, 6, 7, 8),
    layers=tuple(f"transformer_blocks.{i}.attn" for i in range(14, 18)),
    max_sequence_length=256, max_bounces=10, eval_size=224, pre_resize=512,
    sources={
        "resolution": "ConceptAttention segmentation.py: encode_image interpolates the image "
                      "to 1024 x 1024 (nearest; 64 x 64 image tokens)",
        "pre_resize": "ConceptAttention run_experiment.py: transforms.Resize((512, 512), "
                      "Image.BICUBIC) first",
        "num_steps": "ConceptAttention run_cross_self_ablation.sh: --num_steps 4 (schnell)",
        "noise_steps": "ConceptAttention run_cross_self_ablation.sh: --noise_timestep 2 "
                       "(sigma = 0.5 of the 4-step schedule)",
        "seeds": "ConceptAttention run_cross_self_ablation.sh: --num_samples 5; "
                 "segment_individual_image seeds the noise with seed + i, seed = 4",
        "layers": "ConceptAttention run_experiment.py: --layers default range(14, 18) "
                  "(double-stream blocks 14..17 of 19)",
        "max_sequence_length": "FLUX.1-schnell's T5 length (256), as ConceptAttention's "
                               "flux code and the paper's release (max_seq_len: 256)",
        "max_bounces": "the paper's release (flux.yml): n_bounces: 10",
        "eval_size": "ConceptAttention run_experiment.py: labels Resize((224, 224), NEAREST), "
                     "maps upsampled nearest to 224",
        "threshold": "ConceptAttention: mask = map > mean(map) (mean_value_threshold=True)",
        "caption": "ConceptAttention run_experiment.py: captions=[f'a {simplified_name}'] with "
                   "experiments/imagenet_segmentation/data/imagenet_class_map.json",
        "pooling": "ConceptAttention run_experiment.py: pixel accuracy and IoU from totals "
                   "summed over images; mAP = mean of per-image sklearn AP",
    })

#: The offline profile (scene-flux on held-out scenes): the same protocol at the model's size;
#: its blocks are, as ConceptAttention's, double-stream blocks (scene-flux has two).
OFFLINE = Protocol(resolution=64, num_steps=4, noise_steps=(2,), seeds=(4, 5, 6, 7, 8),
                   layers=("transformer_blocks.*",), max_sequence_length=16, max_bounces=10,
                   eval_size=None)


# ----------------------------------------------------------------------------------------------
# tokens
def token_positions(tokenizer, prompts: Sequence[str], spans: Sequence[Sequence[Sequence]],
                    max_length: int) -> list:
    """Token positions of character spans of each prompt, as the pipeline tokenises it.

    Parameters
    ----------
    tokenizer : transformers fast tokenizer
        The pipeline's ``tokenizer_2`` (T5 for FLUX, MiniLM for scene-flux).
    prompts : sequence of str
    spans : sequence (per prompt) of sequences (per concept) of ``(start, end)`` spans
        A concept may have several spans (an object's colour and shape words).
    max_length : int
        Padding length of the prompt (the pipeline's ``max_sequence_length``).

    Returns
    -------
    list (per prompt) of lists (per concept) of int
        Positions of every token overlapping one of the concept's spans.

    Raises
    ------
    ValueError
        A span covers no token (truncated away, or empty).

    Examples
    --------
    >>> from attnchain.zoo.registry import _minilm_tokenizer
    >>> token_positions(_minilm_tokenizer(), ["a red circle"], [[[(2, 5), (6, 12)]]], 16)
    [[[2, 3]]]
    """
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_offsets_mapping=True)
    out = []
    for p, (offsets, concepts) in enumerate(zip(enc["offset_mapping"], spans)):
        per = []
        for c, spans_c in enumerate(concepts):
            pos = sorted({t for s, e in spans_c for t, (a, b) in enumerate(offsets)
                          if b > a and a < e and b > s})
            if not pos:
                raise ValueError(f"prompt {p} ({prompts[p]!r}): concept {c} spans {spans_c} "
                                 f"cover no token within {max_length} tokens")
            per.append(pos)
        out.append(per)
    return out


# ----------------------------------------------------------------------------------------------
# the model call
def pipeline_device(pipe) -> torch.device:
    """The device a pipeline computes on: diffusers' ``_execution_device`` (the GPU also when
    ``enable_model_cpu_offload`` keeps the weights on the CPU between calls), else the
    transformer's device.

    Examples
    --------
    >>> from attnchain.zoo import flux_standin
    >>> pipeline_device(flux_standin.build_pipeline())
    device(type='cpu')
    """
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else pipe.transformer.device


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@torch.no_grad()
def prepare_inputs(pipe, pixels: Tensor, prompts: Sequence[str], noise_step: int, seed: int,
                   num_steps: int, max_sequence_length: int, text=None) -> dict:
    r"""The keyword inputs of one transformer call on noisy latents of real images.

    The images are encoded by ``pipe.vae`` (a sample of its latent distribution, seeded, as
    FLUX's autoencoder samples), standardised with the VAE's scaling and shift factors, packed
    by ``pipe._pack_latents``; the scheduler's own :math:`\sigma` of step ``noise_step`` of a
    ``num_steps`` schedule mixes them with seeded Gaussian noise (the same draws for every
    image of the batch, so that an image's result does not depend on its batch, as
    ConceptAttention draws the noise of every image from the same seeds),
    :math:`x_\sigma = \sigma\varepsilon + (1 - \sigma) x_0` (``scheduler.scale_noise``); the
    prompts are encoded by ``pipe.encode_prompt``.

    Parameters
    ----------
    pipe : diffusers.FluxPipeline (or :class:`attnchain.zoo.scene_flux.SceneFluxPipeline`)
    pixels : Tensor, shape (B, 3, H, W)
        Images in [-1, 1] at the model's resolution, on the pipeline's device.
    prompts : sequence of str
    noise_step, seed, num_steps, max_sequence_length
        See :class:`Protocol`.
    text : tuple, optional
        ``(prompt_embeds, pooled_prompt_embeds, text_ids)`` already encoded.

    Returns
    -------
    dict
        ``pipe.transformer(**inputs)`` arguments (``return_dict=False``).
    """
    import copy

    import numpy as _np

    tr = pipe.transformer
    device = pixels.device
    dtype = tr.dtype
    vae = pipe.vae
    dist = vae.encode(pixels.to(vae.dtype)).latent_dist
    gen = _generator(seed)   # every image gets the same draws, whatever the batch
    eps = torch.randn(dist.mean.shape[1:], generator=gen, dtype=torch.float32).to(device)
    z = dist.mean + dist.std * eps.to(dist.mean.dtype)
    z = (z.float() - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = z.shape
    x0 = pipe._pack_latents(z, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, device, dtype)
    sch = copy.deepcopy(pipe.scheduler)
    extra = {}
    if sch.config.get("use_dynamic_shifting", False):   # FLUX.1-dev: FluxPipeline's shift
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        c = sch.config
        extra["mu"] = calculate_shift(x0.shape[1], c.get("base_image_seq_len", 256),
                                      c.get("max_image_seq_len", 4096),
                                      c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    sch.set_timesteps(sigmas=_np.linspace(1.0, 1 / num_steps, num_steps), device=device,
                      **extra)
    t = sch.timesteps[noise_step]
    noise = torch.randn(x0.shape[1:], generator=gen, dtype=torch.float32).to(device)
    xt = sch.scale_noise(x0, t.expand(b), noise.expand_as(x0)).to(dtype)
    if text is None:
        text = pipe.encode_prompt(list(prompts), device=device,
                                  max_sequence_length=max_sequence_length)
    states, pooled, txt_ids = text
    guidance = None
    if tr.config.guidance_embeds:
        guidance = torch.zeros(b, device=device, dtype=torch.float32)
    return dict(hidden_states=xt, timestep=(t / 1000).expand(b).to(dtype), guidance=guidance,
                pooled_projections=pooled.to(dtype), encoder_hidden_states=states.to(dtype),
                txt_ids=txt_ids.to(dtype), img_ids=img_ids, return_dict=False)


def _both_weightings(p: Tensor) -> Tensor:
    """``(B, H, N, N)`` heads -> ``(B, 2, N, N)``: the uniform and the λ2-weighted head mean."""
    p = p.to(torch.float32)
    p = torch.where(p < 1e-30, torch.zeros_like(p), p)  # subnormals slow LAPACK down
    # dense |lambda2| in float64: torch's float32 geev with 2 threads took 13.5 CPU-s for 40
    # matrices of 80 x 80 on the loaded 2-core CI machine, float64 0.08 s (same results)
    dense = p.shape[-1] <= ac.spectral.AUTO_DENSE_MAX_N
    lam = ac.head_mean(p, "lambda2", dtype=torch.float64 if dense else None)
    return torch.stack([ac.head_mean(p, "uniform"), lam.to(p.dtype)], 1)


class ChainAccumulator(Recorder):
    """A capture recorder that keeps one running sum over every recorded layer and call.

    Each call of a selected attention layer forms its ``(B, H, N, N)`` maps (in head blocks,
    as :class:`attnchain.capture.Recorder` does), reduces them to the uniform and the
    :math:`|\\lambda_2|`-weighted head mean, ``(B, 2, N, N)``, and adds that to the sum; nothing
    per layer or per step is kept. :attr:`chain` is the mean.

    Parameters
    ----------
    model : FluxTransformer2DModel or a pipeline holding one
    layers : as :func:`attnchain.capture`

    Examples
    --------
    >>> import torch, attnchain as ac
    >>> model, pre = ac.zoo.load("tiny-flux")
    >>> with torch.no_grad(), ChainAccumulator(model) as acc:
    ...     _ = model(**pre(torch.rand(2, 3, 8, 8)))
    ...     _ = model(**pre(torch.rand(2, 3, 8, 8)))
    >>> acc.chain.shape, acc.calls                      # 2 layers x 2 calls
    (torch.Size([2, 2, 68, 68]), 4)
    """

    def __init__(self, model, layers=None):
        super().__init__(model, layers=layers, weighting=_both_weightings, step_reduce="last")
        self._sum: Optional[Tensor] = None
        self.calls = 0
        self.chain_layout = None

    def _store_value(self, name, value, meta) -> None:
        layout = meta[0]
        if self._sum is None:
            self._sum, self.chain_layout = value.to(torch.float32).clone(), layout
        else:
            same = (layout.n, layout.text, layout.image, layout.grid) == (
                self.chain_layout.n, self.chain_layout.text, self.chain_layout.image,
                self.chain_layout.grid)
            if value.shape != self._sum.shape or not same:
                raise ValueError(f"{name}: a call of shape {tuple(value.shape)} ({layout}) "
                                 f"cannot join the running mean of {tuple(self._sum.shape)}")
            self._sum += value
        self.calls += 1
        step = max(self.step, 0)
        if step not in self.steps:
            self.steps.append(step)

    @property
    def chain(self) -> Tensor:
        """``(B, 2, N, N)`` mean over layers and calls; ``[:, 0]`` uniform, ``[:, 1]`` λ2."""
        if self._sum is None:
            raise ValueError("nothing recorded: run the model inside the context")
        return self._sum / self.calls


@torch.no_grad()
def joint_chains(pipe, pixels: Tensor, prompts: Sequence[str], protocol: Protocol):
    """The mean joint-attention chain of each image over blocks, steps and noise samples.

    Parameters
    ----------
    pipe : a FLUX pipeline
    pixels : Tensor (B, 3, R, R)
        Images in [-1, 1] at ``protocol.resolution``, on the pipeline's device.
    prompts : sequence of str
    protocol : Protocol

    Returns
    -------
    chains : Tensor (B, 2, N, N)
        Row-stochastic; index 1 of dim 1 is :data:`WEIGHTINGS` order.
    layout : attnchain.capture.TokenLayout
        Text and image positions and the image grid.
    """
    text = pipe.encode_prompt(list(prompts), device=pixels.device,
                              max_sequence_length=protocol.max_sequence_length)
    with ChainAccumulator(pipe.transformer, layers=list(protocol.layers)) as acc:
        for step in protocol.noise_steps:
            for seed in protocol.seeds:
                inputs = prepare_inputs(pipe, pixels, prompts, step, seed, protocol.num_steps,
                                        protocol.max_sequence_length, text=text)
                pipe.transformer(**inputs)
    chain = acc.chain
    return chain / chain.sum(-1, keepdim=True), acc.chain_layout


# ----------------------------------------------------------------------------------------------
# a known answer
def planted_two_step_chain(direction: str = "sink", grid=(4, 4), region=(1, 2, 5, 6, 9),
                           n_text: int = 3, seed: int = 0, dtype=torch.float64):
    r"""A joint ``[text; image]`` chain whose concept reaches its region only in two steps.

    Text token 0 is the concept, text token 1 a *bridge*; ``region`` lists image tokens (grid
    raster order). Every other row is random. ``"sink"``: the concept attends only to the
    bridge and the bridge only (uniformly) to the region, so :math:`e_0 M` has no mass on image
    tokens while :math:`e_0 M^2` is uniform on the region. ``"source"``: only the bridge attends
    to the concept, and only region tokens attend to the bridge, so one source step (column
    select) stays in the text and the second step lands on exactly the region.

    Returns
    -------
    A : Tensor (N, N)
        Row-stochastic, ``N = n_text + rows * cols``.
    layout : TokenLayout
    truth : BoolTensor (rows, cols)
        The region.

    Examples
    --------
    >>> A, layout, truth = planted_two_step_chain("sink")
    >>> maps = concept_maps(A[None, None].float(), layout, [[[0]]], max_bounces=2)
    >>> float(maps[("row_select", "uniform")].abs().max())
    0.0
    >>> bool(torch.equal(maps[("bounce_sink_2", "uniform")][0, 0] > 0, truth))
    True
    """
    from ..capture import TokenLayout

    if direction not in ("sink", "source"):
        raise ValueError(f"direction must be 'sink' or 'source', got {direction!r}")
    g = torch.Generator().manual_seed(seed)
    n_img = grid[0] * grid[1]
    N = n_text + n_img
    truth = torch.zeros(n_img, dtype=torch.bool)
    truth[list(region)] = True
    R = torch.nonzero(truth).flatten() + n_text
    A = torch.rand(N, N, generator=g, dtype=dtype)
    if direction == "sink":
        A[0] = 0.0
        A[0, 1] = 1.0
        A[1] = 0.0
        A[1, R] = 1.0
    else:
        A[:, 0] = 0.0
        A[1, 0] = 1.0
        A[:, 1] = 0.0
        A[R, 1] = 5.0
    A = A / A.sum(-1, keepdim=True)
    layout = TokenLayout(n=N, text=tuple(range(n_text)), image=tuple(range(n_text, N)),
                         grid=tuple(grid))
    return A, layout, truth.reshape(grid)


# ----------------------------------------------------------------------------------------------
# maps
def method_names(max_bounces: int) -> list:
    """The methods of the module docstring, in table order.

    Examples
    --------
    >>> method_names(2)
    ['row_select', 'column_select', 'bounce_sink_1', 'bounce_sink_2', 'bounce_source_1', 'bounce_source_2']
    """
    return (["row_select", "column_select"]
            + [f"bounce_sink_{n}" for n in range(1, max_bounces + 1)]
            + [f"bounce_source_{n}" for n in range(1, max_bounces + 1)])


def concept_maps(chains: Tensor, layout, concepts: Sequence[Sequence[Sequence[int]]],
                 max_bounces: int) -> dict:
    """Maps over the image grid of every concept by every method and weighting.

    Parameters
    ----------
    chains : Tensor (B, W, N, N)
        Row-stochastic chains, one per weighting (:data:`WEIGHTINGS` order, ``W <= 2``).
    layout : TokenLayout
        With ``image`` positions and ``grid``.
    concepts : per image, a list of concepts, each a list of token positions
        Every image must have the same number ``K`` of concepts (pad by repeating one and
        drop the copies' rows).
    max_bounces : int

    Returns
    -------
    dict
        ``{(method, weighting): Tensor (B, K, rows, cols)}``.

    Examples
    --------
    >>> import torch
    >>> from attnchain.capture import TokenLayout
    >>> lay = TokenLayout(n=6, text=(0, 1), image=(2, 3, 4, 5), grid=(2, 2))
    >>> A = torch.softmax(torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(0)), -1)
    >>> maps = concept_maps(A, lay, [[[1]]], max_bounces=2)
    >>> maps[("row_select", "uniform")].shape
    torch.Size([1, 1, 2, 2])
    >>> torch.allclose(maps[("row_select", "uniform")].flatten(), A[0, 0, 1, 2:])
    True
    """
    B, W, N, _ = chains.shape
    K = len(concepts[0])
    if any(len(c) != K for c in concepts) or len(concepts) != B:
        raise ValueError("concepts must list the same number of concepts for each of the "
                         f"{B} images")
    starts = torch.zeros(B, K, N, dtype=chains.dtype, device=chains.device)
    for b, per in enumerate(concepts):
        for k, pos in enumerate(per):
            starts[b, k, list(pos)] = 1.0 / len(pos)
    img = list(layout.image)
    grid = tuple(layout.grid)
    out = {}
    for w in range(W):
        A = chains[:, w][:, None]                       # (B, 1, N, N), broadcast over concepts
        for direction in ("sink", "source"):
            v = readouts.bounce_maps(A, starts, max_bounces, direction=direction, targets=img)
            for n in range(1, max_bounces + 1):
                out[(f"bounce_{direction}_{n}", WEIGHTINGS[w])] = v[:, :, n].reshape(B, K, *grid)
        out[("row_select", WEIGHTINGS[w])] = out[("bounce_sink_1", WEIGHTINGS[w])]
        out[("column_select", WEIGHTINGS[w])] = out[("bounce_source_1", WEIGHTINGS[w])]
    return out


# ----------------------------------------------------------------------------------------------
# scoring
def _resize_nearest(x: Tensor, size) -> Tensor:
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0]


def score_maps(maps: Tensor, masks: Tensor, eval_size: Optional[int] = None) -> dict:
    """Per-map counts and AP of grid maps against binary masks (ConceptAttention's protocol).

    Each map is min-max normalised, thresholded at its mean on its own grid, and the map, its
    thresholded mask and the ground truth are resized (nearest neighbour) to ``eval_size``
    squared (default: the ground truth's own size).

    Parameters
    ----------
    maps : Tensor (B, r, c)
    masks : Tensor (B, H, W)
        Ground truth, bool or 0/1.
    eval_size : int, optional

    Returns
    -------
    dict of ndarray (B,)
        ``pixels``, ``correct``, ``inter_fg``, ``union_fg``, ``inter_bg``, ``union_bg`` (counts
        for pooled accuracy and IoU, :func:`pooled_scores`), ``ap`` (average precision of the
        map against the mask, :func:`attnchain.metrics.ranking_metrics`, identical to
        :func:`sklearn.metrics.average_precision_score`; NaN for an empty or full mask),
        ``iou`` (the item's own foreground IoU at the mean threshold) and ``iou_best`` (its IoU
        at the best threshold of the map: an oracle).

    Examples
    --------
    >>> import torch
    >>> gt = torch.zeros(1, 4, 4, dtype=torch.bool); gt[0, :2, :2] = True
    >>> s = score_maps(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), gt)
    >>> float(s["ap"][0]), int(s["correct"][0]), int(s["pixels"][0])
    (1.0, 16, 16)
    """
    from ..metrics import ranking_metrics

    if maps.ndim != 3 or masks.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"maps (B, r, c) and masks (B, H, W) expected, got {tuple(maps.shape)} "
                         f"and {tuple(masks.shape)}")
    m = maps.detach().float()
    lo = m.flatten(1).amin(-1)[:, None, None]
    hi = m.flatten(1).amax(-1)[:, None, None]
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    pred = m > m.flatten(1).mean(-1)[:, None, None]
    size = tuple(masks.shape[-2:]) if eval_size is None else (eval_size, eval_size)
    gt = masks.to(m.device).bool()
    if tuple(gt.shape[-2:]) != size:
        gt = _resize_nearest(gt, size) > 0.5
    pred = _resize_nearest(pred, size) > 0.5
    score = _resize_nearest(m, size)
    tp = (pred & gt).flatten(1).sum(-1)
    tn = (~pred & ~gt).flatten(1).sum(-1)
    fp = (pred & ~gt).flatten(1).sum(-1)
    fn = (~pred & gt).flatten(1).sum(-1)
    counts = {"pixels": tp + tn + fp + fn, "correct": tp + tn, "inter_fg": tp,
              "union_fg": tp + fp + fn, "inter_bg": tn, "union_bg": tn + fp + fn}
    out = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in counts.items()}
    y = gt.flatten(1)
    ap, best = ranking_metrics(score.flatten(1), y)
    npos = y.sum(-1)
    ok = (npos > 0) & (npos < y.shape[1])
    out["ap"] = torch.where(ok, ap, torch.full_like(ap, float("nan"))).detach().cpu().numpy()
    out["iou_best"] = best.detach().cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["iou"] = np.where(out["union_fg"] > 0, out["inter_fg"] / out["union_fg"], 1.0)
    return out


def pooled_scores(table: pd.DataFrame, n_boot: int = 0, level: float = 0.95,
                  seed: int = 0) -> pd.DataFrame:
    """Accuracy, IoU and mAP per method and weighting, pooled as ConceptAttention pools them.

    ``acc`` = sum of correct pixels / sum of pixels; ``iou_fg`` and ``iou_bg`` = summed
    intersections / summed unions of the foreground and the background; ``miou`` = their mean;
    ``map`` = the mean over items of the per-item AP (NaN items left out). Values in percent.

    Parameters
    ----------
    table : pandas.DataFrame
        A task table (one row per item, concept, method, weighting and metric).
    n_boot : int
        With ``n_boot > 0``, percentile bootstrap intervals of ``acc``, ``miou`` and ``map``
        (columns ``*_low``, ``*_high``): the concepts are resampled with replacement and the
        pooled ratios recomputed on each resample.
    level, seed
        Confidence level and the seed of :func:`numpy.random.default_rng`.

    Examples
    --------
    >>> import pandas as pd
    >>> rows = [(0, "m", "-", k, v) for k, v in dict(pixels=4, correct=3, inter_fg=1,
    ...         union_fg=2, inter_bg=2, union_bg=3, ap=0.5).items()]
    >>> t = pd.DataFrame(rows, columns=["item", "method", "weighting", "metric", "value"])
    >>> pooled_scores(t).round(2).values.tolist()
    [[75.0, 50.0, 66.67, 58.33, 50.0, 1.0]]
    """
    ids = ["method", "weighting", "item"] + (["object"] if "object" in table else [])
    w = table.pivot_table(index=ids, columns="metric", values="value", sort=False,
                          aggfunc="first")
    rows, keys = [], []
    q = (1 - level) / 2
    for key, g in w.groupby(level=[0, 1], sort=False):
        c = {k: g[k].to_numpy(np.float64) for k in ("correct", "pixels", "inter_fg", "union_fg",
                                                     "inter_bg", "union_bg", "ap")}

        def stats(idx):
            tot = {k: v[idx].sum(-1) for k, v in c.items() if k != "ap"}
            acc = tot["correct"] / tot["pixels"]
            iou_fg = tot["inter_fg"] / tot["union_fg"]
            iou_bg = tot["inter_bg"] / tot["union_bg"]
            return acc, iou_fg, iou_bg, (iou_fg + iou_bg) / 2, np.nanmean(c["ap"][idx], -1)

        acc, iou_fg, iou_bg, miou, m_ap = stats(np.arange(len(g)))
        row = [100 * acc, 100 * iou_fg, 100 * iou_bg, 100 * miou, 100 * m_ap,
               int(np.isfinite(c["ap"]).sum())]
        if n_boot:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, len(g), size=(n_boot, len(g)))
            with np.errstate(invalid="ignore"):
                b_acc, _, _, b_miou, b_map = stats(idx)
            for v in (b_acc, b_miou, b_map):
                row += list(100 * np.nanquantile(v, [q, 1 - q]))
        rows.append(row)
        keys.append(key)
    cols = ["acc", "iou_fg", "iou_bg", "miou", "map", "n"]
    if n_boot:
        cols += [f"{m}_{b}" for m in ("acc", "miou", "map") for b in ("low", "high")]
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(keys, names=["method", "weighting"]),
                        columns=cols)


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
    :func:`concept_maps` ``column_select`` (the image tokens that attend to the object's colour
    and shape tokens, uniform head mean of one block, one noise sample) is scored against that
    object's own mask (other objects are negatives): mean AP over objects, per block and
    :math:`\\sigma`. Beside it: the same for the untrained twin (same architecture, seeded
    initialisation), a distance-matched kernel of each map (a Gaussian centred at the map's
    centre of mass with the same mean distance, :func:`_blob_maps`: what a blob at the right
    place scores), and chance (the object's area fraction).
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
def to_pixels(images, protocol: Protocol, device) -> Tensor:
    """Images -> ``(B, 3, R, R)`` in [-1, 1] on ``device``, ``R = protocol.resolution``.

    PIL images are resized to ``pre_resize`` squared (bicubic, as ConceptAttention's
    ``Resize((512, 512), BICUBIC)``) when it is set, converted to [0, 1], then brought to ``R``
    by nearest-neighbour interpolation (ConceptAttention's ``encode_image``); ``(B, 3, H, W)``
    tensors in [0, 1] skip the PIL step.

    Examples
    --------
    >>> to_pixels(torch.zeros(2, 3, 64, 64), OFFLINE, "cpu").shape
    torch.Size([2, 3, 64, 64])
    """
    from PIL import Image

    if isinstance(images, Tensor):
        x = images.float()
    else:
        arrs = []
        for im in images:
            im = im.convert("RGB")
            if protocol.pre_resize:
                im = im.resize((protocol.pre_resize, protocol.pre_resize), Image.BICUBIC)
            arrs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
                        .permute(2, 0, 1))
        if len({a.shape for a in arrs}) > 1:
            x = torch.stack([F.interpolate(a[None], size=(protocol.resolution,) * 2,
                                           mode="nearest")[0] for a in arrs])
        else:
            x = torch.stack(arrs)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
    if tuple(x.shape[-2:]) != (protocol.resolution,) * 2:
        x = F.interpolate(x, size=(protocol.resolution,) * 2, mode="nearest")
    return (x * 2 - 1).to(device)


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
        Default :data:`OFFLINE` for the scenes, :data:`FULL` for ImageNet-segmentation.
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
        of :func:`score_maps` for every method of :func:`method_names` and weighting, the
        reference maps (scenes) and the locality of the chain (``locality`` rows,
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


# ----------------------------------------------------------------------------------------------
# summaries
#: The paper's table (FLUX.1-schnell on ImageNet-segmentation), :cite:`erel2025attention`.
PAPER = pd.DataFrame(
    [["row select", 73.96, 54.65, 82.64], ["column select", 80.55, 64.02, 87.20],
     ["ConceptAttention (quoted)", 83.07, 71.04, 90.45],
     ["multi-bounce, uniform heads", 84.00, 70.02, 94.28],
     ["multi-bounce, λ2-weighted heads", 84.12, 70.20, 94.29]],
    columns=["method", "acc", "miou", "map"]).set_index("method")


def summarise(table: pd.DataFrame, methods: Optional[Sequence[str]] = None, n_boot: int = 0,
              seed: int = 0) -> pd.DataFrame:
    """Pooled accuracy, IoU and mAP per method and weighting (:func:`pooled_scores`, with
    bootstrap intervals over concepts when ``n_boot > 0``), and ``miou_ca``, ConceptAttention's
    published "mIoU" (Notes).

    Notes
    -----
    ConceptAttention's evaluation stacks ``(1 - mask, mask)`` and pools the histogram IoU of
    both channels; every pixel then counts once as foreground and once as background in both
    classes, and its "mIoU" equals :math:`a / (2 - a)` for the pooled accuracy :math:`a`
    (83.07 -> 71.04, its published pair). ``miou`` is the mean of the foreground and
    background IoUs.
    """
    t = table[table.object > 0] if "object" in table else table
    if methods is not None:
        t = t[t.method.isin(list(methods))]
    out = pooled_scores(t, n_boot=n_boot, seed=seed)
    out.insert(4, "miou_ca", 100 * out["acc"] / (200 - out["acc"]))
    return out


def versus(table: pd.DataFrame, pairs: Sequence[tuple], metrics_: Sequence[str] = ("ap", "iou"),
           n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Paired differences between (method, weighting) pairs per item and concept, with bootstrap
    intervals (:func:`attnchain.metrics.paired_bootstrap_ci`), in percent.

    Parameters
    ----------
    pairs : sequence of ((method_a, weighting_a), (method_b, weighting_b))
    metrics_ : per-concept metrics compared (``"ap"``, ``"iou"``, ``"acc"``)
    """
    from .. import metrics as M

    t = table[table.object > 0] if "object" in table else table
    rows, index = [], []
    for (ma, wa), (mb, wb) in pairs:
        for metric in metrics_:
            def values(m, w):
                s = t[(t.method == m) & (t.weighting == w)]
                if metric == "acc":
                    p = s.pivot_table(index=["item", "object"], columns="metric", values="value")
                    return p["correct"] / p["pixels"]
                return s[s.metric == metric].set_index(["item", "object"])["value"]
            a, b = values(ma, wa), values(mb, wb)
            both = pd.concat([a, b], axis=1, keys=["a", "b"]).dropna()
            if both.empty:
                continue
            d, lo, hi = M.paired_bootstrap_ci(both["a"], both["b"], n_boot=n_boot, seed=seed)
            index.append((f"{ma} [{wa}]", f"{mb} [{wb}]", metric))
            rows.append([len(both), 100 * both["a"].mean(), 100 * both["b"].mean(), 100 * d,
                         100 * lo, 100 * hi])
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["a", "b", "metric"]),
                        columns=["n", "mean_a", "mean_b", "diff", "low", "high"])


def bounce_table(table: pd.DataFrame, metric: str = "map") -> pd.DataFrame:
    """One pooled metric of every multi-bounce map: rows ``n``, columns (direction, weighting).

    Examples
    --------
    >>> import pandas as pd
    >>> rows = [(0, 1, f"bounce_{d}_{n}", w, k, v) for d in ("sink", "source") for n in (1, 2)
    ...         for w in WEIGHTINGS for k, v in dict(pixels=4, correct=3, inter_fg=1,
    ...         union_fg=2, inter_bg=2, union_bg=3, ap=0.5 + 0.1 * n).items()]
    >>> t = pd.DataFrame(rows, columns=["item", "object", "method", "weighting", "metric",
    ...                                 "value"])
    >>> bounce_table(t).round(1).loc[2].tolist()
    [70.0, 70.0, 70.0, 70.0]
    """
    s = summarise(table)
    out = {}
    for (method, w), row in s.iterrows():
        if method.startswith("bounce_"):
            _, direction, n = method.split("_")
            out.setdefault((direction, w), {})[int(n)] = row[metric]
    df = pd.DataFrame(out).sort_index()
    df.index.name = "n"
    df.columns.names = ["direction", "weighting"]
    return df


def paper_comparison(table: pd.DataFrame, n: Optional[int] = None,
                     direction: Optional[str] = None) -> pd.DataFrame:
    """Our pooled numbers beside the paper's table, row by row.

    The paper's multi-bounce rows are matched with our multi-bounce map of the ``direction``
    and ``n`` (default: the pair with the best uniform-heads mAP; the method column names it);
    row select and column select are the uniform head mean (the paper's baselines).

    Returns
    -------
    pandas.DataFrame
        Index: the paper's rows (ConceptAttention's row is quoted, not recomputed); columns
        ``ours`` (the method used), ``acc``, ``miou``, ``map``, ``miou_ca`` and the paper's
        ``paper_acc``, ``paper_miou``, ``paper_map``.
    """
    s = summarise(table)
    if n is None or direction is None:
        bounces = [(m, s.loc[(m, "uniform"), "map"]) for m, w in s.index
                   if m.startswith("bounce_") and w == "uniform"
                   and (direction is None or m.split("_")[1] == direction)
                   and (n is None or int(m.split("_")[2]) == n)]
        best = max(bounces, key=lambda t: t[1])[0]
    else:
        best = f"bounce_{direction}_{n}"
    pick = {"row select": ("row_select", "uniform"), "column select": ("column_select", "uniform"),
            "multi-bounce, uniform heads": (best, "uniform"),
            "multi-bounce, λ2-weighted heads": (best, "lambda2")}
    rows = []
    for name in PAPER.index:
        paper = PAPER.loc[name]
        if name in pick:
            m, w = pick[name]
            r = s.loc[(m, w)]
            ours = [f"{m} [{w}]", r["acc"], r["miou"], r["map"], r["miou_ca"]]
        else:
            ours = ["(not recomputed)", np.nan, np.nan, np.nan, np.nan]
        rows.append(ours + [paper["acc"], paper["miou"], paper["map"]])
    return pd.DataFrame(rows, index=PAPER.index,
                        columns=["ours", "acc", "miou", "map", "miou_ca", "paper_acc",
                                 "paper_miou", "paper_map"])
