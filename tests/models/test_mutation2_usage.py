"""Mutation round 2: ``/v1/completions`` usage when an answer ends on the end-of-sequence token.

Oracle: ``generate``'s documented ``sequences`` ("new token ids per prompt, EOS excluded"), the same convention
as ``/v1/chat/completions`` (its ``completion_tokens`` are the answer's tokens), and a hand count: with greedy
decoding made to pick the EOS after k tokens, the answer has k tokens, in the plain and the
streamed (include_usage) completions response."""
from __future__ import annotations

import copy

import pytest
import torch

from emma_mamba.config import get_preset
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.inference.server import ChatService
from emma_mamba.models.vlm import EmmaMamba


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


def test_completion_tokens_of_an_answer_ending_on_eos_exclude_the_eos(model):
    lm = model.lm
    tok = copy.copy(model.tokenizer)
    prompt = "Describe the shapes in the picture"
    ids = tok.encode(prompt)
    picked = generate(lm, input_ids=ids, config=GenerationConfig(max_new_tokens=8, eos_token_id=None)).sequences[0]
    # the greedy answer's first token not seen before it becomes the EOS (the tiny random model may repeat one
    # token: then its first token, k = 0, an empty answer): the answer ends on the EOS after k tokens
    k = next((i for i in range(1, len(picked)) if picked[i] not in picked[:i]), 0)
    tok.eos_token_id = picked[k]
    svc = ChatService(lm, tokenizer=tok, defaults=GenerationConfig(max_new_tokens=8))
    try:
        out = svc.text_completion({"prompt": prompt, "max_tokens": 8})
        assert out["choices"][0]["finish_reason"] == "stop"
        want = generate(lm, input_ids=ids, config=GenerationConfig(max_new_tokens=8, eos_token_id=picked[k]))
        assert want.finish_reasons[0] == "eos" and len(want.sequences[0]) == k  # the oracle: k tokens, no EOS
        assert out["usage"]["completion_tokens"] == k
        assert out["usage"]["prompt_tokens"] == len(ids)
        assert out["usage"]["total_tokens"] == len(ids) + k
        # streamed with include_usage: the last chunk's usage is the same count
        events = []
        svc.stream_text_completion({"prompt": prompt, "max_tokens": 8, "stream": True,
                                    "stream_options": {"include_usage": True}}, lambda: None, events.append)
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == k
    finally:
        svc.close()
