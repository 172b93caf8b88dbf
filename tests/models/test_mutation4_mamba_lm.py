"""Mutation round 4 (MambaLM, MambaCache, the compiled decode step): checks that no earlier test made.

Oracles: transformers' MambaForCausalLM (the residual stream's dtype), the model's own full forward without a
cache (cache concatenation), a hand count (the cache's position counter). Tiny CPU models, the torch reference.
"""

from __future__ import annotations

import pytest
import torch

from emma_mamba import ops
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.models.mamba import MambaCache, MambaLM

from .test_generate import VOCAB, _lm

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_bf16_residual_stream_dtype_is_transformers(tmp_path, residual_in_fp32):
    """A bf16 model keeps the residual stream (the block outputs) in fp32 when residual_in_fp32, in bf16 when
    not: the dtypes of transformers' MambaForCausalLM, block by block, with the same values to bf16 rounding.
    (fp32 models cannot tell the two apart; every other test runs fp32 or never looks at the residual.)"""
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, residual_in_fp32=residual_in_fp32)).eval()
    hf.save_pretrained(tmp_path)
    hf = hf.to(torch.bfloat16)
    lm = MambaLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad(), ops.use_backend("torch"):
        ref = hf(ids, output_hidden_states=True).hidden_states  # block outputs, then the final-normed output
        ours = lm(ids, output_hidden_states=True).hidden_states  # embeddings, then block outputs
    want = torch.float32 if residual_in_fp32 else torch.bfloat16
    for i in range(2):
        assert ref[i].dtype == want  # the oracle's own dtype, as documented
        assert ours[i + 1].dtype == ref[i].dtype, i
        torch.testing.assert_close(ours[i + 1].float(), ref[i].float(), rtol=0.05, atol=0.05)


def _row_logits(lm, ids):
    with torch.no_grad():
        return lm(torch.as_tensor([ids])).logits[0]


def test_cache_cat_of_a_live_and_a_fresh_cache_continues_each_row():
    """MambaCache.cat of a prefilled cache and a fresh one takes the larger offset ("nonzero marks the states as
    live"): a chunk prefilled on top of the joined cache continues row 0's context and starts row 1 afresh, as
    full forwards of each row's whole sequence (with the smaller offset, 0, row 0's state was taken as empty)."""
    lm = _lm(seed=2)
    ctx = torch.randint(0, VOCAB, (6,)).tolist()
    more = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad(), ops.use_backend("torch"):
        live = lm.allocate_cache(1)
        lm(torch.tensor([ctx]), cache=live)
        joined = MambaCache.cat([live, lm.allocate_cache(1)])
        assert joined.seqlen_offset == len(ctx)
        got = lm(more, cache=joined).logits
        want0 = _row_logits(lm, ctx + more[0].tolist())[-5:]
        want1 = _row_logits(lm, more[1].tolist())
    torch.testing.assert_close(got[0], want0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want1, rtol=1e-4, atol=1e-4)


def test_compiled_decode_steps_advance_the_continued_cache():
    """generate(cache=..., compile=...): the compiled step holds the cache's counter at 0 while the graph runs and
    must advance it afterwards; the continued cache then holds prompt + every new token but the last one picked,
    counted by hand, as the eager decode leaves it (a chat counts its context by this number)."""
    pytest.importorskip("torch._dynamo")
    lm = _lm(seed=5)
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    n = 6
    caches = []
    for comp in (False, "aot_eager"):
        cache = lm.allocate_cache(1)
        with ops.use_backend("torch"):
            res = generate(lm, input_ids=prompt, cache=cache,
                           config=GenerationConfig(max_new_tokens=n, eos_token_id=None, compile=comp))
        assert res.finish_reasons == ["length"] and len(res.sequences[0]) == n
        caches.append(res.cache)
    torch._dynamo.reset()
    for c in caches:
        assert c.seqlen_offset == len(prompt) + n - 1
