"""Distil ``smollm2-draft``: a few-layer, reduced-vocabulary draft for SmolLM2-135M-Instruct.

    cascade pull smollm2
    python scripts/train_smollm2_draft.py --data ../shared/data/text --run-dir runs/smollm2-draft
    python scripts/train_smollm2_draft.py ... --export models/defaults      # the shipped draft

The recipe (each step's output is cached in ``--run-dir``, so a killed run resumes):

1. **Text close to what the pair generates**: TinyStories stories (``tinystories_train_*.txt``),
   half of them as plain text (``story<|endoftext|>``) and half as a chat through the teacher's
   chat template: a user turn asking for a story (a few phrasings, with the story's first words)
   and the story as the assistant's turn.  Tokenized with the teacher's tokenizer.
2. **The vocabulary subset** (FR-Spec, Zhao et al. 2025): the ``--subset - 1`` most frequent
   tokens of that stream (the special tokens of the template always included), plus one row that
   every other token reads as.  The draft proposes only these tokens; verification stays exact
   because its distribution is exactly zero elsewhere (:mod:`cascade.models.llama`).
3. **The student starts from the teacher**: its embedding rows are the teacher's rows of the
   subset's tokens (tied head), its ``--layers`` are copies of the teacher's blocks of those
   indices, its final norm the teacher's.
4. **Distillation** (:func:`cascade.models.training.train` with a teacher): forward
   KL(teacher || student) at every position, the teacher's distribution restricted to the subset
   and renormalized; the teacher is the same weights the pair verifies with (``--teacher``,
   dequantized to float32).
5. ``--export DIR``: ``DIR/smollm2-draft``, a cascade checkpoint at int4 (``vocab_subset`` in its
   config, ``vocab_map`` beside the weights, the teacher's tokenizer and chat template), and beside
   it ``SMOLLM2_DRAFT.md`` (its card: data, steps, time, losses), ``smollm2-draft-training.json``
   and ``loss-smollm2-draft.png``.

``--tiny`` is a configuration of seconds for the test suite (any teacher, e.g. default-large).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

TRAIN_FILES = [f"tinystories_train_{i:02d}.txt" for i in range(4)]
VAL_FILE = "tinystories_val.txt"
ASKS = ("Write a short story that begins: {start}", "Tell me a story for children. Start with: {start}",
        "Can you write a simple story about {name}?", "Write a story. First words: {start}")
NAME = "smollm2-draft"


def _documents(data_dir, files, limit):
    from cascade.models.training import read_documents

    docs = read_documents([os.path.join(data_dir, f) for f in files])
    return docs[:limit] if limit else docs


def chat_or_plain(tokenizer, docs, seed: int) -> list[str]:
    """Every other story (at random) as a chat turn through the teacher's template (step 1)."""
    rng = np.random.default_rng(seed)
    end = "<|endoftext|>"
    out = []
    for d in docs:
        if tokenizer.chat_template and rng.random() < 0.5:
            words = d.split()
            ask = ASKS[int(rng.integers(len(ASKS)))]
            name = next((w.strip(".,!?\"'") for w in words[1:] if w[:1].isupper()), "a little dog")
            prompt = ask.format(start=" ".join(words[:4]), name=name)
            out.append(tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                      {"role": "assistant", "content": d}],
                                                     add_generation_prompt=False))
        else:
            out.append(d + end)
    return out


TOPICS = ("a robot who learns to paint", "a dragon afraid of the dark", "two friends building a boat",
          "a girl who finds a magic key", "a lost puppy in the city", "a boy who wants to be a chef",
          "a tree that can talk", "a trip to the mountains", "a shy turtle", "a rainy day at school",
          "a king who loves cookies", "a bird with a broken wing", "an astronaut on Mars", "a clever fox",
          "a snowman who wants summer", "a pirate looking for treasure", "a family moving house",
          "a little car that could", "a princess who fixes machines", "a forest festival")
QUESTIONS = ("Why is the sky blue?", "How do plants grow?", "What is a computer?", "How do I make a paper plane?",
             "What should I eat for breakfast?", "Explain gravity simply.", "What is the biggest animal?",
             "How do bees make honey?", "Write a poem about autumn.", "Give me tips for learning to read.",
             "What is friendship?", "Describe a sunset.", "How does a rocket fly?", "What is music?",
             "Write a haiku about rain.", "How can I be kind to others?")


def generation_prompts(tokenizer, docs, n: int, seed: int) -> list[list[int]]:
    """``n`` prompts for the teacher to answer (step 1b): chat requests for stories on
    :data:`TOPICS` or on a story's first words, everyday :data:`QUESTIONS` (through the chat
    template), and plain story openings (a story's first words)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        doc = docs[int(rng.integers(len(docs)))].split()
        if kind < 0.15 or not tokenizer.chat_template:
            text, chat = " ".join(doc[: int(rng.integers(2, 8))]), False
        elif kind < 0.55:
            text, chat = f"Write a short story about {TOPICS[int(rng.integers(len(TOPICS)))]}.", True
        elif kind < 0.8:
            text, chat = ASKS[int(rng.integers(len(ASKS)))].format(start=" ".join(doc[:4]), name="a little dog"), True
        else:
            text, chat = QUESTIONS[int(rng.integers(len(QUESTIONS)))], True
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        out.append(tokenizer.encode(text, add_bos=False))
    return out


def teacher_generations(teacher, prompts, *, max_new_tokens: int, batch: int, seed: int) -> np.ndarray:
    """The teacher's own answers to ``prompts`` (prompt + answer + end token, concatenated), half
    greedy and half sampled at temperature 0.8: text like what the pair generates (the teacher's
    imported codes run with int8 activations when it has them, for speed)."""
    from cascade.console import progress_bar
    from cascade.models.generation import generate
    from cascade.models.quantize import source_a8
    from cascade.models.sampling import SamplingConfig

    try:  # int8 activations: many rows at once for little more than one (the same codes; +0.1% perplexity)
        teacher = source_a8(teacher)
    except ValueError:
        pass  # a float teacher: as it is
    end = teacher.tokenizer.eos_ids[0] if teacher.tokenizer.eos_ids else 0
    parts = []
    bar = progress_bar(total=len(prompts), desc="teacher answers", unit="prompt")
    for b0 in range(0, len(prompts), batch):
        rows = prompts[b0:b0 + batch]
        greedy = (b0 // batch) % 2 == 0
        sampling = SamplingConfig() if greedy else SamplingConfig(temperature=0.8, seed=seed + b0)
        g = generate(teacher.params, teacher.config, rows, max_new_tokens=max_new_tokens, sampling=sampling)
        for p, toks in zip(rows, g.tokens):
            parts.append(np.asarray(p + toks + ([] if toks and toks[-1] == end else [end]), np.int32))
        bar.update(len(rows))
    bar.close()
    return np.concatenate(parts)


def token_stream(tokenizer, texts) -> np.ndarray:
    parts = [np.asarray(tokenizer.encode(t, add_bos=False), np.int32) for t in texts]
    return np.concatenate(parts)


def frequent_tokens(stream: np.ndarray, n: int, always=()) -> np.ndarray:
    """The vocabulary map (step 2): ``always`` first, then the most frequent tokens of ``stream``
    (ties by id), ``n`` in all, then -1 (the row of every other token)."""
    counts = np.bincount(stream)
    order = [int(t) for t in np.lexsort((np.arange(len(counts)), -counts)) if counts[t] > 0]
    chosen = list(dict.fromkeys([int(a) for a in always] + order))[:n]
    return np.asarray(chosen + [-1], np.int32)


def student_from_teacher(teacher, vocab_map: np.ndarray, layers: list[int]):
    """(plain student config over the map's rows, its float32 params) (step 3)."""
    import dataclasses

    import jax

    from cascade.quant.qtensor import QuantizedTensor
    from cascade.quant import dequantize

    is_q = lambda x: isinstance(x, QuantizedTensor)  # noqa: E731
    tp = jax.tree.map(lambda a: np.asarray(dequantize(a, "float32") if is_q(a) else a, np.float32), teacher.params,
                      is_leaf=is_q)
    tcfg = teacher.config
    if not tcfg.tie_embeddings:
        raise ValueError("the teacher must have a tied head (the draft's head is its embedding rows)")
    bad = [i for i in layers if not 0 <= i < tcfg.n_layers]
    if bad:
        raise ValueError(f"--layers {bad} outside the teacher's {tcfg.n_layers} layers")
    rows = len(vocab_map)
    cfg = dataclasses.replace(tcfg, n_layers=len(layers), vocab_size=rows, vocab_subset=None, bos_token_id=None,
                              eos_token_ids=())
    emb = tp["embed"]["embedding"]
    table = emb[np.maximum(vocab_map, 0)]
    table[vocab_map < 0] = emb.mean(axis=0)
    params = {"embed": {"embedding": table}, "final_norm": tp["final_norm"]}
    for i, src in enumerate(layers):
        params[f"layers_{i}"] = tp[f"layers_{src}"]
    return cfg, params, tp


# the tied embedding is the draft's head, read every draft step: quantized too (grouped along the model dim)
QUANT = "embed=int4-g32,*=int4"


def export(cfg, params, vocab_map, teacher, out_dir, record: dict, run_dir: str, quant: str = QUANT) -> str:
    """The draft as a cascade checkpoint ``out_dir/smollm2-draft`` quantized under ``quant`` (RTN),
    speaking the teacher's vocabulary, with ``out_dir/SMOLLM2_DRAFT.md`` (its card),
    ``smollm2-draft-training.json`` and ``loss-smollm2-draft.png`` beside it (step 5).  The float
    weights stay in ``run_dir/export/smollm2-draft`` (a Hugging Face directory)."""
    import dataclasses
    import shutil
    import tempfile

    from cascade.models import load_model, quantize_model, weight_bytes
    from cascade.models.checkpoint import save_checkpoint
    from cascade.models.export import save_hf
    from cascade.models.files import write_json, write_text

    tcfg = teacher.config
    full = dataclasses.replace(cfg, vocab_size=tcfg.vocab_size, vocab_subset=len(vocab_map),
                               bos_token_id=tcfg.bos_token_id, eos_token_ids=tcfg.eos_token_ids)
    tok = teacher.tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(tmp)
        inv = {i: t for t, i in tok._backend.get_vocab(with_added_tokens=True).items()}
        config = {"add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
                  "bos_token": inv.get(tok.bos_id), "eos_token": inv.get(tok.eos_ids[0]) if tok.eos_ids else None}
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        hf = save_hf({**params, "vocab_map": vocab_map}, full, os.path.join(run_dir, "export", NAME),
                     tokenizer_dir=tmp, overwrite=True)
    model = load_model(hf)
    quantized, _ = quantize_model(model, quant, progress=False)
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, NAME)
    save_checkpoint(target, quantized, overwrite=True)
    record = {**record, "quant": quantized.quant, "weight_bytes": int(weight_bytes(quantized.params))}
    write_json(os.path.join(out_dir, f"{NAME}-training.json"), record)
    png = os.path.join(run_dir, "loss.png")
    if os.path.exists(png):
        shutil.copyfile(png, os.path.join(out_dir, f"loss-{NAME}.png"))
    write_text(os.path.join(out_dir, "SMOLLM2_DRAFT.md"), model_card(record))
    return target


def _run_line(r: dict) -> str:
    data = (f"{r['train_tokens_available']:,} tokens: SmolLM2's own answers (greedy and sampled at temperature 0.8, "
            f"int8 activations) to {r['teacher_answers']} prompts (story requests, everyday questions, story openings; "
            "chat template) and as many tokens of the stories" if r.get("teacher_answers") else
            f"{r['train_tokens_available']:,} tokens of TinyStories ({', '.join(r['data']) if isinstance(r['data'], list) else r['data']}): "
            "half the stories as plain text, half as a chat (a user turn asking for a story, the story as the answer)")
    start = f"from run {r['init_from']}" if r.get("init_from") else f"from SmolLM2's blocks {r['layers_from_teacher']}"
    return (f"{r['steps']} steps of {r['batch_size']} x {r['seq_len']} tokens ({r['tokens_seen']:,} tokens), AdamW, "
            f"peak lr {r['lr']}, {r['training_seconds'] / 60:.1f} minutes on 2 CPU cores, starting {start}; data: "
            f"{data}. Final training KL {r['final_train_kl']:.3f} nats/token, validation cross-entropy over the "
            f"subset {r['final_val_ce']:.3f}.")


def model_card(r: dict) -> str:
    """The draft's card, from its training record."""
    runs = ([r["first_run"]] if r.get("first_run") else []) + [r]
    history = "\n".join(f"  {i + 1}. {_run_line(x)}" for i, x in enumerate(runs))
    return f"""# smollm2-draft

A draft model for speculative decoding with **SmolLM2-135M-Instruct** (HuggingFaceTB, Apache-2.0;
`cascade pull smollm2`), shipped inside the package: `cascade run --pair smollm2`. It proposes
tokens; SmolLM2 verifies them, so the output is SmolLM2's own (greedy: token for token; sampled:
in distribution). It is not meant to be used alone.

- **Architecture**: Llama, SmolLM2's width (dim 576, 9 heads, 3 KV heads, FFN 1536) and
  {len(r["layers_from_teacher"])} blocks, started from SmolLM2's blocks {r["layers_from_teacher"]};
  {r["params"]:,} parameters; stored as `{r.get("quant", "?")}` ({r.get("weight_bytes", 0) / 1e6:.1f} MB).
- **Reduced vocabulary** (FR-Spec, Zhao et al. 2025): it reads and proposes only the
  {r["subset"] - 1:,} most frequent tokens of its training text (of SmolLM2's 49,152), which cover
  {r["subset_covers_val_tokens"]:.2%} of the TinyStories validation text; every other token reads as
  one shared row and gets probability exactly 0, which keeps verification exact.
- **Training**: distillation, forward KL(SmolLM2 || draft) at every position, SmolLM2's
  distribution restricted to the subset and renormalized; SmolLM2 as loaded from its Q4_1 GGUF (the
  weights it verifies with). Loss curve of the last run: `loss-smollm2-draft.png`.
{history}
- **Reproduce**: `cascade pull smollm2`, then `python scripts/train_smollm2_draft.py --data
  ../shared/data/text --run-dir runs/smollm2-draft --steps 300 --lr 1e-3` and `python
  scripts/train_smollm2_draft.py --data ../shared/data/text --run-dir runs/smollm2-draft-2 --init-from
  runs/smollm2-draft --generate 640 --steps 150 --lr 5e-4 --export models/defaults`. Its speed and acceptance with SmolLM2: `cascade bench drafting --pair smollm2`
  (the numbers are in docs/guides/cascade.md, "The SmolLM2 pair").
- **License**: Apache-2.0 (derived from SmolLM2's weights).
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="smollm2", help="the target model to distil from [smollm2]")
    ap.add_argument("--data", required=True, help="folder with tinystories_train_*.txt and tinystories_val.txt")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--layers", default="0,1,29", help="teacher blocks the student starts from, in order")
    ap.add_argument("--subset", type=int, default=8192, help="rows of the draft's vocabulary (one is 'other')")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--docs", type=int, default=0, help="use only the first N training stories (0: all)")
    ap.add_argument("--stop-after", type=int, help="end this call after this many steps (resume later)")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="add the teacher's own answers to N prompts to the data (step 1b), as much again of stories")
    ap.add_argument("--gen-tokens", type=int, default=160, help="tokens per teacher answer")
    ap.add_argument("--init-from", metavar="RUN_DIR", help="start from a finished run's student instead of the teacher")
    ap.add_argument("--export", metavar="DIR", help="write DIR/smollm2-draft when training is done")
    ap.add_argument("--tiny", action="store_true", help="seconds-long configuration for tests")
    args = ap.parse_args(argv)

    from cascade.models import load_model
    from cascade.models.training import TrainConfig, read_loss_log, train, training_seconds

    if args.tiny:
        args.steps, args.batch, args.seq_len, args.docs = min(args.steps, 3), 2, 32, args.docs or 40
    os.makedirs(args.run_dir, exist_ok=True)
    teacher = load_model(args.teacher)
    tok = teacher.tokenizer
    t0 = time.perf_counter()
    stream_path = os.path.join(args.run_dir, "stream.npy")
    if not os.path.exists(stream_path):
        docs = chat_or_plain(tok, _documents(args.data, TRAIN_FILES, args.docs), seed=0)
        np.save(stream_path, token_stream(tok, docs))
    stream = np.load(stream_path)
    if args.generate:
        gen_path = os.path.join(args.run_dir, "generated.npy")
        if not os.path.exists(gen_path):
            prompts = generation_prompts(tok, _documents(args.data, TRAIN_FILES[:1], 2000), args.generate, seed=2)
            np.save(gen_path, teacher_generations(teacher, prompts, max_new_tokens=args.gen_tokens,
                                                  batch=4 if args.tiny else 32, seed=3))
        generated = np.load(gen_path)
        stream = np.concatenate([generated, stream[: len(generated)]])  # half answers, half stories
        print(f"teacher answers: {len(generated):,} tokens", flush=True)
    val = token_stream(tok, chat_or_plain(tok, _documents(args.data, [VAL_FILE], 200 if not args.tiny else 20), 1))
    special = [i for i in (tok.bos_id, *tok.eos_ids) if i is not None]
    special += [i for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
                if (i := tok._backend.token_to_id(t)) is not None] if tok.kind == "hf" else []
    vocab_map = frequent_tokens(stream, args.subset - 1, always=special)
    layers = [int(x) for x in args.layers.split(",")]
    if args.tiny:
        layers = layers[:1] if max(layers) < teacher.config.n_layers else [0]
    cfg, params, teacher_params = student_from_teacher(teacher, vocab_map, layers)
    if args.init_from:  # go on from a finished run: its student, its map (from its own stream) and its layers
        from cascade.models.training import load_trained

        init_cfg, params, _ = load_trained(args.init_from)
        with open(os.path.join(args.init_from, "training.json"), encoding="utf-8") as f:
            before = json.load(f)
        vocab_map = frequent_tokens(np.load(os.path.join(args.init_from, "stream.npy")), before["subset"] - 1,
                                    always=special)
        layers, cfg = before["layers_from_teacher"], init_cfg
    covered = float(np.isin(val, vocab_map).mean())
    print(f"data: {len(stream):,} training tokens, {len(val):,} validation; the draft's {len(vocab_map) - 1} tokens "
          f"cover {covered:.2%} of the validation text ({time.perf_counter() - t0:.1f} s)", flush=True)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                     warmup_steps=min(50, args.steps // 10), weight_decay=0.0, eval_every=max(1, args.steps // 8),
                     ckpt_every=max(1, args.steps // 8), eval_batches=2, seed=0)
    result = train(cfg, tc, stream, args.run_dir, val_tokens=val, params=params, teacher=teacher_params,
                   teacher_cfg=teacher.config, vocab_map=vocab_map, stop_after=args.stop_after,
                   extra_config={"teacher": args.teacher, "layers": layers, "subset": args.subset,
                                 "generate": args.generate, "init_from": args.init_from})
    rows = read_loss_log(os.path.join(args.run_dir, "loss.csv"))
    record = {"teacher": args.teacher, "layers_from_teacher": layers, "subset": len(vocab_map),
              "teacher_answers": args.generate, "init_from": args.init_from,
              "subset_covers_val_tokens": round(covered, 4), "train_tokens_available": int(len(stream)),
              "steps": result.step, "batch_size": args.batch, "seq_len": args.seq_len, "lr": args.lr,
              "tokens_seen": result.step * args.batch * args.seq_len,
              "training_seconds": round(training_seconds(rows), 1),
              "final_train_kl": float(rows[-1]["loss"]) if rows else None,
              "final_val_ce": next((float(r["val_loss"]) for r in reversed(rows) if r.get("val_loss")), None),
              "params": int(cfg.n_params), "data": TRAIN_FILES if not args.docs else f"first {args.docs} stories"}
    if args.init_from:
        record["first_run"] = before
    with open(os.path.join(args.run_dir, "training.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record), flush=True)
    if args.export and result.step >= args.steps:
        path = export(cfg, result.params, vocab_map, teacher, args.export, record, args.run_dir)
        print(f"exported to {path}", flush=True)


if __name__ == "__main__":
    main()
