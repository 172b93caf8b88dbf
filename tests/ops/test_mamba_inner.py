"""ops.mamba_inner: the mixer's conv -> x_proj -> dt_proj -> scan (-> out_proj) path as one op that recomputes
the conv output, delta (and the scan output) in its backward. Oracles: the same path composed of the fp32 reference ops (torch backend), the
separate ops on the same backend (recompute=False), and counts of what autograd keeps, made by saved-tensor
hooks."""

from __future__ import annotations

import pytest
import torch

from emma_mamba import ops
from emma_mamba.models.mamba import MambaConfig, MambaLM

from .tolerances import TOL, assert_close, segments

BACKENDS = [pytest.param("cpu", "cpu", id="cpu"), pytest.param("cuda-emu", "cpu", id="cuda-emu"),
            pytest.param("triton", "cpu", id="triton-interp"),
            pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
            pytest.param("triton", "cuda", id="triton-gpu", marks=pytest.mark.gpu)]
NAMES = ("x", "z", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "A", "D", "delta_bias")


def _skip_unavailable(backend, device):
    if backend == "triton" and device == "cpu" and not ops._runs_on("triton", "cpu"):
        pytest.skip("the Triton interpreter is off")
    try:
        ops._load(backend)
    except ops.BackendUnavailableError as e:
        pytest.skip(str(e))


def _inputs(b, d, l, n=8, r=3, w=4, dtype=torch.float32, seed=0, out_proj=0):
    """A mixer's inner inputs at realistic scales: x, z as the two halves of one in_proj output; with
    ``out_proj`` = d_model, out_proj's weight and bias too."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    xz = rnd(b, 2 * d, l).to(dtype)
    inp = {"xz": xz, "conv_weight": rnd(d, w, scale=0.5), "conv_bias": rnd(d, scale=0.1),
           "x_proj_weight": rnd(r + 2 * n, d, scale=d ** -0.5), "dt_proj_weight": rnd(d, r, scale=r ** -0.5),
           "A": -torch.exp(rnd(d, n, scale=0.5)), "D": rnd(d), "delta_bias": rnd(d, scale=0.5) - 2.0}
    if out_proj:
        inp.update(out_proj_weight=rnd(out_proj, d, scale=d ** -0.5), out_proj_bias=rnd(out_proj, scale=0.1))
    return inp


def _cotangent(inp, seed):
    """A random gradient of the op's output: (b, l, d_model) with out_proj inside, else (b, d, l)."""
    b, d2, l = inp["xz"].shape
    shape = (b, l, inp["out_proj_weight"].shape[0]) if "out_proj_weight" in inp else (b, d2 // 2, l)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(inp["xz"].dtype)


def _run(inp, device, seq_idx=None, dy=None, frozen=(), **kw):
    """y and the gradients of every input (x and z as the halves of xz) for the cotangent dy."""
    leaf = {k: v.to(device).clone().requires_grad_(k not in frozen) for k, v in inp.items()}
    x, z = leaf["xz"].chunk(2, dim=1)
    args = [leaf[k] for k in NAMES[2:]]
    kw.update({k: leaf[k] for k in ("out_proj_weight", "out_proj_bias") if k in leaf})
    y = ops.mamba_inner(x, z, *args, seq_idx=None if seq_idx is None else seq_idx.to(device), **kw)
    if dy is None:
        return y, None
    wrt = {k: t for k, t in leaf.items() if t.requires_grad}
    grads = torch.autograd.grad(y, list(wrt.values()), dy.to(device))
    return y, {k: gr.cpu() for k, gr in zip(wrt, grads)}


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("b,l,packed", [(1, 37, False), (2, 300, True)], ids=["b1-l37", "b2-l300-packed"])
@pytest.mark.parametrize("dtype,out_proj", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 12)],
                         ids=["fp32", "bf16", "fp32-out_proj"])
def test_outputs_and_gradients_match_the_reference(backend, device, b, l, packed, dtype, out_proj):
    """Output and every input's gradient against the fp32 reference ops; with out_proj inside the op, its weight
    gradient comes from the scan output the backward kernels recompute."""
    _skip_unavailable(backend, device)
    if backend == "triton" and device == "cpu" and (l > 64 or dtype != torch.float32):
        pytest.skip("the Triton interpreter is slow: one small fp32 shape")
    d = 16
    inp = _inputs(b, d, l, dtype=dtype, out_proj=out_proj)
    seq_idx = segments(b, l, torch.Generator().manual_seed(1), cuts=[1, 17, 256]) if packed else None
    dy = _cotangent(inp, 2)
    with ops.use_backend("torch"):
        want, want_g = _run(inp, "cpu", seq_idx, dy)
    with ops.use_backend(backend):
        got, got_g = _run(inp, device, seq_idx, dy)
    rtol, atol = TOL[dtype]
    assert_close("y", got.cpu(), want, rtol, atol)
    for k in want_g:
        # gradients: 5x the output tolerance (they sum over l, through the scan's reverse pass), at least 1e-3
        assert_close(f"d{k}", got_g[k], want_g[k], max(5 * rtol, 1e-3), max(5 * atol, 1e-3))


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu",
                                     pytest.param("triton", marks=pytest.mark.skipif(
                                         not ops._runs_on("triton", "cpu"), reason="the Triton interpreter is off"))])
def test_without_the_optional_inputs(backend):
    """conv_bias, D and delta_bias absent (None): against the reference, every present input's gradient."""
    _skip_unavailable(backend, "cpu")
    inp = {k: v for k, v in _inputs(2, 16, 40).items() if k not in ("conv_bias", "D", "delta_bias")}
    dy = torch.randn(2, 16, 40, generator=torch.Generator().manual_seed(7))

    def run(bk):
        leaf = {k: v.clone().requires_grad_() for k, v in inp.items()}
        x, z = leaf["xz"].chunk(2, dim=1)
        with ops.use_backend(bk):
            y = ops.mamba_inner(x, z, leaf["conv_weight"], None, leaf["x_proj_weight"], leaf["dt_proj_weight"],
                                leaf["A"])
            return y, dict(zip(leaf, torch.autograd.grad(y, list(leaf.values()), dy)))

    (want, want_g), (got, got_g) = run("torch"), run(backend)
    rtol, atol = TOL[torch.float32]
    assert_close("y", got, want, rtol, atol)
    for k in want_g:
        assert_close(f"d{k}", got_g[k], want_g[k], 5 * rtol, 5 * atol)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_carried_states_continue_the_sequence(backend):
    """conv_initial_states / initial_state / return_last_state (a prefill into a decode cache): the second half
    of a sequence, from the first half's last state and last w - 1 conv inputs, gives the whole run's output."""
    inp = _inputs(2, 16, 50)
    x, z = inp.pop("xz").chunk(2, dim=1)
    args = [inp[k] for k in NAMES[2:]]
    with ops.use_backend(backend):
        whole, last = ops.mamba_inner(x, z, *args, return_last_state=True)
        first, state = ops.mamba_inner(x[..., :20], z[..., :20], *args, return_last_state=True)
        second, last2 = ops.mamba_inner(x[..., 20:], z[..., 20:], *args, conv_initial_states=x[..., 17:20],
                                        initial_state=state, return_last_state=True)
    torch.testing.assert_close(torch.cat([first, second], dim=-1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last2, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b", [1, 3])
def test_recompute_matches_the_separate_ops(b):
    """The recomputed conv output and delta are the forward's bit for bit (same kernels, same GEMMs). With frozen
    weights the separate ops run the same GEMMs (the weight broadcast over the batch), so output and input
    gradient are theirs exactly; with trainable weights autograd's GEMMs fold the batch into the rows (one GEMM
    for the weight gradient) where the op broadcasts the weight and sums per-row weight gradients itself: equal
    to rounding."""
    inp = _inputs(b, 24, 50)
    seq_idx = segments(b, 50, torch.Generator().manual_seed(3), cuts=[10])
    dy = torch.randn(b, 24, 50, generator=torch.Generator().manual_seed(4))
    for frozen in ((), ("conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "A", "D", "delta_bias")):
        with ops.use_backend("cpu"):
            y1, g1 = _run(inp, "cpu", seq_idx, dy, frozen=frozen)
            y0, g0 = _run(inp, "cpu", seq_idx, dy, frozen=frozen, recompute=False)
        assert g1.keys() == g0.keys() and len(g1) == (1 if frozen else len(inp))
        if frozen or b == 1:  # the same GEMMs
            assert torch.equal(y1, y0)
        torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
        for k in g0:
            if frozen:
                assert torch.equal(g1[k], g0[k]), f"d{k} differs (frozen)"
            # (per-row GEMMs summed vs one GEMM over the folded batch: sums of 150 products, differently ordered)
            torch.testing.assert_close(g1[k], g0[k], rtol=5e-5, atol=5e-5, msg=lambda m: f"d{k} differs: {m}")


def test_deterministic_backward_is_bitwise_reproducible():
    inp = _inputs(2, 16, 80)
    dy = torch.randn(2, 16, 80, generator=torch.Generator().manual_seed(5))
    with ops.use_backend("cpu"):
        runs = [_run(inp, "cpu", None, dy, deterministic=True)[1] for _ in range(2)]
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


class _SavedActivations:
    """Saved-tensor hooks that record each distinct storage autograd keeps, with its size in elements."""

    def __init__(self):
        self.sizes = {}

    def __enter__(self):
        def pack(t):
            st = t.untyped_storage()
            self.sizes[st.data_ptr()] = st.nbytes() // t.element_size()
            return t
        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    def units(self, numel):
        """Kept storages in units of ``numel`` elements: those whose size is a multiple of it (the in_proj output
        whose halves x and z are both kept is one storage of 2 units)."""
        return sum(v // numel for v in self.sizes.values() if v % numel == 0)


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu",
                                     pytest.param("triton", marks=pytest.mark.skipif(
                                         not ops._runs_on("triton", "cpu"), reason="the Triton interpreter is off"))])
@pytest.mark.parametrize("out_proj", [0, 12], ids=["", "out_proj"])
def test_keeps_fewer_activations_than_the_separate_ops(backend, out_proj):
    """Per call, autograd keeps x and z (b, d, l), the in_proj output they are views of (2 units), and not the
    conv output, delta or (with out_proj inside) the scan output: the separate ops keep at least 4 units (x and z,
    the conv output, delta; at batch > 1 torch.matmul's backward of x_proj also keeps the conv output folded to
    (b * l, d), a fifth), and out_proj keeps the scan output."""
    _skip_unavailable(backend, "cpu")
    b, d, l = 2, 16, 40
    inp = _inputs(b, d, l, out_proj=out_proj)
    kept = {}
    for recompute in (True, False):
        with ops.use_backend(backend), _SavedActivations() as saved:
            y, _ = _run(inp, "cpu", recompute=recompute)
        kept[recompute] = saved.units(b * d * l)
        del y
    assert kept[True] == 2 and kept[False] >= (5 if out_proj else 4), kept


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("z,D,packed", [(True, True, False), (True, False, True), (False, True, True)],
                         ids=["z-D", "z-packed", "noz-D-packed"])
def test_scan_backward_recomputes_the_forward_output(backend, device, z, D, packed):
    """selective_scan_bwd(..., recompute_out=True) returns the forward's output (out_proj's input, which
    mamba_inner does not keep), gated and with the D skip, to the output tolerance of the reference; the
    gradients are those without it, bit for bit; without recompute_out it returns None."""
    _skip_unavailable(backend, device)
    interp = backend == "triton" and device == "cpu"
    b, d, n, l = 2, 8, 8, 40 if interp else 300
    g = torch.Generator().manual_seed(11)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    u, delta, zz, dout = rnd(b, d, l), rnd(b, d, l, scale=0.5), rnd(b, d, l), rnd(b, d, l)
    A, B, C = -torch.rand(d, n, generator=g).to(device) - 0.5, rnd(b, n, l), rnd(b, n, l)
    Dv, bias = rnd(d) if D else None, rnd(d, scale=0.1)
    zz = zz if z else None
    seq_idx = segments(b, l, g, cuts=[5, 17]).to(device) if packed else None
    kern = ops._load(backend)
    want = ops.reference.selective_scan_ref(u.cpu(), delta.cpu(), A.cpu(), B.cpu(), C.cpu(),
                                            None if Dv is None else Dv.cpu(), None if zz is None else zz.cpu(),
                                            bias.cpu(), True, seq_idx=None if seq_idx is None else seq_idx.cpu())
    _, _, saved = kern.selective_scan_fwd(u, delta, A, B, C, Dv, zz, bias, True, None, seq_idx)
    with_out = kern.selective_scan_bwd(u, delta, A, B, C, Dv, zz, bias, True, None, seq_idx, saved, dout, None,
                                       True, True)
    without = kern.selective_scan_bwd(u, delta, A, B, C, Dv, zz, bias, True, None, seq_idx, saved, dout, None,
                                      True, False)
    assert without[9] is None and with_out[9].shape == (b, d, l) and with_out[9].dtype == u.dtype
    rtol, atol = TOL[torch.float32]
    assert_close("recomputed out", with_out[9].cpu(), want, rtol, atol)
    for i, (a, c) in enumerate(zip(with_out[:9], without[:9])):
        assert (a is None) == (c is None) and (a is None or torch.equal(a, c)), f"gradient {i} changed"


def test_lm_training_keeps_two_activations_per_layer_not_five():
    """A MambaLM training forward keeps per layer x and z of size (b, d_inner, l) (the scan output, out_proj's
    input, is recomputed in the backward); with the mixers' recompute off, also the conv output, delta and the
    scan output (and torch.matmul's folded copy of the conv output). The loss and the gradients are the same
    either way to rounding (the op's GEMMs broadcast the weights, autograd's fold the batch)."""
    cfg = MambaConfig(d_model=16, n_layer=3, vocab_size=100, d_state=8)  # logits: not a multiple of the unit
    lm = MambaLM(cfg)
    ids = torch.randint(0, 100, (2, 30), generator=torch.Generator().manual_seed(6))
    unit = 2 * cfg.d_inner * 30
    out = {}
    for recompute in (True, False):
        for m in lm.layers:
            m.mixer.recompute_activations = recompute
        lm.zero_grad()
        with ops.use_backend("cpu"), _SavedActivations() as saved:
            loss = lm(ids).logits.float().logsumexp(-1).mean()
        loss.backward()
        out[recompute] = (saved.units(unit), loss.detach(), {k: p.grad.clone() for k, p in lm.named_parameters()})
    assert out[True][0] == 2 * cfg.n_layer and out[False][0] >= 5 * cfg.n_layer, (out[True][0], out[False][0])
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-6, atol=0)
    for k, gr in out[False][2].items():  # the autograd graphs differ, so gradients that sum several paths
        torch.testing.assert_close(out[True][2][k], gr, rtol=1e-5, atol=1e-7, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("bad,message", [
    ({"x_proj_weight": torch.zeros(20, 16)},
     r"x_proj_weight must have shape \(dt_rank \+ 2 \* dstate = 19, dim=16\), with dt_rank = "
     r"dt_proj_weight\.shape\[1\] = 3 and dstate = A\.shape\[1\] = 8, got \(20, 16\)"),
    ({"dt_proj_weight": torch.zeros(15, 3)}, r"dt_proj_weight must have shape \(dim=16, dt_rank\)"),
    ({"z": torch.zeros(2, 16, 9)}, r"z must have x's shape \(2, 16, 10\)"),
    ({"A": torch.zeros(8, 8)}, r"A must have shape \(dim=16, dstate\)"),
    ({"conv_weight": torch.zeros(16, 5)}, r"conv width .* must be 2, 3 or 4, got 5"),
    ({"out_proj_weight": torch.zeros(8, 15)}, r"out_proj_weight must have shape \(d_model, dim=16\), got \(8, 15\)"),
    ({"out_proj_weight": torch.zeros(8, 16), "out_proj_bias": torch.zeros(9)},
     r"out_proj_bias must have shape \(d_model=8,\), got \(9,\)"),
    ({"out_proj_bias": torch.zeros(8)}, r"out_proj_bias was given without out_proj_weight"),
])
def test_bad_inputs_name_what_is_wrong(bad, message):
    inp = _inputs(2, 16, 10)
    x, z = inp.pop("xz").chunk(2, dim=1)
    args = {"x": x, "z": z, **inp, **bad}
    with pytest.raises(ops.OpInputError, match=message):
        ops.mamba_inner(**args)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_takes_an_nn_conv1d_weight_as_mamba_inner_fn_does(backend):
    """mamba_inner_fn takes the mixer's conv1d.weight (d, 1, w) as it is; so does mamba_inner (it was refused,
    under causal_conv1d's name): the same output as with the (d, w) weight, and the gradient reaches the 3-D
    parameter in its own shape. causal_conv1d, like causal_conv1d_fn, keeps (d, w) and says how to get it."""
    _skip_unavailable(backend, "cpu")
    inp = _inputs(2, 16, 40, out_proj=12)
    dy = _cotangent(inp, 3)
    x, z = inp["xz"].chunk(2, dim=1)
    rest = [inp[k] for k in NAMES[3:]]
    outs = []
    for w3 in (False, True):
        wt = (inp["conv_weight"][:, None] if w3 else inp["conv_weight"]).clone().requires_grad_()
        with ops.use_backend(backend):
            y = ops.mamba_inner(x, z, wt, *rest, out_proj_weight=inp["out_proj_weight"],
                                out_proj_bias=inp["out_proj_bias"])
        (g,) = torch.autograd.grad(y, [wt], dy)
        assert g.shape == wt.shape
        outs.append((y, g.reshape(16, -1)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    with pytest.raises(ops.OpInputError, match=r"an nn\.Conv1d's weight: pass weight\.squeeze\(1\)"):
        ops.causal_conv1d(x, inp["conv_weight"][:, None])
