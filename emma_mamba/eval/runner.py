"""The evaluation runner: answer a benchmark's standard question files with an EmmaMamba model, then score.

Reads each benchmark's own question files (the same formats :mod:`emma_mamba.eval.scorers` reads); the image of
a question is resolved under ``images`` as given after the arrow:

* pope: POPE JSONL ``{question_id, image, text, label}`` -> ``image`` (LLaVA-1.5's ``llava_pope_test.jsonl``,
  ``{question_id, image, text, category}``, has no labels: answered, not scored);
* vqav2: VQAv2 questions JSON ``{"questions": [{question_id, image_id, question}]}`` -> ``image`` if present,
  else ``image_template`` filled with ``image_id``; or LLaVA-1.5's ``llava_vqav2_mscoco_test-dev2015.jsonl``
  ``{question_id, image, text}`` -> ``image`` (vqav2, gqa and vizwiz: a ``.jsonl`` file is LLaVA's; its ``text``
  already ends in the short-answer instruction and is asked verbatim);
* gqa: GQA questions JSON ``{qid: {imageId, question, answer}}`` -> ``image`` if present, else ``<imageId>.jpg``;
  or LLaVA-1.5's ``llava_gqa_testdev_balanced.jsonl`` (no answers: score with ``--annotations`` the GQA JSON);
* textvqa: TextVQA_0.5.1_val.json ``{"data": [{question_id, image_id, question, answers}]}`` or LLaVA's JSONL
  ``{question_id, image, text}`` -> ``image`` if present, else ``<image_id>.jpg``; with ``ocr`` (the official
  JSON only), an OCR file (``TextVQA_Rosetta_OCR_v0.2_val.json``) whose tokens of each question's image are added
  to the question as LLaVA's JSONL has them (:func:`emma_mamba.eval.vqa.textvqa_with_ocr`);
* vizwiz: VizWiz val.json / test.json ``[{image, question, answers?}]`` (the image name is the question id)
  -> ``image``; or LLaVA-1.5's ``llava_test.jsonl`` ``{question_id, image, text}`` (the image name again);
* seed: SEED-Bench.json ``{"questions": [{question_id, question, choice_a..d, answer, data_id, data_type}]}``,
  image questions only -> ``data_id``;
* scienceqa: ScienceQA problems.json, the image problems of ``split`` (default test) -> ``<split>/<pid>/<image>``
  or ``<pid>/<image>``;
* mmbench: MMBench TSV (``index, question, hint, A..D, answer, category, l2-category, image``), one question
  per circular round with id ``"<index>/<round>"`` -> the base64 image in the file (``images`` unused); MMBench-CN
  (``lang``, :func:`emma_mamba.eval.mmbench.mmbench_lang`) asked with LLaVA's Chinese instruction;
* vsr: VSR's ``test.jsonl`` ``{image, caption, label}`` (question id: the record's 0-based index) -> ``image``,
  ``train2017/<image>`` or ``val2017/<image>``;
* ai2d: AI2D's ``questions/`` folder (``split`` test by ``ai2d_test_ids.csv``, train or all) -> ``imageName``;
* refcoco: the refer release's ``refs(unc).p`` / ``refs(umd).p`` with ``instances.json`` beside it (``split`` val,
  testA, testB or test), or JSON records ``{image, sentence, bbox}`` (:mod:`emma_mamba.eval.refcoco`) -> the COCO
  file name;
* ocidref: OCID-Ref's ``{split}_expressions.json`` ``{id: {scene_path, sentence, bbox, take_id}}`` -> ``scene_path``
  under the OCID root (scored by Acc@0.25 IoU per clutter level, :mod:`emma_mamba.eval.refcoco`);
* tallyqa: TallyQA's ``test.json`` ``[{question_id, image, question, answer, issimple}]`` -> ``image``;
* mme: folder of ``<category>.txt`` (``image<TAB>question<TAB>answer``) or one such file -> ``<name>``,
  ``<category>/<name>`` or ``<category>/images/<name>``;
* prompts: any prompts about images, LLaVA's question JSONL (or a JSON list) ``{question_id (or id), image,
  text (or prompt)}`` -> ``image``: answered with the prompt verbatim, not scored (batch captioning or
  questioning of a folder of images, with the runner's batching, resumption and ``--api``).

and writes, under ``out_dir``:

* ``answers.jsonl`` (every task but mme): one LLaVA ``model_vqa_loader``-style record per question,
  ``{"question_id", "image", "prompt", "text"}``, which every scorer reads (POPE reads ``text``, VQAv2
  ``question_id``/``text``, GQA ``question_id``/``text``); for vqav2, gqa, textvqa and vizwiz also the official
  results list ``results.json`` (``[{"question_id", "answer"}]``, ``[{"questionId", "prediction"}]``,
  ``[{"question_id", "answer"}]``, and VizWiz's submission format ``[{"image", "answer"}]``) once all are done,
  its replies as LLaVA-1.5's submission scripts upload them: VQAv2's and VizWiz's after the EvalAI answer processor
  (:func:`~emma_mamba.eval.vqa.normalize_textvqa`), GQA's lower-cased without a final period (the official GQA
  script compares strings as they are), TextVQA's as given; the scores in ``metrics.json`` are of the same strings;
* ``mme/<category>.txt`` (mme): the template lines with the model's reply appended as a 4th column (MME's
  eval_tool format);
* ``metrics.json``: ``{"task", "checkpoint", "questions", "n_answered", "metrics", ...}`` from
  :func:`emma_mamba.eval.scorers.score`, when the ground truth is available (POPE labels, the VQAv2
  annotations file, GQA answers, TextVQA/VizWiz/SEED/MMBench answers in their files, MME templates);
* ``mmbench_submission.xlsx`` and its ``.tsv`` twin (mmbench, once every question is answered, test or dev split):
  the file MMBench's evaluation server scores (:func:`emma_mamba.eval.mmbench.write_run_submission`).

Notable choices:

* Prompts follow the training data: the LLaVA-1.5 short-answer instruction (``SHORT_ANSWER_PROMPT``, "Answer
  the question using a single word or phrase.") is appended on its own line for VQAv2, GQA and POPE, as
  LLaVA-1.5's evaluation files do and as ShapesWorld's stage-2 conversations do (for TextVQA and VizWiz too;
  VizWiz first adds LLaVA-1.5's ``UNANSWERABLE_PROMPT``, "When the provided information is insufficient,
  respond with 'Unanswerable'."); MME questions as LLaVA-1.5's ``llava_mme.jsonl`` asks them: their closing
  "Please answer yes or no." replaced by the short-answer instruction on its own line. MMBench: hint, question
  and lettered options, then "Answer with the option's letter from the given choices directly." (LLaVA-1.5's;
  for MMBench-CN its Chinese "请直接回答选项字母。");
  SEED-Bench likewise, without the hint; ScienceQA with its context as "Context: ..." first. A LLaVA-JSONL
  TextVQA question whose ``text`` already ends in the short-answer instruction (with its OCR reference tokens)
  is used verbatim. Instruction fusion sees the same prompt text.
* vsr, tallyqa and ai2d are closed-set (:mod:`emma_mamba.eval.closed`): no reply is generated; each option's
  likelihood as the reply (:meth:`EmmaMamba.option_probabilities`, one prefill per question) picks the answer,
  and ``answers.jsonl`` also holds the options' ``probabilities`` (Prismatic's way of running them). With
  ``likelihood=True`` (``eval --likelihood``) the other closed-set benchmarks are answered the same way: POPE
  and MME among "Yes" / "No" (each summed over both cases), MMBench, SEED-Bench and ScienceQA among their
  option letters (the scorers read the picked option as the reply; no reply goes unparsed).
* Greedy decoding, continuously batched (``batching="continuous"``, the default): up to ``batch_size`` replies
  decode together, one recurrent step per token, in one :class:`~emma_mamba.inference.batching.BatchDecoder`
  (``serve``'s); when replies end their rows go to the next questions (once half the rows are free, so that
  their images and prompts are encoded and prefilled together), so one long reply never leaves the batch
  decoding a single row while the questions behind it wait. The replies are those each
  question gets from :meth:`EmmaMamba.generate` alone (up to a batched GEMM's rounding), written in question
  order. ``batching="static"``: fixed batches of ``batch_size`` questions, each prefilled together and decoded
  until its longest reply ends (:meth:`EmmaMamba.generate`; the runner before continuous batching).
* Several processes (``eval`` under ``torchrun``, one per GPU): with ``shard=(rank, world)`` a process answers
  the questions whose index is ``rank`` modulo ``world`` into ``answers.shard<rank>.jsonl`` and scores nothing;
  :func:`merge_shards` then gathers the shards into ``answers.jsonl`` and an unsharded call scores it (MME's
  per-category files are answered by rank 0 alone).
* Crash-safe and resumable: answers are appended and flushed after every batch; a rerun with the same
  ``out_dir`` skips the questions already answered (a torn last line from a crash is dropped) and scores the
  union. ``--limit N`` answers the first N questions only and scores them with ``allow_missing``; MME's
  categories are scored as answered, but where N leaves categories out or cuts one short its perception,
  cognition and total are None and ``partial`` names what was answered (``emma-mamba score --task mme`` refuses
  such answers against the templates: those sums are not MME's totals).
* A folder continues only the run that began it: ``eval_run.json`` records what determines the answers (the
  task, the questions and images, split / image template / box frame / MMBench language / TextVQA OCR file where
  they apply, likelihood or
  generation, ``max_new_tokens``, and the model: a checkpoint's resolved path with the size and a hash of the
  ends of its config, tokenizer and weight files, or an ``--api`` endpoint's URL and model name), and a rerun whose
  record differs in any of them is refused with the field and both values, before anything is answered (else another
  checkpoint's answers would be scored as this one's). A folder written before these fields were recorded
  continues with a warning that its answers cannot be verified.
* Images are decoded as training and ``serve`` decode them (:func:`emma_mamba.models.vision.load_image`: EXIF
  rotation, transparency on white, 16-bit rescaled). Before the first answer every image still to be answered
  is opened and checked (:func:`check_images`: a PNG's chunks and checksums, a JPEG decoded at 1/8 scale, any
  other format decoded), so a missing, corrupt or truncated file is an error naming the question and the file
  rather than a crash hours into the run.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from emma_mamba.eval._io import ScoreInputError, load_json, load_records, require
from emma_mamba.eval.closed import (TALLY_OPTIONS, VSR_OPTIONS, ai2d_prompt, ai2d_records, spellings, tallyqa_prompt,
                                    tallyqa_records, vsr_prompt, vsr_records)
from emma_mamba.eval.gqa import normalize_gqa
from emma_mamba.eval.mmbench import (LETTERS, MC_PROMPT, MC_PROMPT_CN, mmbench_lang, mmbench_prompt, read_mmbench,
                                     round_id, write_run_submission)
from emma_mamba.eval.refcoco import FRAMES, ocidref_records, refcoco_prompt, refcoco_records
from emma_mamba.eval.scienceqa import scienceqa_image, scienceqa_problems, scienceqa_prompt
from emma_mamba.eval.seed import seed_prompt, seed_questions
from emma_mamba.eval.vqa import (OCR_REFERENCE, normalize_textvqa, textvqa_ocr_tokens, textvqa_records,
                                 textvqa_with_ocr, vizwiz_records)
from emma_mamba.fileio import is_jsonl, text_lines

__all__ = ["TASKS", "Question", "read_questions", "evaluate", "merge_shards", "with_shard_counts",
           "default_annotations", "model_identity", "run_record", "check_run_record", "check_images", "limit_questions",
           "SHORT_ANSWER_PROMPT", "UNANSWERABLE_PROMPT", "TASK_SETTINGS", "LikelihoodUnavailable"]

log = logging.getLogger(__name__)

TASKS = ("pope", "vqav2", "gqa", "textvqa", "vizwiz", "mmbench", "seed", "scienceqa", "vsr", "tallyqa", "ai2d",
         "refcoco", "ocidref", "mme", "prompts")
DEFAULT_SPLITS = {"scienceqa": "test", "ai2d": "test", "refcoco": "val"}
"""The split answered when none is given (the other benchmarks' files hold one split)."""
DEFAULT_IMAGE_TEMPLATE = "COCO_val2014_{image_id:012d}.jpg"
"""VQAv2's image file name from a question's ``image_id`` (when its record has no ``image``)."""
TASK_SETTINGS = {"split": tuple(DEFAULT_SPLITS), "image_template": ("vqav2",), "box_frame": ("refcoco", "ocidref"),
                 "lang": ("mmbench",), "ocr": ("textvqa",)}
"""The settings that only some tasks read -> those tasks (``eval`` refuses one given for another task, and with
``--suite``, where each benchmark's entry gives its own)."""
DEFAULT_MAX_NEW_TOKENS = {"refcoco": 32, "ocidref": 32}
"""The longest reply when none is given: 16 tokens, a box "[0.12, 0.34, 0.56, 0.78]" needs about 20."""
CLOSED_SET = {"vsr": VSR_OPTIONS, "tallyqa": TALLY_OPTIONS}
"""Tasks always answered by the options' likelihood (:mod:`emma_mamba.eval.closed`) -> their options."""
LIKELIHOOD_TASKS = ("pope", "mme", "mmbench", "seed", "scienceqa", "vsr", "tallyqa", "ai2d")
"""Tasks that can be answered by their options' likelihood (``likelihood=True``); the others are open-ended."""
YES_NO = ("Yes", "No")
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
"""LLaVA-1.5's short-answer instruction (the same string as emma_mamba.data.shapes.SHORT_ANSWER_PROMPT)."""
UNANSWERABLE_PROMPT = "When the provided information is insufficient, respond with 'Unanswerable'."
"""LLaVA-1.5's VizWiz instruction, before the short-answer one."""
MME_PERCEPTION_DIRS = ("", "{category}", "{category}/images")
_MME_YES_NO = re.compile(r"\s*Please answer yes or no\.\s*$")
"""The instruction MME's questions end with (after one space, or two in some of its files)."""
BATCHING = ("continuous", "static")
"""How generated replies are batched (``evaluate``'s ``batching``; module docstring)."""
_BATCHES_AHEAD = 4
"""Continuous batching: batches of questions submitted to the decoder beyond the oldest one not yet written,
so that rows freed while a long reply holds up the oldest batch are taken by the questions behind it."""


@dataclass
class Question:
    qid: object
    """The benchmark's question id (int for POPE/VQAv2, str for GQA; for MME the line index in its file; for
    MMBench "<index>/<round>")."""
    image: Path | None
    """Resolved image file (None when the file carries the image: MMBench)."""
    text: str
    """The question as the benchmark gives it (before the short-answer instruction)."""
    category: str | None = None
    """MME category (its file stem); None elsewhere."""
    line: str | None = None
    """MME: the template line (3 columns) the answer is appended to."""
    image_bytes: bytes | None = None
    """MMBench: the encoded picture from the file."""
    has_answer: bool = False
    """Whether a question file that may carry its own ground truth (POPE, TextVQA, VizWiz, SEED, MMBench, VSR,
    TallyQA) holds this question's answer (a test split, or LLaVA's POPE file without labels, does not)."""
    options: tuple[str, ...] | None = None
    """The replies to score by likelihood instead of generating one (closed-set answering), or None."""
    lang: str = "en"
    """The language of the instruction after the question: "cn" for MMBench-CN (LLaVA's Chinese one)."""


# ---------------------------------------------------------------------------------------- reading

def _image(images: Path, name: str, where: str) -> Path:
    if not isinstance(name, str) or not name:
        raise ScoreInputError(f"{where}: the image must be a file name, got {name!r}")
    p = images / name
    if not p.is_file():
        raise ScoreInputError(f"{where}: image {name!r} not found under --images {images}")
    return p


def read_questions(task: str, questions: str | Path, images: str | Path | None,
                   image_template: str = DEFAULT_IMAGE_TEMPLATE, split: str | None = None,
                   likelihood: bool = False, *, lang: str = "auto", ocr: str | Path | None = None) -> list[Question]:
    """The questions of a benchmark file in file order, each with its image resolved and checked, and with
    ``likelihood`` (or on an always closed-set task) the options to score. ``lang`` (MMBench): the language the
    questions are asked in (:func:`emma_mamba.eval.mmbench.mmbench_lang`); ``ocr`` (TextVQA): the OCR file whose
    tokens are added to each question (module docstring)."""
    if task not in TASKS:
        raise ScoreInputError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if likelihood and task not in LIKELIHOOD_TASKS:
        raise ScoreInputError(f"task {task} is open-ended: answering by likelihood (--likelihood) applies to "
                              f"{', '.join(LIKELIHOOD_TASKS)}")
    out = _read_questions(task, questions, images, image_template, split or DEFAULT_SPLITS.get(task), lang, ocr)
    if task in CLOSED_SET:
        return [dataclasses.replace(q, options=CLOSED_SET[task]) for q in out]
    if likelihood or task == "ai2d":  # AI2D: always by its letters' likelihood (as Prismatic)
        return [dataclasses.replace(q, options=YES_NO if task in ("pope", "mme") else _letters(task, q.text))
                for q in out]
    return out


def _letters(task: str, prompt: str) -> tuple[str, ...]:
    """A multiple-choice question's option letters, counted from its prompt's "X. ..." lines."""
    shown = [ln[0] for ln in prompt.splitlines() if len(ln) > 2 and ln[1:3] == ". " and ln[0] in LETTERS]
    n = 0
    while n < len(LETTERS) and LETTERS[n] in shown:
        n += 1
    if n < 2:
        raise ScoreInputError(f"{task}: no lettered options found in the prompt {prompt!r}")
    return tuple(LETTERS[:n])


def _read_questions(task, questions, images, image_template, split, lang, ocr) -> list[Question]:
    qpath = Path(questions)
    out: list[Question] = []
    if task == "mmbench":  # images inside the file
        items = read_mmbench(qpath)
        asked_in = mmbench_lang(items, lang)
        if lang == "auto" and asked_in == "cn":
            log.info("%s: Chinese questions (MMBench-CN): asked with LLaVA's MMBench-CN instruction %r (--lang en: "
                     "the English one)", qpath, MC_PROMPT_CN)
        for it in items:
            for r in range(len(it.options)):
                out.append(Question(round_id(it.index, r), None, mmbench_prompt(it, r), category=it.category,
                                    image_bytes=it.image, has_answer=it.answer is not None, lang=asked_in))
        return out
    if images is None or not Path(images).is_dir():
        raise ScoreInputError(f"--images {images} is not a directory")
    images = Path(images)
    if task == "pope":
        for loc, rec in load_records(qpath, "POPE question"):
            where = f"{qpath}: {loc}"
            out.append(Question(require(rec, ("question_id",), qpath, loc, "POPE question"),
                                _image(images, require(rec, ("image",), qpath, loc, "POPE question"), where),
                                require(rec, ("text",), qpath, loc, "POPE question"), has_answer="label" in rec))
    elif task in ("vqav2", "gqa", "vizwiz") and is_jsonl(qpath):  # LLaVA-1.5's question files
        for loc, rec in load_records(qpath, f"{task} question"):
            name = require(rec, ("image",), qpath, loc, f"{task} question")
            qid = require(rec, ("question_id",), qpath, loc, f"{task} question")
            # GQA ids are compared as strings; VizWiz answers are keyed by the image name (its results format)
            qid = str(qid) if task == "gqa" else name if task == "vizwiz" else qid
            out.append(Question(qid, _image(images, name, f"{qpath}: {loc}"),
                                require(rec, ("text",), qpath, loc, f"{task} question")))
    elif task == "vqav2":
        doc = load_json(qpath, "VQAv2 questions")
        if not isinstance(doc, dict) or not isinstance(doc.get("questions"), list):
            raise ScoreInputError(f"{qpath}: expected a JSON object with a 'questions' list (the VQAv2 questions "
                                  f"file, e.g. v2_OpenEnded_mscoco_val2014_questions.json)")
        for i, rec in enumerate(doc["questions"]):
            loc = f"questions[{i}]"
            if not isinstance(rec, dict):
                raise ScoreInputError(f"{qpath}: {loc}: expected a JSON object")
            qid = require(rec, ("question_id",), qpath, loc, "VQAv2 question")
            if "image" in rec:
                name = rec["image"]
            else:
                image_id = require(rec, ("image_id",), qpath, loc, "VQAv2 question")
                try:
                    name = image_template.format(image_id=image_id)
                except (KeyError, ValueError, IndexError) as e:
                    raise ScoreInputError(f"--image-template {image_template!r}: cannot format image_id "
                                          f"{image_id!r} ({e})") from None
            out.append(Question(qid, _image(images, name, f"{qpath}: {loc}"),
                                require(rec, ("question",), qpath, loc, "VQAv2 question")))
    elif task == "gqa":
        doc = load_json(qpath, "GQA questions")
        if not isinstance(doc, dict) or not doc:
            raise ScoreInputError(f"{qpath}: expected a non-empty JSON object mapping question id -> question "
                                  f"(GQA's *_questions.json)")
        for qid, rec in doc.items():
            loc = f"question {qid!r}"
            if not isinstance(rec, dict):
                raise ScoreInputError(f"{qpath}: {loc}: expected a JSON object")
            name = rec["image"] if "image" in rec else \
                f"{require(rec, ('imageId',), qpath, loc, 'GQA question')}.jpg"
            out.append(Question(str(qid), _image(images, name, f"{qpath}: {loc}"),
                                require(rec, ("question",), qpath, loc, "GQA question")))
    elif task == "textvqa":
        tokens = textvqa_ocr_tokens(ocr) if ocr is not None else None
        seen_ids: dict = {}
        for loc, rec in textvqa_records(qpath):
            qid = require(rec, ("question_id",), qpath, loc, "TextVQA question")
            if "image_id" not in rec:  # LLaVA's JSONL: its question_id is the image's, shared by the image's
                # questions; the k-th repeat is "<id>#k" (answers are keyed by id: one would replace the other)
                k = seen_ids[qid] = seen_ids.get(qid, 0) + 1
                qid = qid if k == 1 else f"{qid}#{k}"
            name = rec["image"] if "image" in rec else \
                f"{require(rec, ('image_id',), qpath, loc, 'TextVQA question')}.jpg"
            text = require(rec, ("question", "text"), qpath, loc, "TextVQA question")
            if tokens is not None:
                text = _with_ocr(text, rec, tokens, qpath, loc, ocr)
            out.append(Question(qid, _image(images, name, f"{qpath}: {loc}"), text, has_answer="answers" in rec))
    elif task == "scienceqa":
        for pid, rec in scienceqa_problems(qpath, split).items():
            p = scienceqa_image(images, pid, rec)
            if p is None:
                raise ScoreInputError(f"{qpath}: problem {pid!r}: image {rec['image']!r} not found under --images "
                                      f"{images} (tried {rec.get('split')}/{pid}/ and {pid}/)")
            out.append(Question(pid, p, scienceqa_prompt(rec)))
    elif task == "seed":
        for loc, rec in seed_questions(qpath)[0]:
            out.append(Question(str(rec["question_id"]), _image(images, str(rec["data_id"]), f"{qpath}: {loc}"),
                                seed_prompt(rec), has_answer="answer" in rec))
    elif task == "prompts":
        seen: set = set()
        for loc, rec in load_records(qpath, "prompt"):
            qid = require(rec, ("question_id", "id"), qpath, loc, "prompt")
            if qid in seen:
                raise ScoreInputError(f"{qpath}: {loc}: question id {qid!r} appears twice (answers are keyed by it)")
            seen.add(qid)
            name = require(rec, ("image",), qpath, loc, "prompt")
            out.append(Question(qid, _image(images, name, f"{qpath}: {loc}"),
                                require(rec, ("text", "prompt"), qpath, loc, "prompt")))
    elif task == "vsr":
        for i, (loc, rec) in enumerate(vsr_records(qpath)):
            name = rec["image"]
            for sub in ("", "train2017", "val2017"):  # VSR names COCO 2017 images without their split
                if (images / sub / name).is_file():
                    break
            else:
                raise ScoreInputError(f"{qpath}: {loc}: image {name!r} not found under --images {images} (tried "
                                      f"., train2017/ and val2017/)")
            out.append(Question(i, images / sub / name, rec["caption"], has_answer="label" in rec))
    elif task == "ai2d":
        for loc, rec in ai2d_records(qpath, split):
            out.append(Question(rec["question_id"], _image(images, rec["image"], f"{qpath}: {loc}"), ai2d_prompt(rec),
                                has_answer=rec["answer"] is not None))
    elif task in ("refcoco", "ocidref"):
        for loc, rec in (refcoco_records(qpath, split) if task == "refcoco" else ocidref_records(qpath)):
            out.append(Question(rec["question_id"], _image(images, rec["image"], f"{qpath}: {loc}"), rec["sentence"],
                                has_answer=True))
    elif task == "tallyqa":
        for loc, rec in tallyqa_records(qpath):
            out.append(Question(rec["question_id"], _image(images, rec["image"], f"{qpath}: {loc}"), rec["question"],
                                has_answer="answer" in rec))
    elif task == "vizwiz":
        for loc, rec in vizwiz_records(qpath):
            name = require(rec, ("image",), qpath, loc, "VizWiz question")
            out.append(Question(name, _image(images, name, f"{qpath}: {loc}"),
                                require(rec, ("question",), qpath, loc, "VizWiz question"),
                                has_answer="answers" in rec))
    else:  # mme
        if qpath.is_dir():
            files = sorted(qpath.glob("*.txt"))
            if not files:
                raise ScoreInputError(f"MME questions directory {qpath} holds no <category>.txt files")
        elif qpath.is_file():
            files = [qpath]
        else:
            raise ScoreInputError(f"MME questions {qpath} does not exist")
        for f in files:
            cat = f.stem
            for n, line in enumerate(text_lines(f.read_text(encoding="utf-8")), 1):
                if not line.strip():
                    continue
                cols = line.split("\t")
                if len(cols) != 3:
                    raise ScoreInputError(f"{f}: line {n}: expected 3 tab-separated columns (image, question, "
                                          f"ground truth), got {len(cols)}")
                for sub in MME_PERCEPTION_DIRS:
                    p = images / sub.format(category=cat) / cols[0]
                    if p.is_file():
                        break
                else:
                    raise ScoreInputError(f"{f}: line {n}: image {cols[0]!r} not found under --images {images} "
                                          f"(tried {', '.join(s.format(category=cat) or '.' for s in MME_PERCEPTION_DIRS)})")
                out.append(Question(n, p, cols[1], category=cat, line=line))
    if not out:
        raise ScoreInputError(f"{qpath}: no questions")
    bad = next((q for q in out if not isinstance(q.text, str) or not q.text.strip()), None)
    if bad is not None:  # a null or a number: it failed mid-run, in its batch, as a traceback
        raise ScoreInputError(f"{qpath}: question {bad.qid!r}: the question must be non-empty text, got {bad.text!r}")
    return out


def _with_ocr(text, rec: dict, tokens: dict, qpath: Path, loc: str, ocr) -> str:
    """A TextVQA question with its image's tokens of the OCR file ``ocr`` (``tokens``: image_id -> tokens)."""
    if not isinstance(text, str):
        raise ScoreInputError(f"{qpath}: {loc}: the question must be a string, got {text!r}")
    if OCR_REFERENCE in text:
        raise ScoreInputError(f"{qpath}: {loc}: the question already holds its OCR tokens ({OCR_REFERENCE!r}: "
                              f"LLaVA's question file); --ocr {ocr} would add them twice: drop --ocr")
    if "image_id" not in rec:
        raise ScoreInputError(f"{qpath}: {loc}: the question has no 'image_id', which --ocr {ocr} needs to find its "
                              f"image's OCR tokens: --ocr goes with the official TextVQA_0.5.1_val.json (LLaVA's "
                              f"TextVQA JSONL carries its OCR tokens in the prompt already: drop --ocr)")
    image_id = rec["image_id"]
    if image_id not in tokens:
        raise ScoreInputError(f"{qpath}: {loc}: image_id {image_id!r} is not in the OCR file {ocr} (the OCR file "
                              f"of another split?)")
    return textvqa_with_ocr(text, tokens[image_id])


def prompt_for(task: str, text: str, lang: str = "en") -> str:
    """The user prompt sent to the model for a question (see the module docstring); ``lang`` "cn": an MMBench-CN
    question (:attr:`Question.lang`)."""
    if task == "mmbench" and lang == "cn":
        return f"{text}\n{MC_PROMPT_CN}"
    if task in ("mmbench", "seed", "scienceqa", "ai2d"):
        return f"{text}\n{MC_PROMPT}"
    if task == "vsr":
        return vsr_prompt(text)
    if task == "tallyqa":
        return tallyqa_prompt(text)
    if task in ("refcoco", "ocidref"):
        return refcoco_prompt(text)
    if task == "mme":  # LLaVA-1.5's llava_mme.jsonl: "Please answer yes or no." becomes the short-answer line
        return f"{_MME_YES_NO.sub('', text)}\n{SHORT_ANSWER_PROMPT}"
    if task == "prompts" or text.rstrip().endswith(SHORT_ANSWER_PROMPT):
        return text
    if task == "vizwiz":
        return f"{text}\n{UNANSWERABLE_PROMPT}\n{SHORT_ANSWER_PROMPT}"
    return f"{text}\n{SHORT_ANSWER_PROMPT}"


def default_annotations(task: str, questions: str | Path, read: Sequence[Question]) -> Path | None:
    """Ground truth for scoring when none is given: the question file itself (GQA's JSON, the MME template
    folder, ScienceQA's problems.json; POPE, TextVQA, VizWiz, SEED-Bench and MMBench files when every question of
    ``read``, the file's questions as :func:`read_questions` gave them, has its answer there), or for VQAv2 the
    sibling file with 'questions' replaced by 'annotations' in its name, if present."""
    q = Path(questions)
    if task == "prompts":  # free prompts: nothing to score
        return None
    # ScienceQA: problems.json holds every split's answers; LLaVA's GQA JSONL holds none
    if task in ("gqa", "mme", "scienceqa", "refcoco", "ocidref"):
        return None if task == "gqa" and is_jsonl(q) else q
    if task in ("pope", "textvqa", "vizwiz", "seed", "mmbench", "vsr", "tallyqa", "ai2d"):  # LLaVA's POPE: no labels
        return q if all(x.has_answer for x in read) else None
    cand = q.with_name(q.name.replace("OpenEnded_", "").replace("questions", "annotations"))
    return cand if cand != q and cand.is_file() else None


# ---------------------------------------------------------------------------------------- the run record

RUN_FILE = "eval_run.json"
RUN_FORMAT = 2
"""Version of ``eval_run.json``; format 1 (no ``format`` key) held only ``task`` and ``answered_by``."""


def model_identity(checkpoint: str | os.PathLike | None = None, *, api: str | None = None,
                   api_model: str | None = None) -> dict | None:
    """What identifies the model that answers, for ``eval_run.json``: for a checkpoint directory its resolved
    path and, per file that determines its replies (config, tokenizer, ``model.safetensors`` or a sharded
    checkpoint's ``state/`` files), the size and a SHA-256 of its first and last MiB (:func:`_content_stamp`: a
    cheap fingerprint of the contents, read in milliseconds at any size: retraining or overwriting the weights
    changes it; reading, touching or restoring the same file from a copy does not); for an endpoint its URL and
    model name; None when unknown."""
    if api is not None:
        return {"api": str(api), "api_model": api_model}
    if checkpoint is None:
        return None
    d = Path(checkpoint)
    if not d.is_dir():  # a name only (library use): the best available identity
        return {"checkpoint": str(checkpoint)}
    from emma_mamba.models.vlm import CONFIG_NAME, WEIGHTS_NAME
    from emma_mamba.training.checkpoint import SHARDED_DIR

    files = [d / CONFIG_NAME, d / "tokenizer.json"]
    if (d / WEIGHTS_NAME).is_file():
        files.append(d / WEIGHTS_NAME)
    else:  # a sharded training checkpoint: every file of its state (as load reads it)
        files += sorted(p for p in (d / SHARDED_DIR).rglob("*") if p.is_file())
    stamps = {f.relative_to(d).as_posix(): _content_stamp(f) for f in files if f.is_file()}
    return {"checkpoint": str(d.resolve()), "files": stamps}


STAMP_BYTES = 1 << 20
"""Bytes hashed at each end of a file by :func:`_content_stamp` (the whole file when it is at most twice that)."""


def _content_stamp(f: Path) -> dict:
    """{size, sha256 of the file's first and last STAMP_BYTES} (16 hex digits). A weights file's ends hold its
    header (names, shapes, offsets) and its first and last tensors' values, which any training step changes."""
    import hashlib

    size = f.stat().st_size
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        if size <= 2 * STAMP_BYTES:
            h.update(fh.read())
        else:
            h.update(fh.read(STAMP_BYTES))
            fh.seek(-STAMP_BYTES, os.SEEK_END)
            h.update(fh.read())
    return {"size": size, "sha256_ends": h.hexdigest()[:16]}


def run_record(task: str, questions: str | Path, images: str | Path | None, *, answered_by: str,
               max_new_tokens: int, identity: dict | None, split: str | None = None,
               image_template: str | None = None, box_frame: str | None = None, lang: str = "en",
               ocr: str | Path | None = None) -> dict:
    """The ``eval_run.json`` of a run: everything that determines its answers (module docstring). Settings a
    task does not use are None, so changing them does not block a continuation. ``lang`` (MMBench, as asked:
    :func:`questions_lang`) and ``ocr`` (TextVQA) came later: a record without them is read with the values its
    run had (:func:`_added_fields`)."""
    return {"format": RUN_FORMAT, "task": task,
            "questions": str(Path(questions).resolve()),
            "images": None if images is None or task == "mmbench" else str(Path(images).resolve()),
            "split": (split or DEFAULT_SPLITS[task]) if task in DEFAULT_SPLITS else None,
            "image_template": image_template if task == "vqav2" else None,
            "answered_by": answered_by, "max_new_tokens": max_new_tokens,
            "box_frame": box_frame if task in ("refcoco", "ocidref") else None,
            "lang": lang if task == "mmbench" else None,
            "ocr": str(Path(ocr).resolve()) if task == "textvqa" and ocr is not None else None,
            "model": identity}


def _added_fields(task) -> dict:
    """The fields of ``eval_run.json`` added within its format 2, with the values a run before them had."""
    return {"lang": "en" if task == "mmbench" else None, "ocr": None}


def questions_lang(qs: Sequence[Question]) -> str:
    """The language ``qs`` are asked in (:attr:`Question.lang`: "cn" for MMBench-CN, else "en")."""
    return "cn" if any(q.lang == "cn" for q in qs) else "en"


def answered_by(qs: Sequence[Question]) -> str:
    """How a run answers ``qs``: "likelihood" (closed-set: the options' probabilities) or "generation"."""
    return "likelihood" if any(q.options for q in qs) else "generation"


class LikelihoodUnavailable(RuntimeError):
    """Raised by an ``answer_fn``'s ``option_probabilities`` when the options' probabilities cannot be had any more
    (``--api``: the endpoint refused or failed a request with log-probabilities): :func:`evaluate` answers the
    benchmark's remaining questions by parsed replies and records it (:func:`_likelihood_failed`)."""


FALLBACK_FILE = "likelihood_fallback.jsonl"
"""In an output folder: one line per time a likelihood run fell back to parsed replies (the error, the rank and
the questions left), kept across continuations; removed when a run starts afresh."""


def _likelihood_failed(out: Path, task: str, questions, err: Exception, rank: int, left: int) -> None:
    """Warn that the benchmark in ``out`` answers its ``left`` remaining questions by parsed replies because of
    ``err``, and record it in ``out/FALLBACK_FILE`` (read into metrics.json by :func:`_scored_from_replies`)."""
    log.warning("benchmark %s (%s, %s): the options' likelihood could not be had (%s); its %d remaining questions "
                "are answered by generated replies, parsed, instead (recorded in metrics.json: scored_from_replies)",
                out.name, task, questions, err, left)
    line = json.dumps({"error": str(err), "rank": rank, "questions_left": left}, ensure_ascii=False)
    with (out / FALLBACK_FILE).open("a", encoding="utf-8") as f:  # one short line: whole, also beside other ranks
        f.write(line + "\n")


def _scored_from_replies(out: Path, task: str, qs: Sequence[Question]) -> dict:
    """How many of a likelihood run's questions ``qs`` were scored from a parsed reply instead of their options'
    probabilities (the endpoint gave none for them, or failed: ``errors``, from ``out/FALLBACK_FILE``):
    ``{"n", "of", "errors"}``. ``n`` counts the answers without ``probabilities`` in answers.jsonl; for MME, whose
    answer files do not say, it is None (``errors`` tell how many questions were left at each fallback)."""
    errors = []
    path = out / FALLBACK_FILE
    if path.is_file():
        for line in text_lines(path.read_text(encoding="utf-8")):
            try:
                errors.append(json.loads(line))
            except json.JSONDecodeError:  # a torn line of an interrupted run: its message is lost, not the count
                errors.append({"error": line})
    n = None
    if task != "mme":
        done = _read_done_jsonl(out / "answers.jsonl")
        n = sum(1 for q in qs if q.qid in done and "probabilities" not in done[q.qid])
    return {"n": n, "of": len(qs), "errors": errors}


def _has_answers(out: Path) -> bool:
    """Whether ``out`` holds any answer (merged, a rank's shard, or an MME category file)."""
    files = [out / "answers.jsonl", *out.glob("answers.shard*.jsonl"), *(out / "mme").glob("*.txt")]
    return any(f.is_file() and f.stat().st_size > 0 for f in files)


def _first_difference(old, new, path: str = ""):
    """(dotted field name, old value, new value) of the first field where two records differ, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            name = f"{path}.{k}" if path and str(k).isidentifier() else f"{path}[{k!r}]" if path else str(k)
            d = _first_difference(old.get(k, "(not recorded)"), new.get(k, "(not recorded)"), name)
            if d is not None:
                return d
        return None
    return None if old == new else (path, old, new)


def check_run_record(out_dir: str | Path, record: dict) -> None:
    """Refuse to continue into ``out_dir`` when its ``eval_run.json`` records another run than ``record``
    (:class:`ScoreInputError` naming the folder, the field and both values); warn when it was written by an
    older version that recorded too little to tell. Checked before anything is answered or overwritten."""
    out = Path(out_dir)
    run_file = out / RUN_FILE
    if not run_file.is_file():
        if _has_answers(out):  # answers from before eval_run.json existed
            log.warning("%s: holds answers but no %s (written by an older emma-mamba): they cannot be verified to "
                        "come from this model and these settings; continuing as if they do (answer into another "
                        "--out to be sure)", out, RUN_FILE)
        return
    try:
        before = json.loads(run_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScoreInputError(f"{run_file}: not valid JSON ({e}); it records which run the answers in {out} "
                              f"belong to: delete {out} to start over, or answer into another --out") from None
    if not isinstance(before, dict):
        raise ScoreInputError(f"{run_file}: expected a JSON object; delete {out} to start over, or answer into "
                              f"another --out")
    legacy = "format" not in before
    # an older file recorded task and answered_by only: compare what it has, warn about the rest
    old = {k: before[k] for k in ("task", "answered_by") if k in before} if legacy else \
        {**_added_fields(before.get("task")), **before}
    new = {k: record[k] for k in old} if legacy else record
    if old.get("task") == new.get("task") and old.get("answered_by") not in (None, new.get("answered_by")):
        flag = "with" if old["answered_by"] == "likelihood" else "without"  # the message eval always gave
        raise ScoreInputError(f"{out}: its answers so far were {old['answered_by']}-based; continue {flag} "
                              f"--likelihood, or answer into another --out")
    diff = _first_difference(old, new)
    if diff is not None:
        field, was, now = diff
        hint = " (the checkpoint's weights or config changed since, or it is another one)" \
            if field.startswith("model") else ""
        raise ScoreInputError(
            f"{out}: its answers so far were given with {field} = {json.dumps(was)}, but this run has "
            f"{field} = {json.dumps(now)}{hint}; continuing would mix the two runs' answers (or report the old "
            f"ones as this run's). Answer into another --out, or delete {out} to start over")
    if legacy and _has_answers(out):
        log.warning("%s: %s was written by an older emma-mamba that did not record the model and the settings; "
                    "the answers there cannot be verified to come from this model with these settings; "
                    "continuing as if they do (answer into another --out to be sure)", out, RUN_FILE)


def _write_run_record(out: Path, record: dict) -> None:
    """Write ``eval_run.json`` whole or not at all (other ranks read it while rank 0 writes)."""
    tmp = out / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_FILE)


def _resolve_settings(model, task: str, max_new_tokens: int | None, box_frame: str) -> tuple[int, str]:
    """(max_new_tokens, box_frame) with the defaults filled in (``evaluate``'s docstring)."""
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS.get(task, 16)
    if box_frame == "auto":
        letterbox = model is not None and model.config.vision.image_resize == "letterbox"
        box_frame = "square" if letterbox else "image"
    if box_frame not in FRAMES:
        raise ValueError(f"box_frame must be auto or one of {list(FRAMES)}, got {box_frame!r}")
    return max_new_tokens, box_frame


def _resolve_identity(identity: dict | None, answer_fn, checkpoint) -> dict | None:
    """The model's identity: given, else the answerer's own (an ``--api`` endpoint), else the checkpoint's."""
    if identity is not None:
        return identity
    if getattr(answer_fn, "identity", None) is not None:
        return answer_fn.identity
    return model_identity(checkpoint)


def limit_questions(task: str, qs: list[Question], limit: int | None) -> list[Question]:
    """The questions ``--limit N`` answers: the first N (MMBench: every circular round of the first N
    questions; MME: rounded up to whole image pairs, which it scores together)."""
    if limit is None:
        return qs
    if task == "mmbench":
        keep = set(list(dict.fromkeys(map(_mmbench_question, qs)))[:limit])
        return [q for q in qs if _mmbench_question(q) in keep]
    return qs[:limit + (limit % 2 if task == "mme" else 0)]


# ---------------------------------------------------------------------------------------- answering

def _read_done_jsonl(path: Path) -> dict:
    """question id -> record of an existing answers.jsonl; a torn (unparseable) last line is dropped."""
    if not path.is_file():
        return {}
    lines = text_lines(path.read_text(encoding="utf-8"))
    done, keep = {}, []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # interrupted mid-write: drop it and answer that question again
                log.warning("%s: dropping the incomplete last line (interrupted run)", path)
                continue
            raise ScoreInputError(f"{path}: line {n}: not valid JSON; delete the file to start over") from None
        done[rec["question_id"]] = rec
        keep.append(line)
    if len(keep) != len([x for x in lines if x.strip()]):
        path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
    return done


def _read_done_mme(out_dir: Path, cat: str) -> int:
    """Number of complete 4-column lines already in mme/<cat>.txt (a torn last line is dropped)."""
    p = out_dir / "mme" / f"{cat}.txt"
    if not p.is_file():
        return 0
    text = p.read_text(encoding="utf-8")
    lines = text_lines(text)
    if lines and (not text.endswith("\n") or len(lines[-1].split("\t")) < 4):
        lines = lines[:-1]
        p.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return len(lines)


@dataclass
class PreparedRun:
    """A benchmark run's inputs read and its settings resolved, before anything is answered or written
    (:func:`prepare_run`): what :func:`evaluate` runs and what :func:`emma_mamba.eval.suite.run_suite` checks
    every benchmark by before the first answer."""
    task: str
    questions_path: str | Path
    images: str | Path | None
    questions: list[Question]  # those this run asks (after --limit)
    limited: dict | None  # {"n", "of"}: what --limit cut, or None
    n_per_category: collections.Counter | None  # MME: every category's questions before --limit
    max_new_tokens: int
    box_frame: str
    image_template: str
    split: str | None
    ocr: str | Path | None

    def record(self, identity: dict | None) -> dict:
        """The run's ``eval_run.json`` (:func:`run_record`) for the model ``identity``."""
        qs = self.questions
        return run_record(self.task, self.questions_path, self.images, answered_by=answered_by(qs),
                          max_new_tokens=self.max_new_tokens, identity=identity, split=self.split,
                          image_template=self.image_template, box_frame=self.box_frame, lang=questions_lang(qs),
                          ocr=self.ocr)


def _warn_unknown_words(model, questions: list[Question]) -> None:
    """Warn when questions hold words the model's tokenizer has no token for (a word-level tokenizer, as the
    quickstart's: they reach the model as its unknown-word token; GPT-NeoX's byte-level BPE has none), naming how
    many and which words: a score over such questions measures words the model never read."""
    tok = getattr(model, "tokenizer", None)
    backend = getattr(tok, "backend", None)
    unk = getattr(getattr(backend, "model", None), "unk_token", None)
    unk_id = backend.token_to_id(unk) if unk else None
    if unk_id is None:
        return
    words: collections.Counter = collections.Counter()
    n = 0
    for q in questions:
        enc = backend.encode(q.text)
        missing = [q.text[a:b] for (a, b), i in zip(enc.offsets, enc.ids) if i == unk_id]
        if missing:
            n += 1
            words.update(missing)
    if n:
        log.warning("%d of %d questions hold words this model's tokenizer does not know (they reach the model as %s): "
                    "%s", n, len(questions), unk, ", ".join(f"{w!r} x{c}" for w, c in words.most_common(8)))


def prepare_run(model, task: str, questions: str | Path, images: str | Path | None, *,
                image_template: str = DEFAULT_IMAGE_TEMPLATE, split: str | None = None, likelihood: bool = False,
                lang: str = "auto", ocr: str | Path | None = None, limit: int | None = None,
                max_new_tokens: int | None = None, box_frame: str = "auto") -> PreparedRun:
    """Read ``questions`` (:func:`read_questions`), apply ``limit`` (:func:`limit_questions`) and fill in the
    settings' defaults (:func:`_resolve_settings`), as :func:`evaluate` documents them."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    max_new_tokens, box_frame = _resolve_settings(model, task, max_new_tokens, box_frame)
    qs = read_questions(task, questions, images, image_template, split, likelihood, lang=lang, ocr=ocr)
    n_per_category = collections.Counter(q.category for q in qs) if task == "mme" else None  # before --limit
    asked = limit_questions(task, qs, limit)
    _warn_unknown_words(model, asked)
    # scored as a subset when --limit cut something (a --limit past the end cuts nothing: scored as without it)
    limited = {"n": _n_questions(task, asked), "of": _n_questions(task, qs)} if len(asked) < len(qs) else None
    return PreparedRun(task, questions, images, asked, limited, n_per_category, max_new_tokens, box_frame,
                       image_template, split, ocr)


def evaluate(model, task: str, questions: str | Path, images: str | Path | None, out_dir: str | Path, *,
             annotations: str | Path | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
             cuda_graphs: bool = False, compile: bool = False, limit: int | None = None,
             image_template: str = DEFAULT_IMAGE_TEMPLATE, checkpoint: str | None = None, progress: bool = True,
             split: str | None = None, likelihood: bool = False, box_frame: str = "auto", lang: str = "auto",
             ocr: str | Path | None = None, shard: tuple[int, int] | None = None, batching: str = "continuous",
             answer_fn: Callable[[Sequence[Question], Sequence[str]], list[str]] | None = None,
             identity: dict | None = None, check_files: bool = True, sync: Callable[[], None] | None = None,
             merged: bool = False, allow_missing: bool = False) -> dict:
    """Answer ``questions`` with ``model`` (an :class:`EmmaMamba`), write the answers and the metrics.

    Returns the ``metrics.json`` content (``metrics`` is None when no ground truth is available).
    ``split``: the ScienceQA, AI2D or RefCOCO split to answer (default ``DEFAULT_SPLITS``; other benchmarks'
    files hold one split). ``max_new_tokens``: default ``DEFAULT_MAX_NEW_TOKENS`` or 16. ``likelihood``: answer a
    closed-set benchmark (``LIKELIHOOD_TASKS``) by its options' likelihood (module docstring). ``box_frame``
    (RefCOCO): what the model's box coordinates are normalised by (:mod:`emma_mamba.eval.refcoco`), "auto" =
    "square" for a checkpoint trained on letterboxed images (``vision.image_resize: letterbox``), else "image".
    ``lang`` (MMBench): "auto", "en" or "cn", the language its questions are asked in
    (:func:`emma_mamba.eval.mmbench.mmbench_lang`); ``ocr`` (TextVQA, its official JSON): the OCR file whose tokens
    are added to each question (:func:`emma_mamba.eval.vqa.textvqa_ocr_tokens`).
    ``shard=(rank, world)``: answer this process's share only, score nothing (module docstring; the returned
    report has ``metrics`` None and ``shard``). ``sync``, with ``shard``: a barrier across the processes (torchrun's),
    called by every rank once rank 0 has checked the folder's ``eval_run.json`` and written this run's, before any
    rank answers: without it a rank's fresh shard answers could reach the folder before rank 0 looks at it (a
    fresh folder then reads as one holding an older version's answers). Processes run one after another (as the
    tests simulate ranks) need none. ``merged``: the call that scores a sharded run after :func:`merge_shards`
    (every answer already in: it does not log about answers found there, as a resumed run does).
    ``batching``: "continuous" (default) or "static", how generated replies are batched (module docstring);
    ``batch_size`` is the most replies decoded together either way.
    ``cuda_graphs``: decode steps replayed from CUDA graphs (:mod:`emma_mamba.inference.cuda_graphs`; a model on a GPU); ``compile``:
    decode steps through torch.compile (``GenerationConfig.compile``).
    ``answer_fn(questions, prompts) -> replies`` replaces the model (tests feed known replies with it; ``eval
    --api`` asks an endpoint, :mod:`emma_mamba.eval.api`; one with a ``for_max_new_tokens(n)`` method is given
    this run's ``max_new_tokens`` through it). For questions with options (closed-set answering) its
    ``option_probabilities(questions, prompts, options) -> rows`` method, if it has one, gives the options'
    probabilities (a row may be None: that question is scored from a reply); without it the replies are parsed.
    Where it raises :class:`LikelihoodUnavailable` (``--api``: the endpoint refused or failed a request with
    log-probabilities), the benchmark's remaining questions are answered by parsed replies, a warning names the
    benchmark and the error, and the metrics record it (``scored_from_replies``, :func:`_scored_from_replies`).
    ``identity``: what identifies the model in ``eval_run.json`` (:func:`model_identity`); default: the
    ``answer_fn``'s ``identity`` attribute (``--api``), else the fingerprint of the ``checkpoint`` directory. A
    folder whose record differs is refused (:func:`check_run_record`). ``check_files=False``: the images were
    checked already (:func:`emma_mamba.eval.suite.run_suite` checks every benchmark's before the first answer).
    ``allow_missing``: score the answered questions even where ``annotations`` hold more (``eval --allow-missing``:
    a question file that is a subset of the annotations' questions); a ``limit`` that cuts the questions implies it.
    ``out_dir`` is created once the questions have been read; should the run then fail before its first answer
    (a bad image, a stale folder), the folders it created are removed again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {list(BATCHING)}, got {batching!r}")
    rank, world = shard if shard is not None else (0, 1)
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    out = Path(out_dir)
    prep = prepare_run(model, task, questions, images, image_template=image_template, split=split,
                       likelihood=likelihood, lang=lang, ocr=ocr, limit=limit, max_new_tokens=max_new_tokens,
                       box_frame=box_frame)
    if task == "prompts" and annotations is not None:
        raise ScoreInputError("task prompts answers free prompts and scores nothing: drop --annotations")
    if annotations is None:
        annotations = default_annotations(task, questions, prep.questions)
    # the inputs are read: only now the output folder (with a bad input, no empty folder is left behind)
    created = None  # the topmost folder this run creates, removed should it fail before its first answer
    for d in (out, *out.parents):
        if d.exists():
            if not d.is_dir():
                raise ScoreInputError(f"--out {out}: {d} is a file, not a folder; choose another --out")
            break
        created = d
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScoreInputError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    try:
        return _evaluate(model, prep, out, annotations, batch_size=batch_size, cuda_graphs=cuda_graphs,
                         compile=compile, limit=limit, checkpoint=checkpoint, progress=progress, rank=rank,
                         world=world, batching=batching, answer_fn=answer_fn, identity=identity,
                         check_files=check_files, sync=sync, merged=merged, allow_missing=allow_missing)
    except BaseException:
        if created is not None and not _wrote_answers(out):  # failed before its first answer: no folder left
            _remove_unused(out, created)
        raise


def _remove_unused(out: Path, created: Path) -> None:
    """Undo a run's folders after it failed before its first answer (:func:`_wrote_answers` is False): its record
    and empty files in ``out``, then ``out`` and each folder above it up to ``created``, each only while empty
    (``os.rmdir`` refuses a folder that holds anything, such as what another process wrote meanwhile)."""
    try:
        for p in out.iterdir():
            if p.is_dir():
                p.rmdir()  # empty (else _wrote_answers would be True)
            elif p.name == RUN_FILE or p.stat().st_size == 0:
                p.unlink()
        for d in (out, *out.parents):
            d.rmdir()
            if d == created:
                break
    except OSError:  # something else is there now: leave the rest
        pass


def _mmbench_question(q: Question) -> str:
    """The MMBench question a circular round ``"<index>/<round>"`` asks (:func:`emma_mamba.eval.mmbench.round_id`)."""
    return q.qid.split("/")[0]


def _n_questions(task: str, qs: Sequence[Question]) -> int:
    """How many questions ``qs`` are as ``--limit`` counts them (MMBench: questions, not circular rounds)."""
    return len(set(map(_mmbench_question, qs))) if task == "mmbench" else len(qs)


def _wrote_answers(out: Path) -> bool:
    """Whether ``out`` holds anything but this run's record (answers, results, metrics): kept on a failure."""
    if not out.is_dir():
        return False
    return any(p.name != RUN_FILE and (any(p.iterdir()) if p.is_dir() else p.stat().st_size > 0)
               for p in out.iterdir())


def _evaluate(model, prep: PreparedRun, out: Path, annotations, *, batch_size, cuda_graphs, compile, limit,
              checkpoint, progress, rank, world, batching, answer_fn, identity, check_files, sync, merged,
              allow_missing) -> dict:
    """:func:`evaluate` once its questions are read (``prep``) and its output folder exists."""
    from emma_mamba.eval.scorers import score

    task, questions, qs = prep.task, prep.questions_path, prep.questions
    n_per_category, limited, max_new_tokens = prep.n_per_category, prep.limited, prep.max_new_tokens
    partial = limited is not None

    answerer = None  # continuous batching: replies requested ahead and collected in question order
    own_model = answer_fn is None
    if own_model:
        if batching == "continuous":
            answerer = _ContinuousAnswers(model, max_new_tokens, batch_size, cuda_graphs, compile)
        else:
            answer_fn = _model_answer_fn(model, max_new_tokens, cuda_graphs, compile)
        option_fn = _model_option_fn(model)
    else:
        if hasattr(answer_fn, "for_max_new_tokens"):  # an answerer that takes the reply length (eval --api)
            answer_fn = answer_fn.for_max_new_tokens(max_new_tokens)
        option_fn = getattr(answer_fn, "option_probabilities", None)

    # ---- what is left to answer (by the same method as the answers already there)
    record = prep.record(_resolve_identity(identity, answer_fn, checkpoint))
    # every rank checks (a refused rank must not answer), before rank 0 replaces the record with this run's; no
    # rank writes an answer before every rank is past this (sync): a fresh folder holds no answers when checked,
    # and a rank that reads rank 0's new record reads this very record
    check_run_record(out, record)
    if rank == 0:
        if not _has_answers(out):  # a fresh start: no fallback of an earlier run applies to these answers
            (out / FALLBACK_FILE).unlink(missing_ok=True)
        _write_run_record(out, record)
    if world > 1 and sync is not None:
        sync()
    answers_path = out / "answers.jsonl"
    if world > 1 and task == "mme":  # MME's files keep their template order: rank 0 answers them all
        qs = qs if rank == 0 else []
    if task == "mme":
        (out / "mme").mkdir(exist_ok=True)
        done_per_cat = {c: _read_done_mme(out, c) for c in sorted({q.category for q in qs})}
        seen: dict[str, int] = {}
        todo = []
        for q in qs:
            seen[q.category] = seen.get(q.category, 0) + 1
            if seen[q.category] > done_per_cat[q.category]:
                todo.append(q)
        n_done = len(qs) - len(todo)
    elif world > 1:  # this process's share, around what is already merged or in its own shard file
        mine = out / f"answers.shard{rank}.jsonl"
        done = {**_read_done_jsonl(answers_path), **_read_done_jsonl(mine)}
        qs = [q for i, q in enumerate(qs) if i % world == rank]
        todo = [q for q in qs if q.qid not in done]
        n_done = len(qs) - len(todo)
        answers_path = mine
    else:
        done = _read_done_jsonl(answers_path)
        todo = [q for q in qs if q.qid not in done]
        n_done = len(qs) - len(todo)
    if n_done and not (merged and not todo):
        log.info("%s: %d of %d questions already answered in %s; answering the other %d", task, n_done, len(qs),
                 out, len(todo))
    if check_files:  # a bad image fails now, naming it, not after hours of answers
        check_images(todo, f"{task} {questions}")

    bar = None
    if progress:
        from tqdm.auto import tqdm

        desc = f"eval {task}" + (f" (shard {rank}/{world})" if world > 1 else "")
        bar = tqdm(total=len(qs), initial=n_done, unit="q", desc=desc, dynamic_ncols=True, position=rank)
    t0 = time.perf_counter()
    f = None if task == "mme" else answers_path.open("a", encoding="utf-8")

    def write(batch, prompts, probs, replies) -> None:
        asked = sum(pr is None for pr in probs)
        if len(replies) != asked:
            raise RuntimeError(f"answer_fn returned {len(replies)} replies for {asked} questions")
        it = iter(replies)
        replies = [next(it) if pr is None else q.options[max(range(len(pr)), key=pr.__getitem__)]
                   for q, pr in zip(batch, probs)]
        if task == "mme":
            for q, r in zip(batch, replies):
                # one line per answer: tabs/newlines in a reply would break MME's 4-column format
                clean = " ".join(r.split())
                with (out / "mme" / f"{q.category}.txt").open("a", encoding="utf-8") as g:
                    g.write(f"{q.line}\t{clean}\n")
        else:
            for q, p, r, pr in zip(batch, prompts, replies, probs):
                rec = {"question_id": q.qid, "image": q.image.name if q.image else None, "prompt": p, "text": r}
                if pr is not None:
                    rec["probabilities"] = [float(x) for x in pr]
                if task in ("refcoco", "ocidref"):  # what the scorer needs to place the ground-truth box
                    rec["box_frame"], rec["image_size"] = prep.box_frame, list(_image_size(q.image))
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
        if bar is not None:
            bar.update(len(batch))

    # continuous batching: the batches whose replies are still decoding, oldest first; written in this order
    # once all of a batch's replies are in, while the ones behind it keep the decoder's rows busy
    inflight: collections.deque = collections.deque()
    try:
        for i in range(0, len(todo), batch_size):
            batch = todo[i:i + batch_size]
            prompts = [prompt_for(task, q.text, q.lang) for q in batch]
            probs = [None] * len(batch)
            groups: dict = {}  # questions with the same options are scored together
            for k, q in enumerate(batch):
                if q.options is not None and option_fn is not None:
                    groups.setdefault(q.options, []).append(k)
            if groups:  # the options' forwards run here: first let the decoder finish (one user of the model)
                while inflight:
                    write(*inflight.popleft().collect())
            for opts, idx in groups.items():
                try:
                    rows = option_fn([batch[k] for k in idx], [prompts[k] for k in idx], opts)
                except LikelihoodUnavailable as e:
                    option_fn = None  # this group, the batch's other groups and the rest: replies, parsed
                    _likelihood_failed(out, task, questions, e, rank, len(todo) - i)
                    break
                if len(rows) != len(idx):
                    raise RuntimeError(f"option_probabilities returned {len(rows)} rows for {len(idx)} questions")
                for k, row in zip(idx, rows):
                    probs[k] = row
            ask = [k for k, pr in enumerate(probs) if pr is None]
            if answerer is not None:
                inflight.append(answerer.submit(batch, prompts, probs, ask))
                while len(inflight) > _BATCHES_AHEAD:
                    write(*inflight.popleft().collect())
                continue
            replies = answer_fn([batch[k] for k in ask], [prompts[k] for k in ask]) if ask else []
            write(batch, prompts, probs, replies)
        while inflight:
            write(*inflight.popleft().collect())
    except Exception:
        # an error ahead (e.g. an unreadable image met while submitting): the replies the decoder is finishing for
        # the questions before it are written first, so a rerun answers only the rest
        try:
            while inflight:
                write(*inflight.popleft().collect())
        except Exception:  # noqa: BLE001 - the first error is the one to report
            log.exception("%s: the answers decoding when the run failed could not be written", task)
        raise
    finally:
        if answerer is not None:
            answerer.close()
        if f is not None:
            f.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    if world > 1:  # the merge and the scoring come after every process is done (merge_shards, then unsharded)
        return {"task": task, "shard": [rank, world], "n_questions": len(qs), "n_answered_this_run": len(todo),
                "seconds_this_run": seconds, "answered_by": record["answered_by"], "metrics": None,
                "decode_steps": answerer.decoder.decode_steps if answerer is not None else None}

    # ---- official results files and metrics
    if task in ("vqav2", "gqa", "textvqa", "vizwiz"):
        recs = list(_read_done_jsonl(answers_path).values())
        # the replies as LLaVA-1.5's submission scripts upload them (answers.jsonl keeps them as given): VQAv2 and
        # VizWiz after the EvalAI answer processor, GQA's stripped of a final period and lower-cased (its
        # official eval.py compares strings as they are); TextVQA's evaluator processes both sides itself
        if task == "vqav2":
            res = [{"question_id": r["question_id"], "answer": normalize_textvqa(r["text"])} for r in recs]
        elif task == "textvqa":
            res = [{"question_id": r["question_id"], "answer": r["text"]} for r in recs]
        elif task == "vizwiz":
            res = [{"image": r["question_id"], "answer": normalize_textvqa(r["text"])} for r in recs]
        else:
            res = [{"questionId": r["question_id"], "prediction": normalize_gqa(r["text"])} for r in recs]
        (out / "results.json").write_text(json.dumps(res, ensure_ascii=False) + "\n", encoding="utf-8")
    metrics = None
    if annotations is not None:
        if task == "mme":
            template = None if partial else Path(annotations)
            metrics = score("mme", out / "mme", template)
            if partial:
                metrics = _partial_mme(metrics, n_per_category)
        else:
            metrics = score(task, answers_path, annotations, allow_missing=partial or allow_missing)
    elif task == "mmbench":  # a test split: its answers are the server's (the submission file below)
        log.info("mmbench: %s holds no answers (a test split): not scored here; MMBench's evaluation server scores "
                 "the submission file", questions)
    elif task != "prompts":
        log.warning("%s: no ground truth to score against (pass --annotations); wrote answers only", task)
    # MMBench: the evaluation server's file (a test split's only score), when every question is answered
    submission = write_run_submission(out, answers_path, questions) if task == "mmbench" else None
    report = {"task": task, "checkpoint": checkpoint, "questions": str(questions),
              "annotations": None if annotations is None else str(annotations), "n_questions": len(qs),
              "n_answered_this_run": len(todo), "seconds_this_run": seconds, "batch_size": batch_size,
              "batching": batching if own_model else None,
              "decode_steps": answerer.decoder.decode_steps if answerer is not None else None,
              "max_new_tokens": max_new_tokens, "limit": limit, "limited": limited,
              "answered_by": record["answered_by"],
              "scored_from_replies": _scored_from_replies(out, task, qs) if record["answered_by"] == "likelihood"
              else None, "metrics": metrics}
    if submission is not None:
        report["submission"] = submission
    (out / "metrics.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def _partial_mme(metrics: dict, n_per_category: dict) -> dict:
    """MME metrics of a ``--limit`` run: where it left a category of the questions unanswered or cut one short,
    the perception, cognition and total scores (sums over every category, as ``emma-mamba score`` with the
    templates gives them only for complete answers) are None, and ``partial`` says what was answered: the
    questions answered of all, the categories cut short (answered, of) and those not answered. Complete: as is."""
    cats = metrics["categories"]
    cut = {c: [cats[c]["n_questions"], n] for c, n in n_per_category.items()
           if c in cats and cats[c]["n_questions"] < n}
    missing = [c for c in n_per_category if c not in cats]
    if not cut and not missing:
        return metrics
    answered = sum(v["n_questions"] for v in cats.values())
    return {**metrics, "perception": None, "cognition": None, "total": None,
            "partial": {"n_answered": answered, "n_questions": sum(n_per_category.values()), "categories_cut": cut,
                        "categories_not_answered": missing}}


def with_shard_counts(report: dict, shards: Sequence[dict], out_dir: str | Path) -> dict:
    """The report of a sharded run's scoring call (rank 0, after :func:`merge_shards`: it answered nothing) with
    what every process did this run, ``shards`` their reports by rank: the questions answered (summed), the
    seconds (the slowest process's), the decode steps (summed) and ``processes``; ``metrics.json`` rewritten."""
    steps = [s.get("decode_steps") for s in shards]
    report = {**report, "n_answered_this_run": sum(s["n_answered_this_run"] for s in shards),
              "seconds_this_run": max(s["seconds_this_run"] for s in shards),
              "decode_steps": None if all(x is None for x in steps) else sum(x or 0 for x in steps),
              "processes": len(shards)}
    (Path(out_dir) / "metrics.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
    return report


def merge_shards(out_dir: str | Path, world: int) -> int:
    """Append the ``world`` processes' shard answers (``answers.shard<r>.jsonl``) to ``out_dir/answers.jsonl``
    (a question answered twice keeps its first answer) and delete the shard files; the number of answers added.

    The shards are interleaved (rank 0's first answer, rank 1's first, ..., rank 0's second, ...): question i went
    to rank i mod ``world`` and each rank writes in question order, so a fresh run's merged file lists its answers
    in the questions' order, as one process writes them (after a resume the answers added follow the ranks'
    interleave: the same records, scored the same)."""
    out = Path(out_dir)
    merged = out / "answers.jsonl"
    have = _read_done_jsonl(merged)
    shards = [list(_read_done_jsonl(out / f"answers.shard{r}.jsonl").items()) for r in range(world)]
    added = []
    for k in range(max(map(len, shards), default=0)):
        for part in shards:
            if k < len(part) and part[k][0] not in have:
                qid, rec = part[k]
                have[qid] = rec
                added.append(json.dumps(rec, ensure_ascii=False))
    if added:
        with merged.open("a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in added))
    for r in range(world):
        (out / f"answers.shard{r}.jsonl").unlink(missing_ok=True)
    return len(added)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def _image_source(q: Question) -> str:
    """How an error names a question's picture: its file, or MMBench's base64 image in the questions file."""
    return f"image {q.image}" if q.image_bytes is None else "its base64 image in the questions file"


def _load_image(q: Question):
    """A question's picture as RGB, decoded exactly as training and ``serve`` decode images
    (:func:`emma_mamba.models.vision.load_image`: EXIF rotation, transparency composited on white, 16-bit
    grayscale rescaled); an unreadable one is a :class:`ScoreInputError` naming the question and the file."""
    import io

    from PIL import Image

    from emma_mamba.models.vision import load_image

    try:
        if q.image_bytes is None:
            return load_image(q.image)
        # in-memory bytes: opened and decoded first, then the same conversion (as serve does a data URL)
        with Image.open(io.BytesIO(q.image_bytes)) as f:
            f.load()
            return load_image(f.copy())
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds on a bad file; all mean "cannot read it"
        raise ScoreInputError(f"question {q.qid!r}: {_image_source(q)} cannot be read: {e}") from None


def _open_images(batch: Sequence[Question]) -> list[list]:
    """One list holding each question's picture (RGB, :func:`_load_image`)."""
    return [[_load_image(q)] for q in batch]


def _check_one(q: Question) -> str | None:
    """Why a question's picture cannot be used, or None; cheap: a PNG's chunks and checksums are read
    (``verify``, no inflating), a JPEG is decoded at 1/8 scale (the whole bitstream is still read, so a
    truncated file fails, but no full-size image is built), any other format is decoded."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(q.image_bytes) if q.image_bytes is not None else q.image) as im:
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft(None, (1, 1))  # the smallest DCT scale, 1/8
                im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds on a bad file
        return f"{type(e).__name__}: {e}" if not str(e) else str(e)
    return None


def check_images(questions: Sequence[Question], where: str) -> None:
    """Check that every picture of ``questions`` exists and decodes (:func:`_check_one`), each distinct file
    once, several at a time (PIL releases the GIL while decoding); the first bad one is a
    :class:`ScoreInputError` naming ``where`` (the benchmark and its questions file), the question and the
    file. Cost, measured on a 640x480 JPEG: about 1 ms per image (a full decode: 1.5 ms), 0.2 ms per PNG."""
    from concurrent.futures import ThreadPoolExecutor

    firsts: dict = {}  # one question per distinct picture (MMBench's rounds share one bytes object)
    for q in questions:
        firsts.setdefault(q.image if q.image_bytes is None else ("bytes", id(q.image_bytes)), q)
    todo = list(firsts.values())
    if not todo:
        return
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for q, why in zip(todo, pool.map(_check_one, todo)):
            if why is not None:
                raise ScoreInputError(f"{where}: question {q.qid!r}: {_image_source(q)} cannot be read: {why}; "
                                      f"fix or replace it (no question was answered with it)")


def _model_option_fn(model):
    """The options' probabilities as each question's reply (closed-set tasks), from an EmmaMamba."""

    fuse = model.instruction is not None

    def option_probabilities(batch: Sequence[Question], prompts: Sequence[str], options) -> list[list[float]]:
        texts = [model.build_prompt(p, 1) for p in prompts]
        probs = model.option_probabilities(texts, _open_images(batch), [spellings(o) for o in options],
                                           [[p] for p in prompts] if fuse else None)
        return probs.tolist()

    return option_probabilities


class _Submitted:
    """One batch of questions in the continuous decoder: their jobs and what writing the answers needs."""

    def __init__(self, batch, prompts, probs, jobs):
        self.batch, self.prompts, self.probs, self.jobs = batch, prompts, probs, jobs

    def collect(self) -> tuple:
        """(batch, prompts, probs, replies) once every reply is in (a failed reply's error is raised)."""
        return self.batch, self.prompts, self.probs, [job.wait() for job in self.jobs]


class _ContinuousAnswers:
    """Greedy replies from an EmmaMamba through one :class:`~emma_mamba.inference.batching.BatchDecoder` of
    ``batch_size`` rows (module docstring: continuous batching). The questions' images of each admission round
    go through the vision encoder together, as ``serve`` does; each reply is ``generate``'s for its prompt alone."""

    def __init__(self, model, max_new_tokens: int, batch_size: int, cuda_graphs: bool = False,
                 compile: bool = False):
        from emma_mamba.inference.batching import BatchDecoder, vlm_embed_batch

        self.model = model
        self.cfg = _greedy_config(model, max_new_tokens, cuda_graphs, compile)
        self.fuse = model.instruction is not None
        # throughput, not latency: a joining prompt is prefilled whole between two steps (prefill_chunk None), and
        # questions join once half the rows are free, their images encoded and prompts prefilled together (the
        # quickstart model on a CPU, captions mixed with short answers, batch 8: 1.14-1.23x the fixed batches'
        # speed so, 0.94x joining one by one, where each join encoded one image; benchmarks/eval_batching.py)
        self.decoder = BatchDecoder(model.lm, max_batch=batch_size, compile=compile, cuda_graphs=cuda_graphs,
                                    prefill_chunk=None, embed_batch=vlm_embed_batch(model),
                                    min_join=max(1, batch_size // 2))

    def submit(self, batch: Sequence[Question], prompts: Sequence[str], probs: list, ask: list[int]) -> _Submitted:
        """Queue the replies of ``batch[k]`` for k in ``ask`` (images opened here, on the caller's thread: a bad
        one is named before it reaches the decoder)."""
        from emma_mamba.inference.batching import DecodeJob

        images = {k: _load_image(batch[k]) for k in ask}  # all or nothing: a bad image submits none of the batch
        jobs = []
        for k in ask:
            ids = self.model.tokenizer.encode(self.model.build_prompt(prompts[k], 1))
            spec = {"embed": (ids, [images[k]], [prompts[k]] if self.fuse else None)}
            jobs.append(self.decoder.submit(DecodeJob(self.cfg, lambda spec=spec: spec, _reply_text,
                                                       self.model.tokenizer)))
        return _Submitted(batch, prompts, probs, jobs)

    def close(self) -> None:
        self.decoder.close()


def _reply_text(seq, state, stats) -> str:
    return seq.text().strip()


def _greedy_config(model, max_new_tokens: int, cuda_graphs: bool, compile: bool):
    """The GenerationConfig of eval's replies (either batching): greedy, up to ``max_new_tokens``, ending where the
    model's answers end (its EOS, and its chat format's turn_end: :meth:`EmmaMamba.stops`)."""
    from emma_mamba.inference.generate import GenerationConfig

    return model.stops(GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, cuda_graphs=cuda_graphs,
                                        compile=compile))


def _model_answer_fn(model, max_new_tokens: int, cuda_graphs: bool = False, compile: bool = False):
    """Greedy batched answers from an EmmaMamba (one image per question, placeholder before the prompt)."""
    cfg = _greedy_config(model, max_new_tokens, cuda_graphs, compile)
    fuse = model.instruction is not None

    def answer(batch: Sequence[Question], prompts: Sequence[str]) -> list[str]:
        texts = [model.build_prompt(p, 1) for p in prompts]
        instructions = [[p] for p in prompts] if fuse else None
        result = model.generate(texts, _open_images(batch), instructions, config=cfg)
        return [t.strip() for t in result.texts]

    return answer
