"""`emma-mamba data check`: every problem of a data file counted and named, against a file built with known
problems; the epoch's rows and steps against a hand count; a clean file exits 0."""

from __future__ import annotations

import json
import math
import shutil

import yaml

from emma_mamba.cli import main
from emma_mamba.training.config import run_config_to_dict
from tests.training.conftest import make_cfg, subset


def _write_run(shapes, tmp_path, data_json, **sections):
    d = run_config_to_dict(make_cfg(shapes, tmp_path / "run", data_json, **sections))
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_every_problem_is_counted_and_named(shapes, tmp_path, capsys):
    good = json.loads(subset(shapes, tmp_path, 10).read_text())
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    first = good[0]["image"]
    (images / "broken.png").write_bytes((images / first).read_bytes()[:60])  # a truncated PNG
    q = [{"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "Shapes."}]
    bad = [
        {"id": "corrupt", "image": "broken.png", "conversations": q},
        {"id": "missing", "image": "nowhere.png", "conversations": q},
        {"id": "role", "image": first, "conversations": [{"from": "user", "value": "Hi"}, q[1]]},
        {"id": "two-placeholders", "image": first, "conversations": [
            {"from": "human", "value": "<image> and <image>?"}, q[1]]},
        {"id": "too-long", "image": first, "conversations": [{"from": "human", "value": "word " * 400}, q[1]]},
        {"id": "text", "conversations": [{"from": "human", "value": "Name a colour."},
                                         {"from": "gpt", "value": "Red."}]},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(good + bad))
    run = _write_run(shapes, tmp_path, data, train={"global_batch_size": 4, "micro_batch_size": 2})
    report = tmp_path / "report.json"
    cleaned = tmp_path / "cleaned.json"
    rc = main(["data", "check", "--config", str(run), "--data.image_folder", str(images), "--workers", "2",
               "--report", str(report), "--write-clean", str(cleaned)])
    out = capsys.readouterr().out
    assert rc == 1 and "problems found" in out
    r = json.loads(report.read_text())
    assert r["records"] == 16 and r["usable"] == 11  # 10 good + the text-only one
    assert r["skipped"] == {"corrupt_image": 1, "missing_image": 1, "bad_role": 1, "placeholder_mismatch": 1,
                            "too_long": 1}
    assert "id 'corrupt'" in r["examples"]["corrupt_image"][0] and "broken.png" in r["examples"]["corrupt_image"][0]
    assert "nowhere.png" in r["examples"]["missing_image"][0]
    assert r["image_failures"] == {"files": 1, "of_files": len({x["image"] for x in good}) + 1}
    assert r["text_only_samples"] == 1 and r["images_per_sample"]["max"] == 1
    # padding: one row per usable sample that the dataset kept (the corrupt one still makes a row at load time)
    assert r["rows_per_epoch"] == 12 and r["steps_per_epoch"] == math.ceil(12 / 4)
    assert "broken.png" in out and "too_long: 1" in out
    # --val checks val.json the same way (here the same file): a report per file
    assert main(["data", "check", "--config", str(run), "--data.image_folder", str(images), "--workers", "1",
                 "--val", "--val.json", str(data), "--val.image_folder", str(images), "--report", str(report)]) == 1
    train_r, val_r = json.loads(report.read_text())
    assert val_r["skipped"] == train_r["skipped"] and val_r["image_failures"] == train_r["image_failures"]
    # the usable records, unchanged and in order; the cleaned file checks clean (also as JSONL)
    assert json.loads(cleaned.read_text()) == good + [bad[-1]]
    assert main(["data", "check", "--config", str(run), "--data.image_folder", str(images), "--workers", "1",
                 "--data.json", str(cleaned)]) == 0
    lines = tmp_path / "data.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    cleaned_lines = tmp_path / "cleaned.jsonl"
    assert main(["data", "check", "--config", str(run), "--data.image_folder", str(images), "--workers", "1",
                 "--data.json", str(lines), "--write-clean", str(cleaned_lines)]) == 1
    assert [json.loads(x) for x in cleaned_lines.read_text().splitlines()] == good + [bad[-1]]
    # an existing file is replaced only with --overwrite; the format follows the name (a .json source's clean
    # copy as JSONL, a .jsonl source's as a JSON list), which training then reads as such
    capsys.readouterr()
    check = ["data", "check", "--config", str(run), "--data.image_folder", str(images), "--workers", "1"]
    before = cleaned_lines.read_bytes()
    assert main(check + ["--write-clean", str(cleaned_lines)]) == 2
    assert "the file exists; choose another name, or add --overwrite" in capsys.readouterr().err
    assert cleaned_lines.read_bytes() == before
    assert main(check + ["--write-clean", str(cleaned_lines), "--overwrite"]) == 1
    assert [json.loads(x) for x in cleaned_lines.read_text().splitlines()] == good + [bad[-1]]
    as_list = tmp_path / "cleaned_from_lines.json"
    assert main(check + ["--data.json", str(lines), "--write-clean", str(as_list)]) == 1
    assert json.loads(as_list.read_text()) == good + [bad[-1]]
    assert main(check + ["--data.json", str(cleaned_lines)]) == 0 and main(check + ["--data.json", str(as_list)]) == 0
    # output paths are checked before the work: a folder, a missing folder
    for opt, path, want in (("--report", tmp_path, "that is a folder"),
                            ("--write-clean", tmp_path / "no" / "x.json", "does not exist")):
        capsys.readouterr()
        assert main(check + ["--no-images", opt, str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{opt} {path}" in err and want in err and "Traceback" not in err
    capsys.readouterr()

    clean = tmp_path / "clean.json"
    clean.write_text(json.dumps(good))
    run2 = _write_run(shapes, tmp_path, clean, data={"packing": True, "max_length": 256},
                      train={"global_batch_size": 2, "micro_batch_size": 1})
    rc = main(["data", "check", "--config", str(run2), "--workers", "1", "--report", str(report)])
    assert rc == 0 and "no problems found" in capsys.readouterr().out
    r = json.loads(report.read_text())
    assert r["usable"] == 10 and r["skipped"] == {} and r["packing"] and 0 < r["fill"] <= 1
    assert r["rows_per_epoch"] < 10 and r["steps_per_epoch"] == math.ceil(r["rows_per_epoch"] / 2)
    assert main(["data", "check", "--config", str(tmp_path / "nope.yaml")]) == 2


def test_a_file_with_no_usable_record_is_a_problem(shapes, tmp_path, capsys):
    """An empty data file (or one whose every record is skipped) passes no check: training refuses it."""
    data = tmp_path / "empty.json"
    data.write_text("[]")
    run = _write_run(shapes, tmp_path, data)
    assert main(["data", "check", "--config", str(run)]) == 1
    out = capsys.readouterr().out
    assert f"{data}: no usable record" in out and "no problems found" not in out


def test_records_kept_but_noted(shapes, tmp_path, capsys):
    """Duplicate ids and records, empty answers and tiny images train, so they do not fail the check; they are
    counted and named as notes (exit 1 only with --strict), each against a count by hand."""
    from PIL import Image

    good = json.loads(subset(shapes, tmp_path, 4).read_text())
    images = tmp_path / "images"
    shutil.copytree(shapes / "images", images)
    Image.new("RGB", (3, 40), (200, 10, 10)).save(images / "sliver.png")  # 3 px wide: far below the input side
    q = [{"from": "human", "value": "<image>\nWhat is there?"}, {"from": "gpt", "value": "Shapes."}]
    noted = [
        dict(good[0], id="copy-of-0"),                                     # duplicate_record (new id)
        {"id": good[1]["id"], "image": good[1]["image"], "conversations": q},  # duplicate_id
        {"id": "empty", "image": good[2]["image"], "conversations": [q[0], {"from": "gpt", "value": "  "}]},
        {"id": "sliver", "image": "sliver.png", "conversations": q},         # small_image
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(good + noted))
    run = _write_run(shapes, tmp_path, data)
    report = tmp_path / "report.json"
    args = ["data", "check", "--config", str(run), "--data.image_folder", str(images), "--workers", "1",
            "--report", str(report)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "4 record(s) kept but noted" in out
    r = json.loads(report.read_text())
    assert r["usable"] == 8 and r["skipped"] == {}
    assert r["notes"] == {"duplicate_record": 1, "duplicate_id": 1, "empty_answer": 1, "small_image": 1}
    ex = r["note_examples"]
    assert "record 4 (id 'copy-of-0')" in ex["duplicate_record"][0] and ex["duplicate_record"][0].endswith("record 0")
    assert "record 5" in ex["duplicate_id"][0] and ex["duplicate_id"][0].endswith("the id of record 1")
    assert "record 6 (id 'empty')" in ex["empty_answer"][0] and "turn 1" in ex["empty_answer"][0]
    assert "sliver.png is 3x40 pixels" in ex["small_image"][0]
    assert main(args + ["--strict"]) == 1 and "(--strict: exit 1)" in capsys.readouterr().out
    assert main(args[:-2] + ["--data.json", str(subset(shapes, tmp_path, 4)), "--strict"]) == 0  # nothing noted


def test_instructions_the_text_tower_truncates_are_counted(shapes, tmp_path, capsys):
    """Instruction fusion truncates an instruction longer than the text tower's context (the tiny preset's: 24
    tokens); training warned of 547 at its end, data check said nothing. By hand: "a" is one CLIP BPE token, so k
    words are k + 2 tokens with <start_of_text> and <end_of_text>: 22 words fit, 23 are cut."""
    image = json.loads((shapes / "train" / "stage2_instruct.json").read_text())[0]["image"]

    def record(i, words):
        question = "<image>\n" + " ".join(["a"] * words)
        return {"id": f"r{i}", "image": image, "conversations": [{"from": "human", "value": question},
                                                                  {"from": "gpt", "value": "yes"}]}

    data = tmp_path / "long.json"
    data.write_text(json.dumps([record(0, 22), record(1, 23), record(2, 40), record(3, 5)]))
    run = _write_run(shapes, tmp_path, data)
    report = tmp_path / "report.json"
    assert main(["data", "check", "--config", str(run), "--report", str(report)]) == 0
    assert "instructions longer than the text tower's 24 tokens (instruction fusion truncates them): 2 of 4" \
        in capsys.readouterr().out
    assert json.loads(report.read_text())["instructions"] == {"count": 4, "context_length": 24,
                                                              "truncated": 2}
