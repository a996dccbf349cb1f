r"""``scene-flux``: a small FLUX-architecture text-to-image model trained by the project on scenes.

The offline profile of the segmentation chapter needs a model of FLUX's own class, so that the
capture adapter and the task code that run on FLUX.1-schnell run on it unchanged. This module
builds it as a :class:`diffusers.FluxPipeline` subclass whose components play FLUX's parts:

``transformer``
    a diffusers :class:`~diffusers.FluxTransformer2DModel` (2 double-stream and 4 single-stream
    blocks, 4 heads of 32 dimensions, joint attention over ``[text; image]``, RoPE on the image
    grid), trained with FLUX's rectified-flow objective by :mod:`attnchain.zoo.train_scene_flux`.
``text_encoder``, ``text_encoder_2`` (the CLIP and T5 parts)
    the pretrained MiniLM (``all-MiniLM-L6-v2``, shipped by PyPI), frozen: its token states are
    the ``encoder_hidden_states`` (T5's role, padded to ``max_sequence_length`` tokens as FLUX
    pads T5), its mean-pooled, normalised sentence embedding is ``pooled_projections`` (CLIP's).
``vae``
    :class:`PixelShuffleAutoencoder`, an exact, fixed autoencoder: a space-to-depth by 4 of the
    image in [-1, 1] (64 x 64 x 3 -> 16 x 16 x 48), standardised by a scaling and shift factor
    as FLUX standardises its VAE latents. The pipeline then packs 2 x 2 latent patches into one
    token, as for FLUX: a 64-pixel scene is an 8 x 8 grid of 192-dimensional image tokens, one
    token per 8 x 8 pixels (the patch size of ``scene-vit``). **Pixel space, not a learned
    latent**: no pretrained VAE ships offline, and training one would take the training budget;
    the scenes are simple enough that flow matching in pixel space works.
``scheduler``
    :class:`~diffusers.FlowMatchEulerDiscreteScheduler` with FLUX.1-schnell's configuration
    (shift 1, no dynamic shifting).

So ``pipe("a red circle and a blue square", height=64, width=64)`` samples a scene with
FLUX's own sampling loop, and the segmentation task encodes a scene with ``pipe.vae``, packs it
with ``pipe._pack_latents`` and calls ``pipe.transformer`` exactly as it does for FLUX.1-schnell.

**References**

:cite:`bfl2024flux`; flow matching and rectified flow :cite:`lipman2023flowmatching`
:cite:`liu2023rectifiedflow`; logit-normal timestep sampling :cite:`esser2024sd3`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = ["DEFAULT_CONFIG", "WEIGHTS_DIR", "WEIGHTS_FILE", "INFO_FILE", "weights_digest", "MAX_SEQUENCE_LENGTH",
           "PixelShuffleAutoencoder", "SceneFluxPipeline", "make_transformer", "make_scheduler",
           "make_pipeline", "build", "load_info"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "scene_flux.pt"
INFO_FILE = "scene_flux.json"
#: Text tokens per prompt (MiniLM states padded as FLUX pads T5; a 3-object caption has 14).
MAX_SEQUENCE_LENGTH = 16

#: The transformer's configuration (diffusers ``FluxTransformer2DModel`` arguments).
DEFAULT_CONFIG = dict(patch_size=1, in_channels=192, num_layers=2, num_single_layers=4,
                      attention_head_dim=32, num_attention_heads=4, joint_attention_dim=384,
                      pooled_projection_dim=384, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def _diffusers_classes():
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    return ConfigMixin, ModelMixin, register_to_config


ConfigMixin, ModelMixin, register_to_config = _diffusers_classes()


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
    r"""An exact "VAE" for pixel-space flow matching: space-to-depth, standardised.

    ``encode`` maps an image :math:`x \in [-1, 1]^{3 \times H \times W}` to
    ``pixel_unshuffle(x, factor)`` of shape ``(3 factor², H / factor, W / factor)``;
    ``decode`` is its inverse. The pipeline standardises latents as
    ``(z - shift_factor) * scaling_factor`` (FLUX's convention), with the factors measured on
    the training scenes.

    Parameters
    ----------
    factor : int
        Spatial down-sampling (a power of two).
    scaling_factor, shift_factor : float
        Latent standardisation (``config.scaling_factor``, ``config.shift_factor``).

    Examples
    --------
    >>> vae = PixelShuffleAutoencoder(factor=4)
    >>> x = torch.rand(2, 3, 64, 64) * 2 - 1
    >>> z = vae.encode(x).latent_dist.mode()
    >>> z.shape, bool(torch.equal(vae.decode(z).sample, x))
    (torch.Size([2, 48, 16, 16]), True)
    """

    @register_to_config
    def __init__(self, factor: int = 4, in_channels: int = 3, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, block_out_channels: Optional[tuple] = None):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two, got {factor}")
        levels = int(math.log2(factor)) + 1
        if block_out_channels is None or len(block_out_channels) != levels:
            # FluxPipeline reads its vae_scale_factor as 2 ** (len(block_out_channels) - 1)
            self.register_to_config(block_out_channels=tuple([in_channels] * levels))
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # device / dtype

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels * self.config.factor ** 2

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """``(B, 3, H, W)`` in [-1, 1] -> an output whose ``latent_dist`` is a point mass."""
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        f = self.config.factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by {f}")
        z = nn.functional.pixel_unshuffle(x, f)
        dist = DiagonalGaussianDistribution(torch.cat([z, torch.zeros_like(z)], 1),
                                            deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Inverse of :meth:`encode` (``DecoderOutput.sample``)."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        x = nn.functional.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x).latent_dist.mode()).sample


def _pipeline_class():
    from diffusers import FluxPipeline

    class SceneFluxPipeline(FluxPipeline):
        """:class:`diffusers.FluxPipeline` with MiniLM in the text encoders' places.

        The CLIP part (``text_encoder``) gives the pooled embedding: MiniLM's mean-pooled,
        L2-normalised sentence embedding (the sentence-transformers pooling of
        ``all-MiniLM-L6-v2``). The T5 part (``text_encoder_2``) gives the token states, padded to
        ``max_sequence_length`` (default :data:`MAX_SEQUENCE_LENGTH`) as FLUX pads T5; the
        padding is masked inside MiniLM, and its states stay in the sequence, as FLUX's do.
        Everything else (packing, position ids, the sampling loop) is FluxPipeline's own.
        """

        def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                     transformer, image_encoder=None, feature_extractor=None):
            super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                             tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                             tokenizer_2=tokenizer_2, transformer=transformer,
                             image_encoder=image_encoder, feature_extractor=feature_extractor)
            self.default_sample_size = 16   # 16 x 4 = 64-pixel scenes
            self.tokenizer_max_length = MAX_SEQUENCE_LENGTH

        def _minilm(self, prompt, max_length, device):
            prompt = [prompt] if isinstance(prompt, str) else list(prompt)
            enc = self.tokenizer_2(prompt, padding="max_length", max_length=max_length,
                                   truncation=True, return_tensors="pt")
            dev = next(self.text_encoder_2.parameters()).device
            out = self.text_encoder_2(input_ids=enc["input_ids"].to(dev),
                                      attention_mask=enc["attention_mask"].to(dev))
            return out.last_hidden_state.to(device), enc["attention_mask"].to(device)

        def _get_t5_prompt_embeds(self, prompt=None, num_images_per_prompt: int = 1,
                                  max_sequence_length: int = MAX_SEQUENCE_LENGTH, device=None,
                                  dtype=None):
            device = device or self._execution_device
            states, _ = self._minilm(prompt, max_sequence_length, device)
            states = states.to(dtype or self.transformer.dtype)
            return states.repeat_interleave(num_images_per_prompt, 0)

        def _get_clip_prompt_embeds(self, prompt, num_images_per_prompt: int = 1, device=None):
            device = device or self._execution_device
            states, mask = self._minilm(prompt, self.tokenizer_max_length, device)
            m = mask[..., None].to(states.dtype)
            pooled = (states * m).sum(1) / m.sum(1).clamp_min(1)
            pooled = nn.functional.normalize(pooled, dim=-1).to(self.transformer.dtype)
            return pooled.repeat_interleave(num_images_per_prompt, 0)

        def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1,
                          prompt_embeds=None, pooled_prompt_embeds=None,
                          max_sequence_length: int = MAX_SEQUENCE_LENGTH, lora_scale=None):
            return super().encode_prompt(prompt, prompt_2, device, num_images_per_prompt,
                                         prompt_embeds, pooled_prompt_embeds,
                                         max_sequence_length, lora_scale)

        def __call__(self, *args, max_sequence_length: int = MAX_SEQUENCE_LENGTH, **kwargs):
            return super().__call__(*args, max_sequence_length=max_sequence_length, **kwargs)

    return SceneFluxPipeline


SceneFluxPipeline = _pipeline_class()


def make_transformer(config: Optional[dict] = None, seed: int = 0) -> nn.Module:
    """A freshly initialised ``FluxTransformer2DModel`` of ``config`` (default
    :data:`DEFAULT_CONFIG`), seeded; the untrained twin of ``scene-flux``.

    Examples
    --------
    >>> t = make_transformer()
    >>> type(t).__name__, len(t.transformer_blocks), len(t.single_transformer_blocks)
    ('FluxTransformer2DModel', 2, 4)
    """
    from diffusers import FluxTransformer2DModel

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**cfg)


def make_scheduler():
    """FLUX.1-schnell's scheduler configuration: ``FlowMatchEulerDiscreteScheduler`` with
    1000 training steps, shift 1 and no dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0,
                                           use_dynamic_shifting=False, base_shift=0.5,
                                           max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def _minilm_parts():
    from transformers import AutoModel

    from attnchain.zoo.registry import _minilm_tokenizer, minilm_path

    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True).eval()
    model.requires_grad_(False)
    return model, _minilm_tokenizer()


def make_pipeline(transformer: nn.Module, scaling_factor: float = 1.0, shift_factor: float = 0.0,
                  device=None, text=None) -> "SceneFluxPipeline":
    """Assemble a :class:`SceneFluxPipeline` around ``transformer``.

    Parameters
    ----------
    transformer : FluxTransformer2DModel
    scaling_factor, shift_factor : float
        The latent standardisation of :class:`PixelShuffleAutoencoder`.
    device : torch.device, optional
    text : (model, tokenizer), optional
        MiniLM, when already loaded.
    """
    enc, tok = text if text is not None else _minilm_parts()
    vae = PixelShuffleAutoencoder(factor=4, scaling_factor=float(scaling_factor),
                                  shift_factor=float(shift_factor))
    pipe = SceneFluxPipeline(scheduler=make_scheduler(), vae=vae, text_encoder=enc,
                             tokenizer=tok, text_encoder_2=enc, tokenizer_2=tok,
                             transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def weights_digest(weights_dir=None) -> str:
    """The first 12 hex digits of the SHA-1 of the shipped weights file (``"missing"`` without
    one): part of the results key of evaluations, so that new weights never reuse old results.

    Examples
    --------
    >>> len(weights_digest())
    12
    """
    import hashlib

    path = Path(weights_dir or WEIGHTS_DIR) / WEIGHTS_FILE
    if not path.exists():
        return "missing"
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def load_info(weights_dir=None) -> dict:
    """The JSON report of how the shipped weights were made."""
    path = Path(weights_dir or WEIGHTS_DIR) / INFO_FILE
    return json.loads(path.read_text())


def build(device=None, weights: str = "trained", weights_dir=None, seed: int = 0):
    """``(pipeline, preprocess)`` of ``scene-flux`` for :func:`attnchain.zoo.load`.

    Parameters
    ----------
    device : torch.device, optional
    weights : {"trained", "untrained"}
        The shipped weights, or the same architecture at its seeded initialisation (the
        untrained twin every attention claim is compared with).
    weights_dir : str or Path, optional
        Where ``scene_flux.pt`` / ``scene_flux.json`` are (default: the package).
    seed : int
        Initialisation seed of the untrained twin.

    Returns
    -------
    (SceneFluxPipeline, callable)
        The preprocess maps images (a ``(B, 3, H, W)`` tensor in [0, 1], or PIL images) to
        ``(B, 3, 64, 64)`` in [-1, 1] on the device, as FLUX's ``image_processor`` does.

    Raises
    ------
    attnchain.errors.UnavailableModelError
        ``weights="trained"`` but the weights file is missing.
    """
    from attnchain.errors import UnavailableModelError

    if weights not in ("trained", "untrained"):
        raise ValueError(f"weights must be 'trained' or 'untrained', got {weights!r}")
    folder = Path(weights_dir or WEIGHTS_DIR)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if weights == "trained":
        path = folder / WEIGHTS_FILE
        if not path.exists():
            raise UnavailableModelError(
                f"scene-flux weights not found at {path}; train them with "
                "python -m attnchain.zoo.train_scene_flux")
        state = torch.load(path, map_location="cpu", weights_only=True)
        info = state["meta"]
        transformer = make_transformer(info["config"])
        transformer.load_state_dict({k: v.float() for k, v in state["transformer"].items()})
        scaling, shift = info["scaling_factor"], info["shift_factor"]
    else:
        info = load_info(folder) if (folder / INFO_FILE).exists() else {}
        transformer = make_transformer(info.get("config"), seed=seed)
        scaling, shift = info.get("scaling_factor", 1.0), info.get("shift_factor", 0.0)
    pipe = make_pipeline(transformer, scaling, shift, device=device)

    def preprocess(images):
        from attnchain.zoo.registry import _as_list, to_pil

        if isinstance(images, torch.Tensor) and images.ndim == 4:
            x = images.float()
            if x.min() < 0 or x.max() > 1:
                raise ValueError("image tensors must have values in [0, 1]")
            if tuple(x.shape[-2:]) != (64, 64):
                x = nn.functional.interpolate(x, size=(64, 64), mode="bicubic",
                                              align_corners=False).clamp(0, 1)
            return (x * 2 - 1).to(device)
        items, _ = _as_list(images)
        pix = pipe.image_processor.preprocess([to_pil(im) for im in items], height=64, width=64)
        return pix.to(device)

    return pipe, preprocess
