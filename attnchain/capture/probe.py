"""A marker module for models written in this project.

Models that compute attention by hand (for example ``attnchain.zoo``'s feature-attention model)
pass their post-softmax weights through an :class:`AttentionProbs` module. It returns its input
unchanged; :func:`attnchain.capture` finds every such module and reads the weights from it, the
same way it reads timm, transformers and diffusers attention.
"""
from torch import Tensor, nn


class AttentionProbs(nn.Identity):
    """Identity on a ``(B, H, N_q, N_k)`` row-stochastic attention tensor; a capture point.

    Examples
    --------
    >>> import torch, attnchain as ac
    >>> from torch import nn
    >>> class Attn(nn.Module):
    ...     tokens = {"image": (0, 4), "grid": (2, 2)}
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.probs = AttentionProbs()
    ...     def forward(self, x):
    ...         return self.probs(torch.softmax(x @ x.mT, -1)[:, None]) @ x[:, None]
    >>> model = Attn()
    >>> with ac.capture(model) as rec:
    ...     _ = model(torch.randn(2, 4, 3))
    >>> list(rec.attentions), rec.layout.grid
    (['probs'], (2, 2))
    """

    def forward(self, probs: Tensor) -> Tensor:  # noqa: D102 - identity
        return probs
