r"""Self-Attention Guidance (SAG) with a replaceable mask: column sum, TokenRank or any read-out.

SAG :cite:`hong2023sag` guides a diffusion sampler away from a version of its own prediction in
which the regions its self-attention singles out are blurred. At each step :math:`t` with latent
:math:`x_t` and noise prediction :math:`\epsilon_t = \epsilon_\theta(x_t, t)`:

1. read the head-mean self-attention :math:`A \in \mathbb{R}^{N \times N}` of the mid block
   (``mid_block.attentions.0.transformer_blocks.0.attn1``) of that same UNet call, under
   :func:`attnchain.capture` (the attention processors stay as they are);
2. mask the tokens the attention picks out: SAG's rule is the column sum
   :math:`m_j = [\sum_i A_{ij} > 1]`, which is :math:`N \cdot (u A)_j > 1` for the uniform
   distribution :math:`u`, one bounce of the chain from uniform; the TokenRank rule of Erel et al.
   :cite:`erel2025attention` is :math:`N \pi_j > 1` with :math:`\pi` the stationary distribution of
   the damped chain (:func:`attnchain.token_rank`, :math:`\alpha = 0.99`), the limit of many
   bounces; any other rule maps :math:`A` to a distribution :math:`v` and masks :math:`N v_j > 1`;
3. predict the clean latent :math:`\hat x_0` and the noise :math:`\hat\epsilon` from
   :math:`(x_t, \epsilon_t)`; blur :math:`\hat x_0` with a Gaussian (9 taps, :math:`\sigma = 1`)
   where the mask (resized to the latent, nearest) is on: :math:`\tilde x_0 = m \odot
   G * \hat x_0 + (1 - m) \odot \hat x_0`; re-noise it with the predicted noise,
   :math:`\tilde x_t = \sqrt{\bar\alpha_t}\,\tilde x_0 + \sqrt{1 - \bar\alpha_t}\,\hat\epsilon`;
4. guide: :math:`\epsilon \leftarrow \epsilon_t + s\,(\epsilon_t - \epsilon_\theta(\tilde x_t, t))`
   with the SAG scale :math:`s` (0.75); with classifier-free guidance the attention, the
   prediction and the degraded pass are the unconditional ones and the guidance is added to the
   CFG prediction.

With the column-sum rule :func:`sample` gives the images of diffusers'
``StableDiffusionSAGPipeline`` for the same components, seed and settings (tested); it runs on any
pipeline with a ``unet``, a ``scheduler`` and Stable Diffusion's ``encode_prompt``: SD1.5's, and the
offline profile's pixel-space :class:`attnchain.zoo.scene_unet.SceneDiffusionPipeline`.

:func:`evaluate` generates seed-paired samples of several methods on the task runner (resumable,
sharded with accelerate; the images are saved as PNG files beside the results), and
:func:`metrics_table` computes IS :cite:`salimans2016is`, FID :cite:`heusel2017fid` and KID
:cite:`binkowski2018kid` with torchmetrics from features of a model
(Inception-v3 in the full profile, the project's scene ViT offline), with bootstrap intervals over
samples and paired bootstrap intervals on the differences between methods.

**References**

Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance",
ICCV 2023 :cite:`hong2023sag`; Erel et al., "Attention (as Discrete-Time Markov) Chains",
NeurIPS 2025 :cite:`erel2025attention`.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

import attnchain as ac

from . import readouts
from ._runner import Runner

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
]

#: The layer SAG reads: the mid block's self-attention.
MID_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"

#: Named mask rules (a callable ``A -> v`` is accepted too; see :func:`mask_scores`).
MASK_RULES = ("column_sum", "tokenrank", "bounce_2", "bounce_3")

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
# the mask
def mask_scores(A: Tensor, rule: Union[str, Callable] = "column_sum", alpha: float = 0.99) -> Tensor:
    r"""Attention mass of each token relative to uniform, :math:`N v_j`, under a mask rule.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic head-mean self-attention.
    rule : {"column_sum", "tokenrank", "bounce_2", "bounce_3"} or callable
        ``"column_sum"``: :math:`v = u A` (SAG; :math:`N v_j = \sum_i A_{ij}`,
        :func:`attnchain.tasks.readouts.column_sum`); ``"tokenrank"``: :math:`v = \pi`, the
        stationary distribution of the damped chain (:func:`attnchain.tasks.readouts.token_rank_map`);
        ``"bounce_n"``: :math:`v = u A^n` (:func:`attnchain.tasks.readouts.bounce_maps` from the
        uniform distribution); a callable maps ``A`` to a distribution ``v`` of shape
        ``(..., N)``.
    alpha : float
        TokenRank damping.

    Returns
    -------
    Tensor, shape (..., N)
        :math:`N v`; SAG masks the tokens where it exceeds 1.

    Raises
    ------
    ValueError
        An unknown rule, a callable returning the wrong shape, or ``A`` not row-stochastic.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3], [0.0, 0.2, 0.8]])
    >>> mask_scores(A, "column_sum")
    tensor([0.6000, 1.3000, 1.1000])
    >>> (mask_scores(A, "tokenrank") > 1).tolist()
    [False, True, True]

    See Also
    --------
    attention_mask, attnchain.tasks.readouts.column_sum, attnchain.token_rank
    """
    n = A.shape[-1]
    if callable(rule):
        v = rule(A)
        if not isinstance(v, Tensor) or v.shape != A.shape[:-1]:
            raise ValueError(f"a mask rule must return a tensor of shape {tuple(A.shape[:-1])}, "
                             f"got {getattr(v, 'shape', type(v))}")
        return n * v
    if rule == "column_sum":
        return readouts.column_sum(A)
    if rule == "tokenrank":
        return n * readouts.token_rank_map(A, alpha=alpha)
    if isinstance(rule, str) and rule.startswith("bounce_") and rule[7:].isdigit():
        u = torch.full(A.shape[:-1], 1.0 / n, dtype=A.dtype, device=A.device)
        return n * readouts.bounce_maps(A, u, int(rule[7:]))[..., -1, :]
    raise ValueError(f"unknown mask rule {rule!r}: use one of {MASK_RULES} or a callable "
                     "A -> distribution over tokens")


def attention_mask(A: Tensor, grid, rule: Union[str, Callable] = "column_sum",
                   alpha: float = 0.99) -> Tensor:
    r"""SAG's mask on the token grid: :math:`N v_j > 1` (:func:`mask_scores`).

    Parameters
    ----------
    A : Tensor, shape (B, N, N) or (B, H, N, N)
        Self-attention; heads are averaged first (as SAG does).
    grid : (int, int)
        The token grid ``(h, w)`` with ``h * w = N``.
    rule, alpha
        As :func:`mask_scores`.

    Returns
    -------
    Tensor, shape (B, h, w)
        bool, True where the latent is blurred.

    Examples
    --------
    >>> import torch
    >>> A = torch.full((1, 4, 4), 0.25)
    >>> attention_mask(A, (2, 2)).any().item()     # uniform attention: nothing stands out
    False

    See Also
    --------
    mask_scores, degrade
    """
    if A.ndim == 4:
        A = A.mean(1)
    if A.ndim != 3:
        raise ValueError(f"attention must be (B, N, N) or (B, H, N, N), got {tuple(A.shape)}")
    h, w = (int(g) for g in grid)
    if h * w != A.shape[-1]:
        raise ValueError(f"grid {tuple(grid)} does not hold N = {A.shape[-1]} tokens")
    return (mask_scores(A, rule, alpha) > 1.0).reshape(A.shape[0], h, w)


# ---------------------------------------------------------------------------------------------
# the degradation
def gaussian_blur(x: Tensor, kernel_size: int = 9, sigma: float = 1.0) -> Tensor:
    r"""Per-channel Gaussian blur with reflect padding, :math:`G * x`.

    The kernel is :math:`g g^\top` with :math:`g_k \propto \exp(-k^2 / 2\sigma^2)` for
    ``kernel_size`` equally spaced :math:`k \in [-(K-1)/2, (K-1)/2]`, applied as one 2-D
    depthwise convolution (SAG's blur).

    Parameters
    ----------
    x : Tensor, shape (B, C, H, W)
    kernel_size : int
        Odd number of taps.
    sigma : float
        Width in pixels (latent cells).

    Returns
    -------
    Tensor, shape (B, C, H, W)

    Examples
    --------
    >>> import torch
    >>> x = torch.zeros(1, 1, 21, 21); x[0, 0, 10, 10] = 1
    >>> y = gaussian_blur(x)
    >>> round(float(y.sum()), 4), bool(y[0, 0, 10, 10] < 1)
    (1.0, True)
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    half = (kernel_size - 1) / 2
    k = torch.linspace(-half, half, kernel_size)
    g = torch.exp(-0.5 * (k / sigma) ** 2)
    g = (g / g.sum()).to(device=x.device, dtype=x.dtype)
    kernel = (g[:, None] @ g[None, :]).expand(x.shape[-3], 1, kernel_size, kernel_size)
    p = kernel_size // 2
    return F.conv2d(F.pad(x, [p, p, p, p], mode="reflect"), kernel, groups=x.shape[-3])


def _alpha_bar(scheduler, t, like: Tensor) -> Tensor:
    t = torch.as_tensor(t).to(scheduler.alphas_cumprod.device)
    return scheduler.alphas_cumprod[t].to(device=like.device, dtype=like.dtype)


def predict_x0(scheduler, sample: Tensor, model_output: Tensor, t) -> Tensor:
    r"""The clean latent implied by a model output: for :math:`\epsilon`-prediction
    :math:`\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\epsilon) / \sqrt{\bar\alpha_t}`
    (``"sample"`` and ``"v_prediction"`` as in DDIM :cite:`song2021ddim`)."""
    a = _alpha_bar(scheduler, t, sample)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - a).sqrt() * model_output) / a.sqrt()
    if kind == "sample":
        return model_output
    if kind == "v_prediction":
        return a.sqrt() * sample - (1 - a).sqrt() * model_output
    raise ValueError(f"prediction_type {kind!r} is not epsilon, sample or v_prediction")


def predict_eps(scheduler, sample: Tensor, model_output: Tensor, t) -> Tensor:
    r"""The noise implied by a model output (:math:`\epsilon` itself for
    :math:`\epsilon`-prediction)."""
    a = _alpha_bar(scheduler, t, sample)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return model_output
    if kind == "sample":
        return (sample - a.sqrt() * model_output) / (1 - a).sqrt()
    if kind == "v_prediction":
        return (1 - a).sqrt() * sample + a.sqrt() * model_output
    raise ValueError(f"prediction_type {kind!r} is not epsilon, sample or v_prediction")


def degrade(scheduler, x0: Tensor, mask: Tensor, t, eps: Tensor, kernel_size: int = 9,
            sigma: float = 1.0) -> Tensor:
    r"""SAG's degraded latent: blur ``x0`` under the mask, then re-noise it to step ``t``.

    Parameters
    ----------
    scheduler
        A diffusers scheduler (its ``add_noise`` and ``alphas_cumprod``).
    x0 : Tensor, shape (B, C, H, W)
        Predicted clean latent.
    mask : Tensor, shape (B, h, w)
        Token mask (:func:`attention_mask`), resized to ``(H, W)`` by nearest neighbour.
    t : int or 0-d Tensor
        The timestep.
    eps : Tensor, shape (B, C, H, W)
        Predicted noise, used to re-noise.
    kernel_size, sigma
        The blur (:func:`gaussian_blur`).

    Returns
    -------
    Tensor, shape (B, C, H, W)
        :math:`\sqrt{\bar\alpha_t}(m \odot G * x_0 + (1 - m) \odot x_0) +
        \sqrt{1 - \bar\alpha_t}\,\epsilon`.
    """
    m = mask.to(x0.dtype)[:, None].expand(-1, x0.shape[1], -1, -1)
    m = F.interpolate(m, x0.shape[-2:])
    blurred = gaussian_blur(x0, kernel_size, sigma) * m + x0 * (1 - m)
    tt = torch.as_tensor(t, device=x0.device).reshape(1)
    return scheduler.add_noise(blurred, noise=eps, timesteps=tt)


# ---------------------------------------------------------------------------------------------
# the sampler
def decode(pipe, latents: Tensor) -> Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] from latents: the VAE of a latent pipeline, or the
    pipeline's own ``decode`` (pixel space)."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return pipe.decode(latents)
    img = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return (img.float() / 2 + 0.5).clamp(0, 1)


def _initial_latents(pipe, batch: int, generator, latents: Optional[Tensor], device, dtype,
                     height: Optional[int], width: Optional[int]) -> Tensor:
    from diffusers.utils.torch_utils import randn_tensor

    scale = getattr(pipe, "vae_scale_factor", 1)
    size = pipe.unet.config.sample_size
    h = (height or size * scale) // scale
    w = (width or size * scale) // scale
    shape = (batch, pipe.unet.config.in_channels, h, w)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    return latents.to(device) * pipe.scheduler.init_noise_sigma


def _step_kwargs(scheduler, generator, eta: float) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


@torch.no_grad()
def sample(pipe, prompt: Union[str, Sequence[str]] = "", *, rule: Union[str, Callable, None]
           = "column_sum", sag_scale: float = 0.75, guidance_scale: float = 1.0,
           num_inference_steps: int = 50, num_images_per_prompt: int = 1, generator=None,
           latents: Optional[Tensor] = None, eta: float = 0.0, alpha: float = 0.99,
           kernel_size: int = 9, sigma: float = 1.0, layer: str = MID_LAYER,
           height: Optional[int] = None, width: Optional[int] = None,
           return_masks: bool = False, progress: bool = False) -> dict:
    r"""Sample with Self-Attention Guidance, its mask made by ``rule``.

    Parameters
    ----------
    pipe
        A diffusers pipeline with ``unet`` (``UNet2DConditionModel``), ``scheduler`` and Stable
        Diffusion's ``encode_prompt``; a ``vae`` (latent diffusion) or none (pixel space, with
        ``pipe.decode``).
    prompt : str or list of str
        ``""`` samples unconditionally (the paper's setting).
    rule : str, callable or None
        The mask rule (:func:`mask_scores`); None (or ``sag_scale = 0``) samples without SAG.
    sag_scale : float
        :math:`s` of the guidance update (0.75 in diffusers and the SAG paper).
    guidance_scale : float
        Classifier-free guidance scale (> 1 turns it on, as in diffusers).
    num_inference_steps, num_images_per_prompt, generator, latents, eta, height, width
        As diffusers' pipelines (``eta`` and ``generator`` reach the scheduler's ``step`` when
        it takes them).
    alpha : float
        TokenRank damping (rule ``"tokenrank"``).
    kernel_size, sigma : int, float
        The blur of :func:`degrade`.
    layer : str
        The self-attention SAG reads (:data:`MID_LAYER`).
    return_masks : bool
        Also return the mask of every step, ``(steps, B, h, w)``.
    progress : bool
        A tqdm bar over steps.

    Returns
    -------
    dict
        ``images`` ``(B, 3, H, W)`` in [0, 1] (float32, on the pipeline's device), ``latents``
        (the final latents), ``mask_fraction`` ``(B,)`` (mean fraction of masked tokens over the
        steps; NaN without SAG) and, with ``return_masks``, ``masks``.

    Notes
    -----
    The attention is the head mean of the recorded post-softmax map of ``layer`` in the first UNet
    call of each step (:func:`attnchain.capture`); with classifier-free guidance its
    unconditional half is used, as in the SAG paper's equation (25) and diffusers.

    See Also
    --------
    attention_mask, degrade, evaluate
    """
    from tqdm.auto import tqdm

    unet, sched = pipe.unet, pipe.scheduler
    device = unet.device
    if isinstance(prompt, str):
        batch = 1
    else:
        batch = len(prompt)
    cfg = guidance_scale > 1.0
    use_sag = rule is not None and sag_scale > 0
    cond, uncond = pipe.encode_prompt(prompt, device, num_images_per_prompt, cfg)[:2]
    emb = torch.cat([uncond, cond]) if cfg else cond
    sched.set_timesteps(num_inference_steps, device=device)
    x = _initial_latents(pipe, batch * num_images_per_prompt, generator, latents, device,
                         emb.dtype, height, width)
    extra = _step_kwargs(sched, generator, eta)
    masks, fractions = [], []
    for t in tqdm(sched.timesteps, disable=not progress, desc="sampling"):
        inp = sched.scale_model_input(torch.cat([x] * 2) if cfg else x, t)
        if use_sag:
            with ac.capture(unet, layers=layer, weighting="uniform", step_reduce="last") as rec:
                eps = unet(inp, t, encoder_hidden_states=emb).sample
            A, grid = rec.attentions[layer], rec.tokens[layer].grid
        else:
            eps = unet(inp, t, encoder_hidden_states=emb).sample
        if cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps_u = eps
        if use_sag:
            A_u = A.chunk(2)[0] if cfg else A
            mask = attention_mask(A_u, grid, rule, alpha)
            x0 = predict_x0(sched, x, eps_u, t)
            bad = degrade(sched, x0, mask, t, predict_eps(sched, x, eps_u, t), kernel_size, sigma)
            emb_u = emb.chunk(2)[0] if cfg else emb
            eps_bad = unet(bad, t, encoder_hidden_states=emb_u).sample
            eps = eps + sag_scale * (eps_u - eps_bad)
            fractions.append(mask.flatten(1).float().mean(1))
            if return_masks:
                masks.append(mask)
        x = sched.step(eps, t, x, **extra).prev_sample
    out = {"images": decode(pipe, x), "latents": x,
           "mask_fraction": torch.stack(fractions).mean(0) if fractions
           else torch.full((x.shape[0],), float("nan"), device=x.device)}
    if return_masks:
        out["masks"] = torch.stack(masks) if masks else None
    return out


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
        Sampler settings (:func:`sample`); ``prompt=""`` is unconditional generation.
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
        :func:`metrics_table` scores them.
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
    JSON): everything :func:`metrics_table` and :func:`paired_differences` need, in one small
    file a chapter can read (:func:`load_results`) and a test can check (:func:`check_results`).
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
    """Regenerate ``items`` of a :func:`load_results` file with :func:`sample` and compare.

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


# ---------------------------------------------------------------------------------------------
# features and metrics
class _Given(torch.nn.Module):
    """Feature "extractor" of precomputed features: torchmetrics' metrics on given vectors."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = int(d)

    def forward(self, x: Tensor) -> Tensor:
        return x


class _InceptionStandIn(torch.nn.Module):
    """CI's stand-in for the FID Inception: torchvision's Inception-v3 stem (random weights) up
    to its first max pool, averaged over space (torchmetrics' ``feature=64``), and a seeded
    random linear map to 1000 logits."""

    def __init__(self, seed: int = 0):
        super().__init__()
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                                  init_weights=True)
            self.stem = torch.nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3,
                                            net.Conv2d_2b_3x3, net.maxpool1)
            self.fc = torch.nn.Linear(64, 1000)

    def forward(self, x: Tensor):
        x = F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear",
                          align_corners=False)
        pool = self.stem((x - 0.5) / 0.5).mean((-2, -1))
        return pool, self.fc(pool)


class Features:
    r"""Features of images for IS / FID / KID: ``(pool, logits)`` of a classifier.

    ``"inception"`` (full profile): the FID Inception-v3 of torch-fidelity (the network
    torchmetrics uses: 2048-d pool features for FID and KID, the unbiased 1008 logits for IS,
    from uint8 images at any size), the features of the papers' tables. Under ``ATTNCHAIN_WEIGHTS=random`` (CI) a reduced
    stand-in, since the FID weights are a download and a 2048-d FID is slow on a CPU:
    torchvision's Inception-v3 stem with random weights, 64-d features (torchmetrics'
    ``feature=64`` layer) and random logits. ``"scene-vit"`` (offline): the project's scene ViT
    on the image resized to 64 px: its pooled 96-d features for FID and KID, its 4 class logits
    for IS, and its presence probabilities for the scene-validity rate (``valid``: the largest
    presence probability above 0.5).
    """

    def __init__(self, name: str = "scene-vit", device=None):
        self.name = name
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name == "scene-vit":
            self.model, self.pre = ac.zoo.load("scene-vit", device=self.device)
        elif name == "inception":
            if ac.zoo.weights() == "random":
                self.model = _InceptionStandIn().to(self.device).eval()
            else:
                from torch_fidelity.feature_extractor_inceptionv3 import \
                    FeatureExtractorInceptionV3
                self.model = FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048", "logits_unbiased"]).to(self.device).eval()
        else:
            raise ValueError(f"features must be 'scene-vit' or 'inception', got {name!r}")

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 100) -> dict:
        """``images`` ``(n, 3, H, W)`` uint8 -> ``{"pool", "logits"[, "valid"]}`` on the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (n, 3, H, W) uint8, got {images.dtype} "
                             f"{tuple(images.shape)}")
        pool, logits = [], []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(self.device)
            p, lg = self._one(x)
            pool.append(p.float().cpu())
            logits.append(lg.float().cpu())
        pool, logits = torch.cat(pool), torch.cat(logits)
        out = {"pool": pool, "logits": logits}
        if self.name == "scene-vit":
            out["valid"] = (torch.sigmoid(logits).amax(-1) > 0.5).double()
        return out

    def _one(self, x: Tensor):
        if self.name == "scene-vit":
            size = self.model.patch_embed.img_size
            xf = F.interpolate(x.float() / 255, size=tuple(size), mode="bilinear",
                               antialias=True, align_corners=False)
            feats = self.model.forward_features((xf - 0.5) / 0.5)
            return self.model.forward_head(feats, pre_logits=True), self.model.forward_head(feats)
        pool, logits = self.model(x)
        return pool, logits


def _set_metrics(real: Tensor, fake: Tensor, logits: Tensor, is_splits: int,
                 kid_subsets: int, kid_size: int, seed: int) -> dict:
    """IS, FID, KID of one set of fake features (torchmetrics), real features fixed."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake, logits = real.double(), fake.double(), logits.double()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        torch.manual_seed(seed)
        fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
        fid.update(real, real=True)
        fid.update(fake, real=False)
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=kid_subsets,
                                      subset_size=min(kid_size, len(real), len(fake)))
        kid.update(real, real=True)
        kid.update(fake, real=False)
        return {"IS": _inception_score(logits, is_splits, seed), "FID": float(fid.compute()),
                "KID": float(kid.compute()[0])}


def _inception_score(logits: Tensor, splits: int, seed: int) -> float:
    """torchmetrics' Inception Score of given logits (its random split order seeded)."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        torch.manual_seed(seed)
        inc = InceptionScore(feature=_Given(logits.shape[1]), splits=min(splits, len(logits)))
        inc.update(logits.double())
        return float(inc.compute()[0])


class _FrechetToReference:
    r"""FID of many fake sets against one fixed reference, exactly and fast.

    With :math:`S = \Sigma_r^{1/2}` (symmetric, computed once),
    :math:`\operatorname{tr}(\Sigma_r\Sigma_f)^{1/2} = \operatorname{tr}(S\Sigma_f S)^{1/2}`, the
    sum of the square roots of the eigenvalues of a symmetric PSD matrix; with
    :math:`\Sigma_f = X_c^\top X_c` they are those of the :math:`n \times n` Gram matrix
    :math:`(X_c S)(X_c S)^\top` when :math:`n < d`. The same number as torchmetrics' FID (tested),
    in :math:`O(n d^2)` per set instead of a :math:`d \times d` non-symmetric eigenproblem.
    """

    def __init__(self, real: Tensor):
        real = real.double()
        self.mu = real.mean(0)
        cov = torch.cov(real.T)
        w, V = torch.linalg.eigh(cov)
        self.S = (V * w.clamp_min(0).sqrt()) @ V.T
        self.tr = float(cov.trace())

    def __call__(self, fake: Tensor) -> float:
        fake = fake.double()
        n = len(fake)
        xc = (fake - fake.mean(0)) / (n - 1) ** 0.5
        y = xc @ self.S
        g = y @ y.T if n < y.shape[1] else y.T @ y
        root = torch.linalg.eigvalsh(g).clamp_min(0).sqrt().sum()
        d = (self.mu - fake.mean(0)).square().sum()
        return float(d + self.tr + xc.square().sum() - 2 * root)


def metrics_table(features: dict, reference: dict, n_boot: int = 200, level: float = 0.95,
                  is_splits: int = 10, kid_subsets: int = 100, kid_size: int = 1000,
                  seed: int = 0, baseline: str = "none",
                  pairs: Optional[Sequence[tuple]] = None) -> tuple:
    r"""IS, FID and KID of every method with bootstrap intervals, and paired differences.

    Parameters
    ----------
    features : dict
        ``{method: Features(...)(images)}``, the samples of every method in the same item order
        (seed-paired).
    reference : dict
        ``Features(...)(real images)``: the reference set of FID and KID.
    n_boot : int
        Bootstrap resamples of the samples (the reference stays fixed); 0 for none.
    level : float
        Confidence level of the percentile intervals.
    is_splits, kid_subsets, kid_size : int
        IS splits and KID subsets of ``min(kid_size, n_real, n_fake)`` samples (torch-fidelity's
        10, 100 and 1000).
    seed : int
        Seed of the resampling and of KID's and IS's random subsets.
    baseline : str
        The method the differences are taken against.
    pairs : sequence of (str, str), optional
        The differences ``a − b`` to report instead, e.g. ``[("sag", "none"),
        ("sag_tokenrank", "sag")]``; the index of ``differences`` is then ``"a - b"``.

    Returns
    -------
    table : pandas.DataFrame
        Index ``method``; per metric (``IS``, ``FID``, ``KID`` and, for scene-ViT features,
        ``valid``: the scene-validity rate) the value on all samples (torchmetrics) and
        ``<metric> low`` / ``<metric> high``.
    differences : pandas.DataFrame
        Index ``method`` (all but the baseline; ``"a - b"`` with ``pairs``); per metric
        ``method − baseline`` and its paired interval: the same resampled seeds for both methods
        in every resample.

    Notes
    -----
    The values on all samples are torchmetrics' ``InceptionScore``, ``FrechetInceptionDistance``
    and ``KernelInceptionDistance`` on the given features :cite:`salimans2016is`
    :cite:`heusel2017fid` :cite:`binkowski2018kid`. In each bootstrap resample: IS as above; KID
    as torchmetrics' with one subset of ``min(n_real, n)`` samples (the unbiased MMD² of the
    resample against a random subset of the reference); FID by the exact formula of
    torchmetrics evaluated through the symmetric square root of the fixed reference covariance
    (tested equal), because a :math:`2048 \times 2048` eigenproblem per resample is too slow.
    """
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    methods = list(features)
    n = len(features[methods[0]]["pool"])
    if any(len(f["pool"]) != n for f in features.values()):
        raise ValueError("every method needs the same samples (seed-paired)")
    if n < 2:
        raise ValueError("the metrics need at least 2 samples per method")
    real = reference["pool"].double()
    frechet = _FrechetToReference(real)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, n, n) for _ in range(n_boot)]
    vals = {m: [] for m in methods}
    for m in methods:
        f = features[m]
        r = _set_metrics(real, f["pool"], f["logits"], is_splits, kid_subsets, kid_size, seed)
        if "valid" in f:
            r["valid"] = float(f["valid"].mean())
        vals[m].append(r)
    for b, ix in enumerate(boots):
        it = torch.from_numpy(ix)
        for m in methods:
            f = features[m]
            fake, logits = f["pool"][it].double(), f["logits"][it].double()
            r = {"IS": _inception_score(logits, is_splits, seed + b + 1)}
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features")
                torch.manual_seed(seed + b + 1)
                kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=1,
                                              subset_size=min(len(real), n))
                kid.update(real, real=True)
                kid.update(fake, real=False)
                r["KID"] = float(kid.compute()[0])
            r["FID"] = frechet(fake)
            if "valid" in f:
                r["valid"] = float(f["valid"][it].mean())
            vals[m].append(r)
    q = [(1 - level) / 2, (1 + level) / 2]

    def summary(d: pd.DataFrame) -> dict:
        row = {}
        for k in d.columns:
            lo, hi = np.quantile(d[k].iloc[1:], q) if n_boot else (np.nan, np.nan)
            row.update({k: d[k].iloc[0], f"{k} low": lo, f"{k} high": hi})
        return row

    rows = {m: summary(pd.DataFrame(vals[m])) for m in methods}
    if pairs is None:
        diffs = {m: summary(pd.DataFrame(vals[m]) - pd.DataFrame(vals[baseline]))
                 for m in methods if m != baseline and baseline in vals}
    else:
        bad = [p for p in pairs if len(p) != 2 or p[0] not in vals or p[1] not in vals]
        if bad:
            raise ValueError(f"pairs must be (method, method) of {methods}, got {bad}")
        diffs = {f"{a} - {b}": summary(pd.DataFrame(vals[a]) - pd.DataFrame(vals[b]))
                 for a, b in pairs}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")
    differences = pd.DataFrame.from_dict(diffs, orient="index").rename_axis("method")
    return table, differences


def paired_differences(table: pd.DataFrame, metric: str = "mask_fraction", a: str = "sag_tokenrank",
                       b: str = "sag", n_boot: int = 10000) -> pd.DataFrame:
    """Paired bootstrap difference of a per-sample number of :func:`evaluate` between methods
    (e.g. how much more of the image TokenRank masks than the column sum)."""
    from ._runner import compare

    return compare(table[table.metric == metric], "method", a, b, n_boot=n_boot)


def reference_scenes(n: int = 1000, size: int = 32) -> Tensor:
    """Held-out real scenes, the offline reference set: ``benchmark("easy", n, size)`` as uint8
    (rounded as the PNG samples are)."""
    from attnchain.data import scenes

    imgs = scenes.generate(n, scenes.BENCHMARK_SEED, "easy", size).images
    return (imgs * 255).round().to(torch.uint8)


def reference_folder(folder, n: Optional[int] = None, size: int = 512) -> Tensor:
    """Real images of a folder (``*.jpg``, ``*.jpeg``, ``*.png``, sorted by name, the first ``n``),
    resized (shorter side) and centre-cropped to ``size``: ``(n, 3, size, size)`` uint8. The
    full profile's reference set (we use COCO-2017 val, :func:`coco_val2017`)."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise ValueError(f"no images (*.jpg, *.jpeg, *.png) in {folder}")
    files = files[:n] if n else files
    out = []
    for p in files:
        im = Image.open(p).convert("RGB")
        s = size / min(im.size)
        im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))),
                       Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


#: COCO-2017 validation images (5,000), the full profile's FID reference set.
COCO_VAL2017_URL = "http://images.cocodataset.org/zips/val2017.zip"


def coco_val2017(root, url: str = COCO_VAL2017_URL) -> Path:
    """The folder ``root/val2017`` of COCO-2017's 5,000 validation images, downloaded and
    unpacked on first use (778 MB)."""
    import urllib.request
    import zipfile

    root = Path(root)
    folder = root / "val2017"
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "val2017.zip"
    if not archive.exists():
        tmp = archive.with_suffix(".zip.part")
        urllib.request.urlretrieve(url, tmp)
        tmp.replace(archive)
    with zipfile.ZipFile(archive) as z:
        z.extractall(root)
    if not folder.is_dir():
        raise ValueError(f"{archive} holds no val2017/ folder")
    return folder
