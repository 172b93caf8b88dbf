"""The shipped tokenizer is GPT-NeoX-20B's as the public Mamba checkpoints use it: 50277 ids, nothing more."""

from emma_mamba.models.tokenizer import load_tokenizer


def test_shipped_tokenizer_has_gpt_neox_20b_vocabulary():
    tok = load_tokenizer()
    # 50254 BPE merges' vocabulary + 23 whitespace-run tokens (ids 50254..50276); the Mamba checkpoints pad
    # the embedding to 50280 rows, so every id must stay below that
    assert len(tok) == 50277
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.eos_token_id == 0
    assert tok.token_to_id("<|padding|>") == 1 and tok.pad_token_id == 1
    for extra in ("<|im_start|>", "<|im_end|>", "RWKV"):
        assert tok.token_to_id(extra) is None


def test_chat_words_are_ordinary_bpe_and_round_trip():
    tok = load_tokenizer()
    text = "<|user|>\nWhat colour is the assistant's RWKV hat?</s>\n<|assistant|>\nRed.  Two  spaces\tand tab"
    ids = tok.encode(text)
    assert max(ids) < 50277
    assert tok.decode(ids) == text
    # "assistant" is split by BPE like any word, never mapped to a special id
    assert len(tok.encode(" assistant")) >= 1 and all(i < 50254 for i in tok.encode(" assistant"))


def test_decode_takes_lists_tensors_and_single_ids():
    import torch

    tok = load_tokenizer()
    ids = tok.encode("Hello world")
    want = tok.backend.decode(ids)  # the tokenizers library itself
    assert tok.decode(ids) == tok.decode(torch.tensor(ids)) == tok.decode(tuple(ids)) == want
    assert tok.decode(torch.tensor(ids[0])) == tok.decode(ids[0]) == tok.backend.decode(ids[:1])


def test_token_bytes_join_split_characters_and_match_gpt2s_byte_alphabet():
    import pytest

    tok = load_tokenizer()
    tok.add_tokens(["<image>"])
    text = "😀 日本語\n\n    x\t<image> café<|endoftext|>"
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # pieces of split characters are in it
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    with pytest.raises(ValueError, match="outside the tokenizer's 50278 ids"):
        tok.token_bytes(50278)
    # the alphabet against transformers' own table (GPT-2's bytes_to_unicode), byte by byte
    slow = pytest.importorskip("transformers.convert_slow_tokenizer")
    from emma_mamba.models.tokenizer import _byte_alphabet

    assert _byte_alphabet() == {c: b for b, c in slow.bytes_to_unicode().items()}


def test_token_bytes_of_a_byte_fallback_vocabulary():
    """SentencePiece-style vocabularies spell the bytes of a character they lack as <0xF0> ... tokens (each
    decodes to U+FFFD alone): their bytes are those bytes, so they join to the character."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models

    from emma_mamba.models.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "a": 1, "b": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    hf = HF(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = Tokenizer(hf, "byte-fallback test")
    ids = tok.encode("a😀b")
    assert len(ids) == 6 and tok.decode(ids[1:2]) == "\ufffd"  # 😀 as four byte tokens
    assert b"".join(tok.token_bytes(i) for i in ids) == "a😀b".encode()
