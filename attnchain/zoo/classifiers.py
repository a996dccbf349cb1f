r"""ImageNet classifiers on timm ViT backbones: the four models of the token-masking table.

The paper's token-masking experiment :cite:`erel2025attention` needs a *classifier* on each of
four backbones. Each one here is a timm ``VisionTransformer`` (so :func:`attnchain.capture` and
:func:`attnchain.interventions.remove_tokens` read and change it like any timm ViT) with the
published head of that family:

``vit-b16``
    Supervised ViT-B/16 with its own ImageNet-1k head (timm
    ``vit_base_patch16_224.augreg2_in21k_ft_in1k``) :cite:`dosovitskiy2021vit`.
``clip-vitb16-zeroshot``
    CLIP ViT-B/16 (OpenAI weights) as a zero-shot classifier :cite:`radford2021clip`: the image
    embedding (timm ``vit_base_patch16_clip_224.openai``, whose head is CLIP's projection) against
    the text embeddings of one prompt per class, ``"a photo of a {name}."`` (the CLIP paper's
    default prompt; its 80-prompt ensemble is not used), from the same checkpoint's text tower
    (transformers ``openai/clip-vit-base-patch16``); logits ``100 · cos`` (CLIP's logit scale).
    Class names: :data:`attnchain.data.imagenet.CLASS_NAMES` (WordNet lemmas, not CLIP's
    hand-edited list).
``dino-vitb16-linear``
    DINO ViT-B/16 :cite:`caron2021dino` with the linear classifier DINO published for it
    (``dino_vitbase16_linearweights.pth``), on DINO's ViT-B features: the final-normed CLS token
    concatenated with the mean of the patch tokens (1,536 inputs).
``dinov2-reg-vitb14-linear``
    DINOv2 ViT-B/14 with 4 registers :cite:`oquab2024dinov2,darcet2024registers` at 224 px with
    the published one-layer linear head (``dinov2_vitb14_reg4_linear_head.pth``): CLS token and
    the mean of the patch tokens (registers excluded), 1,536 inputs.

Both DINO heads are evaluated as their papers' linear evaluation transforms them: resize the
short side to 256, centre crop 224, bicubic, ImageNet mean/std (timm's ``crop_pct = 0.875``).

Under ``ATTNCHAIN_WEIGHTS=random`` (:func:`attnchain.zoo.weights`) each is built at full size
with random weights and no download, the CLIP text tower from its config with MiniLM's
tokenizer (CLIP's own tokenizer files come from the hub). :func:`tiny` builds the same four
classes at toy size for tests.

**References**

:cite:`dosovitskiy2021vit`, :cite:`radford2021clip`, :cite:`caron2021dino`,
:cite:`oquab2024dinov2`, :cite:`darcet2024registers`. Linear heads:
https://github.com/facebookresearch/dino, https://github.com/facebookresearch/dinov2.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FAMILIES", "LinearProbeClassifier", "ZeroShotClassifier", "class_embeddings",
           "build", "tiny", "CLIP_PROMPT"]

#: The backbone families of the token-masking table, by registry name.
FAMILIES = ("vit-b16", "clip-vitb16-zeroshot", "dino-vitb16-linear", "dinov2-reg-vitb14-linear")
#: CLIP's default single prompt.
CLIP_PROMPT = "a photo of a {}."
DINO_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_linearweights.pth"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_linear_head.pth"
CLIP_TEXT = "openai/clip-vit-base-patch16"


class LinearProbeClassifier(nn.Module):
    r"""A linear head on ``[CLS, mean(patch tokens)]`` of a timm ViT (DINO's and DINOv2's probes).

    ``logits = W [z_cls ; (1/n) Σ_j z_j] + b`` with ``z`` the final-normed tokens and ``j`` over the
    patch tokens present (registers excluded; after token removal, the tokens that remain).
    """

    def __init__(self, backbone: nn.Module, linear: nn.Linear):
        super().__init__()
        self.backbone, self.linear = backbone, linear

    def forward(self, x: Tensor) -> Tensor:
        z = self.backbone.forward_features(x)
        p = self.backbone.num_prefix_tokens
        return self.linear(torch.cat([z[:, 0], z[:, p:].mean(1)], -1))


class ZeroShotClassifier(nn.Module):
    r"""CLIP-style zero-shot head: ``logits = s · normalize(f(x)) Eᵀ`` for class embeddings ``E``.

    ``f`` is the image tower (embedding dimension ``D``), ``E`` (classes, D) unit rows, ``s`` the
    logit scale.
    """

    def __init__(self, visual: nn.Module, embeddings: Tensor, logit_scale: float = 100.0):
        super().__init__()
        self.visual, self.logit_scale = visual, float(logit_scale)
        self.register_buffer("embeddings", F.normalize(embeddings.float(), dim=-1))

    def forward(self, x: Tensor) -> Tensor:
        return self.logit_scale * F.normalize(self.visual(x), dim=-1) @ self.embeddings.T


@torch.no_grad()
def class_embeddings(text_model: nn.Module, tokenizer, names: Sequence[str],
                     prompt: str = CLIP_PROMPT, batch_size: int = 250) -> Tensor:
    """Unit text embeddings ``(len(names), D)`` of ``prompt.format(name)`` for each class.

    ``text_model`` is a transformers ``CLIPTextModelWithProjection`` (its ``text_embeds``).
    """
    dev = next(text_model.parameters()).device
    out = []
    for i in range(0, len(names), batch_size):
        enc = tokenizer([prompt.format(n) for n in names[i:i + batch_size]], padding=True,
                        truncation=True, max_length=77, return_tensors="pt")
        enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out.append(F.normalize(text_model(**enc).text_embeds.float(), dim=-1))
    return torch.cat(out)


def _linear_head(url: str, dim: int, pretrained: bool) -> nn.Linear:
    head = nn.Linear(dim, 1000)
    if pretrained:
        state = torch.hub.load_state_dict_from_url(url, map_location="cpu")
        state = state.get("state_dict", state)
        state = {k.rsplit(".", 1)[-1]: v for k, v in state.items()
                 if k.endswith(("linear.weight", "linear.bias")) or k in ("weight", "bias")}
        head.load_state_dict(state)
    return head


def _clip_text(pretrained: bool, config: dict | None = None):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if pretrained:
        from transformers import CLIPTokenizer
        return (CLIPTextModelWithProjection.from_pretrained(CLIP_TEXT),
                CLIPTokenizer.from_pretrained(CLIP_TEXT))
    from .registry import _minilm_tokenizer
    tok = _minilm_tokenizer()
    cfg = dict(vocab_size=tok.vocab_size, projection_dim=512, eos_token_id=tok.sep_token_id,
               pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id)
    return CLIPTextModelWithProjection(CLIPTextConfig(**{**cfg, **(config or {})})), tok


def _zero_shot(visual: nn.Module, text_model, tokenizer) -> ZeroShotClassifier:
    from ..data.imagenet import CLASS_NAMES
    return ZeroShotClassifier(visual, class_embeddings(text_model.eval(), tokenizer, CLASS_NAMES))


def build(name: str, pretrained: bool = True, device=None) -> tuple[nn.Module, dict]:
    """One of :data:`FAMILIES`: ``(classifier, data config)`` with the classifier in eval mode.

    The data config (``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``) is the
    evaluation transform of the family (see the module docstring), for
    :func:`timm.data.create_transform`.
    """
    import timm
    from timm.data import resolve_data_config

    if name not in FAMILIES:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(FAMILIES)}")
    dino_eval = dict(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bicubic",
                     mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_mode="center")
    if name == "vit-b16":
        model = timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k", pretrained=pretrained)
        cfg = resolve_data_config({}, model=model)
    elif name == "clip-vitb16-zeroshot":
        visual = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=pretrained)
        cfg = resolve_data_config({}, model=visual)
        model = _zero_shot(visual, *_clip_text(pretrained))
    elif name == "dino-vitb16-linear":
        backbone = timm.create_model("vit_base_patch16_224.dino", pretrained=pretrained)
        model, cfg = LinearProbeClassifier(backbone, _linear_head(DINO_URL, 1536, pretrained)), dino_eval
    else:
        backbone = timm.create_model("vit_base_patch14_reg4_dinov2.lvd142m", pretrained=pretrained,
                                     img_size=224)
        model, cfg = LinearProbeClassifier(backbone, _linear_head(DINOV2_URL, 1536, pretrained)), dino_eval
    return model.to(device).eval(), dict(cfg)


def tiny(name: str, seed: int = 0, device=None) -> tuple[nn.Module, dict]:
    """A random-weight toy twin of family ``name``: same classes and heads, 32 px, 4×4 patches.

    1,000 classes (the ImageNet label space); DINOv2's twin has 4 registers; CLIP's twin a 2-layer
    text tower with MiniLM's tokenizer. For tests of the full-profile code path.

    Examples
    --------
    >>> model, cfg = tiny("dinov2-reg-vitb14-linear")
    >>> model(torch.zeros(2, 3, 32, 32)).shape, model.backbone.num_prefix_tokens
    (torch.Size([2, 1000]), 5)
    """
    from timm.models.vision_transformer import VisionTransformer

    if name not in FAMILIES:
        raise ValueError(f"unknown classifier {name!r}; known: {', '.join(FAMILIES)}")
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "vit-b16":
            model = VisionTransformer(num_classes=1000, **kw)
        elif name == "clip-vitb16-zeroshot":
            visual = VisionTransformer(num_classes=16, pre_norm=True, **kw)
            text = _clip_text(False, dict(hidden_size=32, intermediate_size=64, projection_dim=16,
                                          num_hidden_layers=2, num_attention_heads=4))
            model = _zero_shot(visual, *text)
        else:
            regs = 4 if name.startswith("dinov2") else 0
            model = LinearProbeClassifier(VisionTransformer(num_classes=0, reg_tokens=regs, **kw),
                                          nn.Linear(64, 1000))
    cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_mode="center")
    return model.to(device).eval(), cfg
