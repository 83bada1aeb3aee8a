"""LoRA-FA: the op that keeps h instead of x (equal to LoRA's op with A frozen, on both backends, with less saved),
fastpeft.create_lorafa_optimizer against HF PEFT's (the same steps on twin models), the checkpoint PEFT loads as
plain LoRA, and the errors raised before anything changes."""
import json

import pytest
import torch
from peft import PeftModel
from peft.optimizers import create_lorafa_optimizer as peft_lorafa

import fastpeft
from fastpeft.ops import lora_linear
from fastpeft.variants.lorafa import lorafa_linear
from models import LLAMA_TARGETS, tiny_llama, token_ids
from variants.peft_twins import our_name, twins


def operands(dtype, bias, m=12, k=40, n=24, r=4):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, m // 2, k, generator=g, dtype=dtype).requires_grad_()
    weight, lora_A = torch.randn(n, k, generator=g, dtype=dtype), torch.randn(r, k, generator=g, dtype=dtype)
    lora_B = torch.randn(n, r, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(n, generator=g, dtype=dtype).requires_grad_() if bias else None
    return x, weight, lora_A, lora_B, b


def run(op, args, dy, dropout_p, **kw):
    x, weight, lora_A, lora_B, bias = args
    torch.manual_seed(11)  # the same dropout seed for both ops
    y = op(x, weight, lora_A, lora_B, 0.5, bias, dropout_p, **kw)
    grads = torch.autograd.grad(y, [t for t in (x, lora_B, bias) if t is not None], dy)
    return y, grads


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [False, True])
def test_op_equals_lora_op_with_A_frozen(backend, dropout_p, bias):
    dtype = torch.float64 if backend == "cpu" else torch.float32
    args = operands(dtype, bias)
    dy = torch.randn(2, 6, 24, dtype=dtype)
    y, grads = run(lorafa_linear, args, dy, dropout_p)
    y_ref, grads_ref = run(lora_linear, args, dy, dropout_p, training=True)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs (parameters excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.untyped_storage().nbytes():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_layer_saves_h_not_x(dropout_p):
    m, k, r = 64, 256, 4
    base = torch.nn.Linear(k, 96)
    layer = fastpeft.nn.LoRALinear.from_linear(base, r=r, lora_dropout=dropout_p, init_lora_weights=False).train()
    x = torch.randn(m, k, requires_grad=True)  # x requires grad, as inside a model: plain LoRA saves it
    plain = saved_bytes(lambda: layer(x))
    layer.lora_A.weight.requires_grad_(False)
    frozen_plain = saved_bytes(lambda: layer(x))
    fastpeft.variants.lorafa.use_lorafa(layer)
    lorafa = saved_bytes(lambda: layer(x))
    assert frozen_plain == plain  # the plain op keeps x whether or not A trains
    assert plain - lorafa >= (k - r) * m * 4
    # h, and nothing else but dropout's 8-byte seed (the mask is drawn again from it)
    assert lorafa == m * r * 4 + (8 if dropout_p else 0)


def test_optimizer_takes_peft_steps(monkeypatch):
    """PEFT's rule in fp32 is the oracle (PEFT forms the projection under bf16 autocast where bf16 exists)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
    monkeypatch.setattr("peft.optimizers.lorafa.is_bf16_available", lambda: False)
    ours, theirs = twins(tiny_llama, LLAMA_TARGETS)
    opt_ours = fastpeft.create_lorafa_optimizer(ours, lr=1e-2, weight_decay=0.1)
    opt_theirs = peft_lorafa(theirs, lr=1e-2, weight_decay=0.1)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
        {our_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert all(layer.variant.name == "lorafa" for _, layer in fastpeft.injection.lora.lora_modules(ours))
    ids = token_ids(batch=2, seq=9)
    ours.train(), theirs.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(ids, labels=ids).loss.backward()
            opt.step()
    theirs_params = {our_name(n): p for n, p in theirs.named_parameters()}
    for name, p in ours.named_parameters():
        if "lora_" in name:
            # each step moves B by about lr = 1e-2; float32 noise through Adam (eps 1e-6) stays far below it
            torch.testing.assert_close(p, theirs_params[name], rtol=1e-4, atol=1e-4)
    assert all(not torch.equal(p, before[n]) for n, p in ours.named_parameters() if n in before)


def test_saved_as_plain_lora_that_peft_loads(tmp_path):
    model = fastpeft.apply_lora(tiny_llama(), LLAMA_TARGETS, r=4, init_lora_weights=False)
    fastpeft.create_lorafa_optimizer(model, lr=1e-3)
    fastpeft.save_lora(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config.get("use_dora")
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_errors_before_any_change():
    plain = tiny_llama()
    with pytest.raises(ValueError, match="LoRA layers"):
        fastpeft.create_lorafa_optimizer(plain, lr=1e-3)
    model = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2)
    for bad in (dict(lr=-1.0), dict(lr=1e-3, weight_decay=-0.5)):
        with pytest.raises(ValueError, match=next(reversed(bad))):
            fastpeft.create_lorafa_optimizer(model, **bad)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    x, weight, lora_A, lora_B, _ = operands(torch.float32, False)
    with pytest.raises(ValueError, match="lora_A"):
        lorafa_linear(x, weight, lora_A.requires_grad_(), lora_B, 0.5)
