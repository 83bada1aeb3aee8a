"""Runs inside the AdapterHub side env: AdapterHub loads a fastpeft adapter directory with its static head.

Usage: ``python adapterhub_head_driver.py JOB.json``; the job gives the
BertConfig kwargs, a safetensors file of base weights, the adapter directory
and the input ids; writes ``logits`` (float64: the model and the loaded
adapter and head in float64) to the job's ``out`` file.
"""
import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

import adapters

job = json.loads(open(sys.argv[1]).read())
model = transformers.BertForSequenceClassification(transformers.BertConfig(**job["config"]))
model.load_state_dict(load_file(job["weights"]))
adapters.init(model)
name = model.load_adapter(job["adapter_dir"], use_safetensors=True, with_head=True)
model.set_active_adapters(name)
model = model.double().eval()
with torch.no_grad():
    logits = model(input_ids=load_file(job["inputs"])["ids"]).logits
save_file({"logits": logits.contiguous()}, job["out"])
