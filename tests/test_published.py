"""The papers' published results as package data (ssl3d.report.published): schema, known cells, and every number
checked against the papers' text (conftest.SHARED_PAPERS; skipped with the place to get them where they are absent)."""

from __future__ import annotations

import csv
import re

import pytest

from conftest import REPO, SHARED_PAPERS
from ssl3d.report import published
from ssl3d.report.published import COLUMNS, PAPER_TEXTS, PAPERS, PublishedSchemaError, load_published, \
    published_tables, validate_rows

FOLDER = REPO / "src" / "ssl3d" / "report" / "published"

# Every table (and figure with printed numbers) of each paper, as found in its text; the CSVs must hold exactly these.
TABLES = {
    "hybridmim": ["Table 1", "Table 2", "Table 3", "Table 4", "Figure 4", "Figure 5", "Figure 6"],
    "pgl": ["Table 1", "Table 2", "Table 3", "Table 4", "Table 5", "Table 6", "Table 7", "Table 8"],
    "hdssl": ["Table 1", "Table 2", "Table 3"],
}
# Figures the texts mention whose numbers the text does not print (nothing to transcribe).
FIGURES_WITHOUT_NUMBERS = {"hybridmim": {1, 2, 3}, "pgl": {4, 5, 6, 7, 8}, "hdssl": {2}}
ROWS_PER_TABLE = {
    ("hybridmim", "Table 1"): 154, ("hybridmim", "Table 2"): 88, ("hybridmim", "Table 3"): 44,
    ("hybridmim", "Table 4"): 48, ("hybridmim", "Figure 4"): 2, ("hybridmim", "Figure 5"): 3,
    ("hybridmim", "Figure 6"): 4,
    ("pgl", "Table 1"): 168, ("pgl", "Table 2"): 36, ("pgl", "Table 3"): 36, ("pgl", "Table 4"): 12,
    ("pgl", "Table 5"): 168, ("pgl", "Table 6"): 36, ("pgl", "Table 7"): 36, ("pgl", "Table 8"): 12,
    ("hdssl", "Table 1"): 55, ("hdssl", "Table 2"): 36, ("hdssl", "Table 3"): 66,
}
# Tables whose every row line starts with the printed method label.
LABELLED_ROWS = {("hybridmim", "Table 1"), ("hybridmim", "Table 2"), ("hybridmim", "Table 3"),
                 ("pgl", "Table 1"), ("pgl", "Table 4"), ("pgl", "Table 5"), ("pgl", "Table 8"),
                 ("hdssl", "Table 2"), ("hdssl", "Table 3")}
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w]|\.\d)")  # not inside a word (vox2vec)


def raw_rows(paper: str) -> list[dict[str, str]]:
    with open(FOLDER / f"{paper}.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def text_lines(paper: str) -> list[str]:
    path = SHARED_PAPERS / PAPER_TEXTS[paper]
    if not path.is_file():
        pytest.skip(f"{path}: the paper's text extraction is not here. The checks read the project's plain-text "
                    "extractions of the papers (their line numbers are the CSVs' source_line), kept outside the "
                    "repository for the papers' copyright: ask the maintainers for papers/, or extract the arXiv PDFs "
                    "(HybridMIM 2303.10333, PGL 2011.12640, HDSSL 2401.06473) yourself (line numbers may then "
                    "differ); put them in ../shared/papers beside the checkout, as in CI, or set SSL3D_PAPERS")
    return path.read_text(encoding="utf-8").splitlines()


def cell(frame, **where):
    for column, value in where.items():
        frame = frame[frame[column] == value]
    assert len(frame) == 1, f"{where}: {len(frame)} rows"
    return frame.iloc[0]


# ------------------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("paper", PAPERS)
def test_every_file_is_valid(paper):
    frame = load_published(paper)
    assert tuple(frame.columns) == COLUMNS
    assert len(frame) > 0 and set(frame["paper"]) == {paper}
    assert frame["value"].notna().all()
    with open(FOLDER / f"{paper}.csv", newline="", encoding="utf-8") as f:
        assert f.readline().strip() == ",".join(COLUMNS)


def test_all_papers_load_together():
    frame = load_published()
    assert set(frame["paper"]) == set(PAPERS)
    assert len(frame) == sum(len(load_published(p)) for p in PAPERS) == sum(ROWS_PER_TABLE.values())
    with pytest.raises(ValueError, match="unknown paper"):
        load_published("mae")


def test_rows_per_table():
    frame = load_published()
    assert frame.groupby(["paper", "table"]).size().to_dict() == ROWS_PER_TABLE


def test_published_tables():
    assert published_tables() == [(p, t) for p in PAPERS for t in TABLES[p]]


def test_a_cell_is_printed_once():
    frame = load_published()
    key = ["paper", "table", "dataset", "method", "setting", "target", "metric", "source_line"]
    assert not frame.duplicated(key).any()


@pytest.mark.parametrize("column, bad, message", [
    ("metric", "accuracy", "column 'metric'"),
    ("scale", "mm", "column 'scale'"),  # a Dice in mm
    ("value", "85,7", "column 'value'"),
    ("value", "", "column 'value'"),
    ("pm", "x", "column 'pm'"),
    ("dataset", "lits", "column 'dataset'"),
    ("init", "transvw", "column 'init'"),
    ("table", "Tab. 1", "column 'table'"),
    ("source_line", "0", "column 'source_line'"),
    ("label_fraction", "20", "column 'label_fraction'"),
    ("inferred", "Some Key", "column 'inferred'"),
])
def test_a_bad_row_is_named(column, bad, message):
    rows = raw_rows("pgl")
    rows[4][column] = bad
    with pytest.raises(PublishedSchemaError, match=rf"^pgl\.csv: row 5 \(line 6\), {message}"):
        validate_rows("pgl.csv", list(COLUMNS), rows, paper="pgl")


def test_a_bad_file_is_named(tmp_path, monkeypatch):
    text = (FOLDER / "hdssl.csv").read_text(encoding="utf-8").splitlines()
    text[3] = text[3].replace(",dice,", ",dice_score,")
    (tmp_path / "hdssl.csv").write_text("\n".join(text) + "\n", encoding="utf-8")
    monkeypatch.setattr(published, "_folder", lambda: tmp_path)
    with pytest.raises(PublishedSchemaError, match=r"hdssl\.csv: row 3 \(line 4\), column 'metric'"):
        load_published("hdssl")
    (tmp_path / "hdssl.csv").write_text(",".join(COLUMNS[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(PublishedSchemaError, match=r"hdssl\.csv: header .* missing \['inferred'\]"):
        load_published("hdssl")
    (tmp_path / "hdssl.csv").write_text("\n".join(text[:1] + [text[1] + ",extra"]) + "\n", encoding="utf-8")
    with pytest.raises(PublishedSchemaError, match=r"hdssl\.csv: row 1 \(line 2\)"):
        load_published("hdssl")
    with pytest.raises(PublishedSchemaError, match="file holds paper 'pgl'"):
        validate_rows("pgl.csv", list(COLUMNS), raw_rows("hdssl"), paper="pgl")


def test_inferred_keys_are_documented():
    doc = (FOLDER / "INFERENCES.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### ([a-z0-9_]+)$", doc, flags=re.M))
    used = {key for key in ";".join(load_published()["inferred"]).split(";") if key}
    assert used == documented
    assert "## Not recoverable" in doc


# ------------------------------------------------------------------------------------------------ known cells


def test_hybridmim_table4_known_cells():
    t4 = load_published("hybridmim").query("table == 'Table 4' and target == 'avg'")
    assert cell(t4, backbone="hybridmim_unet", method="Supervised learning")["value"] == 84.41
    assert cell(t4, backbone="hybridmim_unet", setting="losses=L_pr+L_num+L_loc+L_cons+L_cl")["value"] == 85.69
    assert cell(t4, backbone="swinunetr", method="Supervised learning")["value"] == 85.09
    assert cell(t4, backbone="swinunetr", setting="losses=L_pr+L_num+L_loc+L_cons+L_cl")["value"] == 86.39
    # §5.5.2's prose: L_pr alone 85.06 (UNet), + region losses 85.40; L_pr adds 0.69 on Swin
    assert cell(t4, backbone="hybridmim_unet", setting="losses=L_pr")["value"] == 85.06
    assert cell(t4, backbone="hybridmim_unet", setting="losses=L_pr+L_num+L_loc+L_cons")["value"] == 85.40
    assert cell(t4, backbone="swinunetr", setting="losses=L_pr")["value"] == pytest.approx(85.09 + 0.69)
    unet = t4[t4["backbone"] == "hybridmim_unet"]["value"].tolist()
    assert unet == sorted(unet)  # each added term helps (UNet)


def test_hybridmim_known_cells():
    h = load_published("hybridmim")
    assert cell(h, table="Table 1", method="HybridMIM(UNet)", target="avg")["value"] == 83.00
    assert cell(h, table="Table 1", method="HybridMIM*(Swin)", target="adrenal_gland_left")["value"] == 68.47
    t2 = h[h["table"] == "Table 2"]
    assert cell(t2, method="HybridMIM*(UNet)", dataset="msd_liver", target="avg", metric="dice")["value"] == 74.36
    assert cell(t2, method="HybridMIM*(UNet)", dataset="msd_liver", target="avg", metric="hd95")["value"] == 10.28
    assert cell(t2, method="HybridMIM(UNet)", dataset="msd_spleen", metric="dice")["value"] == 96.05
    assert cell(t2, method="HybridMIM(UNet)", dataset="msd_spleen", metric="hd95")["value"] == 0.20
    row = cell(h, table="Table 3", method="HybridMIM*(Swin)", target="WT")
    assert (row["value"], row["setting"], row["init"], row["backbone"]) == (91.48, "task_specific", "hybridmim",
                                                                            "swinunetr")
    assert cell(h, table="Table 3", method="UNetFormer", target="avg")["setting"] == "generic"
    assert cell(h, table="Figure 4", label_fraction=0.2)["value"] == 82.55
    assert cell(h, table="Figure 5", method="TransVW")["value"] == 1.42
    assert cell(h, table="Figure 6", metric="dice", setting="32-16-96 (sub-volume/patch/region)")["value"] == 85.57


def test_pgl_known_cells_and_prose_gains():
    p = load_published("pgl")
    assert cell(p, table="Table 1", method="PGL(Ours)", target="avg", metric="dice")["value"] == 80.85
    assert cell(p, table="Table 1", method="MG", target="adrenal_gland_left", metric="iou")["value"] == 51.8
    assert cell(p, table="Table 4", method="Models Genesis", metric="hd")["value"] == 5.89
    assert cell(p, table="Table 8", method="w/o CS", metric="dice")["value"] == 94.16
    # §5.2: PGL's average-Dice gain over random init and over BYOL on each dataset pins tables and columns
    gains = {"msd_liver": (2.08, 1.23), "msd_spleen": (2.37, 1.04), "kits19": (2.72, 0.23), "btcv": (2.2, 0.74)}
    main = p[p["table"].isin(["Table 1", "Table 2", "Table 3", "Table 4"]) & (p["metric"] == "dice")]
    for dataset, (over_random, over_byol) in gains.items():
        rows = main[(main["dataset"] == dataset) & main["target"].isin(["avg", "spleen"])]
        rows = rows[(rows["target"] == "avg") | (dataset == "msd_spleen")].set_index("method")["value"]
        random = rows.get("Random Init", rows.get("Random init"))
        assert rows["PGL(Ours)"] - random == pytest.approx(over_random, abs=0.006), dataset
        assert rows["PGL(Ours)"] - rows["BYOL"] == pytest.approx(over_byol, abs=0.006), dataset
    # the ablations' "with F&CS" is PGL itself: equal to the main tables (but one printed 6.13 / 6.16)
    for main_table, ablation in [("Table 2", "Table 6"), ("Table 3", "Table 7"), ("Table 4", "Table 8")]:
        a = p[(p["table"] == main_table) & (p["method"] == "PGL(Ours)")].set_index(["target", "metric"])["value"]
        b = p[(p["table"] == ablation) & p["method"].str.startswith("with F&CS")].set_index(["target", "metric"])
        assert a.to_dict() == b["value"].to_dict()


def test_hdssl_known_cells():
    d = load_published("hdssl")
    row = cell(d, table="Table 2", method="ours", target="avg")
    assert (row["value"], row["pm"], row["dataset"]) == (65.6, 0.8, "btcv")
    row = cell(d, table="Table 3", method="fine-tuning", setting="fine-tuning; n_train=4", target="avg")
    assert (row["value"], row["pm"], row["label_fraction"], row["dataset"]) == (57.7, 7.8, 0.095, "amos_mri")
    assert cell(d, table="Table 3", init="scratch", label_fraction=1.0, target="avg")["value"] == 77.1
    assert cell(d, table="Table 1", method="ours", target="avg")["pm"] == 2.6
    # rows 2-4 of Table 1 cannot be attributed: recorded as printed, under no init
    unattributed = d[(d["table"] == "Table 1") & (d["method"] == "unattributed")]
    assert set(unattributed["source_line"]) == {47, 48, 49} and set(unattributed["init"]) == {""}
    assert cell(d, table="Table 1", source_line=48, target="avg")[["value", "pm"]].tolist() == [44.4, 4.3]
    assert set(d[(d["table"] == "Table 2") & (d["setting"] == "linear; pretrain volumes=6550")]["init"]) == {
        "vox2vec_official"}


def test_protocols_of_the_published_tables():
    """HDSSL reports linear evaluation (Tables 1-2: our probe) and its frozen-then-unfrozen fine-tuning (Table 3:
    our frozen_then_finetune) beside training from scratch (end to end); the other papers fine-tune only."""
    d = load_published()
    protocol = d["setting"].map(published.protocol_of)
    hdssl = d["paper"] == "hdssl"
    assert set(protocol[~hdssl]) == {"finetune"}
    by_row = d[hdssl].assign(protocol=protocol[hdssl]).groupby(["table", "method"])["protocol"].unique()
    assert {key: list(value) for key, value in by_row.items()} == {
        ("Table 1", "ours"): ["probe"], ("Table 1", "unattributed"): ["probe"], ("Table 1", "vox2vec"): ["probe"],
        ("Table 2", "ours"): ["probe"],
        ("Table 2", "vox2vec"): ["probe"], ("Table 3", "fine-tuning"): ["frozen_then_finetune"],
        ("Table 3", "from scratch"): ["finetune"]}


def test_an_init_is_scratch_or_a_registered_method(monkeypatch):
    from ssl3d.pretrain import registry

    assert published.implemented("scratch") and published.implemented("hybridmim")
    assert not published.implemented("") and not published.implemented("transvw")
    rows = raw_rows("pgl")
    rows[4]["init"] = "transvw"
    with pytest.raises(PublishedSchemaError, match="leave it empty for a method the suite does not implement"):
        validate_rows("pgl.csv", list(COLUMNS), rows, paper="pgl")
    known = {**registry.methods(), "transvw": object}  # once the suite implements it
    monkeypatch.setattr(registry, "methods", lambda: known)
    assert published.implemented("transvw")
    validate_rows("pgl.csv", list(COLUMNS), rows, paper="pgl")


# ------------------------------------------------------------------------------------------------ the paper texts


@pytest.mark.parametrize("paper, line, value", [
    ("hybridmim", 89, "83.00"), ("hybridmim", 99, "25.31"), ("hybridmim", 145, "84.41"), ("hybridmim", 156, "86.39"),
    ("pgl", 88, "80.85"), ("pgl", 108, "76.05"), ("pgl", 130, "95.60"), ("pgl", 145, "6.16"),
    ("hdssl", 50, "65.7"), ("hdssl", 57, "65.6"), ("hdssl", 66, "57.7"),
])
def test_spot_checks(paper, line, value):
    rows = [r for r in raw_rows(paper) if r["source_line"] == str(line) and r["value"] == value]
    assert rows, f"{paper}.csv has no {value} from line {line}"
    assert re.search(rf"(?<![\d.]){re.escape(value)}(?!\d)", text_lines(paper)[line - 1])


@pytest.mark.parametrize("paper", PAPERS)
def test_every_number_is_on_its_source_line(paper):
    lines = text_lines(paper)
    for i, row in enumerate(raw_rows(paper), start=1):
        text = lines[int(row["source_line"]) - 1]
        for column in ("value", "pm"):
            if row[column]:
                assert re.search(rf"(?<![\d.]){re.escape(row[column])}(?![\d]|\.\d)", text), \
                    f"{paper}.csv row {i}: {column} {row[column]} not on line {row['source_line']}: {text[:120]}"
        if (paper, row["table"]) in LABELLED_ROWS:
            assert row["method"] in text, f"{paper}.csv row {i}: method {row['method']!r} not on its line"


@pytest.mark.parametrize("paper", PAPERS)
def test_table_lines_are_transcribed_whole_and_in_order(paper):
    """On every table line (not prose), the numbers printed are exactly the CSV's values (and ± values) of that line,
    in order; a count of scans or volumes leading the row must be the one its `setting` names."""
    lines = text_lines(paper)
    by_line: dict[int, list[dict[str, str]]] = {}
    for row in raw_rows(paper):
        by_line.setdefault(int(row["source_line"]), []).append(row)
    for number, rows in by_line.items():
        text = lines[number - 1]
        if not text.lstrip().startswith("|") and text.count("|") < 3:
            continue  # prose (figures' numbers)
        printed = NUMBER.findall(re.sub(r"\[\d+\]", "", text))
        expected = [x for r in rows for x in (r["value"], r["pm"]) if x]
        count = re.search(r"=(\d+)$", rows[0]["setting"])
        if count and printed[:1] == [count.group(1)]:
            printed = printed[1:]
        assert printed == expected, f"{paper} line {number}"


def _mentioned(text: str, kind: str) -> set[int]:
    found = {int(n) for n in re.findall(rf"\b{kind}\s*\.?\s*(\d+)", text)}
    for a, b in re.findall(rf"\b{kind} (\d+) to {kind} (\d+)", text):
        found |= set(range(int(a), int(b) + 1))
    return found


@pytest.mark.parametrize("paper", PAPERS)
def test_every_table_the_text_mentions_is_transcribed(paper):
    text = "\n".join(line for line in text_lines(paper) if not line.startswith("- ["))  # not the references
    tables = {f"Table {n}" for n in _mentioned(text, "Table")}
    figures = {f"Figure {n}" for n in _mentioned(text, "Fig(?:ure)?") - FIGURES_WITHOUT_NUMBERS[paper]}
    assert tables | figures == set(TABLES[paper])
    assert {t for p, t in published_tables() if p == paper} == set(TABLES[paper])


# Table lines of the texts left out on purpose (INFERENCES.md, "Not recoverable"): none today.
NOT_RECOVERABLE_LINES = {"hybridmim": set(), "pgl": set(), "hdssl": set()}


@pytest.mark.parametrize("paper", PAPERS)
def test_every_table_line_is_transcribed(paper):
    """Every line of a text table with three or more numbers is a source_line of the CSV (or listed as left out)."""
    covered = {int(r["source_line"]) for r in raw_rows(paper)}
    for number, text in enumerate(text_lines(paper), start=1):
        if text.lstrip().startswith("- ["):
            continue  # references
        is_table = text.lstrip().startswith("|") or text.count("|") >= 3
        if is_table and len(NUMBER.findall(re.sub(r"\[\d+\]", "", text))) >= 3:
            assert number in covered ^ NOT_RECOVERABLE_LINES[paper], f"{paper} line {number}: {text[:80]}"
