"""Multi-turn chat that carries the Mamba state between turns: each turn prefills only its own tokens.

A transformer chat either re-reads the whole history every turn or keeps a KV cache that grows with it. A Mamba
model holds the conversation in a fixed-size recurrent state (per layer a conv window and an SSM state, see
:class:`emma_mamba.models.mamba.MambaCache`), so :class:`ChatSession` keeps that state between turns and feeds
turn k only what is new: the end of the previous answer and the new user turn, prefilled on top of the state
(chunked prefill). The work per turn and the memory do not depend on how long the conversation already is.

The token stream is exactly the one training builds from a multi-turn LLaVA record (:mod:`emma_mamba.data.llava`
with its default template), the answer tokens fed back as they were picked (never re-tokenised)::

    <|user|>\\n<image>\\n{q1}<|endoftext|>\\n<|assistant|>\\n{a1}<|endoftext|>\\n<|user|>\\n{q2}<|endoftext|>\\n...

``<image>`` stands for the image's visual tokens. With instruction-aware fusion the visual tokens are conditioned
on the first question, as in training (the instruction is the text of the human turn that holds the image).
An answer cut by ``max_new_tokens`` or a stop string still gets its end-of-turn token before the next turn.

    session = ChatSession(model, "cat.jpg")
    session.ask("What animal is this?")
    session.ask("What colour is it?")      # prefills ~10 tokens, not the whole history

Since the whole conversation is that state, :meth:`ChatSession.save` writes it to a file of a few MB (the state
the same whatever the conversation's length, plus the turns' text; the image is in it, so it is not needed
again) and :meth:`ChatSession.load` continues it later, in another process, with the tokens an uninterrupted
session would give. The file names the model it belongs to (a fingerprint of the LM's configuration and
weights): another model is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from emma_mamba.config import TURN_END, ChatConfig
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.models.mamba import MambaLM
from emma_mamba.models.vlm import EmmaMamba

__all__ = ["ChatSession", "TurnStats", "model_fingerprint", "pending_tokens"]

STATE_FORMAT = "emma-mamba-chat-state-1"


def pending_tokens(final: int, reason: str, tokenizer, turn_end: str = TURN_END, ended: bool = False) -> list[int]:
    """After an answer, the tokens its state has not consumed: the last pick, and the end-of-turn text when the
    answer did not end on its own (EOS, or ``ended``: a chat format's own turn_end, which it generated) but was
    cut by max_new_tokens or a stop string."""
    return [final] if reason == "eos" or ended else [final] + tokenizer.encode(turn_end)


def model_fingerprint(lm: MambaLM, rounded: bool = True, config_vocab: bool = False) -> str:
    """Identifies the LM a chat state belongs to: its shape and sums of three weight tensors, each weight rounded to
    bf16 first, so that the same checkpoint loaded in fp32 or bf16 (`--dtype`: the CPU's and the GPU's defaults)
    has one fingerprint. The vocabulary is the embedding's rows (the padded size), so that one network has one
    fingerprint in every layout: transformers' writes Mamba-2's 50280 tokens padded to 16 as a vocab_size of
    50288, ours as 50280 and pad_vocab_size_multiple 16. Earlier versions' files: ``config_vocab`` (the config's
    vocab_size), and ``rounded=False`` (the unrounded sums; with the config's vocab_size). LoRA adapters
    (which change the network without touching those weights) add the sum of every adapter's ``scaling * B @ A``
    (as ``(B.sum(0) . A.sum(1))``: no product formed), when it is not zero: a model without adapters, or with fresh
    ones (B = 0: the same network), keeps its fingerprint."""
    import hashlib
    import json

    from emma_mamba.models.lora import lora_modules

    c = lm.config
    vocab = c.vocab_size if config_vocab or not rounded else lm.embeddings.weight.shape[0]
    shape = [c.d_model, c.n_layer, c.d_state, c.d_conv, c.expand, vocab]
    with torch.no_grad():
        ws = (lm.embeddings.weight, lm.layers[0].mixer.in_proj.weight, lm.layers[-1].mixer.out_proj.weight)
        sums = [float((t.detach().to(torch.bfloat16) if rounded else t.detach()).double().sum()) for t in ws]
        delta = sum(m.scaling * float(m.lora_B.detach().double().sum(0) @ m.lora_A.detach().double().sum(1))
                    for m in lora_modules(lm).values())
    if delta != 0:
        sums.append(delta)
    return hashlib.sha256(json.dumps([shape, [f"{x:.6e}" for x in sums]]).encode()).hexdigest()[:16]


@dataclass
class TurnStats:
    """What one :meth:`ChatSession.ask` did."""

    prompt_tokens: int
    """Positions prefilled this turn (visual tokens count one each), on top of the carried state."""
    new_tokens: int
    finish_reason: str
    """"eos", "stop" or "length" (see :class:`~emma_mamba.inference.generate.GenerationResult`)."""
    context_tokens: int
    """Positions of the whole conversation so far, this turn's answer included."""
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    """One-token forwards after the prefill (the prefill's logits give the first token)."""


class ChatSession:
    """A conversation with an EMMA-Mamba model about one image, or with a text-only Mamba LM.

    ``model``: an :class:`~emma_mamba.models.vlm.EmmaMamba` (``image``: path, PIL image or array; None for a
    text-only conversation) or a :class:`~emma_mamba.models.mamba.MambaLM` with its ``tokenizer``.
    ``config``: sampling and length (:class:`GenerationConfig`; its EOS is replaced by the tokenizer's). A
    repetition penalty counts the turn's own prompt tokens and its answer as seen, not the earlier turns (they are
    in the carried state, not re-read); a turn prefilled from embeddings (an image chat's first turn, which holds
    the image) counts its answer alone, as ``generate`` and transformers do for an embeddings prompt. With a
    penalty other than 1 an answer can therefore differ from ``generate`` over the whole conversation
    (``serve``, which re-tokenises the history, counts all of a text conversation).
    """

    def __init__(self, model, image=None, *, tokenizer=None, config: GenerationConfig | None = None):
        if isinstance(model, EmmaMamba):
            if tokenizer is not None:
                raise ValueError("ChatSession: an EmmaMamba model brings its own tokenizer; do not pass one")
            self.vlm, self.lm, self.tokenizer = model, model.lm, model.tokenizer
        elif isinstance(model, MambaLM):
            if tokenizer is None:
                raise ValueError("ChatSession: a MambaLM needs its tokenizer (tokenizer=...)")
            if image is not None:
                raise ValueError("ChatSession: a text-only MambaLM cannot see an image; use an EmmaMamba model")
            self.vlm, self.lm, self.tokenizer = None, model, tokenizer
        else:
            raise TypeError(f"ChatSession: model must be an EmmaMamba or a MambaLM, got {type(model).__name__}")
        cfg = config if config is not None else GenerationConfig(max_new_tokens=256)
        if not isinstance(cfg, GenerationConfig):
            raise TypeError(f"ChatSession: config must be a GenerationConfig, got {type(cfg).__name__}")
        if cfg.max_new_tokens < 1:
            raise ValueError("ChatSession: config.max_new_tokens must be >= 1 (a turn must answer)")
        # the model's chat format (config.chat; a text-only LM: the default) and where its answers end
        self.chat = self.vlm.config.chat if self.vlm is not None else ChatConfig()
        self.config = (self.vlm.stops(cfg) if self.vlm is not None
                       else cfg.with_eos(self.tokenizer.eos_token_id))
        self.image = image
        self.turns: list[tuple[str, str]] = []
        """(question, answer) per finished turn."""
        self.stats: list[TurnStats] = []
        self._cache = None
        self._pending: list[int] = []  # picked but not yet consumed: the last answer's final token(s)
        self._image_unsaved = False  # loaded from a state whose image was held in memory, not given again

    # -------------------------------------------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        """Positions of the conversation so far (visual tokens included)."""
        return (self._cache.seqlen_offset if self._cache is not None else 0) + len(self._pending)

    @property
    def state_bytes(self) -> int:
        """Bytes of the carried state: constant over the conversation (0 before the first turn)."""
        if self._cache is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._cache.conv_states + self._cache.ssm_states)

    def reset(self, image=None) -> None:
        """Forget the conversation; start the next one about ``image`` (None: keep the current image)."""
        if image is not None:
            if self.vlm is None:
                raise ValueError("ChatSession.reset: a text-only MambaLM cannot see an image")
            self.image = image
        elif self._image_unsaved:
            raise ValueError("ChatSession.reset: the loaded conversation was about an image held in memory (a PIL "
                             "image or an array), which a saved state cannot hold: pass it, reset(image=...), or "
                             "give it to ChatSession.load(..., image=...)")
        self._image_unsaved = False
        self.turns, self.stats, self._cache, self._pending = [], [], None, []

    def ask(self, question: str, streamer: Callable[[str], None] | None = None) -> str:
        """Answer ``question`` in the context of every earlier turn; ``streamer`` receives the text as it comes."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("ChatSession.ask: the question must be a non-empty string")
        if self.vlm is not None and self.vlm.config.image_token in question:
            # the tokenizer reads that text as an image's slot (as training data does), not as words
            raise ValueError(f"ChatSession.ask: the question holds {self.vlm.config.image_token!r}, the model's "
                             f"image placeholder: that text is reserved; the session's image enters with the first "
                             f"turn (reset(image=...) starts a conversation about another one)")
        tok = self.tokenizer
        first = self._cache is None
        if first:
            cache = self.lm.allocate_cache(1)
            kwargs = self._first_turn(question)
        else:
            cache = self._cache
            ids = self._pending + tok.encode(self.chat.turn_sep) + tok.encode(self.chat.prompt_template.format(
                prompt=question))
            kwargs = dict(input_ids=torch.tensor(ids, dtype=torch.long, device=self.lm.device))
        n_prompt = (kwargs["input_ids"] if "input_ids" in kwargs else kwargs["inputs_embeds"]).shape[0]
        backup = None if first else cache.select([0])  # generate advances the state in place
        try:
            res = generate(self.lm, config=self.config, tokenizer=tok, streamer=streamer, cache=cache, **kwargs)
        except BaseException:  # an error or Ctrl-C mid-answer leaves the conversation as it was before the turn
            if backup is not None:
                self._cache = backup
            raise
        self._cache = res.cache
        final, reason = res.final_tokens[0], res.finish_reasons[0]
        # the last picked token is not in the state yet; an answer cut short still gets its end-of-turn token
        # a chat format whose turn_end is a stop string (not EOS): stopped there, the answer ended on its own (a
        # user's stop string met instead cut it short)
        ended = (reason == "stop" and self.chat.turn_end != TURN_END
                 and res.stop_strings_met[0] == self.chat.turn_end)
        self._pending = pending_tokens(final, reason, tok, self.chat.turn_end, ended)
        answer = res.texts[0]
        self.turns.append((question, answer))
        self.stats.append(TurnStats(n_prompt, len(res.sequences[0]), reason, self.context_tokens,
                                    res.prefill_seconds, res.decode_seconds, res.decode_steps))
        return answer

    # ----------------------------------------------------------------------------------------- persistence

    def save(self, path, *, overwrite: bool = True) -> None:
        """Write the conversation (its state, the pending tokens, the turns) to ``path`` (safetensors).

        The file is written whole or not at all: to a temporary file beside ``path``, then renamed over it, so a
        failure or a kill mid-write leaves no partial file and any earlier file at ``path`` as it was.
        ``overwrite=False`` refuses an existing ``path`` (FileExistsError). A path that cannot be written (no
        such directory, a directory, no permission) raises an OSError naming it."""
        import contextlib
        import json
        import tempfile
        from pathlib import Path

        from safetensors.torch import save as serialize

        from emma_mamba.fileio import make_shareable

        if self._cache is None:
            raise ValueError("ChatSession.save: nothing to save before the first turn")
        c = self._cache
        tensors = {f"conv.{i}": t[0].contiguous().cpu() for i, t in enumerate(c.conv_states)}
        tensors.update({f"ssm.{i}": t[0].contiguous().cpu() for i, t in enumerate(c.ssm_states)})
        meta = {"format": STATE_FORMAT, "model": model_fingerprint(self.lm), "seqlen_offset": str(c.seqlen_offset),
                "pending": json.dumps(self._pending), "turns": json.dumps(self.turns),
                # absolute: a saved conversation is loaded from anywhere (reset() reads the image again)
                "image": os.path.abspath(self.image) if isinstance(self.image, (str, os.PathLike)) else "",
                "image_in_memory": "1" if self.image is not None and not isinstance(self.image, (str, os.PathLike))
                else ""}
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory: give a file name to save the conversation to (e.g. "
                                    f"{path / 'chat.safetensors'})")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save the conversation to {path}: no such directory {path.parent}")
        if path.exists() and not path.is_file():  # a device, a pipe: renaming over it would replace it
            raise FileExistsError(f"cannot save the conversation to {path}: it exists and is not a regular file")
        if path.exists() and not overwrite:
            raise FileExistsError(f"cannot save the conversation to {path}: the file exists")
        data = serialize(tensors, metadata=meta)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the file
            make_shareable(tmp)  # mkstemp's file is the owner's only
            os.replace(tmp, path)
        except BaseException as e:  # an OSError, or Ctrl-C mid-write: no temporary file is left behind
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if isinstance(e, OSError):  # its message would name the temporary file, not the user's path
                raise type(e)(f"cannot save the conversation to {path}: {e.strerror or e}") from None
            raise

    @classmethod
    def load(cls, path, model, *, tokenizer=None, config: GenerationConfig | None = None,
             image=None) -> "ChatSession":
        """A session continuing the conversation saved at ``path`` with ``model`` (the model that wrote it).
        ``image``: the conversation's image for a later :meth:`reset` (default: the saved one when it was a file;
        an image held in memory, a PIL image or an array, cannot be saved, so ``reset()`` then needs one)."""
        import json

        from safetensors import SafetensorError, safe_open

        session = cls(model, None, tokenizer=tokenizer, config=config)
        if os.path.isdir(path):  # safetensors would say "No such device"
            raise ValueError(f"{path}: cannot read a chat state: it is a directory")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != STATE_FORMAT:
                    raise ValueError(f"{path}: not a chat state written by ChatSession.save (format "
                                     f"{meta.get('format')!r})")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot read a chat state: {e}") from None
        want = model_fingerprint(session.lm)
        got = meta.get("model")
        if got != want and got not in (model_fingerprint(session.lm, config_vocab=True),  # (earlier versions' files)
                                       model_fingerprint(session.lm, rounded=False)):
            raise ValueError(f"{path}: the conversation was saved with another model (fingerprint {meta.get('model')}, "
                             f"this model's is {want})")
        lm = session.lm
        n = lm.config.n_layer
        missing = [k for i in range(n) for k in (f"conv.{i}", f"ssm.{i}") if k not in tensors]
        if missing:
            raise ValueError(f"{path}: the chat state lacks {missing[:4]} (an incomplete file)")
        cache = lm.allocate_cache(1)
        try:
            for i in range(n):
                cache.conv_states[i].copy_(tensors[f"conv.{i}"].to(cache.conv_states[i].dtype)[None])
                cache.ssm_states[i].copy_(tensors[f"ssm.{i}"].to(cache.ssm_states[i].dtype)[None])
            cache.seqlen_offset = int(meta["seqlen_offset"])
            pending = json.loads(meta["pending"])
            turns = [tuple(t) for t in json.loads(meta["turns"])]
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # a damaged or hand-made file
            what = f"no {e.args[0]!r} entry" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise ValueError(f"{path}: not a complete chat state ({what})") from None
        session._cache, session._pending, session.turns = cache, pending, turns
        session.image = image if image is not None else meta.get("image") or None
        session._image_unsaved = image is None and bool(meta.get("image_in_memory"))
        return session

    def _first_turn(self, question: str) -> dict:
        if self.vlm is None:
            ids = self.tokenizer.encode(self.chat.prompt_template.format(prompt=question))
            return dict(input_ids=torch.tensor(ids, dtype=torch.long, device=self.lm.device))
        images = [] if self.image is None else [self.image]
        text = self.vlm.build_prompt(question, len(images))
        instructions = [question] if images and self.vlm.instruction is not None else None
        return dict(inputs_embeds=self.vlm.prompt_embeds(text, images, instructions)[0])
