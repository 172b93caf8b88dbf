"""Mutation round 4 (training/parallel.py): sync_replicated_grads *averages* the gradients of the parameters FSDP
leaves whole (as FSDP averages its shards'), a missing gradient counting as zero, and leaves them alone without a
process group; wrap_model("fsdp") broadcasts those parameters from rank 0. Two gloo processes (torchrun),
gradients set by hand, the mean computed by hand; rank 0's initial values rebuilt on each rank from its seed.

(tests/training/test_distributed.py's FSDP probe checks that both ranks agree after the sync, which a sum would
also give; only its slow-tier runs compare the values.)"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from emma_mamba.training.parallel import sync_replicated_grads
from tests.conftest import tree_env

PROBE = r'''
import json, sys, torch
from torch import nn
from emma_mamba.models.mamba import MambaConfig, MambaLM
from emma_mamba.training.parallel import destroy_distributed, init_distributed, sync_replicated_grads, wrap_model

info = init_distributed("cpu")
r = info.rank
cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=32, d_state=4)
torch.manual_seed(100)  # the seed rank 0 builds its model with, below
rank0_dt_bias = [block.mixer.dt_proj.bias.detach().clone() for block in MambaLM(cfg).layers]
torch.manual_seed(100 + r)  # each process initialises its own (random) dt biases
wrapped = nn.Module()
wrapped.lm = MambaLM(cfg)
wrap_model(wrapped, "fsdp", info)
broadcast = all(torch.equal(block.mixer.dt_proj.bias.detach(), want)
                for block, want in zip(wrapped.lm.layers, rank0_dt_bias))
model = nn.Module()
a, b, c = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2, 2)), nn.Parameter(torch.zeros(2))
a.grad = torch.tensor([1.0, 2.0, 3.0]) * (r + 1)      # rank 0: 1 2 3, rank 1: 2 4 6
b.grad = torch.full((2, 2), 4.0 * r - 1.0)             # rank 0: -1, rank 1: 3
if r == 1:
    c.grad = torch.tensor([8.0, -2.0])                 # rank 0 has none: counts as zero
model._replicated_params = [a, b, c]
sync_replicated_grads(model)
sys.stdout.write("PROBE " + json.dumps({"rank": r, "a": a.grad.tolist(), "b": b.grad.tolist(),
                                        "c": c.grad.tolist(), "broadcast": broadcast}) + "\n")
sys.stdout.flush()
destroy_distributed()
'''


def test_replicated_parameters_are_rank_0s_and_their_gradients_averaged(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = tree_env()  # the processes run the emma_mamba this test imports
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    rows = [json.loads(x.split("PROBE ", 1)[1]) for x in r.stdout.splitlines() if "PROBE " in x]
    assert sorted(row["rank"] for row in rows) == [0, 1]
    for row in rows:  # the mean of the two ranks' gradients, by hand
        assert row["a"] == [1.5, 3.0, 4.5]
        assert row["b"] == [[1.0, 1.0], [1.0, 1.0]]
        assert row["c"] == [4.0, -1.0]
        assert row["broadcast"]  # the whole (replicated) dt biases are rank 0's on both processes


def test_without_a_process_group_nothing_changes():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, -1.0])
    m = nn.Module()
    m._replicated_params = [p]
    sync_replicated_grads(m)
    assert p.grad.tolist() == [3.0, -1.0]
