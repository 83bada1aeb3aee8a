"""fastpeft against AdapterHub ``adapters`` 1.3 (run in its side env): outputs, gradients and checkpoints.

For every case of ``adapterhub_cases.CASES`` (seq_bn, double_seq_bn, par_bn,
scaled_par_bn and variants with LayerNorms, gating, channel/learned scaling,
post_add residuals, leave_out; AdapterFusion dynamic and a variant; BERT and
Llama; both checkpoint directions), fastpeft's float32 output, input-embedding
gradient and trainable-parameter gradients must be within 4x AdapterHub's own
float32 error (+1e-5) of AdapterHub's float64 result.
"""
from __future__ import annotations

import json

import pytest
import torch
from adapterhub_cases import CASES, CASES_BY_ID
from conftest import build_model, run_fastpeft
from numerics import assert_close_to_ref

from fastpeft.injection.adapter import adapter_layers
from fastpeft.integrations.adapterhub import load_adapter, load_adapter_fusion
from fastpeft.nn.adapter_config import resolve_bn_config
from fastpeft.nn.adapter_fusion import resolve_fusion_config


# Gradients of scalar scalings and gates are sums over every token and channel with cancellation: their float32
# error depends on summation order, so the budget gets a 1e-5 relative floor (semantic errors are >= 1e-3 here).
TINY = 1e-5


def _compare(ours: dict, ref: dict) -> None:
    ref_keys = {k[len("f32."):] for k in ref if k.startswith("f32.")}
    assert set(ours) == ref_keys, f"trained tensors differ: only fastpeft {sorted(set(ours) - ref_keys)}, " \
                                  f"only AdapterHub {sorted(ref_keys - set(ours))}"
    for key, value in ours.items():
        assert_close_to_ref(value, ref[f"f64.{key}"], ref[f"f32.{key}"], c=4.0, tiny=TINY, what=key)


def _load_into_fastpeft(case, parity, prefix: str):
    model = build_model(case.model)
    d = parity.case_dir(case.id)
    names = [load_adapter(model, d / f"{prefix}-{a.name}") for a in case.adapters]
    if case.fusion:
        load_adapter_fusion(model, d / f"{prefix}-fusion")
    return model, names


def _trainable(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.kind == "hub_to_fastpeft"])
def test_adapterhub_checkpoint_loads_and_matches(parity, case_id):
    case = CASES_BY_ID[case_id]
    model, names = _load_into_fastpeft(case, parity, "hub")
    marker = ".adapter_fusion_layer." if case.fusion else f".adapters.{names[-1]}."
    trainable = _trainable(model)
    assert trainable and all(marker in n for n in trainable), sorted(trainable)[:5]
    _compare(run_fastpeft(model, parity.inputs[f"{case.model}.ids"], parity.inputs[f"{case.model}.weight"]),
             parity.results(case_id))


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.kind == "fastpeft_to_hub"])
def test_fastpeft_checkpoint_loads_in_adapterhub_and_matches(parity, case_id):
    case = CASES_BY_ID[case_id]
    ref = parity.results(case_id)
    model, _ = _load_into_fastpeft(case, parity, "fastpeft")
    params = dict(model.named_parameters())
    loaded = {k[len("param."):]: v for k, v in ref.items() if k.startswith("param.")}
    assert loaded, "AdapterHub trained no parameter after loading"
    for name, value in loaded.items():
        assert torch.equal(params[name].detach(), value), f"{name}: AdapterHub loaded other values"
    _compare(run_fastpeft(model, parity.inputs[f"{case.model}.ids"], parity.inputs[f"{case.model}.weight"]), ref)


@pytest.mark.parametrize("case_id", [c.id for c in CASES if c.kind == "hub_to_fastpeft"])
def test_presets_match_adapterhub_configs(parity, case_id):
    case = CASES_BY_ID[case_id]
    d = parity.case_dir(case.id)
    for ad in case.adapters:
        saved = json.loads((d / f"hub-{ad.name}" / "adapter_config.json").read_text())
        assert resolve_bn_config(ad.preset, **ad.overrides).to_dict() == saved["config"]
    if case.fusion:
        saved = json.loads((d / "hub-fusion" / "adapter_fusion_config.json").read_text())
        assert resolve_fusion_config(case.fusion).to_dict() == saved["config"]
        assert saved["adapter_names"] == [a.name for a in case.adapters]


def test_adapterhub_key_names_are_fastpeft_module_paths(parity):
    """Every tensor AdapterHub saved is a parameter of the fastpeft model at the same path."""
    from safetensors.torch import load_file

    case = CASES_BY_ID["bert-fusion_dynamic-hub_to_fastpeft"]
    model, _ = _load_into_fastpeft(case, parity, "hub")
    state = model.state_dict()
    d = parity.case_dir(case.id)
    for file in (d / "hub-a" / "adapter.safetensors", d / "hub-fusion" / "model_adapter_fusion.safetensors"):
        for key, value in load_file(str(file)).items():
            assert torch.equal(state[key], value), key
    assert len(adapter_layers(model)) == 4  # 2 layers x (attention.output, output)
