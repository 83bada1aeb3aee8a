"""Mixed precision: the LoRA / NF4 / QLoRA ops and layers under ``torch.autocast`` (torch's rule for ``linear``),
fp32 adapters on low-precision bases, and tiny Llama training under autocast and HF ``Trainer(bf16=True)``
with ``apply_lora``, the PEFT backend and ``apply_qlora``, against stock PEFT."""
import copy
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastpeft
from fastpeft.integrations.peft.backend import fastpeft_lora_config
from fastpeft.nn import LoRALinear, NF4Linear, QLoRALinear
from fastpeft.ops import lora_linear, nf4_linear, qlora_linear
from fastpeft.quant.nf4 import NF4Weight
from models import LLAMA_TARGETS, VOCAB, tiny_llama, token_ids
from numerics import assert_close_to_ref

BF16 = torch.bfloat16
AUTOCAST = dict(device_type="cpu", dtype=BF16)
QLORA_TARGETS = [t for t in LLAMA_TARGETS if t != "down_proj"]  # down_proj's in_features=96: not a blocksize


def _leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)


def _grads(out, tensors, dy):
    return torch.autograd.grad(out, tensors, dy)


def _as_autocast_sees(*tensors):
    """float64 copies of what autocast hands ``linear``: each input rounded to bf16."""
    return [t.detach().to(BF16).double().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("op", ["lora", "qlora", "nf4"])
def test_ops_under_autocast_follow_linears_rule(backend, op):
    m, k, n, r, s = 5, 64, 24, 4, 2.0
    x, bias = _leaf(2, m, k), _leaf(n)
    A, B = _leaf(r, k, scale=0.2), _leaf(n, r, scale=0.2)
    w_dense = torch.randn(n, k)
    w_nf4 = NF4Weight.from_float(w_dense, 64)
    w = w_nf4.dequantize(torch.float32) if op != "lora" else w_dense.requires_grad_(False)
    dy = torch.randn(2, m, n, dtype=torch.float64).to(BF16)

    def ours():
        if op == "lora":
            return lora_linear(x, w, A, B, s, bias=bias), (x, A, B, bias)
        if op == "qlora":
            return qlora_linear(x, w_nf4, A, B, s, bias=bias), (x, A, B, bias)
        return nf4_linear(x, w_nf4, bias), (x, bias)

    def math(x_, A_, B_, bias_, w_):
        y = F.linear(x_, w_, bias_)
        return y if op == "nf4" else y + s * (x_ @ A_.t()) @ B_.t()

    with torch.autocast(**AUTOCAST):
        out, inputs = ours()
        torch_out = math(x, A, B, bias, w)  # torch itself under autocast: the budget
    assert out.dtype == BF16 and torch_out.dtype == BF16
    grads = _grads(out, inputs, dy)
    torch_grads = _grads(torch_out, inputs, dy)
    for g, t in zip(grads, inputs):
        assert g.dtype == t.dtype == torch.float32  # gradients come back through the casts in fp32

    ref_inputs = _as_autocast_sees(x, A, B, bias)
    # A dense weight is cast to bf16 by autocast; an NF4 weight is dequantized by the kernel (exact in fp32).
    w_ref = w.detach().to(BF16).double() if op == "lora" else w.detach().double()
    ref = math(*ref_inputs, w_ref)
    ref_grads = _grads(ref, [ref_inputs[i] for i in ((0, 1, 2, 3) if op != "nf4" else (0, 3))], dy.double())
    assert_close_to_ref(out, ref, torch_out)
    for g, g_ref, g_torch in zip(grads, ref_grads, torch_grads):
        assert_close_to_ref(g, g_ref, g_torch, what="gradient")


def test_backward_inside_the_autocast_region():
    layer = LoRALinear.from_linear(nn.Linear(32, 16), r=4, init_lora_weights=False)
    x = torch.randn(3, 32)
    with torch.autocast(**AUTOCAST):
        layer(x).float().square().sum().backward()  # autocast still on during backward
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_A.weight.grad.isfinite().all()


@pytest.mark.parametrize("make", [
    lambda lin: LoRALinear.from_linear(lin, r=4, init_lora_weights=False),
    lambda lin: QLoRALinear.from_linear(lin, r=4, init_lora_weights=False),
    lambda lin: NF4Linear.from_linear(lin),
], ids=["lora", "qlora", "nf4"])
def test_fp32_layer_given_bf16_activations_computes_in_bf16(make):
    lin = nn.Linear(64, 24)
    layer = make(lin)
    x = torch.randn(3, 64, dtype=BF16, requires_grad=True)
    out = layer(x)
    assert out.dtype == BF16
    with torch.autocast(**AUTOCAST):  # the same computation, spelled by torch
        expected = layer(x.detach().float())
    assert torch.equal(out, expected)
    out.float().sum().backward()
    assert x.grad.dtype == BF16
    for p in layer.parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32


def test_merged_lora_layer_with_bf16_activations():
    layer = LoRALinear.from_linear(nn.Linear(32, 16), r=4, init_lora_weights=False)
    x = torch.randn(3, 32, dtype=BF16)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("lora_dtype", [torch.float32, None], ids=["fp32-adapters", "bf16-adapters"])
def test_fp32_adapters_on_bf16_base_under_autocast(lora_dtype):
    layer = LoRALinear.from_linear(nn.Linear(32, 16).to(BF16), r=4, init_lora_weights=False, lora_dtype=lora_dtype)
    x = torch.randn(3, 32)
    with torch.autocast(**AUTOCAST):
        out = layer(x)
    assert out.dtype == BF16
    out.float().sum().backward()
    assert layer.lora_B.weight.grad.dtype == (lora_dtype or BF16)


# --------------------------------------------------------------------------- tiny Llama training
def _train_losses(model, steps=4, lr=1e-2, autocast=True):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    ids = token_ids(batch=2, seq=9, seed=3)
    losses = []
    model.train()
    for _ in range(steps):
        with torch.autocast(**AUTOCAST, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _stock_peft(model, r=4, alpha=8, targets=LLAMA_TARGETS):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                            init_lora_weights=False))


def _copy_lora_from_peft(peft_model, ours):
    ours_layers = dict(fastpeft.injection.lora_modules(ours))
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
            key = name.replace("base_model.model.", "", 1)
            with torch.no_grad():
                ours_layers[key].lora_A.weight.copy_(module.lora_A["default"].weight)
                ours_layers[key].lora_B.weight.copy_(module.lora_B["default"].weight)


def _assert_tracks(losses, ref):
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # it trains
    for a, b in zip(losses, ref):
        assert abs(a - b) <= 2e-2 * abs(b), (losses, ref)


@pytest.fixture(scope="module")
def peft_reference_losses():
    peft_model = _stock_peft(tiny_llama(seed=5))
    start = copy.deepcopy(peft_model)
    return start, _train_losses(peft_model)


@pytest.mark.parametrize("injector", ["apply_lora", "peft_backend"])
def test_tiny_llama_trains_under_autocast_like_peft(injector, peft_reference_losses):
    start, ref = peft_reference_losses
    if injector == "apply_lora":
        model = fastpeft.apply_lora(tiny_llama(seed=5), LLAMA_TARGETS, r=4, lora_alpha=8)
        _copy_lora_from_peft(start, model)
    else:
        from peft import get_peft_model

        model = get_peft_model(tiny_llama(seed=5), fastpeft_lora_config(r=4, lora_alpha=8,
                                                                          target_modules=LLAMA_TARGETS))
        model.load_state_dict(start.state_dict())
    _assert_tracks(_train_losses(model), ref)


def test_tiny_llama_qlora_trains_under_autocast_like_peft():
    # The reference: stock PEFT on the same model whose targets hold the dequantized NF4 weights.
    model = fastpeft.apply_qlora(tiny_llama(seed=6), QLORA_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    dense = tiny_llama(seed=6)
    for name, layer in fastpeft.injection.lora_modules(model):
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(layer.base_layer.dequantize(torch.float32))
    peft_model = _stock_peft(dense, targets=QLORA_TARGETS)
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and isinstance(module.lora_A, nn.ModuleDict):
            ours = model.get_submodule(name.replace("base_model.model.", "", 1))
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(ours.lora_A.weight)
                module.lora_B["default"].weight.copy_(ours.lora_B.weight)
    _assert_tracks(_train_losses(model), _train_losses(peft_model))


# --------------------------------------------------------------------------- HF Trainer(bf16=True)
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=9):
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_loss(model, out_dir):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out_dir), bf16=True, use_cpu=True, per_device_train_batch_size=4,
                             max_steps=3, learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    logging.getLogger("transformers.trainer").setLevel(logging.ERROR)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
    result = trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], result.training_loss


def test_hf_trainer_bf16_with_apply_lora_and_qlora(tmp_path):
    peft_model = _stock_peft(tiny_llama(seed=7))
    start = copy.deepcopy(peft_model)
    ref_steps, _ = _trainer_loss(peft_model, tmp_path / "peft")
    ours = fastpeft.apply_lora(tiny_llama(seed=7), LLAMA_TARGETS, r=4, lora_alpha=8)
    _copy_lora_from_peft(start, ours)
    steps, _ = _trainer_loss(ours, tmp_path / "ours")
    assert len(steps) == len(ref_steps) == 3
    for a, b in zip(steps, ref_steps):
        assert abs(a - b) <= 2e-2 * abs(b), (steps, ref_steps)
    qlora = fastpeft.apply_qlora(tiny_llama(seed=7), QLORA_TARGETS, r=4, lora_alpha=8)
    q_steps, _ = _trainer_loss(qlora, tmp_path / "qlora")
    assert all(torch.isfinite(torch.tensor(q_steps)))
