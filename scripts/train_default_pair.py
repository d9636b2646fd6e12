"""Train the embedded default pair (``default-small`` / ``default-large``) on TinyStories.

    python scripts/train_default_pair.py --data ../shared/data/text --run-dir runs/default-pair
    python scripts/train_default_pair.py ... --only large          # one model
    python scripts/train_default_pair.py ... --export models/defaults  # after training: HF dirs

Steps (each skipped when its output exists, so a killed run is resumed by running it again):
1. a byte-level BPE tokenizer (2048 tokens) on ``tinystories_train_00..03.txt``;
2. the token streams of the training files and of ``tinystories_val.txt`` (validation loss only;
   never trained on);
3. each model with :func:`cascade.models.training.train` (orbax checkpoints, resumable; ``loss.csv`` and
   ``loss.png`` in its run directory);
4. ``--export DIR``: each model as a Hugging Face directory ``DIR/default-{small,large}``, then
   ``DIR/MODEL_CARD.md`` and ``DIR/training.json`` with the validation perplexity of each (as
   ``cascade eval default-NAME --data tinystories_val.txt`` computes it) and the training record.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


from cascade.models.config import ModelConfig
from cascade.models.training import TrainConfig, read_documents, save_hf_tokenizer, token_stream, train, train_tokenizer

VOCAB = 2048
TRAIN_FILES = [f"tinystories_train_{i:02d}.txt" for i in range(4)]
VAL_FILE = "tinystories_val.txt"

_COMMON = dict(architecture="LlamaForCausalLM", vocab_size=VOCAB, max_seq_len=512, tie_embeddings=True,
               rope_theta=10000.0, norm_eps=1e-5, bos_token_id=0, eos_token_ids=(0,))
MODELS = {
    # ~0.50M parameters (0.20M of them the tied embedding)
    "small": (ModelConfig(dim=96, hidden_dim=256, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24, **_COMMON),
              TrainConfig(steps=1200, batch_size=8, seq_len=512, lr=3e-3, warmup_steps=100, compute_dtype="bfloat16",
                          eval_every=200, ckpt_every=200, seed=0)),
    # ~4.95M parameters, 9.9x the small one
    "large": (ModelConfig(dim=256, hidden_dim=704, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=64, **_COMMON),
              TrainConfig(steps=1600, batch_size=8, seq_len=512, lr=2e-3, warmup_steps=100, compute_dtype="bfloat16",
                          eval_every=200, ckpt_every=100, seed=0)),
}


def prepare_data(data_dir, run_dir):
    """Tokenizer and token streams, cached in ``run_dir``."""
    from tokenizers import Tokenizer

    tok_dir = os.path.join(run_dir, "tokenizer")
    if not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        t0 = time.perf_counter()
        docs = read_documents([os.path.join(data_dir, f) for f in TRAIN_FILES])
        tok = train_tokenizer(docs, VOCAB)
        save_hf_tokenizer(tok, tok_dir)
        print(f"tokenizer: {VOCAB} tokens on {len(docs)} stories in {time.perf_counter() - t0:.1f} s", flush=True)
    tok = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    streams = {}
    for name, files in (("train", TRAIN_FILES), ("val", [VAL_FILE])):
        path = os.path.join(run_dir, f"{name}_tokens.npy")
        if not os.path.exists(path):
            docs = read_documents([os.path.join(data_dir, f) for f in files])
            np.save(path, token_stream(tok, docs).astype(np.uint16))
            print(f"{name}: {len(docs)} stories", flush=True)
        streams[name] = np.load(path).astype(np.int32)
        print(f"{name} stream: {len(streams[name]):,} tokens", flush=True)
    return tok_dir, streams


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/text", help="directory with the TinyStories text files")
    ap.add_argument("--run-dir", default="runs/default-pair", help="tokenizer, token streams, checkpoints, logs")
    ap.add_argument("--only", choices=sorted(MODELS), action="append", help="train only this model (repeatable)")
    ap.add_argument("--export", metavar="DIR", help="write the trained models as HF directories DIR/default-NAME")
    args = ap.parse_args(argv)
    os.makedirs(args.run_dir, exist_ok=True)
    tok_dir, streams = prepare_data(args.data, args.run_dir)
    for name in args.only or ["small", "large"]:
        cfg, tc = MODELS[name]
        run = os.path.join(args.run_dir, name)
        print(f"{name}: training {tc.steps} steps of {tc.batch_size}x{tc.seq_len} tokens", flush=True)
        t0 = time.perf_counter()
        result = train(cfg, tc, streams["train"], run, val_tokens=streams["val"], progress=True,
                       on_log=lambda row, n=name: print(f"{n} {json.dumps(row)}", flush=True))
        print(f"{name}: step {result.step}, val loss {result.val_loss}, {time.perf_counter() - t0:.0f} s", flush=True)
        if args.export:
            from cascade.models.export import export_trained

            out = export_trained(run, tok_dir, os.path.join(args.export, f"default-{name}"))
            print(f"{name}: exported to {out}", flush=True)
    if args.export:
        write_card(args.export, args.run_dir, args.data)


def validation_perplexity(model_dir, data_dir):
    """What ``cascade eval MODEL --data tinystories_val.txt`` reports (ctx = the model's 512, stride 256)."""
    from cascade.models import load_model, perplexity, tokenize_documents
    from cascade.models.training import read_documents

    m = load_model(model_dir)
    docs = read_documents([os.path.join(data_dir, VAL_FILE)])
    return perplexity(m.params, m.config, tokenize_documents(m.tokenizer, docs))


def write_card(export_dir, run_dir, data_dir):
    import platform
    import shutil

    import jax

    from cascade.models.training import read_loss_log, training_seconds

    record = {"data": {"train": TRAIN_FILES, "validation": VAL_FILE,
                       "train_tokens": int(len(np.load(os.path.join(run_dir, "train_tokens.npy")))),
                       "validation_tokens": int(len(np.load(os.path.join(run_dir, "val_tokens.npy"))))},
              "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": VOCAB}, "models": {}}
    cpu = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    hardware = f"{os.cpu_count()} cores of {cpu} ({platform.machine()}), JAX {jax.__version__} on {jax.default_backend()}"
    for name in ("small", "large"):
        cfg, tc = MODELS[name]
        run = os.path.join(run_dir, name)
        rows = read_loss_log(os.path.join(run, "loss.csv"))
        val = [r for r in rows if r["val_loss"]]
        ppl = validation_perplexity(os.path.join(export_dir, f"default-{name}"), data_dir)
        record["models"][f"default-{name}"] = {
            "config": {k: v for k, v in cfg.to_hf_dict().items()}, "parameters": cfg.n_params,
            "train": tc.to_dict(), "steps": int(rows[-1]["step"]), "tokens_seen": int(rows[-1]["tokens"]),
            "epochs": round(int(rows[-1]["tokens"]) / record["data"]["train_tokens"], 2),
            "training_seconds": round(training_seconds(rows), 1), "hardware": hardware,
            "final_train_loss": float(rows[-1]["loss"]), "final_val_loss_512_windows": float(val[-1]["val_loss"]),
            "val_perplexity": round(ppl.ppl, 4), "val_nll": round(ppl.nll, 5), "val_scored_tokens": ppl.tokens,
            "val_documents": ppl.documents, "val_ctx": ppl.ctx, "val_stride": ppl.stride}
        shutil.copyfile(os.path.join(run, "loss.png"), os.path.join(export_dir, f"loss-{name}.png"))
        print(f"default-{name}: val perplexity {ppl.ppl:.4f}", flush=True)
    with open(os.path.join(export_dir, "training.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    with open(os.path.join(export_dir, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(card_text(record))
    print(f"wrote {export_dir}/MODEL_CARD.md and training.json", flush=True)


def card_text(rec: dict) -> str:
    s, l = rec["models"]["default-small"], rec["models"]["default-large"]
    gain = 1 - l["val_perplexity"] / s["val_perplexity"]

    def row(label, key, fmt="{}"):
        return f"| {label} | {fmt.format(s[key]) if not callable(key) else key(s)} | " \
               f"{fmt.format(l[key]) if not callable(key) else key(l)} |"

    cfg = lambda k: (lambda m: m["config"][k])  # noqa: E731
    lines = [
        "# Model card: the embedded default pair (`default-small`, `default-large`)",
        "",
        "Two Llama-architecture language models trained from scratch for `cascade`, so that",
        "`cascade run` works offline on a fresh install: `default-small` drafts, `default-large` verifies.",
        "They write short children's stories in simple English (TinyStories style) and know nothing else.",
        "Both are Hugging Face checkpoints (`config.json`, `model.safetensors`, `tokenizer.json`):",
        "`transformers.LlamaForCausalLM.from_pretrained` loads them and gives the same logits as `cascade`.",
        "",
        "## Data",
        f"- Training: `{'`, `'.join(rec['data']['train'])}` from `shared/data/text` (14,978 TinyStories stories,",
        f"  12.4 MB, {rec['data']['train_tokens']:,} tokens with the tokenizer below, stories separated by `<|endoftext|>`).",
        f"- Validation: `{rec['data']['validation']}` (1000 stories of the TinyStories validation split, "
        f"{rec['data']['validation_tokens']:,} tokens); never trained on. The training files hold none of its stories.",
        "- License of the data: TinyStories (Eldan & Li, 2023, `roneneldan/TinyStories`) is CDLA-Sharing-1.0.",
        "",
        "## Tokenizer",
        f"Byte-level BPE ({rec['tokenizer']['vocab_size']} tokens, Hugging Face `tokenizers`, GPT-2 pre-tokenizer) trained on",
        "the training files. `<|endoftext|>` (id 0) is both BOS and EOS: the training stream is",
        "`<|endoftext|> story <|endoftext|> story ...`, a prompt starts with it and generation stops at it.",
        "Any UTF-8 text round-trips exactly.",
        "",
        "## Models",
        "| | default-small | default-large |",
        "| --- | ---: | ---: |",
        row("parameters", "parameters", "{:,}"),
        row("layers", cfg("num_hidden_layers")),
        row("hidden size", cfg("hidden_size")),
        row("MLP size", cfg("intermediate_size")),
        row("heads / KV heads", lambda m: f"{m['config']['num_attention_heads']} / {m['config']['num_key_value_heads']}"),
        row("head dim", cfg("head_dim")),
        row("context", cfg("max_position_embeddings")),
        "| embeddings | tied | tied |",
        row("steps", "steps", "{:,}"),
        row("batch", lambda m: f"{m['train']['batch_size']} x {m['train']['seq_len']} tokens"),
        row("tokens seen", "tokens_seen", "{:,}"),
        row("epochs", "epochs"),
        row("peak learning rate", lambda m: m["train"]["lr"]),
        row("training time", lambda m: f"{m['training_seconds'] / 60:.0f} min"),
        row("final training loss", "final_train_loss", "{:.3f}"),
        row("**validation perplexity**", "val_perplexity", "**{:.3f}**"),
        "",
        f"The large model's validation perplexity is {gain:.1%} lower than the small one's.",
        "",
        "Training (`scripts/train_default_pair.py`, loop in `models/training.py`): AdamW (b1 0.9, b2 0.95,",
        "weight decay 0.1 on matrices), 100 warm-up steps then cosine decay to 10% of the peak, global-norm",
        "clipping at 1.0, fp32 master weights with a bf16 forward/backward, random 512-token windows of",
        f"the packed training stream. Hardware: {s['hardware']}; no GPU.",
        "Loss curves: `loss-small.png`, `loss-large.png`. Every number here is in `training.json`.",
        "",
        "## Validation perplexity, how it is measured",
        f"`cascade eval default-large --data ../shared/data/text/tinystories_val.txt`: each of the {s['val_documents']} stories",
        f"is scored alone as BOS + tokens (no EOS), windows of {s['val_ctx']} tokens every {s['val_stride']}, "
        f"{s['val_scored_tokens']:,} predicted tokens,",
        "float32 weights. `python bench/default_pair.py` recomputes both and checks them against this card (within 1%).",
        "",
        "## Intended use and limits",
        "A demonstration and test pair for quantization and speculative decoding. Tiny models: they",
        "repeat themselves, lose track of names and plots, and produce nonsense outside the TinyStories domain.",
        "Not for any use where the content matters.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
