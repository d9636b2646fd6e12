"""The ``cascade`` command line: a thin layer over the Python API.

Conventions for every subcommand: ``--json`` prints one JSON object on stdout; tables,
progress bars and messages go to stderr; an error is one line on stderr (``error: ...``) with
a non-zero exit code (2 for bad usage, 1 otherwise), and a traceback only with ``--debug``.
"""

from __future__ import annotations

import json
import os
import sys
from importlib import metadata

import click

try:
    __version__ = metadata.version("cascade")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"


class NotBuiltYet(click.ClickException):
    """A subcommand whose machinery lands with a later issue: fail clearly, never pretend."""

    def __init__(self, command: str, needs: str):
        super().__init__(f"`cascade {command}` is not available yet: it needs {needs}, which this version does not have")


def _emit(ctx_json: bool, payload: dict, human: str) -> None:
    if ctx_json:
        click.echo(json.dumps(payload, allow_nan=False))  # strict JSON: NaN/Infinity are not JSON
    else:
        click.echo(human, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="cascade")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def app(debug: bool) -> None:
    """Quantize Llama-family models and serve them as a small/large cascade."""


@app.command()
@click.argument("prompt", required=False)
@click.option("--small", default="int4", show_default=True, help="Precision spec or rules for the draft model.")
@click.option("--large", default="int8", show_default=True, help="Precision spec or rules for the verifier model.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def run(prompt, small, large, as_json):
    """Generate with the cascade (small model drafts, large model verifies)."""
    raise NotBuiltYet("run", "model loaders and the embedded default model pair")


@app.command()
@click.argument("model")
@click.option("--quant", "quant_rules", required=True, help="Precision spec, inline rules or rules JSON file.")
@click.option("--axis", type=int, default=None,
              help="Reduction (input) axis of 2-D weights [default: 1 for .safetensors (PyTorch (out, in)), 0 for .npz].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def quantize(model, quant_rules, axis, as_json):
    """RTN-quantize the weights in MODEL (.safetensors or .npz) and report bytes and error.

    Writing a quantized model checkpoint arrives with model loading; this prints the
    per-tensor report of what each precision rule does to the weights.
    """
    import quant
    from models import weights_file

    rules = quant.PrecisionRules.parse(quant_rules)
    params = weights_file.load(model)
    axis = weights_file.default_reduction_axis(model) if axis is None else axis
    _, report = quant.quantize_params(params, rules, axis=axis)
    _emit(as_json, {"model": model, "axis": axis, "rules": rules.to_json(), **report.to_json()}, report.table())


@app.command()
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect(model, as_json):
    """List the tensors in a weights file (.safetensors or .npz): shape, dtype, bytes."""
    from models import weights_file

    params = weights_file.load(model)
    rows = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype), "bytes": int(v.nbytes)} for k, v in params.items()]
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [f"{'tensor':<{width}}  {'shape':<16} {'dtype':<9} {'bytes':>12}"]
    lines += [f"{r['name']:<{width}}  {'x'.join(map(str, r['shape'])):<16} {r['dtype']:<9} {r['bytes']:>12,}" for r in rows]
    total = sum(r["bytes"] for r in rows)
    lines.append(f"{len(rows)} tensors, {total:,} bytes")
    _emit(as_json, {"model": model, "tensors": rows, "bytes": total}, "\n".join(lines))


@app.command(name="eval")
@click.argument("model")
@click.option("--data", required=True, help="Text file to score.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def eval_(model, data, as_json):
    """Perplexity of MODEL on a text file."""
    raise NotBuiltYet("eval", "the Llama-family model and its loaders")


@app.command()
@click.option("--budget", help="Device memory budget, e.g. 2GiB.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def plan(budget, as_json):
    """Plan precisions for a model pair under a memory budget."""
    raise NotBuiltYet("plan", "the memory planner")


@app.group()
def bench():
    """Benchmarks (print a table; --json for rows)."""


def _csv_ints(ctx, param, value):
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(v <= 0 for v in out):
        raise click.BadParameter(f"expected positive integers, got {value!r}")
    return out


@bench.command(name="matmul")
@click.option("--batch", default="1,16,256", show_default=True, callback=_csv_ints, help="Comma-separated batch sizes.")
@click.option("--k", default=4096, show_default=True, type=click.IntRange(min=1), help="Input features.")
@click.option("--n", default=4096, show_default=True, type=click.IntRange(min=1), help="Output features.")
@click.option("--spec", "specs", default="int8,int4-g128", show_default=True, help="Comma-separated precision specs.")
@click.option("--backend", default=None, help="Matmul backend (default: best registered).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1), help="Timed runs (median).")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0), help="Untimed runs first.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True), help="Also write the JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def bench_matmul(batch, k, n, specs, backend, repeats, warmup, out_path, as_json):
    """Time float32 x @ W against the quantized dequant-matmul, side by side."""
    from bench import matmul as bench_mm

    result = bench_mm.run(batches=batch, k=k, n=n, specs=[s for s in specs.split(",") if s], backend=backend,
                          repeats=repeats, warmup=warmup)
    if out_path:
        _write_atomic(out_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    _emit(as_json, result, bench_mm.format_table(result))


@bench.command(name="error")
@click.option("--spec", "specs", default=None, help="Comma-separated precision specs (default: a standard set).")
@click.option("--k", default=2048, show_default=True, type=click.IntRange(min=1), help="Rows of the test weight.")
@click.option("--n", default=512, show_default=True, type=click.IntRange(min=1), help="Columns of the test weight.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True), help="Also write the JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def bench_error(specs, k, n, out_path, as_json):
    """Relative quantization error and bits/weight per spec and clip method."""
    from bench import quant_error

    kwargs = {"specs": [s for s in specs.split(",") if s]} if specs else {}
    result = quant_error.run(k=k, n=n, **kwargs)
    if out_path:
        _write_atomic(out_path, json.dumps(result, indent=2, allow_nan=False) + "\n")
    _emit(as_json, result, quant_error.format_table(result))


def _write_atomic(path: str, text: str) -> None:
    """Write via a temporary file and rename, so a failure never leaves a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs ``app`` and turns every failure into one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
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
    except Exception as e:  # noqa: BLE001 - the last resort: still one line, never a traceback
        if debug:
            raise
        click.echo(f"error: internal error ({type(e).__name__}: {_one_line(e)}); rerun with --debug for a traceback", err=True)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
