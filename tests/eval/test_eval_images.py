"""The pictures `emma-mamba eval` feeds the model: decoded exactly as the training pipeline decodes them (the oracle:
:func:`emma_mamba.data.llava.preprocess_image`, what LlavaDataset runs), transparent, 16-bit and EXIF-rotated files
included, MMBench's in-file images too; and a missing or truncated file is an error naming the question and the file
before the first answer (single runs, suites, the CLI), or, met mid-run, one that keeps the answers given."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from emma_mamba.eval.runner import ScoreInputError, evaluate
from tests.eval.test_runner import shapes  # noqa: F401 - the ShapesWorld held-out files (a fixture)


@pytest.fixture(scope="module")
def model():
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


class _Recording:
    """Wraps the model's image processor and keeps every pixel batch the model was given."""

    def __init__(self, proc):
        self.proc, self.seen = proc, []

    def __call__(self, images):
        px = self.proc(images)
        self.seen.append(px)
        return px

    def __getattr__(self, name):
        return getattr(self.proc, name)


@pytest.fixture
def recording(model):
    rec = _Recording(model.image_processor)
    model.image_processor = rec
    try:
        yield rec
    finally:
        model.image_processor = rec.proc


def _tricky_images(d: Path) -> list[str]:
    """Files `convert('RGB')` gets wrong: RGBA with transparent red under white-to-be pixels, a 16-bit grayscale
    gradient (PIL clips it to white), a JPEG stored sideways with an EXIF orientation tag."""
    d.mkdir(parents=True, exist_ok=True)
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[:, :20] = (20, 60, 200, 255)  # opaque blue
    rgba[:, 20:] = (255, 0, 0, 0)  # fully transparent, red underneath
    rgba[10:20, 10:30, 3] = 128  # half transparent band
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    g16 = (np.linspace(0, 65535, 40)[None, :] * np.ones((30, 1))).astype(np.uint16)
    Image.fromarray(g16).save(d / "gray16.png")
    rot = np.zeros((40, 30, 3), np.uint8)
    rot[:10] = (250, 200, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    Image.fromarray(rot).save(d / "sideways.jpg", exif=exif, quality=95)
    return ["alpha.png", "gray16.png", "sideways.jpg"]


def _pope(path: Path, names: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question_id": 10 * (i + 1), "image": n, "text": "Is there a cat?",
                                        "label": "no"}) + "\n" for i, n in enumerate(names)))
    return path


@pytest.mark.parametrize("likelihood", [False, True], ids=["generate", "likelihood"])
def test_eval_pixels_equal_the_training_pipelines(model, recording, tmp_path, likelihood):
    from emma_mamba.data.llava import preprocess_image

    names = _tricky_images(tmp_path / "img")
    q = _pope(tmp_path / "q.jsonl", names)
    evaluate(model, "pope", q, tmp_path / "img", tmp_path / "out", batch_size=8, max_new_tokens=1,
             likelihood=likelihood, progress=False)
    got = torch.cat(recording.seen)
    want = torch.stack([preprocess_image(tmp_path / "img" / n, recording.proc) for n in names])
    assert torch.equal(got, want)
    # and what that pipeline does, checked on the pixels themselves (the model's input mapped back to [0, 1])
    seen = recording.proc.unnormalize(got)
    assert seen[0, :, :, -4:].min() > 0.97  # the transparent right side is white, not the red underneath
    assert seen[1].std() > 0.2  # the 16-bit gradient is a gradient, not white
    # the yellow top band of the sideways JPEG, turned upright, is on the right (red high, blue low)
    assert seen[2][0, :, -3:].mean() > 0.9 and seen[2][2, :, -3:].mean() < 0.2


def test_mmbench_images_in_the_file_decode_as_training(model, recording, tmp_path):
    from emma_mamba.data.llava import preprocess_image
    from tests.eval.test_multiple_choice import write_tsv

    names = _tricky_images(tmp_path / "img")[:2]
    rows = [{"index": i, "question": "What is it?", "A": "a", "B": "b", "answer": "A", "category": "c",
             "l2-category": "l", "image": base64.b64encode((tmp_path / "img" / n).read_bytes()).decode()}
            for i, n in enumerate(names)]
    tsv = write_tsv(tmp_path / "mmb.tsv", rows)
    evaluate(model, "mmbench", tsv, None, tmp_path / "out", batch_size=8, max_new_tokens=1, progress=False)
    got = torch.cat(recording.seen)  # each question's two circular rounds, in file order
    want = torch.stack([preprocess_image(tmp_path / "img" / n, recording.proc) for n in names for _ in (0, 1)])
    assert torch.equal(got, want)


def _named(bad: Path) -> str:
    """The error a truncated ``bad`` (question 30's picture) must give: the question, the file, why."""
    return rf"question 30: image {re.escape(str(bad))} cannot be read: (?i:.*truncated)"


def _truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])


def _good_and_bad(d: Path, fmt: str) -> list[str]:
    """Four pictures of ``fmt``, the third truncated (PIL's own full decode of it fails: checked here)."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = "jpg" if fmt.startswith("jpeg") else "png"
    names = [f"im{i}.{ext}" for i in range(4)]
    for n in names:
        a = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(a).save(d / n, **({"quality": 90, "progressive": fmt == "jpeg-progressive"}
                                          if ext == "jpg" else {}))
    _truncate(d / names[2])
    with pytest.raises(OSError), Image.open(d / names[2]) as im:
        im.load()
    return names


@pytest.mark.parametrize("fmt", ["png", "jpeg", "jpeg-progressive"])
def test_a_truncated_image_is_named_before_any_answer(tmp_path, fmt):
    names = _good_and_bad(tmp_path / "img", fmt)
    q = _pope(tmp_path / "q.jsonl", names)
    asked = []

    def fn(qs, ps):
        asked.extend(qs)
        return ["no"] * len(qs)

    bad = tmp_path / "img" / names[2]
    with pytest.raises(ScoreInputError, match=_named(bad)):
        evaluate(None, "pope", q, tmp_path / "img", tmp_path / "out", batch_size=1, progress=False, answer_fn=fn)
    assert asked == []
    # with the file repaired the same folder continues
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad, format="PNG" if fmt == "png" else "JPEG")
    rep = evaluate(None, "pope", q, tmp_path / "img", tmp_path / "out", batch_size=1, progress=False, answer_fn=fn)
    assert rep["n_answered_this_run"] == 4


def test_an_unreadable_image_met_mid_run_keeps_the_answers_and_names_it(model, tmp_path):
    names = _good_and_bad(tmp_path / "img", "jpeg")
    q = _pope(tmp_path / "q.jsonl", names)
    bad = tmp_path / "img" / names[2]
    with pytest.raises(ScoreInputError, match=_named(bad)):
        evaluate(model, "pope", q, tmp_path / "img", tmp_path / "out", batch_size=1, max_new_tokens=1,
                 progress=False, check_files=False)  # the pre-check skipped: the model's loader meets it
    answered = [json.loads(x)["question_id"] for x in (tmp_path / "out" / "answers.jsonl").read_text().splitlines()]
    assert answered == [10, 20]


def test_cli_names_the_truncated_image_without_a_traceback(tmp_path, capsys):
    from emma_mamba.cli import main

    names = _good_and_bad(tmp_path / "img", "png")
    q = _pope(tmp_path / "q.jsonl", names)
    # an endpoint nobody listens on: the check comes before any request
    rc = main(["eval", "--task", "pope", "--questions", str(q), "--images", str(tmp_path / "img"), "--api",
               "http://127.0.0.1:9/v1", "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "question 30" in err and str(tmp_path / "img" / names[2]) in err and "Traceback" not in err


def _suite_file(tmp_path: Path, shapes_root: Path, q: Path, images: Path) -> Path:
    p = tmp_path / "suite.yaml"
    p.write_text(f"""benchmarks:
  pope_adv: {{task: pope, questions: {shapes_root}/heldout/pope_adversarial.jsonl, images: {shapes_root}/images}}
  mine: {{task: pope, questions: {q}, images: {images}}}
""")
    return p


def test_a_suite_checks_every_benchmarks_images_before_the_first_answer(shapes, tmp_path):
    from emma_mamba.eval.suite import read_suite, run_suite

    shapes_root = shapes
    names = _good_and_bad(tmp_path / "img", "jpeg")
    q = _pope(tmp_path / "q.jsonl", names)
    entries = read_suite(_suite_file(tmp_path, shapes_root, q, tmp_path / "img"))
    asked = []

    def fn(qs, ps):
        asked.extend(qs)
        return ["no"] * len(qs)

    bad = tmp_path / "img" / names[2]
    with pytest.raises(ScoreInputError, match=rf"benchmark 'mine': pope {re.escape(str(q))}: question 30: image "
                       rf"{re.escape(str(bad))} cannot be read"):
        run_suite(None, entries, tmp_path / "out", progress=False, answer_fn=fn)
    assert asked == []  # not even the first benchmark was answered

    # a benchmark that still fails mid-suite leaves the summary of those finished before it
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad, format="JPEG")

    def fail_on_mine(qs, ps):
        if any(x.image.parent == tmp_path / "img" for x in qs):
            raise RuntimeError("endpoint went away")
        return ["no"] * len(qs)

    with pytest.raises(RuntimeError, match="endpoint went away"):
        run_suite(None, entries, tmp_path / "out", progress=False, answer_fn=fail_on_mine)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["benchmark"] for r in summary["benchmarks"]] == ["pope_adv"]
    assert summary["failed"] == {"benchmark": "mine", "error": "RuntimeError: endpoint went away"}
    assert "Incomplete: benchmark mine failed" in (tmp_path / "out" / "summary.md").read_text()
    # the rerun continues and completes the table
    summary = run_suite(None, entries, tmp_path / "out", progress=False, answer_fn=fn)
    assert [r["benchmark"] for r in summary["benchmarks"]] == ["pope_adv", "mine"] and "failed" not in summary
