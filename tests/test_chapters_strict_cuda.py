"""Every chapter runs in the full profile on a (simulated) Colab GPU.

A chapter is executed as a Colab reader with a GPU runtime would run it, but without a GPU and
without the hub: ``ATTNCHAIN_PROFILE=full`` picks the paper's backbones, ``ATTNCHAIN_WEIGHTS=random``
builds them at their real sizes with random weights (nothing is downloaded), and a first cell
switches on :mod:`attnchain.testing.strict_cuda`, under which a tensor on ``"cuda"`` refuses NumPy
conversion and CPU mixing as on a real GPU. Counts (scenes, images) are reduced per chapter by
parameters injected after the chapter's ``parameters`` cell; a chapter without an entry runs with
its own parameters. New chapters are picked up automatically.

The peak simulated device memory and the process's peak host memory of each chapter are written
to ``_build/strict_cuda/<chapter>.json``.
"""
import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
OUT = ROOT / "_build" / "strict_cuda"

#: Reduced counts for the full profile in CI (the chapters' own values are for a Colab GPU).
SMOKE = {
    "03_multi_bounce": {"N_SCENES": 2},
    "04_tokenrank_pagerank": {"PHOTOS": ["coffee", "chelsea"]},
    "05_lambda2_heads": {"N_SCENES": 2, "LAYERS": [5, 11]},
    "07_offline_vision": {"LEVELS": ["easy"], "N_SCENES": 4, "N_BOOT": 200},
    "08_concept_segmentation": {
        "N_ITEMS": 2, "BATCH_SIZE": 1, "N_BOOT": 200, "N_WORD_CHECK": 6,
        "DATA_PATH": str(OUT / "imagenet_seg" / "gtsegs_ijcv.mat"),
        "CLASS_MAP": str(OUT / "imagenet_seg" / "imagenet_class_map.json"),
        # the FLUX.1-schnell stand-in is tiny and has two double-stream blocks
        "PROTOCOL_CHANGES": {"resolution": 64, "pre_resize": 96, "eval_size": 32,
                             "layers": ("transformer_blocks.*",), "seeds": (4,),
                             "max_sequence_length": 8}},
    "09_token_masking": {"N_IMAGES": 4, "BATCH_SIZE": 2, "N_BOOT": 200, "SEEDS": 1,
                         "DATA_ROOT": str(OUT / "imagenetv2"),
                         "DATA_ARCHIVE": str(OUT / "imagenetv2-matched-frequency.tar.gz")},
    # "sd15" under ATTNCHAIN_WEIGHTS=random is a reduced stand-in of SD1.5's classes
    # (attnchain.zoo.tiny_sd): SD1.5 at its real size cannot run on CI's CPU
    "10_sag": {"N_SAMPLES": 2, "STEPS": 2, "BATCH_SIZE": 2, "N_REFERENCE": 3, "N_BOOT": 3,
               "REFERENCE_DIR": str(OUT / "sag_reference" / "val2017")},
    # the SD1.4 stand-in (attnchain.zoo.stable_diffusion) at 128 px: a 16 x 16 latent, 4 levels
    "11_diffseg": {"N_IMAGES": 2, "SIZE": 128, "BATCH_SIZE": 2, "N_BOOT": 100, "SHOW": 0,
                   "DATA_ROOT": str(OUT / "coco-stuff")},
    "12_scaling_up": {"SIZES": [256, 512], "HEADS": 2, "HEAD_DIM": 16, "WARM_STEPS": 3},
}


def _imagenetv2_sample():
    """Chapter 9's full profile reads ImageNetV2: a small archive in its format, written here."""
    from attnchain.data import imagenet

    OUT.mkdir(parents=True, exist_ok=True)
    archive = imagenet.write_imagenetv2_sample(OUT, classes=(1, 7, 42, 999), per_class=1, size=256)
    assert archive == OUT / "imagenetv2-matched-frequency.tar.gz", archive


def _sag_reference():
    """Chapter 10's full profile compares with COCO-2017 val: a few images in its layout."""
    import numpy as np
    from PIL import Image

    folder = OUT / "sag_reference" / "val2017"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(
            folder / f"{i:012d}.jpg")


def _coco_stuff_sample():
    """Chapter 11's full profile reads COCO-Stuff-27: a small folder in DiffSeg's layout."""
    from attnchain.data import coco_stuff

    coco_stuff.write_sample(OUT / "coco-stuff", n=2, shape=(120, 160))


def _imagenet_segmentation_sample():
    """Chapter 8's full profile reads gtsegs_ijcv.mat: a small file in its layout, and a class
    map in the format of ConceptAttention's, written here."""
    from attnchain.data import imagenet_seg

    folder = OUT / "imagenet_seg"
    imagenet_seg.write_sample(folder / "gtsegs_ijcv.mat", n=4, seed=0)
    (folder / "imagenet_class_map.json").write_text(json.dumps({"categories": {
        "Chihuahua": "dog", "dog": "dog", "domestic cat": "cat", "cat": "cat"}}))


#: Data a chapter's full profile needs, written before it runs.
SETUP = {"08_concept_segmentation": _imagenet_segmentation_sample,
         "09_token_masking": _imagenetv2_sample, "10_sag": _sag_reference,
         "11_diffseg": _coco_stuff_sample}

STRICT_CELL = """\
from attnchain.testing import strict_cuda
strict_cuda.enable()
"""

REPORT_CELL = """\
import json as _json, resource as _resource
_json.dump({"device_peak_bytes": strict_cuda.max_memory_allocated(),
            "host_peak_bytes": _resource.getrusage(_resource.RUSAGE_SELF).ru_maxrss * 1024},
           open(%r, "w"))
"""


def strict_notebook(path: Path, params: dict, extra_cells=()) -> nbformat.NotebookNode:
    """The chapter with the strict-cuda cell first and ``params`` after its parameters cell."""
    nb = nbformat.read(path, as_version=4)
    cells = [nbformat.v4.new_code_cell(STRICT_CELL)]
    for cell in nb.cells:
        cells.append(cell)
        if params and "parameters" in cell.metadata.get("tags", []):
            cells.append(nbformat.v4.new_code_cell(
                "\n".join(f"{k} = {v!r}" for k, v in params.items())))
    nb.cells = cells + [nbformat.v4.new_code_cell(c) for c in extra_cells]
    return nb


def execute(nb, timeout=600):
    env = {"ATTNCHAIN_PROFILE": "full", "ATTNCHAIN_WEIGHTS": "random", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "ATTNCHAIN_STATIC": "1", "MPLBACKEND": "Agg"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_runs_on_a_colab_gpu(path):
    OUT.mkdir(parents=True, exist_ok=True)
    report = OUT / f"{path.stem}.json"
    SETUP.get(path.stem, lambda: None)()
    nb = strict_notebook(path, SMOKE.get(path.stem, {}), [REPORT_CELL % str(report)])
    try:
        execute(nb)
    except CellExecutionError as err:
        pytest.fail(f"{path.name} fails on a GPU runtime (full profile, strict-cuda):\n{err}",
                    pytrace=False)
    peak = json.loads(report.read_text())
    print(f"{path.stem}: peak device memory {peak['device_peak_bytes'] / 2**30:.2f} GiB, "
          f"peak host memory {peak['host_peak_bytes'] / 2**30:.2f} GiB")


def test_the_mode_catches_a_planted_numpy_call():
    planted = "import torch\nx = torch.ones(3, device='cuda')\nx.numpy()"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(STRICT_CELL),
                                         nbformat.v4.new_code_cell(planted)])
    with pytest.raises(CellExecutionError, match="can't convert cuda:0 device type tensor"):
        execute(nb, timeout=120)
