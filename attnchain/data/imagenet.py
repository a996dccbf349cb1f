r"""ImageNet-class test sets: ImageNetV2 from the hub, an ImageNet validation folder, class names.

The full profile of the token-masking chapter classifies ImageNet images. ImageNet's validation set
needs an account at image-net.org, so the default is **ImageNetV2** :cite:`recht2019imagenetv2`,
a public re-collection of 10,000 test images of the same 1,000 classes, distributed on the Hugging
Face hub as the dataset repository ``vaishaal/ImageNetV2`` (archives
``imagenetv2-matched-frequency.tar.gz``, ``imagenetv2-threshold0.7.tar.gz``,
``imagenetv2-top-images.tar.gz``). Each archive extracts to
``imagenetv2-<variant>-format-val/<class index>/<image>.jpeg``: the folder name *is* the class
index 0..999. (Sorting those names as strings, as torchvision's ``ImageFolder`` does, puts ``"10"``
before ``"2"`` and mislabels most images; here they are parsed as integers.)

An ImageNet validation folder in the usual layout (one folder per WordNet id, ``n01440764/...``)
is read by :func:`imagenet_val`.

:data:`SYNSETS` and :data:`CLASS_NAMES` (the first lemma of each class description) come from
timm's ``timm.data.ImageNetInfo``, in class-index order. Two names occur twice (``crane``, the
bird and the machine; ``maillot``, two kinds of swimsuit): a zero-shot text head cannot tell those
classes apart by name.

**References**

Recht, Roelofs, Schmidt and Shankar, "Do ImageNet Classifiers Generalize to ImageNet?", ICML 2019
:cite:`recht2019imagenetv2`; https://github.com/modestyachts/ImageNetV2.
"""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["SYNSETS", "CLASS_NAMES", "DATASETS", "HUB_REPO", "ImageList", "imagenetv2",
           "imagenet_val", "load", "write_imagenetv2_sample", "default_root"]

#: The datasets :func:`load` knows.
DATASETS = ("imagenetv2-matched-frequency", "imagenetv2-threshold0.7", "imagenetv2-top-images",
            "imagenet-val")
#: The hub dataset repository of ImageNetV2.
HUB_REPO = "vaishaal/ImageNetV2"
_SUFFIXES = (".jpeg", ".jpg", ".png")


def _classes() -> tuple:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return (tuple(info.index_to_label_name(i) for i in range(1000)),
            tuple(info.index_to_description(i).split(",")[0].strip() for i in range(1000)))


#: The 1,000 WordNet ids in class-index order (``SYNSETS[0] == "n01440764"``), and a short name
#: per class, the first lemma of its description (``CLASS_NAMES[0] == "tench"``).
SYNSETS, CLASS_NAMES = _classes()


def default_root() -> Path:
    """``$ATTNCHAIN_DATA``, else ``~/.cache/attnchain/data``."""
    return Path(os.environ.get("ATTNCHAIN_DATA", Path.home() / ".cache" / "attnchain" / "data"))


class ImageList(torch.utils.data.Dataset):
    """Images with class labels: ``ds[i] -> (PIL image in RGB, label)``.

    Parameters
    ----------
    items : sequence of (path, int)
    name : str
    root : Path
    """

    def __init__(self, items: Sequence[tuple], name: str, root):
        self.items, self.name, self.root = [(Path(p), int(y)) for p, y in items], name, Path(root)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image, UnidentifiedImageError

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                return im.convert("RGB"), label
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err

    def subset(self, limit: int) -> "ImageList":
        """The first ``limit`` images of a class-interleaved order.

        Files are sorted by name within each class; then the order takes the first image of every
        class (by class index), then the second of every class, and so on, so that a small
        ``limit`` covers many classes. The order is the same on every machine.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        by_class: dict = {}
        for p, y in sorted(self.items, key=lambda t: (t[1], t[0].name)):
            by_class.setdefault(y, []).append((p, y))
        rank = {id(t): (k, y) for y, ts in by_class.items() for k, t in enumerate(ts)}
        order = sorted((t for ts in by_class.values() for t in ts), key=lambda t: rank[id(t)])
        return ImageList(order[:limit], self.name, self.root)

    def describe(self) -> str:
        """One line: name, root, number of images and of classes."""
        return (f"{self.name} at {self.root}: {len(self)} images of "
                f"{len({y for _, y in self.items})} classes")


def _files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES)


def _extract(archive: Path, root: Path) -> None:
    """Extract ``archive`` into ``root``, refusing members that would land outside it."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            target = (root / m.name).resolve()
            if root.resolve() not in (target, *target.parents) or m.issym() or m.islnk():
                raise ValueError(f"archive {archive} has a member outside its folder: {m.name!r}")
        tar.extractall(root, filter="data")


def imagenetv2(root=None, variant: str = "matched-frequency", download: bool = True,
               archive=None) -> ImageList:
    """ImageNetV2 (10,000 images, 10 per class), downloaded from the hub once and cached.

    Parameters
    ----------
    root : str or Path, optional
        Where the archive is extracted (default :func:`default_root`).
    variant : {"matched-frequency", "threshold0.7", "top-images"}
    download : bool
        Download the archive from the hub repository ``vaishaal/ImageNetV2`` when the folder is
        missing (else raise).
    archive : str or Path, optional
        A local archive in the same format, extracted instead of the download.

    Raises
    ------
    FileNotFoundError
        The folder is missing and neither an archive nor a download may provide it.
    ValueError
        An unknown variant; a folder name that is not a class index; an unsafe archive.
    """
    if variant not in ("matched-frequency", "threshold0.7", "top-images"):
        raise ValueError(f"unknown ImageNetV2 variant {variant!r}")
    root = default_root() if root is None else Path(root)
    folder = root / f"imagenetv2-{variant}-format-val"
    filename = f"imagenetv2-{variant}.tar.gz"
    if not folder.is_dir():
        if archive is None and not download:
            raise FileNotFoundError(
                f"{folder} is missing: it is extracted from {filename} of the Hugging Face dataset "
                f"{HUB_REPO} (download=True fetches it), or pass archive=<that file>")
        if archive is None:
            from huggingface_hub import hf_hub_download
            archive = hf_hub_download(HUB_REPO, filename, repo_type="dataset",
                                      cache_dir=str(root / "hub"))
        _extract(Path(archive), root)
    items = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not sub.name.isdigit() or not 0 <= int(sub.name) < 1000:
            raise ValueError(f"{sub} is not a class-index folder (0..999) of ImageNetV2")
        items += [(p, int(sub.name)) for p in _files(sub)]
    return ImageList(items, f"imagenetv2-{variant}", folder)


def imagenet_val(root) -> ImageList:
    """An ImageNet validation folder with one sub-folder per WordNet id (``n01440764/*.JPEG``).

    Raises
    ------
    FileNotFoundError
        ``root`` does not exist (ImageNet needs an account at https://image-net.org).
    ValueError
        A sub-folder that is not one of the 1,000 synsets.
    """
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(
            f"ImageNet validation folder {root} not found: download ILSVRC2012 validation from "
            "https://image-net.org (an account is needed) and sort it into synset folders; or use "
            "dataset 'imagenetv2-matched-frequency', which downloads without one")
    index = {s: i for i, s in enumerate(SYNSETS)}
    items = []
    for sub in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        if sub.name not in index:
            raise ValueError(f"{sub} is not an ImageNet-1k synset folder")
        items += [(p, index[sub.name]) for p in _files(sub)]
    return ImageList(items, "imagenet-val", root)


def load(name: str, root=None, limit: Optional[int] = None, download: bool = True) -> ImageList:
    """A dataset of :data:`DATASETS` by name, optionally its first ``limit`` images.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     archive = write_imagenetv2_sample(d, classes=(0, 2, 10), per_class=2)
    ...     _ = imagenetv2(root=d, archive=archive)
    ...     ds = load("imagenetv2-matched-frequency", root=d, limit=4, download=False)
    ...     [label for _, label in ds.items], ds[0][0].size
    ([0, 2, 10, 0], (64, 64))
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    ds = imagenet_val(root) if name == "imagenet-val" else \
        imagenetv2(root, name[len("imagenetv2-"):], download=download)
    return ds if limit is None else ds.subset(limit)


def write_imagenetv2_sample(folder, classes: Sequence[int] = (0, 1, 2), per_class: int = 2,
                            size: int = 64, seed: int = 0,
                            variant: str = "matched-frequency") -> Path:
    """Write a small archive in ImageNetV2's format (seeded noise JPEGs); returns its path.

    The archive is ``<folder>/imagenetv2-<variant>.tar.gz`` with members
    ``imagenetv2-<variant>-format-val/<class>/<k>.jpeg``: the layout the hub's archives have,
    for tests and the offline checks of the full-profile code path.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    path = Path(folder) / f"imagenetv2-{variant}.tar.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for c in classes:
            for k in range(per_class):
                buf = io.BytesIO()
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"imagenetv2-{variant}-format-val/{int(c)}/{k:04d}.jpeg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
    return path
