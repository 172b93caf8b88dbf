"""Multi-turn chat with the state carried between turns (ChatSession, `emma-mamba chat`).

Oracle: the same conversation re-prefilled from scratch. Turn k's answer of a session must equal what
``generate`` answers when given the whole token stream up to turn k's question in one prompt (parallel scan over
the history, empty initial state), and the carried state must equal that prefill's state.
"""

import os
import subprocess
import sys

import pytest
import skimage
import torch

from emma_mamba import cli
from emma_mamba.config import get_preset
from emma_mamba.inference.chat import ChatSession
from emma_mamba.inference.generate import GenerationConfig, generate
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.models.tokenizer import load_tokenizer
from emma_mamba.models.vlm import CHAT_TEMPLATE, TURN_END, TURN_SEP, EmmaMamba, build_chat_prompt

IMAGE = os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")
QUESTIONS = ["What is shown?", "What colour is the suit?", "Is it daytime?"]


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    return EmmaMamba(get_preset("tiny"), for_training=False).eval()


@pytest.fixture(scope="module")
def text_lm():
    torch.manual_seed(0)
    return MambaLM(MambaConfig.from_preset("tiny")).eval(), load_tokenizer()


def _oracle_answers(lm, tok, first_embeds, questions, cfg):
    """Answer every turn by re-prefilling the whole conversation from scratch.

    -> [(text, ids, final token, finish reason)] per turn, and the state of one prefill of everything the
    session must have consumed after the last turn (all but the last answer's final token)."""
    cfg = GenerationConfig(**{**cfg.__dict__, "eos_token_id": tok.eos_token_id})
    emb = lm.embeddings
    history = first_embeds  # (L, d)
    out = []
    for k, q in enumerate(questions):
        if k:  # the training token stream: answer, its end-of-turn token, separator, next user turn
            ids, final, reason = out[-1][1:]
            end = [final] if reason == "eos" else tok.encode(TURN_END)  # the EOS picked, or the one appended
            new = ids + end + tok.encode(TURN_SEP) + tok.encode(CHAT_TEMPLATE.format(prompt=q))
            history = torch.cat([history, emb(torch.tensor(new))])
        res = generate(lm, inputs_embeds=history, config=cfg, tokenizer=tok)
        out.append((res.texts[0], res.sequences[0], res.final_tokens[0], res.finish_reasons[0]))
    ids, final, reason = out[-1][1:]
    consumed = ids if reason == "eos" else ids[:-1]  # the final pick is never fed
    full = torch.cat([history, emb(torch.tensor(consumed))]) if consumed else history
    cache = lm.allocate_cache(1)
    with torch.no_grad():
        lm(inputs_embeds=full[None], cache=cache)
    return out, cache


def _assert_same_state(a, b):
    for x, y in zip(a.ssm_states + a.conv_states, b.ssm_states + b.conv_states):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert a.seqlen_offset == b.seqlen_offset


@torch.no_grad()
def test_vlm_chat_equals_reprefilling_the_conversation(vlm):
    cfg = GenerationConfig(max_new_tokens=5)
    session = ChatSession(vlm, IMAGE, config=cfg)
    got = [session.ask(q) for q in QUESTIONS]
    first = vlm.prompt_embeds(build_chat_prompt(QUESTIONS[0], 1, vlm.config.image_token), [IMAGE],
                              [QUESTIONS[0]] if vlm.instruction is not None else None)[0]
    want, state = _oracle_answers(vlm.lm, vlm.tokenizer, first, QUESTIONS, cfg)
    assert got == [w[0] for w in want]
    assert [t for t, _ in session.turns] == QUESTIONS
    _assert_same_state(session._cache, state)
    # later turns prefill only their own tokens; the state does not grow
    assert session.stats[0].prompt_tokens == first.shape[0]
    tok = vlm.tokenizer
    for k in (1, 2):
        n_new = len(tok.encode(TURN_SEP) + tok.encode(CHAT_TEMPLATE.format(prompt=QUESTIONS[k])))
        tail = 1 if session.stats[k - 1].finish_reason == "eos" else 1 + len(tok.encode(TURN_END))
        assert session.stats[k].prompt_tokens == n_new + tail
    assert session.context_tokens == state.seqlen_offset + 1 + (0 if session.stats[-1].finish_reason == "eos"
                                                                else len(tok.encode(TURN_END)))


@torch.no_grad()
def test_text_chat_with_an_answer_ending_on_eos(text_lm, monkeypatch):
    lm, tok = text_lm
    cfg = GenerationConfig(max_new_tokens=6)
    probe = ChatSession(lm, tokenizer=tok, config=cfg)
    probe.ask(QUESTIONS[0])
    first_ids = tok.encode(CHAT_TEMPLATE.format(prompt=QUESTIONS[0]))
    picked = generate(lm, input_ids=first_ids, config=GenerationConfig(max_new_tokens=6, eos_token_id=None)).sequences[0]
    # make a greedy token of turn 1 the tokenizer's EOS (the first that did not appear before it, else the first
    # one): the answer then ends on "eos" after k tokens
    k = next((i for i in range(1, len(picked)) if picked[i] not in picked[:i]), 0)
    monkeypatch.setattr(tok, "eos_token_id", picked[k])
    session = ChatSession(lm, tokenizer=tok, config=cfg)
    got = [session.ask(q) for q in QUESTIONS[:2]]
    assert session.stats[0].finish_reason == "eos" and session.stats[0].new_tokens == k
    want, state = _oracle_answers(lm, tok, lm.embeddings(torch.tensor(first_ids)), QUESTIONS[:2], cfg)
    assert got == [w[0] for w in want]
    _assert_same_state(session._cache, state)


@torch.no_grad()
def test_state_size_is_constant_and_reset_forgets(text_lm):
    lm, tok = text_lm
    session = ChatSession(lm, tokenizer=tok, config=GenerationConfig(max_new_tokens=3))
    assert session.state_bytes == 0 and session.context_tokens == 0
    a1 = session.ask(QUESTIONS[0])
    size = session.state_bytes
    cfg = lm.config
    d_inner = cfg.expand * cfg.d_model
    assert size == cfg.n_layer * d_inner * (cfg.d_state * 4 + cfg.d_conv * 4)  # fp32 ssm + conv states
    for q in QUESTIONS[1:]:
        session.ask(q)
        assert session.state_bytes == size
    # every position is consumed once: prefilled, or fed back during decoding (all picks but a turn's final one,
    # which the next turn prefills), plus what the last turn left pending (its final pick and end-of-turn token)
    fed = sum(s.prompt_tokens + (s.new_tokens if s.finish_reason == "eos" else s.new_tokens - 1)
              for s in session.stats)
    pending = 1 if session.stats[-1].finish_reason == "eos" else 1 + len(tok.encode(TURN_END))
    assert session.context_tokens == fed + pending
    session.reset()
    assert session.turns == [] and session.context_tokens == 0
    assert session.ask(QUESTIONS[0]) == a1


@torch.no_grad()
def test_an_interrupted_turn_leaves_the_conversation_as_it_was(text_lm):
    lm, tok = text_lm
    cfg = GenerationConfig(max_new_tokens=4)
    clean = ChatSession(lm, tokenizer=tok, config=cfg)
    want = [clean.ask(q) for q in QUESTIONS[:2]]

    session = ChatSession(lm, tokenizer=tok, config=cfg)
    session.ask(QUESTIONS[0])
    before = session.context_tokens

    def boom(text):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        session.ask("something else entirely", streamer=boom)
    assert session.context_tokens == before and len(session.turns) == 1
    assert session.ask(QUESTIONS[1]) == want[1]


def test_bad_inputs_are_named(vlm, text_lm):
    lm, tok = text_lm
    session = ChatSession(vlm, IMAGE, config=GenerationConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="non-empty"):
        session.ask("   ")
    with pytest.raises(ValueError, match="enters with the first turn"):
        session.ask(f"{vlm.config.image_token}\nWhat is this?")
    with pytest.raises(ValueError, match="cannot see an image"):
        ChatSession(lm, IMAGE, tokenizer=tok)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        ChatSession(lm)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ChatSession(lm, tokenizer=tok, config=GenerationConfig(max_new_tokens=0))
    with pytest.raises(TypeError, match="EmmaMamba or a MambaLM"):
        ChatSession("model.pt")
    bad = ChatSession(vlm, "/no/such/image.png", config=GenerationConfig(max_new_tokens=2))
    with pytest.raises((FileNotFoundError, ValueError), match="image.png"):
        bad.ask("What is this?")
    assert bad.context_tokens == 0  # nothing consumed


def test_cli_chat_answers_each_line_like_the_session(vlm, tmp_path):
    ckpt = tmp_path / "ckpt"
    vlm.save(ckpt)
    lines = [QUESTIONS[0], QUESTIONS[1], "/reset", QUESTIONS[0], "/bogus"]
    proc = subprocess.run([sys.executable, "-m", "emma_mamba.cli", "chat", "--checkpoint", str(ckpt), "--image",
                           IMAGE, "--max-new-tokens", "4"], input="\n".join(lines) + "\n", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from emma_mamba.models.vlm import load
    session = ChatSession(load(ckpt), IMAGE, config=GenerationConfig(max_new_tokens=4))
    a1, a2 = session.ask(QUESTIONS[0]), session.ask(QUESTIONS[1])
    assert proc.stdout == f"{a1}\n{a2}\n{a1}\n"
    assert "[new conversation]" in proc.stderr and "unknown command '/bogus'" in proc.stderr
    assert "turn 2:" in proc.stderr


def test_a_session_speaks_the_models_chat_format(vlm):
    """A model trained in another chat format (config.chat) is asked in it: a later turn prefills the pending
    tokens, the format's turn_end (the answer was cut) and turn_sep, then its template (it used the default
    format's); the session stops at the turn_end; an answer that stopped there has it in the state already."""
    from emma_mamba.config import ChatConfig
    from emma_mamba.inference.chat import pending_tokens

    chat = ChatConfig("### Human: {prompt}\n### Assistant:", "\n###", "\n\n")
    old, vlm.config.chat = vlm.config.chat, chat
    try:
        tok = vlm.tokenizer
        session = ChatSession(vlm, IMAGE, config=GenerationConfig(max_new_tokens=3))
        assert list(session.config.stop_strings) == ["\n###"]
        session.ask(QUESTIONS[0])
        session.ask(QUESTIONS[1])
        first, second = session.stats
        cut = first.finish_reason != "stop"
        want = (1 + (len(tok.encode(chat.turn_end)) if cut else 0) + len(tok.encode(chat.turn_sep))
                + len(tok.encode(chat.prompt_template.format(prompt=QUESTIONS[1]))))
        assert second.prompt_tokens == want
    finally:
        vlm.config.chat = old
    assert pending_tokens(7, "stop", tok, "\n###", ended=True) == [7]
    assert pending_tokens(7, "length", tok, "\n###") == [7] + tok.encode("\n###")


def test_a_users_stop_string_met_before_the_turn_end_still_gets_it(vlm):
    """A custom turn_end (a stop string) beside a stop string of the user's: the session appended no turn_end
    whenever the user had stop strings of their own, or (had it assumed the turn_end) skipped it after the user's
    string cut the answer. Which string was met (GenerationResult.stop_strings_met) decides: the user's cuts the
    answer (turn_end appended to the state), the turn_end ends it (nothing appended)."""
    from emma_mamba.config import ChatConfig

    tok, n = vlm.tokenizer, 12
    sampled = dict(max_new_tokens=n, temperature=1.0, seed=0)  # seeded: the same answer each time, and varied
    free = ChatSession(vlm, IMAGE, config=GenerationConfig(**sampled))
    text = free.ask(QUESTIONS[0])
    # two pieces of the greedy answer that first occur where they are taken: an earlier and a later one
    pieces = [(text.find(text[i:i + 2]), text[i:i + 2]) for i in range(len(text) - 1)]
    pieces = sorted({p for p in pieces if p[1].strip() and text.find(p[1]) == p[0]})
    if len(pieces) < 2:
        pytest.skip(f"the random model's answer {text!r} has too few distinct pieces")
    (_, early), (_, late) = pieces[0], pieces[-1]
    old = vlm.config.chat
    try:
        for turn_end, user, want_ended in [(late, early, False), (early, late, True)]:
            vlm.config.chat = ChatConfig(old.prompt_template, turn_end, old.turn_sep)
            session = ChatSession(vlm, IMAGE, config=GenerationConfig(**sampled, stop_strings=[user]))
            res_text = session.ask(QUESTIONS[0])
            assert session.stats[0].finish_reason == "stop" and res_text == text[:text.find(early)]
            pending = session._pending
            want = [pending[0]] + ([] if want_ended else tok.encode(turn_end))
            assert pending == want, (turn_end, user)
    finally:
        vlm.config.chat = old


def test_generate_reports_which_stop_string_was_met(text_lm):
    lm, tok = text_lm
    free = generate(lm, input_ids=[[5, 6, 7], [8, 9]], config=GenerationConfig(max_new_tokens=10), tokenizer=tok)
    stops = [t[2:4] for t in free.texts]
    res = generate(lm, input_ids=[[5, 6, 7], [8, 9]], tokenizer=tok,
                   config=GenerationConfig(max_new_tokens=10, stop_strings=stops))
    for i, t in enumerate(free.texts):
        first = min((t.find(s), -len(s), s) for s in stops if s in t)
        assert res.finish_reasons[i] == "stop" and res.stop_strings_met[i] == first[2], (t, stops)
    assert free.stop_strings_met == [None, None]


def test_load_takes_a_dtype_by_name(vlm, tmp_path):
    """emma_mamba.load(dtype='bf16'), as the CLI's --dtype spells it: a string reached the vision tower's
    .to() and failed as "Invalid device string: 'bf16'"."""
    from emma_mamba.models.vlm import load
    vlm.save(tmp_path / "ckpt")
    got, ref = load(tmp_path / "ckpt", dtype="bf16"), load(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert got.lm.dtype == torch.bfloat16 and next(got.vision.parameters()).dtype == torch.bfloat16
    for (k, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"emma_mamba\.load: dtype must be float32, bfloat16 or float16.*got 'b16'"):
        load(tmp_path / "ckpt", dtype="b16")


def test_cli_chat_skips_a_line_that_is_not_utf8(vlm, tmp_path):
    """A byte that is not UTF-8 (a Latin-1 'é') reached the tokenizer as a lone surrogate: a TypeError traceback
    ended the chat, the conversation lost. The line is named and skipped; the next question is answered as the
    conversation's first."""
    ckpt = tmp_path / "ckpt"
    vlm.save(ckpt)
    proc = subprocess.run([sys.executable, "-m", "emma_mamba.cli", "chat", "--checkpoint", str(ckpt), "--image",
                           IMAGE, "--max-new-tokens", "4"], input=b"caf\xe9 ?\n" + QUESTIONS[0].encode() + b"\n",
                          capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert "line 1 is not UTF-8 text (byte b'\\xe9' at character 3); it was skipped" in err
    from emma_mamba.models.vlm import load
    a1 = ChatSession(load(ckpt), IMAGE, config=GenerationConfig(max_new_tokens=4)).ask(QUESTIONS[0])
    assert proc.stdout.decode() == f"{a1}\n" and "turn 1:" in err and "turn 2:" not in err


@pytest.mark.parametrize("argv,needle", [
    (["--image", "/no/such.png"], "--image /no/such.png: no such file"),
    (["--image", __file__], "cannot read image file"),
])
def test_cli_chat_reports_a_bad_image_before_the_first_question(vlm, tmp_path, capsys, monkeypatch, argv, needle):
    ckpt = tmp_path / "ckpt"
    vlm.save(ckpt)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert cli.main(["chat", "--checkpoint", str(ckpt)] + argv) == 2
    assert needle in capsys.readouterr().err


def test_generate_continuation_argument_errors(text_lm):
    lm, tok = text_lm
    with pytest.raises(TypeError, match="cache must be a MambaCache"):
        generate(lm, input_ids=[1, 2], cache="state")
    with pytest.raises(ValueError, match="one prompt, one continuation and a one-row cache, got 2 prompts"):
        generate(lm, input_ids=[[1, 2], [3, 4]], cache=lm.allocate_cache(1))
    with pytest.raises(ValueError, match="got 1 prompts x 1 and 2 cache rows"):
        generate(lm, input_ids=[1, 2], cache=lm.allocate_cache(2))


@torch.no_grad()
def test_vlm_chat_without_an_image_is_text_only(vlm):
    cfg = GenerationConfig(max_new_tokens=4)
    session = ChatSession(vlm, None, config=cfg)
    got = session.ask(QUESTIONS[0])
    want = vlm.generate(build_chat_prompt(QUESTIONS[0], 0, vlm.config.image_token),
                        config=GenerationConfig(max_new_tokens=4, eos_token_id=vlm.tokenizer.eos_token_id))
    assert got == want.texts[0]
    assert session.stats[0].prompt_tokens == len(vlm.tokenizer.encode(CHAT_TEMPLATE.format(prompt=QUESTIONS[0])))


def test_a_saved_conversation_continues_like_the_uninterrupted_one(vlm, text_lm, tmp_path):
    # the whole conversation is the recurrent state: saved after turn 1 (a few KB here, a few MB at 2.8B) and
    # continued by a new session (no image needed), turns 2-3 give the same answers and the same final state
    cfg = GenerationConfig(max_new_tokens=6)
    ref = ChatSession(vlm, IMAGE, config=cfg)
    answers = [ref.ask(q) for q in QUESTIONS]
    first = ChatSession(vlm, IMAGE, config=cfg)
    first.ask(QUESTIONS[0])
    first.save(tmp_path / "chat.safetensors")
    assert (tmp_path / "chat.safetensors").stat().st_size < 2 * first.state_bytes + 4096
    resumed = ChatSession.load(tmp_path / "chat.safetensors", vlm, config=cfg)
    assert resumed.turns == [(QUESTIONS[0], answers[0])] and resumed.context_tokens == first.context_tokens
    assert [resumed.ask(q) for q in QUESTIONS[1:]] == answers[1:]
    got, want = resumed._cache, ref._cache
    for a, b in zip(got.conv_states + got.ssm_states, want.conv_states + want.ssm_states):
        assert torch.equal(a, b)
    # another model (same architecture, other weights) is refused; so is a file that is not a chat state
    torch.manual_seed(1)
    other = EmmaMamba(get_preset("tiny"), for_training=False).eval()
    with pytest.raises(ValueError, match="saved with another model"):
        ChatSession.load(tmp_path / "chat.safetensors", other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read a chat state"):
        ChatSession.load(tmp_path / "junk.safetensors", vlm)
    # a file with the right format tag and model but a missing field (hand-made, damaged): named, not a KeyError
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "chat.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "partial.safetensors"), metadata={k: v for k, v in meta.items() if k != "turns"})
    with pytest.raises(ValueError, match=r"partial\.safetensors: not a complete chat state \(no 'turns' entry\)"):
        ChatSession.load(tmp_path / "partial.safetensors", vlm)
    with pytest.raises(ValueError, match="nothing to save before the first turn"):
        ChatSession(vlm, IMAGE).save(tmp_path / "empty.safetensors")
    lm, tok = text_lm  # a text-only conversation the same way
    s1 = ChatSession(lm, tokenizer=tok, config=cfg)
    s1.ask("Hello there")
    s1.save(tmp_path / "t.safetensors")
    s2 = ChatSession.load(tmp_path / "t.safetensors", lm, tokenizer=tok, config=cfg)
    assert s2.ask("And then?") == s1.ask("And then?")


def test_cli_chat_save_and_load(vlm, tmp_path):
    ckpt, state = tmp_path / "ckpt", tmp_path / "conv.safetensors"
    vlm.save(ckpt)
    cmd = [sys.executable, "-m", "emma_mamba.cli", "chat", "--checkpoint", str(ckpt), "--max-new-tokens", "4"]
    one = subprocess.run(cmd + ["--image", IMAGE], input=f"{QUESTIONS[0]}\n/save {state}\n", capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0 and "conversation saved" in one.stderr, one.stderr
    two = subprocess.run(cmd, input=f"/load {state}\n{QUESTIONS[1]}\n/load {tmp_path / 'nope'}\n",
                         capture_output=True, text=True, timeout=300)  # no --image: the state holds it
    assert two.returncode == 0 and "conversation loaded" in two.stderr, two.stderr
    from emma_mamba.models.vlm import load
    session = ChatSession(load(ckpt), IMAGE, config=GenerationConfig(max_new_tokens=4))
    a1, a2 = session.ask(QUESTIONS[0]), session.ask(QUESTIONS[1])
    assert one.stdout == f"{a1}\n" and two.stdout == f"{a2}\n"
    assert "cannot read a chat state" in two.stderr


def test_save_writes_whole_files_and_names_bad_paths(text_lm, tmp_path, monkeypatch):
    """ChatSession.save writes to a temporary file and renames it: a failed or interrupted write leaves the earlier
    file as it was and no partial or temporary file; a path that cannot be written is an OSError naming it."""
    lm, tok = text_lm
    cfg = GenerationConfig(max_new_tokens=2)
    session = ChatSession(lm, tokenizer=tok, config=cfg)
    session.ask("Hello there")
    missing = tmp_path / "no" / "such" / "chat.safetensors"
    with pytest.raises(FileNotFoundError, match=f"no such directory {tmp_path / 'no' / 'such'}"):
        session.save(missing)
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a directory"):
        session.save(tmp_path)
    path = tmp_path / "chat.safetensors"
    session.save(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="the file exists"):
        session.save(path, overwrite=False)
    session.ask("And then?")  # two turns now: a successful overwrite would change the file

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    def interrupted(fd):
        raise KeyboardInterrupt

    for fail, err in ((disk_full, OSError), (interrupted, KeyboardInterrupt)):
        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(err) as e:
            session.save(path)
        if err is OSError:
            assert str(path) in str(e.value) and "No space left on device" in str(e.value)
        assert path.read_bytes() == before  # the earlier conversation, whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.safetensors"]  # no temporary file left
    monkeypatch.undo()
    assert len(ChatSession.load(path, lm, tokenizer=tok, config=cfg).turns) == 1
    session.save(path)
    assert len(ChatSession.load(path, lm, tokenizer=tok, config=cfg).turns) == 2


def test_cli_chat_survives_every_bad_command(vlm, tmp_path):
    """Each mistake prints an error naming what was wrong and the conversation goes on: the answers after them
    are the uninterrupted session's. An existing file is replaced by /save! only."""
    from PIL import Image

    ckpt = tmp_path / "ckpt"
    vlm.save(ckpt)
    bomb, corrupt, existing = tmp_path / "bomb.png", tmp_path / "corrupt.png", tmp_path / "kept.safetensors"
    Image.new("1", (20000, 10000)).save(bomb)  # ~24 KB, beyond PIL's decompression-bomb limit
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    existing.write_bytes(b"keep me")
    nodir = tmp_path / "nodir" / "c.safetensors"
    lines = [QUESTIONS[0], f"/image {bomb}", f"/image {tmp_path / 'missing.png'}", f"/image {corrupt}",
             f"/image {tmp_path}", "/image", f"{vlm.config.image_token} What is it?", f"/save {nodir}",
             f"/save {tmp_path}", f"/save {existing}", f"/load {tmp_path / 'nope'}", f"/load {tmp_path}", QUESTIONS[1],
             f"/save! {existing}"]
    # sampled: a random tiny model's greedy answers are the same few tokens whatever the context
    sampling = ["--max-new-tokens", "4", "--temperature", "1.0", "--seed", "0"]
    proc = subprocess.run([sys.executable, "-m", "emma_mamba.cli", "chat", "--checkpoint", str(ckpt), "--image",
                           IMAGE] + sampling, input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr
    assert proc.returncode == 0 and "Traceback" not in err, err
    from emma_mamba.models.vlm import load
    cfg = GenerationConfig(max_new_tokens=4, temperature=1.0, seed=0)
    ref = ChatSession(load(ckpt), IMAGE, config=cfg)
    a1, a2 = ref.ask(QUESTIONS[0]), ref.ask(QUESTIONS[1])
    assert a1.strip() and a2.strip()
    assert proc.stdout == f"{a1}\n{a2}\n"  # the second answer continues the first: nothing was lost
    for needle in (f"{bomb}: the image has 200,000,000 pixels, more than PIL's decompression-bomb limit",
                   f"image {tmp_path / 'missing.png'}: no such file", f"cannot read image file {corrupt}",
                   f"image {tmp_path}: is a directory", "/image needs a FILE", "holds '<image>'",
                   f"no such directory {nodir.parent}", f"{tmp_path} is a directory",
                   f"/save {existing}: the file exists; '/save! {existing}' replaces it",
                   f"{tmp_path / 'nope'}: cannot read a chat state", f"{tmp_path}: cannot read a chat state: it is a "
                   f"directory", f"conversation saved to {existing}: 2 turns"):
        assert needle in err, (needle, err)
    assert err.count("emma-mamba chat: error:") == 11
    assert not nodir.parent.exists()
    resumed = ChatSession.load(existing, load(ckpt), config=cfg)
    assert resumed.turns == ref.turns


def test_a_conversation_saved_in_fp32_loads_into_the_bf16_model(text_lm, tmp_path):
    # the same checkpoint loaded with --dtype bf16 (the GPU default) or fp32 (the CPU's): one model, its chat states
    # load either way (the state converted to the model's dtype); earlier versions' fingerprints are still accepted
    import copy

    from safetensors import safe_open
    from safetensors.torch import save_file

    from emma_mamba.inference.chat import model_fingerprint

    lm, tok = text_lm
    s1 = ChatSession(lm, tokenizer=tok, config=GenerationConfig(max_new_tokens=4))
    s1.ask("Hello there")
    s1.save(tmp_path / "t.safetensors")
    half = copy.deepcopy(lm).to(torch.bfloat16)
    assert model_fingerprint(half) == model_fingerprint(lm) != model_fingerprint(lm, rounded=False)
    s2 = ChatSession.load(tmp_path / "t.safetensors", half, tokenizer=tok)
    assert s2.turns == s1.turns and s2._cache.ssm_states[0].dtype == half.allocate_cache(1).ssm_states[0].dtype
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:  # a file written before the rounding
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**meta, "model": model_fingerprint(lm, False)})
    assert ChatSession.load(tmp_path / "old.safetensors", lm, tokenizer=tok).turns == s1.turns
    # a file of the versions that took the config's vocab_size (before the embedding's rows)
    save_file(tensors, str(tmp_path / "v2.safetensors"),
              metadata={**meta, "model": model_fingerprint(lm, config_vocab=True)})
    assert ChatSession.load(tmp_path / "v2.safetensors", lm, tokenizer=tok).turns == s1.turns


def test_one_network_has_one_fingerprint_in_either_vocab_layout():
    """Mamba-2's 50280 tokens padded to 16: our layout says vocab_size 50280 and pad_vocab_size_multiple 16,
    transformers' (an `export --lm-only` read back) 50288 and 1; the same weights had two fingerprints, so a
    conversation saved with the checkpoint was refused by the exported LM ("saved with another model")."""
    from emma_mamba.inference.chat import model_fingerprint
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    torch.manual_seed(0)
    ours = MambaLM(MambaConfig.from_preset("mamba2-tiny", vocab_size=50280, pad_vocab_size_multiple=16))
    theirs = MambaLM(MambaConfig.from_preset("mamba2-tiny", vocab_size=50288, pad_vocab_size_multiple=1))
    theirs.load_state_dict(ours.state_dict())
    assert ours.embeddings.weight.shape == theirs.embeddings.weight.shape == (50288, 64)
    assert model_fingerprint(ours) == model_fingerprint(theirs)
    other = MambaLM(MambaConfig.from_preset("mamba2-tiny", vocab_size=50280, pad_vocab_size_multiple=16))
    assert model_fingerprint(other) != model_fingerprint(ours)  # other weights: another fingerprint


def test_cli_chat_ctrl_c_during_a_command_keeps_the_conversation(vlm, tmp_path, monkeypatch, capsys):
    """Ctrl-C while /load reads a file (or /save writes one) ends that command, not the chat: the next question
    continues the conversation (answers as the uninterrupted session's)."""
    import io

    ckpt = tmp_path / "ckpt"
    vlm.save(ckpt)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ChatSession, "load", classmethod(lambda cls, *a, **k: interrupted()))
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{QUESTIONS[0]}\n/load {tmp_path / 'chat.safetensors'}\n"
                                                  f"{QUESTIONS[1]}\n"))
    assert cli.main(["chat", "--checkpoint", str(ckpt), "--image", IMAGE, "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "[/load interrupted; the conversation is as it was]" in err and "Traceback" not in err, err
    from emma_mamba.models.vlm import load
    ref = ChatSession(load(ckpt), IMAGE, config=GenerationConfig(max_new_tokens=4))
    assert out == f"{ref.ask(QUESTIONS[0])}\n{ref.ask(QUESTIONS[1])}\n"


def test_a_state_saved_under_lora_adapters_belongs_to_those_adapters(text_lm, tmp_path):
    """Defect: the fingerprint read only the base weights, so a chat state saved under one set of LoRA adapters
    loaded into the model with another (another network). Fresh adapters (B = 0: the same network) keep the base
    model's fingerprint."""
    import copy

    from emma_mamba.inference.chat import model_fingerprint
    from emma_mamba.models.lora import apply_lora

    lm, tok = text_lm
    base = model_fingerprint(lm)
    a = copy.deepcopy(lm)
    apply_lora(a, r=2, alpha=4)
    assert model_fingerprint(a) == base
    b = copy.deepcopy(a)
    with torch.no_grad():
        for n, p in a.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
        for n, p in b.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    cfg = GenerationConfig(max_new_tokens=3)
    s = ChatSession(a, tokenizer=tok, config=cfg)
    s.ask("Hello there")
    s.save(tmp_path / "chat.safetensors")
    assert len(ChatSession.load(tmp_path / "chat.safetensors", a, tokenizer=tok, config=cfg).turns) == 1
    for other in (b, lm):
        with pytest.raises(ValueError, match="saved with another model"):
            ChatSession.load(tmp_path / "chat.safetensors", other, tokenizer=tok, config=cfg)


def test_a_loaded_conversation_about_an_image_in_memory_needs_it_again_to_reset(vlm, tmp_path):
    """Defect: a conversation about a PIL image, saved and loaded, forgot the image (a state cannot hold it) and
    reset() started a text-only conversation without a word. Now reset() asks for it, and load(image=) takes it;
    oracle: a fresh session about the same image."""
    from PIL import Image

    cfg = GenerationConfig(max_new_tokens=4)
    pil = Image.open(IMAGE)
    s = ChatSession(vlm, pil, config=cfg)
    s.ask(QUESTIONS[0])
    s.save(tmp_path / "chat.safetensors")
    loaded = ChatSession.load(tmp_path / "chat.safetensors", vlm, config=cfg)
    with pytest.raises(ValueError, match=r"an image held in memory .* reset\(image=\.\.\.\)"):
        loaded.reset()
    again = ChatSession.load(tmp_path / "chat.safetensors", vlm, config=cfg, image=pil)
    again.reset()
    assert again.ask(QUESTIONS[1]) == ChatSession(vlm, pil, config=cfg).ask(QUESTIONS[1])
    loaded.reset(image=pil)  # or given to reset
    assert loaded.ask(QUESTIONS[1]) == again.turns[0][1]


def test_a_conversation_about_a_relative_image_path_resets_from_another_directory(vlm, tmp_path, monkeypatch):
    """The image path is saved absolute: a conversation started on "cat.png" in one folder and loaded from
    another reset() to a FileNotFoundError for "cat.png". Oracle: a fresh session about the same image."""
    import shutil

    cfg = GenerationConfig(max_new_tokens=4)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(IMAGE, tmp_path / "a" / "cat.png")
    monkeypatch.chdir(tmp_path / "a")
    s = ChatSession(vlm, "cat.png", config=cfg)
    s.ask(QUESTIONS[0])
    s.save(tmp_path / "chat.safetensors")
    monkeypatch.chdir(tmp_path / "b")
    loaded = ChatSession.load(tmp_path / "chat.safetensors", vlm, config=cfg)
    loaded.reset()
    assert loaded.ask(QUESTIONS[1]) == ChatSession(vlm, str(tmp_path / "a" / "cat.png"), config=cfg).ask(QUESTIONS[1])
