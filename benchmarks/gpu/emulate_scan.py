"""Lane-level emulation, in float64 torch on the CPU, of csrc/cuda/selective_scan.cu's forward and backward.

A development check for machines without a GPU, not a test of the compiled kernel: each function mirrors the
kernel's data flow lane by lane (32 lanes x K steps per chunk, the 5-step shuffle scans as shifted tensors,
the chunk carries, the saved boundary states every 256 steps, padding and seq_idx resets, the reverse scan of
the adjoint) and compares outputs, last states and every gradient with the reference ops + autograd.
Run: python benchmarks/gpu/emulate_scan.py   (about a minute; prints the max errors per case)
"""
import os
import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from emma_mamba.ops.reference import selective_scan_ref

torch.set_default_dtype(torch.float64)
W = 32


def shift_up(x, off, fill):  # lane j gets lane j-off
    y = torch.full_like(x, fill)
    y[off:] = x[:-off]
    return y


def shift_down(x, off, fill):  # lane j gets lane j+off
    y = torch.full_like(x, fill)
    y[:-off] = x[off:]
    return y


def bc_at(X, b, c, n, pos, L, d):
    valid = pos < L
    if X.dim() == 2:
        return torch.full(pos.shape, float(X[c, n]))
    if X.dim() == 3:
        row = X[b, n]
    else:
        g = X.shape[1]
        row = X[b, c // (d // g), n]
    v = torch.zeros(pos.shape)
    v[valid] = row[pos[valid]].double()
    return v


def inputs_at(x, b, c, pos, L, bias, softplus, seq):
    valid = pos < L
    u = torch.zeros(pos.shape); dt = torch.zeros(pos.shape); raw = torch.zeros(pos.shape)
    u[valid] = x["u"][b, c, pos[valid]].double()
    raw[valid] = x["delta"][b, c, pos[valid]].double() + bias
    dtv = F.softplus(raw) if softplus else raw
    dt = torch.where(valid, dtv, torch.zeros(()))
    reset = torch.zeros(pos.shape, dtype=torch.bool)
    if seq is not None:
        s = seq[b]
        pv = pos[valid]
        r = (pv > 0) & (s[pv] != s[(pv - 1).clamp(min=0)])
        reset[valid] = r
    return u, dt, raw, reset, valid


def fwd(x, softplus):
    u_, A = x["u"], x["A"]
    b_, d, L = u_.shape
    N = A.shape[1]
    K = 16
    nsave = (L + 255) // 256
    out = torch.zeros(b_, d, L); last = torch.zeros(b_, d, N); saved = torch.zeros(b_, d, nsave, N)
    lanes = torch.arange(W)
    for b in range(b_):
        for c in range(d):
            bias = float(x["delta_bias"][c]) if x["delta_bias"] is not None else 0.
            carry = (x["initial_state"][b, c].double().clone() if x["initial_state"] is not None else torch.zeros(N))
            for cs in range(0, L, W * K):
                t0 = cs + lanes * K
                pos = t0[:, None] + torch.arange(K)[None]
                u, dt, raw, reset, valid = inputs_at(x, b, c, pos, L, bias, softplus, x["seq_idx"])
                dtu = dt * u
                y = torch.zeros(W, K)
                for n in range(N):
                    a = torch.where(reset, torch.zeros(()), torch.exp(dt * float(A[c, n])))
                    bb = dtu * bc_at(x["B"], b, c, n, pos, L, d)
                    pa = torch.ones(W); pb = torch.zeros(W)
                    for i in range(K):
                        pb = a[:, i] * pb + bb[:, i]; pa = pa * a[:, i]
                    for off in (1, 2, 4, 8, 16):
                        oa, ob = shift_up(pa, off, 1.), shift_up(pb, off, 0.)
                        pb = pa * ob + pb; pa = pa * oa  # lanes < off got identity -> unchanged
                    ea, eb = shift_up(pa, 1, 1.), shift_up(pb, 1, 0.)
                    h = ea * carry[n] + eb
                    for j in range(W):
                        if int(t0[j]) % 256 == 0 and int(t0[j]) < L:
                            saved[b, c, int(t0[j]) // 256, n] = h[j]
                    Cv = bc_at(x["C"], b, c, n, pos, L, d)
                    for i in range(K):
                        h = a[:, i] * h + bb[:, i]
                        y[:, i] += Cv[:, i] * h
                    carry[n] = h[31]
                if x["D"] is not None:
                    y = y + float(x["D"][c]) * u
                if x["z"] is not None:
                    zz = torch.zeros(pos.shape); zz[valid] = x["z"][b, c, pos[valid]].double()
                    y = y * F.silu(zz)
                out[b, c, pos[valid]] = y[valid]
            last[b, c] = carry
    return out, last, saved


def bwd(x, softplus, saved, dout, dlast):
    u_, A = x["u"], x["A"]
    b_, d, L = u_.shape
    N = A.shape[1]
    K = 8
    lanes = torch.arange(W)
    g = {k: torch.zeros(v.shape) for k, v in x.items() if v is not None and v.is_floating_point()}
    for b in range(b_):
        for c in range(d):
            bias = float(x["delta_bias"][c]) if x["delta_bias"] is not None else 0.
            carry_g = dlast[b, c].double().clone() if dlast is not None else torch.zeros(N)
            carry_a = torch.ones(N)
            Dv = float(x["D"][c]) if x["D"] is not None else 0.
            for chunk in reversed(range((L + 255) // 256)):
                t0 = chunk * 256 + lanes * K
                pos = t0[:, None] + torch.arange(K)[None]
                u, dt, raw, reset, valid = inputs_at(x, b, c, pos, L, bias, softplus, x["seq_idx"])
                dy = torch.zeros(W, K); dy[valid] = dout[b, c, pos[valid]].double()
                if x["z"] is not None:
                    zz = torch.zeros(pos.shape); zz[valid] = x["z"][b, c, pos[valid]].double()
                    s = torch.sigmoid(zz)
                    fz = dy * s * (1 + zz * (1 - s)); dy = dy * zz * s
                dy = torch.where(valid, dy, torch.zeros(()))
                y = torch.zeros(W, K); du = torch.zeros(W, K); ddt = torch.zeros(W, K)
                for n in range(N):
                    An = float(A[c, n])
                    Bv = bc_at(x["B"], b, c, n, pos, L, d); Cv = bc_at(x["C"], b, c, n, pos, L, d)
                    a = torch.where(reset, torch.zeros(()), torch.exp(dt * An))
                    hb = dt * u * Bv
                    pa = torch.ones(W); pb = torch.zeros(W)
                    for i in range(K):
                        pb = a[:, i] * pb + hb[:, i]; pa = pa * a[:, i]
                    for off in (1, 2, 4, 8, 16):
                        oa, ob = shift_up(pa, off, 1.), shift_up(pb, off, 0.)
                        pb = pa * ob + pb; pa = pa * oa
                    ea, eb = shift_up(pa, 1, 1.), shift_up(pb, 1, 0.)
                    h_in = ea * saved[b, c, chunk, n] + eb
                    h = torch.zeros(W, K); hc = h_in
                    for i in range(K):
                        hc = a[:, i] * hc + hb[:, i]; h[:, i] = hc
                    y += Cv * h
                    a_next = shift_down(a[:, 0], 1, float(carry_a[n]))
                    P = torch.ones(W); Q = torch.zeros(W)
                    for i in reversed(range(K)):
                        alpha = a_next if i == K - 1 else a[:, i + 1]
                        Q = alpha * Q + Cv[:, i] * dy[:, i]; P = P * alpha
                    for off in (1, 2, 4, 8, 16):
                        oP, oQ = shift_down(P, off, 1.), shift_down(Q, off, 0.)
                        Q = P * oQ + Q; P = P * oP
                    xP, xQ = shift_down(P, 1, 1.), shift_down(Q, 1, 0.)
                    gg = xP * carry_g[n] + xQ
                    dA_l = torch.zeros(W)
                    for i in reversed(range(K)):
                        alpha = a_next if i == K - 1 else a[:, i + 1]
                        gg = alpha * gg + Cv[:, i] * dy[:, i]
                        hp = h[:, i - 1] if i > 0 else h_in
                        ga = gg * hp * a[:, i]
                        dBi = gg * dt[:, i] * u[:, i]; dCi = dy[:, i] * h[:, i]
                        du[:, i] += gg * dt[:, i] * Bv[:, i]
                        ddt[:, i] += gg * u[:, i] * Bv[:, i] + ga * An
                        dA_l += ga * dt[:, i]
                        m = valid[:, i]
                        p_i = pos[:, i][m]
                        for key, val in (("B", dBi), ("C", dCi)):
                            X = x[key]
                            if X.dim() == 2:
                                g[key][c, n] += val[m].sum()
                            elif X.dim() == 3:
                                g[key][b, n].index_add_(0, p_i, val[m])
                            else:
                                gi = c // (d // X.shape[1])
                                g[key][b, gi, n].index_add_(0, p_i, val[m])
                    carry_g[n] = gg[0]; carry_a[n] = a[0, 0]
                    g["A"][c, n] += dA_l.sum()
                du += Dv * dy
                if x["D"] is not None:
                    g["D"][c] += (dy * u)[valid].sum()
                if x["z"] is not None:
                    g["z"][b, c, pos[valid]] = (fz * (y + Dv * u))[valid]
                if softplus:
                    ddt = ddt * torch.sigmoid(raw)
                if x["delta_bias"] is not None:
                    g["delta_bias"][c] += ddt[valid].sum()
                g["u"][b, c, pos[valid]] = du[valid]
                g["delta"][b, c, pos[valid]] = ddt[valid]
            if x["initial_state"] is not None:
                g["initial_state"][b, c] = carry_a * carry_g
    return g


def check(b, d, n, L, bc=("var", "var"), flags=(1, 1, 1, 1, 1, 1), seed=0):
    z, D, bias, softplus, init, seq = flags
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float32)
    lay = {"var": lambda: r(b, n, L), "const": lambda: r(d, n), "g2": lambda: r(b, 2, n, L)}
    x = dict(u=r(b, d, L), delta=(0.5 * torch.rand(b, d, L, generator=gen) - 0.1).float(),
             A=(-0.5 - torch.rand(d, n, generator=gen)).float(), B=lay[bc[0]](), C=lay[bc[1]](),
             D=r(d) if D else None, z=r(b, d, L) if z else None,
             delta_bias=(0.5 * torch.rand(d, generator=gen)).float() if bias else None,
             initial_state=r(b, d, n) if init else None, seq_idx=None)
    if seq:
        s = torch.zeros(b, L, dtype=torch.int32)
        for cut in (1, 2, 255, 256, 257, 512, 513, L // 3):
            if cut < L:
                s[0, cut:] += 1
        x["seq_idx"] = s
    out, last, saved = fwd(x, bool(softplus))
    leaf = {k: (v.clone().requires_grad_() if v is not None and v.is_floating_point() else v) for k, v in x.items()}
    ro, rl = selective_scan_ref(**leaf, delta_softplus=bool(softplus), return_last_state=True)
    dout = r(b, d, L); dlast = r(b, d, n)
    names = [k for k, v in leaf.items() if v is not None and v.is_floating_point()]
    rg = torch.autograd.grad((ro * dout).sum() + (rl * dlast).sum(), [leaf[k] for k in names])
    print(f"b{b} d{d} n{n} L{L} {bc} {flags}: out {(out - ro.double()).abs().max():.2e} last {(last - rl.double()).abs().max():.2e}", end="")
    g = bwd(x, bool(softplus), saved, dout, dlast)
    worst = 0
    for k, ref in zip(names, rg):
        err = ((g[k] - ref.double()).abs().max() / (ref.abs().max() + 1e-6)).item()
        worst = max(worst, err)
        if err > 1e-4:
            print(f"\n   d{k}: rel err {err:.2e}", end="")
    print(f"  grads worst rel {worst:.2e}")


check(1, 2, 3, 7)
check(2, 2, 3, 600)
check(1, 3, 2, 1100, ("const", "var"), (0, 1, 0, 0, 1, 1))
check(1, 4, 2, 530, ("g2", "const"), (1, 0, 1, 1, 0, 1))
check(1, 2, 2, 1, flags=(1, 1, 1, 1, 1, 0))
check(1, 2, 2, 513, flags=(1, 1, 1, 1, 1, 1))
