"""What LLaVA data loading reports: the longest sample actually used, JSONL records named by their 1-based line in
every message, and the records found unusable while training kept across a resume (counted once)."""

from __future__ import annotations

import json
import pickle

import pytest

from emma_mamba.data.llava import DataError, LlavaDataset
from emma_mamba.training.config import DataConfig
from tests.data.test_llava import N, folder, make, processor, rec, tok  # noqa: F401 (fixtures)


def test_longest_sample_is_the_longest_one_used(folder, tok):  # noqa: F811
    long_answer = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "word " * 80}]
    no_answer_fits = [{"from": "human", "value": "<image>\n" + "question " * 80}, {"from": "gpt", "value": "A."}]
    ds = make(folder, tok, [rec(0), rec(1, image=None, conv=long_answer), rec(2, conv=no_answer_fits)],
              max_length=48, on_error="skip")
    rep = ds.report
    assert [s.id for s in ds.samples] == ["r0", "r1"] and rep.skipped == {"too_long": 1} and rep.truncated == 1
    assert rep.longest_used == max(ds.lengths) <= 48 < rep.longest  # rep.longest: the skipped record's
    # was: "longest sample <the skipped record's length> positions"
    assert rep.summary().endswith(f"; longest sample used {max(ds.lengths)} positions ({rep.longest} before "
                                  f"truncation to max_length)")
    assert make(folder, tok, [rec(0)]).report.summary().endswith(
        f"; longest sample used {make(folder, tok, [rec(0)]).lengths[0]} positions")


def test_jsonl_records_are_named_by_their_line_in_every_message(folder, tok, processor):  # noqa: F811
    (folder / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    lines = [json.dumps(rec(0)), json.dumps(rec(1, image="nope.png")), "{oops", json.dumps(rec(3, image="bad.png"))]
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    t, image_id = tok
    ds = LlavaDataset(DataConfig(json=str(path), image_folder=str(folder / "img"), on_error="skip"), t, "<image>",
                      image_id, N, processor)
    ex = ds.report.examples
    assert ex["missing_image"][0].startswith(f"{path}: line 2 (id 'r1')")
    assert ex["malformed_json"][0].startswith(f"{path}: line 3, column 2: malformed JSON")
    (s,) = [s for s in ds.samples if s.id == "r3"]
    with pytest.raises(DataError) as e:
        ds.load_images(s)
    # the image failing at training time names the same line (was: "record 3", the 0-based index)
    assert str(e.value).startswith(f"{path}: line 4 (id 'r3'): image ") and ds.where(s) == f"{path}: line 4 (id 'r3')"
    ds.report_issue(e.value)
    assert ex["corrupt_image"][0].startswith(f"{path}: line 4 (id 'r3'): image ")


def test_records_failed_while_training_are_kept_across_a_resume(folder, tok, processor):  # noqa: F811
    (folder / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    records = [rec(0), rec(1, image="bad.png"), rec(2, image=None, conv=[{"from": "human", "value": "Q"}])]
    ds = make(folder, tok, records, processor, on_error="skip")
    assert (ds.report.samples, dict(ds.report.skipped)) == (2, {"no_assistant": 1})
    with pytest.raises(DataError) as e:
        ds.load_images(ds.samples[1])
    err = pickle.loads(pickle.dumps(e.value))  # as a DataLoader worker hands it over
    ds.report_issue(err)
    assert ds.failed_records() == [[0, 1]] and ds.report.samples == 1
    saved = (dict(ds.report.skipped), ds.failed_records())
    # a resumed run's fresh load: the counts and the counted records put back, as the interrupted run had them
    again = make(folder, tok, records, processor, on_error="skip")
    again.restore_skips(*saved)
    assert (again.report.samples, dict(again.report.skipped)) == (1, {"no_assistant": 1, "corrupt_image": 1})
    with pytest.raises(DataError) as e:
        again.load_images(again.samples[1])
    again.report_issue(e.value)  # met again after the resume: nothing more counted
    assert again.report.summary() == ds.report.summary() and again.report.samples == 1
    # a checkpoint of an earlier version (counts only): the counts are restored
    old = make(folder, tok, records, processor, on_error="skip")
    old.restore_skips(saved[0], None)
    assert dict(old.report.skipped) == saved[0] and old.report.samples == 2
