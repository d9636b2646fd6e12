"""`cascade run` on the embedded default pair, end to end through the CLI."""

import json

import pytest

from cascade import cli


def run(capsys, *args):
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_on_the_defaults_prints_text_and_metrics(capsys):
    code, out, err = run(capsys, "run", "Once upon a time", "--max-tokens", "24")
    assert code == 0
    assert out.startswith("Once upon a time") and len(out.strip()) > len("Once upon a time") + 10
    assert "speculative: 24 tokens" in err and "acceptance" in err and "small int4, large int8" in err


def test_run_json_is_deterministic_for_a_seed_and_exact_when_greedy(capsys):
    sampled = ("run", "The dog", "--max-tokens", "20", "--temperature", "0.9", "--seed", "5", "--json")
    a = json.loads(run(capsys, *sampled)[1])
    b = json.loads(run(capsys, *sampled)[1])
    assert a["token_ids"] == b["token_ids"] and a["text"].strip()
    assert a["small"]["quant"] == "int4" and a["large"]["quant"] == "int8"
    assert a["small"]["weight_bytes"] < a["large"]["weight_bytes"]
    spec = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--json")[1])
    large = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--mode", "large", "--json")[1])
    assert spec["token_ids"] == large["token_ids"]  # the cascade's greedy output is the large model's
    s = spec["speculative"]
    assert s["rounds"] >= 1 and 4 * s["rounds"] - 6 <= s["draft_tokens"] <= 4 * s["rounds"]  # the last rounds: fewer
    assert 0 <= s["acceptance_rate"] <= 1
    assert large["speculative"] is None and large["small"] is None and large["draft_len"] is None  # loads only the large
    auto = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--draft-len", "auto", "--json")[1])
    assert auto["token_ids"] == large["token_ids"] and (auto["draft_len"], auto["draft_confidence"]) == ("auto", 0.5)
    a = auto["speculative"]
    assert a["rounds"] <= a["draft_tokens"] <= 8 * a["rounds"]  # adaptive: one to eight proposals a round


@pytest.mark.parametrize("args, code, message", [
    (("--draft-len", "0"), 2, "--draft-len"),
    (("--seed", "-1"), 2, "--seed"),
    (("--mode", "medium"), 2, "--mode"),
    (("--small-model", "no/such/model"), 2, "no such file"),
    (("--max-tokens", "600"), 1, "exceeds the context"),
    (("--large", "int5"), 2, "unknown precision spec"),
    (("--alpha", "0.3"), 2, "--alpha apply only to --mode spec-cascade"),
    (("--mode", "spec-cascade", "--alpha", "1.5"), 2, "--alpha"),
    (("--mode", "spec-cascade", "--rule", "best"), 2, "--rule"),
    (("--threshold", "-2"), 2, "--threshold apply only to --mode defer"),
    (("--mode", "defer", "--threshold", "nan"), 2, "--threshold"),
    (("--mode", "defer", "--defer-score", "vibes"), 2, "--defer-score"),
    (("--mode", "large", "--draft-len", "3"), 2, "--draft-len apply only to --mode speculative or spec-cascade"),
    (("--mode", "small", "--draft-confidence", "0.5"), 2, "--draft-confidence apply only to --mode speculative"),
    (("--draft-len", "fast"), 2, "draft_len must be a number of tokens or 'auto'"),
    (("--draft-confidence", "1.5"), 2, "--draft-confidence"),
    (("--budget", "5MB"), 1, "the plan needs 61,539,136 bytes for 1 sequence(s) of 512 positions"),
    (("--budget", "lots"), 2, "--budget"),
])
def test_bad_flags_are_one_line_errors(capsys, args, code, message):
    got, out, err = run(capsys, "run", "Once", *args)
    assert got == code and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_spec_cascade_reports_its_rule_and_deferrals(capsys):
    """alpha 0 defers every judged position (the large model's greedy output); alpha 1 never defers
    and accepts every proposal."""
    large = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--mode", "large", "--json")[1])
    exact = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--mode", "spec-cascade", "--alpha", "0",
                           "--json")[1])
    assert exact["rule"] == "chow" and exact["alpha"] == 0.0 and exact["draft_len"] == 4
    s = exact["speculative"]
    assert s["deferred_tokens"] == s["judged_tokens"] > 0 and s["deferral_rate"] == 1.0
    assert exact["token_ids"] == large["token_ids"]
    trusting = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--mode", "spec-cascade", "--alpha", "1",
                              "--rule", "chow", "--json")[1])
    t = trusting["speculative"]
    assert t["deferred_tokens"] == 0 and t["acceptance_rate"] == 1.0
    code, out, err = run(capsys, "run", "The dog", "--max-tokens", "12", "--mode", "spec-cascade", "--rule", "diff")
    assert code == 0 and "deferred (diff, alpha 0.1)" in err


def test_defer_mode_json_says_who_answered_and_why(capsys):
    d = json.loads(run(capsys, "run", "The dog", "--max-tokens", "12", "--mode", "defer", "--threshold", "0.5",
                       "--json")[1])
    assert d["mode"] == "defer" and d["answered_by"] == "large" and d["speculative"] is None
    assert d["deferral"]["score"] == "mean-logprob" and d["deferral"]["deferred"] is True
    assert d["deferral"]["value"] < 0.5 and "large model answered" in d["deferral"]["reason"]
    code, out, err = run(capsys, "run", "The dog", "--max-tokens", "12", "--mode", "defer", "--threshold", "-100")
    assert code == 0 and "small model's answer stands" in err


def test_prompts_file_runs_the_rows_together_and_reports_bad_ones(capsys, tmp_path):
    """Each good row equals that prompt run alone; an empty or over-long line is its own error
    (one line naming the row), the other rows complete, and the exit code is 1."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe dog ran\n" + "word " * 700 + "\n")
    code, out, err = run(capsys, "run", "--prompts", str(prompts), "--max-tokens", "16", "--json")
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["error"] == "the prompt is empty" and "leaves no room to generate" in rows[3]["error"]
    for r in (rows[0], rows[2]):
        alone = json.loads(run(capsys, "run", r["prompt"], "--max-tokens", "16", "--json")[1])
        assert r["token_ids"] == alone["token_ids"] and r["mode"] == "speculative"
    code, out, err = run(capsys, "run", "--prompts", str(prompts), "--max-tokens", "16", "--mode", "large")
    assert code == 1 and out.startswith("Once upon a time") and "The dog ran" in out
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: prompt 2 of " + str(prompts) + ": the prompt is empty",
        "error: prompt 4 of " + str(prompts) + ": the prompt is 1402 tokens; the context is 512, so the prompt "
        "alone leaves no room to generate: shorten the prompt"]
    assert run(capsys, "run", "Hello", "--prompts", str(prompts))[0] == 2  # PROMPT or --prompts, not both
