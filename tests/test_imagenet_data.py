"""ImageNet-class data: class names, ImageNetV2's archive format (labels are integer folder
names), the class-interleaved subset, ImageNet-val synset folders, and the errors."""
import io
import tarfile

import pytest

from attnchain.data import imagenet


def test_class_names_and_synsets():
    assert len(imagenet.SYNSETS) == len(imagenet.CLASS_NAMES) == 1000
    assert imagenet.SYNSETS[0] == "n01440764" and imagenet.CLASS_NAMES[0] == "tench"
    assert len(set(imagenet.SYNSETS)) == 1000


def test_imagenetv2_labels_are_the_integer_folder_names(tmp_path):
    # "10" sorts before "2" as a string: a string-sorted ImageFolder would mislabel these
    archive = imagenet.write_imagenetv2_sample(tmp_path, classes=(2, 10, 999), per_class=3,
                                               size=40)
    ds = imagenet.imagenetv2(root=tmp_path / "data", archive=archive)
    assert len(ds) == 9
    assert {p.parent.name: y for p, y in ds.items} == {"2": 2, "10": 10, "999": 999}
    image, label = ds[0]
    assert image.mode == "RGB" and image.size == (40, 40)
    sub = ds.subset(4)
    assert [y for _, y in sub.items] == [2, 10, 999, 2]   # one per class first
    assert "3 classes" in ds.describe()
    again = imagenet.load("imagenetv2-matched-frequency", root=tmp_path / "data", limit=3,
                          download=False)
    assert [y for _, y in again.items] == [2, 10, 999]


def test_missing_or_unknown_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="vaishaal/ImageNetV2"):
        imagenet.imagenetv2(root=tmp_path, download=False)
    with pytest.raises(ValueError, match="unknown dataset"):
        imagenet.load("imagenet-21k")
    with pytest.raises(ValueError, match="limit"):
        imagenet.load("imagenet-val", root=tmp_path, limit=0)
    with pytest.raises(FileNotFoundError, match="image-net.org"):
        imagenet.imagenet_val(tmp_path / "nowhere")


def test_imagenet_val_synset_folders(tmp_path):
    from PIL import Image

    for syn in ("n01440764", "n01443537"):
        (tmp_path / syn).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / syn / "a.JPEG")
    ds = imagenet.load("imagenet-val", root=tmp_path)
    assert [y for _, y in ds.items] == [0, 1]
    (tmp_path / "n99999999").mkdir()
    with pytest.raises(ValueError, match="n99999999"):
        imagenet.imagenet_val(tmp_path)


def test_unsafe_archive_and_corrupt_image(tmp_path):
    evil = tmp_path / "imagenetv2-matched-frequency.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="outside"):
        imagenet.imagenetv2(root=tmp_path / "data", archive=evil)
    assert not (tmp_path / "evil.txt").exists()
    folder = tmp_path / "ok" / "imagenetv2-matched-frequency-format-val" / "5"
    folder.mkdir(parents=True)
    (folder / "bad.jpeg").write_bytes(b"not a jpeg")
    ds = imagenet.imagenetv2(root=tmp_path / "ok", download=False)
    with pytest.raises(ValueError, match="bad.jpeg"):
        ds[0]
