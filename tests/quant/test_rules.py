import json

import pytest

from cascade.quant import PrecisionRules, parse_spec


def test_first_match_wins_and_default():
    rules = PrecisionRules(rules=(("attn", "int8"), ("layers_0", "int2-g16")), default="int4-g128")
    assert str(rules.spec_for("layers_0/attn/q/kernel", 2)) == "int8"
    assert str(rules.spec_for("layers_0/mlp/up/kernel", 2)) == "int2-g16"
    assert str(rules.spec_for("layers_1/mlp/up/kernel", 2)) == "int4-g128"


def test_int_specs_skip_vectors_float_specs_do_not():
    rules = PrecisionRules(rules=(("norm", "bf16"),), default="int8")
    assert rules.spec_for("layers_0/mlp/bias", 1) is None
    assert str(rules.spec_for("layers_0/attn_norm/scale", 1)) == "bf16"
    assert PrecisionRules(default=None).spec_for("w", 2) is None


def test_from_spec_keeps_norms_embeddings_head_16bit():
    rules = PrecisionRules.parse("int4-g128")
    assert str(rules.spec_for("embed_tokens/embedding", 2)) == "bf16"
    assert str(rules.spec_for("lm_head/kernel", 2)) == "bf16"
    assert str(rules.spec_for("layers_3/post_attention_norm/scale", 1)) == "bf16"
    assert str(rules.spec_for("layers_3/mlp/down/kernel", 2)) == "int4-g128"


def test_parse_inline_and_json(tmp_path):
    inline = PrecisionRules.parse("embed|lm_head=bf16, attn=int8,*=int4-g64-asym")
    assert [(p, str(s)) for p, s in inline.rules] == [("embed|lm_head", "bf16"), ("attn", "int8")]
    assert inline.default == parse_spec("int4-g64-asym")
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(inline.to_json()))
    assert PrecisionRules.parse(str(path)) == inline


@pytest.mark.parametrize("text,match", [("attn=int9", "unknown precision spec"), ("(=int8", "bad regex"),
                                        ("=int8", "REGEX=SPEC"), ("missing.json", "not found")])
def test_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        PrecisionRules.parse(text)


def test_bad_json_file(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        PrecisionRules.parse(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text(json.dumps({"rules": [["x"]]}))
    with pytest.raises(ValueError, match="pairs"):
        PrecisionRules.parse(str(tmp_path / "b.json"))


def test_lm_head_rule_matches_head_names_only():
    rules = PrecisionRules.parse("int4-g128")
    for head in ("lm_head/kernel", "lm_head.weight", "output.weight", "model/lm_head"):
        assert str(rules.spec_for(head, 2)) == "bf16", head
    # attention output projections are ordinary weights
    for weight in ("layers_0/attn/output/kernel", "layers.0.attention.output.weight", "layers_0/o_proj/kernel"):
        assert str(rules.spec_for(weight, 2)) == "int4-g128", weight


@pytest.mark.parametrize("bad,match", [("*=int8,*=int4", "twice"), (None, "got NoneType")])
def test_parse_rejects_ambiguous_or_wrong_type(bad, match):
    with pytest.raises(ValueError, match=match):
        PrecisionRules.parse(bad)


def test_json_pattern_must_be_string(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"rules": [[1, "int8"]]}))
    with pytest.raises(ValueError, match="pattern must be a string"):
        PrecisionRules.parse(str(tmp_path / "c.json"))


def test_keep_rules_cover_gguf_and_flax_names():
    rules = PrecisionRules.parse("int4-g128")
    for name in ("token_embd.weight", "params/output/kernel", "output_norm.weight", "tok_embeddings.weight"):
        assert str(rules.spec_for(name, 2)) == "bf16", name
    assert str(rules.spec_for("params/layers_0/attn/output/kernel", 2)) == "int4-g128"


def test_a_file_named_like_a_spec_is_not_read(tmp_path, monkeypatch):
    # regression: a file called "int8" in the working directory used to replace the spec int8
    monkeypatch.chdir(tmp_path)
    (tmp_path / "int8").write_text(json.dumps({"__default__": "int2-g16"}))
    (tmp_path / "attn=int8").write_text("{}")
    assert PrecisionRules.parse("int8") == PrecisionRules.from_spec("int8")
    assert str(PrecisionRules.parse("int8").spec_for("layers_0/mlp/up/kernel", 2)) == "int8"
    assert PrecisionRules.parse("attn=int8").rules == (("attn", parse_spec("int8")),)
    # a rules file is named explicitly: a .json suffix or a path with a separator
    (tmp_path / "rules").write_text(json.dumps({"__default__": "int2-g16", "spec_version": 2}))
    assert str(PrecisionRules.parse("./rules").default) == "int2-g16"
    with pytest.raises(ValueError, match="not found"):
        PrecisionRules.parse("sub/rules")


@pytest.mark.parametrize("text", ["", "   "])
def test_empty_rules_are_an_error(text):
    with pytest.raises(ValueError, match="empty precision rules"):
        PrecisionRules.parse(text)


@pytest.mark.parametrize("form", ["spec", "inline", "json"])
def test_every_form_keeps_norms_embeddings_head_16bit(tmp_path, form):
    # regression: inline rules used to quantize the embedding and leave norms in fp32
    text = {"spec": "int4-g128", "inline": "attn=int8,*=int4-g128", "json": str(tmp_path / "r.json")}[form]
    (tmp_path / "r.json").write_text(json.dumps({"__default__": "int4-g128", "rules": [["attn", "int8"]], "spec_version": 2}))
    rules = PrecisionRules.parse(text)
    for path, ndim in (("embed/embedding", 2), ("lm_head/kernel", 2), ("final_norm/scale", 1),
                       ("layers_0/attn_norm/scale", 1)):  # attn_norm matches the user's int8 rule: int skips vectors
        assert str(rules.spec_for(path, ndim)) == "bf16", (form, path)
    assert str(rules.spec_for("layers_0/mlp/up/kernel", 2)) == "int4-g128"
    assert str(rules.spec_for("layers_0/attn/q/kernel", 2)) == ("int8" if form != "spec" else "int4-g128")
    assert rules.spec_for("layers_0/attn/q/bias", 1) is None


def test_user_rules_come_before_the_keep_rules_and_can_turn_them_off(tmp_path):
    rules = PrecisionRules.parse("embed=int8,*=int4-g128")
    assert str(rules.spec_for("embed/embedding", 2)) == "int8"
    assert str(rules.spec_for("lm_head/kernel", 2)) == "bf16"
    path = tmp_path / "all.json"
    path.write_text(json.dumps({"__default__": "int4-g128", "keep_16bit": False, "spec_version": 2}))
    everything = PrecisionRules.parse(str(path))
    assert str(everything.spec_for("embed/embedding", 2)) == "int4-g128"
    assert everything.spec_for("final_norm/scale", 1) is None
    assert PrecisionRules.parse(str(path)).to_json() == {"__default__": "int4-g128-full", "rules": [], "keep_16bit": False,
                                                         "spec_version": 2}
    path.write_text(json.dumps({"__default__": "int4-g128", "keep_16bit": "no"}))
    with pytest.raises(ValueError, match="keep_16bit"):
        PrecisionRules.parse(str(path))


def test_rules_as_json_text_parse_back_to_the_same_rules():
    import json as _json

    from cascade.quant.rules import PrecisionRules as R

    rules = R.parse("attn=int8,*=int4-g128")
    text = _json.dumps(rules.to_json())
    assert R.parse(text) == rules
    with pytest.raises(ValueError, match="not valid JSON"):
        R.parse('{"__default__": ')
    with pytest.raises(ValueError, match="expected an object with keys"):
        R.parse('{"default": "int4"}')


PARAMS = [("embed/embedding", 2), ("final_norm/scale", 1), ("layers_0/attn/q_proj/kernel", 2),
          ("layers_0/attn/q_proj/bias", 1), ("layers_0/attn_norm/scale", 1), ("layers_0/mlp/up_proj/kernel", 2)]


@pytest.mark.parametrize("text,unused,why", [
    ("atn=int8,*=int4", ["atn"], "matches no parameter path"),  # the typo
    ("attn=int8,attn/q_proj=int4,*=int4", ["attn/q_proj"], "an earlier rule decides"),  # shadowed
    ("norm=int8,*=int4", ["norm"], "only vectors"),  # an integer spec skips every norm scale it matches
    ("lm_head=int8,nothing=bf16,*=int4", ["lm_head", "nothing"], "matches no parameter path"),  # a tied model: no head
])
def test_rules_that_decide_no_parameter_are_found(text, unused, why):
    """Issue 38: a rule that matches nothing was ignored silently; each is found, with its reason."""
    rules = PrecisionRules.parse(text)
    found = rules.unused(PARAMS)
    assert [p for p, _, _ in found] == unused and why in found[0][2]
    # by hand: which rule wins each parameter, the first whose regex matches and whose spec applies
    winners = set()
    for path, ndim in PARAMS:
        winners |= {next((p for p, s in rules.rules if (ndim >= 2 or str(s) == "bf16") and p in path), None)}
    assert {p for p, _ in rules.rules} - winners == set(unused)
    with pytest.raises(ValueError, match=rf"precision rule '{unused[0]}=[a-z0-9]+' does nothing for m: it .*REGEX=SPEC"):
        rules.check_used(PARAMS, "m")


@pytest.mark.parametrize("text", ["int4-g128", "attn=int8,*=int4", "norm=bf16,mlp=int8", "embed=int8,*=int4-g128",
                                  '{"__default__": "int8", "rules": [["q_proj", "int4"]]}'])
def test_rules_that_all_decide_something_pass(text):
    rules = PrecisionRules.parse(text)
    assert rules.unused(PARAMS) == []
    rules.check_used(PARAMS)  # no error


def test_a_rules_file_written_before_spec_version_2_keeps_its_narrow_grid(tmp_path):
    """A rules file without "spec_version" was written when int3-g32 meant the narrow grid (-3..3):
    it still does, with a warning naming the change; with "spec_version": 2 it is the full grid."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"__default__": "int3-g32", "rules": [["attn", "int4-full"], ["mlp", "int8"]]}))
    with pytest.warns(UserWarning, match=r"no \"spec_version\".*int3-g32 -> int3-g32-narrow"):
        rules = PrecisionRules.parse(str(old))
    assert (rules.default.qmin, rules.default.qmax) == (-3, 3)
    assert rules.rules == (("attn", parse_spec("int4-full")), ("mlp", parse_spec("int8")))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({**json.loads(old.read_text()), "spec_version": 2}))
    assert (PrecisionRules.parse(str(new)).default.qmin, PrecisionRules.parse(str(new)).default.qmax) == (-4, 3)
    # what is written now says its version and every grid, so it reads the same under either grammar
    saved = rules.to_json()
    assert saved == {"__default__": "int3-g32-narrow", "rules": [["attn", "int4-full"], ["mlp", "int8"]],
                     "keep_16bit": True, "spec_version": 2}
    assert PrecisionRules.from_json(saved, "x") == rules
    assert PrecisionRules.from_json({k: v for k, v in saved.items() if k != "spec_version"}, "x") == rules
    with pytest.raises(ValueError, match="spec_version"):
        PrecisionRules.from_json({**saved, "spec_version": 3}, "x")


@pytest.mark.parametrize("text", ["int3-g32", "int4-narrow", "attn=int8,*=int4-g128", "attn=int3,mlp=int2-g16-asym",
                                  '{"__default__": "int4", "rules": [], "keep_16bit": false, "spec_version": 2}'])
def test_rules_text_is_explicit_and_reads_the_same_in_both_grammars(text):
    rules = PrecisionRules.parse(text)
    saved = rules.text()
    assert PrecisionRules.parse(saved) == rules
    if not saved.startswith("{"):
        assert PrecisionRules.parse(saved, version=1) == rules
