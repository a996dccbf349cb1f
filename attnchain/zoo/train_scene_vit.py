"""Train ``scene-vit``, the small timm ViT of the offline profile, on easy synthetic scenes.

Run from the repository root::

    nice -n 5 python -m attnchain.zoo.train_scene_vit            # full run, writes the weights
    python -m attnchain.zoo.train_scene_vit --smoke --out /tmp/x   # one-minute plumbing check

The full run writes ``attnchain/zoo/weights/scene_vit.pt`` (state dicts of the ViT and of the
auxiliary patch head, float32) and ``scene_vit.json`` (configuration, seed, versions, training wall
time, accuracy on the held-out benchmark beside the trivial baselines, attention diagnostics).

Objective (see :mod:`attnchain.zoo.scene_vit`): binary cross-entropy on the CLS token's
``len(CLASSES)`` presence logits, plus ``aux_weight`` times a per-patch soft cross-entropy between
an auxiliary linear head on the final patch tokens and each patch's class composition (fraction
of background pixels and of pixels of each class, from the ground-truth masks).

Determinism and resuming: everything a step uses is a function of ``(seed, step)``: the training
scenes (chunk ``c`` of ``chunk_size`` scenes is ``generate(chunk_size, DATA_SEED_BASE + 10000 *
seed + c, level)``, each chunk is used for ``chunk_reuse`` shuffled passes), the shuffling, the
augmentation (random flips, 90-degree rotations and colour-channel permutations, applied to images
and targets together) and the stochastic-depth draws (``torch.manual_seed`` per step). A
checkpoint (model, head, optimiser, step, elapsed time) is written every ``ckpt_every`` steps to
``--workdir``; rerunning the same command resumes from it and gives the same weights as an
uninterrupted run (on the same machine and library versions). The learning rate follows linear
warm-up then a cosine decay, computed from the step number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnchain.data import scenes as S
from attnchain.zoo import _training
from attnchain.zoo import scene_vit as SV

__all__ = [
    "TrainConfig",
    "DATA_SEED_BASE",
    "VAL_SEED",
    "chunk_seed",
    "class_maps",
    "patch_composition",
    "augment",
    "batch_at",
    "train_loss",
    "train",
    "evaluate",
    "trivial_baselines",
    "cls_attention_ap",
    "main",
]

#: Training chunk ``c`` of run seed ``s`` uses scene seed ``DATA_SEED_BASE + 10000 * s + c``.
DATA_SEED_BASE = 1_000_000
#: Validation scenes logged during training (never the benchmark seed, never a training seed).
VAL_SEED = 999_999


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all of them go into the JSON report)."""

    seed: int = 0
    level: str = "easy"
    steps: int = 2500
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 150
    grad_clip: float = 1.0
    aux_weight: float = 0.5
    chunk_size: int = 4096
    chunk_reuse: int = 2
    ckpt_every: int = 200
    eval_every: int = 500
    val_size: int = 500
    threads: int = 1
    model: dict = field(default_factory=lambda: dict(SV.DEFAULT_CONFIG))

    def __post_init__(self):
        _training.check_schedule(self)
        if self.level not in S.LEVELS:
            raise ValueError(f"level must be one of {S.LEVELS}, got {self.level!r}")
        self.model = {**SV.DEFAULT_CONFIG, **self.model}
        if self.model["img_size"] != S.IMAGE_SIZE and self.model["img_size"] < 32:
            raise ValueError(f"img_size must be >= 32, got {self.model['img_size']}")


def chunk_seed(seed: int, chunk: int) -> int:
    """Scene seed of training chunk ``chunk`` of run ``seed``; never a held-out seed."""
    return _training.chunk_seed(DATA_SEED_BASE, VAL_SEED, seed, chunk)


def class_maps(sc: "S.Scenes") -> torch.Tensor:
    """``(n, H, W)`` int64 class map: 0 background, ``1 + class`` on the pixels of each object."""
    n = len(sc)
    lut = torch.cat([torch.full((n, 1), -1, dtype=torch.long), sc.labels], dim=1) + 1
    return torch.gather(lut, 1, sc.masks.reshape(n, -1)).reshape(sc.masks.shape)


def patch_composition(cmap: torch.Tensor, num_classes: int, patch: int) -> torch.Tensor:
    """``(n, H, W)`` class map -> ``(n, (H/p)*(W/p), num_classes + 1)`` per-patch fractions."""
    onehot = F.one_hot(cmap, num_classes + 1).permute(0, 3, 1, 2).float()
    comp = F.avg_pool2d(onehot, patch)  # (n, C+1, g, g)
    return comp.flatten(2).transpose(1, 2)


def augment(images: torch.Tensor, cmaps: torch.Tensor, rng: np.random.Generator):
    """Per-sample dihedral transform (flips, 90-degree rotations) of images and class maps, and a
    random permutation of the colour channels of each image. Labels are invariant to all three."""
    images = images.clone()
    cmaps = cmaps.clone()
    d = rng.integers(0, 8, size=images.shape[0])
    for k in range(1, 8):
        idx = torch.from_numpy(np.flatnonzero(d == k))
        if idx.numel() == 0:
            continue
        im, cm = images[idx], cmaps[idx]
        if k >= 4:
            im, cm = im.flip(-1), cm.flip(-1)
        r = k % 4
        if r:
            im, cm = torch.rot90(im, r, (-2, -1)), torch.rot90(cm, r, (-2, -1))
        images[idx], cmaps[idx] = im, cm
    perm = torch.from_numpy(np.argsort(rng.random((images.shape[0], 3)), axis=1))
    images = torch.gather(images, 1, perm[:, :, None, None].expand_as(images))
    return images, cmaps


class _Data:
    """Deterministic training batches: batch ``step`` depends only on ``(config, step)``."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.per_pass = cfg.chunk_size // cfg.batch_size
        self.per_chunk = self.per_pass * cfg.chunk_reuse
        self._chunk = None

    def _load(self, c: int):
        if self._chunk is None or self._chunk[0] != c:
            sc = S.generate(self.cfg.chunk_size, chunk_seed(self.cfg.seed, c), self.cfg.level,
                            self.cfg.model["img_size"])
            self._chunk = (c, sc.images, class_maps(sc), sc.presence)
        return self._chunk[1:]

    def batch(self, step: int):
        cfg = self.cfg
        c, r = divmod(step, self.per_chunk)
        p, b = divmod(r, self.per_pass)
        images, cmaps, presence = self._load(c)
        perm = np.random.default_rng([cfg.seed, 11, c, p]).permutation(cfg.chunk_size)
        idx = torch.from_numpy(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        rng = np.random.default_rng([cfg.seed, 13, step])
        x, cm = augment(images[idx], cmaps[idx], rng)
        m = cfg.model
        comp = patch_composition(cm, m["num_classes"], m["patch_size"])
        return x, presence[idx], comp


def batch_at(cfg: TrainConfig, step: int):
    """The (augmented images in [0, 1], presence targets, patch compositions) of step ``step``."""
    return _Data(cfg).batch(step)


def _normalise(x: torch.Tensor, mcfg: dict) -> torch.Tensor:
    mean = torch.tensor(mcfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(mcfg["std"]).view(1, 3, 1, 1)
    return (x - mean.to(x.device)) / std.to(x.device)


def train_loss(model, head, x, presence, comp, aux_weight: float):
    """Return ``(total, bce, aux)``: presence BCE on the CLS logits + weighted patch soft-CE."""
    feats = model.forward_features(x)
    logits = model.forward_head(feats)
    bce = F.binary_cross_entropy_with_logits(logits, presence)
    patch_logits = head(feats[:, model.num_prefix_tokens:])
    aux = -(comp * F.log_softmax(patch_logits, dim=-1)).sum(-1).mean()
    return bce + aux_weight * aux, bce, aux


_lr_at = _training.warmup_cosine_lr


def _param_groups(modules, weight_decay: float):
    decay, no_decay = [], []
    for mod in modules:
        for name, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _init(cfg: TrainConfig):
    torch.manual_seed(cfg.seed)
    model = SV.make_model(cfg.model)
    head = SV.make_patch_head(cfg.model)
    opt = torch.optim.AdamW(_param_groups([model, head], cfg.weight_decay), lr=cfg.lr,
                            betas=(0.9, 0.999))
    return model, head, opt


_save_atomic = _training.save_atomic


@torch.no_grad()
def evaluate(model, sc: "S.Scenes", mcfg: dict, batch_size: int = 250) -> dict:
    """Presence accuracy of ``model`` on scenes ``sc``.

    Returns
    -------
    dict
        ``per_label_accuracy`` (fraction of the ``n * len(CLASSES)`` present/absent decisions that
        are right, threshold 0.5 on the sigmoid), ``exact_match_accuracy`` (scenes with every label
        right), ``mean_average_precision`` (macro AP of the sigmoid scores over classes) and ``n``.
    """
    from sklearn.metrics import average_precision_score

    was_training = model.training
    model.eval()
    probs = []
    for i in range(0, len(sc), batch_size):
        x = _normalise(sc.images[i:i + batch_size], mcfg)
        probs.append(torch.sigmoid(model(x)))
    model.train(was_training)
    prob = torch.cat(probs)
    y = sc.presence
    pred = (prob > 0.5).float()
    ap = [average_precision_score(y[:, k].numpy(), prob[:, k].numpy())
          for k in range(y.shape[1]) if 0 < y[:, k].sum() < len(y)]
    return {
        "n": len(sc),
        "per_label_accuracy": float((pred == y).float().mean()),
        "exact_match_accuracy": float((pred == y).all(1).float().mean()),
        "mean_average_precision": float(np.mean(ap)) if ap else float("nan"),
    }


def trivial_baselines(train_presence: torch.Tensor, y: torch.Tensor) -> dict:
    """Accuracy of input-independent predictors fitted on training labels, scored on ``y``.

    ``per_label``: predict each class present iff it is present in more than half of the
    training scenes. ``exact_match``: always predict the most common training label set.
    ``mean_average_precision`` of a constant score is the class prevalence in ``y``.
    """
    majority = (train_presence.mean(0) > 0.5).float()
    sets, counts = torch.unique(train_presence, dim=0, return_counts=True)
    mode = sets[counts.argmax()]
    return {
        "per_label_accuracy": float((y == majority).float().mean()),
        "exact_match_accuracy": float((y == mode).all(1).float().mean()),
        "mean_average_precision": float(y.mean(0).mean()),
        "fitted_on": int(train_presence.shape[0]),
    }


@torch.no_grad()
def cls_attention_ap(model, sc: "S.Scenes", mcfg: dict) -> list:
    """Per layer: mean over images of the average precision with which the CLS token's attention
    to patches (mean over heads) ranks foreground patches (>= half object pixels) first.

    The attention is recomputed from each block's own ``qkv`` projection (timm's ``Attention``:
    ``softmax(q k^T / sqrt(d))``), so no capture machinery is needed.
    """
    from sklearn.metrics import average_precision_score

    was_training = model.training
    model.eval()
    rows = {}

    def hook(i):
        def fn(mod, args, out):
            x = args[0]
            b, n, _ = x.shape
            qkv = mod.qkv(x).reshape(b, n, 3, mod.num_heads, mod.head_dim).permute(2, 0, 3, 1, 4)
            q, k = mod.q_norm(qkv[0]), mod.k_norm(qkv[1])
            att = ((q * mod.scale) @ k.transpose(-2, -1)).softmax(-1)
            rows[i] = att[:, :, 0, model.num_prefix_tokens:].mean(1)  # (B, N_patches)
        return fn

    handles = [blk.attn.register_forward_hook(hook(i)) for i, blk in enumerate(model.blocks)]
    try:
        model(_normalise(sc.images, mcfg))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    fg = (S.patch_foreground(sc.masks, mcfg["patch_size"]) >= 0.5).flatten(1).numpy()
    out = []
    for i in range(len(model.blocks)):
        score = rows[i].numpy()
        aps = [average_precision_score(fg[j], score[j]) for j in range(len(fg))
               if 0 < fg[j].sum() < fg.shape[1]]
        out.append(float(np.mean(aps)))
    return out


def train(cfg: TrainConfig, workdir, log=print, resume: bool = True,
          stop_after: int | None = None) -> dict:
    """Train (or resume) a run; return ``{"model", "head", "history", "elapsed_s", "step"}``.

    ``stop_after`` ends this invocation after that many steps (a checkpoint is written), as if it
    had been interrupted; calling again with the same ``workdir`` resumes.

    ``history`` is a list of ``{"step", "loss", "bce", "aux", "lr"}`` (one entry per step of this
    invocation and of the resumed part recorded in the checkpoint).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    torch.set_num_threads(cfg.threads)
    model, head, opt = _init(cfg)
    step, elapsed, history = 0, 0.0, []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"] != asdict(cfg):
            raise ValueError(
                f"checkpoint {ckpt_path} was written with another configuration; "
                "use --fresh or another --workdir"
            )
        model.load_state_dict(ck["model"])
        head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, history = ck["step"], ck["elapsed_s"], ck["history"]
        log(f"resumed from {ckpt_path} at step {step} ({elapsed:.0f} s done)")
    data = _Data(cfg)
    val = S.generate(cfg.val_size, VAL_SEED, cfg.level, cfg.model["img_size"]) \
        if cfg.eval_every else None
    model.train()
    head.train()
    t0 = time.time()
    since_ckpt = 0
    stop = cfg.steps if stop_after is None else min(cfg.steps, step + int(stop_after))
    while step < stop:
        lr = _lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x, presence, comp = data.batch(step)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # stochastic depth draws
        loss, bce, aux = train_loss(model, head, _normalise(x, cfg.model), presence, comp,
                                    cfg.aux_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(head.parameters()),
                                           cfg.grad_clip)
        opt.step()
        history.append({"step": step, "loss": loss.item(), "bce": bce.item(),
                        "aux": aux.item(), "lr": lr})
        step += 1
        since_ckpt += 1
        if step % 50 == 0 or step == cfg.steps:
            recent = history[-50:]
            now = elapsed + time.time() - t0
            log(f"step {step}/{cfg.steps} loss {np.mean([h['loss'] for h in recent]):.4f} "
                f"bce {np.mean([h['bce'] for h in recent]):.4f} "
                f"aux {np.mean([h['aux'] for h in recent]):.4f} lr {lr:.2e} "
                f"{now:.0f} s ({now / step:.3f} s/step)")
        if val is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            log(f"  val@{step}: {evaluate(model, val, cfg.model)}")
        if cfg.ckpt_every and (since_ckpt >= cfg.ckpt_every or step == stop):
            since_ckpt = 0
            _save_atomic({"config": asdict(cfg), "model": model.state_dict(),
                          "head": head.state_dict(), "opt": opt.state_dict(), "step": step,
                          "elapsed_s": elapsed + time.time() - t0, "history": history},
                         ckpt_path)
    elapsed += time.time() - t0
    model.eval()
    head.eval()
    return {"model": model, "head": head, "history": history, "elapsed_s": elapsed, "step": step}


def _versions() -> dict:
    return _training.versions('timm')


def finalise(cfg: TrainConfig, result: dict, out_dir, log=print,
             n_bench: int = S.BENCHMARK_SIZE) -> dict:
    """Measure the trained model on the held-out benchmark (its first ``n_bench`` scenes, default
    all of it) and on its first 200 scenes, and write ``scene_vit.pt`` and ``scene_vit.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, head, mcfg = result["model"], result["head"], cfg.model
    bench = S.benchmark(cfg.level, n=n_bench, size=mcfg["img_size"])
    split = S.benchmark(cfg.level, n=200, size=mcfg["img_size"])
    train_presence = torch.cat([
        S.generate(cfg.chunk_size, chunk_seed(cfg.seed, c), cfg.level, mcfg["img_size"]).presence
        for c in range(2)
    ])
    torch.manual_seed(cfg.seed)
    init_model = SV.make_model(mcfg).eval()  # the same architecture at its initialisation
    hist = result["history"]
    losses = np.array([h["loss"] for h in hist])
    curve = [{"step": i + 1, "loss": float(losses[max(0, i - 49):i + 1].mean())}
             for i in range(len(losses)) if (i + 1) % max(1, cfg.steps // 20) == 0]
    info = {
        "name": "scene-vit",
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "classes": list(S.CLASSES),
        "config": mcfg,
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "seed": cfg.seed,
        "objective": "multi-label presence BCE on the CLS token + aux_weight x per-patch soft "
                     "cross-entropy against ground-truth patch class composition",
        "training_data": f"attnchain.data.scenes.generate(level={cfg.level!r}), seeds "
                         f"{chunk_seed(cfg.seed, 0)}.., {cfg.steps * cfg.batch_size} samples "
                         f"({cfg.chunk_reuse} augmented passes per chunk of {cfg.chunk_size})",
        "steps": result["step"],
        "training_wall_time_s": round(result["elapsed_s"], 1),
        "training_threads": cfg.threads,
        "machine": platform.machine() + ", " + platform.processor(),
        "versions": _versions(),
        "benchmark": {
            "split": f"attnchain.data.scenes.benchmark({cfg.level!r}) "
                     f"(seed {S.BENCHMARK_SEED}, n={len(bench)})",
            "model": evaluate(model, bench, mcfg),
            "trivial": trivial_baselines(train_presence, bench.presence),
        },
        "split200": {
            "split": f"attnchain.data.scenes.benchmark({cfg.level!r}, n=200)",
            "model": evaluate(model, split, mcfg),
            "trivial": trivial_baselines(train_presence, split.presence),
        },
        "cls_attention_foreground_ap": {
            "what": "per layer, mean over the benchmark images of the average precision of the "
                    "CLS token's head-mean attention at ranking foreground patches",
            "trained": cls_attention_ap(model, bench, mcfg),
            "at_init": cls_attention_ap(init_model, bench, mcfg),
            "chance": float((S.patch_foreground(bench.masks, mcfg["patch_size"]) >= 0.5)
                            .flatten(1).float().mean()),
        },
        "loss_curve": curve,
    }
    state = {"model": {k: v.contiguous() for k, v in model.state_dict().items()},
             "patch_head": head.state_dict()}
    _save_atomic(state, out_dir / "scene_vit.pt")
    (out_dir / "scene_vit.json").write_text(json.dumps(info, indent=2) + "\n")
    size = (out_dir / "scene_vit.pt").stat().st_size
    log(f"wrote {out_dir / 'scene_vit.pt'} ({size / 1e6:.2f} MB) and scene_vit.json")
    log(json.dumps({k: info[k] for k in ("benchmark", "cls_attention_foreground_ap")}, indent=1))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                      "attnchain_scene_vit"),
                    help="checkpoint directory (a rerun resumes from it)")
    ap.add_argument("--out", default=str(SV.WEIGHTS_DIR),
                    help="where scene_vit.pt and scene_vit.json go (default: the package)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--smoke", action="store_true",
                    help="about a minute: 60 steps of batch 64, small chunks (needs --out)")
    args = ap.parse_args(argv)
    if args.smoke:
        if Path(args.out).resolve() == SV.WEIGHTS_DIR:
            ap.error("--smoke would overwrite the shipped weights; pass --out")
        cfg = TrainConfig(seed=args.seed, steps=60, batch_size=64, chunk_size=1024,
                          warmup_steps=10, ckpt_every=20, eval_every=30, val_size=200,
                          threads=args.threads)
    else:
        cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                          threads=args.threads)

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    log(f"config {json.dumps(asdict(cfg))}")
    result = train(cfg, args.workdir, log=log, resume=not args.fresh)
    finalise(cfg, result, args.out, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
