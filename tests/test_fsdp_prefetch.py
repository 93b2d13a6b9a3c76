"""Under FSDP2 each decoder layer gathers the next one ahead, and the training it does is unchanged.

Two CPU processes over gloo shard a tiny Llama with LoRA as accelerate does (``tests/fsdp_prefetch_worker.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from helpers import run_two_cpu_processes
from hf_instruct_tune.errors import InputError
from hf_instruct_tune.fsdp_prefetch import PREFETCH_ENV, prefetch_depth

WORKER = Path(__file__).with_name("fsdp_prefetch_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """What two FSDP2 processes report after training with no explicit prefetch (depth 0), and with depth 1."""
    from hf_instruct_tune.testing.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("fsdp_prefetch")
    model_dir = save_tiny_checkpoint(root / "model")
    results = {}
    for depth in (0, 1):
        out = root / f"depth{depth}.pt"
        run_two_cpu_processes(WORKER, model_dir, out, depth, home=root / "hf_home")
        results[depth] = torch.load(out)
    return results


def test_each_layer_gathers_the_next_in_forward_and_the_previous_in_backward(runs):
    plan = runs[1]["prefetch"]
    layers = len(plan["forward"])
    assert layers == runs[1]["decoder_layers"] >= 2  # the sharded output head is not in the chain
    assert plan["forward"] == [[i + 1] for i in range(layers - 1)] + [[]]
    assert plan["backward"] == [[]] + [[i - 1] for i in range(1, layers)]
    assert runs[0]["prefetch"]["forward"] == [[]] * layers  # depth 0: FSDP2's own order


def test_prefetching_trains_the_same_adapter(runs):
    assert_close(torch.tensor(runs[1]["losses"]), torch.tensor(runs[0]["losses"]), rtol=1e-5, atol=1e-6)
    assert runs[1]["adapter"].keys() == runs[0]["adapter"].keys()
    for name, tensor in runs[0]["adapter"].items():
        assert_close(runs[1]["adapter"][name], tensor, rtol=1e-5, atol=1e-6)


def test_the_depth_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(PREFETCH_ENV, raising=False)
    assert prefetch_depth() == 2
    monkeypatch.setenv(PREFETCH_ENV, "1")
    assert prefetch_depth() == 1
    monkeypatch.setenv(PREFETCH_ENV, "ahead")
    with pytest.raises(InputError, match=PREFETCH_ENV):
        prefetch_depth()
