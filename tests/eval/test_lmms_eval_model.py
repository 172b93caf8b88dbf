"""`python -m lmms_eval --model emma_mamba`: the lmms-eval model (emma_mamba.eval.lmms_eval_model).

Oracles: EmmaMamba.generate on the chat prompt built by hand (build_chat_prompt with the question and one
placeholder per image, the way emma-mamba eval asks), emma-mamba eval's own answers to the same POPE questions,
and, for the log-likelihoods (which the model computes with option_logprobs: one prefill per document, each option
continued from a copy of the state), one full forward over prompt and continuation together, by hand. The model is a tiny random EmmaMamba whose LM weights are noisy enough that its greedy
reply depends on the image and every prompt token (a plain random one answers the same for any prompt)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import skimage
import torch

pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is not installed (pip install lmms-eval)")

from lmms_eval.api.instance import Instance  # noqa: E402

from emma_mamba.config import get_preset  # noqa: E402
from emma_mamba.inference.generate import GenerationConfig, option_logprobs  # noqa: E402
from emma_mamba.models.vision import load_image  # noqa: E402
from emma_mamba.models.vlm import EmmaMamba, build_chat_prompt, load  # noqa: E402

DATA = os.path.join(os.path.dirname(skimage.__file__), "data")
ASTRONAUT, COFFEE, CHELSEA = (os.path.join(DATA, f) for f in ("astronaut.png", "coffee.png", "chelsea.png"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmms") / "ckpt"
    torch.manual_seed(0)
    m = EmmaMamba(get_preset("tiny"))
    with torch.no_grad():
        for p in m.lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    m.save(d)
    return d


@pytest.fixture(scope="module")
def oracle(ckpt):
    return load(ckpt).eval()


@pytest.fixture(scope="module")
def adapter(ckpt):
    from emma_mamba.eval.lmms_eval_model import EmmaMambaLMMS

    return EmmaMambaLMMS(pretrained=str(ckpt), device="cpu", batch_size=2, max_new_tokens=7)


def _docs(adapter, docs):
    adapter.task_dict = {"t": {"test": docs}}


def _visual(doc):
    return [load_image(p) for p in doc["images"]]


def _gen(i, context, **gen_kwargs):
    return Instance("generate_until", (context, gen_kwargs, _visual, i, "t", "test"), idx=0,
                    metadata={"task": "t", "doc_id": i, "repeats": 1})


def _instructions(oracle, question, images):
    assert oracle.instruction is not None  # the tiny preset fuses the instruction: the tests cover that path
    return [question] * len(images)


def _alone(oracle, question, images, **cfg):
    """The greedy reply to one question asked by hand (instruction fusion sees the question, as emma-mamba eval
    gives it): its text and token ids (and with ``counts=True`` the prompt's positions)."""
    counts = cfg.pop("counts", False)
    prompt = build_chat_prompt(question, len(images), oracle.config.image_token)
    cfg.setdefault("max_new_tokens", 7)
    res = oracle.generate(prompt, [load_image(p) for p in images], _instructions(oracle, question, images),
                          config=GenerationConfig(eos_token_id=oracle.tokenizer.eos_token_id, **cfg))
    return (res.texts[0], res.sequences[0]) + ((res.prompt_lengths[0],) if counts else ())


def test_the_entry_point_gives_lmms_eval_this_class():
    from lmms_eval.models import get_model

    from emma_mamba.eval.lmms_eval_model import EmmaMambaLMMS

    assert get_model("emma_mamba") is EmmaMambaLMMS


def test_generate_until_answers_each_request_as_asked_alone(adapter, oracle):
    docs = [{"images": [ASTRONAUT]}, {"images": [COFFEE]}, {"images": [CHELSEA, COFFEE]}, {"images": []},
            {"images": [CHELSEA]}]
    _docs(adapter, docs)
    questions = ["Is there a cat?", "What is in the cup?", "Which picture shows an animal?", "Say hello.",
                 "Is there a cat?"]
    # mixed settings (two groups: batched apart, answered in the requests' order); a task's own <image> is moved
    # where training puts the placeholder; do_sample false keeps a temperature greedy
    reqs = [_gen(0, questions[0], max_new_tokens=5), _gen(1, questions[1]), _gen(2, questions[2], max_new_tokens=5),
            _gen(3, questions[3]), _gen(4, "<image>\n" + questions[4], temperature=0.7, do_sample=False)]
    got = adapter.generate_until(reqs)
    want = [_alone(oracle, questions[0], docs[0]["images"], max_new_tokens=5, counts=True),
            _alone(oracle, questions[1], docs[1]["images"], counts=True),
            _alone(oracle, questions[2], docs[2]["images"], max_new_tokens=5, counts=True),
            _alone(oracle, questions[3], docs[3]["images"], counts=True),
            _alone(oracle, questions[4], docs[4]["images"], counts=True)]
    assert [g.text for g in got] == [w[0].strip() for w in want]
    assert len({g.text for g in got}) >= 4  # the replies depend on the question and image (else this shows little)
    # token counts: the prompt's positions (visual tokens included: more with two images, none without) and the
    # reply's tokens
    assert [(g.token_counts.input_tokens, g.token_counts.output_tokens) for g in got] == \
        [(w[2], len(w[1])) for w in want]
    assert want[2][2] > want[4][2] > want[3][2]


def test_until_cuts_the_reply_before_the_stop_string(adapter, oracle):
    _docs(adapter, [{"images": [ASTRONAUT]}])
    full, _ = _alone(oracle, "Describe it.", [ASTRONAUT], max_new_tokens=12)
    stop = full.strip()[len(full.strip()) // 2:][:3]
    assert stop.strip(), full
    got = adapter.generate_until([_gen(0, "Describe it.", max_new_tokens=12, until=[stop])])
    assert [g.text for g in got] == [full[:full.index(stop)].strip()]


def _full_forward_loglikelihood(oracle, question, image, continuation_ids):
    """log P(continuation | prompt) and the greedy flag by hand: one forward over the prompt and continuation
    together, each continuation token's log-softmax (real vocabulary) at the position before it."""
    prompt_ids = oracle.tokenizer.encode(build_chat_prompt(question, 1, oracle.config.image_token))
    embeds = oracle.batch_embeds([prompt_ids + continuation_ids], [[load_image(image)]],
                                 [_instructions(oracle, question, [image])])
    n, vocab = len(continuation_ids), oracle.lm.config.vocab_size
    with torch.no_grad():
        logits = oracle.lm(inputs_embeds=embeds[0][None]).logits[0, -n - 1:-1, :vocab].float()
    logp = torch.log_softmax(logits, dim=-1)
    ids = torch.tensor(continuation_ids)
    return float(logp[torch.arange(n), ids].sum()), bool((logits.argmax(-1) == ids).all())


def test_loglikelihood_equals_the_options_likelihood_and_reports_greedy(adapter, oracle, monkeypatch):
    """Two documents' options, interleaved: each request's log-likelihood and greedy flag equal one full forward
    over its prompt and continuation (by hand), in the requests' order; each document's images are encoded and
    its prompt prefilled once for all its options."""
    _docs(adapter, [{"images": [COFFEE]}, {"images": [CHELSEA]}])
    questions = ["What is in the cup?", "Is there a cat?"]
    greedy_text = oracle.tokenizer.decode(_alone(oracle, questions[0], [COFFEE], max_new_tokens=3)[1])
    assert oracle.tokenizer.decode(oracle.tokenizer.encode(greedy_text.lstrip())) == greedy_text.lstrip()
    asked = [(0, greedy_text), (1, "Yes"), (0, "Tea."), (1, "No, a dog."), (0, "Coffee")]
    reqs = [Instance("loglikelihood", (questions[d], " " + c, _visual, d, "t", "test"), idx=0,
                     metadata={"task": "t", "doc_id": d, "repeats": 1}) for d, c in asked]
    encodes = []
    real = adapter.model.batch_embeds
    monkeypatch.setattr(adapter.model, "batch_embeds", lambda *a, **k: encodes.append(a[1]) or real(*a, **k))
    got = adapter.loglikelihood(reqs)
    assert len(encodes) == 2  # one per document, not one per option
    want = [_full_forward_loglikelihood(oracle, questions[d], [COFFEE, CHELSEA][d],
                                        oracle.tokenizer.encode(c.lstrip())) for d, c in asked]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-4, abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert got[0][1] and not got[2][1]  # the greedy reply is greedy, "Tea." is not
    assert len({round(g[0], 3) for g in got}) == 5


def test_option_logprobs_greedy_flags_against_greedy_decoding(oracle):
    """option_logprobs(greedy=True): an option is greedy exactly when it is a prefix of the greedy reply."""
    prompt = build_chat_prompt("Describe it.", 1, oracle.config.image_token)
    embeds = oracle.batch_embeds([oracle.tokenizer.encode(prompt)], [[load_image(ASTRONAUT)]],
                                 [_instructions(oracle, "Describe it.", [ASTRONAUT])])
    reply = oracle.generate(prompt, [load_image(ASTRONAUT)], _instructions(oracle, "Describe it.", [ASTRONAUT]),
                            config=GenerationConfig(max_new_tokens=4)).sequences[0]
    assert len(reply) == 4
    wrong = (reply[1] + 1) % oracle.lm.config.vocab_size
    options = [reply[:1], reply[:4], reply[:1] + [wrong], [(reply[0] + 1) % oracle.lm.config.vocab_size]]
    logp, greedy = option_logprobs(oracle.lm, options, inputs_embeds=embeds, greedy=True)
    assert greedy[0].tolist() == [True, True, False, False]
    assert torch.equal(logp, option_logprobs(oracle.lm, options, inputs_embeds=embeds))


def test_what_it_cannot_do_is_an_error_naming_it(adapter, ckpt):
    from emma_mamba.eval.lmms_eval_model import EmmaMambaLMMS

    _docs(adapter, [{"images": ["clip.mp4"]}])
    with pytest.raises(ValueError, match=r"task 't' document 0 .*str.*clip\.mp4.*images only"):
        adapter.generate_until([Instance("generate_until", ("Q", {}, lambda d: d["images"], 0, "t", "test"), idx=0,
                                         metadata={"task": "t", "doc_id": 0, "repeats": 1})])
    _docs(adapter, [{"images": [ASTRONAUT]}])
    with pytest.raises(ValueError, match="beam search .num_beams=3"):
        adapter.generate_until([_gen(0, "Q", num_beams=3)])
    with pytest.raises(NotImplementedError, match="task 't' is multi-round"):
        adapter.generate_until_multi_round([_gen(0, "Q")])
    with pytest.raises(TypeError, match="unknown temperature"):
        EmmaMambaLMMS(pretrained=str(ckpt), temperature=1)
    with pytest.raises(ValueError, match="pretrained=DIR"):
        EmmaMambaLMMS()
    with pytest.raises(ValueError, match="dtype='int8'"):
        EmmaMambaLMMS(pretrained=str(ckpt), dtype="int8")
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        EmmaMambaLMMS(pretrained=str(ckpt), device="cpu", cuda_graphs="true")


POPE_YAML = """dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: pope_local
test_split: test
output_type: generate_until
process_docs: !function utils.process_docs
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""

# lmms-eval's own POPE prompt and scoring functions, over a local JSON file (its POPE task reads the Hub)
POPE_UTILS = """import datasets
from lmms_eval.tasks.pope.utils import (pope_aggregate_accuracy, pope_doc_to_text, pope_doc_to_visual,
                                        pope_process_results)


def process_docs(ds):
    return ds.cast_column("image", datasets.Image())
"""


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_lmms_eval_pope_gives_emma_mamba_evals_answers(ckpt, tmp_path, nproc):
    """The whole lmms-eval command (its task loading, prompt, batching and scoring) on POPE questions about real
    photographs gives the replies `emma-mamba eval --task pope` gives, and lmms-eval's accuracy of them; under
    torchrun too (lmms-eval shards the documents over the processes and gathers the replies)."""
    from emma_mamba import cli

    pairs = [(im, q) for im in (ASTRONAUT, COFFEE, CHELSEA) for q in ("Is there a cat in the image?",
                                                                     "Is there a cup in the image?")]
    recs = [{"question_id": str(i), "question": q, "answer": "yes" if i % 2 else "no", "image": im,
             "category": "adversarial"} for i, (im, q) in enumerate(pairs)]
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "ours.jsonl").write_text("".join(json.dumps({"question_id": r["question_id"], "image": r["image"],
                                                             "text": r["question"], "label": r["answer"]}) + "\n"
                                                 for r in recs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "pope_local.yaml").write_text(POPE_YAML.format(data=tmp_path / "pope.jsonl"))
    (tasks / "utils.py").write_text(POPE_UTILS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                                   if nproc > 1 else [])
    r = subprocess.run(launcher + ["-m", "lmms_eval", "--model", "emma_mamba", "--model_args",
                        f"pretrained={ckpt},device=cpu", "--tasks", "pope_local", "--include_path", str(tasks),
                        "--batch_size", "4", "--log_samples", "--output_path", str(tmp_path / "out")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    samples = [json.loads(line) for f in glob.glob(str(tmp_path / "out" / "*" / "*samples_pope_local.jsonl"))
               for line in open(f)]
    got = {str(s["doc_id"]): s["filtered_resps"] for s in samples}

    assert cli.main(["eval", "--task", "pope", "--questions", str(tmp_path / "ours.jsonl"), "--images", "/",
                     "--checkpoint", str(ckpt), "--max-new-tokens", "8", "--out", str(tmp_path / "ours"),
                     "--device", "cpu", "--no-progress"]) == 0
    ours = {a["question_id"]: a["text"] for a in map(json.loads, open(tmp_path / "ours" / "answers.jsonl"))}
    assert got == ours and len(got) == len(recs)
    assert len(set(ours.values())) >= 4
    results = json.loads(open(glob.glob(str(tmp_path / "out" / "*" / "*_results.json"))[0]).read())
    acc = results["results"]["pope_local"]["pope_accuracy,none"]
    truth = {r["question_id"]: r["answer"] for r in recs}
    assert acc == pytest.approx(sum(ours[k].lower().strip() == truth[k] for k in ours) / len(ours))


def test_each_process_of_a_launch_takes_its_own_gpu():
    from emma_mamba.eval.lmms_eval_model import pick_device

    assert pick_device(None, True, {"LOCAL_RANK": "3"}) == torch.device("cuda", 3)
    assert pick_device("cuda", True, {"LOCAL_RANK": "2"}) == torch.device("cuda", 2)  # lmms-eval's --device cuda
    assert pick_device("cuda", True, {}) == torch.device("cuda", 0)
    assert pick_device("cuda:1", True, {"LOCAL_RANK": "2"}) == torch.device("cuda", 1)  # as given
    assert pick_device(None, False, {"LOCAL_RANK": "1"}) == torch.device("cpu")
    assert pick_device("cpu", True, {"LOCAL_RANK": "1"}) == torch.device("cpu")


def test_without_lmms_eval_the_import_says_what_to_install():
    code = ("import sys; sys.modules['lmms_eval'] = None\n"
            "try:\n    import emma_mamba.eval.lmms_eval_model\nexcept ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT).stdout
    assert "needs lmms-eval" in out and 'pip install "lmms-eval>=0.7.3,<0.8" "filelock<4"' in out
