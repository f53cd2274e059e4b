#!/usr/bin/env python3
"""Throughput of `bertrain finetune` against HF `Trainer` on the same task, in one run.

Why: the README's fine-tuning figures compare bertrain with what a user would otherwise
run. Both fine-tune the same pretrained model (the demo's export, `demo-run/model`) on the
same files (the demo's region task, `demo-run/finetune/{train,validation}.tsv`) with the
same recipe: 3 epochs, batch 16, peak lr 2e-4 with 10% warmup and linear decay, AdamW
(weight decay 0.01, not on biases and LayerNorm), gradient clipping at 1.0, max length 64,
dynamic padding, fp32 on the CPU. Throughput is real (non-padding) training tokens per
second of training time (HF: `train_runtime`; bertrain: its `train_seconds`), and both
report validation accuracy.

Run after `cargo run --release -- demo` (or `cargo run -- demo`), from the repository root:

    python3 -m venv /tmp/ft-venv
    /tmp/ft-venv/bin/pip install torch transformers safetensors accelerate
    /tmp/ft-venv/bin/python tests/python/finetune_vs_hf_trainer.py \
        --bertrain target/release/bertrain --threads 2

`--threads` sets torch's threads; bertrain uses all cores (burn's thread pool), so give the
machine's core count to compare like with like.
"""

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    BertForSequenceClassification,
    BertTokenizerFast,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

EPOCHS, BATCH, LR, WARMUP, DECAY, MAX_LEN, SEED = 3, 16, 2e-4, 0.1, 0.01, 64, 0


def read_tsv(path: Path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [r["region"] for r in rows]


class Examples(torch.utils.data.Dataset):
    def __init__(self, encodings, labels):
        self.encodings, self.labels = encodings, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


def run_hf(model_dir: Path, task: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    train_text, train_labels = read_tsv(task / "train.tsv")
    val_text, val_labels = read_tsv(task / "validation.tsv")
    names = sorted(set(train_labels))  # as bertrain: named labels in sorted order
    ids = {n: i for i, n in enumerate(names)}
    lowercase = json.loads((model_dir / "tokenizer_config.json").read_text()).get("do_lower_case", True)
    tok = BertTokenizerFast(str(model_dir / "vocab.txt"), do_lower_case=lowercase)
    enc_train = tok(train_text, truncation=True, max_length=MAX_LEN)
    enc_val = tok(val_text, truncation=True, max_length=MAX_LEN)
    tokens = sum(len(x) for x in enc_train["input_ids"]) * EPOCHS
    model = BertForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(names), attn_implementation="eager"
    )
    out = Path(tempfile.mkdtemp(prefix="hf-trainer-"))
    args = TrainingArguments(
        output_dir=str(out),
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=LR,
        # As bertrain: warmup steps = round(ratio * total steps), given as a count (the
        # ratio argument's name changed across transformers versions).
        warmup_steps=round(WARMUP * EPOCHS * -(-len(train_labels) // BATCH)),
        lr_scheduler_type="linear",
        weight_decay=DECAY,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        seed=SEED,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Examples(enc_train, [ids[l] for l in train_labels]),
        data_collator=DataCollatorWithPadding(tok),
    )
    result = trainer.train()
    predictions = trainer.predict(Examples(enc_val, [ids[l] for l in val_labels]))
    accuracy = float((np.argmax(predictions.predictions, axis=1) == predictions.label_ids).mean())
    shutil.rmtree(out, ignore_errors=True)
    seconds = result.metrics["train_runtime"]
    return {"train_seconds": seconds, "tokens_per_s": tokens / seconds, "accuracy": accuracy}


def run_bertrain(binary: Path, model_dir: Path, task: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bertrain-finetune-")) / "out"
    cmd = [
        str(binary), "finetune", "--model", str(model_dir),
        "--train", str(task / "train.tsv"), "--validation", str(task / "validation.tsv"),
        "--text-columns", "sentence", "--label-column", "region",
        "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR),
        "--warmup-ratio", str(WARMUP), "--weight-decay", str(DECAY),
        "--max-seq-len", str(MAX_LEN), "--seed", str(SEED), "--output", str(out), "--quiet",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    final = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"train_seconds": final["train_seconds"], "tokens_per_s": final["tokens_per_s"], "accuracy": final["value"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--demo-dir", type=Path, default=Path("demo-run"))
    p.add_argument("--bertrain", type=Path, default=Path("target/release/bertrain"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    model_dir, task = a.demo_dir / "model", a.demo_dir / "finetune"
    started = time.time()
    ours = run_bertrain(a.bertrain, model_dir, task)
    hf = run_hf(model_dir, task, a.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, torch threads {a.threads}, "
          f"python {sys.version.split()[0]}; {time.time() - started:.0f} s in all")
    print(f"{'':22} {'train s':>8} {'tokens/s':>9} {'accuracy':>9}")
    for name, r in [("bertrain finetune", ours), ("HF Trainer", hf)]:
        print(f"{name:22} {r['train_seconds']:>8.1f} {r['tokens_per_s']:>9.0f} {r['accuracy']:>9.3f}")


if __name__ == "__main__":
    main()
