"""apply_adapter / apply_adapter_fusion / set_adapter_drop on tiny transformers models (CPU path).

The placement formulas are checked at one location against float64 formulas
written out here and against AdapterHub's BottleneckLayer math (tests/adapter_reference.py); the swapped
blocks are checked to reproduce the original model exactly when the adapter
adds nothing; AdapterHub parity itself is in tests/integrations/adapterhub.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from adapter_reference import adapterhub_location_math
from models import tiny_bert, tiny_gpt2, tiny_llama, token_ids
from numerics import rel_err
from torch import nn

import fastpeft.nn.adapter as adapter_module
from fastpeft.injection.adapter import (adapter_fusion_regularization_loss, adapter_layers, adapter_parameters,
                                        apply_adapter, apply_adapter_fusion, set_active_adapter, set_adapter_drop)
from fastpeft.injection.adapter_location import AdapterLayer, LayerDropGate
from fastpeft.injection.adapter_placement import new_bottleneck_adapter
from fastpeft.nn.adapter_config import ADAPTER_PRESETS, resolve_bn_config


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


def tiny_roberta(seed=0):
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=70, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return RobertaModel(cfg).eval()


def tiny_mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = MistralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return MistralForCausalLM(cfg).eval()


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


BUILDERS = [tiny_bert, tiny_roberta, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2]


def _out(model, ids):
    r = model(input_ids=ids)
    return r.logits if hasattr(r, "logits") else r.last_hidden_state


def _zero_up(model):
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for a in layer.adapters.values():
                a.adapter_up.weight.zero_()
                a.adapter_up.bias.zero_()


# --- placement formulas at one location ---------------------------------------------------------------------

def _adapter64(cfg, hidden=12):
    a = new_bottleneck_adapter(cfg, hidden, 0).double()
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return a


def _A(a, z):
    """s · up(act(down(z))) in float64 (the adapter branch, no LayerNorms/gate in these configs)."""
    down = a.down_proj
    act = {"relu": torch.relu, "swish": F.silu}[a.non_linearity]
    return a.scaling * F.linear(act(F.linear(z, down.weight, down.bias)), a.adapter_up.weight, a.adapter_up.bias)


@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
@pytest.mark.parametrize("post_ln", [True, False])
def test_location_formulas(preset, post_ln):
    cfg = resolve_bn_config(preset)
    a = _adapter64(cfg)
    layer = AdapterLayer("output_adapter", 0, LayerDropGate()).double()
    layer.add_adapter("x", a, cfg)
    layer.set_active("x")
    ln = nn.LayerNorm(12).double() if post_ln else None
    if ln is not None:
        with torch.no_grad():
            ln.weight.add_(0.2 * torch.randn(12, dtype=torch.float64))
    h, x = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 12, dtype=torch.float64)
    norm = ln if ln is not None else (lambda t: t)
    if preset == "seq_bn":  # Pfeiffer: post-LN LN(x + h + A(LN(h + x))), pre-LN x + h + A(x + h)
        expected = norm(x + h + _A(a, norm(h + x)))
    elif preset == "double_seq_bn":  # Houlsby: LN(x + h + A(h))
        expected = norm(x + h + _A(a, h))
    else:  # parallel: LN(x + h + s·A(x)), scaling 4 inside _A
        expected = norm(x + h + _A(a, x))
    assert rel_err(layer(h, x, ln), expected) < 1e-12


BOOLS = (False, True)
PLACEMENTS = list(itertools.product([True, False, "post_add"], BOOLS, BOOLS, BOOLS))  # residual, ln before/after, par
# (ln_before, ln_after, use_gating, adapter_residual_before_ln): every branch of where the module adds its residual
MODULE_FIELDS = [(False, False, False, False), (True, True, True, True), (False, True, False, False),
                 (False, True, False, True), (False, False, True, False), (True, False, False, True)]


@pytest.mark.parametrize("post_ln", BOOLS)
@pytest.mark.parametrize("placement", PLACEMENTS, ids=str)
def test_model_path_and_module_path_agree_with_adapterhub(placement, post_ln):
    """Every placement and module config: the location a model runs (AdapterLayer), the module's own
    pre_forward/forward/post_forward and AdapterHub's BottleneckLayer math (float64) give one result."""
    residual_before_ln, original_ln_before, original_ln_after, is_parallel = placement
    torch.manual_seed(0)
    ln = nn.LayerNorm(12).double() if post_ln else None
    h, x = torch.randn(2, 3, 12, dtype=torch.float64), torch.randn(2, 3, 12, dtype=torch.float64)
    for ln_before, ln_after, use_gating, adapter_residual_before_ln in MODULE_FIELDS:
        cfg = resolve_bn_config("seq_bn", residual_before_ln=residual_before_ln,
                                original_ln_before=original_ln_before, original_ln_after=original_ln_after,
                                is_parallel=is_parallel, ln_before=ln_before, ln_after=ln_after, use_gating=use_gating,
                                adapter_residual_before_ln=adapter_residual_before_ln, scaling="channel")
        adapter = _adapter64(cfg)
        layer = AdapterLayer("output_adapter", 0, LayerDropGate()).double()
        layer.add_adapter("x", adapter, cfg)
        layer.set_active("x")
        ref_cfg = dict(cfg.to_dict(), scaling=None)
        want = adapterhub_location_math({k: v.detach() for k, v in adapter.state_dict().items()}, ref_cfg, h, x, ln)
        if want is None:  # AdapterHub's residual is undefined here; both paths say why instead
            with pytest.raises(ValueError, match="post_add"):
                layer(h, x, ln)
            with pytest.raises(ValueError, match="post_add"):
                adapter.pre_forward(h, x, ln)
            continue
        h_in, _, residual = adapter.pre_forward(h, x, ln)
        module_path = adapter.post_forward(adapter(h_in, residual), x, ln, input_hidden_states=h)
        model_path = layer(h, x, ln)
        assert rel_err(model_path, want) < 1e-12, cfg
        assert torch.equal(model_path, module_path), cfg


def test_post_add_residual_is_refused_where_adapterhub_has_none():
    """AdapterHub leaves a 'post_add' residual undefined without a block LayerNorm it applies: refused up front."""
    for builder, original_ln_before in ((tiny_llama, True), (tiny_gpt2, True), (tiny_bert, False)):
        model = builder()
        keys = set(model.state_dict())
        with pytest.raises(ValueError, match="post_add"):
            apply_adapter(model, "seq_bn", residual_before_ln="post_add", original_ln_before=original_ln_before)
        assert adapter_layers(model) == [] and set(model.state_dict()) == keys
    apply_adapter(tiny_bert(), "seq_bn", residual_before_ln="post_add", original_ln_before=True)  # where it exists


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("preset", ["seq_bn", "double_seq_bn", "par_bn"])
def test_swapped_blocks_reproduce_the_model_when_the_adapter_adds_nothing(builder, preset):
    ids = token_ids()
    model = builder()
    with torch.no_grad():
        before = _out(model, ids)
    base_keys = set(model.state_dict())
    apply_adapter(model, preset, name="t")
    _zero_up(model)
    with torch.no_grad():
        assert torch.equal(_out(model, ids), before)
    keys = set(model.state_dict())
    assert base_keys <= keys  # base parameter names unchanged
    assert all(".adapters.t." in k for k in keys - base_keys)


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda b: b.__name__)
def test_only_the_adapter_trains_and_every_adapter_parameter_gets_a_gradient(builder):
    model = builder()
    apply_adapter(model, "double_seq_bn", name="t", scaling="learned")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.t." in n for n in trainable)
    _out(model, token_ids()).square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0 or "adapter_down" in n, n  # bert init: up weights non-zero


def test_adapter_changes_the_output_and_leave_out():
    ids = token_ids()
    model = tiny_llama()
    with torch.no_grad():
        before = _out(model, ids)
    apply_adapter(model, "seq_bn", name="t", leave_out=[1])
    with torch.no_grad():
        assert rel_err(_out(model, ids), before) > 1e-4
    layers = {layer.layer_idx for _, layer in adapter_layers(model) if "t" in layer.adapters}
    assert layers == {0}


def test_bf16_model_gets_bf16_adapters():
    model = tiny_llama(dtype=torch.bfloat16)
    apply_adapter(model, "par_bn")
    assert {p.dtype for p in adapter_parameters(model)} == {torch.bfloat16}
    assert _out(model, token_ids()).dtype == torch.bfloat16


def test_second_adapter_freezes_the_first_and_switching_active():
    ids = token_ids()
    model = tiny_bert()
    apply_adapter(model, "seq_bn", name="a")
    apply_adapter(model, "par_bn", name="b", init_weights="bert")
    assert all(not p.requires_grad for p in adapter_parameters(model, "a"))
    assert all(p.requires_grad for p in adapter_parameters(model, "b"))
    with torch.no_grad():
        out_b = _out(model, ids)
        set_active_adapter(model, "a")
        out_a = _out(model, ids)
        set_active_adapter(model, None)
        out_none = _out(model, ids)
    reference = tiny_bert()
    with torch.no_grad():
        assert torch.equal(out_none, _out(reference, ids))
    assert rel_err(out_a, out_b) > 1e-4


# --- errors: before anything changes ------------------------------------------------------------------------

def _snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kwargs,match", [
    (dict(config="seq_bn", reduction_facor=4), "reduction_facor"),
    (dict(config="pfeifer"), "unknown adapter preset"),
    (dict(config={"mh_adapter": True}), "required adapter config field"),
    (dict(config="seq_bn", non_linearity="relu7"), "non_linearity"),
    (dict(config="seq_bn", scaling="big"), "scaling"),
    (dict(config="seq_bn", residual_before_ln="pre_add"), "residual_before_ln"),
    (dict(config="seq_bn", init_weights="xavier"), "init_weights"),
    (dict(config="seq_bn", dropout=1.0), "dropout"),
    (dict(config="seq_bn", leave_out=[0, 7]), "leave_out"),
    (dict(config="seq_bn", leave_out=[0, 1]), "every layer"),
    (dict(config="seq_bn", phm_layer=True), "phm_layer"),
    (dict(config="seq_bn", mh_adapter=False, output_adapter=False), "nowhere"),
    (dict(config="seq_bn", reduction_factor=0), "reduction_factor"),
    (dict(config="seq_bn", name="a.b"), "name"),
])
def test_bad_config_raises_and_leaves_the_model_untouched(kwargs, match):
    model = tiny_bert()
    apply_adapter(model, "seq_bn", name="first")
    before = _snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        apply_adapter(model, **kwargs)
    assert _snapshot(model) == before


def test_name_in_use_and_unsupported_model():
    model = tiny_gpt2()
    apply_adapter(model, "seq_bn", name="a")
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_adapter(model, "par_bn", name="a")
    from transformers import T5Config, T5Model

    t5 = T5Model(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=r"supported model types: \['bert', 'roberta', 'gpt2', 'llama'"):
        apply_adapter(t5)
    with pytest.raises(ValueError, match="supported model types"):
        apply_adapter(nn.Linear(4, 4))


def test_unexpected_block_structure_is_rejected_untouched():
    model = tiny_llama()
    model.model.layers[1].extra = nn.Linear(2, 2)
    before = _snapshot(model)
    with pytest.raises(TypeError, match="layer 1"):
        apply_adapter(model)
    assert _snapshot(model) == before


def test_presets_have_adapterhub_values():
    assert resolve_bn_config("seq_bn").original_ln_before and not resolve_bn_config("seq_bn").mh_adapter
    houlsby = resolve_bn_config("double_seq_bn")
    assert houlsby.mh_adapter and houlsby.output_adapter and houlsby.non_linearity == "swish"
    par = resolve_bn_config("par_bn")
    assert (par.is_parallel, par.scaling, par.reduction_factor, par.init_weights) == (True, 4.0, 2, "mam_adapter")
    assert resolve_bn_config("scaled_par_bn").scaling == "learned"
    assert ADAPTER_PRESETS["pfeiffer"] == ADAPTER_PRESETS["seq_bn"]


# --- AdapterDrop --------------------------------------------------------------------------------------------

@pytest.fixture
def op_calls(monkeypatch):
    calls = []
    real = adapter_module.bottleneck_adapter

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_module, "bottleneck_adapter", counting)
    return calls


def test_skip_layers_costs_nothing_and_gives_the_plain_block(op_calls):
    ids = token_ids()
    model = tiny_bert()
    apply_adapter(model, "double_seq_bn")  # 2 layers x 2 locations
    with torch.no_grad():
        _out(model, ids)
    assert len(op_calls) == 4
    op_calls.clear()
    set_adapter_drop(model, skip_layers=[0, 1])
    with torch.no_grad():
        assert torch.equal(_out(model, ids), _out(tiny_bert(), ids))
    assert op_calls == []
    set_adapter_drop(model, skip_layers=[0])
    with torch.no_grad():
        _out(model, ids)
    assert len(op_calls) == 2


def test_random_drop_in_training_only_and_per_layer(op_calls):
    ids = token_ids()
    model = tiny_llama()
    apply_adapter(model, "double_seq_bn")
    set_adapter_drop(model, adapter_drop_p=1.0)
    model.train()
    with torch.no_grad():
        _out(model, ids)
    assert op_calls == []
    model.eval()
    with torch.no_grad():
        _out(model, ids)
    assert len(op_calls) == 4  # eval ignores adapter_drop_p
    model.train()
    set_adapter_drop(model, adapter_drop_p=0.5)
    counts = set()
    torch.manual_seed(0)
    for _ in range(12):
        op_calls.clear()
        with torch.no_grad():
            _out(model, ids)
        counts.add(len(op_calls))
    assert counts <= {0, 2, 4} and len(counts) >= 2  # both locations of a layer drop together
    set_adapter_drop(model, adapter_drop_p={0: 1.0})  # explicit schedule: only layer 0
    op_calls.clear()
    with torch.no_grad():
        _out(model, ids)
    assert len(op_calls) == 2


@pytest.mark.parametrize("builder", [tiny_bert, tiny_llama], ids=lambda b: b.__name__)
def test_random_drop_applies_when_only_the_output_location_has_an_adapter(builder, op_calls):
    """seq_bn has no mh_adapter: the layer's draw must not depend on the first location holding an adapter."""
    model = builder()
    apply_adapter(model, "seq_bn")
    set_adapter_drop(model, adapter_drop_p=1.0)
    model.train()
    with torch.no_grad():
        _out(model, token_ids())
    assert op_calls == []


_DROP_PLACEMENTS = {
    "seq_bn": "seq_bn", "par_bn": "par_bn", "scaled_par_bn": "scaled_par_bn", "double_seq_bn": "double_seq_bn",
    "attention_only_seq": {"mh_adapter": True, "output_adapter": False, "reduction_factor": 4,
                           "non_linearity": "relu"},
    "attention_only_par": {"mh_adapter": True, "output_adapter": False, "is_parallel": True, "reduction_factor": 4,
                           "non_linearity": "relu", "residual_before_ln": False},
}


@pytest.mark.parametrize("builder", [tiny_bert, tiny_llama, tiny_gpt2], ids=lambda b: b.__name__)
@pytest.mark.parametrize("placement", _DROP_PLACEMENTS)
def test_adapter_drop_applies_to_every_placement(builder, placement, op_calls, monkeypatch):
    """Issue 19 item 4's siblings: the drop decision is the layer's whatever locations hold an adapter
    (output-only sequential/parallel, attention-only, both): p=1 drops all in training, eval ignores p,
    p=0.5 drops a layer's adapters together. The gate is backend-independent; the CPU path keeps it fast."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
    layers = 2
    model = builder()
    apply_adapter(model, _DROP_PLACEMENTS[placement])
    ids = token_ids()
    model.eval()
    with torch.no_grad():
        _out(model, ids)
    per_forward = len(op_calls)
    assert per_forward >= layers  # the placement runs an adapter in every layer
    set_adapter_drop(model, adapter_drop_p=1.0)
    model.train()
    op_calls.clear()
    with torch.no_grad():
        _out(model, ids)
    assert op_calls == []
    model.eval()
    op_calls.clear()
    with torch.no_grad():
        _out(model, ids)
    assert len(op_calls) == per_forward
    set_adapter_drop(model, adapter_drop_p=0.5)
    model.train()
    counts = set()
    for _ in range(12):
        op_calls.clear()
        with torch.no_grad():
            _out(model, ids)
        counts.add(len(op_calls))
    assert counts <= {k * per_forward // layers for k in range(layers + 1)} and len(counts) >= 2


def test_adapter_drop_bad_input():
    model = tiny_bert()
    with pytest.raises(ValueError, match="no adapters"):
        set_adapter_drop(model, skip_layers=[0])
    apply_adapter(model)
    with pytest.raises(ValueError, match="skip_layers"):
        set_adapter_drop(model, skip_layers=[2])
    with pytest.raises(ValueError, match="adapter_drop_p"):
        set_adapter_drop(model, adapter_drop_p=1.5)
    with pytest.raises(ValueError, match="adapter_drop_p"):
        set_adapter_drop(model, adapter_drop_p={5: 0.1})


# --- AdapterFusion in a model ---------------------------------------------------------------------------------

def test_fusion_trains_only_the_fusion_layer_and_regulariser():
    ids = token_ids()
    model = tiny_gpt2()
    apply_adapter(model, "seq_bn", name="a")
    apply_adapter(model, "seq_bn", name="b", non_linearity="swish")
    with torch.no_grad():
        single = _out(model, ids)
    apply_adapter_fusion(model, ["a", "b"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter_fusion_layer.a,b." in n for n in trainable)
    out = _out(model, ids)
    assert rel_err(out, single) > 1e-6
    loss = out.square().mean() + adapter_fusion_regularization_loss(model)
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    values = [m.adapter_fusion_layer["a,b"].value.weight for _, m in adapter_layers(model)
              if "a,b" in m.adapter_fusion_layer]
    expected = sum(0.01 * (torch.eye(64) - w.detach()).square().sum() for w in values)
    assert float(adapter_fusion_regularization_loss(model).detach()) == pytest.approx(float(expected), rel=1e-6)


def test_fusion_bad_input():
    model = tiny_bert()
    apply_adapter(model, "seq_bn", name="a")
    apply_adapter(model, "double_seq_bn", name="h")
    with pytest.raises(ValueError, match="at least two"):
        apply_adapter_fusion(model, ["a"])
    with pytest.raises(ValueError, match="no adapter called"):
        apply_adapter_fusion(model, ["a", "zzz"])
    with pytest.raises(ValueError, match="unknown AdapterFusion config field"):
        apply_adapter_fusion(model, ["a", "h"], temprature=True)
    apply_adapter_fusion(model, ["a", "h"])  # only the output locations hold both
    fused = [layer.location_key for _, layer in adapter_layers(model) if layer.adapter_fusion_layer]
    assert fused == ["output_adapter", "output_adapter"]


def test_new_adapters_follow_the_models_eval_mode():
    ids = token_ids()
    model = tiny_bert()  # eval mode
    apply_adapter(model, "seq_bn", name="a", dropout=0.5)
    apply_adapter(model, "seq_bn", name="b")
    apply_adapter_fusion(model, ["a", "b"], dropout_prob=0.5)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(_out(model, ids), _out(model, ids))
    model.train()
    assert all(m.training for m in model.modules())


def test_triton_path_gives_the_cpu_paths_result(monkeypatch):
    """The placements call the fused op; under the Triton interpreter its kernels run instead of the CPU path."""
    ids = token_ids(batch=1, seq=5)
    model = tiny_llama()
    apply_adapter(model, "double_seq_bn", name="t")
    _perturb_adapters(model)
    with torch.no_grad():
        cpu = _out(model, ids)
        monkeypatch.setenv("FASTPEFT_BACKEND", "triton")
        triton = _out(model, ids)
        monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")
        reference = _out(model.double(), ids)
    assert rel_err(triton, reference) <= 4 * rel_err(cpu, reference) + 1e-6


def _perturb_adapters(model):
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=lambda b: b.__name__)
def test_gradient_checkpointing_recomputes_the_wrapped_blocks(builder, monkeypatch):
    ids = token_ids()
    grads = []
    for checkpointed in (False, True):
        model = builder()
        torch.manual_seed(3)
        apply_adapter(model, "double_seq_bn", name="t")
        _perturb_adapters(model)
        calls = []
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            for _, m in model.named_modules():
                if getattr(m, "gradient_checkpointing", False):
                    real = m._gradient_checkpointing_func
                    m._gradient_checkpointing_func = lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k)
        model.train()
        r = model(input_ids=ids, use_cache=False)
        r.logits.square().mean().backward()
        grads.append([p.grad.clone() for p in adapter_parameters(model)])
        assert len(calls) == (2 if checkpointed else 0)  # both wrapped blocks went through the checkpoint
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
