r"""ImageNet-segmentation: 4,276 ImageNet images with foreground masks (``gtsegs_ijcv.mat``).

The benchmark of zero-shot segmentation in Chefer et al., ConceptAttention and the paper
:cite:`erel2025attention` is the set of Guillaumin, Küttel and Ferrari
:cite:`guillaumin2014imagenetseg`: 4,276 images of 445 ImageNet synsets, each with a binary
foreground mask, distributed as one MATLAB v7.3 file (an HDF5 file behind a 512-byte MATLAB
header), ``gtsegs_ijcv.mat`` (about 1.5 GB), from
``http://calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat`` (the address the
ConceptAttention and Transformer-Explainability READMEs give). Its layout:

``/value/img`` (4276, 1) object references
    each to a ``uint8`` array stored as ``(3, W, H)`` (MATLAB's column-major ``H x W x 3``).
``/value/gt`` (4276, 1) object references
    each to a 1 x 1 MATLAB cell, itself a reference to the ``(W, H)`` mask (1 = object).
``/value/id`` (4276, 1) object references
    each to the image's name as MATLAB characters (``uint16``), ``n02084071_1234``: the
    WordNet synset, an underscore, the image number.

A trap (ConceptAttention issue #17): ImageNet-S is a *different* dataset; evaluating on it gave
accuracy 0.62 / IoU 0.45 instead of the reported 0.83 / 0.71.

:class:`ImageNetSegmentation` reads the file lazily (one image per access, the file opened once
per process, so it also works in ``DataLoader`` workers). :func:`download` fetches the file;
:func:`write_sample` writes a small file of the same layout (tests and the device-strict CI run).

Class names follow ConceptAttention: the synset's first WordNet lemma (here from timm's
ImageNet-22k synset table, which holds all 445 synsets) mapped to a short name by ConceptAttention's
``imagenet_class_map.json`` (``"malinois" -> "dog"``), downloaded by :func:`class_map`.

**References**

Guillaumin, Küttel, Ferrari, "ImageNet Auto-annotation with Segmentation Propagation", IJCV 2014
:cite:`guillaumin2014imagenetseg`; Helbling et al., ConceptAttention, ICML 2025
:cite:`helbling2025conceptattention`.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["URL", "FILENAME", "N_IMAGES", "CLASS_MAP_URL", "ImageNetSegmentation", "download",
           "load", "class_map", "english_name", "write_sample", "default_root"]

URL = "http://calvin-vision.net/bigstuff/proj-imagenet/data/gtsegs_ijcv.mat"
FILENAME = "gtsegs_ijcv.mat"
N_IMAGES = 4276
#: ConceptAttention's map from a synset's first lemma to the short name used in its caption,
#: at a pinned commit of https://github.com/helblazer811/ConceptAttention.
CLASS_MAP_URL = ("https://raw.githubusercontent.com/helblazer811/ConceptAttention/"
                 "db30c4dcee01184c4d3f9fc9e46477eeb4e3eef3/experiments/imagenet_segmentation/"
                 "data/imagenet_class_map.json")
_MATLAB_HEADER = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by attnchain. HDF5 schema 1.00 ."


def default_root() -> Path:
    """``$ATTNCHAIN_DATA``, else ``~/.cache/attnchain/data``."""
    return Path(os.environ.get("ATTNCHAIN_DATA", Path.home() / ".cache" / "attnchain" / "data"))


def _chars(arr) -> str:
    """MATLAB characters (uint16 code units, any shape) -> str."""
    a = np.asarray(arr).astype("<u2").ravel(order="F")
    return a.tobytes().decode("utf-16-le")


class ImageNetSegmentation:
    """The images, masks and synsets of ``gtsegs_ijcv.mat``, read lazily.

    Parameters
    ----------
    path : str or Path
        The ``.mat`` file (MATLAB v7.3 / HDF5).

    ``ds[i]`` is ``(image, mask, synset)``: a PIL RGB image, a ``(H, W)`` bool array and the
    WordNet id (``"n02084071"``). ``ds.name(i)`` is the full image name.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file lacks the ``/value/img``, ``/value/gt`` or ``/value/id`` references, or they
        differ in length.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = write_sample(Path(d) / FILENAME, n=3, seed=0)
    ...     ds = ImageNetSegmentation(path)
    ...     image, mask, synset = ds[1]
    ...     len(ds), image.size, mask.shape, mask.dtype, synset
    (3, (30, 40), (40, 30), dtype('bool'), 'n02084071')
    """

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found; download() fetches it from {URL}")
        with h5py.File(self.path, "r") as f:
            try:
                n = [f[f"/value/{k}"].shape[0] for k in ("img", "gt", "id")]
            except KeyError as err:
                raise ValueError(f"{self.path} is not ImageNet-segmentation's gtsegs_ijcv.mat: "
                                 f"it lacks {err}") from err
        if len(set(n)) != 1:
            raise ValueError(f"{self.path}: /value/img, gt and id have {n} entries")
        self._n = n[0]
        self._file = None

    def __len__(self) -> int:
        return self._n

    def __getstate__(self):
        return {"path": self.path, "_n": self._n, "_file": None}

    def _h5(self):
        if self._file is None:
            import h5py
            self._file = h5py.File(self.path, "r")
        return self._file

    def _check(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -self._n <= i < self._n:
            raise IndexError(f"index {i!r} out of range for {self._n} images")
        return int(i) % self._n

    def name(self, i: int) -> str:
        """The image's name, ``<synset>_<number>``."""
        f = self._h5()
        return _chars(f[f["/value/id"][self._check(i), 0]][()])

    def synset(self, i: int) -> str:
        """The WordNet id of image ``i``."""
        return self.name(i).split("_")[0]

    def mask(self, i: int) -> np.ndarray:
        """``(H, W)`` bool foreground mask."""
        f = self._h5()
        cell = f[f["/value/gt"][self._check(i), 0]]
        return np.asarray(f[cell[0, 0]][()]).T != 0

    def image(self, i: int):
        """The RGB image (PIL)."""
        from PIL import Image

        f = self._h5()
        arr = np.asarray(f[f["/value/img"][self._check(i), 0]][()])
        arr = arr.transpose(2, 1, 0) if arr.ndim == 3 else np.stack([arr.T] * 3, -1)
        return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8))).convert("RGB")

    def __getitem__(self, i: int):
        return self.image(i), self.mask(i), self.synset(i)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def download(root=None, url: str = URL) -> Path:
    """``<root>/gtsegs_ijcv.mat``, downloaded from ``url`` (Guillaumin et al.'s server) once.

    The download goes to a temporary name and is renamed when complete, so an interrupted
    download is never mistaken for the file.
    """
    import urllib.request

    root = default_root() if root is None else Path(root)
    path = root / FILENAME
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    print(f"downloading ImageNet-segmentation (~1.5 GB) from {url} to {path}")
    with urllib.request.urlopen(url) as r, open(tmp, "wb") as fh:
        while chunk := r.read(1 << 22):
            fh.write(chunk)
    os.replace(tmp, path)
    return path


def load(root=None, path=None, download_missing: bool = True) -> ImageNetSegmentation:
    """The dataset at ``path`` (or ``<root>/gtsegs_ijcv.mat``), downloading it when missing.

    Raises
    ------
    FileNotFoundError
        Missing and ``download_missing`` is False.
    """
    if path is None:
        root = default_root() if root is None else Path(root)
        path = root / FILENAME
        if not path.is_file():
            if not download_missing:
                raise FileNotFoundError(f"{path} not found; download() fetches it from {URL}")
            path = download(root)
    return ImageNetSegmentation(path)


@functools.lru_cache(maxsize=1)
def _lemmas() -> dict:
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-22k")
    return {info.index_to_label_name(i): info.index_to_description(i).split(",")[0].strip()
            for i in range(info.num_classes())}


def english_name(synset: str) -> str:
    """The first WordNet lemma of a synset (``"n02085620" -> "Chihuahua"``), from timm's
    ImageNet-22k table (the name ConceptAttention reads with NLTK's WordNet).

    Raises
    ------
    ValueError
        A synset not in the table.

    Examples
    --------
    >>> english_name("n02085620")
    'Chihuahua'
    """
    try:
        return _lemmas()[synset]
    except KeyError:
        raise ValueError(f"unknown WordNet synset {synset!r}") from None


def class_map(root=None, path=None, url: str = CLASS_MAP_URL) -> dict:
    """ConceptAttention's ``{first lemma: short name}`` map (445 entries), downloaded once to
    ``<root>/imagenet_class_map.json`` (or read from ``path``)."""
    import urllib.request

    if path is None:
        root = default_root() if root is None else Path(root)
        path = root / "imagenet_class_map.json"
        if not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(url) as r:
                data = r.read()
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    data = json.loads(Path(path).read_text())
    return dict(data.get("categories", data))


def write_sample(path, n: int = 4, seed: int = 0,
                 synsets: Sequence[str] = ("n02085620", "n02084071", "n02121808"),
                 sizes: Optional[Sequence[tuple]] = None) -> Path:
    """Write a small file in ``gtsegs_ijcv.mat``'s exact layout: MATLAB v7.3 header, HDF5
    object references to ``(3, W, H)`` images, 1 x 1 cells of ``(W, H)`` masks and uint16
    character names. Image ``i`` has size ``sizes[i]`` (``(H, W)``; default alternating
    ``(30, 40)`` and ``(40, 30)``), a seeded noise background and a brighter ellipse that is
    its mask, and synset ``synsets[i % len(synsets)]``.
    """
    import h5py

    rng = np.random.default_rng(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        value = f.create_group("value")
        ref_dt = h5py.ref_dtype
        img = value.create_dataset("img", (n, 1), dtype=ref_dt)
        gt = value.create_dataset("gt", (n, 1), dtype=ref_dt)
        ids = value.create_dataset("id", (n, 1), dtype=ref_dt)
        for i in range(n):
            h, w = sizes[i] if sizes is not None else ((30, 40) if i % 2 == 0 else (40, 30))
            yy, xx = np.mgrid[0:h, 0:w]
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
            m = ((yy - cy) / (0.3 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2 <= 1
            pix = rng.integers(0, 120, (h, w, 3)).astype(np.uint8)
            pix[m] = rng.integers(150, 256, (int(m.sum()), 3)).astype(np.uint8)
            d_img = refs.create_dataset(f"img{i}", data=pix.transpose(2, 1, 0))
            d_mask = refs.create_dataset(f"mask{i}", data=m.astype(np.uint8).T)
            d_cell = refs.create_dataset(f"cell{i}", (1, 1), dtype=ref_dt)
            d_cell[0, 0] = d_mask.ref
            name = f"{synsets[i % len(synsets)]}_{1000 + i}"
            d_id = refs.create_dataset(f"id{i}", data=np.frombuffer(
                name.encode("utf-16-le"), dtype="<u2").reshape(-1, 1))
            img[i, 0], gt[i, 0], ids[i, 0] = d_img.ref, d_cell.ref, d_id.ref
    with open(tmp, "r+b") as fh:
        fh.write(_MATLAB_HEADER.ljust(116, b" ")[:116])
    os.replace(tmp, path)
    return path
