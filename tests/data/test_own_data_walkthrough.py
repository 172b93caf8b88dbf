"""A researcher's own LLaVA-format data, in the shapes such files have: JSONL whose text holds line separators,
records without ids, images under another format's key, other chat formats' roles and keys, and the tokens trained
checked against the answers as written.

Every oracle is the data as the test writes it (the answers, the line numbers, the records), never the loader's
output."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from PIL import Image

from emma_mamba.data.llava import IGNORE_INDEX, DataError, LlavaDataset
from emma_mamba.training.config import DataConfig, run_config_from_dict, run_config_to_dict
from tests.data.test_llava import N, processor, tok  # noqa: F401 (fixtures)

EOT = "<|endoftext|>"


def H(v):
    return {"from": "human", "value": v}


def G(v):
    return {"from": "gpt", "value": v}


@pytest.fixture
def img(tmp_path):
    folder = tmp_path / "img"
    for sub, name, colour in (("coco/train2017", "000000000009.jpg", "red"), ("gqa/images", "2354786.jpg", "blue"),
                              ("ocr_vqa/images", "140031996.jpg", "green")):
        (folder / sub).mkdir(parents=True)
        Image.new("RGB", (40, 30), colour).save(folder / sub / name)
    (folder / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return folder


def load(path, folder, tok, processor=None, **cfg):  # noqa: F811
    t, image_id = tok
    return LlavaDataset(DataConfig(json=str(path), image_folder=str(folder), **cfg), t, "<image>", image_id, N,
                        processor)


def trained_runs(tokenizer, s):
    """The decoded text of each maximal run of trained (label-set) positions of sample ``s``."""
    runs, cur = [], []
    for x, y in zip(s.input_ids, s.labels):
        if y != IGNORE_INDEX:
            assert y == x
            cur.append(y)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def write_run(tmp_path, data, folder):
    """A tiny-preset run YAML over data file ``data`` (what ``data check`` reads)."""
    cfg = run_config_from_dict({"stage": "finetune", "output_dir": str(tmp_path / "out"), "model": "tiny",
                                "data": {"json": str(data), "image_folder": str(folder), "max_length": 96},
                                "train": {"global_batch_size": 2, "micro_batch_size": 1, "max_steps": 1}},
                               source="test")
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(run_config_to_dict(cfg)))
    return run


# ------------------------------------------------------------------------------ JSONL with line separators

SEPARATORS = "\u2028\u2029\x85\x0c\x1e"  # str.splitlines splits at each; JSON strings hold them unescaped


def test_jsonl_text_with_unicode_line_separators_is_read_record_by_record(img, tok, processor, tmp_path):  # noqa: F811
    """``json.dumps(..., ensure_ascii=False)`` writes U+2028 (common in scraped web text), U+2029, NEL, form feed
    and the like as they are; each record is one ``\\n``-terminated line. The loader split lines with
    ``str.splitlines``, which also breaks at those characters: the record became malformed pieces (an error under
    raise; under skip the good record was dropped and counted as several malformed ones) and every later record
    was named by a wrong line."""
    t, _ = tok
    answers = [f"Line one{c}line two." for c in SEPARATORS]
    lines = [json.dumps({"id": f"s{k}", "conversations": [H("Q?"), G(a)]}, ensure_ascii=False)
             for k, a in enumerate(answers)]
    lines += ["",  # a blank line: no record, but it has its line number
              json.dumps({"id": "broken", "image": "bad.png", "conversations": [H("<image>\nQ"), G("A")]})]
    path = tmp_path / "mine.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")  # written on Windows: CRLF
    bad_line = len(lines)  # 1-based line of the record whose image is corrupt, as an editor shows it

    ds = load(path, img, tok, processor)
    assert ds.report.records == len(SEPARATORS) + 1 and not ds.report.skipped
    assert [s.id for s in ds.samples] == [f"s{k}" for k in range(len(SEPARATORS))] + ["broken"]
    for s, a in zip(ds.samples, answers):
        assert trained_runs(t, s) == [a + EOT]
    with pytest.raises(DataError) as e:
        ds.load_images(ds.samples[-1])
    assert str(e.value).startswith(f"{path}: line {bad_line} (id 'broken'): image ")

    # data check counts what training reads, and --write-clean keeps the usable records whole
    from emma_mamba.cli import main

    run = write_run(tmp_path, path, img)
    report, clean = tmp_path / "report.json", tmp_path / "clean.jsonl"
    assert main(["data", "check", "--config", str(run), "--workers", "1", "--report", str(report),
                 "--write-clean", str(clean)]) == 1  # the corrupt image
    r = json.loads(report.read_text())
    assert (r["records"], r["usable"], r["skipped"]) == (len(SEPARATORS) + 1, len(SEPARATORS), {"corrupt_image": 1})
    assert r["examples"]["corrupt_image"][0].startswith(f"{path}: line {bad_line} (id 'broken'): ")
    written = [json.loads(x) for x in clean.read_text(encoding="utf-8").split("\n") if x.strip()]
    assert written == [json.loads(x) for x in lines[:len(SEPARATORS)]]


def test_a_jsonl_file_named_in_capitals_is_json_lines(img, tok, tmp_path):  # noqa: F811
    path = tmp_path / "train.JSONL"  # was read as one JSON document: "Extra data ... name it .jsonl"
    path.write_text("".join(json.dumps({"id": f"r{k}", "conversations": [H("Q"), G(f"A{k}")]}) + "\n"
                            for k in range(3)))
    ds = load(path, img, tok)
    assert [s.id for s in ds.samples] == ["r0", "r1", "r2"] and ds.report.records == 3


# ---------------------------------------------------------------------------------- records without ids

def test_a_record_without_an_id_is_not_named_by_an_invented_one(img, tok, processor, tmp_path):  # noqa: F811
    """A record without an id (or with ``"id": null``) was named in training-time messages by its 0-based record
    index as if that were its id: ``line 3 (id '2')`` for the record on line 3, which has no id at all."""
    good = {"image": "gqa/images/2354786.jpg", "conversations": [H("<image>\nQ"), G("A")]}
    lines = [json.dumps(good), json.dumps({"id": "x", **good}),
             json.dumps({"image": "bad.png", "conversations": [H("<image>\nWhat?"), G("B")]}),
             json.dumps({"id": None, "image": "bad.png", "conversations": [H("<image>\nWhy?"), G("C")]})]
    path = tmp_path / "noid.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds = load(path, img, tok, processor, on_error="skip")
    for line, s in ((3, ds.samples[2]), (4, ds.samples[3])):
        with pytest.raises(DataError) as e:
            ds.load_images(s)
        assert str(e.value).startswith(f"{path}: line {line}: image "), str(e.value)
        assert "(id " not in str(e.value)
        ds.report_issue(e.value)
    assert ds.report.skipped == {"corrupt_image": 2} and ds.report.samples == 2
    assert [x.split(": image ")[0] for x in ds.report.examples["corrupt_image"]] == [f"{path}: line 3",
                                                                                     f"{path}: line 4"]
    assert ds.where(ds.samples[1]) == f"{path}: line 2 (id 'x')"


# ----------------------------------------------------------------------------------- other formats' keys

def test_images_under_another_formats_key_are_an_error_not_a_text_only_record(img, tok, tmp_path):  # noqa: F811
    """LLaMA-Factory's ShareGPT format (and others) name the images ``images``. Such a record without a
    placeholder trained as a text-only record: its image silently never reached the model."""
    t, _ = tok
    recs = [{"id": "mine", "images": ["coco/train2017/000000000009.jpg"], "conversations": [H("Describe."), G("Red.")]},
            {"id": "ph", "images": ["coco/train2017/000000000009.jpg"], "conversations": [H("<image>\nQ"), G("A")]},
            {"id": "none", "images": [], "conversations": [H("Hi"), G("Hello.")]}]  # text-only: nothing lost
    path = tmp_path / "lf.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(DataError) as e:
        load(path, img, tok)
    assert e.value.reason == "bad_image_field" and str(e.value).startswith(f"{path}: record 0 (id 'mine'): ")
    assert "'images'" in str(e.value) and "'image'" in str(e.value) and "rename" in str(e.value)
    ds = load(path, img, tok, on_error="skip")
    assert [s.id for s in ds.samples] == ["none"] and ds.report.skipped == {"bad_image_field": 2}
    assert trained_runs(t, ds.samples[0]) == ["Hello." + EOT]


@pytest.mark.parametrize("conv, reason, phrases", [
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "bad_turn",
     ["turn 0", "no 'from'", "'role', 'content'", "rename the keys"]),
    ([{"from": "human", "content": "Q"}, {"from": "gpt", "content": "A"}], "bad_turn",
     ["turn 0", "no 'value'", "'from', 'content'", "rename the keys"]),  # was: "its 'value' is null"
    ([{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}], "bad_role",
     ["turn 0 has role 'user'", "'human'", "'gpt'", "rename the roles"]),
    ([{"from": "system", "value": "Be brief."}, H("Q"), G("A")], "bad_role",
     ["turn 0 has role 'system'", "no system prompt", "first human turn"]),
    (None, "no_conversations", ["no 'conversations'", "'id', 'messages'", "other chat formats have 'messages': "
                                "rename the key"]),
])
def test_other_chat_formats_are_named_with_what_to_change(img, tok, tmp_path, conv, reason, phrases):  # noqa: F811
    rec = {"id": 7, "conversations": conv} if conv is not None else {
        "id": 7, "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps({"id": 1, "conversations": [H("Q"), G("A")]}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(DataError) as e:
        load(path, img, tok)
    msg = str(e.value)
    assert e.value.reason == reason and msg.startswith(f"{path}: line 2 (id 7): "), msg
    for p in phrases:
        assert p in msg, (p, msg)


# ------------------------------------------------------------------------------------- the tokens trained

@pytest.mark.parametrize("position", ["in_turn", "before_turn"])
def test_trained_tokens_are_the_answers_as_written_and_images_follow_their_turns(img, tok, tmp_path,  # noqa: F811
                                                                                  position):
    """mix665k-style records (placeholder at the start, the end, mid-sentence, missing; several turns; several
    images in two turns; text-only; CJK and emoji; int ids; images in subfolders and by absolute path): every
    run of trained positions is one answer plus its end of turn, in order; each image is the file its
    placeholder's turn names, with that turn's question as its instruction."""
    t, image_id = tok
    coco, gqa, ocr = "coco/train2017/000000000009.jpg", "gqa/images/2354786.jpg", "ocr_vqa/images/140031996.jpg"
    recs = [
        {"id": 1, "image": coco, "conversations": [H("<image>\nWhat is it?"), G("A red square.")]},
        {"id": 2, "image": gqa, "conversations": [H("What colour?\n<image>"), G("Blue.")]},
        {"id": 3, "image": ocr, "conversations": [H("Who wrote <image> this?"), G("Me."), H("Genre?"),
                                                  G("Cooking \U0001F373 料理")]},
        {"id": 4, "image": str(img / coco), "conversations": [H("Describe."), G(" Leading space, trailing. ")]},
        {"id": 5, "image": [gqa, ocr], "conversations": [H("First <image>."), G("Blue."), H("Then <image>?"),
                                                         G("Green.")]},
        {"id": 6, "conversations": [H("你好"), G("こんにちは 😀"), H("And?"), G("")]},
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    ds = LlavaDataset(DataConfig(json=str(path), image_folder=str(img)), t, "<image>", image_id, N,
                      image_position=position)
    want_images = [[coco], [gqa], [ocr], [coco], [gqa, ocr], []]
    want_instr = [["What is it?"], ["What colour?"], ["Who wrote this?"], ["Describe."], ["First .", "Then ?"], []]
    assert [s.id for s in ds.samples] == ["1", "2", "3", "4", "5", "6"]
    for s, r, images, instr in zip(ds.samples, recs, want_images, want_instr):
        answers = [x["value"] + EOT for x in r["conversations"] if x["from"] == "gpt"]
        assert trained_runs(t, s) == answers, r["id"]
        assert [p.resolve() for p in s.images] == [(img / p).resolve() for p in images]
        assert s.instructions == instr and s.input_ids.count(image_id) == len(images)
        # each placeholder sits in (in_turn) or just before (before_turn) the user turn that holds its image
        text = t.decode(s.input_ids, skip_special_tokens=False)
        user_turns = re.split(r"<\|user\|>", text)[1:]
        counts = [u.count("<image>") for u in user_turns]
        if position == "before_turn":  # a turn's placeholders come at the end of the previous piece
            counts = [c.count("<image>") for c in re.split(r"<\|user\|>", text)[:-1]]
        human = [x["value"] for x in r["conversations"] if x["from"] == "human"]
        assert counts == [max(v.count("<image>"), 1 if images and k == 0 and len(images) == 1 else 0)
                          for k, v in enumerate(human)], (r["id"], text)


# ---------------------------------------------------------------------------------------- data check's count

def test_data_check_counts_records_noted_not_notes(img, tok, tmp_path, capsys):  # noqa: F811
    """A record can be noted under several kinds (the same id and the same conversation as an earlier one, and an
    empty answer): the closing line said "N record(s) kept but noted" with N the number of notes."""
    from emma_mamba.cli import main

    im = "coco/train2017/000000000009.jpg"
    first = {"id": "a", "image": im, "conversations": [H("<image>\nQ"), G("")]}  # empty_answer
    recs = [first,
            dict(first),  # duplicate_id + duplicate_record + empty_answer: one record
            {"id": "a", "image": im, "conversations": [H("<image>\nQ"), G("Red.")]},  # duplicate_id
            {"id": "b", "image": im, "conversations": [H("<image>\nQ"), G("Red.")]},  # duplicate_record
            {"id": "c", "image": im, "conversations": [H("<image>\nOther"), G("Red.")]}]  # nothing
    noted_by_hand = 4  # records 0, 1, 2, 3
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(recs))
    report = tmp_path / "report.json"
    assert main(["data", "check", "--config", str(write_run(tmp_path, path, img)), "--workers", "1",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"\n{noted_by_hand} record(s) kept but noted" in out, out
    r = json.loads(report.read_text())
    assert r["notes"] == {"empty_answer": 2, "duplicate_id": 2, "duplicate_record": 2}
    assert r["noted_records"] == noted_by_hand and r["usable"] == 5


# ------------------------------------------------------------------------------------ files of another shape

def test_pretty_printed_jsonl_and_a_wrapped_json_file_are_named_with_the_fix(img, tok, tmp_path):  # noqa: F811
    """Records written with ``json.dumps(r, indent=2)`` into a .jsonl file were read line by line: under skip "0 of
    39 records used; skipped 39 (malformed_json: 39)" for 3 records, under raise "line 1, column 2: Expecting
    property name". A .json file holding one record, or the list under a key, said only "got dict"."""
    recs = [{"id": f"r{k}", "conversations": [H("Q"), G("A")]} for k in range(3)]
    pretty = tmp_path / "pretty.jsonl"
    pretty.write_text("".join(json.dumps(r, indent=2) + "\n" for r in recs))
    for on_error in ("raise", "skip"):  # the whole file is in another layout: an error either way
        with pytest.raises(DataError, match=r"pretty\.jsonl: .*several lines \(pretty-printed\).*one line"):
            load(pretty, img, tok, on_error=on_error)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(recs[0]))
    with pytest.raises(DataError, match=r"one\.json: .*got an object with keys 'id', 'conversations' \(one record"):
        load(one, img, tok)
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": recs}))
    with pytest.raises(DataError, match=r"wrapped\.json: .*keys 'version', 'data' \(the records a list under one"):
        load(wrapped, img, tok)
