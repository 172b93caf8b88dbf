"""Mutation round 4 (emma_mamba.models.vlm, emma_mamba.inference.visualize): what the inference helpers hand the
model. Instruction fusion is the identity at initialisation, so a wrong instruction text changes no output of a
fresh model: these tests read the arguments the helpers pass instead (the contract: the instruction is the user's
question, not the chat-formatted prompt; EOS is the tokenizer's). Also a negative token id's error and the mode
``load`` leaves a model in."""

from __future__ import annotations

import pytest
import torch

import emma_mamba
from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig
from emma_mamba.models.vlm import EmmaMamba, answer
from tests.models.test_vlm import IMAGES


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    assert cfg.instruction.enabled
    return EmmaMamba(cfg, for_training=False).eval()


def _capture_generate(model, monkeypatch):
    seen = {}
    real = model.generate

    def spy(prompts, images=(), instructions=None, config=None, streamer=None):
        seen.update(prompts=prompts, images=images, instructions=instructions, config=config)
        return real(prompts, images, instructions, config=config, streamer=streamer)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_answer_fuses_the_question_not_the_chat_prompt(model, monkeypatch):
    seen = _capture_generate(model, monkeypatch)
    answer(model, IMAGES[0], "What is it?", max_new_tokens=1)
    assert seen["prompts"] == "<|user|>\n<image>\nWhat is it?<|endoftext|>\n<|assistant|>\n"
    assert seen["instructions"] == ["What is it?"]


def test_answer_with_a_config_keeps_its_options_but_stops_at_the_tokenizers_eos(model, monkeypatch):
    seen = _capture_generate(model, monkeypatch)
    cfg = GenerationConfig(max_new_tokens=2, temperature=0.0, eos_token_id=None, top_k=7)
    answer(model, IMAGES[0], "What is it?", config=cfg)
    got = seen["config"]
    assert got.eos_token_id == 0 == model.tokenizer.token_to_id("<|endoftext|>")
    assert (got.max_new_tokens, got.top_k) == (2, 7)
    assert cfg.eos_token_id is None  # the caller's config is not modified


def test_a_negative_token_id_is_named_not_an_index_error(model):
    with pytest.raises(ValueError, match=r"sample 1: token id -5 at position 2 is outside the LM embedding"):
        model(torch.tensor([[1, 2, 3], [4, 5, -5]]))


def test_load_for_training_is_ready_for_finetune_and_loads_are_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    d = EmmaMamba(get_preset("tiny")).save(tmp_path / "ck")
    inf = emma_mamba.load(d)
    assert not inf.training and not any(m.training for m in inf.modules())
    tr = emma_mamba.load(d, for_training=True)
    assert not tr.training
    # the finetune stage (STAGES): the bridge, the LM and the alignment head train; the frozen ViT and the CLIP
    # text tower of instruction fusion do not
    for name in ("mff", "projector", "lm", "align_head"):
        params = list(getattr(tr, name).parameters())
        assert params and all(p.requires_grad for p in params), name
    assert all(p.requires_grad for n, p in tr.instruction.named_parameters() if not n.startswith("text_model."))
    assert not any(p.requires_grad for p in tr.instruction.text_model.parameters())
    assert not any(p.requires_grad for p in tr.vision.parameters())


def test_visualize_fuses_the_question_not_the_chat_prompt(model, monkeypatch):
    from emma_mamba.inference.visualize import activation_maps

    seen = []
    real = model.embeds_from_ids
    monkeypatch.setattr(model, "embeds_from_ids",
                        lambda ids, images=(), instructions=None: (seen.append(instructions),
                                                                   real(ids, images, instructions))[1])
    activation_maps(model, IMAGES[1], "Where is the cat?", layers=[0])
    assert seen == [["Where is the cat?"]]


@torch.no_grad()
def test_seq_idx_of_a_padded_rows_tail_repeats_its_last_sample(model):
    """Row 0 (one image) is shorter than row 1 (two images) after the splice: its padded tail takes row 0's last
    sequence index, as every expanded position takes its source token's."""
    N = model.vision.num_tokens
    p = model.image_token_id
    ids = torch.tensor([[5, p, 6, 7, 8], [p, 9, p, 10, 11]])
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.int32)
    visual = torch.randn(3, N, model.lm.config.d_model)
    _, _, new, _ = model._splice(ids, visual, None, seq_idx, None, None)
    want0 = [0] + [0] * N + [1, 1, 1]  # hand expansion of row 0 ...
    want0 += [1] * (2 * N + 3 - len(want0))  # ... and its padding up to row 1's length
    want1 = [0] * N + [0] + [0] * N + [1, 1]
    assert new.tolist() == [want0, want1]


@torch.no_grad()
def test_batch_embeds_pairs_each_image_with_its_own_instruction():
    """With instruction fusion moved off its identity initialisation, the images of several prompts encoded together
    (a text-only prompt between them) each get their own instruction: the embeddings of each image encoded alone
    with its instruction (the reference path), spliced at its placeholder."""
    torch.manual_seed(0)
    m = EmmaMamba(get_preset("tiny"), for_training=False).eval()
    mixer = m.instruction.token_mixer
    mixer.weight.add_(torch.randn_like(mixer.weight) * 0.1)
    prompts = ["<image>\nWhat is this?", "Name a colour.", "Compare <image> and <image>."]
    images = [[IMAGES[0]], [], [IMAGES[1], IMAGES[2]]]
    instructions = [["What is this?"], None, ["Compare the first", "then count the second"]]
    ids = [m.tokenizer.encode(p) for p in prompts]
    got = m.batch_embeds(ids, images, instructions)

    def alone(image, text):
        return m.encode_images(m.image_processor([image]), m.tokenize_instructions([text]))[0]

    assert not torch.allclose(alone(IMAGES[0], "What is this?"), alone(IMAGES[0], "Compare the first"))
    emb = m.lm.get_input_embeddings()
    for row, ims, ins, g in zip(ids, images, instructions, got):
        parts, k = [], 0
        for t in row:
            if t == m.image_token_id:
                parts.append(alone(ims[k], ins[k]))
                k += 1
            else:
                parts.append(emb.weight[t][None])
        torch.testing.assert_close(g, torch.cat(parts), rtol=1e-5, atol=1e-5)
