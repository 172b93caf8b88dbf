"""MMBench's submission file (emma_mamba.eval.mmbench.mmbench_submission, write_run_submission) and the .xlsx writer
it uses (emma_mamba.eval.xlsx).

Every file written is read back by two readers that share no code with the writer: openpyxl (what pandas'
read_excel, and so MMBench's evaluation server, reads .xlsx with; the tests using it are skipped without it) and a
plain zipfile + xml.etree reader below, which follows the workbook's relationships to its sheet and shared strings as
a spreadsheet program does.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from emma_mamba.eval._io import ScoreInputError
from emma_mamba.eval.mmbench import mmbench_submission, rotated_options, read_mmbench, write_mmbench_submission
from emma_mamba.eval.runner import evaluate
from emma_mamba.eval.xlsx import MAX_CELL_CHARS, XlsxError, column_letter, write_xlsx

MAIN = "{http://schemas.openxmlformats.org/spreadsheetml/2006/main}"
PKG_REL = "{http://schemas.openxmlformats.org/package/2006/relationships}"
DOC_REL = "{http://schemas.openxmlformats.org/officeDocument/2006/relationships}"
XML = "{http://www.w3.org/XML/1998/namespace}"


# ---------------------------------------------------------------------------------------- independent readers

def openpyxl_rows(path) -> list[tuple]:
    """The rows as openpyxl reads them, both ways: as pandas' read_excel opens a workbook (read_only, data_only: the
    sheet's size from its <dimension> element) and fully loaded (the size from the cells themselves)."""
    openpyxl = pytest.importorskip("openpyxl")
    rows = []
    for kw in ({"read_only": True, "data_only": True, "keep_links": False}, {}):
        wb = openpyxl.load_workbook(path, **kw)
        assert len(wb.sheetnames) == 1
        rows.append([tuple(r) for r in wb.active.iter_rows(values_only=True)])
        wb.close()
    assert rows[0] == rows[1]
    return rows[0]


def _col_index(ref: str) -> int:
    n = 0
    for ch in ref:
        if not ch.isalpha():
            break
        n = n * 26 + ord(ch) - 64
    return n - 1


def stdlib_rows(path) -> list[tuple]:
    """The first sheet's cells as rows of values (str, float; None where no cell), padded to the widest row."""
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        names = set(z.namelist())
        assert "[Content_Types].xml" in names
        root_rels = ET.fromstring(z.read("_rels/.rels"))
        book_path = next(r.get("Target") for r in root_rels.iter(f"{PKG_REL}Relationship")
                         if r.get("Type").endswith("/officeDocument")).lstrip("/")
        book = ET.fromstring(z.read(book_path))
        folder = book_path.rsplit("/", 1)[0]
        rels = {r.get("Id"): r for r in ET.fromstring(z.read(f"{folder}/_rels/workbook.xml.rels"))
                .iter(f"{PKG_REL}Relationship")}
        sheet_rid = book.find(f"{MAIN}sheets/{MAIN}sheet").get(f"{DOC_REL}id")
        sheet = ET.fromstring(z.read(f"{folder}/{rels[sheet_rid].get('Target')}"))
        shared = []
        sst = [r for r in rels.values() if r.get("Type").endswith("/sharedStrings")]
        if sst:
            for si in ET.fromstring(z.read(f"{folder}/{sst[0].get('Target')}")).iter(f"{MAIN}si"):
                for t in si.iter(f"{MAIN}t"):  # else Excel drops a text's leading and trailing whitespace
                    assert (t.text or "") == (t.text or "").strip() or t.get(f"{XML}space") == "preserve", t.text
                shared.append("".join(t.text or "" for t in si.iter(f"{MAIN}t")))
        types = ET.fromstring(z.read("[Content_Types].xml"))
        overrides = {o.get("PartName") for o in types}
        assert f"/{folder}/{rels[sheet_rid].get('Target')}" in overrides
    grid: dict[int, dict[int, object]] = {}
    for row in sheet.iter(f"{MAIN}row"):
        r = int(row.get("r"))
        for c in row.iter(f"{MAIN}c"):
            ref = c.get("r")
            assert int(ref[len(ref.rstrip("0123456789")):]) == r
            t = c.get("t", "n")
            if t == "s":
                v = shared[int(c.find(f"{MAIN}v").text)]
            elif t == "inlineStr":
                v = "".join(x.text or "" for x in c.iter(f"{MAIN}t"))
            elif t == "str":
                v = c.find(f"{MAIN}v").text or ""
            else:
                v = float(c.find(f"{MAIN}v").text)
            grid.setdefault(r, {})[_col_index(ref)] = v
    if not grid:
        return []
    width = max(max(cols) for cols in grid.values()) + 1
    return [tuple(grid.get(r, {}).get(c) for c in range(width)) for r in range(1, max(grid) + 1)]


def both_readers(path) -> list[tuple]:
    """The rows as the stdlib reader gives them, after checking openpyxl (where installed) reads the same."""
    mine = stdlib_rows(path)
    try:
        import openpyxl  # noqa: F401
    except ImportError:
        return mine
    assert openpyxl_rows(path) == mine
    return mine


# ---------------------------------------------------------------------------------------- the .xlsx writer

def test_openpyxl_reads_cell_types_as_pandas_needs(tmp_path):
    """With openpyxl (the oracle; skipped without it): texts are strings, numbers ints or floats, empty cells absent,
    the sheet named; the sheet's <dimension> matches its cells (pandas' read-only load sizes the sheet by it)."""
    openpyxl = pytest.importorskip("openpyxl")
    path = write_xlsx(tmp_path / "t.xlsx", ["index", "question", "x"], [[7, "1", 0.5], [8, None, ""]],
                      sheet_name="MMBench")
    wb = openpyxl.load_workbook(path, read_only=True)
    ws = wb["MMBench"]
    assert (ws.max_row, ws.max_column) == (3, 3)
    cells = [[(c.value, c.data_type) for c in r] for r in ws.iter_rows(min_row=2)]
    wb.close()
    assert [[v for v, _ in r] for r in cells] == [[7, "1", 0.5], [8, None, None]]
    assert [t for t in (cells[0][0][1], cells[0][1][1], cells[0][2][1])] == ["n", "s", "n"]
    assert type(cells[0][0][0]) is int


TRICKY = [
    ("plain", "a<b> & \"c\" 'd' ]]> &amp;"),
    ("newlines", "line 1\nline 2\r\nline 3\rend"),
    ("spaces", "  leading and trailing\t "),
    ("chinese", "图片中是什么颜色？请直接回答选项字母。"),
    ("astral", "emoji \U0001F600 and 𠀀"),
    ("controls", "a\x00b\x01c\x08d\x0be\x0cf\x1fg\ud800h\ufffei\uffffj\x7fk"),
]
CONTROLS_READ = "a\ufffdb\ufffdc\ufffdd\ufffde\ufffdf\ufffdg\ufffdh\ufffdi\ufffdj\x7fk"


def test_xlsx_strings_numbers_and_empty_cells_read_back(tmp_path):
    header = ["name", "text", "n", "x"]
    rows = [[name, text, i, i + 0.25] for i, (name, text) in enumerate(TRICKY)]
    rows += [["empty", "", None, -3], [None, None, None, None], ["last", "0042", 10 ** 15, 1e-7]]
    path = write_xlsx(tmp_path / "t.xlsx", header, rows)
    got = both_readers(path)
    want = [tuple(header)]
    for name, text, i, x in rows[:len(TRICKY)]:
        want.append((name, CONTROLS_READ if name == "controls" else text, i, x))
    # an empty string is no cell (pandas: NaN), as None; a row of nothing is still a row; "0042" stays text
    want += [("empty", None, None, -3), (None, None, None, None), ("last", "0042", 10 ** 15, 1e-7)]
    assert got == want
    assert isinstance(got[-1][1], str) and isinstance(got[1][2], float)  # the stdlib reader: numbers as numbers
    # the same cells give the same bytes (fixed zip times, insertion-ordered shared strings)
    again = write_xlsx(tmp_path / "again.xlsx", header, rows)
    assert again.read_bytes() == path.read_bytes()
    # every part is well-formed XML 1.0 and UTF-8; the shared strings are counted right
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            ET.fromstring(z.read(name))
        sst = ET.fromstring(z.read("xl/sharedStrings.xml"))
    n_text_cells = sum(isinstance(v, str) and v != "" for r in [header, *rows] for v in r)
    assert int(sst.get("count")) == n_text_cells and int(sst.get("uniqueCount")) == len(list(sst))


def test_xlsx_repeated_texts_are_stored_once_and_a_header_is_optional(tmp_path):
    path = write_xlsx(tmp_path / "t.xlsx", None, [["same", "same"], ["same", 1], ["other"]])
    assert both_readers(path) == [("same", "same"), ("same", 1), ("other", None)]
    with zipfile.ZipFile(path) as z:
        sst = ET.fromstring(z.read("xl/sharedStrings.xml"))
    assert [si.find(f"{MAIN}t").text for si in sst] == ["same", "other"] and sst.get("count") == "4"


def test_xlsx_cell_limit_is_an_error_naming_the_cell(tmp_path):
    fits = "x" * MAX_CELL_CHARS
    path = write_xlsx(tmp_path / "fits.xlsx", ["a", "b"], [["ok", fits]])
    assert both_readers(path)[1][1] == fits
    target = tmp_path / "out.xlsx"
    target.write_bytes(b"an earlier file")
    for cell in ("y" * (MAX_CELL_CHARS + 1), "\U0001F600" * (MAX_CELL_CHARS // 2 + 1)):  # Excel counts UTF-16 units
        with pytest.raises(XlsxError, match=r"cell C3 \(row 3, column C \('question'\)\): 3276[89] characters, past "
                                            r"Excel's 32767 per cell") as e:
            write_xlsx(target, ["index", "hint", "question"], [[1, "h", "short"], [2, "h", cell]])
        assert (e.value.row, e.value.column) == (3, 2)
        assert target.read_bytes() == b"an earlier file"  # untouched: nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits.xlsx", "out.xlsx"]  # no temporary file left


def test_xlsx_refuses_what_excel_cannot_hold(tmp_path):
    assert [column_letter(i) for i in (0, 25, 26, 51, 701, 702, 16383)] == ["A", "Z", "AA", "AZ", "ZZ", "AAA", "XFD"]
    for bad, what in ((float("nan"), "nan is not a number"), (float("inf"), "inf is not a number"),
                      (2 ** 53 + 1, "past what Excel's numbers hold")):
        with pytest.raises(XlsxError, match=f"cell B2 .*{what}"):
            write_xlsx(tmp_path / "t.xlsx", ["a", "b"], [[1, bad]])
    for bad in (True, b"bytes", object()):
        with pytest.raises(TypeError, match="a cell is a str, int, float or None"):
            write_xlsx(tmp_path / "t.xlsx", ["a"], [[bad]])
    with pytest.raises(XlsxError, match="sheet name"):
        write_xlsx(tmp_path / "t.xlsx", ["a"], [], sheet_name="a/b")
    assert not (tmp_path / "t.xlsx").exists()
    assert both_readers(write_xlsx(tmp_path / "t.xlsx", ["a"], [[2 ** 53]])) == [("a",), (2 ** 53,)]


# ---------------------------------------------------------------------------------------- the submission

def _png(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# a test split's layout (no answer column), columns in an order of their own and ones this project does not read
# (LLaVA's converter drops hint/category/source/comment/l2-category, VLMEvalKit keeps all but image); a question in
# Chinese; the circular copies of question 9 at 1000009 / 2000009 (VLMEvalKit's files: options rotated, the picture
# given as the index of the row holding it)
COLUMNS = ["index", "image", "question", "hint", "A", "B", "C", "D", "category", "source", "l2-category", "comment"]
Q9 = {"question": "Which <shape> & \"form\"?", "hint": "Look\nclosely.", "category": "shape", "source": "s & t",
      "l2-category": "attribute", "comment": "nan"}
ROWS = [
    {"index": "5", "image": _png("red"), "question": "图片是什么颜色？", "hint": "", "A": "红色", "B": "绿色",
     "category": "颜色", "source": "", "l2-category": "属性", "comment": ""},
    {**Q9, "index": "9", "image": _png("blue"), "A": "circle", "B": "square", "C": "star"},
    {**Q9, "index": "1000009", "image": "9", "A": "square", "B": "star", "C": "circle"},
    {**Q9, "index": "2000009", "image": "9", "A": "star", "B": "circle", "C": "square"},
    {"index": "12", "image": _png("white"), "question": "How many?", "hint": "nan", "A": "1", "B": "2", "C": "3",
     "D": "4", "category": "count", "source": "", "l2-category": "reasoning", "comment": "x\x01y"},
]
KEPT = [c for c in COLUMNS if c != "image"]


def write_tsv(path: Path, rows, columns=COLUMNS) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in columns})
    return path


# each round answered with a letter of its own, so that a row given another round's reply shows: the question's
# row takes round 0 (its options as in the file), the copy at index + k * 1000000 round k
REPLY = {"5/0": "B", "5/1": "A", "9/0": "C", "9/1": "answer: A", "9/2": "(B)", "12/0": "D", "12/1": "A",
         "12/2": "B", "12/3": "C"}


def replies(qs, prompts):
    return [REPLY[q.qid] for q in qs]


def _expected(prediction: dict) -> list[tuple]:
    """The submission's rows as a reader gives them: the TSV's cells (none where empty), its index a number."""
    rows = [tuple(KEPT) + ("prediction",)]
    for r in ROWS:
        rows.append(tuple(int(r["index"]) if c == "index" else (r.get(c) or None) for c in KEPT)
                    + (prediction[r["index"]],))
    return rows


PREDICTED = {"5": "B", "9": "C", "1000009": "A", "2000009": "B", "12": "D"}


def _read_twin(path: Path) -> list[tuple]:
    with path.open(encoding="utf-8", newline="") as f:
        return [tuple(r) for r in csv.reader(f, delimiter="\t")]


def test_test_split_run_writes_the_submission(tmp_path):
    tsv = write_tsv(tmp_path / "MMBench_TEST_CN.tsv", ROWS)
    out = tmp_path / "run"
    report = evaluate(None, "mmbench", tsv, None, out, progress=False, answer_fn=replies)
    assert report["metrics"] is None  # a test split: nothing to score here
    assert report["submission"] == {"written": True, "xlsx": str(out / "mmbench_submission.xlsx"),
                                    "tsv": str(out / "mmbench_submission.tsv"), "rows": 5, "n_questions": 3,
                                    "n_unparsed": 0}
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["submission"] == report["submission"]
    want = _expected(PREDICTED)
    want[-1] = want[-1][:-2] + ("x\ufffdy", "D")  # XML 1.0 holds no U+0001
    assert both_readers(out / "mmbench_submission.xlsx") == want
    # the TSV twin: the same table, every cell verbatim (the control character too; empty cells empty)
    twin = _read_twin(out / "mmbench_submission.tsv")
    assert twin == [tuple("" if v is None else str(v) for v in r) for r in _expected(PREDICTED)]


def test_every_row_takes_the_round_that_showed_its_options(tmp_path):
    """The copies' rows take the reply to their own option order: a file whose copies rotate the other way round
    (option k first) is read by its options, not by the k of its index."""
    items = {it.index: it for it in read_mmbench(write_tsv(tmp_path / "q.tsv", ROWS))}
    assert rotated_options(items[9], 1) == ["square", "star", "circle"]  # what the row 1000009 shows
    flipped = [*ROWS[:2], {**ROWS[2], "index": "2000009"}, {**ROWS[3], "index": "1000009"}, ROWS[4]]
    tsv = write_tsv(tmp_path / "flipped.tsv", flipped)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in REPLY.items()))
    sub = mmbench_submission(answers, tsv)
    assert [r[0] for r in sub.rows] == [5, 9, 2000009, 1000009, 12]
    assert [r[-1] for r in sub.rows] == ["B", "C", "A", "B", "D"]
    assert sub.n_by_text == 0 and sub.complete and not sub.has_answers
    # a copy in an order no round showed (not met in MMBench's files): round 0's choice, by its text
    # (every round of 9 answered "C", so that only the translation by text gives A)
    odd = write_tsv(tmp_path / "odd.tsv", [*ROWS[:2], {**ROWS[2], "A": "star", "B": "square", "C": "circle"}])
    answers2 = tmp_path / "a2.jsonl"
    answers2.write_text("".join(json.dumps({"question_id": k, "text": "C" if k.startswith("9/") else v}) + "\n"
                                for k, v in REPLY.items() if not k.startswith("12/")))
    sub = mmbench_submission(answers2, odd)
    assert [r[-1] for r in sub.rows] == ["B", "C", "A"] and sub.n_by_text == 1  # round 0 chose C: star


def test_dev_split_scored_and_submitted_unparsed_reply_kept(tmp_path):
    dev = [{**r, "answer": a} for r, a in zip(ROWS, "BCBAD")]
    tsv = write_tsv(tmp_path / "MMBench_DEV_CN.tsv", dev, COLUMNS + ["answer"])
    odd = dict(REPLY, **{"12/0": "  I cannot tell.  "})
    report = evaluate(None, "mmbench", tsv, None, tmp_path / "run", progress=False,
                      answer_fn=lambda qs, ps: [odd[q.qid] for q in qs])
    assert report["metrics"]["n"] == 3 and report["metrics"]["n_unparsed_replies"] == 1
    assert report["submission"]["written"] and report["submission"]["n_unparsed"] == 1
    rows = both_readers(tmp_path / "run" / "mmbench_submission.xlsx")
    assert rows[0] == tuple(KEPT) + ("answer", "prediction")
    assert [r[-2:] for r in rows[1:]] == [("B", "B"), ("C", "C"), ("B", "A"), ("A", "B"), ("D", "I cannot tell.")]


def test_partial_run_writes_no_submission_until_complete(tmp_path, caplog):
    tsv = write_tsv(tmp_path / "MMBench_TEST_CN.tsv", ROWS)
    out = tmp_path / "run"
    out.mkdir()
    for name in ("mmbench_submission.xlsx", "mmbench_submission.tsv"):  # as left by another answers file
        (out / name).write_text("stale")
    report = evaluate(None, "mmbench", tsv, None, out, limit=2, progress=False, answer_fn=replies)
    assert report["limited"] == {"n": 2, "of": 3}
    assert report["submission"] == {"written": False, "reason": "2 of 3 questions answered; MMBench's server scores "
                                                                "every question (an unanswered one as wrong)"}
    assert not (out / "mmbench_submission.xlsx").exists() and not (out / "mmbench_submission.tsv").exists()
    assert "no submission file (2 of 3 questions answered" in caplog.text
    with pytest.raises(ScoreInputError, match=r"no submission file: 1 of 3 questions have no answer \(first: \[12\]\)"):
        write_mmbench_submission(mmbench_submission(out / "answers.jsonl", tsv), tmp_path / "x.xlsx")
    assert not (tmp_path / "x.xlsx").exists()
    # the rest answered into the same folder: complete, written
    report = evaluate(None, "mmbench", tsv, None, out, progress=False, answer_fn=replies)
    assert report["n_answered_this_run"] == 4 and report["submission"]["written"]
    assert [r[-1] for r in both_readers(out / "mmbench_submission.xlsx")[1:]] == list(PREDICTED.values())


def test_overlong_cell_fails_the_xlsx_only_naming_the_index(tmp_path, caplog):
    long_hint = "h" * (MAX_CELL_CHARS + 5)
    tsv = write_tsv(tmp_path / "MMBench_TEST_CN.tsv", [ROWS[0], {**ROWS[4], "hint": long_hint}])
    out = tmp_path / "run"
    report = evaluate(None, "mmbench", tsv, None, out, progress=False, answer_fn=replies)
    sub = report["submission"]
    assert sub["xlsx"] is None and sub["tsv"] == str(out / "mmbench_submission.tsv")
    assert "cell C3 (row 3, column C ('hint')): 32772 characters" in sub["error"] and "MMBench index 12" in sub["error"]
    assert "MMBench index 12" in caplog.text
    assert not (out / "mmbench_submission.xlsx").exists()
    assert _read_twin(out / "mmbench_submission.tsv")[2][KEPT.index("hint")] == long_hint
    with pytest.raises(XlsxError, match=r"s\.xlsx: cell C3 .*\(MMBench index 12\)"):
        write_mmbench_submission(mmbench_submission(out / "answers.jsonl", tsv), tmp_path / "s.xlsx")


def test_score_cli_writes_the_submission_from_earlier_answers(tmp_path, capsys):
    from emma_mamba.cli import main

    test = write_tsv(tmp_path / "MMBench_TEST_CN.tsv", ROWS)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": k, "text": v}, ensure_ascii=False) + "\n"
                               for k, v in REPLY.items()))
    sub = tmp_path / "upload" / "model.xlsx"
    args = ["score", "--task", "mmbench", "--answers", str(answers), "--annotations", str(test)]
    assert main(args) == 2 and "a test split" in capsys.readouterr().err  # without --submission: as before
    assert main(args + ["--submission", str(sub)]) == 0
    out = capsys.readouterr().out
    assert f"MMBench submission written to {sub}" in out and "not scored here" in out
    want = _expected(PREDICTED)
    want[-1] = want[-1][:-2] + ("x\ufffdy", "D")
    assert both_readers(sub) == want and sub.with_suffix(".tsv").is_file()
    # a dev TSV: scored as well
    dev = write_tsv(tmp_path / "dev.tsv", [{**r, "answer": a} for r, a in zip(ROWS, "BCBAD")], COLUMNS + ["answer"])
    dev_args = ["score", "--task", "mmbench", "--answers", str(answers), "--annotations", str(dev), "--submission"]
    before = dev.read_bytes()
    assert main(dev_args + [str(tmp_path / "dev.xlsx")]) == 2  # its .tsv twin would be dev.tsv itself
    assert "writing " + str(tmp_path / "dev.tsv") + " would replace an input file" in capsys.readouterr().err
    assert dev.read_bytes() == before and not (tmp_path / "dev.xlsx").exists()
    assert main(dev_args + [str(tmp_path / "dev_submission.xlsx")]) == 0
    out = capsys.readouterr().out
    assert "MMBench submission written" in out and "not scored" not in out and "circular accuracy 33.33" in out
    # refused: answers for some questions only, another task, another file name
    answers.write_text("".join(json.dumps({"question_id": k, "text": v}) + "\n" for k, v in REPLY.items()
                               if k.startswith("5/")))
    assert main(args + ["--submission", str(tmp_path / "part.xlsx")]) == 2
    assert "2 of 3 questions have no answer" in capsys.readouterr().err and not (tmp_path / "part.xlsx").exists()
    assert main(["score", "--task", "seed", "--answers", str(answers), "--annotations", str(test), "--submission",
                 str(sub)]) == 2
    assert "goes with --task mmbench" in capsys.readouterr().err
    assert main(args + ["--submission", str(tmp_path / "s.csv")]) == 2
    assert "must end in .xlsx" in capsys.readouterr().err
