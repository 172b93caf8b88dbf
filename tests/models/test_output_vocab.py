"""What the samplers may pick: never an id the tokenizer has no token for (a checkpoint's vocabulary may be larger:
the public Mamba checkpoints have 50280 rows, GPT-NeoX 50277 tokens and the image placeholder), nor the VLM's image
placeholder (an answer holding it could not be sent back: the placeholder text is reserved in messages).

Found by driving `emma-mamba serve`: a sampled answer that picked id 50278 made `logprobs` a 500 (no bytes for
it), and the pick counted as an invisible completion token. The oracle: the LM's own logits, with those ids given
the highest logits by a forward hook, so an unmasked sampler would pick them at every step."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from emma_mamba.inference.generate import GenerationConfig, generate, output_vocab
from emma_mamba.inference.server import ChatService, make_server
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.models.tokenizer import load_tokenizer

from .test_server import post_to


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer()
    t.add_tokens(["<image>"], input_only=True)
    return t


@pytest.fixture(scope="module")
def lm_and_bad(tok):
    """A random LM of len(tok) + 2 rows (as mamba's 50280 to GPT-NeoX's 50278 with the placeholder) whose logits
    put the two rows past the tokenizer and the placeholder far above every token."""
    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=len(tok) + 2, d_state=4)).eval()
    bad = [len(tok), len(tok) + 1, tok.token_to_id("<image>")]

    def prefer_bad(module, args, out):
        out.logits[..., bad] += 50.0
        return out

    lm.register_forward_hook(prefer_bad)
    return lm, bad


def test_output_vocab_is_the_tokenizers_without_input_only_ids(tok, lm_and_bad):
    lm, bad = lm_and_bad
    assert output_vocab(lm, None) == (len(tok) + 2, [])
    assert output_vocab(lm, tok) == (len(tok), [bad[2]])

    class Forwarding:  # a tokenizer wrapper without __len__ (the benchmarks' end-of-sequence-less one): its size
        def __getattr__(self, name):  # is read from vocab_size instead (it failed every request of the server)
            return getattr(tok, name)

    assert output_vocab(lm, Forwarding()) == (len(tok), [bad[2]])


def test_generate_never_picks_untokenizable_or_input_only_ids(tok, lm_and_bad):
    lm, bad = lm_and_bad
    prompt = tok.encode("The cat sat on")
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=None)
    # without a tokenizer the sampler knows only the LM's rows: it picks the favoured ids (the hook works)
    assert set(generate(lm, input_ids=prompt, config=cfg).sequences[0]) <= set(bad)
    greedy = generate(lm, input_ids=prompt, config=cfg, tokenizer=tok)
    sampled = generate(lm, input_ids=prompt, config=GenerationConfig(max_new_tokens=6, eos_token_id=None,
                                                                     temperature=1.0, seed=0), tokenizer=tok)
    for seq in (greedy.sequences[0], sampled.sequences[0]):
        assert len(seq) == 6 and not set(seq) & set(bad)
    # greedy's first pick: the argmax of the LM's own logits over the allowed ids
    with torch.no_grad():
        logits = lm(torch.tensor([prompt])).logits[0, -1].float()
    logits[bad] = float("-inf")
    assert greedy.sequences[0][0] == int(logits[:len(tok)].argmax())
    assert tok.decode(greedy.sequences[0]) == greedy.texts[0]


def _post(url, path, body):
    status, text = post_to(url, path, body)
    return status, json.loads(text)


def test_the_server_never_picks_them_and_scores_the_rest(tok, lm_and_bad):
    """Sampled and greedy answers with logprobs (the picks and every listed alternative) and a completion's
    echoed prompt: 200, no favoured id anywhere, the picked logprobs a distribution over the allowed ids (the top
    alternative's probability as the LM's own softmax over them gives it); an id past the tokenizer in a prompt
    is a 400 naming it."""
    lm, bad = lm_and_bad
    svc = ChatService(lm, tokenizer=tok, defaults=GenerationConfig(max_new_tokens=5), state_cache=0)
    srv = make_server(svc, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    banned = {tok.decode([i], skip_special_tokens=False) for i in bad[2:]}
    try:
        for temperature in (0.0, 1.0):
            status, out = _post(url, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": temperature,
                "seed": 3, "logprobs": True, "top_logprobs": 3})
            assert status == 200, out
            entries = out["choices"][0]["logprobs"]["content"]
            assert len(entries) == 5 and out["usage"]["completion_tokens"] == 5
            for e in entries:
                assert e["token"] not in banned and not {a["token"] for a in e["top_logprobs"]} & banned
        status, out = _post(url, "/v1/completions", {"prompt": "The cat", "max_tokens": 3, "logprobs": 2,
                                                     "echo": True, "temperature": 0})
        assert status == 200, out
        ids = tok.encode("The cat")
        with torch.no_grad():
            first = lm(torch.tensor([ids])).logits[0, -1].float()
        first[bad] = float("-inf")
        p = torch.log_softmax(first[:len(tok)], -1)
        lp = out["choices"][0]["logprobs"]
        assert lp["token_logprobs"][len(ids)] == pytest.approx(float(p.max()), abs=1e-4)
        status, out = _post(url, "/v1/completions", {"prompt": [ids[0], len(tok) + 1], "max_tokens": 1})
        assert status == 400 and f"token id {len(tok) + 1} is outside the vocabulary [0, {len(tok)})" in \
            out["error"]["message"], out
    finally:
        srv.shutdown()
        srv.server_close()
        svc.close()


def test_the_vlm_marks_its_placeholder_input_only():
    from emma_mamba.config import get_preset
    from emma_mamba.models.vlm import EmmaMamba

    torch.manual_seed(0)
    model = EmmaMamba(get_preset("tiny"), for_training=False)
    assert model.tokenizer.input_only_ids == {model.image_token_id}
    n, suppressed = output_vocab(model.lm, model.tokenizer)
    assert n == min(model.lm.config.vocab_size, len(model.tokenizer)) and suppressed == [model.image_token_id]
