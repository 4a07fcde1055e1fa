"""The dataset registry: every dataset the papers use is there, valid, with the documented hashes and access; a bad
entry fails on load naming the field; status follows the on-disk conventions; `ssl3d datasets` lists and shows."""

import inspect

import pytest
import yaml

from ssl3d.cli import main, parser
from ssl3d.data.convert import BRATS_LABELS, BTCV_LABELS, CONVERTERS, KITS19_LABELS
from ssl3d.data.registry import (
    STATUSES,
    RegistryError,
    dataset_status,
    get_entry,
    load_registry,
    read_registry,
)

NAMES = ["msd_liver", "msd_lung", "msd_pancreas", "msd_hepaticvessel", "msd_spleen", "msd_colon", "btcv", "kits19",
         "brats2020", "amos_ct", "amos_mri", "flare21", "flare22", "luna16", "ribfrac", "covid19_20", "atm22", "nako"]

GOOD = {
    "title": "A tiny dataset", "used_by": [{"paper": "pgl", "role": "pretrain"}], "modality": "CT",
    "access": "automatic", "licence": "CC BY 4.0", "redistributable": True, "size_gb": 0.1,
    "archives": [{"name": "tiny.zip", "urls": ["https://example.org/tiny.zip"], "size": None,
                  "md5": None, "sha256": "0" * 64}],
    "layout": "images_folder", "labels": {0: "background"}, "expected": {"labelled": 0, "unlabelled": 3},
}


def write_registry(tmp_path, **entries):
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(entries))
    return path


def test_every_dataset_of_the_papers_is_registered():
    assert set(load_registry()) == set(NAMES)
    papers = {use.paper for entry in load_registry().values() for use in entry.used_by}
    assert papers == {"hybridmim", "pgl", "hdssl"}


@pytest.mark.parametrize("name, paper, role", [
    ("msd_spleen", "pgl", "downstream"), ("msd_colon", "pgl", "pretrain"), ("ribfrac", "pgl", "pretrain"),
    ("luna16", "hybridmim", "pretrain"), ("brats2020", "hybridmim", "downstream"), ("btcv", "hdssl", "downstream"),
    ("amos_ct", "hdssl", "pretrain"), ("amos_mri", "hdssl", "downstream"), ("flare22", "hdssl", "pretrain")])
def test_papers_and_roles(name, paper, role):
    assert (paper, role) in {(use.paper, use.role) for use in get_entry(name).used_by}


def test_msd_archives_carry_both_documented_hashes():
    spleen = get_entry("msd_spleen").archives[0]
    assert spleen.name == "Task09_Spleen.tar"
    assert spleen.urls == ("https://msd-for-monai.s3-us-west-2.amazonaws.com/Task09_Spleen.tar",)
    assert spleen.md5 == "410d4a301da4e5b2f6f86ec3ddba524e"
    assert spleen.sha256 == "dfeba347daae4fb08c38f4d243ab606b28b91b206ffc445ec55c35489fa65e60"
    for name in NAMES[:6]:
        (archive,) = get_entry(name).archives
        assert len(archive.md5) == 32 and len(archive.sha256) == 64


def test_btcv_is_manual_and_not_redistributable():
    btcv = get_entry("btcv")
    assert btcv.access == "manual" and not btcv.redistributable and not btcv.archives
    assert "syn3193805" in btcv.instructions and "RawData.zip" in btcv.instructions
    assert btcv.labels == BTCV_LABELS and btcv.expected == {"labelled": 30, "unlabelled": 20}


def test_nako_is_unavailable_with_the_amos_mri_substitute():
    nako = get_entry("nako")
    assert nako.access == "unavailable" and nako.layout == "none" and nako.substitute.entry == "amos_mri"
    assert "amos_mri" in str(nako.substitute) and get_entry("amos_mri").access == "automatic"


def test_amos_entries_share_one_archive_and_split_by_modality():
    ct, mri = get_entry("amos_ct"), get_entry("amos_mri")
    assert ct.archives == mri.archives and ct.archives[0].sha256
    assert (ct.layout_options, mri.layout_options) == ({"modality": "ct"}, {"modality": "mri"})


def test_labels_agree_with_the_converters_and_brats_regions_are_data():
    assert get_entry("kits19").labels == KITS19_LABELS
    brats = get_entry("brats2020")
    assert brats.labels == BRATS_LABELS and brats.regions == {"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4)}


def test_layout_options_are_options_of_the_entrys_converter():
    for entry in load_registry().values():
        if entry.layout != "none":
            accepted = set(inspect.signature(CONVERTERS[entry.layout]).parameters) - {"source", "out"}
            assert set(entry.layout_options) <= accepted, entry.name


def test_per_case_archive_expands_to_one_url_and_path_per_case():
    imaging = next(a for a in get_entry("kits19").archives if a.url_template)
    files = imaging.case_files()
    assert len(files) == 300 and files[7] == (
        "https://huggingface.co/datasets/neheller/KiTS-Challenge-Imaging/resolve/main/images/case_00007.nii.gz",
        "data/case_00007/imaging.nii.gz")


def test_unconfirmed_values_are_marked():
    assert "size_gb" in get_entry("msd_liver").unverified and "licence" in get_entry("luna16").unverified
    assert all(entry.notes for entry in load_registry().values() if entry.unverified)


def test_a_good_entry_loads(tmp_path):
    entry = read_registry(write_registry(tmp_path, tiny=GOOD))["tiny"]
    assert entry.archives[0].urls == ("https://example.org/tiny.zip",) and entry.labels == {0: "background"}


@pytest.mark.parametrize("change, message", [
    ({"access": "sometimes"}, "tiny.access: 'sometimes' is not one of"),
    ({"layout": "zip"}, "tiny.layout: 'zip' is not one of"),
    ({"colour": "blue"}, "Additional properties are not allowed ('colour'"),
    ({"archives": []}, "tiny.archives: an automatic entry needs at least one archive"),
    ({"archives": [{**GOOD["archives"][0], "sha256": None}]}, "no md5 or sha256"),
    ({"archives": [{**GOOD["archives"][0], "urls": []}]}, "no download address"),
    ({"archives": [{**GOOD["archives"][0], "md5": "not-a-hash"}]}, "tiny.archives.0.md5"),
    ({"access": "manual", "archives": []}, "tiny.instructions: a manual entry needs the steps"),
    ({"access": "manual", "archives": [], "instructions": "1. ask"}, "tiny.verify: a manual entry needs"),
    ({"access": "unavailable", "archives": [], "layout": "none"}, "tiny.substitute: an unavailable entry needs"),
    ({"access": "unavailable", "archives": [], "layout": "none", "substitute": {"entry": "nowhere", "why": "-"}},
     "'nowhere' is not an obtainable entry"),
    ({"used_by": [{"paper": "pgl", "role": "finetune"}]}, "tiny.used_by.0.role"),
    ({"regions": {"WT": [1, 2]}}, "tiny.regions.WT: [1, 2] names labels not in `labels`"),
])
def test_a_bad_entry_fails_on_load_naming_file_entry_and_field(tmp_path, change, message):
    path = write_registry(tmp_path, tiny={**GOOD, **change})
    with pytest.raises(RegistryError) as error:
        read_registry(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_status_follows_the_on_disk_conventions(tmp_path):
    root = tmp_path / "data"
    seen = [dataset_status("btcv", root)]
    (root / "manual" / "btcv" / "RawData").mkdir(parents=True)  # the user's copy
    seen.append(dataset_status("btcv", root))
    (root / "sources" / "btcv").mkdir(parents=True)
    (root / "sources" / "btcv" / "verified.json").write_text("{}")
    seen.append(dataset_status("btcv", root))
    (root / "raw" / "btcv").mkdir(parents=True)
    (root / "raw" / "btcv" / "dataset.json").write_text("{}")
    seen.append(dataset_status("btcv", root))
    (root / "preprocessed" / "btcv_swinunetr" / "btcv").mkdir(parents=True)
    (root / "preprocessed" / "btcv_swinunetr" / "btcv" / "index.json").write_text("{}")
    seen.append(dataset_status("btcv", root))
    assert seen == list(STATUSES) == ["absent", "placed", "verified", "converted", "preprocessed"]
    assert dataset_status("btcv", root, recipe="other_recipe") == "converted"
    assert dataset_status("btcv", root, recipe="btcv_swinunetr") == "preprocessed"
    assert dataset_status("msd_spleen", root) == "absent"


def test_datasets_command_lists_every_entry_with_its_status(tmp_path, capsys):
    (tmp_path / "sources" / "msd_spleen").mkdir(parents=True)
    (tmp_path / "sources" / "msd_spleen" / "verified.json").write_text("{}")
    assert main(["datasets", "--data-root", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {cells[0]: dict(zip(header, cells)) for line in lines[2:] if line.startswith("| ")
            for cells in [[cell.strip() for cell in line.strip("|").split("|")]]}
    assert list(rows) == list(load_registry()) and set(rows) == set(NAMES)
    assert rows["msd_spleen"]["status"] == "verified" and rows["btcv"]["status"] == "absent"
    assert rows["btcv"]["expected at"] == f"{tmp_path}/manual/btcv/"
    assert rows["nako"]["expected at"] == "not obtainable" and rows["btcv"]["redistributable"] == "no"


def test_datasets_show_prints_the_manual_steps(capsys):
    assert main(["datasets", "--show", "btcv"]) == 0
    out = capsys.readouterr().out
    assert get_entry("btcv").instructions.splitlines()[0].strip() in out
    assert "syn3193805" in out and "not redistributable" in out and "data/manual/btcv" in out


def test_datasets_show_names_the_copys_place_under_the_data_root(capsys, tmp_path):
    assert main(["datasets", "--show", "btcv", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path}/manual/btcv" in out and " data/manual/btcv" not in out


def test_datasets_show_of_an_unknown_name_lists_the_known_ones(caplog):
    assert main(["datasets", "--show", "msd_heart"]) == 1
    assert "unknown dataset 'msd_heart'" in caplog.text and "msd_spleen" in caplog.text


def test_datasets_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["datasets", "--help"])
    assert exit_info.value.code == 0 and "--show" in capsys.readouterr().out
