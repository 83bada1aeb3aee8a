"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with LoRA and QLoRA layers: two processes on gloo (CPU)
give the gradients and updates of one process on the whole batch; full state dicts round-trip.

Frozen NF4 weights are replicated, on purpose: ``NF4Linear`` keeps the packed
bytes and scales in buffers, and ``fully_shard`` shards parameters only, so
every rank holds the whole 4-bit weight (an eighth of a bf16 copy) and no
all-gather is spent on it; the LoRA pairs, the frozen dense base weights and
biases are sharded (DTensor) as usual.

The workers are this file run as a script (``python tests/test_fsdp.py ...``),
so each process imports only torch and fastpeft.
"""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

WORLD = 2
BATCH = 8
STEP_LR = 0.5


def build(method: str) -> nn.Module:
    import fastpeft

    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 128), nn.ReLU()), nn.Sequential(nn.Linear(128, 64), nn.ReLU()),
                          nn.Linear(64, 8))
    targets = ["0.0", "1.0"]
    if method == "lora":
        return fastpeft.apply_lora(model, targets, r=4, init_lora_weights=False)
    return fastpeft.apply_qlora(model, targets, r=4, init_lora_weights=False, double_quant=True)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 64, generator=g)


def train_step(model, x):
    """Loss, backward and one SGD step; returns the gradients (before the step) by parameter name."""
    loss = model(x).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(STEP_LR * p.grad)
    return grads


def worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for method in ("lora", "qlora"):
        model = build(method)
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        rows = BATCH // WORLD
        grads = train_step(model, batch()[rank * rows:(rank + 1) * rows])
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results[method] = {
            "grads": {n: g.full_tensor() for n, g in grads.items()},
            "param_kinds": {n: type(p).__name__ for n, p in model.named_parameters()},
            "buffers": {n: (type(b).__name__, b.clone()) for n, b in model.named_buffers()},
            "state_dict": full,
        }
        assert all(isinstance(p, DTensor) for p in model.parameters())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(out_dir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_two_ranks_give_the_gradients_and_update_of_one(two_ranks, method):
    single = build(method)
    grads = train_step(single, batch())
    assert {n for n, p in single.named_parameters() if p.requires_grad} == set(grads)
    assert len(grads) == 4  # two LoRA pairs; everything else frozen
    for rank in range(WORLD):
        sharded = two_ranks[rank][method]
        assert set(sharded["grads"]) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(sharded["grads"][name], g, rtol=1e-5, atol=1e-7)
        if rank != 0:
            assert sharded["state_dict"] == {}  # cpu_offload: the full state dict lands on rank 0 only
            continue
        # the full state dict after the step equals the single process's model after its step
        state = single.state_dict()
        assert set(sharded["state_dict"]) == set(state)
        for name, value in state.items():
            torch.testing.assert_close(sharded["state_dict"][name], value, rtol=1e-5, atol=1e-7)


def test_nf4_weights_are_replicated_and_everything_else_sharded(two_ranks):
    for rank in range(WORLD):
        qlora = two_ranks[rank]["qlora"]
        assert all(kind == "DTensor" for kind in qlora["param_kinds"].values())
        assert {n for n, (kind, _) in qlora["buffers"].items() if kind != "Tensor"} == set()
        nf4 = [n for n in qlora["buffers"] if n.endswith(".base_layer.weight")]
        assert len(nf4) == 2
        for name, (_, value) in qlora["buffers"].items():  # whole and identical on every rank
            assert torch.equal(value, two_ranks[0]["qlora"]["buffers"][name][1])
            assert torch.equal(value, build("qlora").get_buffer(name))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_full_state_dict_loads_into_a_plain_model(two_ranks, method):
    plain = build(method)
    plain.load_state_dict(two_ranks[0][method]["state_dict"])
    reference = build(method)
    train_step(reference, batch())
    x = torch.randn(3, 64)
    torch.testing.assert_close(plain(x), reference(x), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker(int(sys.argv[1]), sys.argv[2])
