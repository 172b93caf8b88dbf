"""MME scorer: acc and acc+ per category, perception and cognition totals (Fu et al., 2023).

Files (MME's eval_tool format): one ``<category>.txt`` per category, each line
``image<TAB>question<TAB>ground truth<TAB>model answer`` (the template's three columns with the answer
appended), two consecutive lines per image. ``answers`` is a directory of such files (or one file; its stem
is the category). ``template``, optional, is the directory (or file) of three-column templates: when given,
every answer file must repeat its template's first three columns line by line, and every template category
must be answered.

Per category: acc = share of questions answered right; acc+ = share of images with both questions right;
score = 100·acc + 100·acc+ (at most 200). Perception is the sum of the perception categories' scores (ten
categories in MME, at most 2000), cognition the sum of the four cognition categories (at most 800); only
the categories present are summed. Answers are read as MME's ``calculation.py`` does: lower-cased, "yes" or
"no" as is, otherwise "yes" if its first four characters contain "yes", else "no" if they contain "no",
else "other" (always wrong).
"""

from __future__ import annotations

from pathlib import Path

from emma_mamba.eval._io import ScoreInputError, read_text
from emma_mamba.fileio import text_lines

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def parse_mme_answer(reply: str) -> str:
    r = reply.strip().lower()
    if r in ("yes", "no"):
        return r
    head = r[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def _category_files(path: Path, what: str) -> dict[str, Path]:
    if path.is_dir():
        files = {p.stem: p for p in sorted(path.glob("*.txt"))}
        if not files:
            raise ScoreInputError(f"{what} directory {path} holds no <category>.txt files")
    elif path.is_file():
        files = {path.stem: path}
    else:
        raise ScoreInputError(f"{what} {path} does not exist")
    for cat, p in files.items():
        if cat not in PERCEPTION and cat not in COGNITION:
            raise ScoreInputError(f"{p}: unknown MME category {cat!r}; the file name must be one of "
                                  f"{list(PERCEPTION + COGNITION)}")
    return files


def _read_lines(p: Path, ncols: int) -> list[tuple[int, list[str]]]:
    out = []
    for n, line in enumerate(text_lines(read_text(p, "MME")), 1):
        if not line.strip():
            continue
        cols = line.split("\t", ncols - 1)  # the model's answer (last column) may itself contain tabs
        if len(cols) != ncols:
            want = "image, question, ground truth and the model's answer" if ncols == 4 else \
                "image, question and ground truth"
            raise ScoreInputError(f"{p}: line {n}: expected {ncols} tab-separated columns ({want}), got {len(cols)}")
        out.append((n, cols))
    return out


def score_category(p: Path, template: Path | None = None, template_rows: list | None = None) -> dict:
    """acc, acc+ and score of one category's answer file ``p``; with ``template`` (its three-column file, whose
    lines ``template_rows`` already read, when given) checked against it line by line."""
    rows = _read_lines(p, 4)
    if template is not None:
        trows = _read_lines(template, 3) if template_rows is None else template_rows
        if len(trows) != len(rows):
            raise ScoreInputError(f"{p}: {len(rows)} answered lines but the template {template} has {len(trows)}")
        for (n, cols), (tn, tcols) in zip(rows, trows):
            if [c.strip() for c in cols[:3]] != [c.strip() for c in tcols]:
                raise ScoreInputError(f"{p}: line {n} does not match {template} line {tn}: "
                                      f"{cols[:3]!r} vs {tcols!r}")
    if not rows or len(rows) % 2:
        raise ScoreInputError(f"{p}: MME needs two questions per image; found {len(rows)} lines")
    right, both = 0, 0
    for (n1, a), (n2, b) in zip(rows[0::2], rows[1::2]):
        if a[0].strip() != b[0].strip():
            raise ScoreInputError(f"{p}: lines {n1} and {n2} should be the two questions of one image, but name "
                                  f"{a[0]!r} and {b[0]!r}")
        ok = []
        for n, cols in ((n1, a), (n2, b)):
            gt = cols[2].strip().lower()
            if gt not in ("yes", "no"):
                raise ScoreInputError(f"{p}: line {n}: ground truth must be Yes or No, got {cols[2]!r}")
            ok.append(parse_mme_answer(cols[3]) == gt)
        right += sum(ok)
        both += all(ok)
    n_img = len(rows) // 2
    acc, acc_plus = 100.0 * right / len(rows), 100.0 * both / n_img
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus, "n_questions": len(rows), "n_images": n_img}


def score_mme(answers: str | Path, template: str | Path | None = None) -> dict:
    """Score MME answer files; acc, acc_plus and score are in percent points as MME reports them."""
    files = _category_files(Path(answers), "MME answers")
    tfiles = _category_files(Path(template), "MME template") if template is not None else {}
    trows = {cat: _read_lines(p, 3) for cat, p in tfiles.items()}  # each template file read once
    # a template category with no lines (a subset of MME) has nothing to answer: skipped, and named in the result
    empty = sorted(cat for cat, rows in trows.items() if not rows)
    if tfiles and len(empty) == len(tfiles):
        raise ScoreInputError(f"MME template {template}: every category file is empty")
    for cat in tfiles:
        if cat not in files and cat not in empty:
            raise ScoreInputError(f"{answers}: no answers for MME category {cat!r} (template {tfiles[cat]})")
    cats = {}
    for cat, p in files.items():
        if cat in empty:
            if _read_lines(p, 4):
                raise ScoreInputError(f"{p}: answers for MME category {cat!r}, but its template {tfiles[cat]} is "
                                      f"empty")
            continue
        cats[cat] = score_category(p, tfiles.get(cat), trows.get(cat))
    perception = sum(v["score"] for c, v in cats.items() if c in PERCEPTION)
    cognition = sum(v["score"] for c, v in cats.items() if c in COGNITION)
    out = {"categories": cats, "perception": perception, "cognition": cognition, "total": perception + cognition}
    if empty:
        out["empty_categories"] = empty
    return out
