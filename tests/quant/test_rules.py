import json

import pytest

from quant import PrecisionRules, parse_spec


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
