r"""Interventions: contexts that change what a model computes, and undo the change on exit.

:func:`attnchain.capture` *reads* a model's attention; an intervention *writes*: inside
``with remove_tokens(model, tokens):`` every forward pass of ``model`` runs without the chosen
image tokens. On exit, also when the block raises, every hook is removed and the model computes
exactly what it computed before (nothing of the model is replaced or modified in place).

Token removal is the intervention of the paper's token-masking experiment
:cite:`erel2025attention` and of the deletion metric :cite:`petsiuk2018rise`: rank the image
tokens, remove the top-ranked ones, and watch the classifier's accuracy fall.

Two ways to take a token out, for timm's ``VisionTransformer`` (which covers supervised ViT, CLIP
image towers, DINO and DINOv2 with registers):

``mode="remove"`` (default)
    The token is dropped from the sequence right after the position embedding is added (timm's
    ``patch_drop`` point, where ``PatchDropout`` drops tokens in training), so the tokens that stay
    **keep their positions** and their order; every block sees ``P + n − k`` tokens. The ``P``
    prefix tokens (CLS and registers) are never removed.
``mode="mask"``
    The token stays in the sequence, but no query may attend to it: a key mask is passed to every
    attention layer. The kept tokens then compute exactly what they compute with ``"remove"``
    (MLPs and layer norms act per token, and a key nobody attends to changes no output), so a
    head that reads the CLS token gives the same logits up to rounding. A head that pools the
    patch tokens (DINO's and DINOv2's linear heads average them) still averages the masked
    tokens, which keep evolving as queries: there the two modes differ.

Removing no token leaves the forward pass untouched (no hook runs), so the logits are
bit-identical to the model's own.

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
:cite:`erel2025attention`; Petsiuk, Das and Saenko, "RISE", BMVC 2018 :cite:`petsiuk2018rise`.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["MODES", "remove_tokens", "find_vit"]

#: The ways :func:`remove_tokens` takes a token out.
MODES = ("remove", "mask")


def find_vit(model: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` of ``model``: the model itself or its only such submodule.

    Raises
    ------
    ValueError
        ``model`` holds no timm VisionTransformer, or several.
    """
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return model
    found = [m for m in model.modules() if isinstance(m, VisionTransformer)] \
        if isinstance(model, nn.Module) else []
    if len(found) != 1:
        raise ValueError(f"token removal needs a model holding exactly one timm VisionTransformer; "
                         f"{type(model).__name__} holds {len(found)}")
    return found[0]


def _removal_mask(tokens, n: int, device) -> Tensor:
    """``tokens`` as a bool mask ``(B, n)``, True = remove."""
    t = torch.as_tensor(tokens)
    if t.dtype == torch.bool:
        if t.ndim != 2 or t.shape[1] != n:
            raise ValueError(f"a boolean token mask must have shape (batch, {n}) for the {n} "
                             f"image tokens, got {tuple(t.shape)}")
        return t.to(device)
    if t.dtype.is_floating_point or t.is_complex() or t.ndim != 2:
        raise ValueError("tokens must be a bool mask (batch, n_image) or integer indices "
                         f"(batch, k) of image tokens, got {t.dtype} of shape {tuple(t.shape)}")
    t = t.long()
    if t.numel() and bool(((t < 0) | (t >= n)).any()):
        raise ValueError(f"image token indices must lie in [0, {n}), got "
                         f"{int(t.min())} .. {int(t.max())}")
    mask = torch.zeros(t.shape[0], n, dtype=torch.bool)
    mask.scatter_(1, t.cpu(), True)
    if bool((mask.sum(1) != t.shape[1]).any()):
        raise ValueError("each row of token indices must name distinct tokens")
    return mask.to(device)


def _check_batch(x: Tensor, remove: Tensor, prefix: int) -> None:
    if x.shape[0] != remove.shape[0] or x.shape[1] != prefix + remove.shape[1]:
        raise ValueError(f"the model ran on {x.shape[0]} images of {x.shape[1] - prefix} image "
                         f"tokens, but tokens to remove were given for {remove.shape[0]} images "
                         f"of {remove.shape[1]}")


@contextlib.contextmanager
def remove_tokens(model: nn.Module, tokens, mode: str = "remove") -> Iterator[nn.Module]:
    r"""Run ``model`` without the chosen image tokens inside the ``with`` block.

    Parameters
    ----------
    model : torch.nn.Module
        A timm ``VisionTransformer`` or a module holding exactly one (a classifier wrapper).
    tokens : bool Tensor (B, n) or integer Tensor (B, k)
        Per image of the batch the model will run on, the image (patch) tokens to take out:
        a mask over the ``n`` image tokens (True = remove) or ``k`` distinct indices in
        ``[0, n)`` (grid order, row-major). Prefix tokens (CLS, registers) cannot be named.
        With ``mode="remove"`` every image must lose the same number of tokens.
    mode : {"remove", "mask"}
        See the module docstring.

    Yields
    ------
    torch.nn.Module
        ``model`` itself.

    Raises
    ------
    ValueError
        A bad ``mode``, malformed ``tokens``, a model without one timm VisionTransformer; inside
        the block, a forward pass on a batch whose size or token count differs from ``tokens``,
        or (``"remove"``) images losing different numbers of tokens.

    Examples
    --------
    >>> import torch
    >>> from attnchain.zoo.registry import build_tiny_timm_vit
    >>> vit = build_tiny_timm_vit().eval()           # CLS + 2 registers + 16 patches
    >>> x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> remove = torch.tensor([[0, 5, 6], [3, 9, 15]])
    >>> with torch.no_grad(), remove_tokens(vit, remove):
    ...     removed = vit(x)
    >>> with torch.no_grad(), remove_tokens(vit, remove, mode="mask"):
    ...     masked = vit(x)
    >>> torch.allclose(removed, masked, atol=1e-5)   # CLS-token head: the two modes agree
    True
    >>> with torch.no_grad(), remove_tokens(vit, torch.zeros(2, 16, dtype=torch.bool)):
    ...     same = vit(x)
    >>> torch.equal(same, vit(x).detach())           # nothing removed: bit-identical
    True

    See Also
    --------
    attnchain.tasks.token_masking : the token-masking evaluation built on it.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    vit = find_vit(model)
    prefix = int(vit.num_prefix_tokens)
    n = int(vit.patch_embed.num_patches)
    device = vit.pos_embed.device if vit.pos_embed is not None else next(vit.parameters()).device
    remove = _removal_mask(tokens, n, device)
    handles = []
    if bool(remove.any()):
        if mode == "remove":
            counts = remove.sum(1)
            if bool((counts != counts[0]).any()):
                raise ValueError(f"mode='remove' needs the same number of tokens removed from "
                                 f"every image, got {counts.tolist()}")
            handles.append(vit.patch_drop.register_forward_hook(_dropper(remove, prefix)))
        else:
            from timm.layers import Attention

            hook = _masker(remove, prefix)
            handles += [m.register_forward_pre_hook(hook, with_kwargs=True)
                        for m in vit.modules() if isinstance(m, Attention)]
            if not handles:
                raise ValueError("mode='mask' found no timm Attention layer in the model")
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _dropper(remove: Tensor, prefix: int):
    def hook(module, args, x):
        _check_batch(x, remove, prefix)
        keep = torch.cat([torch.ones(x.shape[0], prefix, dtype=torch.bool, device=x.device),
                          ~remove.to(x.device)], 1)
        index = keep.nonzero()[:, 1].reshape(x.shape[0], -1)  # kept positions, in order
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    return hook


def _masker(remove: Tensor, prefix: int):
    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        _check_batch(x, remove, prefix)
        attend = torch.cat([torch.ones(x.shape[0], prefix, dtype=torch.bool, device=x.device),
                            ~remove.to(x.device)], 1)[:, None, None, :]  # (B, 1, 1, N) keys
        given = kwargs.get("attn_mask")
        if given is None:
            mask = attend
        elif given.dtype == torch.bool:
            mask = given & attend
        else:
            mask = given.masked_fill(~attend, float("-inf"))
        return args, {**kwargs, "attn_mask": mask}
    return hook
