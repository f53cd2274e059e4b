#!/usr/bin/env python3
"""Check that a BERT checkpoint directory loads in Hugging Face `transformers` and gives
the expected outputs.

Usage:
    /work/venv-hf/bin/python tests/python/check_hf_load.py DIR EXPECTED.json [--atol 1e-4]

DIR is a Hugging Face directory (config.json + model.safetensors) of a BertForPreTraining,
for example one exported by the Rust code. EXPECTED.json holds a batch and the outputs the
exporter says the model gives on it, with the keys of tests/fixtures/hf-tiny-expected.json
(written by tests/fixtures/make_hf_fixture.py):
    input_ids, token_type_ids, attention_mask   [B, T] integers
    masked_positions                            [[row, position], ...]  (M pairs)
    mlm_logits                                  [M, vocab]  prediction logits at those pairs
    nsp_logits                                  [B, 2]
  and optionally (compared when present):
    last_hidden_state [B, T, H] (compared at positions with attention_mask 1 only),
    pooled_output [B, H], mlm_labels + mlm_loss, nsp_labels + nsp_loss.

Fails (exit 1, one line per problem) when the directory does not load, when any weight is
missing, unexpected or of the wrong shape, when a saved tied MLM decoder differs from the
word embeddings, or when any output differs from EXPECTED.json by more than --atol.
Exit 0 and "OK" otherwise. The environment is the one described in make_hf_fixture.py.
"""

import argparse
import json
import sys
from pathlib import Path


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def load_expected(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        fail(f"reading {path}: {e}")
    if not isinstance(doc, dict):
        fail(f"{path}: expected a JSON object at the top level")
    required = ["input_ids", "token_type_ids", "attention_mask", "masked_positions", "mlm_logits", "nsp_logits"]
    missing = [k for k in required if k not in doc]
    if missing:
        fail(f"{path}: missing key(s) {', '.join(missing)}; see tests/fixtures/hf-tiny-expected.json for the format")
    return doc


def load_model(model_dir: Path):
    # Imported here so that `--help` and argument errors do not pay for importing torch.
    import transformers
    from transformers import BertForPreTraining

    transformers.logging.set_verbosity_error()  # we report loading problems ourselves
    transformers.logging.disable_progress_bar()
    if not (model_dir / "config.json").is_file():
        fail(f"{model_dir}: no config.json; pass a Hugging Face model directory")
    try:
        model, info = BertForPreTraining.from_pretrained(model_dir, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any loading failure is the answer we report
        if "ignore_mismatched_sizes" not in str(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            fail(f"{model_dir}: transformers could not load it as BertForPreTraining: {type(e).__name__}: {first}")
        # A shape mismatch raises with the details only in a log we silenced: load again
        # tolerating it, just to list the mismatched keys below (the check still fails).
        model, info = BertForPreTraining.from_pretrained(
            model_dir, output_loading_info=True, ignore_mismatched_sizes=True
        )
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        entries = sorted(str(x) for x in (info.get(kind) or []))
        if entries:
            problems.append(f"{kind.replace('_', ' ')} ({len(entries)}): {', '.join(entries)}")
    if problems:
        for p in problems:
            print(f"error: {model_dir}: {p}", file=sys.stderr)
        sys.exit(1)
    model.eval()
    return model


def check_tied_decoder(model_dir: Path) -> None:
    """transformers re-ties the MLM decoder to the word embeddings on load, so a saved
    decoder weight that differs would be silently dropped; catch that here."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        dec, emb = "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"
        if dec in keys and emb in keys and not f.get_tensor(dec).equal(f.get_tensor(emb)):
            fail(f"{path}: {dec} differs from {emb}, but BERT ties them; export the same tensor")


def compare(name: str, got, want, atol: float, failures: list) -> None:
    import torch

    want = torch.tensor(want, dtype=torch.float32)
    if tuple(got.shape) != tuple(want.shape):
        failures.append(f"{name}: shape {tuple(got.shape)} from the model, {tuple(want.shape)} in the JSON")
        print(f"{name:<18} shape mismatch")
        return
    diff = (got.float() - want).abs().max().item() if got.numel() else 0.0
    ok = diff <= atol
    print(f"{name:<18} max |diff| {diff:.3e}  {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(f"{name}: max abs difference {diff:.3e} exceeds {atol:g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path, help="Hugging Face BertForPreTraining directory")
    parser.add_argument("expected", type=Path, help="JSON with the batch and the expected outputs")
    parser.add_argument("--atol", type=float, default=1e-4, help="max allowed absolute difference")
    args = parser.parse_args()

    doc = load_expected(args.expected)
    model = load_model(args.model_dir)
    check_tied_decoder(args.model_dir)

    import torch
    import torch.nn.functional as F

    try:
        ids = torch.tensor(doc["input_ids"], dtype=torch.long)
        types = torch.tensor(doc["token_type_ids"], dtype=torch.long)
        mask = torch.tensor(doc["attention_mask"], dtype=torch.long)
        pairs = torch.tensor(doc["masked_positions"], dtype=torch.long).reshape(-1, 2)
    except (TypeError, ValueError, RuntimeError) as e:
        fail(f"{args.expected}: batch is not rectangular integer arrays: {e}")
    if ids.dim() != 2 or types.shape != ids.shape or mask.shape != ids.shape:
        fail(f"{args.expected}: input_ids, token_type_ids, attention_mask must all be [B, T]")
    rows, cols = pairs[:, 0], pairs[:, 1]
    if (rows >= ids.shape[0]).any() or (cols >= ids.shape[1]).any() or (pairs < 0).any():
        fail(f"{args.expected}: masked_positions has a pair outside the {tuple(ids.shape)} batch")
    vocab = model.config.vocab_size
    if (ids < 0).any() or (ids >= vocab).any():
        fail(f"{args.expected}: input_ids outside the model's vocabulary of {vocab}")

    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
        base = model.bert(input_ids=ids, token_type_ids=types, attention_mask=mask)
    mlm_logits = out.prediction_logits[rows, cols]
    nsp_logits = out.seq_relationship_logits

    failures: list = []
    compare("mlm_logits", mlm_logits, doc["mlm_logits"], args.atol, failures)
    compare("nsp_logits", nsp_logits, doc["nsp_logits"], args.atol, failures)
    if "last_hidden_state" in doc:
        # Padded positions are not part of the contract: compare real tokens only.
        real = mask.bool().unsqueeze(-1)
        want = torch.tensor(doc["last_hidden_state"], dtype=torch.float32)
        if want.shape == base.last_hidden_state.shape:
            compare("last_hidden_state", base.last_hidden_state * real, (want * real).tolist(), args.atol, failures)
        else:
            compare("last_hidden_state", base.last_hidden_state, doc["last_hidden_state"], args.atol, failures)
    if "pooled_output" in doc:
        compare("pooled_output", base.pooler_output, doc["pooled_output"], args.atol, failures)
    if "mlm_loss" in doc and "mlm_labels" in doc:
        loss = F.cross_entropy(mlm_logits, torch.tensor(doc["mlm_labels"], dtype=torch.long))
        compare("mlm_loss", loss, doc["mlm_loss"], args.atol, failures)
    if "nsp_loss" in doc and "nsp_labels" in doc:
        loss = F.cross_entropy(nsp_logits, torch.tensor(doc["nsp_labels"], dtype=torch.long))
        compare("nsp_loss", loss, doc["nsp_loss"], args.atol, failures)

    if failures:
        for f in failures:
            print(f"error: {args.model_dir} vs {args.expected}: {f}", file=sys.stderr)
        sys.exit(1)
    print(f"OK: {args.model_dir} loads in transformers with no missing/unexpected/mismatched keys "
          f"and matches {args.expected} within {args.atol:g}")


if __name__ == "__main__":
    main()
