"""EmmaMamba end to end on the tiny preset: placeholder splicing against a per-token loop, losses against
hand computations, gradients, exact equality with the Cobra-style baseline at initialisation, the
alignment head (causal, learns, absent after an inference load), save/load, generation and the info report."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import skimage
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

import emma_mamba
from emma_mamba.config import ConfigError, get_preset
from emma_mamba.models.vlm import EmmaMamba, answer, build_chat_prompt

DATA = os.path.dirname(skimage.data.__file__)
IMAGES = [os.path.join(DATA, f) for f in ("astronaut.png", "chelsea.png", "camera.png")]
TEXTS = ["<image>\nWhat is this? A man in a space suit.", "Compare <image> and <image>. A cat, then a camera."]
INSTRUCTIONS = ["What is this?", "Compare", "Compare"]


def make_model(**overrides) -> EmmaMamba:
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    for section, values in overrides.items():
        for k, v in values.items():
            setattr(getattr(cfg, section), k, v)
    return EmmaMamba(cfg)


@pytest.fixture(scope="module")
def model():
    return make_model()


def make_batch(model):
    tok = model.tokenizer
    ids = [tok.encode(t) for t in TEXTS]
    L = max(map(len, ids))
    input_ids = torch.full((len(ids), L), tok.pad_token_id)
    labels = torch.full((len(ids), L), -100)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.tensor(x)
    labels[input_ids == model.image_token_id] = -100
    return dict(input_ids=input_ids, pixel_values=model.image_processor(IMAGES), labels=labels,
                instruction_ids=model.tokenize_instructions(INSTRUCTIONS))


def loop_splice(model, input_ids, visual, labels):
    """Oracle: expand placeholders token by token, right-pad with zeros / -100."""
    embed = model.lm.get_input_embeddings()
    rows, row_labels, k = [], [], 0
    for r in range(input_ids.shape[0]):
        e, lab = [], []
        for j, t in enumerate(input_ids[r].tolist()):
            if t == model.image_token_id:
                e.extend(visual[k])
                lab.extend([-100] * visual.shape[1])
                k += 1
            else:
                e.append(embed.weight[t])
                lab.append(int(labels[r, j]))
        rows.append(torch.stack(e))
        row_labels.append(lab)
    L = max(len(x) for x in rows)
    out = torch.zeros(len(rows), L, embed.weight.shape[1])
    lab_out = torch.full((len(rows), L), -100)
    for r, (x, lab) in enumerate(zip(rows, row_labels)):
        out[r, : len(x)] = x
        lab_out[r, : len(lab)] = torch.tensor(lab)
    return out, lab_out


@torch.no_grad()
def test_splice_matches_token_loop_and_logits(model):
    model.eval()
    b = make_batch(model)
    visual = model.encode_images(b["pixel_values"], b["instruction_ids"])
    assert visual.shape == (3, 16, 64)
    embeds, labels, _, (rows, starts) = model._splice(b["input_ids"], visual, b["labels"], None, None, None)
    ref_embeds, ref_labels = loop_splice(model, b["input_ids"], visual, b["labels"])
    assert torch.equal(embeds, ref_embeds) and torch.equal(labels, ref_labels)
    assert rows.tolist() == [0, 1, 1]
    for k in range(3):
        assert torch.equal(embeds[rows[k], starts[k]: starts[k] + 16], visual[k])
    out = model(**b)
    assert torch.equal(out.logits, model.lm(inputs_embeds=ref_embeds).logits)
    assert torch.equal(out.labels, ref_labels)


@torch.no_grad()
def test_seq_idx_is_expanded_with_the_placeholder(model):
    b = make_batch(model)
    seq_idx = torch.zeros_like(b["input_ids"], dtype=torch.int32)
    seq_idx[1, 3:] = 1  # row 1 packs two samples; its first placeholder (position 1) is in sample 0
    visual = torch.randn(3, 16, 64)
    _, _, new, (rows, starts) = model._splice(b["input_ids"], visual, None, seq_idx, None, None)
    ids1 = b["input_ids"][1].tolist()
    expect = []
    for j, t in enumerate(ids1):
        expect += [int(seq_idx[1, j])] * (16 if t == model.image_token_id else 1)
    assert new[1, : len(expect)].tolist() == expect


def test_losses_match_hand_computation(model):
    model.eval()
    b = make_batch(model)
    with torch.no_grad():
        out = model(**b)
        logits = out.logits.float()
        V = logits.shape[-1]
        lm_ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), out.labels[:, 1:].reshape(-1), ignore_index=-100)
        torch.testing.assert_close(out.loss["lm"], lm_ref)

        # alignment: hidden states at the visual positions, targets cut and normalised by hand
        embeds, _ = loop_splice(model, b["input_ids"], model.encode_images(b["pixel_values"], b["instruction_ids"]),
                                b["labels"])
        hs = model.lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        rows, starts = out.image_positions
        hidden = [torch.stack([hs[i][r, s: s + 16] for r, s in zip(rows.tolist(), starts.tolist())])
                  for i in model.config.align.lm_layers]
        pred = model.align_head.predict(hidden)  # (3, 16, 8*8*3)
        images = b["pixel_values"] * model.image_processor.std + model.image_processor.mean  # back to [0, 1]
        target = torch.empty(3, 16, 192)
        for n in range(3):
            for gy in range(4):
                for gx in range(4):
                    patch = images[n, :, gy * 8:(gy + 1) * 8, gx * 8:(gx + 1) * 8].permute(1, 2, 0).reshape(-1)
                    target[n, gy * 4 + gx] = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
        align_ref = ((pred[:, :-1] - target[:, 1:]) ** 2).mean()  # token i predicts patch i + 1
        torch.testing.assert_close(out.loss["align"], align_ref, rtol=1e-5, atol=1e-6)
        w = model.config.align.loss_weight
        torch.testing.assert_close(out.loss["total"], lm_ref + w * align_ref, rtol=1e-5, atol=1e-6)


def test_align_head_is_causal(model):
    head = model.align_head
    hidden = [torch.randn(1, 16, 64) for _ in head.in_norms]
    with torch.no_grad():
        a = head.predict(hidden)
        hidden[0][:, 9] += 5.0
        b = head.predict(hidden)
    assert torch.equal(a[:, :9], b[:, :9])  # tokens before 9 never see token 9
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_placeholder_mismatch_names_the_sample(model):
    b = make_batch(model)
    with pytest.raises(ValueError, match=r"sample 'q18' \(row 1\): 2 <image> placeholder\(s\) .* but 1 image"):
        model(**b, image_counts=[1, 1], sample_ids=["q17", "q18"])
    with pytest.raises(ValueError, match=r"3 <image> placeholder\(s\) in the batch \(sample 0: 1, sample 1: 2\) "
                                         r"but 2 image\(s\)"):
        model(b["input_ids"], b["pixel_values"][:2], b["labels"], b["instruction_ids"][:2])
    with pytest.raises(ValueError, match="instruction fusion is enabled: pass instruction_ids"):
        model(b["input_ids"], b["pixel_values"], b["labels"])


def _grad_nonzero(p):
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_forward_backward_every_trainable_module_gets_gradient():
    m = make_model().set_stage("finetune")
    m.train()
    b = make_batch(m)
    out = m(**b)
    assert set(out.loss) == {"lm", "align", "total"} and all(torch.isfinite(v) for v in out.loss.values())
    out.loss["total"].backward()
    modules = {"mff": m.mff, "instruction": torch.nn.ModuleList([m.instruction.text_proj, m.instruction.token_mixer]),
               "projector": m.projector, "lm": m.lm, "align_head": m.align_head}
    for name, mod in modules.items():
        assert any(_grad_nonzero(p) for p in mod.parameters()), name
    assert all(p.grad is None for p in m.vision.parameters())
    assert all(p.grad is None for p in m.instruction.text_model.parameters())
    # zero-initialised gates block their inputs' gradient on step 0 only: after one step every trainable
    # parameter tensor receives gradient
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
    opt.step()
    opt.zero_grad()
    m(**b).loss["total"].backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and not _grad_nonzero(p)]
    assert not missing, missing


def test_pretrain_stage_trains_only_the_bridge():
    m = make_model().set_stage("pretrain")
    m(**make_batch(m)).loss["total"].backward()
    assert all(p.grad is None and not p.requires_grad for p in m.lm.parameters())
    assert all(p.grad is None for p in m.align_head.parameters())
    assert any(_grad_nonzero(p) for p in m.projector.parameters())
    # the frozen (random) head adds no loss: the bridge's gradient is the LM loss's alone
    b = make_batch(m)
    out = m(**b)
    assert out.loss["align"].item() == 0.0 and torch.equal(out.loss["total"], out.loss["lm"])
    m.set_stage("finetune")
    assert m(**b).loss["align"].item() > 0  # trained in stage 2: its loss is back
    with pytest.raises(ValueError, match="unknown stage 'stage3'"):
        m.set_stage("stage3")


def test_explicit_trainable_modules_override_the_stage():
    # a from-scratch LM trained on stage-1 captions: exactly the listed modules get gradient
    m = make_model(vision={"freeze": False}).set_stage("pretrain", ["vision", "projector", "lm"])
    m.train()
    m(**make_batch(m)).loss["total"].backward()
    idle = {id(p) for p in m.vision.idle_parameters}  # what the taps never run (test_vision checks the list)
    assert idle
    for mod in (m.vision, m.projector, m.lm):
        assert all(p.requires_grad == (id(p) not in idle) for p in mod.parameters())
        assert any(_grad_nonzero(p) for p in mod.parameters())
    for mod in (m.mff, m.instruction, m.align_head):
        assert all(p.grad is None and not p.requires_grad for p in mod.parameters())
    # the default finetune stage trains an unfrozen ViT; an explicit list without it does not
    m.set_stage("finetune")
    assert all(p.requires_grad == (id(p) not in idle) for p in m.vision.parameters())
    m.set_stage("finetune", ["lm"])
    assert not any(p.requires_grad for p in m.vision.parameters())
    assert not any(p.requires_grad for p in m.instruction.text_model.parameters())
    with pytest.raises(ValueError, match="vision.freeze is true"):
        make_model().set_stage("pretrain", ["vision"])
    with pytest.raises(ValueError, match="unknown module"):
        m.set_stage("pretrain", ["lm", "decoder"])
    with pytest.raises(ValueError, match="'align_head' but this model has none"):
        make_model(align={"enabled": False}).set_stage("finetune", ["align_head"])


@torch.no_grad()
def test_equals_cobra_like_baseline_at_init():
    # MFF and instruction fusion start as exact identities, so the full EMMA model equals the penultimate-
    # layer-only model (no MFF, no instruction fusion) holding the same encoder, projector and LM weights.
    emma = make_model().eval()
    cobra = make_model(vision={"taps": [1]}, mff={"mode": "none"}, instruction={"enabled": False},
                       align={"enabled": False}).eval()
    shared = {k: v for k, v in emma.state_dict().items() if k.split(".")[0] in ("vision", "projector", "lm")}
    missing, unexpected = cobra.load_state_dict(shared, strict=False)
    assert not unexpected and not missing
    b = make_batch(emma)
    a = emma(b["input_ids"], b["pixel_values"], instruction_ids=b["instruction_ids"]).logits
    c = cobra(b["input_ids"], b["pixel_values"]).logits
    assert torch.equal(a, c)


def test_align_loss_falls_when_overfitting_one_batch():
    m = make_model().set_stage("finetune")
    m.train()
    b = make_batch(m)
    opt = torch.optim.Adam(m.align_head.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = m(**b).loss
        losses.append(float(loss["align"].detach()))
        opt.zero_grad()
        loss["align"].backward()
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses


def test_save_load_roundtrip_and_inference_drops_align_head(tmp_path):
    m = make_model().eval()
    b = make_batch(m)
    d = m.save(tmp_path / "ckpt")
    assert {p.name for p in d.iterdir()} >= {"config.yaml", "model.safetensors", "tokenizer.json"}
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert any(k.startswith("align_head.") for k in f.keys())  # the training model wrote its head

    inf = emma_mamba.load(d)
    assert inf.align_head is None and not inf.for_training
    assert not any(k.startswith("align_head") for k in inf.state_dict())
    assert inf.image_token_id == m.image_token_id
    assert not any(p.requires_grad for p in inf.parameters())
    with torch.no_grad():
        ref = m(**b)
        got = inf(**b)
    assert torch.equal(ref.logits, got.logits)
    assert float(got.loss["align"]) == 0.0 and torch.equal(got.loss["total"], got.loss["lm"])
    assert torch.equal(got.loss["lm"], ref.loss["lm"])

    train = emma_mamba.load(d, for_training=True)
    for (k, v), (k2, v2) in zip(m.align_head.state_dict().items(), train.align_head.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        emma_mamba.load(tmp_path / "nothing")
    m = make_model(align={"enabled": False})
    d = m.save(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is a file; load takes the checkpoint directory "
                                                r"written by EmmaMamba\.save \(here perhaps .*ckpt\)"):
        emma_mamba.load(d / "model.safetensors")
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    cfg["lm"]["d_model"] = 96
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"lm\..* has shape .*, the config builds"):
        emma_mamba.load(d)
    cfg["lm"]["d_modle"] = 64
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="unknown config key 'd_modle'"):
        emma_mamba.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        emma_mamba.load(d)


@torch.no_grad()
def test_generate_streams_and_matches_greedy_oracle(model):
    from emma_mamba.inference.generate import GenerationConfig

    model.eval()
    prompt = "What is in the picture?"
    text = build_chat_prompt(prompt, 1, model.config.image_token)
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=None)
    chunks = []
    res = model.generate(text, [IMAGES[1]], [prompt], config=cfg, streamer=chunks.append)
    assert "".join(chunks) == res.texts[0]
    assert len(res.sequences[0]) == 6
    # oracle: greedy decoding by full forwards over the growing sequence (no cache)
    embeds = model.prompt_embeds(text, [IMAGES[1]], [prompt])
    emb = model.lm.get_input_embeddings()
    seq = []
    for _ in range(6):
        x = torch.cat([embeds, emb(torch.tensor([seq], dtype=torch.long))], dim=1) if seq else embeds
        logits = model.lm(inputs_embeds=x).logits[0, -1, : model.lm.config.vocab_size]
        seq.append(int(logits.argmax()))
    assert res.sequences[0] == seq
    # the CLI-facing helper: the chat prompt, the instruction = the question, greedy, stops at EOS
    out = []
    got = answer(model, IMAGES[1], prompt, streamer=out.append, max_new_tokens=6)
    assert "".join(out) == got
    eos = model.tokenizer.eos_token_id
    expect = seq[: seq.index(eos)] if eos in seq else seq
    assert got == model.tokenizer.decode(expect)


@torch.no_grad()
def test_batch_embeds_encode_every_prompts_images_together_as_one_by_one(model, monkeypatch):
    """Prompts with 1, 0 and 2 images (and instruction fusion): the images of all prompts encoded together, two
    per vision forward (across the prompts' boundaries), give each prompt the embeddings of the token-by-token
    splice of its images encoded one at a time; the vision tower runs twice for three images, not three times."""
    model.eval()
    prompts = ["<image>\nWhat is this?", "Name a colour.", "Compare <image> and <image>."]
    images = [[IMAGES[0]], [], [IMAGES[1], IMAGES[2]]]
    instructions = [["What is this?"], None, ["Compare", "Compare them"]]
    ids = [model.tokenizer.encode(p) for p in prompts]
    monkeypatch.setattr(type(model), "ENCODE_BATCH", 2)
    calls = []
    hook = model.vision.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        got = model.batch_embeds(ids, images, instructions)
    finally:
        hook.remove()
    assert calls == [2, 1]
    for i, (row, ims, ins) in enumerate(zip(ids, images, instructions)):
        visual = torch.cat([model.encode_images(model.image_processor([im]), model.tokenize_instructions([t]))
                            for im, t in zip(ims, ins)]) if ims else torch.zeros(0, 1, 1)
        want, _ = loop_splice(model, torch.tensor([row]), visual, torch.zeros(1, len(row), dtype=torch.long))
        torch.testing.assert_close(got[i], want[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prompt 2: 2 images but 1 instructions"):
        model.batch_embeds(ids, images, [["a"], None, ["b"]])
    with pytest.raises(ValueError, match="3 prompts but 2 image lists"):
        model.batch_embeds(ids, images[:2], instructions)


def test_a_template_argument_without_its_prompt_field_is_refused():
    """build_prompt / answer(template=...): a template without {prompt} dropped the question without a word (an
    image prompt then failed on the placeholder count); another field was a bare KeyError."""
    from emma_mamba.config import ConfigError

    m = make_model()
    assert m.build_prompt("Q?", 0, template="Say: {prompt}") == "Say: Q?"
    for bad, msg in (("Answer briefly.", r"template must contain '\{prompt\}'"),
                     ("{question} {prompt}", r"template may hold only the field \{prompt\}"),
                     ("Q: {{prompt}}\nA:", r"template must contain the field '\{prompt\}' \(its braces not doubled\)")):
        with pytest.raises(ConfigError, match=msg):
            m.build_prompt("What is it?", 1, template=bad)
        with pytest.raises(ConfigError, match=msg):
            answer(m, IMAGES[0], "What is it?", max_new_tokens=2, template=bad)


def test_images_before_the_turn_reach_every_inference_prompt():
    """vision.image_position before_turn: build_prompt (generate, eval, chat, visualize) and answer() put the
    placeholder ahead of the user marker; the default keeps it in the turn."""
    cfg = get_preset("tiny")
    cfg.vision.image_position = "before_turn"
    torch.manual_seed(0)
    m = EmmaMamba(cfg, for_training=False).eval()
    assert m.build_prompt("What is it?") == "<image><|user|>\nWhat is it?<|endoftext|>\n<|assistant|>\n"
    assert make_model().build_prompt("What is it?") == "<|user|>\n<image>\nWhat is it?<|endoftext|>\n<|assistant|>\n"
    seen = []
    real = m.batch_embeds
    m.batch_embeds = lambda ids, *a, **k: (seen.append(list(ids[0])), real(ids, *a, **k))[1]
    answer(m, IMAGES[0], "What is it?", max_new_tokens=2)
    assert seen[0][0] == m.image_token_id  # the visual tokens come first


def test_option_probabilities_equal_the_training_forward(model):
    """Closed-set scoring (VSR's True/False, TallyQA's letters) against the training forward over prompt + reply:
    each option's probability is its reply tokens' (tokenised alone, as training tokenises an answer) product of
    next-token probabilities, renormalised over the options."""
    model.eval()
    tok = model.tokenizer
    questions = ["Is the cat on the left?", "How many objects?"]
    texts = [build_chat_prompt(q, 1, model.config.image_token) for q in questions]
    options = ["True", "False", "A lot more"]  # the last: several tokens
    assert len(tok.encode(options[2])) > 1
    got = model.option_probabilities(texts, [[IMAGES[1]], [IMAGES[0]]], options, [[q] for q in questions])
    V = model.lm.config.vocab_size
    for i, (text, q, img) in enumerate(zip(texts, questions, (IMAGES[1], IMAGES[0]))):
        logp = []
        for o in options:
            prompt_ids, reply = tok.encode(text), tok.encode(o)
            with torch.no_grad():
                out = model(torch.tensor([prompt_ids + reply]), model.image_processor([img]),
                            instruction_ids=model.tokenize_instructions([q]))
            lp = torch.log_softmax(out.logits[0, :, :V].double(), -1)
            start = out.logits.shape[1] - len(reply) - 1  # the expanded position before the reply
            logp.append(sum(float(lp[start + k, t]) for k, t in enumerate(reply)))
        want = torch.softmax(torch.tensor(logp, dtype=torch.float64), 0)
        torch.testing.assert_close(got[i].double(), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="tokenise the same"):
        model.option_probabilities(texts[:1], [[IMAGES[1]]], ["True", "True"], [[questions[0]]])
    # an option spelt several ways: the sum of its spellings' probabilities, then normalised
    alts = model.option_probabilities(texts, [[IMAGES[1]], [IMAGES[0]]], [("True", "true"), "False"],
                                      [[q] for q in questions])
    parts = model.option_probabilities(texts, [[IMAGES[1]], [IMAGES[0]]], ["True", "true", "False"],
                                       [[q] for q in questions])
    torch.testing.assert_close(alts, torch.stack([parts[:, 0] + parts[:, 1], parts[:, 2]], -1))


def test_info_report_for_the_2p8b_preset(capsys):
    from emma_mamba.cli import main
    from emma_mamba.info import report

    rep = report(get_preset("emma-mamba-2.8b"))
    rows = rep["modules"]
    # Mamba-2.8B by hand: per layer in_proj, conv (w + b), x_proj, dt_proj (w + b), A_log, D, out_proj, norm
    d, di, n, r, V, L = 2560, 5120, 16, 160, 50280, 64
    layer = d * 2 * di + di * 4 + di + di * (r + 2 * n) + r * di + di + di * n + di + di * d + d
    assert rows["lm"]["total"] == L * layer + V * d + d
    # instruction fusion by hand: Linear(768 -> 1024) + token mixer Linear(576 + 77 -> 576)
    assert rows["instruction.fusion"]["total"] == 768 * 1024 + 1024 + (576 + 77) * 576 + 576
    assert rep["instruction_fusion_share"] < 0.002 and rep["mff_share"] < 0.01
    assert rows["lm"]["pretrain"] == 0 and rows["lm"]["finetune"] == rows["lm"]["total"]
    assert rows["vision"]["finetune"] == 0
    assert rep["vision_blocks"] == 24 and not rep["vision_overridden"]  # ViT-L/14 as open_clip builds it
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "instruction fusion adds" in out
    # the tiny tower is open_clip's ViT-B-16 config shrunk: the line says what was built (3 blocks of width 32)
    assert out.startswith("tiny: ViT-B-16 (resized by open_clip_overrides: 3 blocks of width 32) taps [0, 1]")
    # a training recipe (its model; the shipped one by name, its local files not there yet) and the Mamba-2 preset
    assert main(["info", "--config", "train_emma-mamba-2.8b_stage1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"]["lm"]["total"] == rows["lm"]["total"]
    m2 = report(get_preset("emma-mamba2-2.7b"))["modules"]["lm"]["total"]
    # Mamba-2 2.7B by hand: per layer in_proj (z, x, B, C, dt), conv over x B C (w + b), dt_bias, A_log, D,
    # gated norm, out_proj, block norm; 80 heads of 64, d_state 128, 1 group; vocabulary padded to 50288
    h, conv = di // 64, di + 2 * 128
    layer2 = d * (di + conv + h) + conv * 4 + conv + 3 * h + di + di * d + d
    assert m2 == L * layer2 + 50288 * d + d


def test_info_weight_and_optimizer_bytes_against_built_models(capsys):
    from emma_mamba.cli import main
    from emma_mamba.info import report

    by = report(get_preset("tiny"))["bytes"]
    full = EmmaMamba(get_preset("tiny"), for_training=True)
    assert by["weights_fp32"] == 4 * sum(p.numel() for p in full.parameters())
    kept = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("align_head."))  # export's
    assert by["inference_bf16"] == 2 * kept < by["weights_bf16"]
    for stage in ("pretrain", "finetune"):
        full.set_stage(stage)
        assert by[f"adamw_{stage}"] == 16 * sum(p.numel() for p in full.parameters() if p.requires_grad), stage
    assert main(["info", "--preset", "emma-mamba-2.8b"]) == 0
    out = capsys.readouterr().out
    assert "weights: 12.0 GiB in fp32, 6.0 GiB in bf16 / fp16" in out  # 3.219B parameters by hand: 4 / 2 bytes


def test_meta_build_allocates_nothing():
    m = EmmaMamba(get_preset("emma-mamba-2.8b"), device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert m.vision.num_tokens == 576 and m.vision.taps == [5, 11, 17, 22]


def test_stage_counts_match_requires_grad():
    m = make_model()
    rows = m.parameter_counts()
    assert sum(r["total"] for r in rows.values()) == sum(p.numel() for p in m.parameters())
    for stage in ("pretrain", "finetune"):
        m.set_stage(stage)
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert trainable == sum(r[stage] for r in rows.values()), stage


def test_labelled_logits_only_gives_the_full_forwards_loss_gradients_and_logits():
    """Training's forward (``labelled_logits_only``, the LM head at the labelled positions only) against the full
    forward: the same losses, the logits at the mask's positions equal the full logits there, the same gradient
    for every parameter; a batch with nothing labelled still reaches every parameter with a zero gradient."""
    m = make_model().set_stage("finetune")
    m.train()
    b = make_batch(m)

    def run(only, batch):
        m.zero_grad(set_to_none=True)
        out = m(**batch, labelled_logits_only=only)
        out.loss["total"].backward()
        return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    full, g_full = run(False, b)
    part, g_part = run(True, b)
    target = F.pad(full.labels[:, 1:], (0, 1), value=-100)
    assert torch.equal(part.logits_mask, target != -100) and full.logits_mask is None
    assert part.logits.shape == (int(part.logits_mask.sum()), full.logits.shape[-1])
    torch.testing.assert_close(part.logits, full.logits[part.logits_mask], rtol=1e-6, atol=1e-6)
    for k in ("lm", "align", "total"):
        torch.testing.assert_close(part.loss[k], full.loss[k], rtol=1e-6, atol=1e-7)
    assert g_full.keys() == g_part.keys() and g_full
    for n in g_full:
        torch.testing.assert_close(g_part[n], g_full[n], rtol=1e-5, atol=1e-7, msg=n)
    nothing = {**b, "labels": torch.full_like(b["labels"], -100)}
    out, g = run(True, nothing)
    assert float(out.loss["lm"]) == 0.0 and out.logits.shape[0] == 0
    assert set(g) >= {n for n, p in m.lm.named_parameters(prefix="lm") if p.requires_grad}
    with pytest.raises(ValueError, match="labelled_logits_only needs labels"):
        m(b["input_ids"], b["pixel_values"], instruction_ids=b["instruction_ids"], labelled_logits_only=True)
    lm, ids = m.lm, b["input_ids"][:, :9]
    mask = torch.rand(ids.shape) < 0.5
    torch.testing.assert_close(lm(ids, logits_mask=mask).logits, lm(ids).logits[mask], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="logits_mask must be a bool tensor of the inputs' shape"):
        lm(ids, logits_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="give num_last_tokens or logits_mask, not both"):
        lm(ids, logits_mask=mask, num_last_tokens=1)


@torch.no_grad()
def test_text_only_batch(model):
    ids = torch.tensor([model.tokenizer.encode("Just text, no picture.")])
    out = model(ids, labels=ids)
    assert torch.equal(out.logits, model.lm(input_ids=ids).logits)
    assert float(out.loss["align"]) == 0.0
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) in the batch \(sample 0: 1\) but 0 image"):
        model(torch.tensor([model.tokenizer.encode("<image> where is it?")]))


def test_text_only_batch_in_modality_lockstep_touches_the_image_branch_with_zeros():
    """Under FSDP (modality_lockstep) a text-only micro-batch runs the image branch on a blank image x 0: the
    same losses and LM gradients as without, and a gradient (of zeros) for every trainable parameter of the
    image branch, so every process reduces the same parameters (FSDP2 skips parameters without one)."""
    m = make_model().set_stage("finetune")
    m.train()
    ids = torch.tensor([m.tokenizer.encode("Just text, no picture.")])
    plain = m(ids, labels=ids)
    plain.loss["total"].backward()
    want = {n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    m.modality_lockstep = True
    ghost = m(ids, labels=ids)
    (ghost.loss["lm"] + ghost.loss["align"]).backward()
    assert torch.equal(ghost.loss["lm"], plain.loss["lm"]) and ghost.loss["align"].item() == 0.0
    assert torch.equal(ghost.logits, plain.logits)
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif want[n] is not None:
            torch.testing.assert_close(p.grad, want[n], rtol=0, atol=0, msg=lambda s: f"{n}: {s}")
        else:  # the image branch: untouched without lockstep, a zero gradient with it
            assert n.split(".")[0] in ("mff", "instruction", "projector", "align_head"), n
            assert p.grad is not None and not p.grad.any(), n
    assert any(want[n] is None for n, p in m.named_parameters() if p.requires_grad)  # the branch was skipped
    # inference and micro-batches with images never take the blank image
    with torch.no_grad():
        assert torch.equal(m(ids).logits, plain.logits)


def test_token_outside_embedding_is_a_clear_error(model):
    ids = torch.tensor([[1, 2, 3], [4, 60000, 5]])
    with pytest.raises(ValueError, match=r"sample 1: token id 60000 at position 1 is outside the LM embedding"):
        model(ids)


def test_every_lm_config_field_reaches_the_mamba_config():
    # model.lm (the YAML face) and MambaConfig (the model's) are separate dataclasses: every LMConfig field but
    # the loading ones must exist in MambaConfig and arrive there unchanged, or a YAML key would do nothing
    from dataclasses import fields

    from emma_mamba.config import LMConfig, ModelConfig
    from emma_mamba.models.mamba import MambaConfig
    from emma_mamba.models.vlm import LM_LOADING_FIELDS, _mamba_config

    model_fields = {f.name for f in fields(MambaConfig)}
    shape_fields = [f.name for f in fields(LMConfig) if f.name not in LM_LOADING_FIELDS]
    assert set(shape_fields) <= model_fields, set(shape_fields) - model_fields
    lm = LMConfig(d_model=48, n_layer=3, vocab_size=77, d_state=4, d_conv=3, expand=3, dt_rank=5, conv_bias=False,
                  bias=True, rms_norm_eps=1e-6, residual_in_fp32=False, pad_vocab_size_multiple=16,
                  tie_embeddings=False, initializer_range=0.05, ssm_layer="mamba2", headdim=24, ngroups=2)
    got = _mamba_config(ModelConfig(lm=lm), MambaConfig)
    for name in shape_fields:  # every value differs from both classes' defaults, so a dropped field fails
        assert getattr(got, name) == getattr(lm, name) != getattr(MambaConfig(), name), name


@torch.no_grad()
def test_packed_rows_compute_what_the_samples_compute_alone():
    """Samples with one, no and two images (one starting with its image) packed into rows with seq_idx, the images
    in order of appearance: each sample's logits, and the LM and alignment losses (token- and image-weighted means
    of the samples' own), equal those of every sample run alone. Instruction fusion and MFF are moved off their
    identity initialisation, so an instruction or image reaching the wrong sample would show."""
    m = make_model()
    g = torch.Generator().manual_seed(1)
    for n, p in m.named_parameters():
        if n.split(".")[0] in ("mff", "instruction", "projector") and ".text_model." not in n:
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    m.eval()
    tok = m.tokenizer
    samples = [("<image>\nWhat is this? A man in a space suit.", IMAGES[:1], ["What is this?"]),
               ("Just some text without a picture here.", [], []),
               ("Compare <image> and <image>. A cat, then a camera.", IMAGES[1:3], ["Compare", "Compare them"]),
               ("<image> Describe it. A cat.", IMAGES[1:2], ["Describe it."])]

    def encode(text):
        ids = tok.encode(text)
        labels = [-100 if (j == 0 or t == m.image_token_id) else t for j, t in enumerate(ids)]  # as data.collate
        return ids, labels

    alone = []
    for text, images, inst in samples:
        ids, labels = encode(text)
        out = m(torch.tensor([ids]), m.image_processor(images) if images else None, torch.tensor([labels]),
                m.tokenize_instructions(inst) if inst else None)
        n_lab = sum(x != -100 for x in labels[1:])
        alone.append((out.logits[0], out.loss["lm"] * n_lab, n_lab, out.loss["align"] * len(images), len(images)))

    rows = [[0, 1, 2], [3, 1]]
    L = max(sum(len(tok.encode(samples[i][0])) for i in r) for r in rows)
    input_ids = torch.full((2, L), tok.pad_token_id)
    labels = torch.full((2, L), -100)
    seq_idx = torch.zeros((2, L), dtype=torch.int32)
    images, inst, counts = [], [], []
    for r, row in enumerate(rows):
        pos = 0
        for k, i in enumerate(row):
            ids, lab = encode(samples[i][0])
            input_ids[r, pos:pos + len(ids)], labels[r, pos:pos + len(ids)] = torch.tensor(ids), torch.tensor(lab)
            seq_idx[r, pos:pos + len(ids)] = k
            pos += len(ids)
            images += samples[i][1]
            inst += samples[i][2]
        seq_idx[r, pos:] = len(row)
        counts.append(sum(len(samples[i][1]) for i in row))
    out = m(input_ids, m.image_processor(images), labels, m.tokenize_instructions(inst), image_counts=counts,
            seq_idx=seq_idx)
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            n = alone[i][0].shape[0]
            torch.testing.assert_close(out.logits[r, pos:pos + n], alone[i][0], rtol=1e-4, atol=1e-4)
            pos += n
    every = [alone[i] for row in rows for i in row]
    torch.testing.assert_close(out.loss["lm"], sum(a[1] for a in every) / sum(a[2] for a in every))
    torch.testing.assert_close(out.loss["align"], sum(a[3] for a in every) / sum(a[4] for a in every))


def test_a_tokenizer_with_ids_beyond_the_embedding_is_refused(tmp_path):
    # e.g. the GPT-NeoX-20B file as released (50281 ids with its chat tokens) under a 50280-row LM: such a token
    # could not be embedded. A saved model's tokenizer, holding only the image placeholder beyond the rows, loads.
    from emma_mamba.models.tokenizer import load_tokenizer

    rows = get_preset("tiny").lm.vocab_size  # 50280, a multiple of 8: no padding rows
    tok = load_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(rows - len(tok) + 1)], special=False)
    assert len(tok) == rows + 1
    tok.save(tmp_path / "big")
    with pytest.raises(ConfigError, match=rf"lm.tokenizer: .* has {rows + 1} token ids but the LM's embedding has "
                                          rf"{rows} rows"):
        make_model(lm={"tokenizer": str(tmp_path / "big")})
    fits = load_tokenizer()
    fits.add_tokens([f"<extra_{i}>" for i in range(rows - len(fits))], special=False)
    fits.add_tokens([get_preset("tiny").image_token])
    fits.save(tmp_path / "fits")
    m = make_model(lm={"tokenizer": str(tmp_path / "fits")})
    assert m.image_token_id == rows and len(m.tokenizer) == rows + 1


def test_a_loaded_model_keeps_the_vits_idle_parameters_out_of_training(tmp_path):
    """Defect: emma_mamba.load (and a run's init_from) loads with assign=True, which puts new Parameter objects in
    the model; the ViT's list of parameters its taps never run still held the old ones, so an unfrozen stage 2
    from a saved model made them trainable (15 in the tiny model: in the optimizer, in the trainable count, and a
    DDP crash with find_unused_parameters false). Oracle: autograd, which reaches exactly what the taps run."""
    m = make_model(vision={"freeze": False})
    m.save(tmp_path / "ckpt")
    loaded = emma_mamba.load(tmp_path / "ckpt", for_training=True)
    loaded.set_stage("finetune")
    loaded.train()
    params = dict(loaded.vision.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    for p in params.values():  # the oracle asks autograd about every one
        p.requires_grad_(True)
    grads = torch.autograd.grad(loaded(**make_batch(loaded)).loss["total"], list(params.values()),
                                allow_unused=True)
    reached = {n for (n, _), g in zip(params.items(), grads) if g is not None}
    assert 0 < len(reached) < len(params)
    assert trainable == reached
    fresh = make_model(vision={"freeze": False}).set_stage("finetune")
    assert {n for n, p in fresh.vision.named_parameters() if p.requires_grad} == reached


@pytest.mark.parametrize("overrides, says", [
    ({"instruction": {"text_layer": 7}}, "instruction.text_layer: block index 7 is out of range for the text "
                                         "tower's 2 blocks (valid -2..1"),
    ({"instruction": {"text_layer": -3}}, "instruction.text_layer: block index -3 is out of range"),
    ({"mff": {"mode": "cross_attn", "num_heads": 5}}, "mff.num_heads (5) must divide the ViT width (32)"),
    ({"mff": {"mode": "cross_attn"}, "vision": {"taps": [1]}}, "mff.mode 'cross_attn' needs at least two taps"),
])
def test_model_values_found_wrong_at_build_are_config_errors_naming_the_key(overrides, says, tmp_path, capsys):
    """Defect: instruction.text_layer beyond the text tower was accepted and failed in the first forward inside
    open_clip ("feature index 7 is out of range", no key named); MFF's head count and tap count were ValueErrors,
    which the commands printed as tracebacks. Both are ConfigErrors now: one line naming the key."""
    with pytest.raises(ConfigError) as e:
        make_model(**overrides)
    assert says in str(e.value)
    cfg = {"preset": "tiny", **overrides}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    from emma_mamba.cli import main

    assert main(["info", "--config", str(tmp_path / "m.yaml")]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_a_model_with_lora_adapters_saved_from_python_loads_as_a_plain_model(tmp_path):
    """Defect: EmmaMamba.save of a model given adapters in Python (apply_lora) wrote the raw lora_A / lora_B
    tensors, and emma_mamba.load refused the folder ("unexpected ['lm.layers.0.mixer.in_proj.lora_A', ...]").
    Now it is written as a training run writes it: merged, the adapters beside it. Oracle: the adapted model's
    own logits."""
    from emma_mamba.models.lora import LORA_FILE, apply_lora

    m = make_model().eval()
    apply_lora(m.lm, r=4, alpha=8)
    with torch.no_grad():
        for n, p in m.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # B starts at zero: the adapters must change the model for the test to mean it
    b = make_batch(m)
    b.pop("labels")
    with torch.no_grad():
        want = m(**b).logits
    emma_mamba.save(m, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / LORA_FILE).is_file()
    got = emma_mamba.load(tmp_path / "ckpt").eval()
    assert not any("lora_" in k for k in got.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(got(**b).logits, want, rtol=1e-4, atol=1e-4)
    make_model().save(tmp_path / "ckpt")  # a plain model saved over it leaves no adapters of another model
    assert not (tmp_path / "ckpt" / LORA_FILE).exists()


def test_answer_keeps_the_callers_eos_ids_beside_the_tokenizers():
    """Defect: stops() replaced a config's EOS ids by the tokenizer's: answer(config=GenerationConfig(
    eos_token_id=[0, t])) ran past t to max_new_tokens, where model.generate stopped at it. Oracle: the greedy
    answer without that id, whose first token is t."""
    from emma_mamba.inference.generate import GenerationConfig

    m = make_model().eval()
    image = IMAGES[0]
    free = answer(m, image, "What is shown?", config=GenerationConfig(max_new_tokens=4), return_result=True)
    first = free.sequences[0][0] if free.sequences[0] else free.final_tokens[0]
    res = answer(m, image, "What is shown?", config=GenerationConfig(max_new_tokens=4, eos_token_id=[0, first]),
                 return_result=True)
    assert res.finish_reasons == ["eos"] and res.sequences == [[]]
    assert m.stops(GenerationConfig(eos_token_id=[5, 187])).eos_ids == {5, 187, m.tokenizer.eos_token_id}
    assert m.stops(GenerationConfig(eos_token_id=None)).eos_ids == {m.tokenizer.eos_token_id}


def test_one_image_given_without_its_list_is_taken_as_that_image():
    """Defect: images=path (or a PIL image, an array) for one prompt was iterated: a path character by character
    ("70 images but 1 instructions", "image file not found: /"), an array row by row, a PIL image "not iterable";
    a batch's flat list of one image per prompt likewise. Taken as that image now, as transformers' processors
    take it; oracle: the same call with the lists written out."""
    from PIL import Image

    from emma_mamba.inference.generate import GenerationConfig

    m = make_model().eval()
    cfg = m.stops(GenerationConfig(max_new_tokens=3))
    q, path = "What is shown?", IMAGES[0]
    prompt = m.build_prompt(q, 1)
    want = m.generate(prompt, [path], [q], config=cfg).texts
    pil = Image.open(path)
    for one in (path, pil, np.asarray(pil.convert("RGB"))):
        assert m.generate(prompt, one, q, config=cfg).texts == want
    batch = m.generate([prompt, prompt], [[path], [path]], [[q], [q]], config=cfg).texts
    assert m.generate([prompt, prompt], [path, path], [q, q], config=cfg).texts == batch == want * 2
    with pytest.raises(ValueError, match=r"2 prompts but one image \(str\): pass one list of images per prompt"):
        m.generate([prompt, prompt], path, [q, q], config=cfg)
    with pytest.raises(ValueError, match="the prompt holds '<image>', the model's image placeholder"):
        answer(m, path, "Compare <image> with this", max_new_tokens=2)


def test_a_question_with_an_image_is_stripped_as_training_strips_it(model):
    """The turn that holds the image is stripped in training (LLaVA's preprocess_multimodal) and every message in
    `serve`: answer() / chat / eval build it stripped too (a trailing newline from a file gave other prompt ids and
    another greedy answer). A text-only prompt is left as written, as training leaves its turns."""
    from emma_mamba.data.llava import LLAVA_IMAGE_TOKEN

    raw = "  What is in the picture? \n"
    tok = model.config.image_token
    # training's turn for a one-image record (emma_mamba/data/llava.py): the placeholder, then the stripped text
    trained = f"{tok}\n" + (LLAVA_IMAGE_TOKEN + "\n" + raw).replace(LLAVA_IMAGE_TOKEN, "").strip()
    assert model.build_prompt(raw, 1) == model.config.chat.prompt_template.format(prompt=trained)
    assert model.build_prompt(raw, 1) == model.build_prompt(raw.strip(), 1)
    assert model.build_prompt(raw, 0) == model.config.chat.prompt_template.format(prompt=raw)
