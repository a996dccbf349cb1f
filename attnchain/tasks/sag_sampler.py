r"""The Self-Attention Guidance (SAG) sampler, its mask made by a replaceable rule.

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

The seed-paired evaluation of the mask rules is in :mod:`attnchain.tasks.sag`, IS / FID / KID in
:mod:`attnchain.tasks.image_metrics`.

**References**

Hong et al., "Improving Sample Quality of Diffusion Models Using Self-Attention Guidance",
ICCV 2023 :cite:`hong2023sag`; Erel et al., "Attention (as Discrete-Time Markov) Chains",
NeurIPS 2025 :cite:`erel2025attention`.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import attnchain as ac

from . import readouts

__all__ = ["MID_LAYER", "MASK_RULES", "mask_scores", "attention_mask", "gaussian_blur",
           "predict_x0", "predict_eps", "degrade", "decode", "sample"]

#: The layer SAG reads: the mid block's self-attention.
MID_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"

#: Named mask rules (a callable ``A -> v`` is accepted too; see :func:`mask_scores`).
MASK_RULES = ("column_sum", "tokenrank", "bounce_2", "bounce_3")


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
    attention_mask, degrade, attnchain.tasks.sag.evaluate
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
