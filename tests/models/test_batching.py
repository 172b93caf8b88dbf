"""Continuous batching (emma_mamba.inference.batching) against generate() on each prompt alone: requests
decoded together, joining a running batch, queued beyond max_batch, with their own sampling settings, seeds and
repetition penalties; the state each leaves; a failing or cancelled request alone; the CUDA-graph path (with
the EagerReplay stand-in); and the server answering concurrent requests as it answers them one by one."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from emma_mamba.inference import cuda_graphs
from emma_mamba.inference.batching import BatchDecoder, DecodeJob
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.models.mamba import MambaConfig, MambaLM

CONFIGS = [
    GenerationConfig(max_new_tokens=9),
    GenerationConfig(max_new_tokens=14, temperature=1.0, seed=3),
    GenerationConfig(max_new_tokens=6, temperature=0.8, top_k=5, seed=11, eos_token_id=7),
    GenerationConfig(max_new_tokens=20, repetition_penalty=1.3),
    GenerationConfig(max_new_tokens=12, temperature=1.2, top_p=0.9, seed=5),
]


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=96, d_state=8)).eval()


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (int(torch.randint(3, 17, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def job(lm, ids, cfg, fail_start=False, fail_finish=False):
    def start():
        if fail_start:
            raise ValueError("bad start")
        return {"input_ids": ids, "seen": ids}

    def finish(seq, state, stats):
        if fail_finish:
            raise KeyError("bad finish")
        return {"tokens": list(seq.tokens), "reason": seq.reason, "final": seq.final, "state": state, **stats}

    return DecodeJob(cfg, start, finish)


def alone(lm, ids, cfg):
    """generate() on one prompt, continuing a fresh cache so that the state it leaves is returned."""
    cache = lm.allocate_cache(1)
    res = generate(lm, input_ids=ids, config=cfg, cache=cache)
    return res.sequences[0], res.finish_reasons[0], res.final_tokens[0], res.cache


def check(lm, got, ids, cfg):
    tokens, reason, final, state = alone(lm, ids, cfg)
    assert (got["tokens"], got["reason"], got["final"]) == (tokens, reason, final)
    for a, b in zip(got["state"].conv_states + got["state"].ssm_states, state.conv_states + state.ssm_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got["state"].seqlen_offset == len(ids) + len(tokens) - (reason == "length")


class StepGate:
    """Holds the decoder's thread inside its decode steps number ``at`` (counted from 1 once installed) until
    :meth:`release`: the test acts at a known point of a running batch. (Polling ``decode_steps`` instead races
    the decoder: on a busy machine the polling thread can wake many steps late, after the running answer ended.)
    Jobs submitted while it holds are all queued when the decoder next admits."""

    def __init__(self, monkeypatch, *at):
        from emma_mamba.inference import batching

        self.reached = {n: threading.Event() for n in at}
        self.go = {n: threading.Event() for n in at}
        self.steps = 0
        real = batching.decode_step

        def step(*a, **k):
            out = real(*a, **k)
            self.steps += 1
            if self.steps in self.reached:
                self.reached[self.steps].set()
                self.go[self.steps].wait(60)
            return out

        monkeypatch.setattr(batching, "decode_step", step)

    def wait(self, n):
        assert self.reached[n].wait(60), f"the decoder never reached decode step {n}"

    def release(self, n):
        self.go[n].set()


def test_requests_decoded_together_get_their_own_answers(lm, monkeypatch):
    from emma_mamba.inference import batching

    calls = []
    real = batching._prefill
    monkeypatch.setattr(batching, "_prefill", lambda lm_, ps_, cache, **kw: calls.append(len(ps_)) or real(lm_, ps_, cache, **kw))
    dec = BatchDecoder(lm, max_batch=8)
    ps = prompts(len(CONFIGS))
    with dec.hold():
        jobs = [dec.submit(job(lm, p, c)) for p, c in zip(ps, CONFIGS)]
    results = [j.wait(timeout=60) for j in jobs]
    assert calls == [len(CONFIGS)]  # admitted together, prefilled together (padded, seq_idx resets)
    for r, p, c in zip(results, ps, CONFIGS):
        check(lm, r, p, c)
    assert all(r["max_batch_rows"] == len(CONFIGS) for r in results)  # admitted together
    # the batch took as many steps as its longest member needed, not the sum
    assert dec.decode_steps == max(r["decode_steps"] for r in results)
    dec.close()


def test_requests_join_a_running_batch_and_wait_beyond_max_batch(lm, monkeypatch):
    dec = BatchDecoder(lm, max_batch=3)
    gate = StepGate(monkeypatch, 3)
    ps = prompts(6, seed=2)
    cfgs = [GenerationConfig(max_new_tokens=40)] + CONFIGS
    first = dec.submit(job(lm, ps[0], cfgs[0]))
    gate.wait(3)  # mid-flight (36 steps to go): five more, two of which fit now
    later = [dec.submit(job(lm, p, c)) for p, c in zip(ps[1:], cfgs[1:])]
    gate.release(3)
    results = [first.wait(timeout=60)] + [j.wait(timeout=60) for j in later]
    for r, p, c in zip(results, ps, cfgs):
        check(lm, r, p, c)
    assert results[0]["max_batch_rows"] == 3 and max(r["max_batch_rows"] for r in results) == 3
    assert results[0]["decode_steps"] == 39  # it lost no step to the joins
    dec.close()


@pytest.mark.parametrize("min_join", [1, 2])
def test_min_join_waits_for_enough_free_rows(lm, min_join):
    # three rows: A (40 tokens), B (30), C (5); D (5) queued behind them. When C ends one row is free: with
    # min_join 1 D joins then (decoding beside A and B), with 2 only once B has ended too (beside A alone)
    dec = BatchDecoder(lm, max_batch=3, min_join=min_join)
    ps = prompts(4, seed=4)
    cfgs = [GenerationConfig(max_new_tokens=n) for n in (40, 30, 5, 5)]
    with dec.hold():
        jobs = [dec.submit(job(lm, p, c)) for p, c in zip(ps, cfgs)]
    results = [j.wait(timeout=60) for j in jobs]
    for r, p, c in zip(results, ps, cfgs):
        check(lm, r, p, c)
    assert results[3]["max_batch_rows"] == (3 if min_join == 1 else 2)
    # D's steps come after C's (min_join 1) or B's (2) ended: the decoder ran A's 39 steps either way
    assert dec.decode_steps == 39
    dec.close()


def test_bad_min_join(lm):
    for bad in (0, 4, 1.5, True):
        with pytest.raises(ValueError, match="min_join must be an integer in"):
            BatchDecoder(lm, max_batch=3, min_join=bad)


def test_a_failing_or_cancelled_request_leaves_the_others_alone(lm):
    dec = BatchDecoder(lm, max_batch=8)
    ps = prompts(4, seed=3)
    cfg = GenerationConfig(max_new_tokens=30)
    gone = job(lm, ps[2], cfg)
    admitted = gone.start

    def start():  # its client goes away once it is admitted (deterministic: no race with the decoder's 29 steps)
        gone.cancelled = True
        return admitted()

    gone.start = start  # prefilled, then it leaves at the next step
    with dec.hold():
        jobs = [dec.submit(job(lm, ps[0], cfg, fail_start=True)), dec.submit(job(lm, ps[1], cfg, fail_finish=True)),
                dec.submit(gone), dec.submit(job(lm, ps[3], CONFIGS[1]))]
    with pytest.raises(ValueError, match="bad start"):
        jobs[0].wait(timeout=60)
    with pytest.raises(KeyError, match="bad finish"):
        jobs[1].wait(timeout=60)
    with pytest.raises(RuntimeError, match="cancelled"):
        jobs[2].wait(timeout=60)
    check(lm, jobs[3].wait(timeout=60), ps[3], CONFIGS[1])
    deadline = time.perf_counter() + 10
    while dec.active and time.perf_counter() < deadline:
        time.sleep(0.001)
    assert dec.active == 0
    dec.close()


def test_a_row_whose_sampling_fails_fails_alone_and_a_tiny_temperature_is_greedy(lm, monkeypatch):
    """A request's own sampling error (here forced for seed 13) settles that request only; the others decode on.
    A temperature too small to divide by (1e-45: logits / T overflow) samples greedily, its limit."""
    from emma_mamba.inference import batching

    real = batching._pick

    def pick(logits, seen, cfg, vocab, generator):
        if cfg.seed == 13:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, seen, cfg, vocab, generator)

    monkeypatch.setattr(batching, "_pick", pick)
    dec = BatchDecoder(lm, max_batch=4)
    ps = prompts(3, seed=5)
    cfgs = [GenerationConfig(max_new_tokens=8, temperature=1.0, seed=13), GenerationConfig(max_new_tokens=8),
            GenerationConfig(max_new_tokens=8, temperature=1e-45, seed=2)]
    with dec.hold():
        jobs = [dec.submit(job(lm, p, c)) for p, c in zip(ps, cfgs)]
    with pytest.raises(RuntimeError, match="probability tensor"):
        jobs[0].wait(timeout=60)
    check(lm, jobs[1].wait(timeout=60), ps[1], cfgs[1])
    tiny = jobs[2].wait(timeout=60)
    check(lm, tiny, ps[2], GenerationConfig(max_new_tokens=8))  # greedy
    dec.close()


def test_streamed_chunks_reach_the_waiting_thread():
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    model = EmmaMamba(get_preset("tiny"), for_training=False).eval()
    tok, ids = model.tokenizer, model.tokenizer.encode("Once upon a time")
    cfg = GenerationConfig(max_new_tokens=12, temperature=1.0, seed=4, eos_token_id=tok.eos_token_id)
    dec = BatchDecoder(model.lm)

    def start():
        return {"input_ids": ids}

    chunks, thread = [], []
    text = dec.run(DecodeJob(cfg, start, lambda seq, state, stats: seq.text(), tok, stream=True),
                   lambda c: (chunks.append(c), thread.append(threading.get_ident())))
    assert "".join(chunks) == text == generate(model.lm, input_ids=ids, config=cfg, tokenizer=tok).texts[0]
    assert set(thread) == {threading.get_ident()}  # the caller's thread, not the decoder's
    # a streamer that fails cancels its job
    with pytest.raises(BrokenPipeError):
        dec.run(DecodeJob(dataclass_replace(cfg, max_new_tokens=200), start,
                          lambda seq, state, stats: None, tok, stream=True),
                lambda c: (_ for _ in ()).throw(BrokenPipeError()))
    dec.close()


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_cuda_graph_path_with_the_eager_replay_stand_in(lm):
    api = cuda_graphs.EagerReplay()
    cuda_graphs.attach(lm, api)
    try:
        dec = BatchDecoder(lm, max_batch=8, cuda_graphs=True)
        ps = prompts(3, seed=4)
        cfgs = CONFIGS[:3]
        with dec.hold():
            jobs = [dec.submit(job(lm, p, c)) for p, c in zip(ps, cfgs)]
        for j, p, c in zip(jobs, ps, cfgs):
            check(lm, j.wait(timeout=60), p, c)
        assert api.captures == 3  # one graph per batch size the batch went through (3, then 2, then 1)
        dec.close()
    finally:
        cuda_graphs.release(lm)


def test_bad_max_batch(lm):
    with pytest.raises(ValueError, match="max_batch must be a positive integer"):
        BatchDecoder(lm, max_batch=0)


def test_server_answers_concurrent_requests_as_it_answers_them_alone():
    import urllib.request

    from emma_mamba.config import get_preset
    from emma_mamba.inference.server import ChatService, make_server
    from emma_mamba.models.vlm import EmmaMamba
    from tests.models.test_server import user

    torch.manual_seed(0)
    model = EmmaMamba(get_preset("tiny"), for_training=False).eval()
    batched = ChatService(model, defaults=GenerationConfig(max_new_tokens=8), max_batch=4)
    single = ChatService(model, defaults=GenerationConfig(max_new_tokens=8), max_batch=1)
    bodies = [{"messages": [user("What is this?")]},
              {"messages": [user("Describe it.")], "temperature": 1.0, "seed": 7, "max_tokens": 12},
              {"messages": [user("Colour?", image=False)], "temperature": 0.7, "top_k": 20, "seed": 1},
              {"messages": [user("More.")], "repetition_penalty": 1.2, "stream": True}]
    srv = make_server(batched, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}/v1/chat/completions"
    out = [None] * len(bodies)

    def call(i):
        req = urllib.request.Request(url, data=json.dumps(bodies[i]).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            out[i] = r.read().decode()

    # the images of the requests admitted together go through the vision side in one batch
    encoded = []
    real_encode = model.encode_images
    model.encode_images = lambda pixels, *a, **k: encoded.append(pixels.shape[0]) or real_encode(pixels, *a, **k)
    try:
        with batched.decoder.hold():
            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
            for t in threads:
                t.start()
            deadline = time.perf_counter() + 30
            while batched.decoder.queue.qsize() < len(bodies) and time.perf_counter() < deadline:
                time.sleep(0.005)
            assert batched.decoder.queue.qsize() == len(bodies)
        for t in threads:
            t.join(120)
    finally:
        srv.shutdown()
        srv.server_close()
        del model.encode_images
    assert encoded == [3] and batched.decoder.embed_batches == 1  # 3 of the 4 requests carry an image
    for i, body in enumerate(bodies):
        want = single.complete({k: v for k, v in body.items() if k != "stream"})
        if body.get("stream"):
            events = [json.loads(x[6:]) for x in out[i].split("\n\n") if x.startswith("data: {")]
            text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
            assert text == want["choices"][0]["message"]["content"]
            assert events[-1]["usage"] == want["usage"]
        else:
            got = json.loads(out[i])
            assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
            assert got["emma_mamba"]["batch_rows"] == len(bodies) and want["emma_mamba"]["batch_rows"] == 1


@pytest.mark.gpu
def test_real_cuda_graphs_batched_like_alone():
    """On a GPU: batched decoding from real CUDA graphs gives each prompt generate()'s tokens alone (greedy and
    seeded sampling)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=96, d_state=8)).cuda().eval()
    try:
        dec = BatchDecoder(lm, max_batch=8, cuda_graphs=True)
        ps = prompts(len(CONFIGS), seed=6)
        with dec.hold():
            jobs = [dec.submit(job(lm, p, c)) for p, c in zip(ps, CONFIGS)]
        for j, p, c in zip(jobs, ps, CONFIGS):
            got = j.wait(timeout=120)
            tokens, reason, final, _ = alone(lm, p, c)
            assert (got["tokens"], got["reason"], got["final"]) == (tokens, reason, final)
        dec.close()
    finally:
        cuda_graphs.release(lm)


def test_close_fails_the_running_and_the_queued_requests(lm):
    dec = BatchDecoder(lm, max_batch=1)
    long = GenerationConfig(max_new_tokens=100_000)
    running = dec.submit(job(lm, prompts(1)[0], long))
    deadline = time.perf_counter() + 30
    while dec.decode_steps < 2 and time.perf_counter() < deadline:
        time.sleep(0.001)
    queued = dec.submit(job(lm, prompts(1, seed=9)[0], long))  # no room: max_batch 1
    dec.close()
    for j in (running, queued):
        with pytest.raises(RuntimeError, match="the decoder was closed"):
            j.wait(timeout=10)


# ------------------------------------------------------------------------------------------ chunked prefill

def embeds_job(lm, ids, cfg):
    """A job whose prompt arrives as embeddings (as an image's visual tokens do)."""
    def start():
        return {"inputs_embeds": lm.embeddings(torch.tensor(ids)).detach(), "seen": ids}

    def finish(seq, state, stats):
        return {"tokens": list(seq.tokens), "reason": seq.reason, "final": seq.final, "state": state, **stats}

    return DecodeJob(cfg, start, finish)


def carried_job(lm, history, ids, cfg):
    """A job continuing the state a previous prefill of ``history`` left (a follow-up chat turn)."""
    def start():
        cache = lm.allocate_cache(1)
        lm(input_ids=torch.tensor(history)[None], cache=cache)
        return {"input_ids": ids, "cache": cache, "seen": history + ids}

    def finish(seq, state, stats):
        return {"tokens": list(seq.tokens), "reason": seq.reason, "final": seq.final, "state": state, **stats}

    return DecodeJob(cfg, start, finish)


def echo_job(lm, ids, cfg, top=3):
    def start():
        return {"input_ids": ids, "echo_logprobs": True, "logprobs": top}

    def finish(seq, state, stats):
        return {"tokens": list(seq.tokens), "prompt_logprobs": stats["prompt_logprobs"], **stats}

    return DecodeJob(cfg, start, finish)


def record_schedule(monkeypatch, dec):
    """The decoder's work in order: ('P', positions) per prefill chunk or padded prefill, 'D' per decode step."""
    from emma_mamba.inference import batching

    events = []
    real_chunk, real_prefill, real_step = dec._prefill_chunk, batching._prefill, batching.decode_step

    def chunk(p, n):
        events.append(("P", n))
        return real_chunk(p, n)

    def prefill(lm_, ps, cache, **kw):
        events.append(("P", sum((i if i is not None else e).shape[0] for i, e in ps)))
        return real_prefill(lm_, ps, cache, **kw)

    def step(*a, **k):
        events.append("D")
        return real_step(*a, **k)

    monkeypatch.setattr(dec, "_prefill_chunk", chunk)
    monkeypatch.setattr(batching, "_prefill", prefill)
    monkeypatch.setattr(batching, "decode_step", step)
    return events


def test_chunked_prefill_interleaves_with_decoding_and_changes_no_answer(lm, monkeypatch):
    """Prompts arriving while an answer streams are prefilled at most ``prefill_chunk`` positions between two
    decode steps (the running answer gets a token after every chunk), and every answer, final state and echoed
    log-probability equals generate()'s / a full forward's on that prompt alone: ids, embeddings, a carried
    state, an echo, one short enough to go whole, together with seeded sampling and a repetition penalty."""
    chunk = 5
    dec = BatchDecoder(lm, max_batch=8, prefill_chunk=chunk)
    events = record_schedule(monkeypatch, dec)
    g = torch.Generator().manual_seed(12)
    ids = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (4, 23, 17, 13, 9, 3, 19)]
    history = torch.randint(0, 96, (11,), generator=g).tolist()
    cfgs = [GenerationConfig(max_new_tokens=60), GenerationConfig(max_new_tokens=10), CONFIGS[1],
            GenerationConfig(max_new_tokens=8, repetition_penalty=1.3), CONFIGS[4], GenerationConfig(max_new_tokens=5),
            GenerationConfig(max_new_tokens=4)]
    gate = StepGate(monkeypatch, 2)
    running = dec.submit(job(lm, ids[0], cfgs[0]))
    gate.wait(2)  # the running answer mid-flight (57 steps to go): the six arrive together
    later = [dec.submit(job(lm, ids[1], cfgs[1])), dec.submit(embeds_job(lm, ids[2], cfgs[2])),
             dec.submit(carried_job(lm, history, ids[3], cfgs[3])), dec.submit(job(lm, ids[4], cfgs[4])),
             dec.submit(job(lm, ids[5], cfgs[5])), dec.submit(echo_job(lm, ids[6], cfgs[6]))]
    gate.release(2)
    results = [running.wait(timeout=60)] + [j.wait(timeout=60) for j in later]
    for k in (0, 1, 2, 4, 5):
        check(lm, results[k], ids[k], cfgs[k])
    check(lm, results[3], history + ids[3], cfgs[3])  # continuing a state = prefilling the whole history
    full = torch.log_softmax(lm(input_ids=torch.tensor(ids[6])[None]).logits[0, :, :96].float(), -1)
    want = full[:-1].gather(1, torch.tensor(ids[6][1:])[:, None])[:, 0]
    got = results[6]["prompt_logprobs"]
    assert len(got) == len(ids[6]) - 1
    torch.testing.assert_close(torch.tensor([lp for lp, _ in got]), want, rtol=1e-5, atol=1e-5)
    assert [t for t, _ in got[4][1]] == full[4].topk(3).indices.tolist()
    assert results[6]["tokens"] == alone(lm, ids[6], cfgs[6])[0]
    # the schedule: after the first prompt (prefilled whole: nothing was decoding), never more than `chunk`
    # positions between two decode steps while the running answer decodes
    first_d = events.index("D")
    between = 0
    for e in events[first_d:]:
        if e == "D":
            between = 0
        else:
            between += e[1]
            assert between <= chunk, events
    queued_positions = len(ids[1]) + len(ids[2]) + len(ids[3]) + len(ids[4]) + len(ids[5]) + len(ids[6])
    assert sum(e[1] for e in events[first_d:] if e != "D") == queued_positions
    assert results[0]["decode_steps"] == 60 - 1  # the running answer lost no step and got every token
    assert [r["prefill_chunks"] for r in results[1:4]] == [5, 4, 3]  # 23, 17, 13 positions by 5 (FIFO budget)
    assert results[0]["prefill_chunks"] == 1


def test_without_a_running_batch_prompts_are_prefilled_whole(lm, monkeypatch):
    dec = BatchDecoder(lm, max_batch=8, prefill_chunk=4)
    events = record_schedule(monkeypatch, dec)
    ps = [list(range(3, 30)), list(range(40, 52))]
    cfg = GenerationConfig(max_new_tokens=5)
    with dec.hold():
        jobs = [dec.submit(job(lm, p, cfg)) for p in ps]
    results = [j.wait(timeout=60) for j in jobs]
    for r, p in zip(results, ps):
        check(lm, r, p, cfg)
        assert r["prefill_chunks"] == 1
    assert events[0] == ("P", len(ps[0]) + len(ps[1]))  # one padded prefill: no one was waiting on it
    dec.close()


def test_no_chunk_limit_prefills_whole_prompts_between_steps(lm, monkeypatch):
    dec = BatchDecoder(lm, max_batch=8, prefill_chunk=0)
    assert dec.prefill_chunk is None
    events = record_schedule(monkeypatch, dec)
    gate = StepGate(monkeypatch, 2)
    short = prompts(1)[0]
    first = dec.submit(job(lm, short, GenerationConfig(max_new_tokens=30)))
    gate.wait(2)
    long = list(range(1, 41))
    pending = dec.submit(job(lm, long, GenerationConfig(max_new_tokens=3)))
    gate.release(2)
    r = pending.wait(timeout=60)
    check(lm, r, long, GenerationConfig(max_new_tokens=3))
    assert r["prefill_chunks"] == 1 and first.wait(timeout=60)["max_batch_rows"] == 2
    # the whole prompt between the running answer's second and third steps
    assert events[:5] == [("P", len(short)), "D", "D", ("P", 40), "D"], events[:5]
    dec.close()


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_bad_prefill_chunk(lm, bad):
    with pytest.raises(ValueError, match="prefill_chunk must be a non-negative integer"):
        BatchDecoder(lm, prefill_chunk=bad)


def test_close_fails_a_request_still_being_prefilled(lm, monkeypatch):
    dec = BatchDecoder(lm, max_batch=4, prefill_chunk=1)
    gate = StepGate(monkeypatch, 2, 4)
    running = dec.submit(job(lm, prompts(1)[0], GenerationConfig(max_new_tokens=100_000)))
    gate.wait(2)
    waiting = dec.submit(job(lm, list(range(90)), GenerationConfig(max_new_tokens=4)))
    gate.release(2)
    gate.wait(4)
    assert [p.job for p in dec.pending] == [waiting] and dec.pending[0].done == 2  # one position per step
    closer = threading.Thread(target=dec.close)  # close() joins the decoder: let it out of step 4 once closing
    closer.start()
    deadline = time.perf_counter() + 30
    while not dec._closing and time.perf_counter() < deadline:
        time.sleep(0.001)
    gate.release(4)
    closer.join(60)
    assert not closer.is_alive()
    for j in (running, waiting):
        with pytest.raises(RuntimeError, match="the decoder was closed"):
            j.wait(timeout=10)
    assert dec.pending == []



def test_forks_continue_one_prefill_and_wait_for_room(lm, monkeypatch):
    """A job with forks is prefilled once (counted) and each fork decodes from a copy of that state with its own
    settings: each equals generate() on the prompt alone with those settings. With max_batch 4 and a running row,
    a job with three forks (four rows) waits until it fits, then runs."""
    from emma_mamba.inference import batching

    calls = []
    real = batching._prefill
    monkeypatch.setattr(batching, "_prefill", lambda lm_, ps, cache, **kw: calls.append(len(ps)) or real(lm_, ps, cache, **kw))
    dec = BatchDecoder(lm, max_batch=4)
    ids = prompts(1, seed=8)[0]
    cfgs = [CONFIGS[1], dataclass_replace(CONFIGS[1], seed=4), CONFIGS[3], GenerationConfig(max_new_tokens=5)]
    gate = StepGate(monkeypatch, 2, 4)
    running = dec.submit(job(lm, prompts(1, seed=9)[0], GenerationConfig(max_new_tokens=40)))
    gate.wait(2)
    main = job(lm, ids, cfgs[0])
    main.forks = [job(lm, ids, c) for c in cfgs[1:]]
    dec.submit(main)
    gate.release(2)
    gate.wait(4)  # two admission rounds later
    assert dec._held is main and dec.active == 1  # taken from the queue, waiting for room for its four rows
    gate.release(4)
    results = [j.wait(timeout=60) for j in [main] + main.forks]
    first = running.wait(timeout=60)
    for r, c in zip(results, cfgs):
        check(lm, r, ids, c)
    assert calls == [1, 1]  # the running job's prefill, then the forked job's: one prefill for four rows
    assert all(r["max_batch_rows"] == 4 for r in results) and first["max_batch_rows"] == 1  # it waited for room
    dec.close()


def test_embed_requests_of_a_round_are_embedded_together_and_a_bad_one_fails_alone(lm):
    """start() may return an ``embed`` request: the decoder turns every such request of an admission round into
    inputs_embeds with one embed_batch call; when that call fails, each request is embedded alone, so only the
    one at fault fails (with its own error) and the others get their answers, those of their token ids."""
    calls = []

    def embed_batch(reqs):
        calls.append(len(reqs))
        if any(r == "bad" for r in reqs):
            raise ValueError("cannot embed 'bad'")
        return [lm.embeddings(torch.tensor(r)) for r in reqs]

    def embed_job(req, cfg):
        return DecodeJob(cfg, lambda: {"embed": req},
                         lambda seq, state, stats: {"tokens": list(seq.tokens), "reason": seq.reason})

    ps = prompts(3, seed=4)
    dec = BatchDecoder(lm, max_batch=8, embed_batch=embed_batch)
    with dec.hold():
        jobs = [dec.submit(embed_job(p, c)) for p, c in zip(ps, CONFIGS[:3])]
    got = [j.wait(timeout=60) for j in jobs]
    assert calls == [3] and dec.embed_batches == 1
    for g, p, c in zip(got, ps, CONFIGS[:3]):
        res = generate(lm, inputs_embeds=lm.embeddings(torch.tensor([p])), config=c)
        assert g["tokens"] == res.sequences[0]
    calls.clear()
    with dec.hold():
        jobs = [dec.submit(embed_job(r, CONFIGS[0])) for r in (ps[0], "bad", ps[1])]
    with pytest.raises(ValueError, match="cannot embed 'bad'"):
        jobs[1].wait(timeout=60)
    assert [j.wait(timeout=60)["tokens"] for j in (jobs[0], jobs[2])] == [got[0]["tokens"], generate(
        lm, inputs_embeds=lm.embeddings(torch.tensor([ps[1]])), config=CONFIGS[0]).sequences[0]]
    assert calls == [3, 1, 1, 1]  # the round, then each alone
    dec.close()


def test_prompts_of_both_kinds_admitted_together_are_prefilled_apart(lm, monkeypatch):
    """Token-id and embedding prompts admitted in one round (on a VLM server: a text completion's ids beside a
    chat request's embedded prompt) and starting from an empty state: one padded prefill per kind (each stacks its
    prompts into one tensor), every answer generate()'s alone. (One prefill over both failed every request.)"""
    from emma_mamba.inference import batching

    kinds = []
    real = batching._prefill
    monkeypatch.setattr(batching, "_prefill", lambda lm_, ps_, cache, **kw: kinds.append(
        [("ids" if i is not None else "embeds") for i, _ in ps_]) or real(lm_, ps_, cache, **kw))
    dec = BatchDecoder(lm, max_batch=8)
    g = torch.Generator().manual_seed(7)
    ps = [torch.randint(0, 96, (9,), generator=g).tolist() for _ in range(4)]  # one length: one padding group
    makers = [job, embeds_job, job, embeds_job]
    with dec.hold():
        jobs = [dec.submit(make(lm, p, c)) for make, p, c in zip(makers, ps, CONFIGS)]
    for j, p, c in zip(jobs, ps, CONFIGS):
        check(lm, j.wait(timeout=60), p, c)
    assert kinds == [["ids", "ids"], ["embeds", "embeds"]]
    dec.close()
