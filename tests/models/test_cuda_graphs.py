"""Decoding with CUDA graphs (GenerationConfig.cuda_graphs) against plain decoding.

On the CPU the capture strategy is :class:`EagerReplay` (each "replay" re-runs the captured step on the same
static buffers), which checks everything around the graph: the static cache and token buffer, the copies in
and out, a batch whose rows finish at different steps, reuse and recapture. The `gpu` test replays real CUDA
graphs. Oracle: generate() without graphs.
"""

from __future__ import annotations

import pytest
import torch

from emma_mamba.inference import cuda_graphs
from emma_mamba.inference.chat import ChatSession
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.models.tokenizer import load_tokenizer

from .test_generate import VOCAB, _lm


@pytest.fixture
def lm():
    model = _lm(seed=7)
    yield model
    cuda_graphs.release(model)


def _cfg(n, graphs, eos=None):
    return GenerationConfig(max_new_tokens=n, eos_token_id=eos, cuda_graphs=graphs)


def test_graph_decoding_equals_eager_with_rows_finishing_at_different_steps(lm):
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 9, 6)]
    free = generate(lm, input_ids=prompts, config=_cfg(12, False)).sequences
    eos = free[1][3]  # row 1 stops after 3 tokens; the others run on (or stop where they meet the same token)
    want = generate(lm, input_ids=prompts, config=_cfg(12, False, eos))
    api = cuda_graphs.EagerReplay()
    cuda_graphs.attach(lm, api)
    got = generate(lm, input_ids=prompts, config=_cfg(12, True, eos))
    assert got.sequences == want.sequences and got.finish_reasons == want.finish_reasons
    assert got.finish_reasons[1] == "eos" and "length" in got.finish_reasons
    assert api.captures == 1 and api.replays == got.decode_steps == want.decode_steps
    # the same batch size again: no new capture; another batch size: one more
    assert generate(lm, input_ids=prompts, config=_cfg(12, True, eos)).sequences == want.sequences
    assert api.captures == 1
    assert generate(lm, input_ids=prompts[:2], config=_cfg(5, True)).sequences == \
        generate(lm, input_ids=prompts[:2], config=_cfg(5, False)).sequences
    assert api.captures == 2 and sorted(cuda_graphs.decoder_for(lm).steps) == [2, 3]


def test_a_parameter_changed_in_place_is_captured_again(lm):
    api = cuda_graphs.EagerReplay()
    cuda_graphs.attach(lm, api)
    prompt = torch.randint(0, VOCAB, (5,)).tolist()
    generate(lm, input_ids=prompt, config=_cfg(6, True))
    with torch.no_grad():
        lm.layers[0].mixer.A_log.add_(0.5)  # what an optimizer step does; the mixer caches exp(A_log)
        lm.layers[1].mixer.out_proj.weight.mul_(1.5)
    assert generate(lm, input_ids=prompt, config=_cfg(6, True)).sequences == \
        generate(lm, input_ids=prompt, config=_cfg(6, False)).sequences
    assert api.captures == 2


def test_chat_with_graphs_carries_the_same_state():
    """ChatSession continues the caller's cache: the decoded states are copied back after each turn."""
    tok = load_tokenizer()
    big = _lm(seed=8, vocab=len(tok))
    cuda_graphs.attach(big, cuda_graphs.EagerReplay())
    try:
        sessions = [ChatSession(big, tokenizer=tok, config=GenerationConfig(max_new_tokens=6, cuda_graphs=g))
                    for g in (False, True)]
        for q in ("Hello there.", "And then?", "Why?"):
            a, b = (s.ask(q) for s in sessions)
            assert a == b
            ca, cb = (s._cache for s in sessions)
            assert ca.seqlen_offset == cb.seqlen_offset
            for x, y in zip(ca.conv_states + ca.ssm_states, cb.conv_states + cb.ssm_states):
                torch.testing.assert_close(x, y)
    finally:
        cuda_graphs.release(big)


def test_a_model_built_under_inference_mode_generates():
    """Its parameters are inference tensors, which keep no version counter (the mixers' parameter cache and
    the graph fingerprint fall back to addresses)."""
    with torch.inference_mode():
        model = _lm(seed=11)
    prompt = torch.randint(0, VOCAB, (5,)).tolist()
    want = generate(_lm(seed=11), input_ids=prompt, config=_cfg(6, False)).sequences
    assert generate(model, input_ids=prompt, config=_cfg(6, False)).sequences == want
    cuda_graphs.attach(model, cuda_graphs.EagerReplay())
    try:
        assert generate(model, input_ids=prompt, config=_cfg(6, True)).sequences == want
    finally:
        cuda_graphs.release(model)


def test_graphs_on_a_cpu_model_are_an_error(lm, capsys):
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device, this one is on cpu"):
        generate(lm, input_ids=[1, 2, 3], config=_cfg(4, True))
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        GenerationConfig(cuda_graphs="yes")
    from emma_mamba.cli import main
    assert main(["generate", "--lm", "nowhere", "--prompt", "x", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs a CUDA --device, got cpu" in capsys.readouterr().err
    assert main(["eval", "--task", "pope", "--questions", "q.jsonl", "--images", ".", "--checkpoint", "nowhere",
                 "--device", "cpu", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs a CUDA device (--device cpu)" in capsys.readouterr().err


@pytest.mark.gpu
def test_real_cuda_graphs_decode_like_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _lm(seed=9).cuda()
    try:
        prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 9, 6)]
        want = generate(model, input_ids=prompts, config=_cfg(16, False))
        for _ in range(2):  # the second call replays the graph captured by the first
            got = generate(model, input_ids=prompts, config=_cfg(16, True))
            assert got.sequences == want.sequences
        assert sorted(cuda_graphs.decoder_for(model).steps) == [3]
    finally:
        cuda_graphs.release(model)
