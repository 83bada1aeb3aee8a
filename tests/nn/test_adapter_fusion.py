"""AdapterFusion layer: AdapterHub's attention over adapter outputs, against a float64 reference written here."""
from __future__ import annotations

import itertools

import pytest
import torch
from numerics import rel_err

from fastpeft.nn.adapter_fusion import AdapterFusion, resolve_fusion_config


def reference(fusion: AdapterFusion, query, ups, residual, T):
    """The fusion math spelled out in float64 with einsum (independent of the module's code path)."""
    c = fusion.config
    q, u, r = query.double(), ups.double(), residual.double()
    if c.residual_before:
        u = u + r[..., None, :]
    lin = lambda m, t: torch.einsum("...i,oi->...o", t, m.weight.double()) + (
        m.bias.double() if m.bias is not None else 0.0)
    qq = lin(fusion.query, q) if c.query else q
    kk = lin(fusion.key, u) if c.key else u
    vv = lin(fusion.value, u) if c.value and c.value_before_softmax else u
    p = torch.softmax(torch.einsum("...h,...nh->...n", qq, kk) / T, dim=-1)
    ctx = torch.einsum("...n,...nh->...h", p, vv)
    if c.value and not c.value_before_softmax:
        ctx = lin(fusion.value, ctx)
    return ctx if c.residual_before else ctx + r


def _perturb(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


SWITCHES = list(itertools.product([True, False], repeat=4))  # query, key, value, value_before_softmax


@pytest.mark.parametrize("query,key,value,value_before_softmax", SWITCHES)
@pytest.mark.parametrize("residual_before", [False, True])
def test_matches_float64_reference(query, key, value, value_before_softmax, residual_before):
    hidden, n = 24, 3
    f = AdapterFusion(hidden, "dynamic", query=query, key=key, value=value,
                      value_before_softmax=value_before_softmax, residual_before=residual_before)
    _perturb(f)
    q = torch.randn(2, 5, hidden)
    ups = torch.randn(2, 5, n, hidden)
    r = torch.randn(2, 5, hidden)
    ref = reference(f, q, ups, r, 1.0)
    out = f(q, ups, r)
    torch_err = rel_err(reference(f, q.float(), ups.float(), r.float(), 1.0).float(), ref)
    assert rel_err(out, ref) <= 4 * torch_err + 1e-6


def test_temperature_schedule_and_no_temperature():
    f = AdapterFusion(8, "dynamic", temperature=True)
    q, ups, r = torch.randn(3, 8), torch.randn(3, 2, 8), torch.randn(3, 8)
    for expected_t in (50.0, 49.95, 49.9):
        assert f.T == pytest.approx(expected_t)
        ref = reference(f, q, ups, r, expected_t)
        assert rel_err(f(q, ups, r), ref) < 1e-5
    f.T = 1.02
    f(q, ups, r)
    assert f.T == 1.0  # clipped at 1
    g = AdapterFusion(8, "static")
    g(q, ups, r)
    assert g.T == 1.0


def test_presets_and_parameter_names():
    dynamic = AdapterFusion(16, "dynamic")
    assert set(dynamic.state_dict()) == {"query.weight", "query.bias", "key.weight", "key.bias", "value.weight"}
    w = dynamic.value.weight
    assert torch.equal(torch.diagonal(w), torch.ones(16))
    assert torch.allclose(w - torch.diag(torch.diagonal(w)), torch.full_like(w, 1e-6) - torch.diag(torch.full((16,), 1e-6)))
    static = AdapterFusion(16, "static")
    assert set(static.state_dict()) == {"query.weight", "query.bias", "key.weight", "key.bias"}
    assert static.regularization_loss() is None
    none = AdapterFusion(16, "static", query=False, key=False)
    assert set(none.state_dict()) == {"dense.weight", "dense.bias"}  # AdapterHub creates it, unused


def test_regularization_loss_value():
    f = AdapterFusion(6, "dynamic")
    _perturb(f, 3)
    w = f.value.weight.detach().double()
    expected = 0.01 * ((torch.eye(6, dtype=torch.float64) - w) ** 2).sum()
    assert float(f.regularization_loss().detach()) == pytest.approx(float(expected), rel=1e-6)


def test_gradcheck_float64():
    f = AdapterFusion(5, "dynamic", value_before_softmax=False, residual_before=True).double()
    _perturb(f, 1)
    q = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    ups = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: f(a, b, c), (q, ups, r))


def test_every_parameter_gets_a_gradient():
    f = AdapterFusion(8, "dynamic")
    f(torch.randn(4, 8), torch.randn(4, 2, 8), torch.randn(4, 8)).square().sum().backward()
    for name, p in f.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_input():
    with pytest.raises(ValueError, match="unknown AdapterFusion config field"):
        resolve_fusion_config("dynamic", temprature=True)
    with pytest.raises(ValueError, match="unknown AdapterFusion preset"):
        AdapterFusion(8, "dynamc")
    with pytest.raises(ValueError, match="hidden_size"):
        AdapterFusion(0)
    with pytest.raises(ValueError, match="query"):
        AdapterFusion(8, query="yes")
    with pytest.raises(ValueError, match="dropout_prob"):
        AdapterFusion(8, dropout_prob=1.5)
    f = AdapterFusion(8)
    with pytest.raises(ValueError, match="adapter_outputs"):
        f(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="residual"):
        f(torch.randn(4, 8), torch.randn(4, 2, 8), torch.randn(3, 8))
