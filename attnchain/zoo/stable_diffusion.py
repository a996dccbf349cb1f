r"""``sd14``: Stable Diffusion v1.4 through diffusers, and its reduced random stand-in.

DiffSeg :cite:`tian2024diffseg` reads the self-attention of Stable Diffusion v1.4
:cite:`rombach2022ldm` (KerasCV's port of the ``CompVis`` weights). :func:`build` loads the
diffusers ``StableDiffusionPipeline`` of the hub repository :data:`REPO` (fp16 on CUDA, without
the safety checker, which DiffSeg never runs).

Under ``ATTNCHAIN_WEIGHTS=random`` (the device-strict CI mode, :func:`attnchain.zoo.weights`) it
builds instead a **reduced stand-in of the same classes**, downloading nothing: a
``StableDiffusionPipeline`` of a ``UNet2DConditionModel`` with SD's block layout (three
cross-attention down blocks and a plain one, a cross-attention mid block, three cross-attention
up blocks: 16 self-attention layers on 64², 32², 16² and 8² latents at 512 px, 8 heads each) at
widths 32/32/64/64 instead of 320/640/1280/1280, an ``AutoencoderKL`` with SD's 8× down-sampling
and 4 latent channels at widths 8/8/16/16, a 2-layer ``CLIPTextModel`` of width 32, a
``CLIPTokenizer`` over single bytes (written to a temporary folder) and SD's ``PNDMScheduler``
settings. Real SD1.4 at 512 px does not fit a CPU-only CI; the stand-in runs every line of the
full-profile code at the real resolutions. Its numbers mean nothing.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch

__all__ = ["REPO", "SCALING_FACTOR", "build", "build_standin", "byte_tokenizer"]

#: The hub repository of Stable Diffusion v1.4 in diffusers' format.
REPO = "CompVis/stable-diffusion-v1-4"
#: SD1.x's latent scaling factor (``vae.config.scaling_factor``).
SCALING_FACTOR = 0.18215


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable character table (what CLIP's BPE vocabulary uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def _tokenizer_folder() -> str:
    folder = Path(tempfile.mkdtemp(prefix="attnchain-clip-bytes-"))
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder)


def byte_tokenizer():
    """A ``CLIPTokenizer`` whose vocabulary is the 256 bytes (no merges), 77 tokens per prompt,
    with CLIP's special tokens: the tokenizer of the stand-in (CLIP's own vocabulary is a
    download)."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_folder()
    return CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", model_max_length=77,
                         pad_token="<|endoftext|>")


def build_standin(device=None, seed: int = 0):
    """The reduced random ``StableDiffusionPipeline`` described in the module docstring."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnchain.zoo.registry import _seeded
    from attnchain.zoo.tiny_sd import SD15_SCHEDULER

    tok = byte_tokenizer()
    with _seeded(seed):
        unet = diffusers.UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 32, 64, 64), norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=SCALING_FACTOR)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id))
    scheduler = diffusers.PNDMScheduler(**SD15_SCHEDULER)  # SD1.4 ships the same configuration
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok,
                                             unet=unet, scheduler=scheduler, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def build(device=None):
    """``(pipeline, preprocess)``: SD1.4 from the hub, or the stand-in under random weights.

    ``preprocess(images)`` turns image(s) (PIL, uint8 arrays, or ``(3, H, W)`` tensors in
    ``[0, 1]``) into ``(B, 3, H, W)`` pixels in ``[-1, 1]`` on the device, in the UNet's dtype.
    """
    import diffusers

    from attnchain.zoo.registry import _as_list, _device, to_pil, weights

    device = _device(device)
    if weights() == "random":
        pipe = build_standin(device)
    else:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            REPO, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
    dtype = pipe.unet.dtype

    def preprocess(images):
        items, _ = _as_list(images)
        pix = pipe.image_processor.preprocess([to_pil(im) for im in items])
        return pix.to(device=device, dtype=dtype)
    return pipe, preprocess
