"""The Hugging Face Trainer with preemptd: checkpoint-N/ every SAVE_EVERY
steps (save_total_limit keeps the newest 2 here; preemptd syncs each as it
completes, even one the Trainer removes while it uploads), and the
preemptd.hf.PreemptdCallback saves and stops on preemptd's signal
(SIGTERM) or notice, every rank at the same step. On a new machine
preemptd.restore() brings the run's latest checkpoint-N/ back and train()
resumes from it.

  pip install preemptd-*.whl     # `make wheel` in preemptd's repository
  python train.py                # or torchrun/accelerate launch; preemptd runs beside it

The model is a small BERT built from its config (nothing downloaded): put
yours in its place. It runs on the CPU as it is.
"""
import os

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import preemptd
from preemptd.hf import PreemptdCallback

CKPT_DIR = os.environ.get("CKPT_DIR", "/data/ckpt")
SAVE_EVERY = int(os.environ.get("SAVE_EVERY", "500"))
STEPS = int(os.environ.get("STEPS", "-1"))  # -1: until preempted


class Random(torch.utils.data.Dataset):
    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input_ids": torch.randint(0, 1000, (32,), generator=g), "labels": torch.tensor(i % 2)}


model = BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=128, num_labels=2))
args = TrainingArguments(output_dir=CKPT_DIR, save_steps=SAVE_EVERY, save_total_limit=2, max_steps=STEPS,
                         report_to=[], logging_strategy="no", disable_tqdm=True)
resume = preemptd.restore()  # the latest committed checkpoint-N/, or None on the first start
print("resuming from", resume, flush=True)
trainer = Trainer(model=model, args=args, train_dataset=Random(), callbacks=[PreemptdCallback()])
trainer.train(resume_from_checkpoint=resume)
print("stopped at step", trainer.state.global_step, flush=True)
