"""Each source layout converts into an MSD folder that ``read_dataset`` reads: ids, partition, quirks, atomicity."""

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ssl3d.data import convert as convert_module
from ssl3d.data.convert import BTCV_LABELS, CONVERTERS, convert
from ssl3d.data.dataset import DataError, read_dataset, validate_case

SHAPE = (8, 8, 8)


def nii(path: Path, array=None, affine=None, shape=SHAPE, value=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, dtype=np.int16) if array is None else array
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def ids(cases) -> list[str]:
    return [case.case_id for case in cases]


def meta_of(dest: Path) -> dict:
    return json.loads((dest / "dataset.json").read_text())


def listed_files(dest: Path) -> set[str]:
    """Every file below ``dest`` other than dataset.json, relative."""
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if not p.is_dir()} - {"dataset.json"}


def test_msd_relinks_listed_files_drops_appledouble_and_fixes_relase(tmp_path):
    task = tmp_path / "src" / "Task09_Spleen.tar" / "Task09_Spleen"  # an extracted archive adds a level
    for name in ("spleen_2", "spleen_10"):
        nii(task / "imagesTr" / f"{name}.nii.gz")
        nii(task / "labelsTr" / f"{name}.nii.gz")
    nii(task / "imagesTs" / "spleen_1.nii.gz")
    nii(task / "imagesTr" / "._spleen_2.nii.gz")
    (task / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "relase": "1.0 04/05/2018", "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"},
                     {"image": "./imagesTr/spleen_10.nii.gz", "label": "./labelsTr/spleen_10.nii.gz"},
                     {"image": "./imagesTr/._spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}],
        "test": ["./imagesTs/spleen_1.nii.gz"]}))
    dest = tmp_path / "raw" / "spleen"
    assert convert("msd", tmp_path / "src", dest) == dest / "dataset.json"

    dataset = read_dataset(dest)
    assert ids(dataset.labelled) == ["spleen_2", "spleen_10"] and ids(dataset.unlabelled) == ["spleen_1"]
    assert dataset.labels == {0: "background", 1: "spleen"}
    meta = meta_of(dest)
    assert meta["release"] == "1.0 04/05/2018" and "relase" not in meta
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    assert not any(name.startswith("._") for name in listed_files(dest))
    link = dest / "imagesTr" / "spleen_10.nii.gz"
    assert link.is_symlink() and link.resolve() == (task / "imagesTr" / "spleen_10.nii.gz").resolve()
    assert not list(tmp_path.glob("raw/.*"))  # no temporary folder left beside dest


def test_btcv_ids_and_file_names_follow_monai_dataset_0(tmp_path):
    raw = tmp_path / "src" / "RawData"
    for n in (1, 2, 21):
        nii(raw / "Training" / "img" / f"img{n:04d}.nii.gz")
        nii(raw / "Training" / "label" / f"label{n:04d}.nii.gz", value=3)
    nii(raw / "Training" / "img" / "._img0001.nii.gz")
    nii(raw / "Testing" / "img" / "img0061.nii.gz")
    dest = tmp_path / "btcv"
    convert("btcv", tmp_path / "src", dest)

    dataset = read_dataset(dest)
    assert ids(dataset.labelled) == ["img0001", "img0002", "img0021"] and ids(dataset.unlabelled) == ["img0061"]
    assert meta_of(dest)["training"][0] == {"image": "./imagesTr/img0001.nii.gz",
                                            "label": "./labelsTr/label0001.nii.gz"}
    assert dataset.labels == BTCV_LABELS and len(dataset.labels) == 14
    validate_case(dataset.case("img0021"))


def test_btcv_missing_label_is_named(tmp_path):
    nii(tmp_path / "RawData" / "Training" / "img" / "img0005.nii.gz")
    with pytest.raises(DataError, match=r"label/label0005\.nii\.gz: file not found"):
        convert("btcv", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.kept").exists()


def kits_affine(spacing_z=3.0, spacing_xy=0.8) -> np.ndarray:
    """KiTS19's on-disk affine: array (slices, rows, columns), z first, every axis negative."""
    return np.array([[0, 0, -spacing_xy, 0], [0, -spacing_xy, 0, 0], [-spacing_z, 0, 0, 0], [0, 0, 0, 1.0]])


def test_kits19_labels_and_images_from_separate_trees(tmp_path):
    """The fetch stage delivers the labels (repository archive) and the images (per-case downloads) apart."""
    image = np.zeros((6, 10, 12), dtype=np.int16)
    for n in (0, 210):
        nii(tmp_path / "src" / "kits19-imaging" / "data" / f"case_{n:05d}" / "imaging.nii.gz", image, kits_affine())
    nii(tmp_path / "src" / "kits19-labels" / "kits19-456b293" / "data" / "case_00000" / "segmentation.nii.gz",
        image.astype(np.uint8), kits_affine())
    dataset = read_dataset(convert("kits19", tmp_path / "src", tmp_path / "out").parent)
    assert ids(dataset.labelled) == ["case_00000"] and ids(dataset.unlabelled) == ["case_00210"]
    assert "kits19-labels" in str(dataset.case("case_00000").label)


def test_kits19_partition_and_reorientation_to_ras(tmp_path):
    from monai.transforms import Compose, LoadImaged, Orientationd

    data = tmp_path / "kits19" / "data"
    image = np.zeros((6, 10, 12), dtype=np.int16)  # (slices, rows, columns), distinct sizes
    image[1, 2, 3] = 1000
    for n in (0, 1, 210):
        nii(data / f"case_{n:05d}" / "imaging.nii.gz", image, kits_affine())
    for n in (0, 1):
        nii(data / f"case_{n:05d}" / "segmentation.nii.gz", (image > 0).astype(np.uint8), kits_affine())
    dest = tmp_path / "out"
    convert("kits19", tmp_path / "kits19", dest)

    dataset = read_dataset(dest)
    assert ids(dataset.labelled) == ["case_00000", "case_00001"] and ids(dataset.unlabelled) == ["case_00210"]
    assert dataset.labels == {0: "background", 1: "kidney", 2: "tumor"}
    case = dataset.case("case_00001")
    validate_case(case)

    loaded = Compose([LoadImaged(["image", "label"], ensure_channel_first=True),
                      Orientationd(["image", "label"], axcodes="RAS", labels=None)])(
        {"image": str(case.image), "label": str(case.label)})
    ras, affine = loaded["image"], loaded["image"].affine.numpy()
    assert ras.shape == (1, 12, 10, 6)  # columns -> R, rows -> A, slices -> S
    np.testing.assert_allclose(np.diag(affine)[:3], [0.8, 0.8, 3.0])
    np.testing.assert_allclose(affine[:3, :3], np.diag([0.8, 0.8, 3.0]), atol=1e-6)
    marker = tuple(np.argwhere(ras[0].numpy() == 1000)[0])
    assert marker == (12 - 1 - 3, 10 - 1 - 2, 6 - 1 - 1)
    np.testing.assert_allclose(affine @ [*marker, 1], kits_affine() @ [1, 2, 3, 1], atol=1e-5)  # same world point
    assert tuple(np.argwhere(loaded["label"][0].numpy() == 1)[0]) == marker


def brats_case(root: Path, n: int, seg_name: str | None = None, ext: str = ".nii.gz") -> None:
    case = root / f"BraTS20_Training_{n:03d}"
    for value, suffix in enumerate(("t1", "t1ce", "t2", "flair"), start=1):  # file order unlike the channel order
        nii(case / f"{case.name}_{suffix}{ext}", value=10 * value)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[1, 1, 1], seg[2, 2, 2], seg[3, 3, 3] = 1, 2, 4
    nii(case / (seg_name or f"{case.name}_seg{ext}"), seg)


@pytest.fixture
def brats_source(tmp_path) -> Path:
    root = tmp_path / "src" / "MICCAI_BraTS2020_TrainingData"
    brats_case(root, 1)
    brats_case(root, 2, ext=".nii")  # some copies are uncompressed
    brats_case(root, 355, seg_name="W39_1998.09.19_Segm.nii")
    (root / "name_mapping.csv").write_text("BraTS_2020_subject_ID\n")
    (root / "._BraTS20_Training_003").mkdir()
    return tmp_path / "src"


def test_brats_stacks_four_channels_in_msd_order_and_accepts_case_355(brats_source, tmp_path, caplog):
    dest = tmp_path / "brats"
    with caplog.at_level(logging.WARNING, logger="ssl3d.data.convert"):
        convert("brats2020", brats_source, dest)
    assert "BraTS20_Training_355: segmentation named W39_1998.09.19_Segm.nii" in caplog.text

    dataset = read_dataset(dest)
    assert ids(dataset.labelled) == [f"BraTS20_Training_{n:03d}" for n in (1, 2, 355)] and not dataset.unlabelled
    assert dataset.modality == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert dataset.labels == {0: "background", 1: "necrotic_and_non_enhancing_tumour_core", 2: "peritumoral_edema",
                              4: "enhancing_tumour"}
    for case in dataset.labelled:
        img = nib.load(case.image)
        assert img.shape == (*SHAPE, 4)
        np.testing.assert_array_equal(img.get_fdata()[0, 0, 0], [40, 10, 20, 30])  # FLAIR, T1, T1ce, T2
        np.testing.assert_array_equal(np.unique(np.asanyarray(nib.load(case.label).dataobj)), [0, 1, 2, 4])
    assert dataset.case("BraTS20_Training_355").label.name == "W39_1998.09.19_Segm.nii"
    assert (dest / "labelsTr" / "BraTS20_Training_355.nii").is_symlink()
    assert not (dest / "imagesTr" / "BraTS20_Training_001.nii.gz").is_symlink()  # written, not linked


def test_brats_case_355_can_be_skipped(brats_source, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ssl3d.data.convert"):
        convert("brats2020", brats_source, tmp_path / "brats", skip_misnamed_seg=True)
    assert ids(read_dataset(tmp_path / "brats").labelled) == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert "case skipped" in caplog.text


def test_brats_misregistered_modality_is_named(brats_source, tmp_path):
    case = brats_source / "MICCAI_BraTS2020_TrainingData" / "BraTS20_Training_001"
    nii(case / "BraTS20_Training_001_t2.nii.gz", shape=(8, 8, 7))
    with pytest.raises(DataError, match=r"BraTS20_Training_001_t2\.nii\.gz: voxel grid"):
        convert("brats2020", brats_source, tmp_path / "brats")
    assert not (tmp_path / "brats").exists()


SPACING, ORIGIN = (0.7, 0.8, 2.5), (-100.0, -120.0, -300.0)


def mhd(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.random.default_rng(seed).integers(-1000, 1000, (6, 5, 4), dtype=np.int16))
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    sitk.WriteImage(image, str(path))


@pytest.fixture
def luna_source(tmp_path) -> Path:
    source = tmp_path / "luna"
    for n, subset in enumerate(("subset0", "subset0", "subset1")):
        mhd(source / "subset0.zip" / subset / f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{n}00.mhd", n)
    mhd(source / "seg-lungs-LUNA16" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.000.mhd", 9)  # lung masks: not images
    (source / "subset0.zip" / "subset0" / "._1.3.6.1.4.1.14519.5.2.1.6279.6001.000.mhd").write_text("junk")
    return source


def test_luna16_converts_mhd_keeping_geometry(luna_source, tmp_path):
    dest = tmp_path / "out"
    convert("luna16", luna_source, dest)
    dataset = read_dataset(dest)
    assert ids(dataset.unlabelled) == [f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{n}00" for n in range(3)]
    assert not dataset.labelled
    case = dataset.unlabelled[1]
    img = nib.load(case.image)
    assert img.shape == (4, 5, 6)
    np.testing.assert_allclose(img.header.get_zooms(), SPACING, rtol=1e-6)
    converted = sitk.ReadImage(str(case.image))
    np.testing.assert_allclose(converted.GetOrigin(), ORIGIN)
    np.testing.assert_allclose(converted.GetDirection(), np.eye(3).ravel())
    source = sitk.ReadImage(str(luna_source / "subset0.zip" / "subset0" / f"{case.case_id}.mhd"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(source))


def test_luna16_interrupted_leaves_no_dest_and_resumes(luna_source, tmp_path, monkeypatch):
    real, calls = convert_module._mhd_to_nifti, []

    def failing_second(mhd_path, out):
        calls.append(mhd_path.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(mhd_path, out)

    monkeypatch.setattr(convert_module, "_mhd_to_nifti", failing_second)
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert("luna16", luna_source, dest)
    assert not dest.exists()
    kept = tmp_path / ".out.kept"
    assert listed_files(kept) == {"imagesTs/1.3.6.1.4.1.14519.5.2.1.6279.6001.000.nii.gz"}  # kept for the re-run

    calls.clear()
    monkeypatch.setattr(convert_module, "_mhd_to_nifti", lambda mhd_path, out: (calls.append(mhd_path.name),
                                                                                   real(mhd_path, out)))
    convert("luna16", luna_source, dest)
    assert calls == ["1.3.6.1.4.1.14519.5.2.1.6279.6001.100.mhd", "1.3.6.1.4.1.14519.5.2.1.6279.6001.200.mhd"]
    assert len(read_dataset(dest).unlabelled) == 3

    calls.clear()
    convert("luna16", luna_source, dest)  # re-run over a complete dest: nothing reconverted
    assert calls == [] and len(read_dataset(dest).unlabelled) == 3
    shutil.rmtree(dest)  # what Snakemake does before a forced rerun of the prepare job
    convert("luna16", luna_source, dest)
    assert calls == [] and len(read_dataset(dest).unlabelled) == 3


@pytest.fixture
def amos_source(tmp_path) -> Path:
    root = tmp_path / "src" / "amos22"
    entries = {"training": [1, 507], "validation": [8, 540]}
    for key, folder in (("training", "Tr"), ("validation", "Va")):
        for n in entries[key]:
            nii(root / f"images{folder}" / f"amos_{n:04d}.nii.gz")
            nii(root / f"labels{folder}" / f"amos_{n:04d}.nii.gz")
    for n in (2, 600):
        nii(root / "imagesTs" / f"amos_{n:04d}.nii.gz")
    nii(tmp_path / "src" / "__MACOSX" / "amos22" / "imagesTr" / "._amos_0001.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "AMOS", "modality": {"0": "CT"}, "labels": {"0": "background", "8": "arota"},
        "training": [{"image": f"./imagesTr/amos_{n:04d}.nii.gz", "label": f"./labelsTr/amos_{n:04d}.nii.gz"}
                     for n in entries["training"]],
        "validation": [{"image": f"./imagesVa/amos_{n:04d}.nii.gz", "label": f"./labelsVa/amos_{n:04d}.nii.gz"}
                       for n in entries["validation"]],
        "test": [{"image": "./imagesTs/amos_0002.nii.gz"}, "./imagesTs/amos_0600.nii.gz"]}))
    return tmp_path / "src"


@pytest.mark.parametrize("modality, labelled, unlabelled", [
    ("ct", ["amos_0001", "amos_0008"], ["amos_0002"]),
    ("mri", ["amos_0507", "amos_0540"], ["amos_0600"]),
])
def test_amos_splits_ct_and_mri_by_id(amos_source, tmp_path, modality, labelled, unlabelled):
    dest = tmp_path / "amos"
    convert("amos", amos_source, dest, modality=modality)
    dataset = read_dataset(dest)
    assert ids(dataset.labelled) == labelled and ids(dataset.unlabelled) == unlabelled
    assert dataset.modality == {"0": "CT" if modality == "ct" else "MRI"}
    assert dataset.labels == {0: "background", 8: "arota"}


def test_reconversion_replaces_dest_without_stale_files(amos_source, tmp_path):
    dest = tmp_path / "amos"
    convert("amos", amos_source, dest, modality="ct")
    convert("amos", amos_source, dest, modality="mri")
    assert listed_files(dest) == {"imagesTr/amos_0507.nii.gz", "labelsTr/amos_0507.nii.gz",
                                  "imagesTr/amos_0540.nii.gz", "labelsTr/amos_0540.nii.gz",
                                  "imagesTs/amos_0600.nii.gz"}
    assert meta_of(dest)["converted_from"]["options"] == {"modality": "mri"}


@pytest.mark.parametrize("faithful, expected", [
    (False, ["volume-covid19-A-0001_ct", "volume-covid19-A-0002_ct", "volume-covid19-A-0100_ct"]),
    (True, ["volume-covid19-A-0001_ct", "volume-covid19-A-0001_seg", "volume-covid19-A-0002_ct",
            "volume-covid19-A-0002_seg", "volume-covid19-A-0100_ct"]),
])
def test_covid19_20_ct_only_or_faithful_to_hybridmim_glob(tmp_path, faithful, expected):
    root = tmp_path / "src" / "COVID-19-20_v2"
    for n in (1, 2):
        nii(root / "Train" / f"volume-covid19-A-{n:04d}_ct.nii.gz")
        nii(root / "Train" / f"volume-covid19-A-{n:04d}_seg.nii.gz")
    nii(root / "Validation" / "volume-covid19-A-0100_ct.nii.gz")
    nii(root / "Validation" / "._volume-covid19-A-0100_ct.nii.gz")
    convert("covid19_20", tmp_path / "src", tmp_path / "covid", faithful=faithful)
    dataset = read_dataset(tmp_path / "covid")
    assert ids(dataset.unlabelled) == expected and not dataset.labelled


def test_images_folder_takes_pattern_matches_and_drops_macos_files(tmp_path):
    source = tmp_path / "flare22"
    nii(source / "Training" / "part1" / "TU_0001_0000.nii.gz")
    nii(source / "Training" / "part2" / "TU_0002_0000.nii.gz")
    nii(source / "Training" / "part2" / "._TU_0003_0000.nii.gz")
    nii(source / "__MACOSX" / "Training" / "TU_0004_0000.nii.gz")
    nii(source / "Labels" / "TU_0001.nii.gz")
    dest = tmp_path / "flare22_unlabelled"
    convert("images_folder", source, dest, pattern="Training/**/*.nii.gz")
    dataset = read_dataset(dest)
    assert ids(dataset.unlabelled) == ["TU_0001_0000", "TU_0002_0000"] and dataset.name == "flare22_unlabelled"


def test_images_folder_duplicate_names_are_an_error(tmp_path):
    nii(tmp_path / "atm" / "imagesTr" / "ATM_001_0000.nii.gz")
    nii(tmp_path / "atm" / "labelsTr" / "ATM_001_0000.nii.gz")
    with pytest.raises(DataError, match=r"ATM_001_0000\.nii\.gz: gives case id 'ATM_001_0000'"):
        convert("images_folder", tmp_path / "atm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture
def byod(tmp_path) -> Path:
    for name in ("a.nii.gz", "b.nii.gz", "c.nii"):
        nii(tmp_path / "byod" / "images" / name)
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[0, 0, 0], label[1, 1, 1] = 1, 3
    for name in ("a.nii.gz", "b.nii.gz"):
        nii(tmp_path / "byod" / "labels" / name, label)
    return tmp_path / "byod"


def test_folder_with_partial_labels(byod, tmp_path):
    dest = tmp_path / "mine"
    convert("folder", byod / "images", dest, images=str(byod / "images"), labels=str(byod / "labels"))
    dataset = read_dataset(dest)
    assert ids(dataset.labelled) == ["a", "b"] and ids(dataset.unlabelled) == ["c"]
    assert dataset.labels == {0: "background", 1: "label_1", 3: "label_3"}  # found in the labels
    assert dataset.modality == {"0": "CT"}
    assert (dest / "imagesTs" / "c.nii").is_symlink()

    convert("folder", byod / "images" / "*.nii.gz", dest, labels=byod / "labels", labels_map={"1": "liver",
                                                                                             "3": "tumour"})
    dataset = read_dataset(dest)
    assert ids(dataset.labelled) == ["a", "b"] and not dataset.unlabelled
    assert dataset.labels == {0: "background", 1: "liver", 3: "tumour"}


def test_folder_label_without_image_or_with_other_shape_is_named(byod, tmp_path):
    nii(byod / "labels" / "z.nii.gz")
    with pytest.raises(DataError, match=r"labels/z\.nii\.gz: label without an image of the same name"):
        convert("folder", byod / "images", tmp_path / "mine", labels=byod / "labels")
    (byod / "labels" / "z.nii.gz").unlink()
    nii(byod / "labels" / "b.nii.gz", shape=(8, 8, 6))
    with pytest.raises(DataError, match=r"labels/b\.nii\.gz: label shape \(8, 8, 6\) differs"):
        convert("folder", byod / "images", tmp_path / "mine", labels=byod / "labels")
    assert not (tmp_path / "mine").exists()


def test_interrupted_conversion_leaves_nothing_and_keeps_a_previous_dest(byod, tmp_path, monkeypatch):
    dest = tmp_path / "mine"
    real, calls = convert_module._Output._link, []

    def failing_third(self, *args):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return real(self, *args)

    monkeypatch.setattr(convert_module._Output, "_link", failing_third)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert("folder", byod / "images", dest, labels=byod / "labels")
    assert not dest.exists() and list(tmp_path.iterdir()) == [byod]

    monkeypatch.setattr(convert_module._Output, "_link", real)
    convert("folder", byod / "images", dest)
    before = meta_of(dest)
    calls.clear()
    monkeypatch.setattr(convert_module._Output, "_link", failing_third)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert("folder", byod / "images", dest, labels=byod / "labels")
    assert meta_of(dest) == before and len(read_dataset(dest).unlabelled) == 3  # the previous dest is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["byod", "mine"]


def test_unknown_layout_and_option_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset layout 'nifti'; known: msd, btcv"):
        convert("nifti", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="layout 'amos': .*'modalty'.*its options: modality"):
        convert("amos", tmp_path, tmp_path / "out", modalty="ct")
    with pytest.raises(DataError, match="no Decathlon task folder"):
        convert("msd", tmp_path, tmp_path / "out")
    assert set(CONVERTERS) == {"msd", "btcv", "kits19", "brats2020", "luna16", "amos", "covid19_20",
                               "images_folder", "folder"}
