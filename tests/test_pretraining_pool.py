"""The pre-training pool read on demand: cached images memory-mapped, prepared volumes kept on disk, never stale."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ssl3d.data.cache import load_cached_case, mapped_image, read_index, write_case
from ssl3d.data.dataset import DataError
from ssl3d.nets import BACKBONES
from ssl3d.pretrain import loop
from ssl3d.pretrain.loop import Pool, RegionViews, pretraining_pool
from ssl3d.pretrain.method import make_config
from ssl3d.pretrain.registry import get_method

from conftest import pretrain_config

TINY_UNET = {"name": "unet", **BACKBONES["unet"].smallest["fields"]}


def method(name: str, **settings):
    cls = get_method(name)
    torch.manual_seed(0)
    return cls(make_config(cls.Config, {"patch_size": [16, 16, 16], "batch_size": 2, **settings}), TINY_UNET)


@pytest.mark.parametrize("layout", ["one channel", "four channels", "fortran order"])
def test_a_mapped_image_is_the_cached_image_read_from_disk_only_where_used(layout, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((4, 9, 8, 7) if layout == "four channels" else (9, 8, 7), dtype=np.float32)
    if layout == "fortran order":
        image = np.asfortranarray(image)
    path = tmp_path / "case.npz"
    write_case(path, {"image": image, "label": np.zeros((9, 8, 7), np.uint8)}, "key", {})
    expected = image if image.ndim == 4 else image[None]
    mapped = mapped_image(path)
    assert isinstance(mapped, np.memmap) and mapped.dtype == np.float32 and np.array_equal(mapped, expected)
    mapped[0] = -1  # copy-on-write: the file keeps its voxels
    assert (mapped[0] == -1).all() and np.array_equal(load_cached_case(path)["image"], expected)


def test_a_compressed_or_foreign_file_is_read_or_named(tmp_path):
    compressed = tmp_path / "compressed.npz"
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    np.savez_compressed(compressed, image=image)
    assert np.array_equal(mapped_image(compressed), image[None])  # read, not mapped
    foreign = tmp_path / "foreign.npz"
    foreign.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"foreign.npz: not a cached case with an image .*re-run the preprocess rule"):
        mapped_image(foreign)


def test_a_pool_maps_its_volumes_instead_of_holding_them(tiny_index, tmp_path):
    files, _ = pretraining_pool([str(tiny_index)], ["all"])
    pool = Pool(files, method("models_genesis"), tmp_path / "store")
    assert len(pool) == len(read_index(tiny_index)["cases"])
    assert all(isinstance(pool[i], np.memmap) for i in range(len(pool)))
    assert all(np.array_equal(pool[i], load_cached_case(file)["image"]) for i, file in enumerate(files))
    assert not (tmp_path / "store").exists()  # nothing to prepare: nothing written


def test_a_prepared_volume_is_made_once_and_remade_when_its_case_changes(tiny_index, tmp_path, monkeypatch):
    files = [tmp_path / "case.npz"]
    write_case(files[0], load_cached_case(pretraining_pool([str(tiny_index)], ["all"])[0][0]), "key", {})
    vox2vec = method("vox2vec", max_voxels=64)
    calls = []
    prepare = vox2vec.prepare_volume
    monkeypatch.setattr(vox2vec, "prepare_volume", lambda volume: calls.append(1) or prepare(volume))
    pool = Pool(files, vox2vec, tmp_path / "store")
    first = pool[0]
    assert isinstance(first, np.memmap) and first.shape[0] == 2  # the image and its body mask
    assert np.array_equal(first, prepare(load_cached_case(files[0])["image"]))
    assert np.array_equal(pool[0], first) and len(calls) == 1

    case = load_cached_case(files[0])  # the case rebuilt with other voxels (a source edited in place)
    case["image"] = 1 - case["image"]
    write_case(files[0], {"image": case["image"][0], "label": case["label"][0]}, "key", {})
    os.utime(files[0], ns=(1, 1))
    assert np.array_equal(pool[0], prepare(load_cached_case(files[0])["image"])) and len(calls) == 2


def test_pretraining_draws_from_the_pool_and_deletes_what_it_prepared(tiny_index, tmp_path, monkeypatch):
    """A whole run of a method that prepares its volumes: every region comes from a mapped volume, and the store
    of prepared volumes is gone once the run's files are written."""
    drawn = []
    sample = RegionViews.sample
    monkeypatch.setattr(RegionViews, "sample", lambda self, volume, rng: drawn.append(volume) or sample(
        self, volume, rng))
    out = tmp_path / "pre"
    settings = {"patch_size": [32, 32, 32], "batch_size": 2, "max_voxels": 64}
    loop.pretrain(pretrain_config(tmp_path / "pre.json", tiny_index, "vox2vec", method_config=settings,
                                  backbone=TINY_UNET), out)
    assert drawn and all(isinstance(volume, np.memmap) for volume in drawn)
    assert (out / "pretrained.pt").is_file() and not (out / "prepared_volumes").exists()
