"""A marker module for models written in this project.

Models that compute attention by hand (for example ``attnchain.zoo``'s feature-attention model)
pass their post-softmax weights through an :class:`AttentionProbs` module. It returns its input
unchanged; :func:`attnchain.capture` finds every such module and reads the weights from it, the
same way it reads timm, transformers and diffusers attention.
"""
from torch import Tensor, nn


class AttentionProbs(nn.Identity):
    """Identity on a ``(B, H, N_q, N_k)`` row-stochastic attention tensor; a capture point."""

    def forward(self, probs: Tensor) -> Tensor:  # noqa: D102 - identity
        return probs
