"""`emma-mamba bench latency` end to end on the tiny preset (a few small contexts; no timing assertions)."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from emma_mamba.bench.latency import (  # noqa: E402
    COMPILED, GRAPHS, GRAPHS_COMPILED, OURS, PEER, TRANSFORMER, CudaGraphDecoder, OursRunner, find_crossover)
from emma_mamba.cli import main  # noqa: E402


def test_crossover_rule_by_hand():
    C = [256, 512, 1024, 2048]
    # ours flat at 2 ms; transformer 1, 1.5, 3, 6 ms: faster from 1024 on, the zero between 512 and 1024
    r = find_crossover(C, [2.0, 2.0, 2.0, 2.0], [1.0, 1.5, 3.0, 6.0])
    assert r["ours_faster_from_context"] == 1024
    # (theirs - ours) is -0.5 at log2 C = 9 and +1 at 10: zero at 9 + 1/3
    assert r["interpolated_context"] == pytest.approx(2 ** (9 + 1 / 3))
    # faster at 512 but slower again at 1024 (noise): the crossover is where it stays faster
    r = find_crossover(C, [2.0, 1.0, 2.0, 2.0], [1.5, 1.5, 1.5, 6.0])
    assert r["ours_faster_from_context"] == 2048
    r = find_crossover(C, [2.0] * 4, [1.0] * 4)
    assert r["ours_faster_from_context"] is None and r["ours_faster_at_none"]
    r = find_crossover(C, [1.0] * 4, [2.0] * 4)
    assert r["ours_faster_from_context"] == 256 and r["ours_faster_at_all_measured"]


def test_bench_latency_cli_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "res" / "latency_cpu_tiny.json"
    plots = tmp_path / "plots"
    argv = ["bench", "latency", "--preset", "tiny", "--device", "cpu", "--contexts", "16", "40",
            "--batch-sizes", "1", "3", "--batch-context", "12", "--images", "1", "2", "--new-tokens", "3",
            "--warmup", "1", "--repeats", "2", "--threads", "1", "--peer", "--out", str(out),
            "--plots-dir", str(plots)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(argv) == 0
        # --threads 1 held for the command only (it used to stay: every later test ran on one thread)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["dtype"] == "float32" and res["backend"]
    for key in ("torch", "transformers", "platform", "loadavg_1_5_15_before"):
        assert key in res["machine"]
    sh = res["shapes"]
    assert sh["contexts"] == [16, 40] and sh["batch_sizes"] == [1, 3] and sh["image_tokens_per_image"] == 16
    assert sh["transformer_lm"]["attn_implementation"] == "sdpa"
    p = res["parameters"]
    assert abs(p["transformer_lm"] - p["mamba_lm"]) / p["mamba_lm"] < 0.05
    r = res["results"]
    for section in ("ttft", "decode", "throughput"):
        assert set(r[section]) == {OURS, TRANSFORMER, PEER}, section
    for name in (OURS, TRANSFORMER, PEER):
        ttft = r["ttft"][name]
        assert [x["images"] for x in ttft] == [1, 2]
        assert [x["image_tokens"] for x in ttft] == [16, 32]
        # the prompt is the chat text with each placeholder replaced by 16 visual tokens
        assert ttft[1]["prompt_tokens"] - ttft[0]["prompt_tokens"] == 16 + 1  # one more image, one more "\n"
        dec = r["decode"][name]
        assert [x["context"] for x in dec] == [16, 40]
        assert all(len(x["steps_s"]) == 3 and x["median_s"] > 0 for x in dec)
        thr = r["throughput"][name]
        assert [x["batch"] for x in thr] == [1, 3]
        assert all(x["context"] == 12 and x["tokens_per_s"] == pytest.approx(x["batch"] / x["median_s"])
                   for x in thr)
    # state bytes: constant for both Mamba paths, linear in the context for the KV cache
    ours = [x["state_bytes"] for x in r["decode"][OURS]]
    kv = [x["state_bytes"] for x in r["decode"][TRANSFORMER]]
    assert ours[0] == ours[1] > 0
    assert r["decode"][PEER][0]["state_bytes"] == r["decode"][PEER][1]["state_bytes"] > 0
    assert kv[1] * 16 == kv[0] * 40
    # the harness's own oracle: every cache path reproduces its model's full forward (fp32), the peer ours
    assert len(res["checks"]) == 4 and all(v < 1e-3 for v in res["checks"].values()), res["checks"]
    assert "crossover" in res and "ours_faster_from_context" in res["crossover"]
    assert set(res["ratios"]) >= {"decode_speedup_at_16", "decode_speedup_at_40", "tokens_per_s_ratio_batch_3"}
    if pytest.importorskip("matplotlib"):
        names = sorted(p.name for p in plots.iterdir())
        assert names == [f"latency_cpu_tiny_{s}.png" for s in ("decode", "memory", "throughput", "ttft")]
        for f in plots.iterdir():
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
        assert sorted(res["plots"]) == sorted(str(f) for f in plots.iterdir())


def test_bench_latency_on_a_mamba2_lm_with_its_transformers_peer(tmp_path):
    """--override lm.ssm_layer=mamba2: our Mamba-2 LM and transformers' Mamba2ForCausalLM on its weights, every
    cache path checked against its model's full forward and the peer against ours (res['checks'])."""
    out = tmp_path / "m2.json"
    argv = ["bench", "latency", "--preset", "tiny", "--override", "lm.ssm_layer=mamba2", "--override", "lm.headdim=16",
            "--device", "cpu", "--contexts", "16", "--batch-sizes", "1", "--batch-context", "12", "--images", "1",
            "--new-tokens", "2", "--warmup", "1", "--repeats", "1", "--threads", "1", "--peer", "--no-plots",
            "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["shapes"]["mamba_lm"]["ssm_layer"] == "mamba2" and res["shapes"]["mamba_lm"]["headdim"] == 16
    assert set(res["results"]["decode"]) == {OURS, TRANSFORMER, PEER}
    assert len(res["checks"]) == 4 and all(v < 1e-3 for v in res["checks"].values()), res["checks"]


def test_a_runner_out_of_memory_is_recorded_and_the_rest_measured(tmp_path, monkeypatch):
    """On a GPU the transformer's KV cache may not fit at the large batches: that point is recorded as out of
    memory, every other runner and point is still measured, and the crossover counts it as a loss."""
    from emma_mamba.bench import latency

    real_prefill = latency.TransformerRunner.prefill

    def prefill(self, ids=None, embeds=None, max_len=None):
        if ids is not None and (ids.shape[0] >= 3 or ids.shape[1] >= 40):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 42.00 GiB")
        return real_prefill(self, ids, embeds, max_len)

    monkeypatch.setattr(latency.TransformerRunner, "prefill", prefill)
    out = tmp_path / "lat.json"
    argv = ["bench", "latency", "--preset", "tiny", "--device", "cpu", "--contexts", "16", "40", "--batch-sizes",
            "1", "3", "--batch-context", "12", "--images", "1", "--new-tokens", "2", "--warmup", "1",
            "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    r = res["results"]
    t_dec, t_thr = r["decode"][TRANSFORMER], r["throughput"][TRANSFORMER]
    assert not t_dec[0].get("oom") and t_dec[0]["median_s"] > 0
    assert t_dec[1]["oom"] and t_dec[1]["median_s"] is None and "42.00 GiB" in t_dec[1]["error"]
    assert not t_thr[0].get("oom") and t_thr[1]["oom"]
    assert all(x["median_s"] > 0 for x in r["decode"][OURS] + r["throughput"][OURS])
    assert res["out_of_memory"] == [f"{TRANSFORMER} at batch 1, context 40", f"{TRANSFORMER} at batch 3, context 12"]
    assert "decode_speedup_at_16" in res["ratios"] and "decode_speedup_at_40" not in res["ratios"]
    # the out-of-memory context counts as ours faster there
    assert res["crossover"]["ours_faster_from_context"] in (16, 40)
    if pytest.importorskip("matplotlib"):
        assert len(res["plots"]) == 4


def test_crossover_with_out_of_memory_points():
    r = find_crossover([256, 512, 1024], [2.0, 2.0, 2.0], [1.0, 3.0, None])
    assert r["ours_faster_from_context"] == 512 and r["interpolated_context"] is not None
    r = find_crossover([256, 512, 1024], [2.0, 2.0, 2.0], [1.0, 1.5, None])
    assert r["ours_faster_from_context"] == 1024 and r["interpolated_context"] is None  # no line through an OOM
    r = find_crossover([256, 512], [None, 2.0], [1.0, 3.0])
    assert r["ours_faster_from_context"] == 512


@pytest.mark.parametrize("argv, msg", [
    (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    (["--contexts", "0", "8"], "argument --contexts: must be >= 1, got 0"),
    (["--new-tokens", "0"], "argument --new-tokens: must be >= 1, got 0"),
    (["--device", "tpu"], "expected cpu or cuda"),
    (["--compile", "--warmup", "0"], "need --warmup >= 1"),
    # refused when the options are parsed, before any model is built
    (["--contexts", "512", "256", "512"], "argument --contexts: given more than once: 512"),
    (["--batch-sizes", "2", "1", "2"], "argument --batch-sizes: given more than once: 2"),
    (["--images", "1", "1"], "argument --images: given more than once: 1"),
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
    (["--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
])
def test_bench_latency_bad_arguments(argv, msg, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "latency", "--device", "cpu", "--out", str(tmp_path / "x.json")] + argv)
    assert msg in f"{e.value.code} {capsys.readouterr().err}"
    assert not (tmp_path / "x.json").exists()


def test_bench_latency_bad_override(tmp_path, capsys):
    rc = main(["bench", "latency", "--device", "cpu", "--override", "lm.n_layers=3", "--out", str(tmp_path / "x.json")])
    assert rc == 2
    assert "unknown config key 'n_layers' at 'lm.n_layers' (did you mean 'n_layer'?)" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager-step", "compiled-step"])
def test_cuda_graph_decode_equals_eager(compile):
    """Replaying the captured step gives eager decoding's logits, also after a second prefill into the same
    static cache (the graph reads the cache in place)."""
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    torch.manual_seed(0)
    lm = MambaLM(MambaConfig(d_model=128, n_layer=2, vocab_size=512), device="cuda").eval()
    eager, graphs = OursRunner(lm), CudaGraphDecoder(lm, compile=compile)
    assert graphs.name == (GRAPHS_COMPILED if compile else GRAPHS)
    with torch.inference_mode():
        for seed in (1, 2):
            ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(seed)).cuda()
            la, ca = eager.prefill(ids=ids)
            lb, cb = graphs.prefill(ids=ids)
            for _ in range(5):
                tok = la.argmax(-1, keepdim=True)
                la, ca = eager.step(ca, tok)
                lb, cb = graphs.step(cb, tok)
                torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
    assert list(graphs.decoder.steps) == [2]


def test_bench_latency_compiled_decode_on_the_cpu(tmp_path):
    """--compile: our decode step through torch.compile is timed beside the eager one (decode and throughput,
    not TTFT: its prefill is ours), passes the same cache-vs-full-forward check, and is what the ratios use."""
    out = tmp_path / "latency.json"
    argv = ["bench", "latency", "--preset", "tiny", "--device", "cpu", "--contexts", "16", "--batch-sizes", "2",
            "--batch-context", "12", "--images", "1", "--new-tokens", "3", "--warmup", "1", "--repeats", "1",
            "--threads", "1", "--compile", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    r = res["results"]
    assert set(r["ttft"]) == {OURS, TRANSFORMER}
    assert set(r["decode"]) == set(r["throughput"]) == {OURS, COMPILED, TRANSFORMER}
    assert res["compile"] is True and res["ratios_of"] == COMPILED and "with_compile" in res["crossover"]
    # the eager-against-eager ratios beside the headline (the transformer never compiles): by hand from the rows
    d = {k: r["decode"][k][0]["median_s"] for k in (OURS, COMPILED, TRANSFORMER)}
    assert res["ratios"]["decode_speedup_at_16"] == pytest.approx(d[TRANSFORMER] / d[COMPILED])
    assert res["ratios_eager"]["decode_speedup_at_16"] == pytest.approx(d[TRANSFORMER] / d[OURS])
    assert res["checks"][f"{COMPILED}: cached decode vs full forward, max abs logit diff"] < 1e-3
    assert r["decode"][COMPILED][0]["state_bytes"] == r["decode"][OURS][0]["state_bytes"]


# ------------------------------------------------------------------------------------- audit regressions

def _blocks(module_list, norm):
    return sum(p.numel() for p in module_list.parameters()) + sum(p.numel() for p in norm.parameters())


def test_matched_transformer_of_an_untied_mamba_lm_has_an_untied_head_not_extra_layers():
    """With ``lm.tie_embeddings=false`` the Mamba LM carries a separate vocab x d head. The baseline must carry
    one too, and match the *blocks* (what a decode step runs besides the head), not spend the head's 25.7 M
    parameters on extra Llama layers (it used to get 12 layers against the tied case's 4: 3x the body)."""
    transformers = pytest.importorskip("transformers")
    from emma_mamba.models.baseline import matched_llama_config
    from emma_mamba.models.mamba import MambaConfig, MambaLM

    for tie in (True, False):
        mc = MambaConfig(d_model=512, n_layer=8, d_state=16, vocab_size=50280, tie_embeddings=tie)
        lc = matched_llama_config(mc)
        with torch.device("meta"):
            mamba = MambaLM(mc, device="meta")
            llama = transformers.LlamaForCausalLM(lc)
        # the head: tied on both sides or untied on both sides, the same shape
        assert (llama.lm_head.weight is llama.get_input_embeddings().weight) == tie
        assert (mamba.lm_head is None) == tie
        if not tie:
            assert tuple(llama.lm_head.weight.shape) == tuple(mamba.lm_head.weight.shape) == (50280, 512)
        ours, theirs = _blocks(mamba.layers, mamba.norm_f), _blocks(llama.model.layers, llama.model.norm)
        assert abs(theirs - ours) / ours < 0.05, (tie, ours, theirs, lc.num_hidden_layers)
        total_m = sum(p.numel() for p in mamba.parameters())
        total_l = sum(p.numel() for p in llama.parameters())
        assert abs(total_l - total_m) / total_m < 0.05


def test_transformer_runner_passes_its_cache_without_the_deprecation_shim():
    """The timed transformer step must not go through transformers' `past_key_values` deprecation shim (a
    FutureWarning + kwargs rewrite per call, ~60 us a step on a CPU, charged to the transformer only), and the
    cache must still be the one used (cached decode == full forward)."""
    import warnings

    from emma_mamba.bench.latency import TransformerRunner

    llama = _tiny_llama()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for kv in ("static", "dynamic"):
        r = TransformerRunner(llama, kv)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            _decode_equals_full_forward(r, ids, prompt=8)


def test_memory_plot_draws_each_runners_own_cuda_peak(tmp_path, monkeypatch):
    """On CUDA each row holds the absolute allocator peak (every model's weights and the states of the runners
    prefilled before it: the peer, prefilled after the transformer, carries the transformer's KV cache) and the
    runner's own increment. The memory plot must draw the runner's own: here the peer's own peak is flat while
    its absolute one grows with the transformer's KV cache."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from emma_mamba.bench import latency

    MiB = 2**20
    weights = 300 * MiB
    C = [256, 1024, 4096]
    kv = {c: c * 4096 for c in C}  # the transformer's K/V bytes at context c
    own = {OURS: 5 * MiB, PEER: 5 * MiB}

    def row(name, c, before, own_peak, state):
        return {"context": c, "batch": 1, "median_s": 1e-3, "tokens_per_s": 1e3, "steps_s": [1e-3],
                "state_bytes": state, "cuda_peak_allocated_bytes": before + own_peak,
                "cuda_resident_before_bytes": before, "cuda_peak_above_baseline_bytes": own_peak}

    decode = {  # order of the runners: ours, transformer (ours' state resident), peer (both resident)
        OURS: [row(OURS, c, weights, own[OURS], MiB) for c in C],
        TRANSFORMER: [row(TRANSFORMER, c, weights + MiB, kv[c] + 2 * MiB, kv[c]) for c in C],
        PEER: [row(PEER, c, weights + MiB + kv[c], own[PEER], MiB) for c in C],
    }
    res = {"model": "tiny", "device": "cuda", "dtype": "bfloat16", "machine": {"gpu": "Fake GPU"},
           "timing": {"threads": 1},
           "shapes": {"mamba_lm": {"ssm_layer": "mamba1", "n_layer": 2, "d_model": 64},
                      "transformer_lm": {"n_layer": 1, "hidden_size": 64, "kv_cache": "static"},
                      "image_tokens_per_image": 16, "batch_context": 256},
           "crossover": {"ours_faster_from_context": 256, "interpolated_context": None,
                         "ours_faster_at_all_measured": True},
           "results": {"decode": decode,
                       "ttft": {k: [{"image_tokens": 16, "median_s": 1e-2}] for k in decode},
                       "throughput": {k: [{"batch": 1, "tokens_per_s": 1e3}] for k in decode}}}
    drawn = []
    real_plot = Axes.plot

    def spy(self, x, y, *a, **kw):
        drawn.append((self.get_title(), kw.get("label"), list(y)))
        return real_plot(self, x, y, *a, **kw)

    monkeypatch.setattr(Axes, "plot", spy)
    latency.plot(res, str(tmp_path), "m")
    cuda_lines = {label: y for title, label, y in drawn if label and "CUDA" in label}
    peer = [y for label, y in cuda_lines.items() if "Mamba" in label and "transformers" in label]
    ours = [y for label, y in cuda_lines.items() if label.startswith("EMMA-Mamba")]
    theirs = [y for label, y in cuda_lines.items() if label.startswith("Transformer")]
    assert len(peer) == len(ours) == len(theirs) == 1, list(cuda_lines)
    assert peer[0] == pytest.approx([own[PEER] / MiB] * 3)  # flat: not the transformer's KV cache
    assert ours[0] == pytest.approx([own[OURS] / MiB] * 3)  # not the other models' weights
    assert theirs[0] == pytest.approx([(kv[c] + 2 * MiB) / MiB for c in C])  # its own growth is kept


def test_list_options_are_sorted_and_crossover_refuses_duplicates():
    import argparse

    from emma_mamba.bench import latency

    p = argparse.ArgumentParser()
    latency.add_arguments(p)
    args = p.parse_args(["--contexts", "1024", "256", "512", "--batch-sizes", "8", "1", "--images", "4", "1"])
    assert args.contexts == [256, 512, 1024] and args.batch_sizes == [1, 8] and args.images == [1, 4]
    assert latency.config_name(p.parse_args(["--size", "small", "--override", "lm.n_layer=2"])) == "tiny-small-custom"
    with pytest.raises(ValueError, match=r"more than once: \[256\]"):
        find_crossover([256, 256, 512], [10, 10, 10], [9, 11, 12])


def test_ctrl_c_writes_the_finished_sections_and_the_default_out(tmp_path, monkeypatch, run_cli):
    """Ctrl-C during the decode section: exit 130, one line, the checks and TTFT on disk with "interrupted"; the
    default --out is ./bench_results/, not the committed benchmarks/results/."""
    from emma_mamba.bench import latency

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(latency, "decode_latency", stop)
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["bench", "latency", "--preset", "tiny", "--device", "cpu", "--contexts", "16",
                          "--batch-sizes", "1", "--batch-context", "12", "--images", "1", "--new-tokens", "2",
                          "--warmup", "1", "--repeats", "1", "--threads", "1", "--no-plots"])
    out = tmp_path / "bench_results" / "latency_cpu_tiny.json"
    assert rc == 130
    assert err.strip().splitlines() == [f"interrupted (the finished sections are in {out.relative_to(tmp_path)})"]
    res = json.loads(out.read_text())
    assert res["interrupted"] is True and res["complete"] is False and len(res["checks"]) == 2
    assert [x["images"] for x in res["results"]["ttft"][OURS]] == [1]
    assert not any(res["results"]["decode"].values()) and "crossover" not in res
    assert {"argv", "loadavg_1_5_15_before", "loadavg_1_5_15_after", "cpu_isa"} <= set(res["machine"])
    assert not (tmp_path / "benchmarks").exists()


def _decode_equals_full_forward(r, ids, prompt):
    """Runner ``r``'s prefill of ``ids[:, :prompt]`` and its steps through the rest give its full forward's logits
    at every position (the oracle: one cache-free forward); returns the last state."""
    full = r.full(ids)
    logits, state = r.prefill(ids=ids[:, :prompt], max_len=16)
    torch.testing.assert_close(logits, full[:, prompt - 1], rtol=1e-4, atol=1e-4)
    for i in range(prompt, ids.shape[1]):
        logits, state = r.step(state, ids[:, i:i + 1])
        torch.testing.assert_close(logits, full[:, i], rtol=1e-4, atol=1e-4)
    return state


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                   attn_implementation="sdpa", tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_transformer_graph_runner_buffers_and_positions_on_the_cpu():
    """transformer+graphs (with --cuda-graphs the headline compares graphs with graphs): its prefill runs the
    context's last token through the step it captures, then every step copies the token into the static buffer
    and replays. Here the replay is the step run eagerly (capture=False: the same buffers, positions and logits):
    each step's logits equal the model's full forward at that position (batch 1 and 2), and its state is the eager
    runner's StaticCache of the same size."""
    from emma_mamba.bench.latency import TRANSFORMER_GRAPHS, TransformerGraphRunner, TransformerRunner

    llama = _tiny_llama()
    r, eager = TransformerGraphRunner(llama, capture=False), TransformerRunner(llama, "static")
    assert r.name == TRANSFORMER_GRAPHS and r.optional
    with torch.inference_mode():
        for b in (1, 2):
            ids = torch.randint(0, 128, (b, 14), generator=torch.Generator().manual_seed(b))
            state = _decode_equals_full_forward(r, ids, prompt=8)
            _, cache = eager.prefill(ids=ids[:, :8], max_len=16)
            assert r.state_bytes(state, 8) == eager.state_bytes(cache, 8) > 0
            assert r.allocated_bytes(state) == eager.allocated_bytes(cache)
        with pytest.raises(ValueError, match="needs token ids"):
            r.prefill(embeds=torch.zeros(1, 4, 32))


@pytest.mark.gpu
def test_transformer_graph_runner_replays_the_eager_steps():
    """On a GPU: the captured transformer step replayed gives the eager step's logits (the graph reads the token
    buffer and advances the cache's position in place)."""
    from emma_mamba.bench.latency import TransformerGraphRunner, TransformerRunner

    llama = _tiny_llama().cuda()
    graphs, eager = TransformerGraphRunner(llama), TransformerRunner(llama, "static")
    with torch.inference_mode():
        for seed in (1, 2):
            ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(seed)).cuda()
            la, ca = eager.prefill(ids=ids, max_len=32)
            lb, cb = graphs.prefill(ids=ids, max_len=32)
            torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)
            for _ in range(6):
                tok = la.argmax(-1, keepdim=True)
                la, ca = eager.step(ca, tok)
                lb, cb = graphs.step(cb, tok)
                torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4)


def test_an_optional_runner_that_fails_is_reported_and_left_out():
    """A runner marked optional (the transformer's graph capture, which an older transformers release may not
    allow) that raises is recorded with its error, in the checks and in a decode point, and the others are
    measured; a runner that is not optional still stops the run."""
    from emma_mamba.bench import latency

    class Broken(latency.TransformerRunner):
        name, optional = "broken", True

        def prefill(self, ids=None, embeds=None, max_len=None):
            raise RuntimeError("operation not permitted when stream is capturing")

    llama = _tiny_llama()
    runners = [latency.TransformerRunner(llama, "static"), Broken(llama, "static")]
    failed = {}
    with torch.inference_mode():
        checks = latency.consistency_checks(runners, 128, torch.device("cpu"), failed=failed)
        assert failed == {"broken": "RuntimeError: operation not permitted when stream is capturing"}
        assert list(checks) == [f"{TRANSFORMER}: cached decode vs full forward, max abs logit diff"]
        rows = latency.decode_latency(runners, latency._Clock(torch.device("cpu")), 1, 12, 2, 1, 128,
                                      torch.Generator().manual_seed(0), torch.device("cpu"))
    assert rows["broken"]["failed"] and rows["broken"]["median_s"] is None and "capturing" in rows["broken"]["error"]
    assert rows[TRANSFORMER]["median_s"] > 0
    Broken.optional = False
    with torch.inference_mode(), pytest.raises(RuntimeError, match="capturing"):
        latency.consistency_checks(runners, 128, torch.device("cpu"), failed={})


def test_failed_consistency_checks_mark_the_ratios_not_valid(tmp_path, monkeypatch, capsys):
    """A cached decode path that disagrees with its full forward (here: our step's logits shifted) still writes
    its timings, but the JSON says checks_ok / ratios_valid false and the run prints a warning."""
    from emma_mamba.bench import latency

    real_step = latency.OursRunner.step
    monkeypatch.setattr(latency.OursRunner, "step", lambda self, c, t: (real_step(self, c, t)[0] + 1.0, c))
    out = tmp_path / "lat.json"
    argv = ["bench", "latency", "--preset", "tiny", "--device", "cpu", "--contexts", "16", "--batch-sizes", "1",
            "--batch-context", "12", "--images", "1", "--new-tokens", "2", "--warmup", "1", "--repeats", "1",
            "--threads", "1", "--no-plots", "--out", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["checks_ok"] is False and res["ratios_valid"] is False and res["ratios"]
    assert res["checks"][f"{OURS}: cached decode vs full forward, max abs logit diff"] > res["checks_tolerance"]
    assert "the timings below are not valid" in capsys.readouterr().out
