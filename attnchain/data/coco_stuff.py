r"""COCO-Stuff-27: DiffSeg's curated COCO validation images with 27 coarse stuff+thing classes.

DiffSeg :cite:`tian2024diffseg` (and the paper's DiffSeg experiment :cite:`erel2025attention`)
evaluates on COCO-Stuff-27 :cite:`caesar2018cocostuff`: 2,175 images of COCO 2017 validation
listed in ``Coco164kFull_Stuff_Coarse_7.txt`` (the curated list of IIC
:cite:`ji2019iic`, used by PiCIE :cite:`cho2021picie` and DiffSeg), with the 182 fine COCO-Stuff
labels mapped to their 27 *supercategories* (12 thing and 15 stuff classes).

**Where the files come from** (:func:`download`)

- the curated list: DiffSeg's repository, :data:`CURATED_URL` (``data/coco/`` of
  ``google/diffseg``), checked against :data:`CURATED_SHA256` (2,175 ids, :data:`CURATED_SIZE`);
- the images: COCO's image server, ``http://images.cocodataset.org/val2017/<id>.jpg``, one file
  per image;
- the stuff+thing label maps: the COCO-Stuff archive ``stuffthingmaps_trainval2017.zip``
  (``http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/``, about 660 MB,
  downloaded once), of which only ``val2017/<id>.png`` of the listed images is extracted.

The folder layout is DiffSeg's: ``<root>/val2017/<id>.jpg``, ``<root>/annotation_val2017/<id>.png``
and ``<root>/Coco164kFull_Stuff_Coarse_7.txt``. A label map is a single-channel PNG whose pixel
value is the fine label index ``0..181`` (the COCO category id minus one; 0 = person) or 255
(unlabelled).

**Pre-processing** (:class:`CocoStuff27`, as DiffSeg's data pipeline): centre crop to the
shorter side, then resize to ``512 × 512``, the image bilinearly (half-pixel centres, no
antialiasing, as ``tf.image.resize``) and the label map by nearest neighbour; labels mapped
fine → coarse with :data:`FINE_TO_COARSE` and 255 → -1 (ignored by the metrics).

**References**

:cite:`caesar2018cocostuff`, :cite:`ji2019iic`, :cite:`cho2021picie`, :cite:`tian2024diffseg`.
"""
from __future__ import annotations

import hashlib
import io
import os
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["COARSE", "FINE", "FINE_TO_COARSE", "IGNORE", "RESOLUTION", "CURATED_LIST",
           "CURATED_URL", "CURATED_SHA256", "CURATED_SIZE", "IMAGE_URL", "MAPS_URL",
           "to_coarse", "crop_resize", "CocoStuff27", "download", "write_sample", "default_root"]

#: The side of the square DiffSeg evaluates at.
RESOLUTION = 512
#: The label value of ignored pixels after the mapping (unlabelled pixels, fine label 255).
IGNORE = -1
#: The curated list's file name, and where DiffSeg publishes it.
CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
CURATED_URL = ("https://raw.githubusercontent.com/google/diffseg/main/data/coco/" + CURATED_LIST)
#: SHA-256 of the published list (2,175 lines, one zero-padded image id each).
CURATED_SHA256 = "7c629734c88f1a74bba6311e01d4d9fe976df84f07cb4fc86452ce5116e51655"
CURATED_SIZE = 2175
IMAGE_URL = "http://images.cocodataset.org/val2017/{}.jpg"
MAPS_URL = ("http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
            "stuffthingmaps_trainval2017.zip")

#: The 27 coarse classes in the order of their indices (the IIC / PiCIE / DiffSeg order):
#: 12 thing supercategories, then 15 stuff supercategories.
COARSE = (
    "electronic", "appliance", "food-things", "furniture-things", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
)

# COCO-Stuff's 182 fine labels by index, each with its supercategory (COCO's 91 thing ids, 11 of
# them unused in the annotations, then the 91 stuff labels in alphabetical order).
_THINGS = (
    ("person", "person"), ("bicycle", "vehicle"), ("car", "vehicle"), ("motorcycle", "vehicle"),
    ("airplane", "vehicle"), ("bus", "vehicle"), ("train", "vehicle"), ("truck", "vehicle"),
    ("boat", "vehicle"), ("traffic light", "outdoor"), ("fire hydrant", "outdoor"),
    ("street sign", "outdoor"), ("stop sign", "outdoor"), ("parking meter", "outdoor"),
    ("bench", "outdoor"), ("bird", "animal"), ("cat", "animal"), ("dog", "animal"),
    ("horse", "animal"), ("sheep", "animal"), ("cow", "animal"), ("elephant", "animal"),
    ("bear", "animal"), ("zebra", "animal"), ("giraffe", "animal"), ("hat", "accessory"),
    ("backpack", "accessory"), ("umbrella", "accessory"), ("shoe", "accessory"),
    ("eye glasses", "accessory"), ("handbag", "accessory"), ("tie", "accessory"),
    ("suitcase", "accessory"), ("frisbee", "sports"), ("skis", "sports"),
    ("snowboard", "sports"), ("sports ball", "sports"), ("kite", "sports"),
    ("baseball bat", "sports"), ("baseball glove", "sports"), ("skateboard", "sports"),
    ("surfboard", "sports"), ("tennis racket", "sports"), ("bottle", "kitchen"),
    ("plate", "kitchen"), ("wine glass", "kitchen"), ("cup", "kitchen"), ("fork", "kitchen"),
    ("knife", "kitchen"), ("spoon", "kitchen"), ("bowl", "kitchen"), ("banana", "food-things"),
    ("apple", "food-things"), ("sandwich", "food-things"), ("orange", "food-things"),
    ("broccoli", "food-things"), ("carrot", "food-things"), ("hot dog", "food-things"),
    ("pizza", "food-things"), ("donut", "food-things"), ("cake", "food-things"),
    ("chair", "furniture-things"), ("couch", "furniture-things"),
    ("potted plant", "furniture-things"), ("bed", "furniture-things"),
    ("mirror", "furniture-things"), ("dining table", "furniture-things"),
    ("window", "furniture-things"), ("desk", "furniture-things"), ("toilet", "furniture-things"),
    ("door", "furniture-things"), ("tv", "electronic"), ("laptop", "electronic"),
    ("mouse", "electronic"), ("remote", "electronic"), ("keyboard", "electronic"),
    ("cell phone", "electronic"), ("microwave", "appliance"), ("oven", "appliance"),
    ("toaster", "appliance"), ("sink", "appliance"), ("refrigerator", "appliance"),
    ("blender", "appliance"), ("book", "indoor"), ("clock", "indoor"), ("vase", "indoor"),
    ("scissors", "indoor"), ("teddy bear", "indoor"), ("hair drier", "indoor"),
    ("toothbrush", "indoor"), ("hair brush", "indoor"),
)
_STUFF = (
    ("banner", "textile"), ("blanket", "textile"), ("branch", "plant"), ("bridge", "building"),
    ("building-other", "building"), ("bush", "plant"), ("cabinet", "furniture-stuff"),
    ("cage", "structural"), ("cardboard", "rawmaterial"), ("carpet", "floor"),
    ("ceiling-other", "ceiling"), ("ceiling-tile", "ceiling"), ("cloth", "textile"),
    ("clothes", "textile"), ("clouds", "sky"), ("counter", "furniture-stuff"),
    ("cupboard", "furniture-stuff"), ("curtain", "textile"), ("desk-stuff", "furniture-stuff"),
    ("dirt", "ground"), ("door-stuff", "furniture-stuff"), ("fence", "structural"),
    ("floor-marble", "floor"), ("floor-other", "floor"), ("floor-stone", "floor"),
    ("floor-tile", "floor"), ("floor-wood", "floor"), ("flower", "plant"), ("fog", "water"),
    ("food-other", "food-stuff"), ("fruit", "food-stuff"), ("furniture-other", "furniture-stuff"),
    ("grass", "plant"), ("gravel", "ground"), ("ground-other", "ground"), ("hill", "solid"),
    ("house", "building"), ("leaves", "plant"), ("light", "furniture-stuff"), ("mat", "textile"),
    ("metal", "rawmaterial"), ("mirror-stuff", "furniture-stuff"), ("moss", "plant"),
    ("mountain", "solid"), ("mud", "ground"), ("napkin", "textile"), ("net", "structural"),
    ("paper", "rawmaterial"), ("pavement", "ground"), ("pillow", "textile"),
    ("plant-other", "plant"), ("plastic", "rawmaterial"), ("platform", "ground"),
    ("playingfield", "ground"), ("railing", "structural"), ("railroad", "ground"),
    ("river", "water"), ("road", "ground"), ("rock", "solid"), ("roof", "building"),
    ("rug", "textile"), ("salad", "food-stuff"), ("sand", "ground"), ("sea", "water"),
    ("shelf", "furniture-stuff"), ("sky-other", "sky"), ("skyscraper", "building"),
    ("snow", "ground"), ("solid-other", "solid"), ("stairs", "furniture-stuff"),
    ("stone", "solid"), ("straw", "plant"), ("structural-other", "structural"),
    ("table", "furniture-stuff"), ("tent", "building"), ("textile-other", "textile"),
    ("towel", "textile"), ("tree", "plant"), ("vegetable", "food-stuff"), ("wall-brick", "wall"),
    ("wall-concrete", "wall"), ("wall-other", "wall"), ("wall-panel", "wall"),
    ("wall-stone", "wall"), ("wall-tile", "wall"), ("wall-wood", "wall"), ("water-other", "water"),
    ("waterdrops", "water"), ("window-blind", "window"), ("window-other", "window"),
    ("wood", "solid"),
)
#: The 182 fine COCO-Stuff labels by index (label value in the PNG maps).
FINE = tuple(name for name, _ in _THINGS + _STUFF)
#: ``FINE_TO_COARSE[f]``: the coarse index (into :data:`COARSE`) of fine label ``f``.
FINE_TO_COARSE = tuple(COARSE.index(sup) for _, sup in _THINGS + _STUFF)


def default_root() -> Path:
    """``$ATTNCHAIN_DATA/coco-stuff``, else ``~/.cache/attnchain/data/coco-stuff``."""
    base = os.environ.get("ATTNCHAIN_DATA", Path.home() / ".cache" / "attnchain" / "data")
    return Path(base) / "coco-stuff"


def to_coarse(fine) -> torch.Tensor:
    """Map fine labels (0..181, 255 = unlabelled) to coarse ones (0..26, :data:`IGNORE`).

    Parameters
    ----------
    fine : array_like or Tensor of int
        Fine label map of any shape (device kept for tensors).

    Returns
    -------
    LongTensor
        Coarse labels, ``-1`` where the fine label is 255.

    Raises
    ------
    ValueError
        A value that is neither a fine label nor 255.

    Examples
    --------
    >>> to_coarse([0, 2, 181, 255]).tolist()   # person, car, wood, unlabelled
    [9, 11, 24, -1]
    """
    t = torch.as_tensor(fine).long()
    bad = ((t < 0) | (t >= len(FINE))) & (t != 255)
    if bool(bad.any()):
        raise ValueError(f"fine labels must be 0..{len(FINE) - 1} or 255, got "
                         f"{sorted(set(t[bad].tolist()))[:5]}")
    table = torch.full((256,), IGNORE, dtype=torch.long, device=t.device)
    table[: len(FINE)] = torch.tensor(FINE_TO_COARSE, device=t.device)
    return table[t.clamp(0, 255)]


def crop_resize(image: torch.Tensor, label: Optional[torch.Tensor] = None,
                size: int = RESOLUTION) -> tuple:
    """Centre crop to the shorter side and resize, as DiffSeg's data pipeline.

    Parameters
    ----------
    image : Tensor, shape (3, H, W)
        Any real dtype (uint8 values 0..255 are kept as such, in float32).
    label : Tensor, shape (H, W), optional
        Integer label map.
    size : int
        Output side.

    Returns
    -------
    image : Tensor, shape (3, size, size), float32
        Bilinear with half-pixel centres, no antialiasing (``tf.image.resize``'s default).
    label : LongTensor, shape (size, size), or None
        Nearest neighbour with half-pixel centres.

    Examples
    --------
    >>> import torch
    >>> im, lab = crop_resize(torch.zeros(3, 4, 6), torch.arange(24).reshape(4, 6), size=2)
    >>> tuple(im.shape), lab.tolist()   # columns 1..4 kept; rows/cols 1 and 3 of the square
    ((3, 2, 2), [[8, 10], [20, 22]])
    """
    if image.ndim != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2:]
    c = min(h, w)
    top, left = (h - c) // 2, (w - c) // 2
    im = image[:, top:top + c, left:left + c].float()
    im = F.interpolate(im[None], size=(size, size), mode="bilinear", align_corners=False,
                       antialias=False)[0]
    if label is None:
        return im, None
    if label.shape != image.shape[-2:]:
        raise ValueError(f"label {tuple(label.shape)} and image {tuple(image.shape[-2:])} differ")
    lab = label[top:top + c, left:left + c].float()
    lab = F.interpolate(lab[None, None], size=(size, size), mode="nearest-exact")[0, 0]
    return im, lab.round().long()


def _read_list(path: Path) -> list:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class CocoStuff27(torch.utils.data.Dataset):
    """COCO-Stuff-27 in DiffSeg's layout: ``ds[i] -> (image, label)``.

    Parameters
    ----------
    root : str or Path
        The folder (:func:`download` fills it).
    ids : sequence of str, optional
        Image ids (file stems); default the curated list in ``root``.
    size : int
        Side after the centre crop and resize (512, DiffSeg's).

    ``image`` is a ``(3, size, size)`` float32 tensor with values in ``[0, 255]``; ``label`` a
    ``(size, size)`` int64 tensor of coarse classes with :data:`IGNORE` for unlabelled pixels.
    :meth:`raw` gives the PIL image as stored.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = write_sample(d, n=2, shape=(40, 60))
    ...     ds = CocoStuff27(d, size=32)
    ...     image, label = ds[0]
    >>> len(ds), tuple(image.shape), tuple(label.shape), int(label.min()) >= -1
    (2, (3, 32, 32), (32, 32), True)
    """

    def __init__(self, root, ids: Optional[Sequence[str]] = None, size: int = RESOLUTION):
        self.root, self.size = Path(root), int(size)
        if ids is None:
            listed = self.root / CURATED_LIST
            if not listed.exists():
                raise FileNotFoundError(f"{listed} is missing: run attnchain.data.coco_stuff."
                                        f"download({str(self.root)!r}) first")
            ids = _read_list(listed)
        self.ids = [str(i) for i in ids]

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, i: int) -> tuple:
        """``(image path, label path)`` of item ``i``."""
        stem = self.ids[i]
        return (self.root / "val2017" / f"{stem}.jpg",
                self.root / "annotation_val2017" / f"{stem}.png")

    def raw(self, i: int):
        """The stored image of item ``i`` (PIL, RGB)."""
        from PIL import Image

        with Image.open(self.paths(i)[0]) as im:
            return im.convert("RGB")

    def __getitem__(self, i: int) -> tuple:
        from PIL import Image

        image_path, label_path = self.paths(i)
        for p in (image_path, label_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} is missing (download() fetches it)")
        image = torch.from_numpy(np.asarray(self.raw(i), dtype=np.uint8).copy()).permute(2, 0, 1)
        with Image.open(label_path) as lab:
            fine = np.asarray(lab)
        if fine.ndim == 3:  # a label PNG saved with colour channels: the first one is the label
            fine = fine[..., 0]
        im, label = crop_resize(image, torch.from_numpy(fine.astype(np.int64)), self.size)
        return im, to_coarse(label)


def _fetch(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as fh:
        while True:
            chunk = r.read(1 << 20)
            if not chunk:
                break
            fh.write(chunk)
    os.replace(tmp, target)


def download(root=None, limit: Optional[int] = None, maps_archive=None,
             progress: bool = True) -> Path:
    """Download the curated list, the images and the label maps into ``root`` (cached).

    Parameters
    ----------
    root : str or Path, optional
        Default :func:`default_root`.
    limit : int, optional
        Only the first ``limit`` images of the list (the label archive is still downloaded
        whole: it is one file).
    maps_archive : str or Path, optional
        A local ``stuffthingmaps_trainval2017.zip`` instead of the download.
    progress : bool
        A tqdm bar over images.

    Returns
    -------
    Path
        ``root``. Files already present are not fetched again; a list already in ``root`` is
        used as it is (a subset, or a list of one's own).

    Raises
    ------
    ValueError
        The downloaded list is not the published one (its SHA-256 differs); the label archive
        lacks a listed image.
    """
    from tqdm.auto import tqdm

    root = default_root() if root is None else Path(root)
    listed = root / CURATED_LIST
    if not listed.exists():
        _fetch(CURATED_URL, listed)
        digest = hashlib.sha256(listed.read_bytes()).hexdigest()
        if digest != CURATED_SHA256:
            listed.unlink()
            raise ValueError(f"{CURATED_URL} is not DiffSeg's curated list (SHA-256 {digest}, "
                             f"expected {CURATED_SHA256})")
    ids = _read_list(listed)[:limit]
    for stem in tqdm(ids, desc="COCO val2017 images", disable=not progress):
        path = root / "val2017" / f"{stem}.jpg"
        if not path.exists():
            _fetch(IMAGE_URL.format(stem), path)
    missing = [s for s in ids if not (root / "annotation_val2017" / f"{s}.png").exists()]
    if missing:
        archive = Path(maps_archive) if maps_archive is not None else root / Path(MAPS_URL).name
        if not archive.exists():
            _fetch(MAPS_URL, archive)
        (root / "annotation_val2017").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as z:
            names = {Path(n).name: n for n in z.namelist() if "val2017/" in n}
            for stem in missing:
                member = names.get(f"{stem}.png")
                if member is None:
                    raise ValueError(f"{archive} has no val2017/{stem}.png")
                (root / "annotation_val2017" / f"{stem}.png").write_bytes(z.read(member))
    return root


def write_sample(root, n: int = 3, shape: tuple = (48, 64), seed: int = 0,
                 maps_archive: bool = False) -> list:
    """Write a small COCO-Stuff-27 folder in DiffSeg's layout (for tests); returns the ids.

    Images are seeded noise JPEGs of ``shape`` (H, W) with a few flat rectangles; the label maps
    are single-channel PNGs of fine labels (0..181) where the rectangles are, 255 elsewhere in
    a border; the list file holds the ids, zero-padded to 12 digits as COCO's. With
    ``maps_archive`` the label maps go into ``<root>/stuffthingmaps_trainval2017.zip`` (the
    archive's layout, ``val2017/<id>.png``) instead of ``annotation_val2017/``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    ids = [f"{int(k):012d}" for k in sorted(rng.choice(600000, size=n, replace=False))]
    maps = {}
    h, w = shape
    for stem in ids:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = np.full((h, w), rng.integers(0, len(FINE)), dtype=np.uint8)
        for _ in range(3):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            y1, x1 = y0 + rng.integers(4, h // 2), x0 + rng.integers(4, w // 2)
            label[y0:y1, x0:x1] = rng.integers(0, len(FINE))
            pixels[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
        label[:2] = 255
        Image.fromarray(pixels).save(root / "val2017" / f"{stem}.jpg", quality=95)
        buf = io.BytesIO()
        Image.fromarray(label).save(buf, format="PNG")
        maps[stem] = buf.getvalue()
    if maps_archive:
        with zipfile.ZipFile(root / Path(MAPS_URL).name, "w") as z:
            for stem, data in maps.items():
                z.writestr(f"val2017/{stem}.png", data)
    else:
        (root / "annotation_val2017").mkdir(parents=True, exist_ok=True)
        for stem, data in maps.items():
            (root / "annotation_val2017" / f"{stem}.png").write_bytes(data)
    (root / CURATED_LIST).write_text("".join(s + "\n" for s in ids))
    return ids
