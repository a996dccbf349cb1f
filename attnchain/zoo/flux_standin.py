"""A reduced stand-in of the FLUX.1-schnell pipeline: every class of the real one, tiny sizes.

FLUX.1-schnell (a 12-billion-parameter transformer, a T5-XXL encoder) cannot be built at its real
size on a CPU, and its tokenizers cannot be downloaded offline. The stand-in is a genuine
:class:`diffusers.FluxPipeline` whose components are the classes FLUX.1-schnell uses, randomly
initialised (seeded) at tiny sizes:

- ``transformer``: :class:`diffusers.FluxTransformer2DModel` (2 double-stream, 2 single-stream
  blocks, 2 heads of 16 dimensions, 64 input channels: 16 latent channels packed 2 x 2);
- ``vae``: :class:`diffusers.AutoencoderKL` with FLUX's layout (4 levels: 8x down-sampling, 16
  latent channels, no quant convs, FLUX's scaling 0.3611 and shift 0.1159);
- ``text_encoder``: :class:`transformers.CLIPTextModel`; ``text_encoder_2``:
  :class:`transformers.T5EncoderModel` (gated-GELU, as T5-XXL);
- ``scheduler``: FLUX.1-schnell's :class:`diffusers.FlowMatchEulerDiscreteScheduler`.

The one difference: both tokenizers are the BERT WordPiece tokenizer that ships with MiniLM
(CLIP's and T5's vocabularies are hub downloads); the CLIP-role copy is limited to 77 tokens as
CLIP's is. CI and the device-strict chapter run use it wherever the full profile asks for
``flux-schnell`` with ``ATTNCHAIN_WEIGHTS=random``; numbers it produces mean nothing.
"""
from __future__ import annotations

import torch

__all__ = ["build_pipeline", "build"]


def build_pipeline(seed: int = 0):
    """The stand-in :class:`diffusers.FluxPipeline` on the CPU, float32, seeded.

    Examples
    --------
    >>> pipe = build_pipeline()
    >>> type(pipe).__name__, pipe.vae_scale_factor, pipe.transformer.config.in_channels
    ('FluxPipeline', 8, 64)
    """
    import copy

    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from attnchain.zoo.registry import _minilm_tokenizer
    from attnchain.zoo.scene_flux import make_scheduler

    tok = _minilm_tokenizer()
    clip_tok = copy.deepcopy(tok)
    clip_tok.model_max_length = 77
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
            use_quant_conv=False, use_post_quant_conv=False)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
            pad_token_id=tok.pad_token_id))
        t5 = T5EncoderModel(T5Config(
            vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
            pad_token_id=tok.pad_token_id))
    pipe = FluxPipeline(scheduler=make_scheduler(), vae=vae.eval(), text_encoder=clip.eval(),
                        tokenizer=clip_tok, text_encoder_2=t5.eval(), tokenizer_2=tok,
                        transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build(device=None, seed: int = 0):
    """``(pipeline, preprocess)`` for :func:`attnchain.zoo.load`: the stand-in on ``device``;
    ``preprocess`` maps images to ``(B, 3, H, W)`` in [-1, 1] with the pipeline's own
    ``image_processor``."""
    from attnchain.zoo.registry import _as_list, to_pil

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = build_pipeline(seed).to(device)

    def preprocess(images):
        items, _ = _as_list(images)
        return pipe.image_processor.preprocess([to_pil(im) for im in items]).to(device)

    return pipe, preprocess
