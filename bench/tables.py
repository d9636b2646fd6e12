"""Markdown tables of benchmark results, built from ``bench/results/*.json``.

The documentation never copies a measured number by hand: a page names a result file with a
placeholder, ``<!-- results:ptq-stories260K -->``, and the MkDocs hook (``docs/hooks.py``) puts
``table("ptq-stories260K")`` in its place at build time. The README's one headline table is
``table("headline")``, checked against the JSON by ``tests/test_readme.py``.

One function per kind of result (the ``benchmark`` key each JSON file carries); each is a list
of columns, ``(header, how to read a row)``, so a table says what it shows in one place.

    python -m cascade.bench.tables ptq-stories260K     # print one table
    python -m cascade.bench.tables --list              # the names a placeholder may use
"""

from __future__ import annotations

import json
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
PLACEHOLDER = re.compile(r"<!-- results:([A-Za-z0-9_.\-]+) -->")

Column = tuple[str, Callable[[dict], str]]


def _num(key: str, digits: int = 3) -> Callable[[dict], str]:
    """A number with ``digits`` decimals, thousands separated; blank when absent or null."""
    return lambda row: "" if row.get(key) is None else f"{row[key]:,.{digits}f}"


def _int(key: str) -> Callable[[dict], str]:
    """A count (bytes, tokens, steps), rounded to a whole number."""
    return lambda row: "" if row.get(key) is None else f"{row[key]:,.0f}"


def _pct(key: str, digits: int = 1) -> Callable[[dict], str]:
    """A fraction (0.873) shown as a percentage (87.3%)."""
    return lambda row: "" if row.get(key) is None else f"{100 * row[key]:.{digits}f}%"


def _signed(key: str, digits: int = 3, suffix: str = "") -> Callable[[dict], str]:
    return lambda row: "" if row.get(key) is None else f"{row[key]:+.{digits}f}{suffix}"


def _text(key: str) -> Callable[[dict], str]:
    return lambda row: "" if row.get(key) is None else f"{row[key]}"


def _code(key: str) -> Callable[[dict], str]:
    return lambda row: "" if row.get(key) is None else f"`{row[key]}`"


def _name(path_key: str) -> Callable[[dict], str]:
    """The last part of a path (a data file, a model file)."""
    return lambda row: "" if row.get(path_key) is None else pathlib.PurePath(str(row[path_key])).name


def markdown(columns: Sequence[Column], rows: Sequence[dict]) -> str:
    """A markdown table: text columns left-aligned, numeric ones right-aligned."""
    cells = [[read(row) for _, read in columns] for row in rows]
    numeric = [all(re.fullmatch(r"[-+]?[\d,.]*%?|", r[i].replace("x", "")) for r in cells)
               for i in range(len(columns))]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |",
             "| " + " | ".join("---:" if n else "---" for n in numeric) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
    return "\n".join(lines)


def _ptq(result: dict) -> str:
    columns: list[Column] = [("spec", _code("spec")), ("method", _text("method"))]
    if any("data" in r for r in result["rows"]):
        columns.append(("data", _name("data")))
    if any("alpha" in r for r in result["rows"]):
        columns.append(("alpha", _text("alpha")))
    columns += [("ppl", _num("ppl")), ("Δppl", _signed("delta_ppl")), ("KLD", _num("kld_mean", 4)),
                ("KLD p99", _num("kld_p99")), ("top-1", _pct("top1_agreement")),
                ("gap closed", _pct("gap_closed", 0)), ("bytes", _int("weight_bytes"))]
    return markdown(columns, result["rows"])


def _workflow(result: dict) -> str:
    columns: list[Column] = [("budget (as)", _code("target")), ("config", _text("config")),
                             ("method", _text("method")), ("bits/w", _num("avg_bits", 2)),
                             ("ppl", _num("ppl")), ("KLD", _num("kld_mean", 4)),
                             ("top-1", _pct("top1_agreement")), ("bytes", _int("weight_bytes"))]
    return markdown(columns, result["rows"])


def _qat(result: dict) -> str:
    columns: list[Column] = [("stage", _text("stage")), ("method", _text("method")), ("spec", _code("spec")),
                             ("ppl", _num("ppl")), ("KLD", _num("kld_mean", 4)),
                             ("top-1", _pct("top1_agreement")), ("gap closed", _pct("gap_closed", 0)),
                             ("steps", _int("steps")), ("bytes", _int("weight_bytes"))]
    return markdown(columns, result["rows"])


def _kv_cache(result: dict) -> str:
    columns: list[Column] = [("KV cache", _code("kv")), ("ppl", _num("ppl", 4)),
                             ("change", _signed("ppl_change_pct", 2, "%")),
                             ("bytes/token", _int("kv_bytes_per_token")),
                             ("vs fp16 (token)", _pct("vs_fp16_per_token")),
                             ("vs fp16 (sequence)", _pct("vs_fp16_per_sequence")),
                             ("greedy agreement", _pct("gen_teacher_forced_agreement")),
                             ("diverges at", _text("gen_first_divergence"))]
    return markdown(columns, result["rows"])


def _matmul(result: dict) -> str:
    columns: list[Column] = [("spec", _code("spec")), ("backend", _text("backend")), ("batch", _int("batch")),
                             ("k x n", lambda r: f"{r['k']} x {r['n']}"), ("ms", _num("ms", 3)),
                             ("vs fp32", _num("speedup_vs_f32", 2)), ("GB/s", _num("gb_s", 1))]
    return markdown(columns, result["rows"])


def _decode(result: dict) -> str:
    columns: list[Column] = [("engine", _text("engine")), ("spec", _code("spec"))]
    if any("kv" in r for r in result["rows"]):
        columns += [("KV cache", _code("kv")), ("attention", _text("attention"))]
    columns += [("tokens/s", _num("tokens_per_s", 1)), ("step ms", _num("step_ms", 1)),
                ("matmul ms", _num("matmul_ms", 1)), ("vs llama.cpp", _num("vs_llamacpp", 2))]
    ks = next((list(r["vs_one_row"]) for r in result["rows"] if r.get("vs_one_row")), [])
    columns += [(f"{k} rows vs 1", lambda r, k=k: "" if not r.get("vs_one_row") else f"{r['vs_one_row'][k]:.2f}")
                for k in ks if k != "1"]
    return markdown(columns, result["rows"])


def _mode(row: dict) -> str:
    """A router mode with the settings that distinguish its rows."""
    settings = [f"{k} {row[k]}" for k in ("draft_len", "draft_confidence", "rule", "alpha", "threshold", "per_call")
                if row.get(k) is not None]
    return row["mode"] + (f" ({', '.join(settings)})" if settings else "")


def _cascade(result: dict) -> str:
    columns: list[Column] = [("mode", _mode), ("tokens/s", _num("tokens_per_s", 1)), ("vs large", _num("vs_large", 2)),
                             ("large calls/token", _num("large_calls_per_token", 3)),
                             ("acceptance", _pct("acceptance_rate")), ("ppl under large", _num("ppl_under_large", 3)),
                             ("agreement", _pct("agreement"))]
    return markdown(columns, result["rows"])


def _drafting(result: dict) -> str:
    columns: list[Column] = [("mode", _mode), ("tokens/s", _num("tokens_per_s", 1)), ("vs large", _num("vs_large", 2)),
                             ("acceptance", _pct("acceptance")), ("drafted/round", _num("drafted_per_round", 2)),
                             ("large calls/token", _num("large_calls_per_token", 3)), ("exact", _text("exact"))]
    return markdown(columns, result["rows"])


def _perplexity(result: dict) -> str:
    columns: list[Column] = [("spec", _code("spec")), ("ppl", _num("ppl", 4)), ("change", _signed("ppl_change_pct", 2, "%")),
                             ("bytes", _int("weight_bytes")), ("bytes vs source", _pct("bytes_vs_first"))]
    return markdown(columns, result["rows"])


def _quant_error(result: dict) -> str:
    columns: list[Column] = [("spec", _code("spec")), ("weights", _text("weights")),
                             ("bits/weight", _num("bits_per_weight", 3)), ("relative error", _num("rel_error", 4))]
    return markdown(columns, result["rows"])


def _sharded(result: dict) -> str:
    columns: list[Column] = [("layout", _text("layout")), ("tokens/s", _num("tokens_per_s", 1)),
                             ("vs one device", _num("vs_one_device", 2)), ("same tokens", _text("same_tokens"))]
    return markdown(columns, result["rows"])


def _default_pair(result: dict) -> str:
    """The embedded pair's quality and size (``bench/default_pair.py``); also the README's headline."""
    columns: list[Column] = [("model", _text("model")), ("weights", _code("weights")), ("perplexity", _num("ppl", 3)),
                             ("weight bytes", _int("weight_bytes"))]
    return markdown(columns, result["perplexity"])


def _ptq_rows(result: dict) -> list[dict]:
    """The ``ptq`` rows of every source a ``ptq-defaults`` result names, each with its ``model``
    (the source's ``label``) and its source file's float perplexity per data file."""
    rows = []
    for source in result["sources"]:
        data = result["loaded"][source["file"]]
        floats = {pathlib.PurePath(e["data"]).name: e["float_ppl"] for e in data.get("evaluations", [])}
        floats.setdefault(pathlib.PurePath(data["data"]).name, data["float_ppl"])
        for row in data["rows"]:
            data_name = pathlib.PurePath(row.get("data") or data["data"]).name
            rows.append({**row, "model": source["label"], "data_name": data_name, "float": floats.get(data_name)})
    return rows


def _ptq_defaults(result: dict) -> str:
    """Per model, spec and evaluation text: RTN and each method side by side, the default method
    (``result["default"]``: ``method`` on the spec with the ``clip`` range search, which is what
    ``cascade quantize --calib`` runs) and the share of RTN's gap to float it closes
    (``view: "methods"``); or each method on the narrow and the full symmetric grid (``view: "grid"``)."""
    rows = _ptq_rows(result)

    def find(model, data, spec, method):
        hits = [r for r in rows if (r["model"], r["data_name"], r["spec"], r["method"]) == (model, data, spec, method)]
        return hits[-1] if hits else None  # the newest source wins (sources are listed oldest first)

    default = result["default"]
    cells = []
    for model, data, spec in result["cells"]:
        spec_rows = [r for r in rows if (r["model"], r["data_name"]) == (model, data)]
        if not spec_rows:
            raise ValueError(f"ptq-defaults: no rows for {model} on {data}")
        cell = {"model": model, "data": data, "spec": spec, "float": spec_rows[0]["float"]}
        if result.get("view") == "grid":
            for method in result["methods"]:
                for grid, name in (("narrow", _with_grid(spec, "narrow")), ("full", spec)):
                    hit = find(model, data, name, method)
                    cell[f"{method}/{grid}"] = None if hit is None else hit["ppl"]
        else:
            for method in result["methods"]:
                hit = find(model, data, spec, method)
                cell[method] = None if hit is None else hit["ppl"]
            hit = find(model, data, spec, "default") or find(model, data, f"{spec}-{default['clip']}", default["method"])
            cell["default"] = None if hit is None else hit["ppl"]
            rtn, ref = cell.get("rtn"), cell["float"]
            cell["closes"] = (None if None in (rtn, cell["default"]) or rtn <= ref
                              else (rtn - cell["default"]) / (rtn - ref))
        cells.append(cell)
    columns: list[Column] = [("model", _text("model")), ("data", _text("data")), ("spec", _code("spec")),
                             ("float", _num("float"))]
    if result.get("view") == "grid":
        columns += [(f"{m} {g}", _num(f"{m}/{g}")) for m in result["methods"] for g in ("narrow", "full")]
    else:
        columns += [(m, _num(m)) for m in result["methods"]]
        columns += [(f"default ({default['method']}, -{default['clip']})", _num("default")),
                    ("default closes", _pct("closes", 0))]
    return markdown(columns, cells)


def _with_grid(spec: str, grid: str) -> str:
    """``int3-g32`` -> ``int3-g32-narrow`` (the grid token goes after the granularity, before a clip)."""
    parts = spec.split("-")
    at = 2 if len(parts) > 1 and (parts[1].startswith("g") or parts[1] in ("tensor", "channel")) else 1
    return "-".join(parts[:at] + [grid] + parts[at:])


def _serve(result: dict) -> str:
    """`cascade bench serve` (``bench/serve.py``): throughput and latency per number of clients."""
    columns: list[Column] = [("stream", lambda r: "yes" if r["stream"] else "no"), ("clients", _int("clients")),
                             ("requests", _int("requests")), ("tokens/s", _num("tokens_per_s", 1)),
                             ("vs one client", _num("vs_one_client", 2)), ("first token p50 (s)", _num("ttft_p50_s", 3)),
                             ("first token p95 (s)", _num("ttft_p95_s", 3)), ("latency p95 (s)", _num("latency_p95_s", 3)),
                             ("lost / duplicated / garbled", lambda r: f"{r['lost']} / {r['duplicated']} / {r['garbled']}")]
    return markdown(columns, result["rows"])


_EXPORT_COLUMNS: list[Column] = [
    ("method", _text("method")), ("spec", _code("spec")), ("ggml type", _text("file_type")),
    ("ppl cascade", _num("ppl_cascade", 4)), ("ppl llama.cpp", _num("ppl_llamacpp", 4)),
    ("llama.cpp vs cascade", _signed("ppl_gap_pct", 3, "%")),
    ("same continuations", lambda r: "" if r.get("same_continuations") is None else f"{r['same_continuations']}/{r['prompts']}"),
    ("first difference (mean)", _num("first_difference", 1)), ("file MB", lambda r: f"{r['file_bytes'] / 1e6:.2f}"),
    ("tokenizer", lambda r: "same" if r["tokenizer_equal"] else "differs")]


def _export(result: dict) -> str:
    """`cascade bench export` (``bench/export.py``): each exported file in llama.cpp against cascade."""
    return markdown(_EXPORT_COLUMNS, result["rows"])


def _export_summary(result: dict) -> str:
    """Several ``export`` results joined (``sources``), one row per model and method, with
    llama.cpp's own Q4_0 of the same float weights beside them (``view: "readme"``: the default
    method's rows only)."""
    rows = []
    for source in result["sources"]:
        data = result["loaded"][source["file"]]
        peer = next((r for r in data["rows"] if r["asked"] == "llamacpp-q4_0"), None)
        for row in data["rows"]:
            if row["asked"] != "llamacpp-q4_0":
                rows.append({**row, "model": source["label"], "peer": None if peer is None else peer["ppl_llamacpp"],
                             "peer_bytes": None if peer is None else peer["file_bytes"]})
    columns = [("model", _text("model")), *_EXPORT_COLUMNS[:2], *_EXPORT_COLUMNS[3:9],
               ("llama.cpp's own Q4_0", _num("peer", 4)), ("its MB", lambda r: "" if r.get("peer_bytes") is None else f"{r['peer_bytes'] / 1e6:.2f}")]
    if result.get("view") == "readme":  # the README's: the default method only, without the spec
        rows = [r for r in rows if r["asked"] == "default"]
        columns = [c for c in columns if c[0] not in ("spec", "first difference (mean)")]
    return markdown(columns, rows)


KINDS: dict[str, Callable[[dict], str]] = {
    "export": _export, "export-summary": _export_summary,
    "ptq-defaults": _ptq_defaults,
    "ptq": _ptq, "workflow": _workflow, "qat": _qat, "kv_cache": _kv_cache, "matmul": _matmul,
    "decode": _decode, "cascade": _cascade, "drafting": _drafting, "perplexity": _perplexity,
    "quant_error": _quant_error, "sharded": _sharded, "default-pair": _default_pair, "serve": _serve,
}
ALIASES = {"headline": "default-pair"}  # the README's table


def load(name: str, results: pathlib.Path = RESULTS) -> dict:
    """The result ``results/<name>.json`` (an alias first resolved), with a clear error if absent."""
    path = results / f"{ALIASES.get(name, name)}.json"
    if not path.is_file():
        raise ValueError(f"no benchmark result {path.name} in {results}")
    return json.loads(path.read_text())


def table(name: str, results: pathlib.Path = RESULTS) -> str:
    """The markdown table of one result file, chosen by the kind of benchmark that wrote it."""
    result = load(name, results)
    kind = result.get("benchmark") or result.get("bench")
    if kind in ("ptq-defaults", "export-summary"):  # a table joined from other results: read them from the same folder
        result = {**result, "loaded": {s["file"]: load(s["file"], results) for s in result["sources"]}}
    if kind not in KINDS:
        raise ValueError(f"{name}.json: no table for benchmark kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    return KINDS[kind](result)


def fill(markdown_text: str, results: pathlib.Path = RESULTS) -> str:
    """``markdown_text`` with every ``<!-- results:NAME -->`` replaced by ``table(NAME)``."""
    return PLACEHOLDER.sub(lambda m: table(m.group(1), results), markdown_text)


def names(results: pathlib.Path = RESULTS) -> list[str]:
    """Every result a placeholder can name: the files whose kind has a table, and the aliases."""
    found = []
    for path in sorted(results.glob("*.json")):
        result = json.loads(path.read_text())
        if (result.get("benchmark") or result.get("bench")) in KINDS:
            found.append(path.stem)
    return found + sorted(ALIASES)


def main(argv: Sequence[str]) -> int:
    if list(argv) == ["--list"]:
        print("\n".join(names()))
        return 0
    if len(argv) != 1:
        print("usage: python -m cascade.bench.tables NAME | --list", file=sys.stderr)
        return 2
    try:
        print(table(argv[0]))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
