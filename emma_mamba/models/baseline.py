"""A transformer MLLM of matched size: the baseline that EMMA-Mamba's latency is measured against.

The baseline keeps EMMA-Mamba's whole vision front (ViT taps, multi-scale fusion, instruction fusion) and its
projector, *the same module objects with the same weights*, and swaps only the language model: a Llama-style
decoder from transformers (pre-RMSNorm, RoPE, SwiGLU MLP, SDPA attention, KV cache; Touvron et al. 2023),
randomly initialised. So the two models turn an image into the same visual tokens, and any latency difference
comes from the LM: attention over a growing KV cache against Mamba's fixed-size recurrent state.

Sizing (:func:`matched_llama_config`): the hidden width equals the Mamba LM's ``d_model``, because the shared
projector writes vectors of that width; the vocabulary (padded), the embedding and the LM head (tied to it, or
untied, as the Mamba LM's) are the same, so the embedding and head parameters are identical. What remains is
solved for: the number of layers and the MLP width so that the parameters of the blocks (+ final norm)
match. A Llama layer holds ``4 d^2`` (q, k, v, o with full multi-head KV, as GPT-NeoX/Pythia, so the KV cache
is not shrunk by grouped-query attention) ``+ 3 d I`` (SwiGLU) ``+ 2 d`` (norms); with the customary
``I ~ 8/3 d`` that is ``~12 d^2``, about twice a Mamba layer (``~6 d^2``), so the transformer gets about half
the layers. ``L = round(P / (12 d^2 + 2 d))`` and then
``I = (P - d - L (4 d^2 + 2 d)) / (3 L d)`` rounded to a multiple of 8/64/256 by width. The LM parameter
counts of both models are counted from the built modules (tied weights once) and must agree within
``tolerance`` (default 5 %).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from emma_mamba.models.vlm import EmmaMamba

__all__ = ["TransformerMLLM", "matched_llama_config", "count_parameters", "mamba_lm_parameters", "describe_match"]


def count_parameters(module: nn.Module, exclude: tuple[torch.Tensor, ...] = ()) -> int:
    """Parameters of ``module``, each tensor once (tied weights), minus the tensors in ``exclude``."""
    skip = {id(t) for t in exclude}
    seen, n = set(), 0
    for p in module.parameters():
        if id(p) not in seen and id(p) not in skip:
            seen.add(id(p))
            n += p.numel()
    return n


def mamba_lm_parameters(mamba_config) -> tuple[int, int]:
    """(total, non-embedding) parameters of a :class:`~emma_mamba.models.mamba.MambaLM` with this config,
    counted on a meta-device build (no memory, works for 2.8B)."""
    from emma_mamba.models.mamba import MambaLM

    lm = MambaLM(mamba_config, device="meta")
    total = count_parameters(lm)
    return total, total - lm.embeddings.weight.numel()


def _head_dim(d: int) -> int:
    for hd in (64, 32, 16, 8):
        if d % hd == 0 and d // hd >= 2 and (hd == 64 or d < 512):
            return hd
    raise ValueError(f"matched_llama_config: hidden width {d} has no head size in (64, 32, 16, 8) giving >= 2 heads")


def matched_llama_config(mamba_config, *, head_dim: int | None = None, multiple_of: int | None = None,
                         max_position_embeddings: int = 131072, tolerance: float = 0.05):
    """A ``transformers.LlamaConfig`` whose parameter count matches the Mamba LM of ``mamba_config``.

    Width = ``d_model`` (shared projector), vocabulary = the padded Mamba vocabulary, the LM head tied or not as
    the Mamba LM's (``tie_embeddings``; an untied head is the same ``vocab x d`` on both sides and is not part of
    the solved-for count, else the Llama would get extra layers worth a whole head), full multi-head attention
    (n_kv_heads = n_heads), SDPA. Layers and MLP width are solved for (module docstring).
    Raises ValueError if the rounded solution misses the Mamba LM's total count by more than ``tolerance``.
    """
    import transformers

    c = mamba_config
    d = c.d_model
    total, non_embedding = mamba_lm_parameters(c)
    tied = bool(c.tie_embeddings)
    head = 0 if tied else c.padded_vocab_size * d  # an untied LM head: the Llama gets one of the same shape
    target = non_embedding - head  # the blocks + the final norm: what the Llama's layers are solved against
    hd = head_dim or _head_dim(d)
    if d % hd:
        raise ValueError(f"matched_llama_config: head_dim {hd} does not divide the width {d}")
    m = multiple_of or (256 if d >= 2048 else 64 if d >= 256 else 8)
    per_layer = 12 * d * d + 2 * d  # I = 8/3 d
    n_layer = max(1, round((target - d) / per_layer))
    inter = (target - d - n_layer * (4 * d * d + 2 * d)) / (3 * n_layer * d)
    inter = max(m, m * round(inter / m))
    cfg = transformers.LlamaConfig(
        vocab_size=c.padded_vocab_size, hidden_size=d, intermediate_size=int(inter), num_hidden_layers=n_layer,
        num_attention_heads=d // hd, num_key_value_heads=d // hd, head_dim=hd, hidden_act="silu",
        max_position_embeddings=max_position_embeddings, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=tied,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa", use_cache=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    # analytic count of what LlamaForCausalLM builds (checked against the built model in the tests)
    llama_total = c.padded_vocab_size * d + head + d + n_layer * (4 * d * d + 3 * d * int(inter) + 2 * d)
    rel = abs(llama_total - total) / total
    if rel > tolerance:
        raise ValueError(f"matched_llama_config: no Llama shape within {tolerance:.0%} of the Mamba LM's "
                         f"{total:,} parameters (best: {n_layer} layers, MLP {int(inter)}: {llama_total:,}, "
                         f"{rel:.1%} off); pass a smaller multiple_of or a different head_dim")
    return cfg


class TransformerMLLM(nn.Module):
    """EMMA-Mamba's vision front and projector + a Llama-style LM of matched size (see module docstring).

    Build with :meth:`from_emma`. ``vision``, ``mff``, ``instruction`` and ``projector`` are the EmmaMamba's
    own modules (shared, not copied); ``lm`` is a ``transformers.LlamaForCausalLM``. Image handling reuses
    EmmaMamba's methods unchanged (:meth:`encode_images`, ``_splice``), so both models see identical inputs.
    """

    def __init__(self, emma, lm: nn.Module):
        super().__init__()
        if not isinstance(emma, EmmaMamba):
            raise TypeError(f"TransformerMLLM expects an EmmaMamba front, got {type(emma).__name__}")
        if lm.config.hidden_size != emma.lm.config.d_model:
            raise ValueError(f"TransformerMLLM: the LM width {lm.config.hidden_size} must equal the projector's "
                             f"output width {emma.lm.config.d_model}")
        self.config = emma.config
        self.vision, self.mff, self.instruction, self.projector = emma.vision, emma.mff, emma.instruction, emma.projector
        self.lm = lm
        self.tokenizer = emma.tokenizer
        self.image_token_id = emma.image_token_id
        self.image_processor = emma.image_processor

    @classmethod
    def from_emma(cls, emma, *, tolerance: float = 0.05, **config_kwargs) -> "TransformerMLLM":
        """The baseline for ``emma``: a random-init LlamaForCausalLM of matched size, on emma's device/dtype."""
        import transformers

        cfg = matched_llama_config(emma.lm.config, tolerance=tolerance, **config_kwargs)
        p = emma.lm.embeddings.weight
        with torch.device(p.device):
            lm = transformers.LlamaForCausalLM(cfg)
        lm.to(p.dtype).eval()
        return cls(emma, lm)

    def lm_parameters(self) -> int:
        return count_parameters(self.lm)

    # EmmaMamba's own code paths: they read only vision/mff/instruction/projector, lm.get_input_embeddings(),
    # image_token_id and config.image_token, all present here, so both models build identical input embeddings.
    encode_images = EmmaMamba.encode_images
    _splice = EmmaMamba._splice

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                instruction_ids: torch.Tensor | None = None, past_key_values=None, logits_to_keep: int = 0):
        """input_ids (b, l) with one ``<image>`` id per image, pixel_values (n_img, 3, H, W) -> the Llama
        output (``.logits`` (b, L, vocab) and the KV cache, under :func:`llama_cache_keyword`'s name) over the
        expanded sequence; ``past_key_values``: a transformers cache, filled in place."""
        visual = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            visual = self.encode_images(pixel_values, instruction_ids)
        embeds, _, _, _ = self._splice(input_ids, visual, None, None, None, None)
        return self.lm(inputs_embeds=embeds, use_cache=past_key_values is not None, logits_to_keep=logits_to_keep,
                       **{llama_cache_keyword(self.lm): past_key_values})


def cache_keyword(model, older: str) -> str:
    """transformers' keyword for a model's cache (a KV cache, a Mamba state), in its forward and in its output:
    ``cache`` where the model's forward takes it (5.2x releases, where the older names go through deprecation
    shims: a FutureWarning and a kwargs rewrite on every call), else ``older``. Read once per model class."""
    return "cache" if _forward_takes_cache(type(model)) else older


@functools.cache
def _forward_takes_cache(cls) -> bool:
    import inspect

    return "cache" in inspect.signature(cls.forward).parameters


def llama_cache_keyword(lm) -> str:
    """:func:`cache_keyword` of a transformers causal LM: ``cache``, or ``past_key_values`` (older releases;
    its removal is announced for 5.40)."""
    return cache_keyword(lm, "past_key_values")


def describe_match(mamba_lm, llama_lm) -> str:
    """One line naming both LM shapes and parameter counts."""
    a, b = count_parameters(mamba_lm), count_parameters(llama_lm)
    c, h = mamba_lm.config, llama_lm.config
    return (f"Mamba LM d_model {c.d_model} x {c.n_layer} layers: {a:,} params | Llama LM d {h.hidden_size} x "
            f"{h.num_hidden_layers} layers, {h.num_attention_heads} heads, MLP {h.intermediate_size}: {b:,} params "
            f"({(b - a) / a:+.2%})")

