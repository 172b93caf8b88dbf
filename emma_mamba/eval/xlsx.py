"""A small, dependency-free .xlsx writer: one worksheet, a header row and rows of strings and numbers.

Enough for a benchmark's submission file (MMBench's evaluation server reads ``.xlsx`` with pandas / openpyxl)
without pandas or openpyxl at run time. The file holds the parts Excel, LibreOffice and openpyxl need and no more:
``[Content_Types].xml``, ``_rels/.rels``, ``xl/workbook.xml``, ``xl/_rels/workbook.xml.rels``,
``xl/styles.xml`` (one default style), ``xl/sharedStrings.xml`` and ``xl/worksheets/sheet1.xml``.

Cells:

* ``str``: a shared string (each distinct text stored once: MMBench repeats its categories, hints and the
  questions of its circular copies). Characters XML 1.0 cannot hold (the C0 controls but tab, newline and
  carriage return; lone surrogates; U+FFFE, U+FFFF) are replaced by U+FFFD, :data:`REPLACEMENT` (Excel's own
  ``_xHHHH_`` escapes are not used: openpyxl, and so pandas, would read them back as those six letters).
  Newlines, tabs, carriage returns and leading or trailing spaces are kept.
* ``int`` / ``float``: a number (``bool``, NaN, infinities and integers past 2**53, which Excel's doubles cannot
  hold exactly, are refused).
* ``None`` or ``""``: an empty cell (no cell is written; pandas reads NaN, openpyxl None).

A text longer than Excel's 32,767 characters per cell (:data:`MAX_CELL_CHARS`, counted as Excel counts them, in
UTF-16 units) is an :class:`XlsxError` naming the cell, its row and its column (the header's name), before
anything is written; so is a row or column past Excel's sheet size. The file is written to a temporary name
beside ``path`` and renamed, so a failed write leaves no partial file; its bytes depend only on the cells (fixed
zip timestamps).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import zipfile
from pathlib import Path
from typing import Iterable, Sequence

__all__ = ["write_xlsx", "XlsxError", "column_letter", "MAX_CELL_CHARS", "REPLACEMENT"]

MAX_CELL_CHARS = 32767
"""Excel's limit on the characters of one cell."""
MAX_ROWS = 1_048_576
MAX_COLUMNS = 16_384
REPLACEMENT = "\ufffd"
"""What a character XML 1.0 forbids becomes."""
_MAX_EXACT_INT = 2 ** 53
_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"})
_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&apos;",
                               "\r": "&#13;", "\n": "&#10;", "\t": "&#9;"})
_SHEET_NAME_BAD = re.compile(r"[\[\]:*?/\\]")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

_NS_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_NS_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_NS_PKG_REL = "http://schemas.openxmlformats.org/package/2006/relationships"
_XML_DECL = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'


class XlsxError(ValueError):
    """A cell (or the sheet) cannot be written as Excel holds it; ``row`` and ``column`` are the sheet's (1-based
    row, header included; 0-based column), where one cell is at fault."""

    def __init__(self, message: str, row: int | None = None, column: int | None = None):
        super().__init__(message)
        self.row, self.column = row, column


def column_letter(i: int) -> str:
    """Excel's name of the 0-based column ``i``: 0 -> "A", 25 -> "Z", 26 -> "AA", 16383 -> "XFD"."""
    if not 0 <= i < MAX_COLUMNS:
        raise XlsxError(f"column {i + 1} is past Excel's {MAX_COLUMNS} columns")
    name = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        name = chr(65 + rem) + name
    return name


def clean_text(s: str) -> str:
    """``s`` with the characters XML 1.0 forbids replaced by :data:`REPLACEMENT`."""
    return _ILLEGAL.sub(REPLACEMENT, s)


def _text(s: str) -> str:
    """Element content for ``s`` (escaped; carriage returns as references, which XML's line-end handling keeps)."""
    return clean_text(s).translate(_TEXT_ESCAPES)


def _attr(s: str) -> str:
    return clean_text(s).translate(_ATTR_ESCAPES)


def _utf16_len(s: str) -> int:
    return len(s) + sum(1 for c in s if ord(c) > 0xFFFF)


def _where(row: int, col: int, header: Sequence | None) -> str:
    name = f" ({header[col]!r})" if header is not None and row > 1 and col < len(header) else ""
    return f"cell {column_letter(col)}{row} (row {row}, column {column_letter(col)}{name})"


def _number(v, row: int, col: int, header) -> str:
    if isinstance(v, int):
        if abs(v) > _MAX_EXACT_INT:
            raise XlsxError(f"{_where(row, col, header)}: the integer {v} is past what Excel's numbers hold exactly "
                            f"(2**53); write it as a string", row, col)
        return str(v)
    if not math.isfinite(v):
        raise XlsxError(f"{_where(row, col, header)}: {v!r} is not a number Excel holds", row, col)
    return repr(float(v))


def _with_header(header, rows):
    if header is not None:
        yield header
    yield from rows


def write_xlsx(path: str | os.PathLike, header: Sequence | None, rows: Iterable[Sequence],
               sheet_name: str = "Sheet1") -> Path:
    """Write ``header`` (a first row, or None) and ``rows`` as the one sheet of the workbook ``path``.

    Cells are ``str``, ``int``, ``float`` or ``None`` (module docstring). Returns ``path``. Raises
    :class:`XlsxError` for a cell Excel cannot hold (naming it), ``TypeError`` for a value of another type.
    """
    if not sheet_name or len(sheet_name) > 31 or _SHEET_NAME_BAD.search(sheet_name) \
            or sheet_name.startswith("'") or sheet_name.endswith("'"):
        raise XlsxError(f"sheet name {sheet_name!r}: Excel takes 1 to 31 characters, none of []:*?/\\, not starting "
                        f"or ending with an apostrophe")
    strings: dict[str, int] = {}
    n_string_cells = 0
    parts = []
    r = width = 0
    for values in _with_header(header, rows):
        r += 1
        if r > MAX_ROWS:
            raise XlsxError(f"row {r} is past Excel's {MAX_ROWS} rows", r)
        cells = []
        for c, v in enumerate(values):
            if v is None or (isinstance(v, str) and not v):
                continue
            ref = f"{column_letter(c)}{r}"
            if isinstance(v, str):
                n = _utf16_len(v)
                if n > MAX_CELL_CHARS:
                    raise XlsxError(f"{_where(r, c, header)}: {n} characters, past Excel's {MAX_CELL_CHARS} per "
                                    f"cell", r, c)
                k = strings.setdefault(v, len(strings))
                n_string_cells += 1
                cells.append(f'<c r="{ref}" t="s"><v>{k}</v></c>')
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{_where(r, c, header)}: a cell is a str, int, float or None, got "
                                f"{type(v).__name__}")
            else:
                cells.append(f'<c r="{ref}"><v>{_number(v, r, c, header)}</v></c>')
            width = max(width, c + 1)
        parts.append(f'<row r="{r}">{"".join(cells)}</row>' if cells else f'<row r="{r}"/>')
    dim = f"A1:{column_letter(width - 1)}{r}" if width and r else "A1"
    sheet = (f'{_XML_DECL}<worksheet xmlns="{_NS_MAIN}" xmlns:r="{_NS_REL}"><dimension ref="{dim}"/>'
             f'<sheetData>{"".join(parts)}</sheetData></worksheet>')
    sst = []
    for s in strings:  # insertion order = index order
        keep = ' xml:space="preserve"' if s != s.strip() else ""
        sst.append(f"<si><t{keep}>{_text(s)}</t></si>")
    shared = (f'{_XML_DECL}<sst xmlns="{_NS_MAIN}" count="{n_string_cells}" uniqueCount="{len(strings)}">'
              f'{"".join(sst)}</sst>')
    files = {
        "[Content_Types].xml": (
            f'{_XML_DECL}<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
            '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
            '<Default Extension="xml" ContentType="application/xml"/>'
            '<Override PartName="/xl/workbook.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
            '<Override PartName="/xl/worksheets/sheet1.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
            '<Override PartName="/xl/styles.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/>'
            '<Override PartName="/xl/sharedStrings.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/>'
            '</Types>'),
        "_rels/.rels": (
            f'{_XML_DECL}<Relationships xmlns="{_NS_PKG_REL}">'
            f'<Relationship Id="rId1" Type="{_NS_REL}/officeDocument" Target="xl/workbook.xml"/>'
            '</Relationships>'),
        "xl/workbook.xml": (
            f'{_XML_DECL}<workbook xmlns="{_NS_MAIN}" xmlns:r="{_NS_REL}"><sheets>'
            f'<sheet name="{_attr(sheet_name)}" sheetId="1" r:id="rId1"/></sheets></workbook>'),
        "xl/_rels/workbook.xml.rels": (
            f'{_XML_DECL}<Relationships xmlns="{_NS_PKG_REL}">'
            f'<Relationship Id="rId1" Type="{_NS_REL}/worksheet" Target="worksheets/sheet1.xml"/>'
            f'<Relationship Id="rId2" Type="{_NS_REL}/styles" Target="styles.xml"/>'
            f'<Relationship Id="rId3" Type="{_NS_REL}/sharedStrings" Target="sharedStrings.xml"/>'
            '</Relationships>'),
        "xl/styles.xml": (
            f'{_XML_DECL}<styleSheet xmlns="{_NS_MAIN}">'
            '<fonts count="1"><font><sz val="11"/><name val="Calibri"/></font></fonts>'
            '<fills count="2"><fill><patternFill patternType="none"/></fill>'
            '<fill><patternFill patternType="gray125"/></fill></fills>'
            '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
            '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
            '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/></cellXfs>'
            '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles>'
            '</styleSheet>'),
        "xl/sharedStrings.xml": shared,
        "xl/worksheets/sheet1.xml": sheet,
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in files.items():
                info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                z.writestr(info, text.encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

