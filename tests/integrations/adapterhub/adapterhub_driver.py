"""Runs inside the AdapterHub side env (``adapterhub_env.py``): the reference side of the parity tests.

Usage: ``python adapterhub_driver.py JOB.json``. The job names tiny models (a
transformers config class, its keyword arguments and a safetensors file with
the base weights written by the test env), an inputs file, and cases:

- ``"hub_to_fastpeft"``: add the case's adapters (AdapterHub configs) and
  optional fusion to the model, give every adapter/fusion parameter random
  values (seeded), save them with AdapterHub's ``save_adapter`` /
  ``save_adapter_fusion`` into the given directories;
- ``"fastpeft_to_hub"``: load directories written by fastpeft with
  AdapterHub's ``load_adapter`` / ``load_adapter_fusion``.

Then, for both kinds, it runs forward and backward in float32 and float64
(a float64 copy of the same model) with ``loss = sum(out * weight)`` on fixed
input embeddings, the trained parameters being those AdapterHub's
``train_adapter`` / ``train_adapter_fusion`` unfreeze, and writes to the
case's ``out`` file: ``<dtype>.output``, ``<dtype>.grad.inputs_embeds``,
``<dtype>.grad.<param>``, and ``param.<param>`` (the float32 values used).
This file imports only torch, safetensors, transformers 4.57 and adapters 1.3.
"""
from __future__ import annotations

import copy
import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

import adapters
from adapters.composition import Fuse


def build_model(spec: dict):
    config = getattr(transformers, spec["config_class"])(**spec["config"])
    model = getattr(transformers, spec["model_class"])(config)
    missing, unexpected = model.load_state_dict(load_file(spec["weights"]), strict=False)
    if unexpected or any("inv_freq" not in k for k in missing):
        raise RuntimeError(f"base weights do not fit {spec['model_class']}: missing {missing}, "
                           f"unexpected {unexpected}")
    adapters.init(model)
    return model.eval()


def randomize(model, marker_names, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name for m in marker_names):
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def setup_hub_to_fastpeft(model, case: dict) -> None:
    names = []
    for ad in case["adapters"]:
        model.add_adapter(ad["name"], config=ad["config"])
        names.append(ad["name"])
    markers = [f".adapters.{n}." for n in names]
    fusion = case.get("fusion")
    if fusion:
        model.add_adapter_fusion(names, fusion["config"])
        markers.append(f".adapter_fusion_layer.{','.join(names)}.")
    randomize(model, markers, case["seed"])
    for ad in case["adapters"]:
        model.save_adapter(ad["save_dir"], ad["name"], use_safetensors=ad.get("safetensors", True))
    if fusion:
        model.save_adapter_fusion(fusion["save_dir"], ",".join(names), use_safetensors=True)
    activate(model, names, bool(fusion))


def setup_fastpeft_to_hub(model, case: dict) -> None:
    names = []
    for directory in case["adapter_dirs"]:
        name = model.load_adapter(directory, use_safetensors=True)
        names.append(name)
    if case.get("fusion_dir"):
        model.load_adapter_fusion(case["fusion_dir"], use_safetensors=True)
    activate(model, names, bool(case.get("fusion_dir")))


def activate(model, names: list, fused: bool) -> None:
    if fused:
        model.train_adapter_fusion(Fuse(*names))
    else:
        model.train_adapter(names[-1])
    model.eval()


def run(model, embeds: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, prefix: str, out: dict) -> None:
    embeds = embeds.to(dtype).clone().requires_grad_(True)
    result = model(inputs_embeds=embeds)
    output = result.logits if hasattr(result, "logits") else result.last_hidden_state
    (output * weight.to(dtype)).sum().backward()
    out[f"{prefix}.output"] = output.detach().clone()
    out[f"{prefix}.grad.inputs_embeds"] = embeds.grad.detach().clone()
    for name, p in model.named_parameters():
        if p.requires_grad:
            if p.grad is None:
                raise RuntimeError(f"{name} requires grad but got none")
            out[f"{prefix}.grad.{name}"] = p.grad.detach().clone()


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    inputs = load_file(job["inputs"])
    for case in job["cases"]:
        spec = job["models"][case["model"]]
        torch.manual_seed(case["seed"])  # AdapterHub initialises new adapters from the global generator
        model = build_model(spec)
        if case["kind"] == "hub_to_fastpeft":
            setup_hub_to_fastpeft(model, case)
        elif case["kind"] == "fastpeft_to_hub":
            setup_fastpeft_to_hub(model, case)
        else:
            raise ValueError(f"unknown case kind {case['kind']!r}")
        out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            embeds = model.get_input_embeddings()(inputs[f"{case['model']}.ids"])
        weight = inputs[f"{case['model']}.weight"]
        model64 = copy.deepcopy(model).double().eval()  # before any forward: fusion temperature changes per call
        run(model, embeds, weight, torch.float32, "f32", out)
        run(model64, embeds, weight, torch.float64, "f64", out)
        save_file({k: v.contiguous() for k, v in out.items()}, case["out"])
    print(json.dumps({"cases": len(job["cases"]), "transformers": transformers.__version__,
                      "adapters": adapters.__version__}))


if __name__ == "__main__":
    main(sys.argv[1])
