"""Vision-side fusion: multi-scale feature fusion (MFF), instruction-aware fusion, and the projector MLP.

``MultiScaleFusion`` (the hierarchical alignment of EMMA-Mamba, Xing et al. 2024) fuses the patch tokens of
K ViT blocks into one token grid of the same length. Every mode is a *residual on the last (deepest) tap*:

    out = x_K + delta(LN_1(x_1), ..., LN_K(x_K))

with ``delta`` exactly zero at initialisation, so at step 0 MFF returns the penultimate-layer tokens
unchanged: bit-for-bit the LLaVA/Cobra input, and training can only move away from it if that helps.
Each tap gets its own LayerNorm because the residual stream's scale grows with depth.

- ``weighted``: delta = g * sum_k softmax(w)_k LN_k(x_k); w starts uniform, the per-channel gate g at zero.
- ``concat``:   delta = W [LN_1(x_1); ...; LN_K(x_K)] (channel concat), W (K*C -> C) zero-initialised.
- ``cross_attn``: delta = MHA(q = LN_K(x_K), k = v = tokens of the other taps), one attention layer (no
  MLP) from the last tap to the others, its output projection zero-initialised.
- ``none``: the identity on the single tap (the Cobra baseline).

A zero-initialised gate means the parameters behind it get no gradient on the very first step (only the gate
does); from the second step on, all of them train.

``InstructionFusion`` is the efficient modality adaptation of "EMMA: Efficient Visual Alignment in
Multi-Modal LLMs" (Ghazanfari et al. 2024): the instruction is encoded by the frozen CLIP *text* tower of the
same open_clip model (its own tokenizer, its own context length, 77 for CLIP), its token features projected
(Linear + GELU) to the ViT width, concatenated with the N visual tokens along the token axis, and mixed back
to N tokens by one Linear over the token axis, initialised to the identity on the visual block and zero on
the text block, so at initialisation it returns the visual tokens exactly. Instructions longer than the
context are truncated by open_clip's tokenizer; here each truncation is counted and logged, and the caller's
text is never modified.

``Projector`` is the LLaVA-1.5 style GELU MLP (2 or 3 Linear layers) from the ViT width to the LM width.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from emma_mamba.config import ConfigError

__all__ = ["MultiScaleFusion", "InstructionFusion", "Projector"]

log = logging.getLogger(__name__)

MFF_MODES = ("none", "weighted", "concat", "cross_attn")


class MultiScaleFusion(nn.Module):
    """Fuses K taps (each (b, N, C)) into (b, N, C); equals the last tap exactly at initialisation."""

    def __init__(self, width: int, num_taps: int, mode: str = "weighted", num_heads: int = 8,
                 device=None, dtype=None):
        super().__init__()
        if mode not in MFF_MODES:
            raise ConfigError(f"mff.mode must be one of {MFF_MODES}, got {mode!r}")
        if mode == "none" and num_taps != 1:
            raise ConfigError(f"mff.mode 'none' takes one tap, got {num_taps}")
        if mode == "cross_attn" and num_taps < 2:
            raise ConfigError("mff.mode 'cross_attn' needs at least two taps (the last attends to the others)")
        if mode == "cross_attn" and width % num_heads:
            raise ConfigError(f"mff.num_heads ({num_heads}) must divide the ViT width ({width})")
        fk = dict(device=device, dtype=dtype)
        self.mode, self.width, self.num_taps = mode, width, num_taps
        if mode == "none":
            return
        self.norms = nn.ModuleList(nn.LayerNorm(width, **fk) for _ in range(num_taps))
        if mode == "weighted":
            self.tap_logits = nn.Parameter(torch.zeros(num_taps, **fk))
            self.gate = nn.Parameter(torch.zeros(width, **fk))
        elif mode == "concat":
            self.proj = nn.Linear(num_taps * width, width, **fk)
        else:
            self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True, **fk)
        self.reset_parameters()

    def reset_parameters(self):
        if self.mode == "weighted":
            nn.init.zeros_(self.tap_logits)
            nn.init.zeros_(self.gate)
        elif self.mode == "concat":
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        elif self.mode == "cross_attn":
            self.attn._reset_parameters()
            nn.init.zeros_(self.attn.out_proj.weight)
            nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, taps: list[torch.Tensor]) -> torch.Tensor:
        if len(taps) != self.num_taps:
            raise ValueError(f"MultiScaleFusion built for {self.num_taps} taps, got {len(taps)}")
        last = taps[-1]
        if self.mode == "none":
            return last
        normed = [norm(t) for norm, t in zip(self.norms, taps)]  # K x (b, N, C)
        if self.mode == "weighted":
            w = torch.softmax(self.tap_logits.float(), dim=0).to(last.dtype)  # (K,)
            mixed = torch.einsum("k,kbnc->bnc", w, torch.stack(normed))
            delta = self.gate * mixed
        elif self.mode == "concat":
            delta = self.proj(torch.cat(normed, dim=-1))  # (b, N, K*C) -> (b, N, C)
        else:
            context = torch.cat(normed[:-1], dim=1)  # (b, (K-1)*N, C): every token of the shallower taps
            delta, _ = self.attn(normed[-1], context, context, need_weights=False)
        return last + delta


class InstructionFusion(nn.Module):
    """Mixes the instruction's CLIP text features into the N visual tokens; identity at initialisation.

    ``text_model`` is the open_clip CLIP/CustomTextCLIP model whose vision tower has been removed (the text
    tower only); it stays frozen and in eval mode. ``tokenizer`` is ``open_clip.get_tokenizer(name)``.
    """

    TOKEN_CACHE_SIZE = 1 << 16  # tokenized instructions kept (a row of 77 int64 ids is ~0.6 KB), keyed by a hash
    WORD_CACHE_SIZE = 1 << 17  # open_clip's tokenizer caches every distinct word's BPE, unbounded: cleared past it
    LOGGED_TEXTS = 10  # distinct truncated instructions logged one by one; later ones only counted

    def __init__(self, text_model: nn.Module, tokenizer, vision_width: int, num_visual_tokens: int,
                 text_layer: int = -1, device=None, dtype=None):
        super().__init__()
        self.text_model = text_model
        self.text_model.requires_grad_(False)
        self.text_model.eval()
        self.tokenizer = tokenizer
        self.context_length = int(text_model.context_length)
        depth = _text_depth(text_model)
        if depth is not None and not -depth <= text_layer < depth:
            raise ConfigError(f"instruction.text_layer: block index {text_layer} is out of range for the text tower's "
                              f"{depth} blocks (valid {-depth}..{depth - 1}; -1 is the last)")
        self.text_layer = text_layer
        text_width = _text_width(text_model)
        self.num_visual_tokens = num_visual_tokens
        fk = dict(device=device, dtype=dtype)
        self.text_proj = nn.Linear(text_width, vision_width, **fk)
        # Linear over the token axis: (N + T) input tokens -> N output tokens.
        self.token_mixer = nn.Linear(num_visual_tokens + self.context_length, num_visual_tokens, **fk)
        self.num_truncated = 0
        self._texts_logged = 0  # distinct truncated instructions logged one by one (LOGGED_TEXTS at most)
        self._token_cache: dict[str, tuple[torch.Tensor, int | None]] = {}  # text -> (ids row, token count)
        self.reset_parameters()

    def reset_parameters(self):
        # text_proj keeps nn.Linear's default init; the mixer is [I_N | 0] with zero bias (identity on visuals).
        w = torch.zeros_like(self.token_mixer.weight)
        w[:, : self.num_visual_tokens] = torch.eye(self.num_visual_tokens, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            self.token_mixer.weight.copy_(w)
            self.token_mixer.bias.zero_()

    def train(self, mode: bool = True):
        super().train(mode)
        self.text_model.eval()  # frozen tower: no dropout
        return self

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(n, context_length) token ids; counts and logs every instruction that had to be truncated.

        Rows are cached per distinct text (up to ``TOKEN_CACHE_SIZE``, least recently used dropped): training
        sees each instruction once per epoch, and open_clip's tokenizer (text cleaning, regex, BPE) cost about
        a tenth of a tiny-model training step. A truncated instruction is counted on every use (``num_truncated``;
        the trainer reports the total at the end of a run) and logged when it is tokenised (first seen, or after it
        left the cache; the first ``LOGGED_TEXTS`` distinct ones only); the batch summary is logged when the running count reaches 1, 2, 4, 8, ..., so a data set
        of long instructions is reported without a warning per step."""
        if isinstance(texts, str):
            texts = [texts]
        if self.tokenizer is None:
            raise RuntimeError("this InstructionFusion was built without a tokenizer (a meta-device build)")
        rows, n_trunc = [], 0
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"instructions must be strings, got {type(t).__name__}")
            # keyed by a digest, not the text: a serve that answers long distinct questions for days keeps
            # 0.6 KB per entry, not every question in full (2000-word ones: 620 MB before the entry cap)
            key = hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            hit = self._token_cache.get(key)
            fresh = hit is None
            if fresh:
                n = _token_count(self.tokenizer, t)
                hit = (self.tokenizer([t], context_length=self.context_length)[0], n)
                if len(self._token_cache) >= self.TOKEN_CACHE_SIZE:
                    self._token_cache.pop(next(iter(self._token_cache)))
                words = getattr(getattr(self.tokenizer, "tokenizer", self.tokenizer), "cache", None)
                if isinstance(words, dict) and len(words) > self.WORD_CACHE_SIZE:
                    words.clear()
            else:
                self._token_cache.pop(key)  # re-inserted below: most recently used last
            self._token_cache[key] = hit
            row, n = hit
            if n is not None and n > self.context_length:
                n_trunc += 1
                if fresh and self._texts_logged < self.LOGGED_TEXTS:
                    self._texts_logged += 1
                    log.warning("instruction truncated from %d to %d text-tower tokens (%.60r...)%s", n,
                                self.context_length, t, "; further ones are counted, not each logged"
                                if self._texts_logged == self.LOGGED_TEXTS else "")
            rows.append(row)
        if n_trunc:
            before, self.num_truncated = self.num_truncated, self.num_truncated + n_trunc
            if self.num_truncated.bit_length() > before.bit_length():  # crossed 1, 2, 4, 8, ...
                log.warning("instruction fusion: %d of %d instructions truncated in this batch (%d so far; said "
                            "again at twice that count)", n_trunc, len(texts), self.num_truncated)
        if not rows:
            return torch.empty(0, self.context_length, dtype=torch.long)
        return torch.stack(rows)

    def text_features(self, text_ids: torch.Tensor) -> torch.Tensor:
        """(b, T) ids -> (b, T, text_width) token features of the frozen text tower (final LayerNorm applied)."""
        with torch.no_grad():
            out = self.text_model.forward_intermediates(
                text=text_ids, text_indices=[self.text_layer], normalize_intermediates=True,
                intermediates_only=True)
        return out["text_intermediates"][0]

    def forward(self, visual: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        if text_ids.ndim != 2 or text_ids.shape[1] != self.context_length:
            raise ValueError(f"instruction ids must be (n_images, {self.context_length}), got "
                             f"{tuple(text_ids.shape)}; use InstructionFusion.tokenize")
        if text_ids.shape[0] != visual.shape[0]:
            raise ValueError(f"{visual.shape[0]} images but {text_ids.shape[0]} instructions: one per image")
        text = self.text_features(text_ids.to(visual.device))
        text = F.gelu(self.text_proj(text.to(self.text_proj.weight.dtype)))  # (b, T, C)
        tokens = torch.cat([visual, text.to(visual.dtype)], dim=1)  # (b, N + T, C)
        mixed = self.token_mixer(tokens.transpose(1, 2))  # (b, C, N + T) -> (b, C, N)
        return mixed.transpose(1, 2)  # (b, N, C)


def _text_width(text_model: nn.Module) -> int:
    if hasattr(text_model, "ln_final") and hasattr(text_model, "transformer"):  # open_clip.CLIP
        return int(text_model.transformer.width)
    text = getattr(text_model, "text", None)  # open_clip.CustomTextCLIP
    if text is not None and hasattr(text, "width"):
        return int(text.width)
    raise ValueError(f"cannot find the text-tower width of {type(text_model).__name__}")


def _text_depth(text_model: nn.Module) -> int | None:
    """Blocks of an open_clip text tower (CLIP's, or a CustomTextCLIP's TextTransformer); None when unknown."""
    for owner in (text_model, getattr(text_model, "text", None)):
        blocks = getattr(getattr(owner, "transformer", None), "resblocks", None)
        if blocks is not None:
            return len(blocks)
    return None


def _token_count(tokenizer, text: str) -> int | None:
    """Tokens the open_clip tokenizer would produce for ``text`` without truncation (incl. specials)."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None:
        return len(tokenizer.encode(text)) + 2  # <start_of_text> ... <end_of_text>
    if isinstance(tokenizer, HFTokenizer):
        # counted on the text open_clip tokenises: its clean_fn first (SigLIP's 'canonicalize' drops punctuation
        # and HTML entities, which the raw text would count as tokens of their own)
        clean = getattr(tokenizer, "clean_fn", None)  # (open_clip >= 2.24 has it)
        text = clean(text) if clean is not None else text
        if getattr(tokenizer, "tokenizer_mode", "") == "clips":  # content tokens + bos, eos and a class token
            return len(tokenizer.tokenizer(text, add_special_tokens=False)["input_ids"]) + 3
        return len(tokenizer.tokenizer(text)["input_ids"])
    return None


class Projector(nn.Module):
    """GELU MLP from the ViT width to the LM width: Linear, GELU, Linear[, GELU, Linear] (``kind`` mlp), or
    Prismatic's fused-GELU MLP (``kind`` fused: in -> hidden (4 x in) -> out -> out, GELU between; Cobra's and the
    EMMA-Mamba authors' projector)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None,
                 device=None, dtype=None, kind: str = "mlp"):
        super().__init__()
        if depth not in (2, 3):
            raise ConfigError(f"projector.depth must be 2 or 3, got {depth}")
        fk = dict(device=device, dtype=dtype)
        if kind == "fused":
            if depth != 3:
                raise ConfigError(f"projector kind fused has 3 layers, got depth {depth}")
            hidden = hidden_dim or 4 * in_dim
            widths = [in_dim, hidden, out_dim, out_dim]
        elif kind == "mlp":
            hidden = hidden_dim or out_dim
            widths = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        else:
            raise ValueError(f"projector.kind must be mlp or fused, got {kind!r}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += ([nn.GELU()] if i else []) + [nn.Linear(a, b, **fk)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)
