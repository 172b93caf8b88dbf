"""torch.compile over the ops and the Mamba LM: the kernels as custom ops (emma_mamba/ops/_library.py).

Oracles: PyTorch's own ``torch.library.opcheck`` (the registered schema, the fake implementation's shapes,
dtypes and strides against the real kernel's, the autograd registration, and AOTAutograd with dynamic shapes
against eager), eager execution of the same kernels (a compiled graph calling them must give the same outputs
and gradients), and the traced graphs themselves (the kernels appear as single nodes; the torch backend
traces as plain torch ops).

Targets: the C++ CPU kernels, the CUDA kernels under the CPU emulator and the Triton kernels under the
interpreter (CPU tensors), and on a GPU the cuda and triton backends (``gpu``).
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from emma_mamba import ops
from emma_mamba.models.mamba import MambaConfig, MambaLM

from .test_cpu_backend import _conv_inputs, make_scan_inputs

lib = torch.ops.emma_mamba


class Target(NamedTuple):
    backend: str
    device: str


TARGETS = [
    pytest.param(Target("cpu", "cpu"), id="cpu"),
    pytest.param(Target("cuda-emu", "cpu"), id="cuda-emu"),
    pytest.param(Target("triton", "cpu"), id="triton-interp"),
    pytest.param(Target("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(Target("triton", "cuda"), id="triton-gpu", marks=pytest.mark.gpu),
]


# the model-level tests leave out the Triton interpreter: one eager forward+backward of the 2-layer test LM
# takes ~50 s there (the ops' tests below cover its kernels as custom ops)
MODEL_TARGETS = [p for p in TARGETS if p.id != "triton-interp"]


def _prepare(t: Target) -> Target:
    if t.device == "cpu" and t.backend == "triton" and ops._runs_on("triton", "cpu") is False:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET unset)")
    status = ops.available_backends().get(t.backend)
    if t.backend == "cuda-emu":
        with ops.use_backend("cuda-emu"):  # builds the emulator once; a build error fails here
            pass
    elif status != "available":
        pytest.skip(f"backend {t.backend} unavailable: {status}")
    torch._dynamo.reset()
    return t


@pytest.fixture(params=TARGETS)
def tgt(request):
    return _prepare(request.param)


@pytest.fixture(params=MODEL_TARGETS)
def model_tgt(request):
    return _prepare(request.param)


def _on(inp: dict, device: str) -> dict:
    return {k: (v.detach().to(device).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
            for k, v in inp.items()}


class GraphRecorder:
    """An AOTAutograd backend that runs the traced graphs as they are (aot_eager) and records their ops, the
    forward and backward graphs apart. A custom op that mutates an input appears functionalised, wrapped in
    ``auto_functionalized``; it is recorded under its own name."""

    def __init__(self):
        self.graphs = {"fw": [], "bw": []}
        self.input_numels = {"fw": [], "bw": []}  # per graph; the backward's inputs: saved tensors + tangents

    def _recorder(self, kind):
        def compiler(gm, example_inputs):
            ops_ = []
            for n in gm.graph.nodes:
                if n.op == "call_function":
                    ops_.append(str(n.args[0] if "auto_functionalized" in str(n.target) else n.target))
            self.graphs[kind].append(ops_)
            self.input_numels[kind].append([t.numel() for t in example_inputs if isinstance(t, torch.Tensor)])
            return torch._functorch.aot_autograd.make_boxed_func(gm.forward)
        return compiler

    @property
    def backend(self):
        return aot_autograd(fw_compiler=self._recorder("fw"), bw_compiler=self._recorder("bw"))

    def count(self, name: str, kind: str = "fw") -> int:
        return sum(t.startswith(f"emma_mamba.{name}.") for g in self.graphs[kind] for t in g)

    def all_ops(self) -> list[str]:
        return [t for g in self.graphs["fw"] + self.graphs["bw"] for t in g]


# ---------------------------------------------------------------------------------------------------------
# each custom op against PyTorch's opcheck

# l=300: two saved states (one chunk of 256 and a partial one), so a fake forward that sized `saved` for one
# chunk fails the fake-tensor check
SCAN_CASES = [
    dict(l=37, bc="var"),
    dict(l=300, bc="group", z=False, D=False, init=True),
    dict(l=40, bc="const", seq=True, delta_bias=False, softplus=False),
    dict(l=21, bc="var", bc_fp32=True, dtype=torch.bfloat16, seq=True, init=True),
]


def _scan_args(backend, inp, deterministic=False):
    return (backend, inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"],
            inp["delta_softplus"], inp["initial_state"], inp["seq_idx"], deterministic)


# Under the interpreter (slow) the triton backend runs the cases that differ in what reaches its kernels (the other
# cases' B/C layouts and optional inputs are covered by the ones kept); the ops' schemas, fake (meta) functions and
# autograd registrations are shared by every backend and checked on all cases by cpu and cuda-emu.
def _interpreted(tgt) -> bool:
    return tgt.backend == "triton" and tgt.device == "cpu"


@pytest.mark.parametrize("case", SCAN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_opcheck_selective_scan(tgt, case):
    if _interpreted(tgt) and (case["l"] > 64 or case == SCAN_CASES[0]):
        pytest.skip("the interpreter is slow: the short cases with constant or fp32 B/C only")
    case = dict(case)
    inp = _on(make_scan_inputs(b=2, d=8, n=4, **case), tgt.device)
    torch.library.opcheck(lib.selective_scan_fwd.default, _scan_args(tgt.backend, inp))


@pytest.mark.parametrize("bias,init,seq", [(True, False, False), (False, True, True)])
def test_opcheck_causal_conv1d(tgt, bias, init, seq):
    inp = _conv_inputs(2, 8, 33, 4, torch.float32, bias, init, seq)
    x, w, b_, i_, s_ = (inp[k] for k in ("x", "weight", "bias", "initial_states", "seq_idx"))
    dev = tgt.device
    args = (tgt.backend, x.to(dev).requires_grad_(), w.to(dev).requires_grad_(),
            None if b_ is None else b_.to(dev).requires_grad_(), None if i_ is None else i_.to(dev).requires_grad_(),
            None if s_ is None else s_.to(dev), True)
    torch.library.opcheck(lib.causal_conv1d_fwd.default, args)


def test_opcheck_decode_steps(tgt):
    dev, (b, d, n, w) = tgt.device, (3, 8, 4, 4)
    g = torch.Generator().manual_seed(0)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(dev)

    state, x, dt, z = r(b, d, n), r(b, d), r(b, d, scale=0.5), r(b, d)
    A, B, C, D, dt_bias = -torch.rand(d, n, generator=g).to(dev), r(b, 2, n), r(b, 2, n), r(d), r(d, scale=0.1)
    torch.library.opcheck(lib.selective_state_update.default,
                          (tgt.backend, state, x, dt, A, B, C, D, z, dt_bias, True))
    torch.library.opcheck(lib.causal_conv1d_update.default, (tgt.backend, r(b, d), r(b, d, w), r(d, w), r(d), True))


@pytest.mark.parametrize("b,seq,optional,out_proj", [
    (1, False, True, True), (2, True, True, False), (2, False, True, True), (2, False, False, True)],
    ids=["b1-out_proj", "b2-packed", "b2-out_proj", "b2-no-biases-no-D"])
def test_opcheck_mamba_inner(tgt, b, seq, optional, out_proj):
    from .test_mamba_inner import _inputs

    if _interpreted(tgt) and b == 2 and not seq:
        pytest.skip("the interpreter is slow: b1-out_proj and b2-packed only (without the optional inputs: "
                    "test_mamba_inner.py::test_without_the_optional_inputs[triton], against the reference)")
    l = 21 if _interpreted(tgt) else 37
    inp = _inputs(b, 8, l, out_proj=6 if out_proj else 0)
    xz = inp.pop("xz")
    if not optional:
        inp.update(conv_bias=None, D=None, delta_bias=None, out_proj_bias=None)
    leaf = lambda t: None if t is None else t.to(tgt.device).requires_grad_()  # noqa: E731
    seq_idx = _packed(b, l, tgt.device) if seq else None
    args = (tgt.backend, leaf(xz[:, :8].clone()), leaf(xz[:, 8:].clone()), *(leaf(inp.get(k)) for k in (
        "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "A", "D", "delta_bias")),
        seq_idx, leaf(inp.get("out_proj_weight")), leaf(inp.get("out_proj_bias")), False)
    torch.library.opcheck(lib.mamba_inner_fwd.default, args)


def test_compiling_on_a_torch_older_than_the_tested_one_warns(monkeypatch, caplog):
    from emma_mamba.ops import _library

    with caplog.at_level("WARNING", logger="emma_mamba.ops"):
        _library.require_compile_backend("inductor", "train.compile_backend")
        assert bool(caplog.records) == (torch.__version__ < _library.COMPILE_TESTED_FROM)
        caplog.clear()
        monkeypatch.setattr(_library, "COMPILE_TESTED_FROM", "99.0")
        _library.require_compile_backend("inductor", "train.compile_backend")
    assert "train.compile_backend: torch" in caplog.text and "older than 99.0" in caplog.text


def test_unknown_backend_in_a_custom_op_is_an_error():
    x = torch.randn(1, 4, 5)
    with pytest.raises(ops.BackendUnavailableError, match="unknown backend"):
        lib.causal_conv1d_fwd("nope", x, torch.randn(4, 3), None, None, None, False)


# ---------------------------------------------------------------------------------------------------------
# the public ops inside a compiled graph


def test_compiled_scan_calls_the_kernels_and_equals_eager(tgt):
    inp = _on(make_scan_inputs(b=2, d=8, n=4, l=45, bc="var", init=True, seq=True), tgt.device)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

    def f(u, delta, A, B, C, D, z, delta_bias, initial_state, seq_idx):
        out, last = ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, True, initial_state, seq_idx)
        return (out.float() * 1.5).sum() + (last * last).sum()  # something around the op for the graph to hold

    with ops.use_backend(tgt.backend):
        args = [inp[k] for k in names + ("seq_idx",)]
        want = f(*args)
        gwant = torch.autograd.grad(want, [inp[k] for k in names])
        rec = GraphRecorder()
        got = torch.compile(f, fullgraph=True, backend=rec.backend)(*args)
        ggot = torch.autograd.grad(got, [inp[k] for k in names])
    assert rec.count("selective_scan_fwd") == 1 and rec.count("selective_scan_bwd", "bw") == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for k, a, b in zip(names, ggot, gwant):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"d{k}: {m}")


def test_torch_backend_traces_as_plain_torch_ops():
    inp = make_scan_inputs(b=1, d=4, n=2, l=6, bc="var")
    rec = GraphRecorder()
    with ops.use_backend("torch"):
        torch._dynamo.reset()
        out = torch.compile(lambda u: ops.selective_scan(u, inp["delta"], inp["A"], inp["B"], inp["C"]),
                            fullgraph=True, backend=rec.backend)(inp["u"])
        want = ops.selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
    assert rec.all_ops() and not any(t.startswith("emma_mamba.") for t in rec.all_ops())
    torch.testing.assert_close(out, want)


def test_a_graph_traced_under_one_backend_is_not_reused_under_another():
    """The backend is baked into a traced graph; the graph guards on the selection, so use_backend("torch")
    retraces (plain torch ops) instead of running the graph traced under use_backend("cpu") (which it did), and
    each graph is reused when its selection comes back."""
    torch._dynamo.reset()
    x, w = torch.randn(1, 4, 9), torch.randn(4, 3)
    rec = GraphRecorder()
    f = torch.compile(lambda x: ops.causal_conv1d(x, w, activation="silu") * 2, fullgraph=True, backend=rec.backend)
    outs = {}
    for bk in ("cpu", "torch", "cpu", "torch"):
        with ops.use_backend(bk):
            outs[bk] = f(x)
    assert [any(t.startswith("emma_mamba.") for t in g) for g in rec.graphs["fw"]] == [True, False]
    torch.testing.assert_close(outs["cpu"], outs["torch"])


# ---------------------------------------------------------------------------------------------------------
# the Mamba LM compiled whole


def _lm(device, **kw):
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=96, d_state=8, pad_vocab_size_multiple=8, **kw)
    return MambaLM(cfg).to(device)


def _packed(b, l, device):
    seq = torch.zeros(b, l, dtype=torch.int32)
    seq[0, l // 3:] = 1
    seq[0, l // 2:] = 2
    return seq.to(device)


def _train_step(model, ids, seq_idx):
    logits = model(ids, seq_idx=seq_idx).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    grads = torch.autograd.grad(loss, [p for p in model.parameters()])
    return loss, grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_lm_compiles_as_one_graph_and_trains_like_eager(model_tgt, checkpointing):
    tgt = model_tgt
    model = _lm(tgt.device)
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    ids = torch.randint(0, 96, (2, 40), device=tgt.device)
    seq = _packed(2, 40, tgt.device)
    with ops.use_backend(tgt.backend):
        want, gwant = _train_step(model, ids, seq)
        rec = GraphRecorder()
        compiled = torch.compile(model, fullgraph=True, backend=rec.backend)
        got, ggot = _train_step(compiled, ids, seq)
    # each mixer one op (ops.mamba_inner), forward and backward
    assert rec.count("mamba_inner_fwd") == 2 and rec.count("mamba_inner_bwd", "bw") == 2
    # with checkpointing the backward graph recomputes each block's forward
    assert rec.count("mamba_inner_fwd", "bw") == (2 if checkpointing else 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), ggot, gwant):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_compiled_lm_keeps_three_activations_per_layer_less_with_mixer_recompute():
    """Compiled, the mixers' recompute (the custom op mamba_inner_fwd) keeps what it keeps in eager: the
    backward graph's saved inputs hold at least 3 (b, d_inner, l) activations per layer less (conv output,
    delta, scan output) than with the separate ops (conv + scan custom ops, whose saved inputs the partitioner would not recompute by itself);
    both give eager's loss and gradients."""
    ids = torch.randint(0, 96, (2, 40))
    seq = _packed(2, 40, "cpu")
    saved, names = {}, {}
    for recompute in (True, False):
        model = _lm("cpu").train()
        model.set_mixer_recompute(recompute)
        want, gwant = _train_step(model, ids, seq)
        torch._dynamo.reset()
        rec = GraphRecorder()
        got, ggot = _train_step(torch.compile(model, fullgraph=True, backend=rec.backend), ids, seq)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(ggot, gwant):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        saved[recompute] = sum(sum(g) for g in rec.input_numels["bw"])
        names[recompute] = (rec.count("mamba_inner_fwd"), rec.count("selective_scan_fwd"))
    cfg = model.config
    unit = 2 * cfg.d_inner * 40
    assert names == {True: (2, 0), False: (0, 2)}
    assert saved[False] - saved[True] >= 3 * cfg.n_layer * unit, (saved, unit)


def test_lm_compiled_with_dynamic_lengths_across_a_chunk_edge():
    """One dynamic-shape graph serves lengths on both sides of the saved-state chunk (256 steps): the fake forward's
    saved-state count is a symbolic expression of the length, and nothing specialises it to one side."""
    model = _lm("cpu").train()
    rec = GraphRecorder()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=rec.backend)
    for l in (20, 300, 700):
        ids = torch.randint(0, 96, (1, l))
        want, gwant = _train_step(model, ids, None)
        got, ggot = _train_step(compiled, ids, None)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        for a, b in zip(ggot, gwant):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(rec.graphs["fw"]) == len(rec.graphs["bw"]) == 1, "one graph each for every length (no recompile)"


def test_lm_exports_with_a_dynamic_length_and_reloads(tmp_path):
    """torch.export of the LM itself (its MambaLMOutput is a registered pytree node): the kernels are nodes of the
    exported program, the length a symbolic dimension over 2..4096, and the program saved and loaded gives the
    model's output, field by field."""
    model = _lm("cpu").eval()
    ep = torch.export.export(model, (torch.randint(0, 96, (2, 40)),),
                             dynamic_shapes=({1: torch.export.Dim("seqlen", min=2, max=4096)},))
    assert sum("emma_mamba.mamba_inner_fwd" in str(n.target) for n in ep.graph.nodes) == 2
    torch.export.save(ep, tmp_path / "lm.pt2")
    loaded = torch.export.load(tmp_path / "lm.pt2").module()
    for l in (17, 300):
        ids = torch.randint(0, 96, (2, l))
        with torch.no_grad():
            got, want = loaded(ids), model(ids)
        assert type(got) is type(want) and got.hidden_states is None
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, rtol=0, atol=0)


def test_lm_decode_compiled_gives_the_same_tokens_and_states(model_tgt):
    """Prefill and decode steps through a compiled model: the decode ops update the cache in place inside the
    graph (custom ops that mutate their state argument)."""
    tgt = model_tgt
    model = _lm(tgt.device).eval()
    prompt = torch.randint(0, 96, (2, 11), device=tgt.device)

    def greedy(m):
        cache = m.allocate_cache(2)
        toks = []
        with torch.no_grad():
            logits = m(prompt, cache=cache).logits[:, -1]
            for _ in range(4):
                tok = logits.argmax(-1, keepdim=True)
                toks.append(tok)
                logits = m(tok, cache=cache).logits[:, -1]
        return torch.cat(toks, 1), logits, cache

    with ops.use_backend(tgt.backend):
        want = greedy(model)
        rec = GraphRecorder()
        got = greedy(torch.compile(model, fullgraph=True, backend=rec.backend))
    assert rec.count("selective_state_update") >= 2 and rec.count("causal_conv1d_update") >= 2
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2].ssm_states + got[2].conv_states, want[2].ssm_states + want[2].conv_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_decode_step_with_grad_compiles_in_a_fresh_process():
    """A decode step whose inputs require grad (the LM's parameters do) runs the differentiable reference and says
    so once; under torch.compile(fullgraph=True) the first such step of a process used to fail, the logger call
    untraceable by dynamo. Compiled, it gives the eager step's logits and states, and the eager call after it
    still says why it runs the reference."""
    model = _lm("cpu").eval()
    ids = torch.randint(0, 96, (1, 8))

    def run(m):
        cache = m.allocate_cache(1)
        m(ids[:, :7], cache=cache)
        return m(ids[:, 7:], cache=cache).logits, cache

    ops._STEP_GRAD_SAID.clear()
    got, got_cache = run(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert not ops._STEP_GRAD_SAID, "the compiled step does not record a warning it could not print"
    want, want_cache = run(model)
    assert ops._STEP_GRAD_SAID == {"selective_state_update", "causal_conv1d_update"}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_cache.ssm_states + got_cache.conv_states, want_cache.ssm_states + want_cache.conv_states):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lm_compiled_by_inductor_trains_like_eager():
    """Inductor (generated C++ around the kernels) on the cpu backend: the same loss and gradients within
    float rounding (Inductor fuses the norms and gates, so summation orders differ)."""
    model = _lm("cpu").train()
    ids = torch.randint(0, 96, (2, 40))
    seq = _packed(2, 40, "cpu")
    want, gwant = _train_step(model, ids, seq)
    got, ggot = _train_step(torch.compile(model, fullgraph=True), ids, seq)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), ggot, gwant):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_out_of_range_token_id_fails_inside_a_compiled_graph():
    model = _lm("cpu").eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(torch.randint(0, 96, (1, 5)))  # in range: runs
        with pytest.raises(RuntimeError, match="outside the embedding"):
            compiled(torch.tensor([[1, 2, 500, 3, 4]]))


@pytest.mark.parametrize("frozen", ["lm", "out_proj+conv_bias"])
def test_compiled_mixer_backward_skips_the_gradients_of_frozen_weights(monkeypatch, frozen):
    """The custom op's backward reads needs_input_grad, as eager MambaInnerFn does: with the LM frozen (stage 1:
    the gradient only flows through it to the projector) it computes no weight gradient, i.e. skips their GEMMs;
    with some weights frozen only theirs. The gradients that are computed equal eager's."""
    from emma_mamba.ops import _inner

    calls = []
    real = _inner.inner_bwd
    monkeypatch.setattr(_inner, "inner_bwd", lambda *a, **k: calls.append(k["weight_grads"]) or real(*a, **k))
    model = _lm("cpu").train()
    for n, p in model.named_parameters():
        p.requires_grad_(not (frozen == "lm" or n.endswith(("out_proj.weight", "conv1d.bias"))))
    emb = torch.randn(2, 40, 32, requires_grad=True)
    seq = _packed(2, 40, "cpu")
    trained = [p for p in model.parameters() if p.requires_grad]

    def step(m):
        loss = m(inputs_embeds=emb, seq_idx=seq).logits.float().square().mean()
        return torch.autograd.grad(loss, [emb, *trained])

    flags = (False,) * 6 if frozen == "lm" else (True, False, True, True, False, False)  # no out_proj bias
    want = step(model)
    assert calls == [flags, flags]  # eager: MambaInnerFn
    calls.clear()
    rec = GraphRecorder()
    got = step(torch.compile(model, fullgraph=True, backend=rec.backend))
    assert rec.count("mamba_inner_bwd", "bw") == 2
    assert calls == [flags, flags]  # compiled: the custom op
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_caches_are_keyed_on_the_ops_sources():
    """torch.compile's on-disk caches hold the backward graphs traced from the ops' Python autograd formulas but
    key them on the forward graph only; a cached graph of another version of the ops once failed here with
    "mamba_inner_bwd() is missing value for argument 'weight_grads'". Importing the ops adds a hash of their
    sources to the cache key tag, keeping a tag the user set."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    import emma_mamba.ops as ops_pkg

    h = hashlib.sha256()
    for p in sorted(Path(ops_pkg.__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    mine = f"emma_mamba-ops-{h.hexdigest()[:16]}"
    assert mine in torch.compiler.config.cache_key_tag.split("|")
    code = "import torch, emma_mamba.ops; print(torch.compiler.config.cache_key_tag)"
    env = dict(os.environ, TORCH_COMPILE_CACHE_KEY_TAG="users-own-tag")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"users-own-tag|{mine}"


def test_the_backend_choice_is_a_constant_to_dynamo_without_importing_it():
    """ops marks ``_traced_backend`` as torch.compiler.assume_constant_result does, without importing torch._dynamo
    (and triton: 1.6 s of every process that never compiles): the decorator's effect on a function must still be
    exactly that mark, and a fresh ``import emma_mamba.ops`` must not load Dynamo."""
    import subprocess
    import sys

    def probe():
        pass

    before = dict(vars(probe))
    torch.compiler.assume_constant_result(probe)
    assert {k: v for k, v in vars(probe).items() if k not in before} == {"_dynamo_marked_constant": True}
    assert vars(ops._traced_backend).get("_dynamo_marked_constant") is True
    r = subprocess.run([sys.executable, "-c", "import sys, emma_mamba.ops, emma_mamba.models.vlm; "
                        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr[-2000:]
