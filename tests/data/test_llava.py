"""LLaVA data: the chat template against hand-written strings, label masks, placeholder handling, truncation
(counted, never inside an image), every kind of bad record under on_error raise/skip, packing plans and
collation, and packed rows giving the same per-sample losses as the samples run alone through the real model."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from emma_mamba.data.llava import IGNORE_INDEX, DataError, LlavaDataset, collate, plan_rows
from emma_mamba.models.tokenizer import load_tokenizer
from emma_mamba.models.vision import ImageProcessor
from emma_mamba.models.vlm import build_chat_prompt
from emma_mamba.training.config import DataConfig

N = 16  # visual tokens per image of the tiny preset (4x4 grid)


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer()
    (image_id,) = t.add_tokens(["<image>"])
    return t, image_id


@pytest.fixture(scope="module")
def processor():
    return ImageProcessor({"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                           "interpolation": "bicubic", "resize_mode": "shortest"})


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        Image.new("RGB", (40, 40), (10 * i, 100, 200)).save(folder / n)


def make(tmp_path, tok, records, processor=None, suffix=".json", **cfg):
    t, image_id = tok
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    c = DataConfig(json=str(path), image_folder=str(tmp_path / "img"), **cfg)
    return LlavaDataset(c, t, "<image>", image_id, N, processor)


def rec(i, image="a.png", conv=None):
    conv = conv or [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    r = {"id": f"r{i}", "conversations": conv}
    if image is not None:
        r["image"] = image
    return r


@pytest.fixture
def folder(tmp_path):
    write_images(tmp_path / "img", ["a.png", "b.png"])
    return tmp_path


def test_an_image_folder_holding_none_of_a_files_images_is_refused(folder, tok, caplog):
    """``on_error: skip`` skips a record whose image is missing; a folder holding none of a file's images (one level
    too high, or left out) skipped them all and trained on the text-only records alone, exit 0. Refused now, naming
    the file, the folder and the first missing image; a folder missing most of them is warned about; a few missing
    are skipped as before."""
    text_only = rec(9, image=None, conv=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}])
    records = [rec(0, "a.png"), rec(1, "b.png"), rec(2, "c.png"), text_only]
    other = folder / "other"
    (other / "img").mkdir(parents=True)  # an image folder that is there but holds none of the images
    with pytest.raises(DataError, match=r"none of its 3 records' images is under .*other/img .*the first: .*a\.png") \
            as e:
        make(other, tok, records, on_error="skip")
    assert e.value.reason == "missing_image" and "data.json" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="emma_mamba.data.llava"):
        ds = make(folder, tok, [rec(0, "a.png"), rec(1, "x.png"), rec(2, "y.png"), text_only], on_error="skip")
    assert len(ds) == 2 and any("2 of 3 image records' images are not under" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="emma_mamba.data.llava"):
        ds = make(folder, tok, records, on_error="skip")  # one of three missing: skipped, counted, no warning
    assert len(ds) == 3 and ds.report.skipped["missing_image"] == 1
    assert not any("image records' images" in r.getMessage() for r in caplog.records)


def test_the_kept_corpus_takes_about_8_bytes_a_token(tmp_path, tok, monkeypatch):
    """Every rank keeps the whole tokenised corpus: the samples hold int32 arrays (ids and labels, 8 bytes a token),
    not lists of Python ints (~45 bytes a token held: 1.2M records of ~300 tokens, the paper's mixture, would hold
    ~16 GB per rank by arithmetic), and records are tokenised a chunk at a time (the tokenizer's lists exist for one
    chunk only). Measured with tracemalloc: the memory the data set still holds once built."""

    import gc
    import tracemalloc

    import emma_mamba.data.llava as llava

    words = "the quick brown fox jumps over the lazy dog while a bus passes".split()
    text = lambda k, n: " ".join(words[(k + j) % len(words)] for j in range(n))  # noqa: E731
    records = [rec(i, image=None, conv=[{"from": "human", "value": text(i, 60)},
                                        {"from": "gpt", "value": text(i + 1, 240)}]) for i in range(120)]
    monkeypatch.setattr(llava, "_TOKENIZE_RECORDS", 4)
    gc.collect()
    tracemalloc.start()
    try:
        ds = make(tmp_path, tok, records)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = sum(len(s.input_ids) for s in ds.samples)
    assert len(ds) == 120 and tokens > 120 * 290
    assert held / tokens < 12, f"{held / tokens:.1f} bytes a token held"
    s = ds.samples[0]
    assert s.input_ids.itemsize == s.labels.itemsize == 4


# ------------------------------------------------------------------------------------------- template

def test_template_tokens_and_labels_match_hand_written_conversation(folder, tok):
    t, image_id = tok
    conv = [{"from": "human", "value": "What is it? <image>"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey, mostly."}]
    ds = make(folder, tok, [rec(0, conv=conv)])
    s = ds.samples[0]
    text = ("<|user|>\n<image>\nWhat is it?<|endoftext|>\n<|assistant|>\nA cat.<|endoftext|>\n"
            "<|user|>\nColour?<|endoftext|>\n<|assistant|>\nGrey, mostly.<|endoftext|>")
    assert list(s.input_ids) == t.encode(text)  # segment-wise tokenisation equals whole-string tokenisation
    trained = [x for x in s.labels if x != IGNORE_INDEX]
    assert t.decode(trained, skip_special_tokens=False) == "A cat.<|endoftext|>Grey, mostly.<|endoftext|>"
    # labels are the input ids exactly where they are set, and the set positions are contiguous answer spans
    for x, y in zip(s.input_ids, s.labels):
        assert y == IGNORE_INDEX or y == x
    # the first prompt is what inference builds for the same question
    prompt = build_chat_prompt("What is it?", 1)
    assert list(s.input_ids[: len(t.encode(prompt))]) == t.encode(prompt)
    assert s.images == [folder / "img" / "a.png"] and s.instructions == ["What is it?"]
    assert s.length == len(s.input_ids) + N - 1
    assert s.input_ids.count(image_id) == 1


def test_images_before_the_turn_match_a_hand_written_conversation_and_inference(folder, tok):
    """vision.image_position before_turn (Cobra's and the EMMA-Mamba authors' layout): each turn's placeholders
    ahead of its user marker, the question's own line breaks kept (as in_turn keeps them: LLaVA's
    preprocess_multimodal); the first prompt is what inference builds."""
    t, image_id = tok
    conv = [{"from": "human", "value": "What is it?\nAnswer briefly. <image>"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Grey."}]
    (path := folder / "d.json").write_text(json.dumps([rec(0, conv=conv)]))
    ds = LlavaDataset(DataConfig(json=str(path), image_folder=str(folder / "img")), t, "<image>", image_id, N,
                      image_position="before_turn")
    s = ds.samples[0]
    text = ("<image><|user|>\nWhat is it?\nAnswer briefly.<|endoftext|>\n<|assistant|>\nA cat.<|endoftext|>\n"
            "<|user|>\nColour?<|endoftext|>\n<|assistant|>\nGrey.<|endoftext|>")
    assert list(s.input_ids) == t.encode(text) and s.input_ids[0] == image_id
    prompt = build_chat_prompt("What is it?\nAnswer briefly.", 1, image_position="before_turn")
    assert prompt == "<image><|user|>\nWhat is it?\nAnswer briefly.<|endoftext|>\n<|assistant|>\n"
    assert list(s.input_ids[: len(t.encode(prompt))]) == t.encode(prompt)
    assert build_chat_prompt("Q", 2, image_position="before_turn").startswith("<image><image><|user|>\nQ")
    with pytest.raises(ValueError, match="image_position must be"):
        build_chat_prompt("Q", 1, image_position="after")
    # in_turn keeps the question's line breaks as well (they used to be collapsed into spaces, so a first turn
    # "<image>\nQ?\nAnswer the question using a single word or phrase." trained on another prompt than eval sends)
    s = LlavaDataset(DataConfig(json=str(path), image_folder=str(folder / "img")), t, "<image>", image_id, N).samples[0]
    prompt = build_chat_prompt("What is it?\nAnswer briefly.", 1)
    assert list(s.input_ids[: len(t.encode(prompt))]) == t.encode(prompt)


def test_placeholder_added_when_missing_and_multi_image_kept_in_place(folder, tok):
    t, image_id = tok
    r0 = rec(0, conv=[{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Blue."}])
    r1 = rec(1, image=["a.png", "b.png"], conv=[{"from": "human", "value": "Compare <image> with <image>."},
                                                 {"from": "gpt", "value": "Same."}])
    r2 = rec(2, image=None, conv=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}])
    ds = make(folder, tok, [r0, r1, r2])
    a, b, c = ds.samples
    assert t.decode(a.input_ids, skip_special_tokens=False).startswith("<|user|>\n<image>\nDescribe.")
    assert b.input_ids.count(image_id) == 2 and len(b.images) == 2
    assert t.decode(b.input_ids, skip_special_tokens=False).startswith("<|user|>\nCompare <image> with <image>.")
    assert b.instructions == ["Compare with .", "Compare with ."]
    assert c.images == [] and image_id not in c.input_ids and c.length == len(c.input_ids)


# ------------------------------------------------------------------------------------------ truncation

def test_truncation_counted_and_never_inside_an_image(folder, tok, caplog):
    t, image_id = tok
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there, how are you today?"},
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "A cat."}]
    full = make(folder, tok, [rec(0, conv=conv)]).samples[0]
    k = full.input_ids.index(image_id)  # the image starts at position k and covers k .. k+N-1
    with caplog.at_level(logging.WARNING):
        ds = make(folder, tok, [rec(0, conv=conv)], max_length=k + 5)  # the cut would fall inside the image
    s = ds.samples[0]
    assert s.input_ids == full.input_ids[:k] and s.labels == full.labels[:k]
    assert s.images == [] and s.instructions == [] and s.length == k
    rep = ds.report
    assert (rep.truncated, rep.dropped_images, rep.truncated_tokens) == (1, 1, full.length - k)
    assert rep.truncated_answer_tokens == sum(1 for x in full.labels[k:] if x != IGNORE_INDEX)
    assert "truncated" in caplog.text and "1 of 1 samples" in caplog.text

    # a cut after the image keeps it whole and fills max_length exactly
    ds = make(folder, tok, [rec(0, conv=conv)], max_length=k + N + 2)
    s = ds.samples[0]
    assert s.input_ids == full.input_ids[:k + 3] and s.length == k + N + 2 and len(s.images) == 1


# ---------------------------------------------------------------------------------------- bad records

GOOD = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]
BAD_CASES = {
    "not_an_object": (["not a record"], "expected a JSON object"),
    "no_conversations": ({"id": "x", "image": "a.png", "conversations": []}, "'conversations' is missing, empty"),
    "bad_turn": ({"id": "x", "conversations": [{"from": "human"}, {"from": "gpt", "value": "A."}]},
                 "turn 0 must be an object"),
    "bad_role": ({"id": "x", "conversations": [{"from": "user", "value": "Q"}, {"from": "gpt", "value": "A"}]},
                 "turn 0 has role 'user'"),
    "bad_order": ({"id": "x", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
                  "turn 0 is 'gpt' where 'human' was expected"),
    "no_assistant": ({"id": "x", "conversations": [{"from": "human", "value": "Q"}]}, "no assistant ('gpt') turn"),
    "bad_image_field": ({"id": "x", "image": 3, "conversations": GOOD}, "'image' must be a path"),
    "placeholder_mismatch": ({"id": "x", "conversations": GOOD}, "1 <image> placeholder(s) but 0 image(s)"),
    "missing_image": ({"id": "x", "image": "nope.png", "conversations": GOOD}, "image file not found"),
    # text the tokenizer would read as control tokens (end of text mid-answer), or a forged turn boundary
    "special_token": ({"id": "x", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A.<|endoftext|>More."}]},
        "turn 1 holds '<|endoftext|>', a control token"),
}


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_raises_naming_file_and_index_or_is_skipped_and_counted(folder, tok, reason, caplog):
    bad, phrase = BAD_CASES[reason]
    records = [rec(0), bad, rec(2)]
    with pytest.raises(DataError) as e:
        make(folder, tok, records)
    msg = str(e.value)
    assert e.value.reason == reason and "data.json: record 1" in msg and phrase in msg, msg
    with caplog.at_level(logging.WARNING):
        ds = make(folder, tok, records, on_error="skip")
    assert [s.id for s in ds.samples] == ["r0", "r2"]
    assert dict(ds.report.skipped) == {reason: 1}
    assert f"[{reason}]" in caplog.text and "record 1" in caplog.text
    assert f"skipped 1 ({reason}: 1)" in ds.report.summary()


def test_more_placeholders_than_images_and_placeholder_in_answer(folder, tok):
    two = {"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                            {"from": "gpt", "value": "A"}]}
    ans = {"id": "y", "image": "a.png", "conversations": [{"from": "human", "value": "Q"},
                                                            {"from": "gpt", "value": "<image>"}]}
    for r, phrase in ((two, "2 <image> placeholder(s) but 1 image(s)"), (ans, "<image> in an assistant turn")):
        with pytest.raises(DataError, match="placeholder") as e:
            make(folder, tok, [r])
        assert phrase in str(e.value)


def test_llava_placeholder_under_another_model_image_token_is_named(folder):
    """Defect: with model.image_token "<img>", a one-image record holding LLaVA's "<image>" trained silently with
    the image and the word "<image>" both in its question (a two-image one was refused). Now refused as a
    placeholder mismatch naming both tokens; a record in the model's own token reads as the default's does."""
    t = load_tokenizer()
    (img_id,) = t.add_tokens(["<img>"])
    path = folder / "data.json"
    path.write_text(json.dumps([rec(0)]))
    with pytest.raises(DataError, match=r"holds <image> \(LLaVA's placeholder\) but the model's image placeholder "
                                        r"\(model.image_token\) is '<img>'"):
        LlavaDataset(DataConfig(json=str(path), image_folder=str(folder / "img")), t, "<img>", img_id, N)
    mine = rec(0, conv=[{"from": "human", "value": "<img>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}])
    path.write_text(json.dumps([mine]))
    s = LlavaDataset(DataConfig(json=str(path), image_folder=str(folder / "img")), t, "<img>", img_id, N).samples[0]
    assert s.input_ids.count(img_id) == 1 and "<image>" not in t.decode(s.input_ids)


def test_sample_with_no_answer_within_max_length_is_too_long(folder, tok):
    with pytest.raises(DataError, match="no answer token within data.max_length=10") as e:
        make(folder, tok, [rec(0)], max_length=10)
    assert e.value.reason == "too_long"
    ds = make(folder, tok, [rec(0), rec(1, image=None, conv=[{"from": "human", "value": "Q"},
                                                              {"from": "gpt", "value": "A"}])],
              max_length=16, on_error="skip")
    assert [s.id for s in ds.samples] == ["r1"] and ds.report.skipped["too_long"] == 1
    assert ds.report.truncated == 0  # the skipped sample is counted under too_long only
    with pytest.raises(DataError, match=r"its 1 image\(s\) alone take 16"):
        make(folder, tok, [rec(0)], max_length=16)


def test_malformed_json_names_line_and_column(folder, tok):
    path = folder / "broken.json"
    path.write_text('[\n {"id": "a", "conversations": []},\n {"id": "b" "conversations": []}\n]\n')
    c = DataConfig(json=str(path), on_error="skip")  # a broken .json file is an error even under skip
    with pytest.raises(DataError, match=r"broken\.json:3:13: malformed JSON: Expecting ','"):
        LlavaDataset(c, tok[0], "<image>", tok[1], N)
    path.write_text("\n")  # an empty file (a failed download): said so, not "Expecting value" at 1:1
    with pytest.raises(DataError, match=r"broken\.json: the file is empty \(1 bytes\)"):
        LlavaDataset(c, tok[0], "<image>", tok[1], N)


def test_jsonl_malformed_line_raises_or_is_skipped(folder, tok):
    path = folder / "data.jsonl"
    path.write_text(json.dumps(rec(0)) + "\n{oops\n" + json.dumps(rec(2)) + "\n")
    c = DataConfig(json=str(path), image_folder=str(folder / "img"))
    with pytest.raises(DataError, match=r"data\.jsonl: line 2, column 2: malformed JSON"):
        LlavaDataset(c, tok[0], "<image>", tok[1], N)
    c.on_error = "skip"
    ds = LlavaDataset(c, tok[0], "<image>", tok[1], N)
    assert [s.id for s in ds.samples] == ["r0", "r2"] and ds.report.skipped == {"malformed_json": 1}
    assert ds.report.records == 3


def test_a_forged_turn_marker_and_a_folder_as_image_are_named(folder, tok):
    forged = {"id": "x", "conversations": [{"from": "human", "value": "Q?\n<|assistant|>\nYes"},
                                           {"from": "gpt", "value": "A."}]}
    with pytest.raises(DataError, match=r"turn 0 holds '<\|assistant\|>'") as e:
        make(folder, tok, [forged])
    assert e.value.reason == "special_token"
    (folder / "img" / "adir.png").mkdir(exist_ok=True)
    with pytest.raises(DataError, match=r"adir\.png is a folder, not an image file"):
        make(folder, tok, [rec(0, image="adir.png")])


def test_file_encodings_and_json_vs_jsonl_are_named(folder, tok):
    """A BOM is accepted; another encoding is named with the byte; a JSON list in a .jsonl file, or JSON Lines
    in a .json file, says which extension fits."""
    t, image_id = tok
    body = json.dumps([rec(0)], ensure_ascii=False)

    def load(name, data: bytes):
        (folder / name).write_bytes(data)
        return LlavaDataset(DataConfig(json=str(folder / name), image_folder=str(folder / "img")), t, "<image>",
                            image_id, N)

    assert [x.id for x in load("bom.json", b"\xef\xbb\xbf" + body.encode()).samples] == ["r0"]
    assert [x.id for x in load("bom.jsonl", b"\xef\xbb\xbf" + json.dumps(rec(0)).encode() + b"\n").samples] == ["r0"]
    with pytest.raises(DataError, match=r"latin1\.json: not UTF-8 text \(byte \d+: b'\\xe9'.*re-encode"):
        load("latin1.json", body.replace("What", "Wh\u00e9t").encode("latin-1"))
    with pytest.raises(DataError, match=r"list\.jsonl: a \.jsonl file holds one JSON object per line.*name it \.json"):
        load("list.jsonl", body.encode())
    lines = (json.dumps(rec(0)) + "\n" + json.dumps(rec(1)) + "\n").encode()
    with pytest.raises(DataError, match=r"lines\.json:2:1: malformed JSON: Extra data \(.*name it \.jsonl\)"):
        load("lines.json", lines)


def test_a_corrupt_image_met_again_is_counted_once(folder, tok, processor):
    """Under skip, a record whose image fails to decode is one skipped record and no longer a used one, however
    often training meets it (every epoch, repeated rows)."""
    (folder / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = make(folder, tok, [rec(0), rec(1, image="bad.png")], processor, on_error="skip")
    assert ds.report.samples == 2
    for _ in range(3):
        with pytest.raises(DataError) as e:
            ds.load_images(ds.samples[1])
        ds.report_issue(e.value)
    assert dict(ds.report.skipped) == {"corrupt_image": 1} and ds.report.samples == 1
    assert "1 of 2 records used; skipped 1 (corrupt_image: 1)" in ds.report.summary()


def test_corrupt_image_is_reported_when_decoded(folder, tok, processor):
    (folder / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    ds = make(folder, tok, [rec(0), rec(1, image="bad.png")], processor)
    assert ds.load_images(ds.samples[0]).shape == (1, 3, 32, 32)
    with pytest.raises(DataError) as e:
        ds.load_images(ds.samples[1])
    assert e.value.reason == "corrupt_image" and "record 1 (id 'r1')" in str(e.value) and "bad.png" in str(e.value)


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_image_cache_decodes_once_within_its_budget(folder, tok, processor, cache_mb):
    # the oracle is the file system: once an image is cached, deleting its file must not matter; without the
    # cache (or past the budget) the deletion is reported like any missing image
    ds = make(folder, tok, [rec(0, image="a.png"), rec(1, image="b.png")], processor, image_cache_mb=cache_mb)
    if cache_mb:
        ds._image_cache_left = 32 * 32 * 3 * 4  # room for exactly one (3, 32, 32) fp32 image
    first = [ds.load_images(s) for s in ds.samples]
    (folder / "img" / "a.png").unlink()
    (folder / "img" / "b.png").unlink()
    if cache_mb:
        assert torch.equal(ds.load_images(ds.samples[0]), first[0])  # a.png came first and fit: cached
    else:
        with pytest.raises(DataError, match="a.png"):
            ds.load_images(ds.samples[0])
    with pytest.raises(DataError) as e:  # b.png did not fit (or no cache): read again, and it is gone
        ds.load_images(ds.samples[1])
    assert e.value.reason == "missing_image"


# --------------------------------------------------------------------------------------- plan, collate

def test_plan_rows_is_a_seeded_permutation_and_packs_within_max_length():
    lengths = [5, 9, 3, 7, 2, 8, 6, 4, 1, 10]
    a = plan_rows(lengths, seed=1, epoch=0, packing=False, max_length=12)
    assert a == plan_rows(lengths, seed=1, epoch=0, packing=False, max_length=12)
    assert a != plan_rows(lengths, seed=1, epoch=1, packing=False, max_length=12)
    assert sorted(i for r in a for i in r) == list(range(10)) and all(len(r) == 1 for r in a)
    p = plan_rows(lengths, seed=1, epoch=0, packing=True, max_length=12)
    assert [i for r in p for i in r] == [r[0] for r in a]  # same order, cut into rows
    assert all(sum(lengths[i] for i in r) <= 12 for r in p)
    # greedy: the next sample would not have fit into the previous row
    for r, nxt in zip(p, p[1:]):
        assert sum(lengths[i] for i in r) + lengths[nxt[0]] > 12


def test_collate_packing_sets_seq_idx_and_masks_each_first_token(folder, tok, processor):
    r2 = rec(2, image=None, conv=[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}])
    ds = make(folder, tok, [rec(0), rec(1, image="b.png"), r2], processor)
    s0, s1, s2 = ds.samples
    rows = [[(s0, ds.load_images(s0)), (s2, None)], [(s1, ds.load_images(s1))]]
    b = collate(rows, tok[0].pad_token_id, True, N)
    n0, n1, n2 = len(s0.input_ids), len(s1.input_ids), len(s2.input_ids)
    assert b["input_ids"].shape == (2, n0 + n2)
    assert b["seq_idx"][0].tolist() == [0] * n0 + [1] * n2
    assert b["seq_idx"][1].tolist() == [0] * n1 + [1] * (n0 + n2 - n1)
    assert b["input_ids"][0].tolist() == list(s0.input_ids + s2.input_ids)
    assert b["labels"][0, n0] == IGNORE_INDEX and b["labels"][0, 0] == IGNORE_INDEX
    assert b["labels"][1, n1:].eq(IGNORE_INDEX).all() and b["input_ids"][1, n1:].eq(tok[0].pad_token_id).all()
    assert b["image_counts"] == [1, 1] and b["pixel_values"].shape == (2, 3, 32, 32)
    assert b["num_tokens"] == s0.length + s1.length + s2.length
    assert b["num_positions"] == 2 * (s0.length + s2.length)
    assert b["num_label_tokens"] == sum(1 for s in (s0, s1, s2) for x in s.labels if x != IGNORE_INDEX)
    pad = collate([[(s0, None)], [(s2, None)]], tok[0].pad_token_id, False, N)
    assert pad["seq_idx"] is None


# ------------------------------------------------------------------------- packing through the model

@pytest.fixture(scope="module")
def model():
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny")).eval()


def _per_sample_ce(logits, labels, spans):
    """Summed next-token CE and target count per (row, start, end) span of the expanded sequence."""
    out = []
    for r, a, e in spans:
        lg, tg = logits[r, a:e - 1].float(), labels[r, a + 1:e]
        out.append((F.cross_entropy(lg, tg, ignore_index=IGNORE_INDEX, reduction="sum"), int((tg != -100).sum())))
    return out


def test_packed_rows_give_the_same_per_sample_losses_as_samples_alone(folder, model, processor):
    t, image_id = model.tokenizer, model.image_token_id
    long_conv = [{"from": "human", "value": "<image>\nWhat colour is the big square on the left?"},
                 {"from": "gpt", "value": "It is blue, with a small red dot."},
                 {"from": "human", "value": "And the circle?"}, {"from": "gpt", "value": "Green."}]
    records = [rec(0), rec(1, image="b.png", conv=long_conv),
               rec(2, image=None, conv=[{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "Hi!"}]),
               rec(3, image="b.png")]
    ds = make(folder, (t, image_id), records, model.image_processor)
    S = ds.samples
    loaded = [(s, ds.load_images(s) if s.images else None) for s in S]

    def run(rows, packing):
        b = collate(rows, t.pad_token_id, packing, ds.N)
        ids = model.tokenize_instructions(b["instructions"]) if b["instructions"] else None
        with torch.no_grad():
            out = model(b["input_ids"], b["pixel_values"], b["labels"], ids, b["image_counts"], b["seq_idx"])
        return b, out

    # the packed batch: rows [s0, s1] and [s2, s3]
    b, out = run([loaded[:2], loaded[2:]], True)
    spans = []
    for r, segs in enumerate(b["segments"]):
        width = torch.where(b["input_ids"][r] == image_id, ds.N, 1)
        start = torch.cumsum(width, 0) - width  # expanded position of each input position
        for _, a, e in segs:
            spans.append((r, int(start[a]), int(start[e - 1] + width[e - 1])))
    packed = _per_sample_ce(out.logits, out.labels, spans)
    align_packed = out.loss["align"]
    alone, align_alone, alone_logits = [], [], []
    for x in loaded:
        bx, ox = run([[x]], False)
        alone += _per_sample_ce(ox.logits, ox.labels, [(0, 0, ox.logits.shape[1])])
        alone_logits.append(ox.logits[0])
        if x[1] is not None:
            align_alone.append(ox.loss["align"])
    for (r, a, e), lg in zip(spans, alone_logits):
        torch.testing.assert_close(out.logits[r, a:e], lg, rtol=1e-5, atol=1e-5)
    for (lp, np_), (la, na) in zip(packed, alone):
        assert np_ == na > 0
        torch.testing.assert_close(lp, la, rtol=1e-5, atol=1e-5)
    # the pixel loss is a mean over images: the packed batch's equals the mean of the images alone
    torch.testing.assert_close(align_packed, torch.stack(align_alone).mean(), rtol=1e-5, atol=1e-6)
    # the check can fail: the same row without seq_idx leaks the first sample into the second's logits
    b2 = collate([loaded[:2]], t.pad_token_id, True, ds.N)
    ids = model.tokenize_instructions(b2["instructions"])
    with torch.no_grad():
        o2 = model(b2["input_ids"], b2["pixel_values"], b2["labels"], ids, b2["image_counts"], None)
    r, a, e = spans[1]
    assert (o2.logits[r, a:e] - alone_logits[1]).abs().max() > 1e-2
