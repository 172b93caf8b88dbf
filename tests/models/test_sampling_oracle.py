"""The sampler against transformers' logits processors (the oracle), applied in the order transformers' generate
applies them: repetition penalty, then (when sampling) temperature, top-k, top-p.

"Our distribution" is the probability tensor :func:`~emma_mamba.inference.generate._pick` hands to
``torch.multinomial`` (caught on its way there), for the rows of one call (each with its own history), for
``generate`` end to end (its per-row repetition-penalty history while rows finish) and for each row of the
continuous-batching decoder (:meth:`BatchDecoder._advance`, rows with different settings in one batch). Greedy
picks are compared with ``torch.argmax`` of transformers' processed scores. Then seeded draws: reproducible,
and a chi-square test of 20000 of them against the filtered distribution.

Where the two differ (the comparisons below allow these and nothing else):
- top-p where the cut is not determined: tied logits straddling it (bf16 logits tie often) keep as many
  tokens with the same probabilities, but which of the tied ones is an accident of ``torch.sort``, not stable,
  on either side (seen with torch 2.14 on the CPU: up to 16 tokens ours keeps the lowest ids, transformers the
  highest; beyond, no pattern); and a cut that falls on a boundary to rounding (the k most likely hold top_p
  exactly) may keep one token more on one side or the other, ours summing from the top, transformers from the
  bottom (10 equal logits: top_p 0.6, ours 7 and transformers 6; top_p 0.1, ours 1 and transformers 2);
- a temperature below ``GREEDY_BELOW`` (1e-5) picks greedily (transformers divides by it: overflow, or a
  sample among exactly tied maxima);
- the padded vocabulary rows (``padded_vocab_size > vocab_size``) are never sampled; with them our
  ``torch.multinomial`` draws over more columns, so one seed gives other tokens than transformers' sampling
  step over the real vocabulary (without them, the same tokens: checked).
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from emma_mamba.inference.generate import GREEDY_BELOW, GenerationConfig, _pick, generate
from emma_mamba.models.mamba import MambaConfig, MambaLM

lp = pytest.importorskip("transformers.generation.logits_process")


# ---------------------------------------------------------------------------------------------------------
# the two sides


def hf_processors(cfg: GenerationConfig, top_p: bool = True) -> list:
    """transformers' processors for ``cfg`` in its generate's order (test_transformers_generate_applies_this_order
    checks that order against transformers' own builder); ``top_p=False``: all but the top-p cut."""
    procs = []
    if cfg.repetition_penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty)))
    if cfg.temperature > 0:  # do_sample: the warpers
        if cfg.temperature != 1.0:
            procs.append(lp.TemperatureLogitsWarper(float(cfg.temperature)))
        if cfg.top_k:
            procs.append(lp.TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0 and top_p:
            procs.append(lp.TopPLogitsWarper(cfg.top_p))
    return procs


def hf_scores(logits: torch.Tensor, histories, cfg: GenerationConfig, vocab: int, top_p: bool = True):
    """transformers' processed scores (a, vocab), each row with its own history (its input_ids: prompt and
    generated tokens)."""
    rows = []
    for row, hist in zip(logits, histories):
        scores = row[None, :vocab].clone()
        ids = torch.tensor([list(hist)], dtype=torch.long).reshape(1, -1)
        for p in hf_processors(cfg, top_p):
            if isinstance(p, lp.RepetitionPenaltyLogitsProcessor) and ids.shape[1] == 0:
                continue  # nothing seen yet
            scores = p(ids, scores)
        rows.append(scores[0])
    return torch.stack(rows)


def ours(logits, seen, cfg, vocab, generator=None, suppressed=()):
    """(the tokens _pick returns, the probabilities it drew them from: None when it picked greedily)."""
    drawn = []
    real = torch.multinomial

    def spy(probs, num_samples, generator=None):
        drawn.append(probs.clone())
        return real(probs, num_samples, generator=generator)

    with mock.patch.object(torch, "multinomial", spy):
        tokens = _pick(logits, seen, cfg, vocab, generator, suppressed)
    assert len(drawn) <= 1
    return tokens, (drawn[0] if drawn else None)


def seen_mask(histories, width):
    seen = torch.zeros(len(histories), width, dtype=torch.bool)
    for i, h in enumerate(histories):
        seen[i, list(h)] = True
    return seen


def assert_same_distribution(got, logits, histories, cfg, vocab):
    """``got`` (a, padded V), our probabilities, against transformers' (a, vocab): the same tokens kept with the
    same probabilities (to the bit without padded rows; with them our softmax also sums the padded rows'
    zeros, a last-bit difference), except where the top-p cut is not determined (module doc): there both keep
    a most likely set; as many tokens with the same logits when tied tokens straddle the cut; one token apart
    only where the smaller set's mass is top_p to rounding. Returns "same", "ties" or "boundary"."""
    want = hf_scores(logits, histories, cfg, vocab).softmax(-1)
    assert got.shape[0] == want.shape[0]
    assert (got[:, vocab:] == 0).all(), "a padded vocabulary row has a probability"
    exact = got.shape[1] == vocab
    got = got[:, :vocab]
    keys = hf_scores(logits, histories, cfg, vocab, top_p=False)  # what the top-p cut sorts
    kinds = []
    for r in range(got.shape[0]):
        mine, theirs, k = got[r] > 0, want[r] > 0, keys[r]
        if torch.equal(mine, theirs):
            if exact:
                assert torch.equal(got[r], want[r]), f"row {r}: {got[r]} != transformers' {want[r]} ({cfg})"
            else:
                torch.testing.assert_close(got[r], want[r], rtol=1e-6, atol=0, msg=lambda m: f"row {r} ({cfg}): {m}")
            kinds.append("same")
            continue
        assert cfg.top_p < 1.0, f"row {r}: kept {mine}, transformers {theirs} ({cfg})"
        for kept in (mine, theirs):  # a most likely set, each
            dropped = ~kept & k.isfinite()
            assert not dropped.any() or k[kept].min() >= k[dropped].max(), f"row {r}: not a top set ({cfg})"
        torch.testing.assert_close(got[r][mine], k[mine].softmax(-1), rtol=1e-6, atol=0)  # renormalised
        if mine.sum() == theirs.sum():  # tied tokens swapped: the same logits kept
            assert torch.equal(k[mine].sort().values, k[theirs].sort().values), f"row {r} ({cfg})"
            torch.testing.assert_close(got[r][mine].sort().values, want[r][theirs].sort().values, rtol=1e-6, atol=0)
            kinds.append("ties")
        else:  # one token apart: only on a boundary (to rounding)
            n = int(min(mine.sum(), theirs.sum()))
            assert abs(int(mine.sum()) - int(theirs.sum())) == 1, f"row {r} ({cfg})"
            mass = k.double().softmax(-1).sort(descending=True).values[:n].sum()
            assert abs(float(mass) - cfg.top_p) < 1e-6, f"row {r}: kept {mine.sum()} vs {theirs.sum()}, " \
                                                       f"mass of {n}: {float(mass)} ({cfg})"
            kinds.append("boundary")
    return kinds


# ---------------------------------------------------------------------------------------------------------
# 1. the filtered distribution


def test_transformers_generate_applies_this_order():
    """transformers' generate builds the processors hf_processors lists, in that order (its private builder)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                                                   state_size=2, expand=1))
    if hasattr(model, "_get_logits_warper"):  # transformers < 4.45 built the warpers apart
        pytest.skip("this transformers builds its sampling warpers apart from its processors")
    ids = torch.tensor([[1, 2, 3]])
    for cfg in (GenerationConfig(temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.3),
                GenerationConfig(temperature=1.0, top_p=0.5), GenerationConfig(temperature=0.0, top_k=5,
                                                                             repetition_penalty=1.3)):
        hf = transformers.GenerationConfig(do_sample=cfg.temperature > 0, temperature=cfg.temperature or None,
                                           top_k=cfg.top_k, top_p=cfg.top_p,
                                           repetition_penalty=cfg.repetition_penalty)
        try:
            procs = model._get_logits_processor(generation_config=hf, input_ids_seq_length=3, encoder_input_ids=ids,
                                                prefix_allowed_tokens_fn=None, logits_processor=None, device="cpu",
                                                model_kwargs={})
        except TypeError:  # its private API moved
            pytest.skip("this transformers builds its logits processors through another private API")
        assert [type(p) for p in procs] == [type(p) for p in hf_processors(cfg)], cfg


CONFIGS = [
    # each option alone
    GenerationConfig(temperature=1.0),
    GenerationConfig(temperature=0.3),
    GenerationConfig(temperature=2.5),
    GenerationConfig(temperature=1e-4),  # tiny, above GREEDY_BELOW: divided, as transformers does
    GenerationConfig(temperature=1.0, top_k=1),
    GenerationConfig(temperature=1.0, top_k=3),
    GenerationConfig(temperature=1.0, top_k=100),  # larger than every vocabulary below
    GenerationConfig(temperature=1.0, top_p=0.05),
    GenerationConfig(temperature=1.0, top_p=0.5),
    GenerationConfig(temperature=1.0, top_p=0.9),
    GenerationConfig(temperature=1.0, top_p=0.999),
    GenerationConfig(temperature=1.0, repetition_penalty=1.3),
    GenerationConfig(temperature=1.0, repetition_penalty=2.0),  # maps the 0.5 grid below onto itself: new ties
    GenerationConfig(temperature=1.0, repetition_penalty=0.7),  # < 1 favours the seen tokens
    # combinations
    GenerationConfig(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.2),
    GenerationConfig(temperature=1.5, top_k=3, top_p=0.5, repetition_penalty=1.5),
    GenerationConfig(temperature=0.5, top_k=100, top_p=0.95, repetition_penalty=0.8),
    GenerationConfig(temperature=2.0, top_k=8, top_p=0.3, repetition_penalty=2.0),
    GenerationConfig(temperature=0.9, top_p=0.7, repetition_penalty=1.3),
]
KINDS = ("normal", "peaked", "flat", "uniform", "ties", "neg_inf", "negative")


def logits_case(kind: str, vocab: int, padded: int, g: torch.Generator, a: int = 3) -> torch.Tensor:
    """(a, padded) fp32 logits of a kind; the padded columns hold large values (never to be sampled)."""
    x = torch.randn(a, vocab, generator=g)
    if kind == "peaked":
        x[:, 0] += 40.0
        x = x[:, torch.randperm(vocab, generator=g)]
    elif kind == "flat":
        x = x * 1e-3
    elif kind == "uniform":
        x = torch.full((a, vocab), 0.25)
    elif kind == "ties":  # a coarse grid, as bf16 logits are: many exact ties, also at the top
        x = torch.randint(-4, 5, (a, vocab), generator=g).float() * 0.5
    elif kind == "neg_inf":
        x = x * 2
        x[torch.rand(a, vocab, generator=g) < 0.5] = float("-inf")
        x[:, int(torch.randint(0, vocab, (1,), generator=g))] = 1.0  # at least one finite per row
    elif kind == "negative":
        x = -x.abs() - 0.1
    return torch.cat([x, torch.full((a, padded - vocab), 50.0)], dim=1)


def histories_case(vocab: int, g: torch.Generator):
    """Three rows' histories: none yet, a few ids with repeats, most of the vocabulary."""
    few = torch.randint(0, vocab, (4,), generator=g).tolist()
    return [[], few + few[:2], torch.randint(0, vocab, (3 * vocab,), generator=g).tolist()]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}-"
                                                      f"rp{c.repetition_penalty}")
def test_filtered_distribution_equals_transformers(cfg):
    """Random logits of every kind (ties, -inf, peaked, flat, negative), vocabularies with and without padded
    rows, three rows with different histories in one call: our probabilities equal transformers' (to the bit;
    ties straddling a top-p cut: module doc)."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    for kind in KINDS:
        for vocab, padded in ((1, 1), (2, 8), (7, 7), (13, 16), (50, 56)):
            logits = logits_case(kind, vocab, padded, g)
            hist = histories_case(vocab, g)
            seen = seen_mask(hist, padded) if cfg.repetition_penalty != 1.0 else None
            tokens, got = ours(logits, seen, cfg, vocab)
            assert got is not None and got.shape == (3, padded)
            assert_same_distribution(got, logits, hist, cfg, vocab)
            assert (got.gather(1, tokens[:, None]) > 0).all() and (tokens < vocab).all()
            checked += 1
    assert checked == len(KINDS) * 5


def test_the_order_of_the_filters_matters_here():
    """The comparison above tells the orders apart: transformers' processors in another order (top-p before
    top-k, temperature after top-p, the penalty last) give other distributions for these logits, which ours
    does not equal. (The penalty and the temperature commute, as do the temperature and top-k.)"""
    logits = torch.tensor([[2.2, 1.4, 1.2, 0.3, 1.9, -1.9, -1.2]])
    hist = [[0, 5]]
    seen = seen_mask(hist, 7)
    cfg = GenerationConfig(temperature=2.0, top_k=3, top_p=0.6, repetition_penalty=2.0)
    _, got = ours(logits, seen, cfg, 7)
    assert assert_same_distribution(got, logits, hist, cfg, 7) == ["same"]
    ids = torch.tensor(hist)
    pen, temp = lp.RepetitionPenaltyLogitsProcessor(2.0), lp.TemperatureLogitsWarper(2.0)
    k, p = lp.TopKLogitsWarper(3), lp.TopPLogitsWarper(0.6)
    for order in ([pen, temp, p, k], [pen, p, temp, k], [temp, k, p, pen], [k, p, pen, temp]):
        s = logits.clone()
        for proc in order:
            s = proc(ids, s)
        assert not torch.allclose(s.softmax(-1), got, atol=1e-3), order


def test_sampling_edges_by_hand():
    """The edge semantics, ours and transformers' side by side."""
    def probs(logits, cfg, hist=None, vocab=None):
        logits = torch.tensor([logits])
        vocab = vocab or logits.shape[1]
        hist = hist or []
        seen = seen_mask([hist], logits.shape[1]) if cfg.repetition_penalty != 1.0 else None
        _, got = ours(logits, seen, cfg, vocab)
        assert_same_distribution(got, logits, [hist], cfg, vocab)
        return got[0]

    log = torch.tensor([0.5, 0.3, 0.2]).log().tolist()
    # top-p keeps the token that crosses the threshold: 0.5 < 0.6, so the second (0.5 + 0.3 = 0.8) stays
    assert (probs(log, GenerationConfig(temperature=1.0, top_p=0.6)) > 0).tolist() == [True, True, False]
    # a set that reaches top_p exactly is enough (0.5 = 0.5 in binary)
    assert (probs(log, GenerationConfig(temperature=1.0, top_p=0.5)) > 0).tolist() == [True, False, False]
    # at least one token, however small top_p
    assert probs(log, GenerationConfig(temperature=1.0, top_p=1e-12)).tolist() == [1.0, 0.0, 0.0]
    # top-k larger than the vocabulary, below the padded one (4: 3 real rows and 2 padded) or above (50):
    # everything real kept, no padded row
    p = probs([1.0, 2.0, 3.0, 9.0, 9.0], GenerationConfig(temperature=1.0, top_k=4), vocab=3)
    torch.testing.assert_close(p, torch.tensor([1.0, 2.0, 3.0, -float("inf"), -float("inf")]).softmax(-1))
    p = probs([1.0, 2.0, 3.0], GenerationConfig(temperature=1.0, top_k=50))
    assert (p > 0).all()
    # top-k keeps every token tied with the k-th (transformers too): k = 2 keeps three here
    assert (probs([1.0, 2.0, 2.0, 3.0], GenerationConfig(temperature=1.0, top_k=2)) > 0).tolist() == \
        [False, True, True, True]
    # repetition penalty: positive seen logits divided, negative ones multiplied, 0 stays, unseen untouched,
    # a token seen three times penalised once (transformers: the same scatter)
    p = probs([2.0, -1.0, 0.0, 1.0, -1.0], GenerationConfig(temperature=1.0, repetition_penalty=2.0),
              hist=[0, 1, 2, 0, 0])
    torch.testing.assert_close(p, torch.tensor([1.0, -2.0, 0.0, 1.0, -1.0]).softmax(-1), rtol=0, atol=0)
    # ties straddling the top-p cut (module doc): four equal logits, top_p 0.5 keeps two of them at 0.5 each on
    # both sides; which two is torch.sort's accident (seen: ours 0 and 1, transformers 2 and 3)
    p = probs([0.25] * 4, GenerationConfig(temperature=1.0, top_p=0.5))
    hf = lp.TopPLogitsWarper(0.5)(None, torch.full((1, 4), 0.25)).softmax(-1)[0]
    assert sorted(p.tolist()) == sorted(hf.tolist()) == [0.0, 0.0, 0.5, 0.5]


def test_tiny_temperatures():
    """1e-4 (>= GREEDY_BELOW) divides as transformers does: logits 5e-5 apart are still a real mix; below
    GREEDY_BELOW the pick is greedy, the first of tied maxima, where transformers would overflow (1e-45:
    inf / inf, no distribution) or draw among tied maxima."""
    logits = torch.tensor([[1.0, 1.0 - 5e-5, -3.0]])
    _, got = ours(logits, None, GenerationConfig(temperature=1e-4), 3)
    assert_same_distribution(got, logits, [[]], GenerationConfig(temperature=1e-4), 3)
    assert 0.55 < got[0, 0] < 0.7 and 0.3 < got[0, 1] < 0.45  # exp(-0.5) : 1
    assert GREEDY_BELOW == 1e-5
    tied = torch.tensor([[1.0, 3.0, 3.0, -3.0]])
    for t in (9e-6, 1e-45):
        tokens, drawn = ours(tied, None, GenerationConfig(temperature=t), 4)
        assert drawn is None and tokens.tolist() == [1]
    with torch.no_grad():
        overflow = lp.TemperatureLogitsWarper(1e-45)(None, tied.clone())
    assert overflow.softmax(-1).isnan().all()  # what transformers would sample from


# ---------------------------------------------------------------------------------------------------------
# 3. greedy


def test_greedy_picks_torch_argmax_of_transformers_scores():
    """temperature 0, with and without a repetition penalty: torch.argmax of transformers' greedy scores (its
    processors without the sampling warpers), so the first of tied maxima; padded rows never (here larger);
    top-k / top-p do not matter to a greedy pick. The continuous-batching decoder's one-argmax path for greedy
    rows without a penalty picks the same (checked in test_batch_decoder_rows_draw_as_generate_alone)."""
    g = torch.Generator().manual_seed(1)
    for kind in KINDS:
        for vocab, padded in ((1, 1), (7, 7), (13, 16), (50, 56)):
            logits = logits_case(kind, vocab, padded, g, a=4)
            hist = histories_case(vocab, g) + [[0]]
            for cfg in (GenerationConfig(), GenerationConfig(repetition_penalty=2.0),
                        GenerationConfig(repetition_penalty=0.7, top_k=2, top_p=0.3)):
                seen = seen_mask(hist, padded) if cfg.repetition_penalty != 1.0 else None
                tokens, drawn = ours(logits, seen, cfg, vocab)
                assert drawn is None
                want = torch.argmax(hf_scores(logits, hist, cfg, vocab), dim=-1)
                assert torch.equal(tokens, want), (kind, vocab, cfg)
    # the first of tied maxima, also when the penalty makes the tie (2.0 seen -> 1.0 ties the unseen 1.0)
    tokens, _ = ours(torch.tensor([[0.0, 1.0, 2.0, 1.0]]), seen_mask([[2]], 4),
                     GenerationConfig(repetition_penalty=2.0), 4)
    assert tokens.tolist() == [1]


# ---------------------------------------------------------------------------------------------------------
# generate end to end: each row's repetition-penalty history


def _lm(seed=0, vocab=13):
    torch.manual_seed(seed)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, d_state=8, tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return lm


@pytest.mark.parametrize("prompt_as", ["ids", "padded", "embeds"])
def test_generate_rows_draw_from_transformers_distribution_with_their_own_history(monkeypatch, prompt_as):
    """generate() on three ragged prompts, sampling with every option, rows ending at different steps (EOS):
    at every step every active row's distribution is transformers' for that row's input_ids. The history
    transformers penalises is the prompt and the generated tokens; ours counts the prompt when it is given as
    token ids (left padding of an attention mask not counted: transformers 5 ignores it too, through
    prompt_ignore_length), and only the generated tokens for ``inputs_embeds`` (transformers does the same for
    inputs_embeds, with a warning)."""
    from emma_mamba.inference import generate as gen_mod

    lm = _lm()
    vocab = lm.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (6, 2, 9)]
    cfg = GenerationConfig(max_new_tokens=12, temperature=0.9, top_k=9, top_p=0.9, repetition_penalty=1.6,
                           eos_token_id=1, seed=5)
    calls = []

    def spy(logits, seen, cfg_, vocab_, generator, suppressed=()):
        assert suppressed == []  # (no tokenizer)
        tokens, probs = ours(logits, seen, cfg_, vocab_, generator)
        calls.append((logits.clone(), probs, tokens.tolist()))
        return tokens

    monkeypatch.setattr(gen_mod, "_pick", spy)
    if prompt_as == "ids":
        res = generate(lm, input_ids=prompts, config=cfg)
    elif prompt_as == "padded":  # left padding with an id that no prompt holds, counted out by the mask
        L = max(map(len, prompts))
        ids = torch.zeros(3, L, dtype=torch.long)
        mask = torch.zeros(3, L, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
        res = generate(lm, input_ids=ids, attention_mask=mask, config=cfg)
    else:
        with torch.no_grad():
            res = generate(lm, inputs_embeds=[lm.embeddings(torch.tensor(p)) for p in prompts], config=cfg)
    seqs, reasons = res.sequences, res.finish_reasons
    assert "eos" in reasons and len({len(s) for s in seqs}) > 1, "rows do not finish at different steps"
    other_history_differs = False  # the other reading of the history (prompt counted or not, padding counted)
    for step, (logits, probs, tokens) in enumerate(calls):
        active = [i for i in range(3) if step < len(seqs[i]) + (reasons[i] == "eos")]
        assert len(active) == logits.shape[0] == len(tokens)
        hist = [(prompts[i] if prompt_as != "embeds" else []) + seqs[i][:step] for i in active]
        assert_same_distribution(probs, logits, hist, cfg, vocab)
        for i, t in zip(active, tokens):
            assert t == (seqs[i][step] if step < len(seqs[i]) else 1)
        other = [{"ids": seqs[i][:step], "padded": [0] + h, "embeds": prompts[i] + h}[prompt_as]
                 for i, h in zip(active, hist)]
        other_history_differs |= not torch.allclose(hf_scores(logits, other, cfg, vocab).softmax(-1),
                                                    probs[:, :vocab], atol=1e-4)
    assert len(calls) == max(len(s) + (r == "eos") for s, r in zip(seqs, reasons))
    assert other_history_differs, "the test cannot tell which history the penalty counts"


# ---------------------------------------------------------------------------------------------------------
# 2. the continuous-batching decoder's rows


def test_batch_decoder_rows_draw_as_generate_alone(monkeypatch):
    """One batch of rows with different settings (greedy, greedy with a penalty, a temperature below
    GREEDY_BELOW, top-k, top-p with a penalty, all combined, unseeded) given logits with ties at the top and
    larger padded rows, two steps: each row's distribution is transformers' for its own history (the seen ids
    its job gave, then its first token), each row's token is the one generate()'s sampler picks for that row
    alone (its logits row, its seeded generator; the global RNG for the unseeded one)."""
    from emma_mamba.inference import batching
    from emma_mamba.inference.batching import BatchDecoder, DecodeJob

    lm = _lm()
    vocab, padded = lm.config.vocab_size, lm.config.padded_vocab_size
    assert padded > vocab
    cfgs = [GenerationConfig(max_new_tokens=5, eos_token_id=None),
            GenerationConfig(max_new_tokens=5, eos_token_id=None, repetition_penalty=2.0),
            GenerationConfig(max_new_tokens=5, eos_token_id=None, temperature=1e-6, repetition_penalty=1.5, seed=1),
            GenerationConfig(max_new_tokens=5, eos_token_id=None, temperature=0.8, top_k=4, seed=2),
            GenerationConfig(max_new_tokens=5, eos_token_id=None, temperature=1.3, top_p=0.7,
                             repetition_penalty=1.4, seed=3),
            GenerationConfig(max_new_tokens=5, eos_token_id=None, temperature=0.6, top_k=6, top_p=0.8,
                             repetition_penalty=0.8, seed=4),
            GenerationConfig(max_new_tokens=5, eos_token_id=None, temperature=1.1)]
    g = torch.Generator().manual_seed(7)
    hists = [torch.randint(0, vocab, (5,), generator=g).tolist() for _ in cfgs]
    steps = []
    for _ in range(2):
        x = torch.randint(-3, 4, (len(cfgs), vocab), generator=g).float() * 0.5  # ties, also at the top
        x[:2, 3] = x[:2, 8] = x[:2].max() + 1  # the greedy rows: tied maxima
        steps.append(torch.cat([x, torch.full((len(cfgs), padded - vocab), 99.0)], dim=1))

    dec = BatchDecoder(lm, max_batch=8)
    rows = []
    for cfg, h in zip(cfgs, hists):
        job = DecodeJob(cfg, lambda: None, lambda seq, state, stats: None)
        rows.append(dec._row(job, steps[0][:1], lm.allocate_cache(1), {"seen": h}, 0.0))
    cache = type(lm.allocate_cache(1)).cat([lm.allocate_cache(1) for _ in cfgs])
    drawn = {}

    def spy(logits, seen, cfg, vocab_, generator):
        tokens, probs = ours(logits, seen, cfg, vocab_, generator)
        drawn[cfgs.index(cfg)] = probs
        return tokens

    monkeypatch.setattr(batching, "_pick", spy)
    gens = [torch.Generator().manual_seed(c.seed) if c.seed is not None else None for c in cfgs]
    for s, logits in enumerate(steps):
        drawn.clear()
        torch.manual_seed(11 + s)  # the unseeded row draws from the global RNG
        rows, cache, _, _ = dec._advance(rows, cache, logits, None)
        assert len(rows) == len(cfgs)
        torch.manual_seed(11 + s)
        for j, (cfg, h, row) in enumerate(zip(cfgs, hists, rows)):
            hist = h + row.seq.tokens[:s]
            got = row.seq.tokens[s]
            seen = seen_mask([hist], padded) if cfg.repetition_penalty != 1.0 else None
            alone, probs = ours(logits[j:j + 1], seen, cfg, vocab, gens[j])  # generate's sampler, the row alone
            assert got == int(alone), (j, cfg)
            if cfg.temperature < GREEDY_BELOW:
                assert j not in drawn or drawn[j] is None
                assert got == int(torch.argmax(hf_scores(logits[j:j + 1], [hist], cfg, vocab)))
                if j == 0:  # the one-argmax path of greedy rows: the first of the tied maxima
                    assert got == 3
            else:
                assert torch.equal(drawn[j], probs)
                assert_same_distribution(drawn[j], logits[j:j + 1], [hist], cfg, vocab)
    assert [len(r.seq.tokens) for r in rows] == [2] * len(cfgs)


# ---------------------------------------------------------------------------------------------------------
# 4. seeded draws


def test_seeded_draws_are_reproducible_and_follow_the_filtered_distribution():
    """20000 draws, one _pick call each as decoding makes them, from a generator seeded once: the same seed
    gives the same tokens (without padded rows, the tokens torch.multinomial draws from transformers'
    probabilities with that generator: the sampling step of transformers' generate); none outside the filtered
    support (the padded row, the largest logit, included); and the counts against the filtered distribution:
    - chi-square below chi2.isf(1e-9, df): were the draws from that distribution, a false failure has
      probability 1e-9 (the chi-square approximation is sound: every expected count is > 1000);
    - total variation below 0.025: by the Bretagnolle-Huber-Carol inequality, P(L1 >= 2 eps) <=
      2^k exp(-n (2 eps)^2 / 2) = 16 exp(-25) = 2.2e-10 for k = 4 tokens, n = 20000, eps = 0.025 (no
      approximation).
    Seeded, the test is deterministic besides. The same counts against the distribution the temperature
    forgotten (1 instead of 0.8) fail the chi-square by far (the test sees an error that size; expected
    statistic ~200 against the threshold's 45)."""
    stats = pytest.importorskip("scipy.stats")
    vocab, padded = 7, 8
    logits = torch.tensor([[2.0, 1.6, 1.5, 0.9, 0.3, -0.4, -1.0, 30.0]])  # the last: a padded row
    hist = [[1, 5, 1]]
    seen = seen_mask(hist, padded)
    cfg = GenerationConfig(temperature=0.8, top_k=5, top_p=0.9, repetition_penalty=1.3)
    want = hf_scores(logits, hist, cfg, vocab).softmax(-1)[0].double()
    support = want > 0
    assert int(support.sum()) == 4  # top-k 5 keeps five, top-p 0.9 four

    n = 20000
    g = torch.Generator().manual_seed(1234)
    draws = torch.tensor([int(_pick(logits, seen, cfg, vocab, g)) for _ in range(n)])
    g2 = torch.Generator().manual_seed(1234)
    assert [int(_pick(logits, seen, cfg, vocab, g2)) for _ in range(500)] == draws[:500].tolist()
    # without the padded row: the tokens transformers' sampling step (torch.multinomial of its probabilities)
    # draws with the same generator state, one by one (with it: other tokens, module doc)
    g2, g3 = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
    real = [int(_pick(logits[:, :vocab], seen[:, :vocab], cfg, vocab, g2)) for _ in range(500)]
    assert real == [int(torch.multinomial(want[None].float(), 1, generator=g3)) for _ in range(500)]

    counts = torch.bincount(draws, minlength=padded).double()
    assert counts[torch.cat([~support, torch.tensor([True])])].sum() == 0  # nothing outside the support
    counts = counts[:vocab][support]

    def chi2(p):
        expected = n * p[support] / p[support].sum()
        assert expected.min() > 1000
        return float(((counts - expected) ** 2 / expected).sum())

    limit = float(stats.chi2.isf(1e-9, int(support.sum()) - 1))  # 44.8 for 3 degrees of freedom
    assert chi2(want) < limit
    tv = 0.5 * float((counts / n - want[support]).abs().sum())
    assert tv < 0.025
    off = dict(cfg.__dict__, temperature=1.0)
    other = hf_scores(logits, hist, GenerationConfig(**off), vocab).softmax(-1)[0].double()
    assert torch.equal(other > 0, support) and chi2(other) > 2 * limit
