"""Peak GPU memory of one FLUX.1-schnell segmentation step, as far as it can be measured without
the GPU or the weights.

1. **Weights**: FLUX.1-schnell's four components are built on the meta device (no memory) from
   their published configurations and their parameters counted: bf16 bytes = 2 x parameters.
2. **Capture**: the evaluation's reduction (:class:`attnchain.tasks.concept_segmentation.
   ChainAccumulator`) is fed one attention call of FLUX's real shape (24 heads of 128
   dimensions, one image) under :mod:`attnchain.testing.strict_cuda`, which counts every device
   allocation, at three sequence lengths ``N`` above the dense-eigensolver limit; its peak is a
   quadratic polynomial in ``N`` (every large tensor is ``H x N x N`` or ``N x N``), fitted
   exactly through the three points and evaluated at the protocol's ``N = 256 + 4096`` (1024
   pixels) and the paper's release's ``N = 256 + 1024`` (512 pixels); the fit is checked
   against a fourth measured point.
3. **The transformer's own activations** with SDPA (flash or memory-efficient attention, no
   ``N x N`` tensor): the largest live set of a single-stream block, counted from its shapes.

    python benchmarks/flux_memory.py            # a few minutes on two cores
"""
import argparse
import math
import time

import numpy as np
import torch

GIB = 2 ** 30

#: FLUX.1-schnell's configurations (the hub's config.json of each component).
TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                   attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                   pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
T5 = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
          feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           layers_per_block=2, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)


def weights_gib() -> dict:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out = {}
    with init_empty_weights():
        for name, build in (("transformer", lambda: FluxTransformer2DModel(**TRANSFORMER)),
                            ("text_encoder_2 (T5-XXL)", lambda: T5EncoderModel(T5Config(**T5))),
                            ("text_encoder (CLIP-L)", lambda: CLIPTextModel(CLIPTextConfig(**CLIP))),
                            ("vae", lambda: AutoencoderKL(**VAE))):
            m = build()
            n = sum(p.numel() for p in m.parameters())
            out[name] = (n, 2 * n / GIB)
    return out


def capture_peak(n_tokens: int, n_text: int = 256, heads: int = 24, dim: int = 128) -> int:
    """Peak simulated device bytes of one recorded call at ``n_tokens`` (B = 1), above the
    inputs (q and k in bf16)."""
    from attnchain.capture.core import Observation
    from attnchain.tasks import concept_segmentation as cs
    from attnchain.testing import strict_cuda

    strict_cuda.enable("H100")
    try:
        g = torch.Generator().manual_seed(0)
        q = (torch.randn(1, heads, n_tokens, dim, generator=g) * 0.3).to("cuda", torch.bfloat16)
        k = (torch.randn(1, heads, n_tokens, dim, generator=g) * 0.3).to("cuda", torch.bfloat16)
        acc = cs.ChainAccumulator(torch.nn.Identity())
        acc.active = True
        acc.select_layers(["layer"])
        base = strict_cuda.memory_allocated()
        strict_cuda.reset_peak_memory_stats()
        acc.record("layer", Observation(q=q, k=k, scale=dim ** -0.5,
                                        tokens={"text": (0, n_text), "image": (n_text, n_tokens)}))
        peak = strict_cuda.max_memory_allocated() - base
        del acc, q, k
        return peak
    finally:
        strict_cuda.disable()


def activations_gib(n_tokens: int, dim: int = 3072, mlp: int = 4) -> float:
    """Largest live set of a single-stream block in bf16 (SDPA keeps no N x N tensor): the
    input, its norm, q, k, v, the MLP hidden, their concatenation and the output."""
    widths = [dim, dim, dim, dim, dim, mlp * dim, (mlp + 1) * dim, dim]
    return 2 * n_tokens * sum(widths) / GIB


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, nargs=3, default=(512, 768, 1024))
    ap.add_argument("--check", type=int, default=1280)
    a = ap.parse_args()
    w = weights_gib()
    print("FLUX.1-schnell weights (bf16, parameters counted on the meta device):")
    for name, (n, gib) in w.items():
        print(f"  {name:26s} {n / 1e9:6.3f} B parameters  {gib:6.2f} GiB")
    total = sum(g for _, g in w.values())
    print(f"  {'all':26s} {'':22s}{total:6.2f} GiB")
    t0 = time.perf_counter()
    pts = {n: capture_peak(n) for n in a.points}
    coef = np.polyfit(list(pts), [pts[n] for n in pts], 2)
    check = capture_peak(a.check)
    print(f"\ncapture of one call (24 heads x 128, B = 1), measured under strict_cuda "
          f"({time.perf_counter() - t0:.0f} s):")
    for n, b in pts.items():
        print(f"  N = {n:5d}: {b / GIB:6.3f} GiB")
    pred = np.polyval(coef, a.check)
    print(f"  N = {a.check:5d}: {check / GIB:6.3f} GiB measured, {pred / GIB:6.3f} GiB from the "
          f"quadratic fit ({100 * (pred - check) / check:+.2f}%)")
    for label, n in (("512 px (the paper's release)", 256 + 1024),
                     ("1024 px (ConceptAttention's protocol)", 256 + 4096)):
        cap = np.polyval(coef, n) / GIB
        act = activations_gib(n)
        tr = w["transformer"][1]
        print(f"\none step at {label}, N = {n}:")
        print(f"  capture transient {cap:6.2f} GiB, transformer activations ~{act:5.2f} GiB")
        print(f"  transformer alone on the GPU (model CPU offload): "
              f"{tr + cap + act:6.2f} GiB")
        print(f"  every component on the GPU: {total + cap + act:6.2f} GiB")


if __name__ == "__main__":
    main()
