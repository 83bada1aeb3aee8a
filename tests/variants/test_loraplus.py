"""LoRA+ (fastpeft.create_loraplus_optimizer) against HF PEFT's create_loraplus_optimizer: the same parameter
groups (by name, lr and weight decay) and the same AdamW steps on twin models; errors before anything changes."""
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import fastpeft
from models import BERT_TARGETS, LLAMA_TARGETS, tiny_bert_classifier, tiny_llama, token_ids
from variants.peft_twins import our_name, twins

CASES = {"llama": (tiny_llama, LLAMA_TARGETS, None), "bert": (tiny_bert_classifier, BERT_TARGETS, ["classifier"])}
# eps well above the float32 noise of the two models' gradients (~1e-9), which Adam would otherwise amplify
OPTIONS = dict(lr=1e-2, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.1, loraplus_lr_embedding=1e-5)


def group_names(optimizer, model, rename=lambda n: n):
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return [({names[id(p)] for p in g["params"]}, g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def loss_of(model, case, ids):
    out = model(ids) if case == "bert" else model(ids, labels=ids)
    return out.logits.square().mean() if case == "bert" else out.loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_groups_and_steps_as_peft(case):
    build, targets, to_save = CASES[case]
    ours, theirs = twins(build, targets, modules_to_save=to_save)
    opt_ours = fastpeft.create_loraplus_optimizer(ours, torch.optim.AdamW, **OPTIONS, betas=(0.8, 0.99), eps=1e-3)
    opt_theirs = peft_loraplus(theirs, torch.optim.AdamW, **OPTIONS, betas=(0.8, 0.99), eps=1e-3)
    ours_groups, theirs_groups = group_names(opt_ours, ours), group_names(opt_theirs, theirs, our_name)
    assert ours_groups == theirs_groups
    assert ours_groups[2][1] == OPTIONS["lr"] * OPTIONS["loraplus_lr_ratio"] and ours_groups[2][0]
    if case == "bert":  # the classifier's bias: B's learning rate, no decay
        assert ours_groups[3][0] == {"classifier.modules_to_save.default.bias"}
    ids = token_ids(batch=2, seq=9)
    ours.train(), theirs.train()
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss_of(model, case, ids).backward()
            opt.step()
    theirs_params = {our_name(n): p for n, p in theirs.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            # B moves lr·ratio = 0.16 a step: a wrong group is off by >= 1e-2, float32 noise through Adam ~5e-6
            torch.testing.assert_close(p, theirs_params[name], rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("bad, error", [
    (dict(optimizer_cls=dict), TypeError), (dict(lr=0.0), ValueError), (dict(lr="1"), TypeError),
    (dict(loraplus_lr_ratio=-1.0), ValueError), (dict(loraplus_lr_ratio=float("inf")), ValueError),
    (dict(loraplus_weight_decay=-0.1), ValueError), (dict(loraplus_lr_embedding=0.0), ValueError),
])
def test_bad_arguments_raise_naming_them(bad, error):
    model = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2)
    args = dict(optimizer_cls=torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0) | bad
    with pytest.raises(error, match=next(iter(bad))):
        fastpeft.create_loraplus_optimizer(model, **args)


def test_model_without_lora_is_refused():
    with pytest.raises(ValueError, match="LoRA layers"):
        fastpeft.create_loraplus_optimizer(tiny_llama(), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0)
