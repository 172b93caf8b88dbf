"""Decode steps through torch.compile (GenerationConfig.compile), alone and under the CUDA-graph decoder.

Oracle: generate() without compile, on the same model and prompts (greedy, so tokens must match exactly;
finish reasons too). Also: the step compiles a bounded number of graphs however many tokens are decoded (the
cache's position counter must not become a per-token constant of the graph).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from emma_mamba.inference import cuda_graphs
from emma_mamba.inference.generate import GenerationConfig, generate

from .test_generate import VOCAB, _lm


def _cfg(n, eos=None, **kw):
    return GenerationConfig(max_new_tokens=n, eos_token_id=eos, **kw)


@pytest.fixture
def prompts_and_eos():
    lm = _lm(seed=7)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 9, 6)]
    free = generate(lm, input_ids=prompts, config=_cfg(12)).sequences
    return lm, prompts, free[1][3]  # row 1 stops after 3 tokens; the batch shrinks from 3 rows to 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_decode_equals_eager_without_recompiling_per_token(prompts_and_eos):
    lm, prompts, eos = prompts_and_eos
    want = generate(lm, input_ids=prompts, config=_cfg(12, eos))
    got = generate(lm, input_ids=prompts, config=_cfg(12, eos, compile="aot_eager"))
    assert got.sequences == want.sequences and got.finish_reasons == want.finish_reasons
    assert got.finish_reasons[1] == "eos" and got.decode_steps == want.decode_steps >= 10
    # batch 3, then 2 and 1 as rows finish: a static graph, one dynamic in the batch, and one for batch 1 (PyTorch
    # specialises size-1 dimensions); more batch sizes and longer runs compile nothing new
    assert counters["stats"]["unique_graphs"] <= 3
    before = counters["stats"]["unique_graphs"]
    generate(lm, input_ids=prompts[:1], config=_cfg(20, compile="aot_eager"))
    generate(lm, input_ids=prompts + prompts, config=_cfg(20, compile="aot_eager"))
    assert counters["stats"]["unique_graphs"] == before


def test_compiled_step_under_the_graph_decoder(prompts_and_eos):
    lm, prompts, eos = prompts_and_eos
    want = generate(lm, input_ids=prompts, config=_cfg(12, eos))
    api = cuda_graphs.EagerReplay()
    cuda_graphs.attach(lm, api)
    try:
        got = generate(lm, input_ids=prompts, config=_cfg(12, eos, cuda_graphs=True, compile="aot_eager"))
        assert got.sequences == want.sequences and got.finish_reasons == want.finish_reasons
        dec = cuda_graphs.decoder_for(lm, compile="aot_eager")
        assert dec.compile == "aot_eager" and api.captures == 1
        # asking for plain steps replaces the decoder (its captures hold compiled steps)
        assert generate(lm, input_ids=prompts, config=_cfg(12, eos, cuda_graphs=True)).sequences == want.sequences
        assert cuda_graphs.decoder_for(lm).compile is False and api.captures == 2
    finally:
        cuda_graphs.release(lm)


def test_inductor_decode_gives_the_same_tokens():
    lm = _lm(seed=3)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 5)]
    want = generate(lm, input_ids=prompts, config=_cfg(8))
    got = generate(lm, input_ids=prompts, config=_cfg(8, compile=True))
    assert got.sequences == want.sequences


def test_bad_compile_setting_is_an_error():
    with pytest.raises(ValueError, match="'inductr' is not a torch.compile backend"):
        GenerationConfig(compile="inductr")
    with pytest.raises(ValueError, match="compile must be True, False or a backend name"):
        GenerationConfig(compile=1)


@pytest.mark.gpu
def test_compiled_step_in_real_cuda_graphs_decodes_like_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = _lm(seed=9).cuda()
    try:
        prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 9, 6)]
        want = generate(model, input_ids=prompts, config=_cfg(16))
        for _ in range(2):
            got = generate(model, input_ids=prompts, config=_cfg(16, cuda_graphs=True, compile=True))
            assert got.sequences == want.sequences
    finally:
        cuda_graphs.release(model)


def test_compiled_blocks_decode_as_eager():
    """compile_blocks (train.compile's) then generate: the trusted decode path's raw kernels are not traceable, so
    a compiled block takes the ops' custom ops; the second decode step raised torch._dynamo's Unsupported."""
    lm = _lm(seed=3)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 3)]
    want = generate(lm, input_ids=prompts, config=_cfg(6)).sequences
    lm.compile_blocks(backend="aot_eager")
    assert generate(lm, input_ids=prompts, config=_cfg(6)).sequences == want
