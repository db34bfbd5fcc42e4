"""cifar-fs / mini-imagenet / cub / folder from tiny fake files in their real formats."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from apimeta.data import SPLITS, load_dataset
from apimeta.data.real import CIFAR100_MEAN, IMAGENET_MEAN, load_pickle
from apimeta.data.render import read_split_file
from apimeta.errors import ConfigError, DatasetNotFoundError


def _img(rng: np.random.Generator, h: int, w: int, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)


# ----------------------------------------------------------------------------- CIFAR-FS


def _write_cifar(root, rng):
    split = read_split_file("cifar-fs")
    names = [c for s in SPLITS for c in split[s]]  # 100 names, in an arbitrary "fine" order
    names = sorted(names)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    blobs = {}
    for part, per in (("train", 2), ("test", 1)):
        labels = [i for i in range(100) for _ in range(per)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        blobs[part] = (data, labels)
        with open(d / part, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels, b"filenames": []}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [n.encode() for n in names]}, f)
    return names, blobs


def test_cifar_fs_from_python_pickles(tmp_path):
    names, blobs = _write_cifar(tmp_path, np.random.default_rng(0))
    ds = load_dataset("cifar-fs", root=tmp_path)
    assert ds.summary()["train_classes"] == 64 and ds.summary()["test_classes"] == 20
    assert ds.image_size == 32 and ds.channels == 3 and ds.mean == CIFAR100_MEAN
    assert len(ds.splits["train"]) == 64 * 3
    assert ds.class_names[0] == "dolphin"
    # class 0 = dolphin: its 2 train images then its 1 test image, CHW
    fine = names.index("dolphin")
    tr, te = blobs["train"], blobs["test"]
    want = np.concatenate(
        [tr[0][[i for i, y in enumerate(tr[1]) if y == fine]], te[0][[fine]]]
    ).reshape(-1, 3, 32, 32)
    assert torch.equal(ds.splits["train"].of_class(0), torch.from_numpy(want))
    # cached: same bytes; root may also be the cifar-100-python folder itself
    again = load_dataset("cifar-fs", root=tmp_path / "cifar-100-python")
    assert torch.equal(again.splits["val"].images, ds.splits["val"].images)
    small = load_dataset("cifar-fs", root=tmp_path, image_size=16, cache=False)
    assert small.splits["test"].images.shape == (60, 3, 16, 16)


def test_cifar_fs_errors_name_the_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python"):
        load_dataset("cifar-fs")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("cifar-fs", root=tmp_path / "nope")
    _write_cifar(tmp_path, np.random.default_rng(1))
    os.remove(tmp_path / "cifar-100-python" / "test")
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python/test"):
        load_dataset("cifar-fs", root=tmp_path)


def test_data_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DatasetNotFoundError, match="refusing"):
        load_pickle(p)


# ----------------------------------------------------------------------------- mini-ImageNet


def test_mini_imagenet_from_pickle_caches(tmp_path):
    split = read_split_file("mini-imagenet")
    rng = np.random.default_rng(2)
    first = {}
    for s in SPLITS:
        wnids = split[s]
        data = rng.integers(0, 256, (2 * len(wnids), 84, 84, 3), dtype=np.uint8)
        # indices interleaved so class_dict order matters
        cdict = {w: [i, i + len(wnids)] for i, w in enumerate(wnids)}
        first.update({w: data[cdict[w]] for w in wnids})
        with open(tmp_path / f"mini-imagenet-cache-{s}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": cdict}, f)
    ds = load_dataset("mini-imagenet", root=tmp_path, image_size=32, cache=False)
    assert ds.image_size == 32 and ds.mean == IMAGENET_MEAN
    assert [ds.summary()[f"{s}_classes"] for s in SPLITS] == [64, 16, 20]
    assert ds.class_names[:64] == split["train"]
    full = load_dataset("mini-imagenet", root=tmp_path, cache=False)
    w = split["val"][3]
    got = full.splits["val"].of_class(64 + 3)
    assert torch.equal(got, torch.from_numpy(first[w]).permute(0, 3, 1, 2))


def test_mini_imagenet_from_images_and_csv(tmp_path):
    split = read_split_file("mini-imagenet")
    rng = np.random.default_rng(3)
    (tmp_path / "images").mkdir()
    for s in SPLITS:
        rows = ["filename,label"]
        for w in split[s]:
            for j in range(2):
                fname = f"{w}{j:08d}.jpg"
                Image.fromarray(_img(rng, 12, 10)).save(tmp_path / "images" / fname)
                rows.append(f"{fname},{w}")
        (tmp_path / f"{s}.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset("mini-imagenet", root=tmp_path, image_size=8, workers=1)
    assert ds.splits["train"].images.shape == (128, 3, 8, 8)
    assert ds.meta["format"] == "images"
    # without the CSVs, classes come from the file-name prefix: same images
    for s in SPLITS:
        os.rename(tmp_path / f"{s}.csv", tmp_path / f"{s}.csv.bak")
    no_csv = load_dataset("mini-imagenet", root=tmp_path, image_size=8, workers=1, cache=False)
    assert torch.equal(no_csv.splits["train"].images, ds.splits["train"].images)
    # the class-folder layout <split>/<wnid>/*.jpg gives the same images
    alt = tmp_path / "alt"
    for s in SPLITS:
        for w in split[s]:
            (alt / s / w).mkdir(parents=True)
            for j in range(2):
                fname = f"{w}{j:08d}.jpg"
                os.link(tmp_path / "images" / fname, alt / s / w / fname)
    ds2 = load_dataset("mini-imagenet", root=alt, image_size=8, workers=1)
    assert ds2.meta["format"] == "folders"
    assert torch.equal(ds.splits["test"].images, ds2.splits["test"].images)


def test_mini_imagenet_missing_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"mini-imagenet-cache-train\.pkl"):
        load_dataset("mini-imagenet", root=tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images of class n0"):
        load_dataset("mini-imagenet", root=tmp_path)


# ----------------------------------------------------------------------------- CUB


def test_cub_split_rule_and_resize(tmp_path):
    rng = np.random.default_rng(4)
    images = tmp_path / "CUB_200_2011" / "images"
    folders = [f"{i + 1:03d}.Bird_{chr(65 + i)}" for i in range(8)]
    for f in folders:
        (images / f).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(_img(rng, 20 + j, 30)).save(images / f / f"img_{j}.jpg")
    Image.fromarray(_img(rng, 9, 9, 1)[..., 0]).save(images / folders[0] / "grey.jpg")
    ds = load_dataset("cub", root=tmp_path, image_size=16, workers=1)
    assert ds.class_names == [
        "Bird_A",
        "Bird_C",
        "Bird_E",
        "Bird_G",
        "Bird_B",
        "Bird_F",
        "Bird_D",
        "Bird_H",
    ]
    assert [len(ds.splits[s].classes) for s in SPLITS] == [4, 2, 2]
    assert ds.splits["train"].images.shape == (13, 3, 16, 16)
    assert ds.mean == IMAGENET_MEAN
    assert load_dataset("cub", root=tmp_path, workers=1, cache=False).image_size == 84
    with pytest.raises(DatasetNotFoundError, match="CUB_200_2011"):
        load_dataset("cub", root=tmp_path / "CUB_200_2011" / "images" / folders[0])


# ----------------------------------------------------------------------------- folder


def _write_folder(root, classes, per=2, size=(10, 14)):
    rng = np.random.default_rng(5)
    for c in classes:
        (root / c).mkdir(parents=True)
        for j in range(per):
            ext = ".png" if j % 2 else ".jpg"
            Image.fromarray(_img(rng, *size)).save(root / c / f"{j}{ext}")


def test_folder_seeded_split(tmp_path):
    classes = [f"c{i:02d}" for i in range(10)]
    _write_folder(tmp_path, classes)
    (tmp_path / "c00" / "notes.txt").write_text("ignored")
    a = load_dataset("folder", root=tmp_path, seed=0)
    b = load_dataset("folder", root=tmp_path, seed=0, cache=False)
    c = load_dataset("folder", root=tmp_path, seed=1)
    assert [len(a.splits[s].classes) for s in SPLITS] == [6, 2, 2]
    assert sorted(a.class_names) == classes
    assert a.class_names == b.class_names and torch.equal(
        a.splits["val"].images, b.splits["val"].images
    )
    assert a.class_names != c.class_names
    assert a.splits["train"].images.shape == (12, 3, 32, 32)
    assert len(a.mean) == 3 and all(0.2 < m < 0.8 for m in a.mean)
    g = load_dataset("folder", root=tmp_path, channels=1, image_size=8)
    assert g.splits["test"].images.shape == (4, 1, 8, 8)


def test_folder_split_file(tmp_path):
    _write_folder(tmp_path, ["a", "b", "c", "d"])
    (tmp_path / "split.json").write_text(
        json.dumps({"train": ["d", "a"], "val": ["b"], "test": ["c"]})
    )
    ds = load_dataset("folder", root=tmp_path)
    assert ds.class_names == ["d", "a", "b", "c"]
    assert ds.splits["val"].classes == [2]
    (tmp_path / "split.json").write_text(
        json.dumps({"train": ["a", "x"], "val": ["b"], "test": ["c"]})
    )
    with pytest.raises(ConfigError, match="'x'"):
        load_dataset("folder", root=tmp_path)
    (tmp_path / "split.json").write_text(
        json.dumps({"train": ["a", "b"], "val": ["b"], "test": ["c"]})
    )
    with pytest.raises(ConfigError, match="more than one split"):
        load_dataset("folder", root=tmp_path)


def test_folder_for_meta_test_only(tmp_path):
    _write_folder(tmp_path, ["a", "b", "c", "d", "e"], per=3)
    ds = load_dataset("folder", root=tmp_path, eval_only=True, channels=1)
    assert [len(ds.splits[s]) for s in SPLITS] == [0, 0, 15]
    assert ds.splits["test"].classes == [0, 1, 2, 3, 4] and ds.splits["train"].images.shape[1] == 1
    assert len(ds.mean) == 1 and 0.2 < ds.mean[0] < 0.8  # stats of all images
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "val": [], "test": ["b", "e"]}))
    ds = load_dataset("folder", root=tmp_path)
    assert ds.class_names == ["b", "e"] and len(ds.splits["train"]) == 0
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"], "val": [], "test": ["b"]}))
    with pytest.raises(ConfigError, match=r"'val' .* is empty; give classes to both"):
        load_dataset("folder", root=tmp_path)


def test_folder_cli_loader_options_and_eval_only(tmp_path):
    from typer.testing import CliRunner

    from apimeta.cli import app

    _write_folder(tmp_path / "imgs", [f"c{i}" for i in range(5)], per=4)
    args = ["eval", "--init", "random", "--dataset", "folder", "--data-root",
            str(tmp_path / "imgs"), "--shots", "1", "--tasks", "2", "--query", "2",
            "--steps", "1", "--width", "8", "--threads", "1", "--json", str(tmp_path / "r.json")]  # fmt: skip
    res = CliRunner().invoke(app, [*args, "--data-option", "eval_only=true",
                                   "--data-option", "channels=1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["results"]["folder"]["1-shot"]["n"] == 2
    res = CliRunner().invoke(app, [*args, "--data-option", "chanels=1"])
    assert res.exit_code == 2
    assert "does not take option(s) chanels" in " ".join(res.output.split())


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data-root"):
        load_dataset("folder")
    with pytest.raises(DatasetNotFoundError, match="no class folders"):
        load_dataset("folder", root=tmp_path)
    _write_folder(tmp_path, ["a", "b"])
    with pytest.raises(ConfigError, match="at least 3"):
        load_dataset("folder", root=tmp_path)
    with pytest.raises(ConfigError, match="channels"):
        load_dataset("folder", root=tmp_path, channels=2)
