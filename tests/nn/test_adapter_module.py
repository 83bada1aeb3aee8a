"""``fastpeft.nn.adapter.BottleneckAdapter`` against a float64 re-implementation of AdapterHub's ``Adapter``.

The reference (tests/adapter_reference.py) is written from AdapterHub
``adapters`` 1.3's ``methods/modeling.py`` and takes the module's state dict
by AdapterHub's parameter names, so every test also checks the names. Every
configuration combination (ln_before, ln_after, adapter_residual_before_ln,
use_gating, scaling float / learned / channel, with and without a residual,
parallel) is compared in outputs and in the gradients of the input, the
residual and every parameter. The CPU path is used unless a test says
otherwise; the parity against AdapterHub itself lives with the checkpoint
tests.
"""
import itertools
import math

import pytest
import torch
from torch import nn

from adapter_reference import adapter_module_math, adapter_up_output, adapterhub_pre_forward
from fastpeft.nn.adapter import BottleneckAdapter, bottleneck_size_for
from fastpeft.nn.base import PEFT_LAYER_KINDS
from fastpeft.ops.adapter import adapter_dropout_mask
from numerics import assert_close_to_ref, reduction_floor


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


H = 24
BOOLS = (False, True)


def build(**cfg) -> BottleneckAdapter:
    """A module with every parameter randomised (an init like mam's zero up-projection would hide bugs)."""
    module = BottleneckAdapter(H, reduction_factor=cfg.pop("reduction_factor", 4), **cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.dim() == 1 and p.shape[0] in (1, H) else 0.0))
    return module


def expected_keys(ln_before=False, ln_after=False, use_gating=False, scaling=1.0, **_):
    """The state-dict keys of AdapterHub's ``Adapter`` for this configuration, in its order (from its
    ``__init__``; a module's own parameters, here ``scaling``, come before its children's)."""
    keys = ["scaling"] if isinstance(scaling, str) else []
    if ln_before:
        keys += ["adapter_norm_before.weight", "adapter_norm_before.bias", "adapter_down.0.weight",
                 "adapter_down.0.bias", "adapter_down.1.weight", "adapter_down.1.bias"]
    else:
        keys += ["adapter_down.0.weight", "adapter_down.0.bias"]
    keys += ["adapter_up.weight", "adapter_up.bias"]
    if ln_after:
        keys += ["adapter_norm_after.weight", "adapter_norm_after.bias"]
    if use_gating:
        keys += ["gate.weight", "gate.bias"]
    return keys


def reference_cfg(module: BottleneckAdapter) -> dict:
    return dict(ln_before=module.ln_before, ln_after=module.ln_after, use_gating=module.use_gating,
                adapter_residual_before_ln=module.adapter_residual_before_ln, non_linearity=module.non_linearity,
                scaling=module.scaling if not isinstance(module.scaling, nn.Parameter) else None,
                dropout=module.dropout)


def compare_with_reference(module, residual=True, lead=(2, 5), dtype=torch.float32, keep=None):
    module = module.to(dtype)
    x = torch.randn(*lead, H, dtype=dtype, requires_grad=True)
    r = torch.randn(*lead, H, dtype=dtype, requires_grad=True) if residual else None
    y = module(x, r)

    def reference(to):
        params = {k: v.detach().to(to).requires_grad_() for k, v in module.state_dict().items()}
        xr = x.detach().to(to).requires_grad_()
        rr = r.detach().to(to).requires_grad_() if residual else None
        out = adapter_module_math(params, reference_cfg(module), xr, None if module.is_parallel else rr, keep)
        return out, params, xr, rr

    ref, ref_params, x64, r64 = reference(torch.float64)
    peer, peer_params, x_peer, r_peer = reference(dtype)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close_to_ref(y, ref, peer, what="output")
    dy = torch.randn_like(y)
    names = [name for name, _ in module.named_parameters()]  # shared LayerNorm listed once
    tensors = [x] + ([r] if residual else []) + [dict(module.named_parameters())[n] for n in names]
    refs = [x64] + ([r64] if residual else []) + [ref_params[n] for n in names]
    peers = [x_peer] + ([r_peer] if residual else []) + [peer_params[n] for n in names]
    labels = ["x"] + (["residual"] if residual else []) + names
    got = torch.autograd.grad(y, tensors, dy, allow_unused=True)
    want = torch.autograd.grad(ref, refs, dy.double(), allow_unused=True)
    peer_grads = torch.autograd.grad(peer, peers, dy, allow_unused=True)
    # LayerNorm(s · v) does not depend on a scalar s: with adapter_norm_after right after the scaled output,
    # d scaling (learned) and the gate's gradients (the gate is one scalar per sequence) are zero up to rounding
    # and LayerNorm's eps, and a relative error would measure noise. There they are checked in absolute terms
    # against the size of the sum they come from (Cauchy-Schwarz bound ‖dy‖·‖s·up‖, times ‖x‖ for the gate's
    # weight: the sigmoid's slope is at most 1/4).
    invariant = module.ln_after and (module.is_parallel or not residual or not module.adapter_residual_before_ln)
    for label, g, g_ref, g_peer in zip(labels, got, want, peer_grads):
        noise_only = invariant and ((label == "scaling" and module.scaling_mode == "learned")
                                    or label.startswith("gate."))
        if g_ref is None:  # e.g. the residual of a parallel adapter
            assert g is None or torch.count_nonzero(g) == 0, label
        elif noise_only:
            bound = float(dy.double().norm() * module.adapter_output(x).detach().double().norm())
            if label == "gate.weight":
                bound *= float(x.detach().double().norm())
            assert float(g_ref.abs().max()) < 1e-3 * bound, f"the reference is not scale-invariant here ({label})"
            assert float((g.double() - g_ref).abs().max()) < 1e-5 * bound, f"d {label} {g} vs {g_ref}"
        elif label == "scaling":  # a sum over every row (and channel, when learned) of dy-side terms times up
            floor = reduction_floor(scaling_terms(module, x, r if residual else None, dy, keep), g_ref, dtype)
            assert_close_to_ref(g, g_ref, g_peer, tiny=max(1e-7, floor), what="d scaling")
        else:
            assert_close_to_ref(g, g_ref, g_peer, tiny=1e-7, what=f"d {label}")


def scaling_terms(module, x, r, dy, keep) -> torch.Tensor:
    """The float64 terms ``g ∘ u`` that d scaling sums, ``[rows (· channels), *scaling.shape]``.

    The reference runs with the scale broadcast to one leaf per element of
    the output, so its gradient is each term; the terms are then laid out by
    the scaling element they sum into.
    """
    params = {k: v.detach().double() for k, v in module.state_dict().items()}
    per_element = params["scaling"].expand(x.shape).clone().requires_grad_()
    params["scaling"] = per_element
    out = adapter_module_math(params, reference_cfg(module), x.detach().double(),
                              None if module.is_parallel or r is None else r.detach().double(), keep)
    terms, = torch.autograd.grad(out, per_element, dy.double())
    terms = terms.abs().reshape(-1, x.shape[-1])
    return terms.reshape(-1, 1) if module.scaling.numel() == 1 else terms


CONFIGS = [dict(ln_before=a, ln_after=b, adapter_residual_before_ln=c, use_gating=d, scaling=s)
           for a, b, c, d, s in itertools.product(BOOLS, BOOLS, BOOLS, BOOLS, (0.6, "learned", "channel"))]


def _id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
@pytest.mark.parametrize("residual", BOOLS, ids=["no_residual", "residual"])
def test_every_configuration_matches_the_float64_reference(cfg, residual):
    compare_with_reference(build(non_linearity="gelu", **cfg), residual=residual)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_state_dict_keys_are_adapterhubs(cfg):
    module = BottleneckAdapter(H, **cfg)
    assert list(module.state_dict()) == expected_keys(**cfg)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    b = module.bottleneck_size
    assert shapes["adapter_up.weight"] == (H, b)
    assert shapes[f"adapter_down.{1 if cfg['ln_before'] else 0}.weight"] == (b, H)
    if cfg["scaling"] == "learned":
        assert shapes["scaling"] == (1,)
    elif cfg["scaling"] == "channel":
        assert shapes["scaling"] == (H,)


@pytest.mark.parametrize("ln_after", BOOLS)
@pytest.mark.parametrize("use_gating", BOOLS)
def test_parallel_adapter_adds_no_residual(ln_after, use_gating):
    compare_with_reference(build(is_parallel=True, ln_after=ln_after, use_gating=use_gating, scaling=4.0),
                           residual=True)


@pytest.mark.parametrize("act", ["relu", "swish", "tanh", "leakyrelu", "gelu_new", "linear"])
def test_activations_and_bf16(act):
    compare_with_reference(build(non_linearity=act, ln_before=True, scaling="channel"), dtype=torch.bfloat16)


def test_two_dimensional_input():
    compare_with_reference(build(ln_after=True, scaling="learned"), lead=(7,))


def test_training_dropout_uses_the_ops_mask():
    module = build(ln_after=True, use_gating=True, dropout=0.3, scaling="channel")
    module.train()
    torch.manual_seed(21)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = adapter_dropout_mask((10, H), 0.3, seed, "cpu")
    x, r = torch.randn(2, 5, H), torch.randn(2, 5, H)
    torch.manual_seed(21)
    y = module(x, r)
    ref = adapter_module_math({k: v.double() for k, v in module.state_dict().items()}, reference_cfg(module),
                              x.double(), r.double(), keep)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    module.eval()
    ref_eval = adapter_module_math({k: v.double() for k, v in module.state_dict().items()}, reference_cfg(module),
                                   x.double(), r.double())
    torch.testing.assert_close(module(x, r).double(), ref_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ln_before", BOOLS)
def test_adapter_output_is_adapterhubs_scaled_up(ln_before):
    module = build(ln_before=ln_before, scaling="channel", dropout=0.5, use_gating=True)
    module.train()  # adapter_output applies no dropout even in training
    x = torch.randn(3, 4, H)
    ref = adapter_up_output({k: v.double() for k, v in module.state_dict().items()}, reference_cfg(module),
                            x.double())
    torch.testing.assert_close(module.adapter_output(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_triton_path_matches_reference(monkeypatch):
    monkeypatch.setenv("FASTPEFT_BACKEND", "triton")  # the kernels under the interpreter
    compare_with_reference(build(ln_before=True, ln_after=True, use_gating=True, scaling="learned",
                                 non_linearity="silu"), residual=True)


# --- pre_forward / post_forward ------------------------------------------------------------------------------


@pytest.mark.parametrize("residual_before_ln", [True, False, "post_add"])
@pytest.mark.parametrize("original_ln_before", BOOLS)
@pytest.mark.parametrize("query_before_ln", [None, True, False])
@pytest.mark.parametrize("with_ln", BOOLS)
def test_pre_forward_is_adapterhubs(residual_before_ln, original_ln_before, query_before_ln, with_ln):
    module = BottleneckAdapter(H, residual_before_ln=residual_before_ln, original_ln_before=original_ln_before)
    ln = nn.LayerNorm(H) if with_ln else None
    h, inp = torch.randn(2, 3, H), torch.randn(2, 3, H)
    want = adapterhub_pre_forward(h, inp, ln, residual_before_ln, original_ln_before, query_before_ln)
    if want[2] is None:  # no residual: AdapterHub's forward then fails on it; fastpeft says why up front
        with pytest.raises(ValueError, match="post_add"):
            module.pre_forward(h, inp, ln, query_before_ln)
        return
    got = module.pre_forward(h, inp, ln, query_before_ln)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(g, w)


def test_parallel_pre_forward_returns_the_block_input():
    module = BottleneckAdapter(H, is_parallel=True)
    h, inp = torch.randn(2, 3, H), torch.randn(2, 3, H)
    out, query, residual = module.pre_forward(h, inp, nn.LayerNorm(H), query_before_ln=True)
    assert out is inp and query is inp and residual is inp
    assert module.pre_forward(h, inp, None)[1] is None


def test_parallel_post_forward_adds_the_sublayer_output_first():
    """AdapterHub's ParallelAdapter.post_forward: (adapter out + sub-layer out), then the block's residual and LN."""
    module = BottleneckAdapter(H, is_parallel=True, original_ln_after=True)
    ln = nn.LayerNorm(H)
    adapter_out, sublayer_out, block_in = torch.randn(2, 3, H), torch.randn(2, 3, H), torch.randn(2, 3, H)
    got = module.post_forward(adapter_out, block_in, ln, input_hidden_states=sublayer_out)
    torch.testing.assert_close(got, ln(adapter_out + sublayer_out + block_in))
    with pytest.raises(ValueError, match="input_hidden_states"):
        module.post_forward(adapter_out, block_in, ln)


@pytest.mark.parametrize("original_ln_after", BOOLS)
@pytest.mark.parametrize("with_ln", BOOLS)
def test_post_forward_is_adapterhubs(original_ln_after, with_ln):
    module = BottleneckAdapter(H, original_ln_after=original_ln_after)
    ln = nn.LayerNorm(H) if with_ln else None
    h, inp = torch.randn(2, 3, H), torch.randn(2, 3, H)
    want = h if not original_ln_after else (ln(h + inp) if with_ln else h + inp)
    torch.testing.assert_close(module.post_forward(h, inp, ln), want)


# --- construction --------------------------------------------------------------------------------------------


def test_bottleneck_size_follows_adapterhub():
    assert BottleneckAdapter(768).bottleneck_size == 48
    assert BottleneckAdapter(768, reduction_factor=2).bottleneck_size == 384
    assert BottleneckAdapter(10, reduction_factor=2.5).bottleneck_size == 4
    assert BottleneckAdapter(8, reduction_factor=1000).bottleneck_size == 1
    assert BottleneckAdapter(768, bottleneck_size=64, reduction_factor=2).bottleneck_size == 64
    assert bottleneck_size_for(4096, 16) == 256


def test_bert_init():
    module = BottleneckAdapter(256, reduction_factor=2, init_weights="bert", use_gating=True, ln_before=True,
                               scaling="channel")
    for linear in (module.down_proj, module.adapter_up, module.gate):
        assert abs(linear.weight.std().item() - 0.02) < 0.003 and abs(linear.weight.mean().item()) < 0.003
        assert torch.count_nonzero(linear.bias) == 0
    assert torch.equal(module.adapter_norm_before.weight, torch.ones(256))
    assert torch.equal(module.scaling, torch.ones(256))


def test_mam_init_starts_as_the_identity_map():
    module = BottleneckAdapter(64, reduction_factor=2, init_weights="mam_adapter", non_linearity="relu")
    down = module.down_proj
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert down.weight.abs().max() <= bound and down.weight.std() > bound / 3
    assert torch.count_nonzero(down.bias) == 0
    assert torch.count_nonzero(module.adapter_up.weight) == 0 and torch.count_nonzero(module.adapter_up.bias) == 0
    x, r = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    assert torch.equal(module(x, r), r)


def test_houlsby_init():
    module = BottleneckAdapter(256, reduction_factor=2, init_weights="houlsby")
    for linear in (module.down_proj, module.adapter_up):
        assert linear.weight.abs().max() <= 0.02 and 0.007 < linear.weight.std() < 0.012
        assert torch.count_nonzero(linear.bias) == 0


def test_peft_layer_protocol_and_dtype_device():
    module = BottleneckAdapter(H, ln_before=True, ln_after=True, use_gating=True, scaling="learned",
                               dtype=torch.float64)
    assert module.peft_kind == "adapter" and BottleneckAdapter in PEFT_LAYER_KINDS["adapter"]
    params = module.peft_parameters()
    assert len(params) == len({id(p) for p in params}) == len(list(module.parameters()))
    assert all(p.dtype == torch.float64 for p in params)
    assert not module.merged
    with pytest.raises(TypeError, match="cannot be merged"):
        module.merge()
    assert "bottleneck_size=1," in repr(module)  # 24 // 16
    assert module.adapter_config()["scaling"] == "learned"


def test_loads_an_adapterhub_state_dict_strictly():
    source = build(ln_before=True, use_gating=True, scaling="channel")
    state = {k: v.clone() for k, v in source.state_dict().items()}
    target = BottleneckAdapter(H, reduction_factor=4, ln_before=True, use_gating=True, scaling="channel")
    target.load_state_dict(state, strict=True)
    x, r = torch.randn(2, 3, H), torch.randn(2, 3, H)
    torch.testing.assert_close(target(x, r), source(x, r))


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(bottleneck_size=0), "bottleneck_size must be a positive int"),
    (dict(reduction_factor=0), "reduction_factor must be a positive number"),
    (dict(non_linearity="softsign"), "activation 'softsign' is not supported"),
    (dict(scaling="sometimes"), "scaling must be a float, 'learned' or 'channel'"),
    (dict(init_weights="xavier"), "init_weights must be one of"),
    (dict(residual_before_ln="before"), "residual_before_ln must be True, False or 'post_add'"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_configuration_raises_naming_the_field(kwargs, match):
    kwargs = {"hidden_size": H, **kwargs}
    with pytest.raises(ValueError, match=match):
        BottleneckAdapter(kwargs.pop("hidden_size"), **kwargs)


def test_gate_values_without_gating_raises():
    with pytest.raises(RuntimeError, match="use_gating=False"):
        BottleneckAdapter(H).gate_values(torch.randn(1, 2, H))
