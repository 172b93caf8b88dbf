"""The text tokenizer: GPT-NeoX-20B's byte-level BPE, as every public Mamba-1 checkpoint uses.

A copy of its ``tokenizer.json`` ships gzipped inside the package (``emma_mamba/assets``, ~0.6 MB) so the tiny
presets, the tests and the CLI work with no download; real checkpoints may bring their own tokenizer directory
(any folder holding a ``tokenizer.json``, as the transformers ``*-hf`` repos and mamba-2.8b-zephyr do).
The shipped copy has 50277 ids: the 50254-entry BPE vocabulary (``<|endoftext|>`` = 0, ``<|padding|>`` = 1)
and 23 whitespace-run tokens. Four chat tokens that some redistributed copies append (``<|im_start|>``,
``<|im_end|>``, ``assistant``, ``RWKV``) are removed: they are not in the Mamba checkpoints' vocabulary, and as
special tokens they would hijack ordinary words such as "assistant" in a chat template.

It is loaded with the ``tokenizers`` library only (never ``transformers.AutoTokenizer``), so loading reads a
JSON file and runs no code from it. :class:`Tokenizer` is a thin wrapper with the handful of calls the rest of
the project needs: ``encode``, ``decode``, ``eos_token_id``, ``pad_token_id``, ``add_tokens``.
"""

from __future__ import annotations

import functools
import gzip
import os
from importlib import resources
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

__all__ = ["Tokenizer", "load_tokenizer", "SHIPPED_TOKENIZER"]

SHIPPED_TOKENIZER = "gpt-neox-20b-tokenizer.json.gz"
"""File name of the shipped GPT-NeoX-20B tokenizer inside ``emma_mamba/assets``."""

# Names GPT-NeoX-style tokenizers use for their special tokens, most specific first.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>")
_PAD_NAMES = ("<|padding|>", "<pad>", "[PAD]")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the project's small interface.

    ``encode`` never adds special tokens (GPT-NeoX has no BOS; chat templates add what they need), and
    ``decode`` keeps special tokens out of the text.
    """

    def __init__(self, tok: _HFTokenizer, source: str):
        self._tok = tok
        self.source = source
        self.eos_token_id = self._first_id(_EOS_NAMES)
        pad = self._first_id(_PAD_NAMES)
        # no pad token: padding never reaches the model (masks decide), so EOS is a safe stand-in
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self._added: set[int] | None = None  # the added tokens' ids (token_bytes)
        self.input_only_ids: set[int] = set()
        """Ids that stand for inputs and are never generated (the VLM's image placeholder: see :meth:`add_tokens`);
        the samplers leave them out, with every id past the tokenizer's last."""

    def _first_id(self, names):
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    @property
    def backend(self) -> _HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (ids run 0..vocab_size-1)."""
        return len(self)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):  # one id (a 0-d tensor, an int), as transformers' decode takes it
            ids = [ids]
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token ``i`` stands for: what OpenAI's ``logprobs`` ``bytes`` carry, so that a client joins a
        character split over several tokens (an emoji, a CJK character: each piece decodes to U+FFFD alone). A
        byte-level BPE token's vocabulary spelling read back through GPT-2's byte alphabet; a byte-fallback token
        (SentencePiece-style vocabularies: ``<0xF0>``) its byte; an added token (special, or the whitespace runs)
        and any other as its decoded text's UTF-8 (what a client is shown: the tokenizers library decodes a
        non-ASCII added token of a byte-level vocabulary through the byte alphabet, e.g. "naïve" as "na\ufffdve";
        the tokens this package adds are ASCII)."""
        spelt = self._tok.id_to_token(int(i))
        if spelt is None:
            raise ValueError(f"token id {i} is outside the tokenizer's {len(self)} ids")
        byte_level = type(self._tok.decoder).__name__ == "ByteLevel"
        if not byte_level and len(spelt) == 6 and spelt.startswith("<0x") and spelt.endswith(">") \
                and int(i) not in self._added_ids():
            try:
                return bytes([int(spelt[3:5], 16)])
            except ValueError:  # "<0xZZ>": an ordinary token after all
                pass
        if byte_level and int(i) not in self._added_ids():
            alphabet = _byte_alphabet()
            if all(c in alphabet for c in spelt):
                return bytes(alphabet[c] for c in spelt)
        return self.decode([int(i)], skip_special_tokens=False).encode("utf-8")

    def _added_ids(self) -> set[int]:
        if self._added is None:  # (reset by add_tokens)
            self._added = set(self._tok.get_added_tokens_decoder())
        return self._added

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def add_tokens(self, tokens: list[str], special: bool = True, input_only: bool = False) -> list[int]:
        """Add tokens (e.g. ``<image>``) that are never split; returns their ids (existing ones keep theirs).
        ``input_only``: the tokens mark inputs (an image's slot) and are never generated (:attr:`input_only_ids`).

        New ids are appended after the current vocabulary; the LM's (padded) embedding must cover them.
        """
        tokens = list(tokens)
        self._added = None
        added = [AddedToken(t, special=special, normalized=False) for t in tokens]
        if special:
            self._tok.add_special_tokens(added)
        else:
            self._tok.add_tokens(added)
        ids = [self._tok.token_to_id(t) for t in tokens]
        if input_only:
            self.input_only_ids.update(ids)
        return ids

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` into directory ``path`` (created if needed); returns the file path."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        out = d / "tokenizer.json"
        self._tok.save(str(out))
        return out

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab={len(self)}, eos={self.eos_token_id})"


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, which byte-level BPE vocabularies are spelt in: {character: the byte it
    stands for}. Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) are themselves; every other
    byte, in increasing order, is ``chr(256 + k)`` for the next k (a space is ``Ġ``, a newline ``Ċ``)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    other = (b for b in range(256) if b not in printable)
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(other)}


def _shipped_json() -> str:
    ref = resources.files("emma_mamba").joinpath("assets", SHIPPED_TOKENIZER)
    try:
        data = ref.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"the shipped tokenizer emma_mamba/assets/{SHIPPED_TOKENIZER} is missing from this installation "
            f"(reinstall the package, or pass a tokenizer directory)") from None
    return gzip.decompress(data).decode("utf-8")


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load a tokenizer.

    ``path`` None: the GPT-NeoX-20B tokenizer shipped with the package. Otherwise a directory containing
    ``tokenizer.json`` (a checkpoint or tokenizer folder) or the path of a ``tokenizer.json`` (or ``.json.gz``).
    """
    if path is None:
        return Tokenizer(_HFTokenizer.from_str(_shipped_json()), source=f"shipped:{SHIPPED_TOKENIZER}")
    p = Path(path)
    if p.is_dir():
        f = p / "tokenizer.json"
        if not f.is_file():
            found = sorted(x.name for x in p.iterdir())[:12]
            raise FileNotFoundError(
                f"tokenizer directory {p} has no tokenizer.json (found: {', '.join(found) or 'nothing'}); "
                f"only the `tokenizers` JSON format is read. Omit the tokenizer path to use the shipped "
                f"GPT-NeoX-20B tokenizer, which all public Mamba-1 checkpoints share")
        p = f
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer path {p} does not exist")
    try:
        if p.name.endswith(".gz"):
            tok = _HFTokenizer.from_str(gzip.decompress(p.read_bytes()).decode("utf-8"))
        else:
            tok = _HFTokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"could not read tokenizer file {p}: {e}") from e
    return Tokenizer(tok, source=str(p))
