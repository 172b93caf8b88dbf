"""LLaVA-format training data: records, chat template, label masks, truncation, padding and packing.

Format (LLaVA-558K / LLaVA-665K): a JSON list (or JSONL, one record per line) of::

    {"id": "...", "image": "relative/path.jpg", "conversations": [
        {"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}, ...]}

``image`` is optional (text-only records) and may be a list (one ``<image>`` placeholder per entry); paths are
relative to ``data.image_folder``.

Chat template (zephyr style, as mamba-2.8b-zephyr was tuned; the same constant inference uses,
:data:`emma_mamba.models.vlm.CHAT_TEMPLATE`). A conversation of turns (h1, g1), (h2, g2) becomes::

    <|user|>\\n{h1}<|endoftext|>\\n<|assistant|>\\n{g1}<|endoftext|>\\n<|user|>\\n{h2}<|endoftext|>\\n<|assistant|>\\n{g2}<|endoftext|>

``prompt_template`` / ``turn_end`` / ``turn_sep`` come from :class:`emma_mamba.training.config.DataConfig`.
Labels are set on the assistant tokens only, each answer's ``turn_end`` (the end-of-turn token) included, so the
model learns to stop; everything else is -100. Segments are tokenised one by one (the tests check this equals
tokenising the whole string, which holds because every segment boundary is a newline or a special token).

``<image>``: a single-image record has its placeholder moved to the start of its human turn followed by a
newline (LLaVA's ``preprocess_multimodal``; one is added to the first human turn if the text has none), which
is exactly the prompt :func:`emma_mamba.models.vlm.build_chat_prompt` builds at inference. Multi-image records
keep their placeholders where they are. The instruction for instruction-aware fusion is the text of the human
turn holding the image, placeholders removed.

Truncation: ``max_length`` counts the LM's input positions, each image counting as its N visual tokens. A
longer sample is cut at the last whole token that fits; a cut that would fall inside an image's visual tokens
is moved before that image, which is then dropped with its placeholder. Truncations are counted and logged
(how many samples, how many tokens and answer tokens lost); a sample with no answer token left is a bad record.

Bad records are never dropped silently: with ``on_error="raise"`` the first one raises :class:`DataError`
naming the file, the record index (JSONL: the line) and the problem; with ``"skip"`` each is logged and
counted per reason in :class:`DataReport`. Reasons: ``not_an_object``, ``no_conversations``, ``bad_turn``,
``bad_role``, ``bad_order``, ``no_assistant``, ``bad_image_field``, ``placeholder_mismatch``,
``missing_image``, ``corrupt_image`` (found when the image is decoded, during training), ``too_long``,
``malformed_json`` (a JSONL line; a malformed ``.json`` file is always an error naming line and column).

Records that train but are probably not what was meant are kept and counted as notes (``DataReport.notes``,
logged once per file, listed by ``data check``): ``duplicate_id`` (an id an earlier record of the file has),
``duplicate_record`` (the same conversation and images as an earlier record: trained on twice per epoch) and
``empty_answer`` (an assistant turn with no text: only its turn end is learned); ``data check``, which decodes
every image, also notes ``small_image`` (a side under 1/8 of the encoder's input: upscaled more than 8x).

Several files (``data.sources``: ``{json, image_folder, repeat}`` each) make one data set, read and checked
file by file (every error names its file): ``repeat`` 2 takes a file's usable records twice per epoch, 0.5 a
fixed seeded half of them (:func:`repeat_indices`: the same records in every epoch and every run), 1.5 all of
them plus such a half. The mixture is then shuffled and packed as one set.

Packing: :func:`plan_rows` shuffles the records with a per-epoch seed and fills rows of ``max_length``
positions greedily in that order; :func:`collate` gives each packed sample its own ``seq_idx`` value, which the
Mamba scan and conv reset on, so a packed row computes exactly what the samples would alone. The label of the
first token of every sample is -100 (nothing predicts it, certainly not the previous sample).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from emma_mamba.fileio import is_jsonl, text_lines

__all__ = ["DataError", "Sample", "DataReport", "DataSource", "LlavaDataset", "read_records", "plan_rows", "collate",
           "REASONS", "NOTES", "IGNORE_INDEX", "chat_segments", "hoist_images", "preprocess_image", "data_sources",
           "repeat_indices", "record_where", "is_jsonl"]

log = logging.getLogger(__name__)
load_log = logging.getLogger(__name__ + ".loading")
"""Where the records skipped while training (an image that failed to load) are logged: each process's own, so
that a distributed run's launcher may quiet the rest of this module's warnings (the same on every process) on all
ranks but one and still show these."""

IGNORE_INDEX = -100
HUMAN, GPT = "human", "gpt"
NOTES = ("duplicate_id", "duplicate_record", "empty_answer", "small_image")  # kept and counted (DataReport.notes)
REASONS = ("malformed_json", "not_an_object", "no_conversations", "bad_turn", "bad_role", "bad_order",
           "no_assistant", "bad_image_field", "placeholder_mismatch", "special_token", "missing_image",
           "corrupt_image", "too_long")
_MAX_LOGGED_SKIPS = 20
_MAX_EXAMPLES = 5  # per reason, kept in DataReport.examples


class DataError(ValueError):
    """A bad record or file; the message names the file and the record index (or line and column)."""

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason


_TOKENIZE_RECORDS = 2048  # records tokenised per batched call (LlavaDataset._build_chunk)


@dataclass
class Sample:
    """One tokenised, validated record."""

    index: int
    """Record index in the file (JSONL: 0-based line number; messages name it as its 1-based line)."""
    id: str
    images: list[Path]
    """Image files, one per ``<image>`` placeholder in input_ids, in order."""
    instructions: list[str]
    """Instruction-fusion text per image (its human turn without placeholders)."""
    input_ids: array
    """Token ids, an ``array("i")`` (int32: 4 bytes a token, where a list of Python ints takes ~35 and the corpus is
    held by every rank; ``list(...)`` for a list)."""
    labels: array
    """Targets, ``array("i")``: the token where trained on, else -100 (IGNORE_INDEX)."""
    length: int
    """LM input positions: tokens + (N - 1) per image."""
    source: int = 0
    """Which of the data set's files (data.sources) the record is from."""
    named: bool = True
    """The record has an id of its own (``id`` above is then its record index, which messages do not name as an
    id)."""


@dataclass
class DataReport:
    """What loading did to the data: kept, skipped (per reason), truncated. Logged; also in metrics."""

    source: str
    records: int = 0
    samples: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated: int = 0
    truncated_tokens: int = 0
    truncated_answer_tokens: int = 0
    dropped_images: int = 0
    longest: int = 0
    """The longest record in LM positions before truncation (also one skipped as too long)."""
    longest_used: int = 0
    """The longest sample trained on, in LM positions (after truncation: at most max_length)."""
    examples: dict = field(default_factory=dict)
    """reason -> the first few skipped records' messages (file, record, what was wrong)."""
    notes: Counter = field(default_factory=Counter)
    """Kept records that are probably not what was meant, per kind (:data:`NOTES`)."""
    note_examples: dict = field(default_factory=dict)
    """kind -> the first few noted records' messages."""
    noted: set = field(default_factory=set)
    """The records noted, as (file, record index): a record with two notes (a duplicate id and a duplicate
    record) is one record kept but noted, counted under both kinds in :attr:`notes`."""
    mixture: list = field(default_factory=list)
    """Several files (data.sources): per file {file, records, usable, repeat, epoch_samples}."""

    def summary(self) -> str:
        s = f"{self.source}: {self.samples} of {self.records} records used"
        if self.mixture:
            s += " (" + ", ".join(f"{Path(m['file']).name}: {m['usable']} x {m['repeat']:g} = {m['epoch_samples']}"
                                  for m in self.mixture) + f" samples per epoch, {self.epoch_samples} in all)"
        if self.skipped:
            s += f"; skipped {sum(self.skipped.values())} (" + ", ".join(
                f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")"
        if self.truncated:
            s += (f"; truncated {self.truncated} to max_length (lost {self.truncated_tokens} positions, "
                  f"{self.truncated_answer_tokens} answer tokens, {self.dropped_images} images)")
        if self.notes:
            s += "; kept but noted: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.notes.items()))
        s += f"; longest sample used {self.longest_used} positions"
        if self.longest > self.longest_used:
            s += f" ({self.longest} before truncation to max_length)"
        return s

    def note(self, kind: str, text: str, record=None) -> None:
        """Count a kept record of kind ``kind`` (one of :data:`NOTES`); ``text`` names it and what was seen,
        ``record`` ((file, record index)) which record it is (:attr:`noted`)."""
        assert kind in NOTES, kind
        self.notes[kind] += 1
        self.noted.add(record if record is not None else (kind, len(self.noted)))
        shown = self.note_examples.setdefault(kind, [])
        if len(shown) < _MAX_EXAMPLES:
            shown.append(text)

    @property
    def epoch_samples(self) -> int:
        return sum(m["epoch_samples"] for m in self.mixture) if self.mixture else self.samples


@dataclass
class DataSource:
    """One training file of a data set."""

    json: Path
    image_folder: Path
    """Folder its records' image paths are relative to (default: the file's folder)."""
    repeat: float = 1.0
    """Its usable records per epoch, as a multiple of their number (see :func:`repeat_indices`)."""


def data_sources(cfg) -> list[DataSource]:
    """The files of data config ``cfg``: its ``sources`` list (validated by the run config), else ``json``. A file's
    images are under its own ``image_folder``, else ``cfg.image_folder``, else the file's folder."""
    entries = cfg.sources or [{"json": cfg.json}]
    out = []
    for e in entries:
        path = Path(e["json"])
        folder = e.get("image_folder") or cfg.image_folder
        out.append(DataSource(path, Path(folder) if folder else path.parent, float(e.get("repeat", 1.0))))
    return out


def check_data_paths(data_cfg, val_cfg=None) -> None:
    """Refuse, before anything is built, a training or held-out file that is not there and an image folder a
    config names that is not a folder, each by its config key: a mistyped ``image_folder`` would otherwise make
    every image record "missing", which ``on_error: skip`` skips, training on the text-only records alone."""
    # (key of the file, the file, key of its image folder, the folder): a source without its own folder takes
    # data.image_folder's
    entries = [(f"data.sources[{i}].json", e.get("json"),
                f"data.sources[{i}].image_folder" if e.get("image_folder") else "data.image_folder",
                e.get("image_folder") or data_cfg.image_folder)
               for i, e in enumerate(data_cfg.sources)] if data_cfg.sources else \
        [("data.json", data_cfg.json, "data.image_folder", data_cfg.image_folder)]
    if val_cfg is not None and val_cfg.json:
        entries.append(("val.json", val_cfg.json, "val.image_folder", val_cfg.image_folder))
    for json_key, json_path, folder_key, folder in entries:
        if json_path and not Path(json_path).is_file():
            raise DataError(f"{json_key}: data file not found: {json_path}"
                            + (" (a folder)" if Path(json_path).is_dir() else ""))
        if folder and not Path(folder).is_dir():
            raise DataError(f"{folder_key}: {folder} is not a folder" + (" (a file)" if Path(folder).is_file() else
                                                                            " (not found)")
                            + f": the images of {json_path} are looked for there")


def repeat_indices(n: int, repeat: float, source: int) -> list[int]:
    """Positions of a file's ``n`` usable samples in an epoch of the mixture: all of them ``int(repeat)`` times,
    then a subset of ``round(frac(repeat) * n)`` drawn by a generator seeded with the file's place in the list
    (fixed: the same records in every epoch and every run), in file order."""
    whole = int(repeat)
    out = list(range(n)) * whole
    m = round((repeat - whole) * n)
    if m:
        g = torch.Generator().manual_seed(1_000_003 * (source + 1))
        out += sorted(torch.randperm(n, generator=g)[:m].tolist())
    return out


class _Issues:
    """Raise or count-and-log a bad record, by on_error."""

    def __init__(self, on_error: str, report: DataReport):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error, self.report = on_error, report

    def count(self, reason: str, text: str) -> None:
        """Count a skipped record under ``reason``, ``text`` among the report's first examples of it."""
        self.report.skipped[reason] += 1
        shown = self.report.examples.setdefault(reason, [])
        if len(shown) < _MAX_EXAMPLES:
            shown.append(text)

    def __call__(self, reason: str, where: str, message: str, logger: logging.Logger = log) -> None:
        assert reason in REASONS, reason
        text = f"{where}: {message}"
        if self.on_error == "raise":
            raise DataError(text + " (set data.on_error: skip to skip and count such records)", reason)
        self.count(reason, text)
        n = sum(self.report.skipped.values())
        if n <= _MAX_LOGGED_SKIPS:
            logger.warning("skipping %s [%s]", text, reason)
        elif n == _MAX_LOGGED_SKIPS + 1:
            logger.warning("more bad records are being skipped; counts per reason are in the data summary")


def record_where(path: str | Path, index: int, rid=None) -> str:
    """How messages name record ``index`` of data file ``path``: ``record N`` (0-based, the list index) in a
    .json file, ``line N`` (1-based, as an editor numbers it) in a .jsonl file; its id when it has one."""
    path = Path(path)
    where = f"{path}: line {index + 1}" if is_jsonl(path) else f"{path}: record {index}"
    return where + (f" (id {rid!r})" if rid is not None else "")


def read_records(path: str | Path, issues: _Issues) -> list[tuple[int, object]]:
    """(index, record) pairs of a .json list or a .jsonl file. A malformed .json file always raises,
    naming line and column; a malformed JSONL line is a bad record (raise or skip)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}" + (" (a folder)" if path.is_dir() else ""))
    text = read_text_utf8(path)
    if is_jsonl(path):
        lines = text_lines(text)  # at newlines only: a record may hold U+2028 (json.dumps(ensure_ascii=False))
        first = next((line.strip() for line in lines if line.strip()), "")
        if first == "[" or first.startswith("[{") or first.startswith("[ {"):
            raise DataError(f"{path}: a .jsonl file holds one JSON object per line, but this one starts a JSON list "
                            f"({first[:20]!r}...): name it .json", "malformed_json")
        if first == "{":  # no record is a lone brace: records written with json.dumps(..., indent=...)
            raise DataError(f"{path}: a .jsonl file holds one JSON object per line, but its first record opens "
                            f"with a line holding only '{{': records spread over several lines (pretty-printed); "
                            f"write each record on one line (json.dumps without indent)", "malformed_json")
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                out.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                issues("malformed_json", f"{path}: line {i + 1}, column {e.colno}", f"malformed JSON: {e.msg}")
        return out
    if not text.strip():  # (json's "Expecting value" at 1:1 read as a typo, where a download or a write failed)
        raise DataError(f"{path}: the file is empty ({path.stat().st_size} bytes): an interrupted download or write?",
                        "malformed_json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data" and e.colno == 1:  # a second document at the start of a line: JSON Lines
            hint = " (the file looks like JSON Lines, one record per line: name it .jsonl)"
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}{hint}", "malformed_json") from None
    if not isinstance(data, list):
        got = type(data).__name__
        if isinstance(data, dict):
            got = f"an object with keys {_keys(data)}" + (
                " (one record: a .json file holds a list of them)" if "conversations" in data else
                " (the records a list under one of its keys? the file must be that list itself)"
                if any(isinstance(v, list) for v in data.values())
                else "")
        raise DataError(f"{path}: expected a JSON list of records at the top level, got {got}")
    return list(enumerate(data))


def read_text_utf8(path: Path) -> str:
    """A data file's text: UTF-8, with or without a byte-order mark; any other encoding is a DataError naming the
    file and the first byte that is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}; {e.reason}): "
                        f"re-encode the file as UTF-8", "malformed_json") from None


LLAVA_IMAGE_TOKEN = "<image>"
"""The image placeholder of LLaVA-format data (and the default ``model.image_token``)."""


def reserved_strings(tokenizer, image_token: str, *templates: str) -> tuple[str, ...]:
    """Text a record may not hold: the tokenizer's special tokens (it reads them as control tokens, e.g. the
    end-of-text id, not as words) other than the image placeholder, and the chat format's role markers
    (``<|user|>``, ``<|assistant|>``: a record holding them would forge a turn boundary)."""
    import re

    found = set()
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        found |= {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    for template in templates:
        found |= set(re.findall(r"<\|[^|<>\s]+\|>", template or ""))
    found.discard(image_token)
    return tuple(sorted(found))


def _keys(obj: dict) -> str:
    """A record's or turn's keys, for messages: ``'id', 'messages'`` (``none`` for an empty object)."""
    return ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "") if obj else "none"


def _strip_placeholders(text: str, token: str) -> str:
    """The text without placeholders and with its whitespace collapsed (an instruction for instruction fusion)."""
    return " ".join(text.replace(token, " ").split()) if token in text else text.strip()


def preprocess_image(path: str | Path, image_processor) -> torch.Tensor:
    """(3, H, W) of one image file through ``image_processor``'s transform; a missing file is a
    :class:`DataError` with reason ``missing_image``, one that cannot be decoded ``corrupt_image``."""
    try:
        return image_processor.one(path)
    except FileNotFoundError as e:
        raise DataError(str(e), "missing_image") from None
    except (ValueError, OSError) as e:
        raise DataError(str(e), "corrupt_image") from None


def hoist_images(question: str, image_token: str) -> tuple[str, str]:
    """(the turn's placeholders, the question without them) for ``vision.image_position: before_turn``; a
    placeholder's own line break goes with it, the question's other line breaks stay."""
    n = question.count(image_token)
    if not n:
        return "", question
    rest = question.replace(image_token + "\n", "").replace("\n" + image_token, "").replace(image_token, "")
    return image_token * n, rest.strip()


def chat_segments(pairs: Sequence[tuple[str, str | None]], template: str, turn_end: str,
                  turn_sep: str, hoist_token: str | None = None) -> list[tuple[str, bool]]:
    """A conversation of (question, answer) turns as (text, trained_on) pieces, each tokenised on its own: the
    question in ``template``, the answer followed by ``turn_end`` (the trained pieces), ``turn_sep`` between
    turns. An answer of None (the turn a model is to answer, ``emma-mamba serve``) ends the pieces after its
    question. ``hoist_token``: that placeholder moved ahead of its turn's template (``image_position:
    before_turn``, :func:`hoist_images`)."""
    out = []
    for k, (question, answer) in enumerate(pairs):
        if k:
            out.append((turn_sep, False))
        ahead = ""
        if hoist_token is not None:
            ahead, question = hoist_images(question, hoist_token)
        out.append((ahead + template.format(prompt=question), False))
        if answer is not None:
            out.append((answer + turn_end, True))
    return out


class LlavaDataset:
    """Validated, tokenised LLaVA records; images are decoded on demand (:meth:`load_images`).

    ``tokenizer`` is the model's (``<image>`` added as a special token: ``image_token_id``); ``num_image_tokens``
    the visual tokens per image (N); ``image_processor`` turns a PIL image into a (3, H, W) tensor.
    """

    @classmethod
    def for_model(cls, cfg, model) -> "LlavaDataset":
        """The dataset of data config ``cfg`` as ``model`` (an EmmaMamba, possibly meta-built) reads it: its
        tokenizer, image placeholder, visual tokens per image and image preprocessing."""
        return cls(cfg, model.tokenizer, model.config.image_token, model.image_token_id, model.vision.num_tokens,
                   model.image_processor, model.config.vision.image_position)

    def __init__(self, cfg, tokenizer, image_token: str, image_token_id: int, num_image_tokens: int,
                 image_processor=None, image_position: str = "in_turn"):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.image_token, self.image_token_id = image_token, image_token_id
        self.image_position = image_position  # vision.image_position: where a turn's visual tokens go
        self.N = num_image_tokens
        self.image_processor = image_processor
        self._image_cache: dict[str, torch.Tensor] = {}  # path -> (3, H, W), data.image_cache_mb
        self._image_cache_left = cfg.image_cache_mb << 20  # bytes still free
        self.sources = data_sources(cfg)
        self.report = DataReport(source=", ".join(str(src.json) for src in self.sources))
        self.issues = _Issues(cfg.on_error, self.report)
        self.reserved = reserved_strings(tokenizer, image_token, cfg.prompt_template, cfg.turn_end)
        self._failed_loads: set = set()  # records whose image failed to load: (source, index) (report_issue)
        self.samples: list[Sample] = []
        mixed = len(self.sources) > 1 or self.sources[0].repeat != 1.0
        for k, src in enumerate(self.sources):
            self.path, self.image_folder = src.json, src.image_folder  # what _where and _check read
            malformed = self.report.skipped["malformed_json"]
            records = read_records(self.path, self.issues)
            n_records = len(records) + self.report.skipped["malformed_json"] - malformed
            self.report.records += n_records
            missing, shown = self.report.skipped["missing_image"], len(self.report.examples.get("missing_image", []))
            built = self._build(records, k)
            self._check_image_folder(src, self.report.skipped["missing_image"] - missing, built,
                                     self.report.examples.get("missing_image", [])[shown:])
            self.report.samples += len(built)
            picked = [built[i] for i in repeat_indices(len(built), src.repeat, k)]
            if mixed:
                self.report.mixture.append({"file": str(src.json), "records": n_records, "usable": len(built),
                                            "repeat": src.repeat, "epoch_samples": len(picked)})
                if built and not picked:
                    log.warning("%s: repeat %g of %d usable records takes none of them", src.json, src.repeat,
                                len(built))
            self.samples.extend(picked)
        self.path, self.image_folder = self.sources[0].json, self.sources[0].image_folder
        log.info("%s", self.report.summary())

    def _check_image_folder(self, src: DataSource, missing: int, built: list, examples: list) -> None:
        """Refuse a file none of whose images were found (``on_error: skip`` skipped them all): its image folder is
        not the one its paths are relative to (one level too high, as LLaVA's layout invites, or left out), and
        training would go on with its text-only records alone (a stage 1 trains on no image at all); warn where
        most were not found."""
        if not missing:
            return
        with_images = sum(1 for b in built if b.images)
        first = f"; the first: {examples[0]}" if examples else ""
        if not with_images:
            raise DataError(f"{src.json}: none of its {missing} records' images is under {src.image_folder} (the "
                            f"folder its image paths are taken relative to: data.image_folder or the source's "
                            f"image_folder, else the file's folder){first}", "missing_image")
        if missing > with_images:
            log.warning("%s: %d of %d image records' images are not under %s (skipped); is that the folder the "
                        "paths are relative to?%s", src.json, missing, missing + with_images, src.image_folder,
                        first)

    # ------------------------------------------------------------------------------------- validation

    def _where(self, index: int, rec) -> str:
        rid = rec.get("id") if isinstance(rec, dict) else None
        return record_where(self.path, index, rid)

    def where(self, s: Sample) -> str:
        """Sample ``s``'s file and record, as every message names it (JSONL: its 1-based line)."""
        return record_where(self.sources[s.source].json, s.index, s.id if s.named else None)

    def _check(self, index: int, rec) -> tuple[list[tuple[str, str]], list[Path]] | None:
        """Returns (turns as (role, text), image paths) with placeholders normalised, or None (issue reported)."""
        where = self._where(index, rec)
        tok = self.image_token
        if not isinstance(rec, dict):
            self.issues("not_an_object", where, f"expected a JSON object, got {type(rec).__name__}")
            return None
        conv = rec.get("conversations")
        if not isinstance(conv, list) or not conv:
            got = (f"the record has no 'conversations'; its keys: {_keys(rec)}" if "conversations" not in rec else
                   "it is an empty list" if isinstance(conv, list) else f"it is {type(conv).__name__}, not a list")
            other = [k for k in ("messages", "conversation", "turns", "dialog") if k in rec]
            if "conversations" not in rec and other:
                got += (f"; LLaVA's format keeps the turns in 'conversations', where other chat formats have "
                        f"'{other[0]}': rename the key (and each turn's 'role' / 'content' to 'from' / 'value')")
            self.issues("no_conversations", where, f"'conversations' is missing, empty or not a list ({got})")
            return None
        turns = []
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
                got = (f"got {type(turn).__name__}" if not isinstance(turn, dict) else
                       f"it has no 'from'; its keys: {_keys(turn)}" if "from" not in turn else
                       f"it has no 'value'; its keys: {_keys(turn)}" if "value" not in turn else
                       "its 'value' is null" if turn.get("value") is None else
                       f"its 'value' is {type(turn.get('value')).__name__}")
                if isinstance(turn, dict) and {"role", "content", "text"} & set(turn):
                    got += ("; LLaVA's format names the speaker 'from' ('human' or 'gpt') and the text 'value', "
                            "where other chat formats have 'role' and 'content': rename the keys")
                self.issues("bad_turn", where, f"turn {t} must be an object with 'from' and a string 'value' ({got})")
                return None
            role = turn["from"]
            if role not in (HUMAN, GPT):
                hint = ""
                if str(role).lower() == "system":
                    hint = (" (a system turn is not read: the chat template has no system prompt; drop the turn or "
                            "fold its text into the first human turn)")
                elif str(role).lower() in ("user", "assistant", "human", "gpt", "model", "bot"):
                    hint = (" (LLaVA's format names the user's turns 'human' and the model's 'gpt', in lower case: "
                            "rename the roles)")
                self.issues("bad_role", where, f"turn {t} has role {role!r}; expected 'human' or 'gpt'{hint}")
                return None
            turns.append((role, turn["value"]))
        for t, (role, _) in enumerate(turns):
            want = HUMAN if t % 2 == 0 else GPT
            if role != want:
                self.issues("bad_order", where, f"turn {t} is {role!r} where {want!r} was expected (turns must "
                                                f"alternate human, gpt, starting with human)")
                return None
        if len(turns) < 2:
            self.issues("no_assistant", where, "the conversation has no assistant ('gpt') turn")
            return None
        for t, (_, text) in enumerate(turns):
            bad = next((m for m in self.reserved if m in text), None)
            if bad is not None:
                self.issues("special_token", where, f"turn {t} holds {bad!r}, a control token of the chat format (the "
                                                    f"tokenizer reads it as one, not as text); remove or rewrite it")
                return None
        if len(turns) % 2:
            self.issues("bad_order", where, f"the last turn ({len(turns) - 1}) is a human turn with no answer")
            return None

        image = rec.get("image")
        if image is None and rec.get("images"):  # another format's key: read as text-only, its images were lost
            self.issues("bad_image_field", where, f"the record has 'images' ({rec['images']!r}) but no 'image': "
                                                  f"LLaVA's format reads 'image' (a path or a list of paths); "
                                                  f"rename the key")
            return None
        if image is None:
            images = []
        elif isinstance(image, str) and image:
            images = [image]
        elif isinstance(image, list) and image and all(isinstance(x, str) and x for x in image):
            images = list(image)
        else:
            self.issues("bad_image_field", where, f"'image' must be a path or a list of paths, got {image!r}")
            return None
        if tok != LLAVA_IMAGE_TOKEN and any(LLAVA_IMAGE_TOKEN in text for _, text in turns):
            # a model with another placeholder (model.image_token) would read LLaVA's as words, and a one-image
            # record would train with the image and the word "<image>" both in its question
            self.issues("placeholder_mismatch", where, f"holds {LLAVA_IMAGE_TOKEN} (LLaVA's placeholder) but the "
                                                       f"model's image placeholder (model.image_token) is {tok!r}: "
                                                       f"write {tok!r} in the data, or keep the model's "
                                                       f"{LLAVA_IMAGE_TOKEN}")
            return None
        counts = [text.count(tok) for _, text in turns]
        if any(c and role == GPT for c, (role, _) in zip(counts, turns)):
            self.issues("placeholder_mismatch", where, f"{tok} in an assistant turn")
            return None
        n_ph = sum(counts)
        if len(images) == 1 and n_ph <= 1:
            k = counts.index(1) if n_ph else 0
            # as LLaVA's preprocess_multimodal: the placeholder removed, the text stripped, its line breaks kept
            # (the question's "\nAnswer the question using a single word or phrase." as eval's prompt has it)
            turns[k] = (HUMAN, f"{tok}\n" + turns[k][1].replace(tok, "").strip())
        elif n_ph != len(images):
            self.issues("placeholder_mismatch", where, f"{n_ph} {tok} placeholder(s) but {len(images)} image(s)")
            return None
        paths = [self.image_folder / p for p in images]
        for p in paths:
            if not p.is_file():
                self.issues("missing_image", where, f"image {p} is a folder, not an image file" if p.is_dir() else
                            f"image file not found: {p}")
                return None
        return turns, paths

    # --------------------------------------------------------------------------------------- encoding

    def segments(self, turns: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
        """The templated conversation as (text, trained_on) pieces."""
        c = self.cfg
        pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
        hoist = self.image_token if self.image_position == "before_turn" else None
        return chat_segments(pairs, c.prompt_template, c.turn_end, c.turn_sep, hoist)

    def _build(self, records, source: int = 0) -> list[Sample]:
        r = self.report
        before = (r.truncated, r.truncated_tokens, r.truncated_answer_tokens, r.dropped_images)
        checked = []
        for index, rec in records:
            got = self._check(index, rec)
            if got is not None:
                checked.append((index, rec, *got))
        samples = []
        notes_before = Counter(r.notes)
        seen_ids, seen_records = {}, {}  # id -> first record index; content digest -> first record index
        for start in range(0, len(checked), _TOKENIZE_RECORDS):
            self._build_chunk(checked[start:start + _TOKENIZE_RECORDS], source, samples, seen_ids, seen_records)
        n, tokens, answers, images = (a - b for a, b in zip(
            (r.truncated, r.truncated_tokens, r.truncated_answer_tokens, r.dropped_images), before))
        if n:
            log.warning("%s: %d of %d samples truncated to data.max_length=%d (lost %d positions, %d answer tokens, "
                        "%d images)", self.path, n, len(checked), self.cfg.max_length, tokens, answers, images)
        noted = r.notes - notes_before
        if noted:
            log.warning("%s: kept but noted (data check lists them): %s", self.path,
                        ", ".join(f"{k}: {v}" for k, v in sorted(noted.items())))
        return samples

    def _build_chunk(self, checked: list, source: int, samples: list, seen_ids: dict, seen_records: dict) -> None:
        """Tokenise and append the samples of ``checked`` records, one batched tokenizer call for all their segments
        (fast, parallel in Rust); a chunk at a time, so the Python lists of ids the tokenizer returns exist for
        these records only, not for a whole corpus at once (the samples keep int32 arrays)."""
        all_segs = [self.segments(turns) for _, _, turns, _ in checked]
        ids_flat = self.tokenizer.encode_batch([text for segs in all_segs for text, _ in segs])
        ignored, k = array("i", [IGNORE_INDEX]), 0
        for (index, rec, turns, paths), segs in zip(checked, all_segs):
            input_ids, labels = array("i"), array("i")  # 4 bytes a token (a list of Python ints takes ~35)
            for (_, trained), ids in zip(segs, ids_flat[k:k + len(segs)]):
                input_ids.extend(ids)
                labels.extend(ids if trained else ignored * len(ids))
            k += len(segs)
            labels[0] = IGNORE_INDEX
            instructions = [_strip_placeholders(text, self.image_token)
                            for role, text in turns for _ in range(text.count(self.image_token))]
            rid = rec.get("id")  # (a record without one is named by its index, as before: the resume hashes hold it)
            s = self._truncate(index, rec, Sample(index, str(rec.get("id", index)), paths, instructions, input_ids,
                                                  labels, 0, source, named=rid is not None))
            if s is not None:
                samples.append(s)
                self._note(index, rec, turns, seen_ids, seen_records, source)

    def _note(self, index: int, rec: dict, turns, seen_ids: dict, seen_records: dict, source: int = 0) -> None:
        """Count the kept record's notes (:data:`NOTES`): an id or a content seen before in this file, an empty
        assistant turn."""
        where, unit = self._where(index, rec), ("line" if is_jsonl(self.path) else "record")
        first = lambda i: i + 1 if unit == "line" else i  # noqa: E731 (as _where numbers them)
        rid, here = rec.get("id"), (source, index)
        if rid is not None:
            key = json.dumps(rid, sort_keys=True, default=str)
            if key in seen_ids:
                self.report.note("duplicate_id", f"{where}: the id of {unit} {first(seen_ids[key])}", here)
            else:
                seen_ids[key] = index
        digest = hashlib.sha1(json.dumps([rec.get("conversations"), rec.get("image")], sort_keys=True,
                                         ensure_ascii=False).encode()).digest()
        if digest in seen_records:
            self.report.note("duplicate_record", f"{where}: the same conversation and images as {unit} "
                                                 f"{first(seen_records[digest])}", here)
        else:
            seen_records[digest] = index
        empty = [t for t, (role, text) in enumerate(turns) if role == GPT and not text.strip()]
        if empty:
            self.report.note("empty_answer", f"{where}: assistant turn {empty[0]} has no text (only its turn end "
                                             f"is learned)", here)

    def _truncate(self, index, rec, s: Sample) -> Sample | None:
        width = [self.N if t == self.image_token_id else 1 for t in s.input_ids]
        full = sum(width)
        self.report.longest = max(self.report.longest, full)  # before truncation (data check reports it)
        needed, n_images = full, len(s.images)
        lost = None  # (positions, answer tokens, images) cut off
        if full > self.cfg.max_length:
            used, keep = 0, 0
            for w in width:
                if used + w > self.cfg.max_length:
                    break  # also when w is an image's N: never cut inside its visual tokens
                used, keep = used + w, keep + 1
            n_img = sum(1 for t in s.input_ids[:keep] if t == self.image_token_id)
            lost = (full - used, sum(1 for x in s.labels[keep:] if x != IGNORE_INDEX), len(s.images) - n_img)
            s.input_ids, s.labels = s.input_ids[:keep], s.labels[:keep]
            s.images, s.instructions = s.images[:n_img], s.instructions[:n_img]
            full = used
        s.length = full
        if all(x == IGNORE_INDEX for x in s.labels):
            why = f"the sample needs {needed} positions"
            if n_images * self.N >= self.cfg.max_length:
                why += f"; its {n_images} image(s) alone take {n_images * self.N}"
            self.issues("too_long", self._where(index, rec),
                        f"no answer token within data.max_length={self.cfg.max_length} ({why})")
            return None
        if lost is not None:  # counted for the samples kept (a too_long one is counted under its own reason)
            self.report.truncated += 1
            self.report.truncated_tokens += lost[0]
            self.report.truncated_answer_tokens += lost[1]
            self.report.dropped_images += lost[2]
        self.report.longest_used = max(self.report.longest_used, full)
        return s

    # ----------------------------------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        return [s.length for s in self.samples]

    def fingerprint(self) -> str:
        """Hash of the kept samples' ids, lengths and first 64 tokens: what checkpoints before
        :meth:`content_hash` recorded (a resume from one of them is checked with it)."""
        h = hashlib.sha256()
        for s in self.samples:
            if s.source:  # (a one-file data set hashes as it did before data.sources existed)
                h.update(f"{s.source}/".encode())
            h.update(f"{s.index}:{s.id}:{s.length}:".encode())
            h.update(bytes(str(list(s.input_ids[:64])), "utf-8"))  # as the lists they were printed
        return h.hexdigest()[:16]

    def content_hash(self) -> str:
        """Hash of everything the kept samples train on, in order: source, index, id, every token, every label
        (which tokens are trained), each image's file name. A resumed run checks it sees the same data: an answer
        changed anywhere in a record changes it (:meth:`fingerprint` saw only the first 64 tokens). Computed once
        (the samples do not change after loading): ~2 s per 100k samples of 400 tokens on a CPU core."""
        key = (id(self.samples), len(self.samples))
        if getattr(self, "_content_hash", (None, None))[0] != key:
            h = hashlib.sha256()
            for s in self.samples:
                h.update(f"{s.source}:{s.index}:{s.id}:{len(s.input_ids)}:{len(s.images)}:".encode())
                h.update(array("q", s.input_ids).tobytes())
                h.update(array("q", s.labels).tobytes())
                h.update("\0".join(p.name for p in s.images).encode("utf-8", "surrogatepass"))
            self._content_hash = (key, h.hexdigest()[:32])
        return self._content_hash[1]

    def load_images(self, s: Sample) -> torch.Tensor:
        """(n_images, 3, H, W) for sample ``s``. A missing or unreadable image raises :class:`DataError` naming
        the file, the record and the image (reason ``missing_image`` / ``corrupt_image``); the caller applies
        ``on_error`` (:meth:`report_issue`), since this may run in a DataLoader worker."""
        if self.image_processor is None:
            raise RuntimeError("LlavaDataset was built without an image_processor")
        out = []
        for p in s.images:
            key = str(p)
            px = self._image_cache.get(key)
            if px is None:
                try:
                    px = preprocess_image(p, self.image_processor)
                except DataError as e:
                    err = DataError(f"{self.where(s)}: image {p}: {e}", e.reason)
                    err.record = (s.source, s.index)  # what report_issue counts once (survives a worker's pickling)
                    raise err from None
                nbytes = px.numel() * px.element_size()
                if nbytes <= self._image_cache_left:  # data.image_cache_mb: keep the first ones seen
                    self._image_cache[key] = px
                    self._image_cache_left -= nbytes
            out.append(px)
        if not out:
            return torch.zeros(0, 3, 1, 1)
        return torch.stack(out)

    def report_issue(self, err: DataError) -> tuple | None:
        """Apply on_error to an error raised while loading (raise it, or log and count it). A record is counted
        once, and no longer as used, however often it comes up again (later epochs, repeated rows, a resumed run:
        :meth:`failed_records` / :meth:`restore_skips`). Returns (record, reason, message) when it was counted now
        (what :meth:`count_skips_elsewhere` takes), else None."""
        where, _, message = str(err).partition(": image ")
        key = getattr(err, "record", None) or where
        if key in self._failed_loads:
            return None
        self.issues(err.reason, where, "image " + message, load_log)
        self._failed_loads.add(key)
        self.report.samples -= 1
        return key, err.reason, f"{where}: image {message}"

    def count_skips_elsewhere(self, skips) -> None:
        """Count the records another process skipped while training (what its :meth:`report_issue` returned), each
        once and not logged again: the report (and a checkpoint's :meth:`failed_records`) of every process of a
        distributed run then holds every process's skips, as one process's would."""
        for key, reason, text in skips:
            if key in self._failed_loads:
                continue
            self._failed_loads.add(key)
            self.issues.count(reason, text)
            self.report.samples -= 1

    def failed_records(self) -> list[list[int]]:
        """The records counted as skipped while training (their images failed to load), as [source, index]
        pairs: what a checkpoint keeps so that a resumed run counts each of them once, as an uninterrupted run
        does."""
        return sorted([int(k[0]), int(k[1])] for k in self._failed_loads if isinstance(k, tuple))

    def restore_skips(self, skipped: dict, failed_records=None) -> None:
        """Continue a run's skip counts from its checkpoint: the per-reason counts ``skipped`` replace this load's
        (they include its load-time skips, counted again just now), and the records of ``failed_records``
        (:meth:`failed_records`) are put back as already counted and no longer used, so that meeting one again
        counts nothing. None (a checkpoint of an earlier version, which did not keep them): the counts only."""
        self.report.skipped.clear()
        self.report.skipped.update({k: int(v) for k, v in skipped.items()})
        for source, index in failed_records or ():
            key = (int(source), int(index))
            if key not in self._failed_loads:
                self._failed_loads.add(key)
                self.report.samples -= 1


# -------------------------------------------------------------------------------------- order and batches

def plan_rows(lengths: Sequence[int], seed: int, epoch: int, packing: bool, max_length: int) -> list[list[int]]:
    """This epoch's rows (lists of sample positions): a seeded shuffle, then one sample per row (padding) or
    greedy sequential packing into rows of at most max_length positions. Pure function of its arguments."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    perm = torch.randperm(len(lengths), generator=g).tolist()
    if not packing:
        return [[i] for i in perm]
    rows, cur, used = [], [], 0
    for i in perm:
        if cur and used + lengths[i] > max_length:
            rows.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += lengths[i]
    if cur:
        rows.append(cur)
    return rows


def group_by_length(rows: list[list[int]], lengths, micro_batch_size: int, world_size: int) -> list[list]:
    """One step's rows (global batch) as each rank's micro-batches, rows of similar length together (the step's
    rows sorted longest first, cut into micro-batches, dealt to the ranks in turn): each micro-batch pads to a
    length close to its rows' own. The step's rows and so its objective (the mean over all of its answer tokens
    and images) do not change, only which micro-batch holds which row. ``[rank][micro-batch][row]``."""
    order = sorted(range(len(rows)), key=lambda j: (-sum(lengths[i] for i in rows[j]), j))
    mbs = [[rows[j] for j in order[k:k + micro_batch_size]] for k in range(0, len(order), micro_batch_size)]
    return [mbs[r::world_size] for r in range(world_size)]


def _as_tensor(tokens) -> torch.Tensor:
    """A sample's ``array("i")`` (or a list) as a tensor, the array without a copy."""
    return torch.frombuffer(tokens, dtype=torch.int32) if isinstance(tokens, array) and len(tokens) else \
        torch.tensor(list(tokens), dtype=torch.long)


def collate(rows: Sequence[Sequence[tuple[Sample, torch.Tensor | None]]], pad_token_id: int, packing: bool,
            num_image_tokens: int) -> dict:
    """Rows of (sample, its images) -> a batch for ``EmmaMamba.forward`` plus bookkeeping.

    Keys: input_ids, labels (b, l) right-padded (pad id / -100); seq_idx (b, l) int32 when packing (sample k of
    a row has index k, the padding tail k+1); pixel_values (n_img, 3, H, W) or None; image_counts per row;
    instructions per image; sample_ids per row; segments per row [(sample id, start, end)] in input positions;
    num_samples, num_tokens (real LM positions, visual included), num_positions (b x expanded length),
    num_label_tokens (targets the LM loss averages over), num_images.
    """
    rows = [r for r in rows if r]
    if not rows:
        raise ValueError("collate: no samples")
    L = max(sum(len(s.input_ids) for s, _ in r) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, L), pad_token_id, dtype=torch.long)
    labels = torch.full((b, L), IGNORE_INDEX, dtype=torch.long)
    seq_idx = torch.zeros((b, L), dtype=torch.int32) if packing else None
    pixels, counts, instructions, ids, segments = [], [], [], [], []
    expanded = []
    for r, row in enumerate(rows):
        pos, segs, n_img = 0, [], 0
        for k, (s, px) in enumerate(row):
            n = len(s.input_ids)
            input_ids[r, pos:pos + n] = _as_tensor(s.input_ids)
            labels[r, pos:pos + n] = _as_tensor(s.labels)
            labels[r, pos] = IGNORE_INDEX  # nothing in this row may predict a sample's first token
            if seq_idx is not None:
                seq_idx[r, pos:pos + n] = k
            segs.append((s.id, pos, pos + n))
            if px is not None and px.shape[0]:
                pixels.append(px)
            n_img += len(s.images)
            instructions.extend(s.instructions)
            pos += n
        if seq_idx is not None:
            seq_idx[r, pos:] = len(row)
        counts.append(n_img)
        ids.append(",".join(s.id for s, _ in row))
        segments.append(segs)
        expanded.append(pos + n_img * (num_image_tokens - 1))
    num_images = sum(counts)
    return {
        "input_ids": input_ids, "labels": labels, "seq_idx": seq_idx,
        "pixel_values": torch.cat(pixels) if pixels else None,
        "image_counts": counts, "instructions": instructions, "sample_ids": ids, "segments": segments,
        "num_samples": sum(len(r) for r in rows), "num_tokens": sum(expanded), "num_positions": b * max(expanded),
        "num_label_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()), "num_images": num_images,
    }


def steps_per_epoch(num_rows: int, rows_per_step: int) -> int:
    return math.ceil(num_rows / rows_per_step)
