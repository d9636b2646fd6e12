"""Training a Llama-family model from scratch on plain text: the tokenizer and the loop.

* :func:`train_tokenizer` - a byte-level BPE (the GPT-2 scheme, via ``tokenizers``) on documents
  separated by ``<|endoftext|>`` lines; that one special token is both BOS and EOS, so a packed
  training stream ``<eot> story <eot> story ...`` scores each story as BOS + text + EOS.
* :func:`train` - next-token cross-entropy with optax AdamW (decoupled weight decay on matrices
  only, Loshchilov & Hutter 2019), linear warm-up then cosine decay, global-norm clipping, fp32
  master weights with an fp32 or bf16 forward.  Checkpoints are orbax, every ``ckpt_every`` steps
  and at the end; :func:`train` resumes from the latest one.  Batches are random windows of the
  token stream drawn from ``(seed, step)`` alone, so a resumed run sees exactly the batches an
  uninterrupted run would, and reproduces its losses.
* The loss is appended to ``loss.csv`` in the run directory and plotted to ``loss.png``.

The same loop carries QAT (:mod:`cascade.models.qat`): ``train(..., params=start,
transform=fake_quantize)`` starts from given weights and runs the forward pass on
``transform(params)`` (fake-quantized weights, straight-through gradients) while AdamW updates
the float master weights.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cascade.console import plural, progress_bar
from cascade.models import files
from cascade.models.config import ModelConfig
from cascade.models.llama import Transformer, init_params

EOT = "<|endoftext|>"
LOSS_CSV_FIELDS = ("step", "tokens", "lr", "loss", "grad_norm", "val_loss", "elapsed_s")


# ----------------------------------------------------------------------------------- tokenizer

def train_tokenizer(documents: Iterable[str], vocab_size: int, *, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``<|endoftext|>`` as id 0.

    Byte-level: every byte is in the base alphabet, so any text encodes and ``decode(encode(t))
    == t`` (no unknown token, no normalisation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if not 256 < vocab_size <= 65536:
        raise ValueError(f"vocab_size must be in (256, 65536] for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(documents, trainer=trainer)
    # transformers' tokenizer adds BOS through this; models.tokenizer adds it itself (add_bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                                       special_tokens=[(EOT, tok.token_to_id(EOT))])
    return tok


def save_hf_tokenizer(tok, directory) -> list[str]:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that ``transformers`` and
    :meth:`cascade.models.tokenizer.Tokenizer.from_hf_dir` both read (BOS = EOS = ``<|endoftext|>``, BOS added)."""
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
           "unk_token": None, "add_bos_token": True, "add_eos_token": False,
           "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]


def read_documents(paths: Iterable[str]) -> list[str]:
    """Documents of ``<|endoftext|>``-separated text files, in file order."""
    from cascade.models.evaluation import split_documents

    docs = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            docs += split_documents(f.read())
    return docs


def token_stream(tokenizer, documents: list[str]) -> np.ndarray:
    """``<eot> doc <eot> doc ... <eot>`` as one int32 array (``tokenizer`` is a ``tokenizers.Tokenizer``)."""
    eot = tokenizer.token_to_id(EOT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {EOT} token")
    parts = [np.array([eot], np.int32)]
    for enc in tokenizer.encode_batch(documents, add_special_tokens=False):
        parts += [np.asarray(enc.ids, np.int32), np.array([eot], np.int32)]
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------- loop

@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int  # optimizer steps in the whole run (the schedule's length)
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence (predictions per sequence)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up from 0
    weight_decay: float = 0.1  # AdamW decay on matrices (ndim >= 2) only
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clipping
    compute_dtype: str = "float32"  # forward/backward dtype: "float32" or "bfloat16" (master weights stay fp32)
    seed: int = 0  # parameter init and batch sampling
    eval_every: int = 100  # validation loss every this many steps (and at the end)
    eval_batches: int = 4  # validation batches of batch_size x seq_len
    ckpt_every: int = 200  # orbax checkpoint every this many steps (and at the end)
    log_every: int = 10  # loss.csv row every this many steps

    def __post_init__(self):
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        for name in ("steps", "batch_size", "seq_len", "eval_every", "ckpt_every", "log_every", "eval_batches", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("warmup_steps", "seed", "weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    decay = max(tc.steps, tc.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, decay, tc.lr * tc.min_lr_ratio)


def matrices(params):
    """The default weight-decay mask: matrices (ndim >= 2) only, no decay on norms and biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(tc: TrainConfig, decay_mask=matrices) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=decay_mask))


def _logits(params, cfg: ModelConfig, inputs, compute_dtype):
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1], dtype=jnp.int32), inputs.shape)
    if compute_dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
    logits, _ = Transformer(cfg, dtype=compute_dtype).apply({"params": params}, inputs, positions)
    return logits.astype(jnp.float32)


def distillation_loss(student_logits, teacher_logits):
    """Mean over positions of KL(teacher || student), the softmax distributions of the logits
    (forward KL, as LLM-QAT and BitDistiller train quantized students).  A teacher logit of
    ``-inf`` is a token of probability 0: it adds nothing (a reduced-vocabulary student's row that
    stands for no token)."""
    log_p = jax.nn.log_softmax(teacher_logits, axis=-1)
    log_q = jax.nn.log_softmax(student_logits, axis=-1)
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1).mean()


def subset_logits(logits, vocab_map):
    """Logits over a whole vocabulary (..., V) -> over a reduced vocabulary's rows (..., rows): each
    row's token's logit, ``-inf`` at the row that stands for every other token (entry -1)."""
    picked = jnp.take(logits, jnp.maximum(vocab_map, 0), axis=-1)
    return jnp.where(vocab_map >= 0, picked, -jnp.inf)


def lm_loss(params, cfg: ModelConfig, tokens, compute_dtype=jnp.float32, transform=None, teacher=None,
            teacher_cfg: ModelConfig | None = None, vocab_map=None):
    """Mean next-token cross-entropy of ``tokens`` (B, T+1): predict ``tokens[:, 1:]``; the forward
    pass runs on ``transform(params)`` when given (QAT's fake quantization).  With ``teacher``
    (float params of ``teacher_cfg``, by default the same architecture) the loss is instead
    :func:`distillation_loss` against the teacher's predictions on the same inputs (no gradient
    flows into the teacher).  ``vocab_map`` (rows,): ``cfg`` is a reduced-vocabulary model trained
    in its own rows (:func:`cascade.models.llama.subset_rows`): token ids (of the teacher's
    vocabulary, ``teacher_cfg.vocab_size``) become rows on the way in, and the teacher's
    distribution is restricted to the rows' tokens and renormalized (:func:`subset_logits`)."""
    if transform is not None:
        params = transform(params)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    own_inputs = inputs
    if vocab_map is not None:
        from cascade.models.llama import subset_rows

        vocab = (teacher_cfg or cfg).vocab_size
        own_inputs, targets = subset_rows(vocab_map, inputs, vocab), subset_rows(vocab_map, targets, vocab)
    logits = _logits(params, cfg, own_inputs, compute_dtype)
    if teacher is not None:
        t = jax.lax.stop_gradient(_logits(teacher, teacher_cfg or cfg, inputs, compute_dtype))
        return distillation_loss(logits, t if vocab_map is None else subset_logits(t, vocab_map))
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@partial(jax.jit, static_argnames=("cfg", "optimizer", "compute_dtype", "transform", "teacher_cfg"),
         donate_argnums=(0, 1))
def train_step(params, opt_state, tokens, *, cfg: ModelConfig, optimizer, compute_dtype, transform=None, teacher=None,
               teacher_cfg=None, vocab_map=None):
    loss, grads = jax.value_and_grad(lm_loss)(params, cfg, tokens, compute_dtype, transform, teacher, teacher_cfg,
                                              vocab_map)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@partial(jax.jit, static_argnames=("cfg", "compute_dtype", "transform", "vocab_size"))
def _eval_loss(params, tokens, *, cfg, compute_dtype, transform=None, vocab_map=None, vocab_size=None):
    teacher_cfg = None if vocab_size is None else dataclasses.replace(cfg, vocab_size=vocab_size, vocab_subset=None)
    return lm_loss(params, cfg, tokens, compute_dtype, transform, teacher_cfg=teacher_cfg, vocab_map=vocab_map)


def sample_batch(stream: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """``batch_size`` random windows of ``seq_len + 1`` tokens, a pure function of ``(seed, step)``."""
    if len(stream) < seq_len + 2:
        raise ValueError(f"the token stream ({plural(len(stream), 'token')}) is too short for one sequence "
                         f"(needs {seq_len + 2})")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len - 1, size=batch_size)
    return np.stack([stream[s:s + seq_len + 1] for s in starts])


def eval_batches(stream: np.ndarray, n_batches: int, batch_size: int, seq_len: int) -> list[np.ndarray]:
    """Fixed validation batches: consecutive windows from the start of ``stream``."""
    n = min(n_batches * batch_size, (len(stream) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"the validation stream ({plural(len(stream), 'token')}) is shorter than one sequence "
                         f"({seq_len + 1})")
    rows = np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])
    return [rows[i:i + batch_size] for i in range(0, n, batch_size)]


def validation_loss(params, cfg: ModelConfig, batches: list[np.ndarray], compute_dtype=jnp.float32,
                    transform=None, vocab_map=None, vocab_size: int | None = None) -> float:
    """Mean cross-entropy over ``batches``; a reduced-vocabulary model (``vocab_map``, token ids of a
    ``vocab_size`` vocabulary) predicts rows: a token outside its subset counts as its "other" row."""
    total = sum(float(_eval_loss(params, jnp.asarray(b), cfg=cfg, compute_dtype=compute_dtype, transform=transform,
                                 vocab_map=vocab_map, vocab_size=vocab_size if vocab_map is not None else None))
                * len(b) for b in batches)
    return total / sum(len(b) for b in batches)


@dataclasses.dataclass
class TrainResult:
    params: dict  # final fp32 parameters
    step: int  # steps done in total (including those before a resume)
    losses: list[float]  # training loss of every step run in this call
    val_loss: float | None  # last validation loss
    resumed_from: int | None  # the checkpoint step this call resumed from
    elapsed_s: float  # wall time of this call's steps
    loss_png: str | None = None  # the loss curve this call drew (None: not drawn, e.g. without matplotlib)


def _checkpoint_manager(run_dir):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(run_dir, "checkpoints")), options=options)


def train(cfg: ModelConfig, tc: TrainConfig, train_tokens: np.ndarray, run_dir, *,
          val_tokens: np.ndarray | None = None, stop_after: int | None = None, progress: bool = True,
          on_log: Callable[[dict], None] | None = None, params=None, transform=None,
          extra_config: dict | None = None, decay_mask=matrices, teacher=None, teacher_cfg: ModelConfig | None = None,
          vocab_map=None) -> TrainResult:
    """Train (or resume training) ``cfg`` on ``train_tokens`` for ``tc.steps`` steps in ``run_dir``.

    ``stop_after`` ends this call after that many total steps (a checkpoint is written there), to
    split a run over several calls; the schedule still spans ``tc.steps``.  ``params``: the
    starting weights (float32; default: a random init from ``tc.seed``).  ``transform``: a
    hashable function the forward pass applies to the weights (QAT).  ``extra_config`` is recorded
    in ``run.json`` with the configs (a resume under different values is refused).  ``decay_mask``:
    ``params -> bool pytree``, the leaves AdamW's weight decay applies to (default: matrices).
    ``teacher``: float params to distil from (the training loss becomes :func:`distillation_loss`;
    the validation loss stays the cross-entropy on the text); ``teacher_cfg``: its architecture when
    it is not ``cfg``'s; ``vocab_map``: train ``cfg`` as a reduced-vocabulary model (:func:`lm_loss`;
    the tokens are ids of the teacher's vocabulary).  ``progress``: False hides the
    progress display (:func:`cascade.console.progress_bar`: a bar on a terminal, plain lines in a log).
    """
    import orbax.checkpoint as ocp

    os.makedirs(run_dir, exist_ok=True)
    _write_run_config(run_dir, cfg, tc, extra_config)
    optimizer = make_optimizer(tc, decay_mask)
    compute_dtype = jnp.dtype(tc.compute_dtype)
    if params is None:
        params = init_params(cfg, jax.random.key(tc.seed))
    else:
        params = jax.tree.map(lambda a: jnp.array(a, jnp.float32, copy=True), params)  # the step donates its input
    if teacher is not None:  # cast once, not in every step
        teacher = jax.tree.map(lambda a: jnp.asarray(a, compute_dtype), teacher)
    if vocab_map is not None:
        vocab_map = jnp.asarray(vocab_map, jnp.int32)
    vocab_size = (teacher_cfg or cfg).vocab_size
    state = {"params": params, "opt_state": optimizer.init(params), "step": 0}
    mngr = _checkpoint_manager(run_dir)
    resumed_from = mngr.latest_step()
    if resumed_from is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(resumed_from, args=ocp.args.StandardRestore(abstract))
    params, opt_state, step = state["params"], state["opt_state"], int(state["step"])
    log_path = os.path.join(run_dir, "loss.csv")
    _truncate_log(log_path, step)
    previous_s = training_seconds(read_loss_log(log_path)) if os.path.exists(log_path) else 0.0
    val_sets = None if val_tokens is None else eval_batches(val_tokens, tc.eval_batches, tc.batch_size, tc.seq_len)
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    schedule = lr_schedule(tc)
    losses, val_loss = [], None
    bar = progress_bar(total=tc.steps, initial=step, desc="train" if transform is None else "qat", unit="step",
                       enabled=progress)
    t0 = time.perf_counter()
    try:
        while step < end:
            batch = jnp.asarray(sample_batch(train_tokens, step, tc.batch_size, tc.seq_len, tc.seed))
            params, opt_state, m = train_step(params, opt_state, batch, cfg=cfg, optimizer=optimizer,
                                              compute_dtype=compute_dtype, transform=transform, teacher=teacher,
                                              teacher_cfg=teacher_cfg, vocab_map=vocab_map)
            step += 1
            loss = float(m["loss"])
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step}; lower the learning rate")
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
            is_last = step == end
            evaluated = val_sets is not None and (step % tc.eval_every == 0 or step == tc.steps)
            if evaluated:
                val_loss = validation_loss(params, cfg, val_sets, compute_dtype, transform, vocab_map, vocab_size)
            if step % tc.log_every == 0 or is_last or evaluated:
                row = {"step": step, "tokens": step * tc.batch_size * tc.seq_len, "lr": float(schedule(step - 1)),
                       "loss": loss, "grad_norm": float(m["grad_norm"]), "val_loss": val_loss if evaluated else "",
                       "elapsed_s": round(previous_s + time.perf_counter() - t0, 2)}
                _append_log(log_path, row)
                if on_log:
                    on_log(row)
            if step % tc.ckpt_every == 0 or is_last:
                mngr.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": opt_state, "step": step}))
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
    png = os.path.join(run_dir, "loss.png")
    plotted = plot_loss(log_path, png)
    return TrainResult(params=params, step=step, losses=losses, val_loss=val_loss, resumed_from=resumed_from,
                       loss_png=png if plotted else None,
                       elapsed_s=time.perf_counter() - t0)


def _write_run_config(run_dir, cfg: ModelConfig, tc: TrainConfig, extra: dict | None = None):
    """``run.json`` records the configs; resuming under different ones is refused."""
    path = os.path.join(run_dir, "run.json")
    want = {"model": cfg.to_dict(), "train": tc.to_dict(), **({"qat": extra} if extra else {})}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
        if have != json.loads(json.dumps(want)):
            raise ValueError(f"{run_dir}: holds a run with a different model or training config; use a new directory")
        return
    files.write_json(path, want)


def _truncate_log(path, step: int):
    """Drop rows past ``step`` (written after the checkpoint a resume starts from)."""
    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8") as f:
        # a row torn by a kill mid-write has missing fields: drop it
        rows = [r for r in csv.DictReader(f) if r.get("elapsed_s") and int(r["step"]) <= step]
    with files.atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=LOSS_CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


def _append_log(path, row: dict):
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=LOSS_CSV_FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)


def training_seconds(rows: list[dict]) -> float:
    """Wall time of a run from its ``loss.csv`` rows (``elapsed_s`` restarts at 0 in logs written
    by resumed runs of older versions: those segments are summed)."""
    total, last = 0.0, 0.0
    for r in rows:
        e = float(r["elapsed_s"])
        if e < last:
            total += last
        last = e
    return total + last


def read_loss_log(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_loss(csv_path, png_path) -> bool:
    """Training (and validation) loss against tokens seen, to ``png_path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_loss_log(csv_path) if os.path.exists(csv_path) else []
    if not rows:
        return False
    tokens = [int(r["tokens"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(tokens, [float(r["loss"]) for r in rows], label="train", lw=1)
    val = [(int(r["tokens"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    if val:
        ax.plot(*zip(*val), "o-", label="validation", ms=3)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


def load_trained(run_dir, step: int | None = None):
    """``(config, fp32 params, step)`` of a run's latest (or given) checkpoint."""
    import orbax.checkpoint as ocp

    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
        run = json.load(f)
    cfg = ModelConfig.from_dict(run["model"])
    tc = TrainConfig(**run["train"])
    mngr = _checkpoint_manager(run_dir)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{run_dir}: no checkpoint yet")
        params = init_params(cfg, jax.random.key(0))
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                {"params": params, "opt_state": make_optimizer(tc).init(params), "step": 0})
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    finally:
        mngr.close()
    return cfg, state["params"], int(state["step"])
