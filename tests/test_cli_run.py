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
    assert "speculative: 24 tokens" in err and "acceptance" in err and "small int4-full, large int8" in err


def test_run_json_is_deterministic_for_a_seed_and_exact_when_greedy(capsys):
    sampled = ("run", "The dog", "--max-tokens", "20", "--temperature", "0.9", "--seed", "5", "--json")
    a = json.loads(run(capsys, *sampled)[1])
    b = json.loads(run(capsys, *sampled)[1])
    assert a["token_ids"] == b["token_ids"] and a["text"].strip()
    assert a["small"]["quant"] == "int4-full" and a["large"]["quant"] == "int8"  # every 2-4-bit grid said
    assert a["small"]["method"] == a["large"]["method"] == "rtn"
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
    (("--alpha", "0.3"), 2, "--alpha applies only to --mode spec-cascade"),
    (("--mode", "spec-cascade", "--alpha", "1.5"), 2, "--alpha"),
    (("--mode", "spec-cascade", "--rule", "best"), 2, "--rule"),
    (("--threshold", "-2"), 2, "--threshold applies only to --mode defer"),
    (("--mode", "defer", "--threshold", "nan"), 2, "--threshold"),
    (("--mode", "defer", "--defer-score", "vibes"), 2, "--defer-score"),
    (("--mode", "large", "--draft-len", "3"), 2, "--draft-len applies only to --mode speculative or spec-cascade"),
    (("--mode", "small", "--draft-confidence", "0.5"), 2, "--draft-confidence applies only to --mode speculative"),
    (("--draft-len", "fast"), 2, "draft_len must be a number of tokens or 'auto'"),
    (("--draft-confidence", "1.5"), 2, "--draft-confidence"),
    (("--budget", "5MB"), 1, "of 130 positions"),  # what this run allocates: 2 prompt tokens + 128 new
    (("--budget", "0.5"), 2, "--budget"),
    (("--budget", "-5"), 2, "must be positive"),
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
    """Each good row equals that prompt run alone; blank lines are skipped; an over-long line is its
    own error (one line naming the prompt and its line), the other rows complete, and the exit code is 1."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\n  \nThe dog ran\n" + "word " * 700 + "\n")
    code, out, err = run(capsys, "run", "--prompts", str(prompts), "--max-tokens", "16", "--json")
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert "leaves no room to generate" in rows[2]["error"]
    for r in (rows[0], rows[1]):
        alone = json.loads(run(capsys, "run", r["prompt"], "--max-tokens", "16", "--json")[1])
        assert r["token_ids"] == alone["token_ids"] and r["mode"] == "speculative"
    code, out, err = run(capsys, "run", "--prompts", str(prompts), "--max-tokens", "16", "--mode", "large")
    assert code == 1 and out.startswith("Once upon a time") and "The dog ran" in out
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: prompt 3 of " + str(prompts) + " (line 5): the prompt is 1402 tokens; the context is 512, so the "
        "prompt alone leaves no room to generate: shorten the prompt"]
    assert run(capsys, "run", "Hello", "--prompts", str(prompts))[0] == 2  # PROMPT or --prompts, not both


def _suggestions(message: str) -> list[list[str]]:
    """The changes an over-budget message says would fit, each as the command-line words it names."""
    import re

    assert "would fit:" in message, message
    return [label.split() for label in re.findall(r"(--[a-z-]+ [^ ,()]+(?: --[a-z-]+ [^ ,()]+)*) \(",
                                                   message.split("would fit:")[1])]


@pytest.mark.parametrize("command", [
    ("run", "Once upon a time", "--max-tokens", "6", "--budget", "7MB"),
    ("run", "Once upon a time", "--max-tokens", "300", "--budget", "9MB"),
    ("run", "Once upon a time", "--max-tokens", "200", "--small-kv", "int8", "--budget", "9MB"),
    ("plan", "--budget", "40MB"),
    ("plan", "--budget", "64MB", "--batch", "4", "--large-kv", "int8"),
])
def test_every_budget_suggestion_is_a_flag_of_the_command_and_fits(capsys, command):
    """Over budget, each suggested change is a flag of the same command, and the command run again
    with it appended (a later flag overrides an earlier one) passes the budget (issue 38: `run` was
    told to use `--ctx`, which it does not have)."""
    code, out, err = run(capsys, *command)
    assert code == 1, err
    tries = _suggestions(err.strip().splitlines()[-1])
    assert tries
    for change in tries:
        code, out, err = run(capsys, *command, *change)
        assert code == 0, (change, err)


def test_run_plans_for_what_it_generates(capsys):
    """A short run fits a budget that the whole context does not (issue 38: `run --max-tokens 6
    --budget 40MB` could never pass): the plan counts the prompt's tokens and --max-tokens."""
    code, out, err = run(capsys, "plan", "--budget", "40MB")
    assert code == 1  # the whole context (512 positions) does not fit
    code, out, err = run(capsys, "run", "Once upon a time", "--max-tokens", "6", "--budget", "40MB", "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == json.loads(run(capsys, "run", "Once upon a time", "--max-tokens", "6",
                                                          "--json")[1])["token_ids"]


def test_plan_and_budget_errors_blame_the_right_flag_before_any_work(capsys):
    """A small model that cannot be split over --small-devices names --small-devices, not --mesh;
    --ctx beyond the context and a budget under a byte are usage errors (exit 2) like `eval`'s."""
    for args, flag, code_want in ((("--mesh", "tp=2", "--small-devices", "3"), "'--small-devices'", 2),
                                  (("--mesh", "tp=3"), "'--mesh'", 2),
                                  (("--ctx", "100000"), "'--ctx'", 2),
                                  (("--budget", "0.5"), "'--budget'", 2),
                                  (("--budget", "0"), "'--budget'", 2),
                                  (("--budget", "-5MB"), "'--budget'", 2)):
        code, out, err = run(capsys, "plan", *args)
        lines = err.strip().splitlines()
        assert code == code_want and out == "" and len(lines) == 1 and flag in lines[0], (args, err)
        assert "'--mesh'" not in lines[0] or flag == "'--mesh'"


def test_help_says_only_what_holds(capsys):
    """--threshold shows no "x<=None"; what --alpha's help says alpha 0 and 1 do holds for each rule
    it names (issue 38: it claimed "0 = exact speculation" for every rule, true only for chow)."""
    import re

    code, out, err = run(capsys, "run", "--help")
    text = " ".join(out.split())
    assert code == 0 and "x<=None" not in text
    start = text.index("--alpha FLOAT")
    alpha = text[start:text.index("--defer-score [", start)]  # up to the next option
    rules = ("chow", "diff", "opt")
    claimed = {r: bool(re.search(r"0 = [^;)]*exact speculation", alpha)) or
               bool(re.search(rf"0 with [a-z/]*\b{r}\b[a-z/]* = [^;)]*exact speculation", alpha)) for r in rules}
    assert claimed["chow"]  # the one rule whose alpha 0 is exact
    base = ("run", "The dog", "--max-tokens", "20", "--json")
    exact = json.loads(run(capsys, *base)[1])["token_ids"]
    for rule in rules:
        zero = json.loads(run(capsys, *base, "--mode", "spec-cascade", "--rule", rule, "--alpha", "0")[1])
        if claimed[rule]:
            assert zero["token_ids"] == exact, rule
        else:
            assert re.search(rf"0 with [a-z/]*\b{rule}\b[a-z/]* = [^;)]*not exact", alpha), rule
        if "1 = never defer, every rule" in alpha:
            one = json.loads(run(capsys, *base, "--mode", "spec-cascade", "--rule", rule, "--alpha", "1")[1])
            assert one["speculative"]["deferred_tokens"] == 0, rule


def test_run_without_a_prompt_says_which_it_used(capsys):
    code, out, err = run(capsys, "run", "--max-tokens", "3", "--mode", "small")
    assert code == 0 and "default prompt 'Once upon a time'" in err and out.startswith("Once upon a time")
    d = json.loads(run(capsys, "run", "--max-tokens", "3", "--mode", "small", "--json")[1])
    assert d["default_prompt"] is True and d["prompt"] == "Once upon a time"
    code, out, err = run(capsys, "run", "Hi", "--max-tokens", "3", "--mode", "small", "--json")
    assert json.loads(out)["default_prompt"] is False and "default prompt" not in err


def test_an_already_quantized_checkpoint_runs_as_stored(capsys, tmp_path):
    """`run --small-model CHECKPOINT` keeps a checkpoint saved by `cascade quantize` as stored
    (issue 38: it was re-quantized to int4 by default); `--small SPEC` given re-quantizes; a float
    model still gets int4/int8 by default; `plan` and `load_pair` follow the same default."""
    from cascade.models import load_model, weight_bytes
    from cascade.pair import load_pair

    ck = str(tmp_path / "small-int8")
    assert run(capsys, "quantize", "default-small", "--quant", "int8-g32", "-o", ck)[0] == 0
    stored = weight_bytes(load_model(ck).params)
    base = ("run", "The dog", "--max-tokens", "4", "--small-model", ck, "--json")
    d = json.loads(run(capsys, *base)[1])
    assert d["small"]["quant"] == "int8-g32" and d["small"]["weight_bytes"] == stored
    assert d["large"]["quant"] == "int8"  # the float default-large: int8 as before
    d = json.loads(run(capsys, *base, "--small", "int4")[1])
    assert d["small"]["quant"] == "int4-full" and d["small"]["weight_bytes"] < stored
    p = json.loads(run(capsys, "plan", "--small-model", ck, "--json")[1])
    assert [(m["role"], m["quant"], m["weight_bytes"]) for m in p["models"]][0] == ("small", "int8-g32", stored)
    assert weight_bytes(load_pair(ck, None).small.params) == stored


def test_prompts_files_read_the_same_in_run_and_compare(capsys, tmp_path, monkeypatch):
    """One reading of --prompts: blank and whitespace-only lines skipped, a binary file and a file
    of no prompts refused with exit 2, and `-` reads standard input, in `run` and `compare` alike."""
    import io
    import sys

    good = tmp_path / "good.txt"
    good.write_text("The dog\n\n   \nOnce upon a time\n")
    runs = {"run": ("run", "--max-tokens", "2", "--mode", "small", "--json"),
            "compare": ("compare", "default-small", "default-small", "--max-tokens", "2", "--json")}

    def prompts_of(name, out):
        if name == "run":
            return [json.loads(line)["prompt"] for line in out.splitlines()]
        return [r["prompt"] for r in json.loads(out)["prompts"]]

    for name, args in runs.items():
        code, out, err = run(capsys, *args, "--prompts", str(good))
        assert code == 0 and prompts_of(name, out) == ["The dog", "Once upon a time"], (name, err)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(good.read_bytes())))
        code, out, err = run(capsys, *args, "--prompts", "-")
        assert code == 0 and prompts_of(name, out) == ["The dog", "Once upon a time"], (name, err)
    for content, why in ((b"\xff\xfe\x00binary", "not UTF-8"), (b"ok\x00\x01", "NUL"), (b"\n  \n", "no prompts")):
        bad = tmp_path / "bad.txt"
        bad.write_bytes(content)
        for name, args in runs.items():
            code, out, err = run(capsys, *args, "--prompts", str(bad))
            lines = err.strip().splitlines()
            assert code == 2 and out == "" and len(lines) == 1 and why in lines[0], (name, content, err)


def test_tokens_per_s_leaves_out_the_steps_that_compile(capsys):
    """tokens/s is decoding speed: a decode step that compiled (here the first, its program dropped
    from jit's cache) is left out, so a run whose only decode step compiled reports none ("n/a")
    instead of a number that is mostly compilation (issue 38), and the same run warm reports one."""
    from cascade.models import generation

    generation._decode_steps.clear_cache()
    cold = json.loads(run(capsys, "run", "The dog", "--max-tokens", "2", "--mode", "large", "--json")[1])
    assert len(cold["token_ids"]) == 2 and cold["tokens_per_s"] is None and cold["decode_s"] > 0
    warm = json.loads(run(capsys, "run", "The dog", "--max-tokens", "2", "--mode", "large", "--json")[1])
    assert warm["tokens_per_s"] == pytest.approx(1 / warm["decode_s"])  # warm: its one step counts
    # a device call runs up to 8 steps (generation.STEPS_PER_CALL): the 8 steps of a call that
    # compiled are all left out, so 8 tokens cold have no steady step and 20 have the last 11
    generation._decode_steps.clear_cache()
    cold8 = json.loads(run(capsys, "run", "The dog", "--max-tokens", "9", "--mode", "large", "--json")[1])
    assert cold8["tokens_per_s"] is None
    generation._decode_steps.clear_cache()
    longer = json.loads(run(capsys, "run", "The dog", "--max-tokens", "20", "--mode", "large", "--json")[1])
    assert longer["tokens_per_s"] > 11 / longer["decode_s"]  # the compiling call's time is not in it


def test_run_with_calibration_text_uses_the_default_calibrated_method(capsys):
    """--calib: each model the run quantizes gets awq-gptq on -mse ranges, and the output says so."""
    import os

    from tests.shared_data import DATA

    code, out, err = run(capsys, "run", "Once upon a time", "--mode", "small", "--small", "int3-g32", "--max-tokens", "4",
                         "--calib", os.path.join(DATA, "text", "tinystories_train_00.txt"), "--calib-samples", "32",
                         "--calib-len", "64", "--json")
    d = json.loads(out)
    assert code == 0 and (d["small"]["quant"], d["small"]["method"]) == ("int3-g32-full-mse", "awq-gptq")
    code, out, err = run(capsys, "run", "Once", "--calib-samples", "32")
    assert code == 2 and "--calib-samples applies only with --calib" in err


@pytest.mark.parametrize("args, match", [
    (("--pair", "default", "--raw"), "--raw applies to a chat pair"),
    (("--raw",), "--raw applies to a chat pair"),
    (("--pair", "default", "--small-model", "default-small"), "does not combine with --small-model"),
    (("--small", "default-small", "--small-model", "default-small"), "names the small model and so does"),
    (("--pair", "nonesuch"), "Invalid value for '--pair'"),
])
def test_pair_flags_usage_errors(capsys, args, match):
    code, _, err = run(capsys, "run", "Hi", *args)
    assert code == 2 and match in err and err.count("\n") == 1


def test_pair_smollm2_before_a_pull_says_how(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_HOME", str(tmp_path))
    code, _, err = run(capsys, "run", "Hi", "--pair", "smollm2")
    assert code == 2 and "run `cascade pull smollm2` first" in err


def test_small_and_large_take_model_names(capsys):
    """`--small NAME`/`--large NAME` pick the models (a name is not a precision); `--pair default`
    is the embedded pair: the same output as naming both."""
    named = json.loads(run(capsys, "run", "The dog", "--max-tokens", "12", "--small", "default-small", "--large",
                           "default-large", "--json")[1])
    paired = json.loads(run(capsys, "run", "The dog", "--max-tokens", "12", "--pair", "default", "--json")[1])
    assert named["token_ids"] == paired["token_ids"] and paired["pair"] == "default"
    assert paired["chat_template"] is False and named["small"]["quant"] == "int4-full"
