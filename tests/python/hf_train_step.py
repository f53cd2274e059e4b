#!/usr/bin/env python3
"""The reference of `bertrain bench train`: one training step of Hugging Face transformers'
BertForPreTraining on the CPU, measured the same way (fp32, seq 128, 20 masked positions per
sequence, random tokens, AdamW; batch 32, or 8 for base), so that both can be run in the
same session on the same machine.

Usage:
    python tests/python/hf_train_step.py [PRESETS] [STEPS] [THREADS]
    e.g. python tests/python/hf_train_step.py tiny,mini,base 3 2

Needs `pip install torch transformers` (measured with torch 2.15, transformers 5.24).
Prints one row per preset: model, batch, seconds per step, tokens per second.
"""

import sys
import time

import torch
from transformers import BertConfig, BertForPreTraining

# layers, hidden, heads, intermediate, batch: the presets of `bertrain model-info`.
PRESETS = {
    "tiny": (2, 128, 2, 512, 32),
    "mini": (4, 256, 4, 1024, 32),
    "small": (4, 512, 8, 2048, 32),
    "medium": (8, 512, 8, 2048, 32),
    "base": (12, 768, 12, 3072, 8),
}
SEQ_LEN, PREDICTIONS, VOCAB = 128, 20, 30522


def main():
    presets = sys.argv[1].split(",") if len(sys.argv) > 1 else ["tiny", "mini", "base"]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    torch.manual_seed(0)
    print(f"{'model':<8} {'batch':>6} {'s/step':>10} {'tokens/s':>12}")
    for name in presets:
        layers, hidden, heads, intermediate, batch = PRESETS[name]
        config = BertConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=intermediate,
        )
        model = BertForPreTraining(config)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        input_ids = torch.randint(999, VOCAB, (batch, SEQ_LEN))
        token_type_ids = (torch.arange(SEQ_LEN) >= SEQ_LEN // 2).long().expand(batch, SEQ_LEN)
        labels = torch.full((batch, SEQ_LEN), -100)
        positions = 1 + 6 * torch.arange(PREDICTIONS)
        labels[:, positions] = input_ids[:, positions]
        next_sentence = torch.randint(0, 2, (batch,))

        def step():
            out = model(
                input_ids=input_ids,
                token_type_ids=token_type_ids,
                labels=labels,
                next_sentence_label=next_sentence,
            )
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        step()  # warm-up: allocations and the optimizer's state
        started = time.perf_counter()
        for _ in range(steps):
            step()
        per_step = (time.perf_counter() - started) / steps
        print(f"{name:<8} {batch:>6} {per_step:>10.3f} {batch * SEQ_LEN / per_step:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
