r"""The protocol, joint attention chains and concept maps of concept segmentation (chapter 8).

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

The maps are scored in :mod:`attnchain.tasks.concept_scores`; the resumable evaluation over a
dataset is :func:`attnchain.tasks.concept_segmentation.evaluate`.

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
:cite:`erel2025attention`; Helbling et al., "ConceptAttention", ICML 2025
:cite:`helbling2025conceptattention`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import attnchain as ac

from ..capture.recorder import Recorder
from . import readouts

__all__ = ["WEIGHTINGS", "Protocol", "OFFLINE", "FULL", "ChainAccumulator", "token_positions",
           "prepare_inputs", "joint_chains", "method_names", "concept_maps", "to_pixels",
           "planted_two_step_chain", "pipeline_device"]

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
# images
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
