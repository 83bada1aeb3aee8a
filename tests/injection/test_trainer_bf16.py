"""``transformers.Trainer(bf16=True, use_cpu=True)`` trains adapter, prefix-tuning and prompt-tuning models
and tracks the fp32 run (issue 19 item 3).

Under ``bf16=True`` the Trainer runs the forward in ``torch.autocast("cpu", torch.bfloat16)``, so every
fastpeft op must follow the autocast rule of docs/architecture.md (cast its floating inputs at entry, as
torch's ``linear``); before, an adapter model raised at its first step (``residual has dtype bfloat16 but x
has float32``).

Budgets, from bf16's unit roundoff u = 2**-8: the loss is a mean of log-softmaxes of logits that each carry
a few roundings of relative size u, so each step's loss stays within 2u (relative) of the fp32 run's
(measured: within 0.16u, over the six models). Every trainable parameter must move in the bf16 run
(the gradients reach each of them through the casts). The updates themselves are not compared: AdamW's
first steps are about ``lr · sign(g)``, so an entry whose fp32 gradient is near 0 flips with bf16 noise.
"""
import pytest
import torch
from torch.utils.data import Dataset

import fastpeft
from models import tiny_bert_classifier, tiny_llama, token_ids

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

U_BF16 = 2.0 ** -8
SEQ, SAMPLES, STEPS = 9, 8, 3


class _Batch(Dataset):
    def __init__(self, causal_lm: bool):
        self.ids = token_ids(SAMPLES, SEQ, seed=3)
        self.causal_lm = causal_lm

    def __len__(self):
        return SAMPLES

    def __getitem__(self, i):
        labels = self.ids[i] if self.causal_lm else torch.tensor(i % 3)
        return dict(input_ids=self.ids[i], attention_mask=torch.ones(SEQ, dtype=torch.long), labels=labels)


APPLY = {
    "adapter": lambda model: fastpeft.apply_adapter(model, "seq_bn"),
    "prefix_tuning": lambda model: fastpeft.apply_prefix_tuning(model, 4),
    "prompt_tuning": lambda model: fastpeft.apply_prompt_tuning(model, 4),
}
MODELS = {"llama": (tiny_llama, True), "bert": (tiny_bert_classifier, False)}


def _train(model_name, method, bf16, tmp_path):
    build, causal_lm = MODELS[model_name]
    model = build(seed=0)
    torch.manual_seed(0)  # the prompt/prefix initialisation draws from the global generator
    APPLY[method](model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2,
        bf16=bf16, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Batch(causal_lm))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    updates = {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}
    return losses, updates


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("method", list(APPLY))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_bf16_trainer_tracks_fp32(model_name, method, backend, tmp_path):
    fp32_losses, fp32_updates = _train(model_name, method, False, tmp_path)
    bf16_losses, bf16_updates = _train(model_name, method, True, tmp_path)
    assert len(bf16_losses) == len(fp32_losses) == STEPS
    for step, (got, want) in enumerate(zip(bf16_losses, fp32_losses)):
        assert abs(got - want) <= 2 * U_BF16 * abs(want), f"step {step}: bf16 loss {got} vs fp32 {want}"
    assert fp32_updates.keys() == bf16_updates.keys() and bf16_updates
    frozen = [n for n, u in bf16_updates.items() if not u.any()]
    assert not frozen, f"no update under bf16 for {frozen}"
