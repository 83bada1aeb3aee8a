"""One AdapterHub run per test session: build the inputs, run the side-env driver once, hand the results to the tests.

The ``parity`` fixture (session scope) writes the tiny models' base weights
and the inputs, makes the adapters fastpeft saves for the
``fastpeft_to_hub`` cases, runs ``adapterhub_driver.py`` once in the side env
for every case (one subprocess: the import of transformers/adapters is paid
once), and returns where everything is. Building the side env (first run on a
machine, about a minute) happens here too; when it fails the tests fail.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import adapterhub_cases as parity_cases  # noqa: E402
import adapterhub_env  # noqa: E402

DRIVER = Path(__file__).with_name("adapterhub_driver.py")


def build_model(model: str, seed: int = 0):
    """The case model in the test env (transformers 5), from the same config as the driver builds."""
    import transformers

    spec = parity_cases.MODEL_SPECS[model]
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = getattr(transformers, spec["model_class"])(config)
    return m.eval()


def randomize(params: dict, seed: int) -> None:
    """The driver's perturbation (``p += 0.1 · N(0, 1)``, seeded), for adapters fastpeft creates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in params.items():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def run_fastpeft(model, ids: torch.Tensor, weight: torch.Tensor) -> dict:
    """Forward/backward as the driver does: output, input-embedding grad, grads of the trainable parameters."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    embeds = embeds.clone().requires_grad_(True)
    result = model(inputs_embeds=embeds)
    output = result.logits if hasattr(result, "logits") else result.last_hidden_state
    (output * weight).sum().backward()
    out = {"output": output.detach(), "grad.inputs_embeds": embeds.grad.detach()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[f"grad.{name}"] = p.grad.detach().clone()
    return out


@dataclass
class Parity:
    root: Path
    inputs: dict

    def case_dir(self, case_id: str) -> Path:
        return self.root / case_id

    def results(self, case_id: str) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.case_dir(case_id) / "adapterhub.safetensors"))


def _make_fastpeft_adapters(case, directory: Path) -> dict:
    """fastpeft side of a ``fastpeft_to_hub`` case: apply, perturb, save; returns the directories."""
    from fastpeft.injection.adapter import adapter_parameters, apply_adapter, apply_adapter_fusion
    from fastpeft.integrations.adapterhub import save_adapter, save_adapter_fusion

    model = build_model(case.model)
    names = []
    for ad in case.adapters:
        apply_adapter(model, ad.preset, name=ad.name, **ad.overrides)
        names.append(ad.name)
    params = {n: p for n, p in model.named_parameters()
              if any(f".adapters.{a}." in n for a in names)}
    if case.fusion:
        apply_adapter_fusion(model, names, case.fusion)
        params.update({n: p for n, p in model.named_parameters() if ".adapter_fusion_layer." in n})
    randomize(params, case.seed)
    adapter_dirs = []
    for name in names:
        d = directory / f"fastpeft-{name}"
        save_adapter(model, d, name)
        adapter_dirs.append(str(d))
    entry = {"adapter_dirs": adapter_dirs}
    if case.fusion:
        d = directory / "fastpeft-fusion"
        save_adapter_fusion(model, d, ",".join(names))
        entry["fusion_dir"] = str(d)
    return entry


@pytest.fixture(autouse=True)
def _cpu_path(monkeypatch):
    """The fused op on its CPU path: these tests check semantics against AdapterHub; the Triton kernels are
    checked against float64 in tests/kernels (under the interpreter, their fp32 summation order makes the
    ill-conditioned gate-weight gradients of the gated case differ from AdapterHub's by more than 4x its own
    float32 error, while float64 agrees to 1e-13)."""
    monkeypatch.setenv("FASTPEFT_BACKEND", "cpu")


@pytest.fixture(scope="session")
def parity(tmp_path_factory) -> Parity:
    root = tmp_path_factory.mktemp("adapterhub")
    models_json, inputs = {}, {}
    g = torch.Generator().manual_seed(1234)
    for name in parity_cases.MODEL_SPECS:
        model = build_model(name)
        weights = root / f"{name}-base.safetensors"
        save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(weights))  # untie
        models_json[name] = dict(parity_cases.MODEL_SPECS[name], weights=str(weights))
        ids = torch.randint(0, model.config.vocab_size, (parity_cases.BATCH, parity_cases.SEQ), generator=g)
        with torch.no_grad():
            result = model(input_ids=ids)
        out = result.logits if hasattr(result, "logits") else result.last_hidden_state
        inputs[f"{name}.ids"] = ids
        inputs[f"{name}.weight"] = torch.randn(out.shape, generator=g)
    save_file(inputs, str(root / "inputs.safetensors"))

    job_cases = []
    for case in parity_cases.CASES:
        d = root / case.id
        d.mkdir()
        entry = {"id": case.id, "model": case.model, "kind": case.kind, "seed": case.seed,
                 "out": str(d / "adapterhub.safetensors")}
        if case.kind == "hub_to_fastpeft":
            entry["adapters"] = [{"name": a.name, "config": a.hub_config(), "save_dir": str(d / f"hub-{a.name}"),
                                  "safetensors": a.safetensors} for a in case.adapters]
            if case.fusion:
                entry["fusion"] = {"config": case.fusion, "save_dir": str(d / "hub-fusion")}
        else:
            entry.update(_make_fastpeft_adapters(case, d))
        job_cases.append(entry)
    job = root / "job.json"
    job.write_text(json.dumps({"models": models_json, "inputs": str(root / "inputs.safetensors"),
                               "cases": job_cases}, indent=1))
    try:
        adapterhub_env.run_in_side_env(DRIVER, job, timeout=600)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return Parity(root, inputs)
