"""Regular expressions from users that backtrack catastrophically are refused, never run (issue 19, item 9).

PEFT hangs on ``target_modules="(a+)+b"``-style patterns against a name that
almost matches; fastpeft raises a ValueError naming the argument before any
module name is matched, and keeps accepting the patterns PEFT users write.
"""
import json
import re
import time

import pytest
import torch
from models import tiny_llama

from fastpeft.injection import apply_lora
from fastpeft.injection.regex_safety import check_regex
from fastpeft.injection.targets import TargetSelection
from fastpeft.integrations.peft.lora_format import load_lora, save_lora

EXPONENTIAL = ["(a+)+b", "(a*)*b", "(.*a){12}x", "(a|aa)+b", "(?:a|ab)*c", r"(.*\.)*q_proj", "((ab)*)+c"]
ORDINARY = [r".*\.(q|v)_proj", r".*\.layers\.\d+\.self_attn\.(q_proj|k_proj)", "q_proj", r"(.*\.)?(up_proj)$",
            r"model\.layers\.(0|1)\.mlp\..*", "(foo|bar)+", r"(?:x|\d)+"]


def test_the_refused_shapes_really_are_exponential():
    """The oracle: Python's re on a near-miss takes visibly longer for a few more characters."""
    def seconds(n):
        start = time.perf_counter()
        re.fullmatch("(a+)+b", "a" * n + "c")
        return time.perf_counter() - start
    assert seconds(22) > 8 * max(seconds(18), 1e-6)


@pytest.mark.parametrize("pattern", EXPONENTIAL)
def test_exponential_target_modules_raise(pattern):
    with pytest.raises(ValueError, match="target_modules .*exponential time"):
        TargetSelection.of(pattern)
    model = tiny_llama()
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(model, pattern, r=2)


@pytest.mark.parametrize("what", ["exclude_modules", "layers_pattern", "modules_to_save"])
def test_exponential_patterns_in_other_arguments_raise(what):
    kwargs = {"exclude_modules": None, "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None}
    kwargs[what] = ["(a+)+b"] if what != "exclude_modules" else "(a+)+b"
    if what == "layers_pattern":
        kwargs["layers_to_transform"] = [0]
    with pytest.raises(ValueError, match=f"{what}.*exponential time"):
        TargetSelection.of(["q_proj"], **kwargs)


@pytest.mark.parametrize("pattern", ORDINARY)
def test_ordinary_patterns_still_compile(pattern):
    assert check_regex("target_modules", pattern).pattern == pattern


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern"])
def test_exponential_rank_and_alpha_pattern_keys_raise_on_load(tmp_path, key):
    model = apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=3, lora_alpha=5)
    save_lora(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config[key] = {"(a|aa)+$": 4}
    path.write_text(json.dumps(config))
    fresh = tiny_llama()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=f"{key} key .*exponential time"):
        load_lora(fresh, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
