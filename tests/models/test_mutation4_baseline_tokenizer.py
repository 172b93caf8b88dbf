"""Mutation round 4 (emma_mamba.models.baseline, emma_mamba.models.tokenizer): the transformer baseline takes the
EmmaMamba's dtype and returns its KV cache from its own forward; the tokenizer's pad fallback, decode's default
and token_bytes of added (special) tokens."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as HF
from tokenizers import decoders, models

from emma_mamba.config import get_preset
from emma_mamba.models.tokenizer import Tokenizer, load_tokenizer
from emma_mamba.models.vlm import EmmaMamba

transformers = pytest.importorskip("transformers")


def _emma(dtype=None):
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.align.enabled = False
    return EmmaMamba(cfg, for_training=False, dtype=dtype).eval()


def test_baseline_lm_takes_the_emma_dtype():
    from emma_mamba.models.baseline import TransformerMLLM

    emma = _emma(torch.bfloat16)
    assert emma.lm.embeddings.weight.dtype == torch.bfloat16
    base = TransformerMLLM.from_emma(emma)
    assert {p.dtype for p in base.lm.parameters()} == {torch.bfloat16}


@pytest.mark.filterwarnings("error::FutureWarning")  # e.g. transformers' shim for a cache keyword it deprecates
def test_baseline_forward_fills_the_callers_cache_for_the_next_step():
    import inspect

    from emma_mamba.models.baseline import TransformerMLLM

    emma = _emma()
    base = TransformerMLLM.from_emma(emma).eval()
    H, W = emma.vision.image_size
    pixels = torch.randn(1, 3, H, W)
    inst = emma.tokenize_instructions(["Describe it."])
    ids = torch.tensor([emma.tokenizer.encode(emma.build_prompt("Describe it."))])
    L = ids.shape[1] - 1 + emma.vision.num_tokens  # the placeholder expanded to the N visual tokens
    with torch.no_grad():
        cache = transformers.DynamicCache()
        out = base(ids, pixels, inst, past_key_values=cache)
        assert cache.get_seq_length() == L  # the caller's cache holds the expanded prompt
        kw = "cache" if "cache" in inspect.signature(type(base.lm).forward).parameters else "past_key_values"
        assert getattr(out, kw) is cache  # under this release's name
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = base.lm(input_ids=nxt, use_cache=True, **{kw: cache}).logits[0, -1]  # this release's keyword
        embeds = base._splice(ids, base.encode_images(pixels, inst), None, None, None, None)[0]
        full = base.lm(inputs_embeds=torch.cat([embeds, base.lm.get_input_embeddings()(nxt)], 1),
                       use_cache=False).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


def test_decode_leaves_special_tokens_out_by_default():
    tok = load_tokenizer()
    ids = tok.encode("Hi.<|endoftext|>")
    assert ids[-1] == 0
    assert tok.decode(ids) == "Hi."
    assert tok.decode(ids, skip_special_tokens=False) == "Hi.<|endoftext|>"


def test_pad_falls_back_to_eos_when_the_vocabulary_has_no_pad_token():
    vocab = {"<unk>": 0, "a": 1, "</s>": 2}
    tok = Tokenizer(HF(models.WordLevel(vocab=vocab, unk_token="<unk>")), "no-pad test")
    assert tok.eos_token_id == 2 and tok.pad_token_id == 2
    vocab["<pad>"] = 3
    tok = Tokenizer(HF(models.WordLevel(vocab=vocab, unk_token="<unk>")), "pad test")
    assert tok.pad_token_id == 3


def test_token_bytes_of_a_non_ascii_added_token_join_to_the_decoded_text_even_after_earlier_calls():
    """An added token's bytes are its decoded text's UTF-8, never its spelling read through GPT-2's byte alphabet
    ('\u00ef' is a byte-alphabet character standing for the lone byte 0xEF, not UTF-8); the added-id set is
    refreshed by add_tokens. (The tokenizers library decodes a non-ASCII added token of a byte-level vocabulary
    with U+FFFD: the bytes must join to that text, what a streaming client shows.)"""
    tok = load_tokenizer()
    assert type(tok.backend.decoder) is decoders.ByteLevel
    assert tok.token_bytes(tok.encode("a")[0]) == b"a"  # an earlier call (fills the cached added-id set)
    (i,) = tok.add_tokens(["na\u00efve"])
    ids = tok.encode("a na\u00efve caf\u00e9")
    assert i in ids
    text = tok.decode(ids, skip_special_tokens=False)
    assert b"".join(tok.token_bytes(t) for t in ids) == text.encode("utf-8")
    assert b"\xef" + b"v" not in tok.token_bytes(i)  # not the byte-alphabet reading (a lone 0xEF byte)


def test_heads_narrower_than_64_only_for_widths_under_512():
    from emma_mamba.models.baseline import _head_dim, matched_llama_config
    from emma_mamba.models.mamba import MambaConfig

    assert _head_dim(768) == 64 and _head_dim(480) == 32 and _head_dim(64) == 32 and _head_dim(24) == 8
    with pytest.raises(ValueError, match="hidden width 544 has no head size in"):
        _head_dim(544)  # 544 = 17 x 32: a width of 512 or more gets 64-wide heads or none
    with pytest.raises(ValueError, match="hidden width 544"):
        matched_llama_config(MambaConfig(d_model=544, n_layer=2, vocab_size=1000))


def test_load_tokenizer_reads_a_gzipped_tokenizer_json(tmp_path):
    import gzip
    import os

    import emma_mamba

    src = os.path.join(os.path.dirname(emma_mamba.__file__), "assets", "gpt-neox-20b-tokenizer.json.gz")
    gz = tmp_path / "my-tokenizer.json.gz"
    gz.write_bytes(open(src, "rb").read())
    tok = load_tokenizer(gz)
    with gzip.open(src, "rt", encoding="utf-8") as f:
        ref = HF.from_str(f.read())  # the tokenizers library on the decompressed text
    text = "A grey cat, 12 legs?  Twice."
    assert len(tok) == ref.get_vocab_size(with_added_tokens=True) == 50277
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok.source == str(gz)
