"""Recurrent generation against repeated full-sequence forwards, batching, sampling rules, text/stream, CLI.

Oracles: the model's own full forward (no cache) re-run on the growing sequence; one-by-one generation for
batches; hand-computed logits for the sampling rules; the tokenizer for text.
"""

from __future__ import annotations

import json

import pytest
import torch

from emma_mamba import ops
from emma_mamba.cli import main as cli_main
from emma_mamba.inference.generate import (GenerationConfig, _pick, _prefill, generate, option_logprobs,
                                           prefill_groups)
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.models.tokenizer import load_tokenizer

from .test_mamba_lm import backend  # noqa: F401  (fixture: torch and, when it runs, cpu)

VOCAB = 90


def _lm(seed=0, vocab=VOCAB, **kw):
    """A small random model whose greedy continuations do not collapse into one repeated token."""
    torch.manual_seed(seed)
    # an untied head and large perturbations: random tied models tend to repeat one token forever
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=vocab, d_state=8, tie_embeddings=False,
                             **kw)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return lm


def _greedy_by_full_forward(lm, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = lm(torch.tensor([seq])).logits[0, -1, :lm.config.vocab_size]
            out.append(int(logits.argmax()))
            seq.append(out[-1])
    return out


def _greedy(n, eos=None):
    return GenerationConfig(max_new_tokens=n, eos_token_id=eos)


def test_greedy_with_cache_equals_full_forwards(backend):  # noqa: F811
    lm = _lm()
    prompt = torch.randint(0, VOCAB, (11,)).tolist()
    ref = _greedy_by_full_forward(lm, prompt, 24)
    assert len(set(ref)) > 4, "degenerate test model"
    res = generate(lm, input_ids=prompt, config=_greedy(24))
    assert res.sequences == [ref]
    assert res.finish_reasons == ["length"] and res.decode_steps == 23
    # the options as keywords (over a config), and the model's own generate (as transformers and mamba-ssm have)
    assert generate(lm, prompt, max_new_tokens=24, eos_token_id=None).sequences == [ref]
    assert generate(lm, prompt, config=_greedy(3), max_new_tokens=24).sequences == [ref]
    assert lm.generate(torch.tensor(prompt), max_new_tokens=24, eos_token_id=None).sequences == [ref]
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_length'\]; the GenerationConfig fields are"):
        lm.generate(prompt, max_length=24)


def test_decode_steps_use_the_single_step_ops(monkeypatch):
    """One prefill scan per layer, then O(1) steps: the first through the checked public op, the later ones (same
    cache, kernels and dtypes) straight to the kernels (ops.step_kernels), with the same tokens."""
    lm = _lm()
    calls = {"scan": 0, "step": 0, "unchecked": 0}
    want = generate(lm, input_ids=list(range(1, 9)), config=_greedy(6)).sequences

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(ops, "selective_scan", counted("scan", ops.selective_scan))
    monkeypatch.setattr(ops, "selective_state_update", counted("step", ops.selective_state_update))
    monkeypatch.setattr(ops, "selective_state_update_unchecked",
                        counted("unchecked", ops.selective_state_update_unchecked))
    assert generate(lm, input_ids=list(range(1, 9)), config=_greedy(6)).sequences == want
    n_layer = lm.config.n_layer
    with torch.no_grad():  # as generate runs; None on the torch reference backend (every step checked)
        trusted = ops.step_kernels("cpu") is not None
    assert calls == {"scan": n_layer, "step": (1 if trusted else 5) * n_layer,
                     "unchecked": (4 if trusted else 0) * n_layer}


def test_batch_of_different_lengths_equals_one_by_one(backend):  # noqa: F811
    lm = _lm(seed=3)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 1, 9, 5, 3)]
    one = [generate(lm, input_ids=p, config=_greedy(10)).sequences[0] for p in prompts]
    assert generate(lm, input_ids=prompts, config=_greedy(10)).sequences == one

    # the same batch as a left-padded tensor with an attention mask, and right-padded
    L = max(map(len, prompts))
    for side in ("left", "right"):
        ids = torch.full((len(prompts), L), 7)
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for i, p in enumerate(prompts):
            sl = slice(L - len(p), L) if side == "left" else slice(0, len(p))
            ids[i, sl] = torch.tensor(p)
            mask[i, sl] = 1
        assert generate(lm, input_ids=ids, attention_mask=mask, config=_greedy(10)).sequences == one


def test_prefill_groups_by_hand():
    # by increasing length; a group grows while rows x longest <= 1.25 x real tokens
    # sorted: 1 (idx 1) | 3 (4), 5 (0), 5 (3): 3 x 5 = 15 <= 1.25 x 13 | 9 (2): 4 x 9 = 36 > 1.25 x 22
    assert prefill_groups([5, 1, 9, 5, 3]) == [[1], [4, 0, 3], [2]]
    assert prefill_groups([5, 1, 9, 5, 3], pad_waste=0) == [[1], [4], [0, 3], [2]]  # one batch per length
    assert prefill_groups([7, 7, 7]) == [[0, 1, 2]]
    assert prefill_groups([600, 590, 610, 575], pad_waste=0.25) == [[3, 1, 0, 2]]  # eval prompts: one batch
    assert prefill_groups([]) == []


def test_padded_prefill_leaves_each_prompts_own_state(backend):  # noqa: F811
    """One left-padded batch (seq_idx restarts the state at each prompt) against each prompt prefilled alone:
    same next-token logits, same conv window and SSM state per row, also for prompts shorter than the conv
    window. Without seq_idx the padding would flow into the states (checked: the comparison can fail)."""
    lm = _lm(seed=5)
    lengths = (9, 1, 2, 6, 9, 3)
    prompts = [(torch.randint(0, VOCAB, (n,)), None) for n in lengths]
    cache = lm.allocate_cache(len(prompts))
    with torch.no_grad():
        logits = _prefill(lm, prompts, cache, pad_waste=10.0)  # everything in one padded batch
        for i, (ids, _) in enumerate(prompts):
            one = lm.allocate_cache(1)
            want = lm(input_ids=ids[None], cache=one, num_last_tokens=1).logits[0, -1].float()
            torch.testing.assert_close(logits[i], want, rtol=1e-5, atol=1e-5)
            # the states come from GEMMs of different batch shapes (a padded batch vs one row): fp32 rounding of
            # a few 1e-6 (seen 4e-6 once, BLAS results depend on buffer alignment); padding leaking into a state
            # would differ by orders more
            for layer in range(lm.config.n_layer):
                torch.testing.assert_close(cache.conv_states[layer][i], one.conv_states[layer][0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cache.ssm_states[layer][i], one.ssm_states[layer][0], rtol=1e-5, atol=1e-5)
        # the same padded batch without the boundary: the short rows' states change
        L = max(lengths)
        ids = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), p]) for (p, _), n in zip(prompts, lengths)])
        plain = lm.allocate_cache(len(prompts))
        lm(input_ids=ids, cache=plain, num_last_tokens=1)
    assert not torch.allclose(plain.ssm_states[0][1], cache.ssm_states[0][1], atol=1e-4)


def test_batched_rows_finish_independently():
    lm = _lm(seed=4)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (4, 6)]
    free = [generate(lm, input_ids=p, config=_greedy(12)).sequences[0] for p in prompts]
    eos = free[0][5]  # row 0 stops at its 6th token; row 1 goes on unless it meets the same token
    res = generate(lm, input_ids=prompts, config=_greedy(12, eos=eos))
    for i, seq in enumerate(free):
        cut = seq.index(eos) if eos in seq else len(seq)
        assert res.sequences[i] == seq[:cut]
        assert res.finish_reasons[i] == ("eos" if eos in seq else "length")


def test_inputs_embeds_prompt_equals_ids_prompt():
    lm = _lm()
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (6, 3)]
    want = generate(lm, input_ids=[p.tolist() for p in prompts], config=_greedy(8)).sequences
    with torch.no_grad():
        embeds = [lm.embeddings(p) for p in prompts]
    assert generate(lm, inputs_embeds=embeds, config=_greedy(8)).sequences == want
    assert generate(lm, inputs_embeds=embeds[0], config=_greedy(8)).sequences == want[:1]


def test_num_return_sequences_forks_each_prompts_state(monkeypatch):
    """n continuations per prompt: one prefill per prompt (counted), then prompt-major rows equal to generating
    from the prompt repeated n times (each repeat prefilled on its own), sampled with the same seeded generator;
    greedy rows all equal the single greedy continuation; repetition penalties count each row's own prompt."""
    from emma_mamba.inference import generate as gen_mod

    lm = _lm(seed=2)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 8)]
    cfg = GenerationConfig(max_new_tokens=9, temperature=1.1, top_k=20, seed=4, eos_token_id=None,
                           repetition_penalty=1.2)
    want = generate(lm, input_ids=[p for p in prompts for _ in range(3)], config=cfg)
    prefilled = []
    real = gen_mod._prefill
    monkeypatch.setattr(gen_mod, "_prefill", lambda lm_, ps, cache, **kw: prefilled.append(len(ps)) or
                        real(lm_, ps, cache, **kw))
    got = generate(lm, input_ids=prompts, config=GenerationConfig(**{**cfg.__dict__, "num_return_sequences": 3}))
    assert prefilled == [2]  # the two prompts, not six rows
    assert got.sequences == want.sequences and len(got.sequences) == 6
    assert len({tuple(s) for s in got.sequences[:3]}) > 1  # the forks sample apart
    assert got.prompt_lengths == [5, 5, 5, 8, 8, 8] and got.finish_reasons == want.finish_reasons
    greedy = generate(lm, input_ids=prompts[0], config=GenerationConfig(max_new_tokens=7, eos_token_id=None,
                                                                        num_return_sequences=4))
    assert greedy.sequences == [_greedy_by_full_forward(lm, prompts[0], 7)] * 4
    with pytest.raises(ValueError, match="num_return_sequences must be an integer >= 1"):
        GenerationConfig(num_return_sequences=0)
    with pytest.raises(ValueError, match="one continuation"):
        generate(lm, input_ids=prompts[0], config=GenerationConfig(num_return_sequences=2),
                 cache=lm.allocate_cache(1))


def test_chunked_prefill_gives_the_whole_prefills_answers_and_states(monkeypatch):
    """prefill_chunk: a batch of prompts of different lengths (ids and embeddings), and a continuation of a cached
    context, prefilled a few positions at a time (forwards counted: padding only in the first) give the tokens and
    final states of the whole prefill (1e-5)."""
    lm = _lm(seed=6)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 13, 30, 31)]
    widths = []
    real = lm.forward

    def counted(*a, **k):
        x = k.get("input_ids") if k.get("input_ids") is not None else k.get("inputs_embeds")
        widths.append((x.shape[1], k.get("seq_idx") is not None))
        return real(*a, **k)

    for kind in ("ids", "embeds"):
        whole_cfg = GenerationConfig(max_new_tokens=6, eos_token_id=None, prefill_chunk=None)
        chunked_cfg = GenerationConfig(max_new_tokens=6, eos_token_id=None, prefill_chunk=4)
        inp = ({"input_ids": prompts} if kind == "ids" else
               {"inputs_embeds": [lm.embeddings(torch.tensor(p)).detach() for p in prompts]})
        want = generate(lm, config=whole_cfg, **inp)
        widths.clear()
        monkeypatch.setattr(lm, "forward", counted)
        got = generate(lm, config=chunked_cfg, **inp)
        monkeypatch.setattr(lm, "forward", real)
        assert got.sequences == want.sequences
        prefill = [w for w in widths if w[0] > 1]
        assert len(prefill) > len(prompts) and all(w <= 4 for w, padded in prefill if not padded)
    # continuing a cached context, chunked, against the same continuation whole
    ctx, more = prompts[2], prompts[1]
    states = []
    for chunk in (None, 3):
        cache = lm.allocate_cache(1)
        with torch.no_grad():
            lm(input_ids=torch.tensor([ctx]), cache=cache)
        res = generate(lm, input_ids=more, cache=cache,
                       config=GenerationConfig(max_new_tokens=5, eos_token_id=None, prefill_chunk=chunk))
        states.append((res.sequences, cache))
    assert states[0][0] == states[1][0]
    for a, b in zip(states[0][1].ssm_states + states[0][1].conv_states, states[1][1].ssm_states + states[1][1].conv_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="prefill_chunk must be a positive integer, None or 'auto'"):
        GenerationConfig(prefill_chunk=0)
    from emma_mamba.inference.generate import PREFILL_CPU_CHUNK, resolve_prefill_chunk

    assert resolve_prefill_chunk("auto", torch.device("cpu")) == PREFILL_CPU_CHUNK
    assert resolve_prefill_chunk("auto", torch.device("cuda")) is None and resolve_prefill_chunk(7, None) == 7


def _option_logprob_by_full_forward(lm, prompt: list[int], option: list[int]) -> float:
    """log P(option | prompt) from one forward of prompt + option (no cache): the sum of each option token's
    log-softmax over the real vocabulary at the position before it."""
    with torch.no_grad():
        logits = lm(torch.tensor([prompt + option])).logits[0, :, :lm.config.vocab_size].double()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(option))


def test_option_logprobs_equal_full_forwards(backend):  # noqa: F811
    lm = _lm(seed=3)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (4, 13, 9, 13)]  # ragged: padded batch
    options = [[7], [12], [3, 40], [40, 3, 3], [89]]
    got = option_logprobs(lm, options, input_ids=prompts)
    assert got.shape == (4, 5) and got.dtype == torch.float32
    want = torch.tensor([[_option_logprob_by_full_forward(lm, p, o) for o in options] for p in prompts],
                        dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)
    # as embeddings, and chunked prefill: the same
    emb = [lm.embeddings(torch.tensor(p)).detach() for p in prompts]
    torch.testing.assert_close(option_logprobs(lm, options, inputs_embeds=emb, prefill_chunk=3), got,
                               atol=2e-5, rtol=1e-5)
    # one-token options: the next-token distribution itself (softmax over the options = renormalised probs)
    probs = torch.softmax(lm(torch.tensor([prompts[1]])).logits[0, -1, :VOCAB].double(), -1)[[7, 12, 89]]
    torch.testing.assert_close(torch.softmax(got[1, [0, 1, 4]].double(), -1), probs / probs.sum())
    with pytest.raises(ValueError, match="option 1 has no tokens"):
        option_logprobs(lm, [[1], []], input_ids=prompts)
    with pytest.raises(ValueError, match=r"option 0 holds token ids outside the vocabulary \[0, 90\): \[90\]"):
        option_logprobs(lm, [[90]], input_ids=prompts)


def test_pick_rules_by_hand():
    V = 6
    logits = torch.tensor([[2.0, 1.5, -1.0, 0.0, 0.5, 9.0]])
    cfg = GenerationConfig(repetition_penalty=2.0)
    # the last id is padding (vocab_size 5): never picked even though it is the largest
    assert _pick(logits, None, GenerationConfig(), 5, None).item() == 0
    seen = torch.tensor([[True, False, True, False, False, False]])
    # 2.0 -> 1.0 (divided), so 1.5 wins; -1.0 -> -2.0 (multiplied)
    assert _pick(logits, seen, cfg, 5, None).item() == 1
    g = torch.Generator().manual_seed(0)
    top1 = GenerationConfig(temperature=1.0, top_k=1)
    assert all(_pick(logits, None, top1, 5, g).item() == 0 for _ in range(20))
    # top_p: softmax of the 5 real logits = [0.496, 0.301, 0.025, 0.067, 0.111]; the two most likely hold 0.797,
    # so top_p 0.75 keeps exactly tokens 0 and 1 (token 4 would need top_p > 0.797)
    nucleus = GenerationConfig(temperature=1.0, top_p=0.75)
    draws = {_pick(logits, None, nucleus, 5, g).item() for _ in range(200)}
    assert draws == {0, 1}
    assert logits.shape[-1] == V  # _pick does not modify its input in place
    assert logits[0, 5] == 9.0


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    lm = _lm()
    prompt = [5, 6, 7]
    s = GenerationConfig(max_new_tokens=10, temperature=1.3, top_p=0.95, seed=123, eos_token_id=None)
    a, b = generate(lm, input_ids=prompt, config=s), generate(lm, input_ids=prompt, config=s)
    assert a.sequences == b.sequences
    k1 = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=1, seed=1, eos_token_id=None)
    assert generate(lm, input_ids=prompt, config=k1).sequences == generate(lm, input_ids=prompt,
                                                                           config=_greedy(10)).sequences


def test_text_stop_strings_and_streaming():
    tok = load_tokenizer()
    lm = _lm(seed=5, vocab=50277)
    prompt = tok.encode("The weather today")
    free = generate(lm, input_ids=prompt, config=_greedy(30), tokenizer=tok)
    text = free.texts[0]
    assert text == tok.decode(free.sequences[0]) and len(text) > 20

    chunks: list[str] = []
    streamed = generate(lm, input_ids=prompt, config=_greedy(30), tokenizer=tok, streamer=chunks.append)
    assert "".join(chunks) == text == streamed.texts[0] and len(chunks) > 1

    stop = text[len(text) // 2: len(text) // 2 + 3]  # a string the model will produce mid-way
    first = text.find(stop)
    chunks = []
    res = generate(lm, input_ids=prompt, config=GenerationConfig(max_new_tokens=30, eos_token_id=None,
                                                                stop_strings=[stop, "never-produced"]),
                   tokenizer=tok, streamer=chunks.append)
    assert res.finish_reasons == ["stop"]
    assert res.texts[0] == text[:first]
    assert "".join(chunks) == text[:first]  # the stop string never reaches the stream
    assert len(res.sequences[0]) < 30


def test_tokenizer_shipped_copy():
    tok = load_tokenizer()
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1  # <|endoftext|>, <|padding|> in GPT-NeoX-20B
    assert tok.encode("Hello") == [12092]
    s = "Mamba: linear-time sequence modeling — ünïcode ✓"
    assert tok.decode(tok.encode(s)) == s
    new = tok.add_tokens(["<image>"])
    assert tok.encode("a <image> b").count(new[0]) == 1


def test_generate_input_errors():
    lm = _lm()
    tok = load_tokenizer()
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        generate(lm)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(lm, input_ids=torch.tensor([[1, 2], [3, 4]]), attention_mask=torch.tensor([[1, 1], [0, 0]]))
    # a mask is padding on the left or the right: a hole would silently drop a prompt token
    with pytest.raises(ValueError, match="row 1 has a hole .* at position 1"):
        generate(lm, input_ids=torch.tensor([[1, 2, 3], [3, 4, 5]]),
                 attention_mask=torch.tensor([[0, 1, 1], [1, 0, 1]]))
    with pytest.raises(ValueError, match="0 .padding. and 1 .prompt. only"):
        generate(lm, input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 2]]))
    # with embeddings as with ids, a mask goes with a batched tensor only (it was ignored: padding prefilled)
    emb = lm.embeddings(torch.tensor([[7, 7, 1, 2]])).detach()
    for embeds in (emb[0], [emb[0]]):
        with pytest.raises(ValueError, match="attention_mask goes with a .batch, seqlen, d_model."):
            generate(lm, inputs_embeds=embeds, attention_mask=torch.tensor([[0, 0, 1, 1]]))
    got = generate(lm, inputs_embeds=emb, attention_mask=torch.tensor([[0, 0, 1, 1.0]]), config=_greedy(3))
    assert got.sequences == generate(lm, input_ids=[1, 2], config=_greedy(3)).sequences
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(lm, input_ids=[1, 2], config=GenerationConfig(stop_strings=["x"]))
    with pytest.raises(ValueError, match="streaming supports a single prompt"):
        generate(lm, input_ids=[[1], [2]], tokenizer=tok, streamer=print)
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationConfig(top_p=0)


def test_cli_generate(tmp_path, capsys):
    torch.manual_seed(0)
    MambaLM(MambaConfig.from_preset("tiny")).save_pretrained(tmp_path / "ckpt", layout="original")
    assert cli_main(["generate", "--lm", str(tmp_path / "ckpt"), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello") and "5 new (length)" in err
    assert cli_main(["generate", "--random-init", "tiny", "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    assert "random weights" in capsys.readouterr().err
    assert cli_main(["generate", "--lm", "tiny", "--prompt", "x"]) == 2
    assert "--random-init tiny" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["generate", "--lm", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err
    # --prefill-chunk: the same continuation as the whole prefill
    prompt = "The quick brown fox jumps over the lazy dog, again and again"
    outs = []
    for extra in (["--prefill-chunk", "0"], ["--prefill-chunk", "3"]):
        assert cli_main(["generate", "--lm", str(tmp_path / "ckpt"), "--prompt", prompt, "--max-new-tokens", "6",
                         *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith(prompt)
    assert cli_main(["generate", "--lm", str(tmp_path / "ckpt"), "--prompt", "x", "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk must be >= 0" in capsys.readouterr().err



@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_bench_lm_runs_and_writes_json(tmp_path, capsys, mixer):
    out = tmp_path / "lm.json"
    extra = ["--ssm-layer", "mamba2", "--headdim", "16", "--d-state", "8"] if mixer == "mamba2" else []
    assert cli_main(["bench", "lm", "--d-model", "32", "--n-layer", "1", "--vocab-size", "128", "--prompt-len", "24",
                     "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--out", str(out), *extra]) == 0
    res = json.loads(out.read_text())
    assert res["shapes"]["d_model"] == 32 and res["shapes"]["prompt_len"] == 24
    assert res["ssm_layer"] == mixer and res["peer"] == ("Mamba2ForCausalLM" if mixer == "mamba2" else
                                                         "MambaForCausalLM")
    assert res["last_token_logits_max_abs_diff"] < 1e-4  # the two models really hold the same weights
    assert res["greedy_tokens_agree_for"] == 4
    assert set(res["ratios"]) == {"prefill_speedup", "decode_speedup"} and "torch" in res["machine"]
    assert "prefill_speedup" in capsys.readouterr().out


def test_zero_new_tokens_into_a_cache_prefills_the_prompt():
    """max_new_tokens 0 with a cache: no token, and the cache holds the prompt, as it does after one new token
    (the state after every token but the final one)."""
    lm = _lm(seed=4)
    prompt = torch.randint(0, VOCAB, (7,)).tolist()
    caches = []
    for n in (0, 1):
        cache = lm.allocate_cache(1)
        res = generate(lm, input_ids=prompt, config=GenerationConfig(max_new_tokens=n), cache=cache)
        assert len(res.sequences[0]) == n and cache.seqlen_offset == len(prompt)
        caches.append(cache)
    for a, b in zip(caches[0].conv_states + caches[0].ssm_states, caches[1].conv_states + caches[1].ssm_states):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_decode_step_skips_the_host_synchronising_id_check(monkeypatch):
    """decode_step feeds the sampler's ids through the embedding (as the compiled step does): the same logits and
    cache as the ids path, bit for bit, without MambaLM.forward's min()/max() range check of user input (two host
    syncs a step on a GPU)."""
    from emma_mamba.inference.generate import decode_step

    lm = _lm()
    ids = torch.tensor([[3, 7, 11, 2], [5, 5, 1, 80]])
    a, b = lm.allocate_cache(2), lm.allocate_cache(2)
    with torch.no_grad():
        lm(input_ids=ids, cache=a)
        lm(input_ids=ids, cache=b)
        tok = torch.tensor([[4], [89]])
        want = lm(input_ids=tok, cache=a).logits[:, -1]
        checked = []
        real = MambaLM._check_inputs
        monkeypatch.setattr(MambaLM, "_check_inputs",
                            lambda self, input_ids, *r: checked.append(input_ids is not None) or real(self, input_ids, *r))
        got = decode_step(lm, tok, b)
    assert torch.equal(got, want) and checked == [False]
    assert a.seqlen_offset == b.seqlen_offset == 5
    assert all(torch.equal(x, y) for x, y in zip(a.ssm_states + a.conv_states, b.ssm_states + b.conv_states))


def test_one_prompt_given_as_numpy_or_tensor_ids_is_one_prompt():
    """A list of numpy integers or 0-d tensors (``list(np.array(ids))``, ``list(torch.tensor(ids))``) and a 1-d
    array are one prompt, as a list of Python ints is (they were taken as one-token prompts each); the oracle is
    the plain-int call. Malformed lists are refused naming what is wrong."""
    import numpy as np

    lm = _lm()
    cfg = GenerationConfig(max_new_tokens=4, eos_token_id=None)
    ids = [5, 7, 9, 11]
    want = generate(lm, ids, config=cfg)
    assert want.prompt_lengths == [4]
    for given in (list(np.array(ids)), list(torch.tensor(ids)), [np.int32(x) for x in ids], np.array(ids),
                  np.array([ids])):
        got = generate(lm, given, config=cfg)
        assert got.prompt_lengths == [4] and got.sequences == want.sequences, type(given)
    ragged = generate(lm, [np.array(ids[:2]), torch.tensor(ids)], config=cfg)
    assert ragged.prompt_lengths == [2, 4] and ragged.sequences[1] == want.sequences[0]
    for bad, msg in (([], "input_ids is an empty list"), ([[]], "prompt 0 is empty"),
                     ([5, [6]], "mixes ids and lists of ids"), ([[1.5, 2.0]], r"input_ids\[0\] must be a list"),
                     ("5 7", "got str")):
        with pytest.raises(ValueError, match=msg):
            generate(lm, bad, config=cfg)


def test_a_token_id_beyond_int64_is_named_with_its_prompt():
    """An id that does not fit int64 (a numpy uint64) failed with torch's bare "Overflow when unpacking long long",
    and in a ragged batch as "input_ids[1] must be a list ... got list" (it is one)."""
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=64)).eval()
    with pytest.raises(ValueError, match=r"generate: input_ids holds token id 9223372036854775808, outside any"):
        generate(lm, [1, 2 ** 63], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"generate: input_ids\[1\] holds token id 9223372036854775808"):
        generate(lm, [[1, 2], [1, 2 ** 63]], max_new_tokens=1)
