r"""Image-set metrics: IS, FID and KID of generated images with bootstrap intervals.

:func:`metrics_table` computes the Inception Score :cite:`salimans2016is`, the Fréchet Inception
Distance :cite:`heusel2017fid` and the Kernel Inception Distance :cite:`binkowski2018kid` with
torchmetrics from features of a model (:class:`Features`: Inception-v3 in the full profile, the
project's scene ViT offline), with bootstrap intervals over samples and paired bootstrap
intervals on the differences between methods. With class probabilities :math:`p(y \mid x)`,
pooled features of mean :math:`\mu` and covariance :math:`\Sigma` (:math:`r` real, :math:`f`
generated) and the polynomial kernel :math:`k(x, y) = (x^\top y / d + 1)^3`:

.. math::

   \mathrm{IS} = \exp \mathbb{E}_x\, \mathrm{KL}\big(p(y \mid x) \,\|\, p(y)\big), \qquad
   \mathrm{FID} = \|\mu_r - \mu_f\|^2 + \operatorname{tr}\big(\Sigma_r + \Sigma_f
   - 2 (\Sigma_r \Sigma_f)^{1/2}\big),

and KID is the unbiased estimate of :math:`\mathrm{MMD}^2` under :math:`k`, averaged over random
subsets. The reference sets: held-out scenes (:func:`reference_scenes`, offline) and a folder of
real images (:func:`reference_folder`, COCO-2017 val in the full profile, :func:`coco_val2017`).
Chapter 10 scores the samples of :func:`attnchain.tasks.sag.evaluate` with them.

**References**

Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016 :cite:`salimans2016is`;
Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", NeurIPS 2017 :cite:`heusel2017fid`; Bińkowski et al., "Demystifying MMD GANs",
ICLR 2018 :cite:`binkowski2018kid`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

import attnchain as ac

__all__ = ["Features", "metrics_table", "reference_scenes", "reference_folder",
           "COCO_VAL2017_URL", "coco_val2017"]


# ---------------------------------------------------------------------------------------------
# features and metrics
class _Given(torch.nn.Module):
    """Feature "extractor" of precomputed features: torchmetrics' metrics on given vectors."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = int(d)

    def forward(self, x: Tensor) -> Tensor:
        return x


class _InceptionStandIn(torch.nn.Module):
    """CI's stand-in for the FID Inception: torchvision's Inception-v3 stem (random weights) up
    to its first max pool, averaged over space (torchmetrics' ``feature=64``), and a seeded
    random linear map to 1000 logits."""

    def __init__(self, seed: int = 0):
        super().__init__()
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torchvision.models.inception_v3(weights=None, aux_logits=False,
                                                  init_weights=True)
            self.stem = torch.nn.Sequential(net.Conv2d_1a_3x3, net.Conv2d_2a_3x3,
                                            net.Conv2d_2b_3x3, net.maxpool1)
            self.fc = torch.nn.Linear(64, 1000)

    def forward(self, x: Tensor):
        x = F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear",
                          align_corners=False)
        pool = self.stem((x - 0.5) / 0.5).mean((-2, -1))
        return pool, self.fc(pool)


class Features:
    r"""Features of images for IS / FID / KID: ``(pool, logits)`` of a classifier.

    ``"inception"`` (full profile): the FID Inception-v3 of torch-fidelity (the network
    torchmetrics uses: 2048-d pool features for FID and KID, the unbiased 1008 logits for IS,
    from uint8 images at any size), the features of the papers' tables. Under ``ATTNCHAIN_WEIGHTS=random`` (CI) a reduced
    stand-in, since the FID weights are a download and a 2048-d FID is slow on a CPU:
    torchvision's Inception-v3 stem with random weights, 64-d features (torchmetrics'
    ``feature=64`` layer) and random logits. ``"scene-vit"`` (offline): the project's scene ViT
    on the image resized to 64 px: its pooled 96-d features for FID and KID, its 4 class logits
    for IS, and its presence probabilities for the scene-validity rate (``valid``: the largest
    presence probability above 0.5).
    """

    def __init__(self, name: str = "scene-vit", device=None):
        self.name = name
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if name == "scene-vit":
            self.model, self.pre = ac.zoo.load("scene-vit", device=self.device)
        elif name == "inception":
            if ac.zoo.weights() == "random":
                self.model = _InceptionStandIn().to(self.device).eval()
            else:
                from torch_fidelity.feature_extractor_inceptionv3 import \
                    FeatureExtractorInceptionV3
                self.model = FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048", "logits_unbiased"]).to(self.device).eval()
        else:
            raise ValueError(f"features must be 'scene-vit' or 'inception', got {name!r}")

    @torch.no_grad()
    def __call__(self, images: Tensor, batch_size: int = 100) -> dict:
        """``images`` ``(n, 3, H, W)`` uint8 -> ``{"pool", "logits"[, "valid"]}`` on the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (n, 3, H, W) uint8, got {images.dtype} "
                             f"{tuple(images.shape)}")
        pool, logits = [], []
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(self.device)
            p, lg = self._one(x)
            pool.append(p.float().cpu())
            logits.append(lg.float().cpu())
        pool, logits = torch.cat(pool), torch.cat(logits)
        out = {"pool": pool, "logits": logits}
        if self.name == "scene-vit":
            out["valid"] = (torch.sigmoid(logits).amax(-1) > 0.5).double()
        return out

    def _one(self, x: Tensor):
        if self.name == "scene-vit":
            size = self.model.patch_embed.img_size
            xf = F.interpolate(x.float() / 255, size=tuple(size), mode="bilinear",
                               antialias=True, align_corners=False)
            feats = self.model.forward_features((xf - 0.5) / 0.5)
            return self.model.forward_head(feats, pre_logits=True), self.model.forward_head(feats)
        pool, logits = self.model(x)
        return pool, logits


def _set_metrics(real: Tensor, fake: Tensor, logits: Tensor, is_splits: int,
                 kid_subsets: int, kid_size: int, seed: int) -> dict:
    """IS, FID, KID of one set of fake features (torchmetrics), real features fixed."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake, logits = real.double(), fake.double(), logits.double()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        torch.manual_seed(seed)
        fid = FrechetInceptionDistance(feature=_Given(real.shape[1]))
        fid.update(real, real=True)
        fid.update(fake, real=False)
        kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=kid_subsets,
                                      subset_size=min(kid_size, len(real), len(fake)))
        kid.update(real, real=True)
        kid.update(fake, real=False)
        return {"IS": _inception_score(logits, is_splits, seed), "FID": float(fid.compute()),
                "KID": float(kid.compute()[0])}


def _inception_score(logits: Tensor, splits: int, seed: int) -> float:
    """torchmetrics' Inception Score of given logits (its random split order seeded)."""
    import warnings

    from torchmetrics.image.inception import InceptionScore

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        torch.manual_seed(seed)
        inc = InceptionScore(feature=_Given(logits.shape[1]), splits=min(splits, len(logits)))
        inc.update(logits.double())
        return float(inc.compute()[0])


class _FrechetToReference:
    r"""FID of many fake sets against one fixed reference, exactly and fast.

    With :math:`S = \Sigma_r^{1/2}` (symmetric, computed once),
    :math:`\operatorname{tr}(\Sigma_r\Sigma_f)^{1/2} = \operatorname{tr}(S\Sigma_f S)^{1/2}`, the
    sum of the square roots of the eigenvalues of a symmetric PSD matrix; with
    :math:`\Sigma_f = X_c^\top X_c` they are those of the :math:`n \times n` Gram matrix
    :math:`(X_c S)(X_c S)^\top` when :math:`n < d`. The same number as torchmetrics' FID (tested),
    in :math:`O(n d^2)` per set instead of a :math:`d \times d` non-symmetric eigenproblem.
    """

    def __init__(self, real: Tensor):
        real = real.double()
        self.mu = real.mean(0)
        cov = torch.cov(real.T)
        w, V = torch.linalg.eigh(cov)
        self.S = (V * w.clamp_min(0).sqrt()) @ V.T
        self.tr = float(cov.trace())

    def __call__(self, fake: Tensor) -> float:
        fake = fake.double()
        n = len(fake)
        xc = (fake - fake.mean(0)) / (n - 1) ** 0.5
        y = xc @ self.S
        g = y @ y.T if n < y.shape[1] else y.T @ y
        root = torch.linalg.eigvalsh(g).clamp_min(0).sqrt().sum()
        d = (self.mu - fake.mean(0)).square().sum()
        return float(d + self.tr + xc.square().sum() - 2 * root)


def metrics_table(features: dict, reference: dict, n_boot: int = 200, level: float = 0.95,
                  is_splits: int = 10, kid_subsets: int = 100, kid_size: int = 1000,
                  seed: int = 0, baseline: str = "none",
                  pairs: Optional[Sequence[tuple]] = None) -> tuple:
    r"""IS, FID and KID of every method with bootstrap intervals, and paired differences.

    Parameters
    ----------
    features : dict
        ``{method: Features(...)(images)}``, the samples of every method in the same item order
        (seed-paired).
    reference : dict
        ``Features(...)(real images)``: the reference set of FID and KID.
    n_boot : int
        Bootstrap resamples of the samples (the reference stays fixed); 0 for none.
    level : float
        Confidence level of the percentile intervals.
    is_splits, kid_subsets, kid_size : int
        IS splits and KID subsets of ``min(kid_size, n_real, n_fake)`` samples (torch-fidelity's
        10, 100 and 1000).
    seed : int
        Seed of the resampling and of KID's and IS's random subsets.
    baseline : str
        The method the differences are taken against.
    pairs : sequence of (str, str), optional
        The differences ``a − b`` to report instead, e.g. ``[("sag", "none"),
        ("sag_tokenrank", "sag")]``; the index of ``differences`` is then ``"a - b"``.

    Returns
    -------
    table : pandas.DataFrame
        Index ``method``; per metric (``IS``, ``FID``, ``KID`` and, for scene-ViT features,
        ``valid``: the scene-validity rate) the value on all samples (torchmetrics) and
        ``<metric> low`` / ``<metric> high``.
    differences : pandas.DataFrame
        Index ``method`` (all but the baseline; ``"a - b"`` with ``pairs``); per metric
        ``method − baseline`` and its paired interval: the same resampled seeds for both methods
        in every resample.

    Notes
    -----
    The values on all samples are torchmetrics' ``InceptionScore``, ``FrechetInceptionDistance``
    and ``KernelInceptionDistance`` on the given features :cite:`salimans2016is`
    :cite:`heusel2017fid` :cite:`binkowski2018kid`. In each bootstrap resample: IS as above; KID
    as torchmetrics' with one subset of ``min(n_real, n)`` samples (the unbiased MMD² of the
    resample against a random subset of the reference); FID by the exact formula of
    torchmetrics evaluated through the symmetric square root of the fixed reference covariance
    (tested equal), because a :math:`2048 \times 2048` eigenproblem per resample is too slow.
    """
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    methods = list(features)
    n = len(features[methods[0]]["pool"])
    if any(len(f["pool"]) != n for f in features.values()):
        raise ValueError("every method needs the same samples (seed-paired)")
    if n < 2:
        raise ValueError("the metrics need at least 2 samples per method")
    real = reference["pool"].double()
    frechet = _FrechetToReference(real)
    rng = np.random.default_rng(seed)
    boots = [rng.integers(0, n, n) for _ in range(n_boot)]
    vals = {m: [] for m in methods}
    for m in methods:
        f = features[m]
        r = _set_metrics(real, f["pool"], f["logits"], is_splits, kid_subsets, kid_size, seed)
        if "valid" in f:
            r["valid"] = float(f["valid"].mean())
        vals[m].append(r)
    for b, ix in enumerate(boots):
        it = torch.from_numpy(ix)
        for m in methods:
            f = features[m]
            fake, logits = f["pool"][it].double(), f["logits"][it].double()
            r = {"IS": _inception_score(logits, is_splits, seed + b + 1)}
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features")
                torch.manual_seed(seed + b + 1)
                kid = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=1,
                                              subset_size=min(len(real), n))
                kid.update(real, real=True)
                kid.update(fake, real=False)
                r["KID"] = float(kid.compute()[0])
            r["FID"] = frechet(fake)
            if "valid" in f:
                r["valid"] = float(f["valid"][it].mean())
            vals[m].append(r)
    q = [(1 - level) / 2, (1 + level) / 2]

    def summary(d: pd.DataFrame) -> dict:
        row = {}
        for k in d.columns:
            lo, hi = np.quantile(d[k].iloc[1:], q) if n_boot else (np.nan, np.nan)
            row.update({k: d[k].iloc[0], f"{k} low": lo, f"{k} high": hi})
        return row

    rows = {m: summary(pd.DataFrame(vals[m])) for m in methods}
    if pairs is None:
        diffs = {m: summary(pd.DataFrame(vals[m]) - pd.DataFrame(vals[baseline]))
                 for m in methods if m != baseline and baseline in vals}
    else:
        bad = [p for p in pairs if len(p) != 2 or p[0] not in vals or p[1] not in vals]
        if bad:
            raise ValueError(f"pairs must be (method, method) of {methods}, got {bad}")
        diffs = {f"{a} - {b}": summary(pd.DataFrame(vals[a]) - pd.DataFrame(vals[b]))
                 for a, b in pairs}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")
    differences = pd.DataFrame.from_dict(diffs, orient="index").rename_axis("method")
    return table, differences


def reference_scenes(n: int = 1000, size: int = 32) -> Tensor:
    """Held-out real scenes, the offline reference set: ``benchmark("easy", n, size)`` as uint8
    (rounded as the PNG samples are)."""
    from attnchain.data import scenes

    imgs = scenes.generate(n, scenes.BENCHMARK_SEED, "easy", size).images
    return (imgs * 255).round().to(torch.uint8)


def reference_folder(folder, n: Optional[int] = None, size: int = 512) -> Tensor:
    """Real images of a folder (``*.jpg``, ``*.jpeg``, ``*.png``, sorted by name, the first ``n``),
    resized (shorter side) and centre-cropped to ``size``: ``(n, 3, size, size)`` uint8. The
    full profile's reference set (we use COCO-2017 val, :func:`coco_val2017`)."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise ValueError(f"no images (*.jpg, *.jpeg, *.png) in {folder}")
    files = files[:n] if n else files
    out = []
    for p in files:
        im = Image.open(p).convert("RGB")
        s = size / min(im.size)
        im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))),
                       Image.BICUBIC)
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        out.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


#: COCO-2017 validation images (5,000), the full profile's FID reference set.
COCO_VAL2017_URL = "http://images.cocodataset.org/zips/val2017.zip"


def coco_val2017(root, url: str = COCO_VAL2017_URL) -> Path:
    """The folder ``root/val2017`` of COCO-2017's 5,000 validation images, downloaded and
    unpacked on first use (778 MB)."""
    import urllib.request
    import zipfile

    root = Path(root)
    folder = root / "val2017"
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "val2017.zip"
    if not archive.exists():
        tmp = archive.with_suffix(".zip.part")
        urllib.request.urlretrieve(url, tmp)
        tmp.replace(archive)
    with zipfile.ZipFile(archive) as z:
        z.extractall(root)
    if not folder.is_dir():
        raise ValueError(f"{archive} holds no val2017/ folder")
    return folder
