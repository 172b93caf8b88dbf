"""One entry point over the benchmark scorers: ``score(task, answers, annotations)``.

| task  | answers                                   | annotations                                  |
| ----- | ----------------------------------------- | -------------------------------------------- |
| pope  | JSONL, "answer" or "text" (+ question_id) | POPE question file (JSONL with "label")      |
| vqav2 | JSON list/JSONL, question_id + answer     | VQAv2 annotations JSON (10 answers/question) |
| gqa   | JSON list/JSONL, questionId + prediction  | GQA questions JSON (with "answer")           |
| textvqa | JSON list/JSONL, question_id + answer   | TextVQA_0.5.1_val.json (10 answer strings)   |
| vizwiz | JSON list/JSONL, image + answer          | VizWiz val.json (10 answers, "unanswerable") |
| mmbench | JSONL, question_id "<index>/<round>" + text | MMBench TSV with answers (dev split)       |
| seed  | JSONL, question_id + text                  | SEED-Bench.json (image questions)            |
| scienceqa | JSONL, question_id (problem id) + text | ScienceQA problems.json (image problems)     |
| vsr   | JSONL, question_id (record index) + text (+ probabilities) | VSR test.jsonl (with "label") |
| tallyqa | JSONL, question_id + text (+ probabilities) | TallyQA test.json (with "answer")         |
| ai2d  | JSONL, question_id (questionId) + text (+ probabilities) | AI2D questions/ folder              |
| refcoco | JSONL, question_id + text (a box) + box_frame + image_size | refs(unc).p (+ instances.json) or JSON |
| ocidref | the same as refcoco                       | OCID-Ref {split}_expressions.json            |
| mme   | dir of <category>.txt, 4 columns          | optional dir of 3-column templates           |

Definitions and normalisation are in :mod:`.pope`, :mod:`.vqa` (VQAv2, TextVQA, VizWiz: one soft accuracy),
:mod:`.gqa`, :mod:`.mmbench` (circular evaluation), :mod:`.seed`, :mod:`.scienceqa`, :mod:`.closed` (VSR,
TallyQA) and :mod:`.mme`.
"""

from __future__ import annotations

from pathlib import Path

from emma_mamba.eval._io import ScoreInputError
from emma_mamba.eval.closed import score_ai2d, score_tallyqa, score_vsr
from emma_mamba.eval.gqa import normalize_gqa, score_gqa
from emma_mamba.eval.mmbench import parse_choice, score_mmbench
from emma_mamba.eval.mme import parse_mme_answer, score_mme
from emma_mamba.eval.pope import pope_metrics, score_pope, yes_no
from emma_mamba.eval.refcoco import score_ocidref, score_refcoco
from emma_mamba.eval.scienceqa import score_scienceqa
from emma_mamba.eval.seed import score_seed
from emma_mamba.eval.vqa import normalize_answer, score_textvqa, score_vizwiz, score_vqav2, vqa_accuracy

TASKS = ("pope", "vqav2", "gqa", "textvqa", "vizwiz", "mmbench", "seed", "scienceqa", "vsr", "tallyqa", "ai2d",
         "refcoco", "ocidref", "mme")

__all__ = ["TASKS", "ScoreInputError", "score", "summary", "score_pope", "score_vqav2", "score_gqa",
           "score_textvqa", "score_vizwiz", "score_mmbench", "score_seed", "score_scienceqa", "score_vsr",
           "score_tallyqa", "score_ai2d", "score_refcoco", "score_ocidref", "score_mme", "parse_choice", "pope_metrics", "yes_no",
           "normalize_answer", "vqa_accuracy", "normalize_gqa", "parse_mme_answer"]


_SCORERS = {"pope": score_pope, "vqav2": score_vqav2, "gqa": score_gqa, "textvqa": score_textvqa,
            "vizwiz": score_vizwiz, "mmbench": score_mmbench, "seed": score_seed, "scienceqa": score_scienceqa,
            "vsr": score_vsr, "tallyqa": score_tallyqa, "ai2d": score_ai2d, "refcoco": score_refcoco,
            "ocidref": score_ocidref}
"""The scorers taking (answers, annotations, allow_missing); MME is special (no allow_missing, optional file)."""


def score(task: str, answers: str | Path, annotations: str | Path | None, allow_missing: bool = False) -> dict:
    """Metrics of ``answers`` on ``task`` (fractions in [0, 1]; MME in percent points, as MME reports)."""
    if task == "mme":
        if allow_missing:
            raise ScoreInputError("allow_missing does not apply to MME (every image needs both answers)")
        return score_mme(answers, annotations)
    if annotations is None:
        raise ScoreInputError(f"task {task!r} needs an annotations file")
    scorer = _SCORERS.get(task)
    if scorer is not None:
        return scorer(answers, annotations, allow_missing)
    raise ScoreInputError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def _any_box(m: dict) -> str:
    """A grounding line's note on replies with a box amid other text (invalid as Prismatic reads them)."""
    if m.get("n_invalid_any_box", m["n_invalid_boxes"]) == m["n_invalid_boxes"]:
        return ""
    return (f" ({m['n_invalid_boxes'] - m['n_invalid_any_box']} of them a box amid other text; reading those too: "
            f"Acc {100 * m['accuracy_any_box']:.2f})")


def _pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals, or n/a."""
    return "n/a" if x is None else f"{100 * x:.2f}"


def _ljust(text: str, width: int) -> str:
    """``text`` padded to ``width`` terminal columns (a CJK ideograph takes two: MMBench-CN's categories)."""
    import unicodedata

    cols = sum(2 if unicodedata.east_asian_width(c) in ("W", "F") else 1 for c in text)
    return text + " " * max(0, width - cols)


def summary(task: str, m: dict) -> str:
    """A short human-readable table of the metrics ``score`` returned (a breakdown with one group only, such as
    TextVQA's single answer type, is left out: it repeats the total)."""
    lines = []
    if task == "pope":
        lines.append(f"POPE  n={m['n']}  acc {100 * m['accuracy']:.2f}  prec {100 * m['precision']:.2f}  "
                     f"rec {100 * m['recall']:.2f}  F1 {100 * m['f1']:.2f}  yes-ratio {100 * m['yes_ratio']:.2f}")
        lines.append(f"      TP {m['tp']}  FP {m['fp']}  TN {m['tn']}  FN {m['fn']}  unparsed replies {m['n_unparsed']}")
    elif task in ("vqav2", "gqa", "textvqa", "vizwiz"):
        lines.append(f"{task.upper()}  n={m['n']}  accuracy {100 * m['accuracy']:.2f}")
        for group in ("per_answer_type", "per_answerability", "per_structural_type", "per_semantic_type"):
            if len(m.get(group, {})) > 1:
                for k, v in m[group].items():
                    lines.append(f"  {group[4:]:<16} {_ljust(k, 12)} {100 * v:.2f}")
    elif task == "mmbench":
        lines.append(f"MMBench  n={m['n']}  circular accuracy {100 * m['accuracy']:.2f}  first round "
                     f"{100 * m['accuracy_first_round']:.2f}  unparsed replies {m['n_unparsed_replies']}")
        for k, v in m["per_l2_category"].items():
            lines.append(f"  {_ljust(k, 32)} {100 * v:.2f}")
    elif task == "seed":
        lines.append(f"SEED-Bench (image)  n={m['n']}  accuracy {100 * m['accuracy']:.2f}  unparsed replies "
                     f"{m['n_unparsed_replies']}")
        for k, v in m["per_question_type"].items():
            lines.append(f"  {k:<32} {100 * v:.2f}")
    elif task == "scienceqa":
        lines.append(f"ScienceQA-IMG ({m['split']})  n={m['n']}  accuracy {100 * m['accuracy']:.2f}  unparsed "
                     f"replies {m['n_unparsed_replies']}")
        for group in ("per_subject", "per_grade"):
            for k, v in m[group].items():
                lines.append(f"  {k:<32} {100 * v:.2f}")
    elif task == "vsr":
        lines.append(f"VSR  n={m['n']}  accuracy {100 * m['accuracy']:.2f}  ROC AUC {_pct(m['auc_roc'])}  PR AUC "
                     f"{_pct(m['auc_pr'])}  (always true: {100 * m['always_true_accuracy']:.2f})  unparsed replies "
                     f"{m['n_unparsed_replies']}")
        for k, v in m["per_relation"].items():
            lines.append(f"  {k:<32} {100 * v:.2f}")
    elif task == "tallyqa":
        lines.append(f"TallyQA  n={m['n']}  accuracy {_pct(m['accuracy'])}  simple {_pct(m['accuracy_simple'])} "
                     f"(n={m['n_simple']})  complex {_pct(m['accuracy_complex'])} (n={m['n_complex']})  ROC AUC "
                     f"(ovo) {_pct(m['auc_roc_ovo'])}  unparsed replies {m['n_unparsed_replies']}")
    elif task == "refcoco":
        lines.append(f"RefCOCO ({m['split']})  n={m['n']}  Acc@0.5 {100 * m['accuracy']:.2f}  mean IoU "
                     f"{100 * m['mean_iou']:.2f}  invalid boxes {m['n_invalid_boxes']}{_any_box(m)}")
    elif task == "ocidref":
        lines.append(f"OCID-Ref  n={m['n']}  Acc@0.25 {100 * m['accuracy']:.2f}  mean IoU {100 * m['mean_iou']:.2f}  "
                     f"invalid boxes {m['n_invalid_boxes']}{_any_box(m)}")
        for k, v in m["by_clutter"].items():
            lines.append(f"  {k + ' clutter':<32} {100 * v['accuracy']:.2f}  (n={v['n']})")
    elif task == "ai2d":
        lines.append(f"AI2D ({m['split']})  n={m['n']}  accuracy {100 * m['accuracy']:.2f}  unparsed replies "
                     f"{m['n_unparsed_replies']}")
        for k, v in m["per_kind"].items():
            lines.append(f"  {k:<32} {100 * v:.2f}")
    elif task == "mme":
        part = m.get("partial")
        cut = part["categories_cut"] if part else {}
        lines.append(f"{'category':<24}{'acc':>8}{'acc+':>8}{'score':>9}")
        for c, v in m["categories"].items():
            lines.append(f"{c:<24}{v['acc']:>8.2f}{v['acc_plus']:>8.2f}{v['score']:>9.2f}"
                         + (f"  (partial: {cut[c][0]} of {cut[c][1]} questions)" if c in cut else ""))
        if part:  # eval --limit: sums over the categories would not be MME's totals
            missing = part["categories_not_answered"]
            lines.append(f"perception, cognition, total: none (partial: {part['n_answered']} of {part['n_questions']} "
                         f"questions answered (--limit); "
                         + (f"not answered: {', '.join(missing)}" if missing else "every category answered in part")
                         + ")")
        else:
            lines.append(f"perception {m['perception']:.2f}  cognition {m['cognition']:.2f}  total {m['total']:.2f}")
        if m.get("empty_categories"):
            lines.append(f"  (empty in the templates, not scored: {', '.join(m['empty_categories'])})")
    if m.get("n_missing"):
        lines.append(f"  ({m['n_missing']} questions of the annotations were not answered (--limit, or a subset of "
                     f"the questions) and are left out of the scores)")
    return "\n".join(lines)
