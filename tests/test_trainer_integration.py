"""Batched training through transformers' Trainer with our model and tokenizer (no pad token in LLaMA)."""

from __future__ import annotations

import pytest
import torch

from modeling_llama import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

pytest.importorskip("accelerate")


def test_trainer_pads_with_unk_keeps_eos_labels_and_learns(tmp_path, real_tokenizer_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = LlamaTokenizerFast(vocab_file=real_tokenizer_path, add_eos_token=True)
    texts = ["The cat sat on the mat.", "A dog barked.", "Birds sing in the morning light.", "Hi."] * 8
    features = [tok(t) for t in texts]
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    batch = collator(features[:4])
    # rows of different lengths are padded with <unk> on the left; padding carries no loss, EOS does
    assert (batch["input_ids"] == 0).any()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["labels"][:, -1] == tok.eos_token_id).all(), "EOS must stay a training target"

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_preset("tiny"))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=30,
        learning_rate=3e-3,
        logging_steps=5,
        save_steps=30,
        report_to=[],
        use_cpu=True,
        seed=0,
        lr_scheduler_type="constant",
        activation_checkpointing=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0] * 0.7, losses
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint-30")
    ids = tok("The cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)
