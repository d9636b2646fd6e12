"""``source-a8``: a loaded model's own int8/int4 codes run with int8 activations (library and CLI)."""

import jax
import pytest

from cascade import cli
from cascade.models import generate, quantize_model
from cascade.models.quantize import source_a8
from cascade.quant.qtensor import QuantizedTensor

is_q = lambda a: isinstance(a, QuantizedTensor)  # noqa: E731


def test_marks_every_int8_and_int4_weight_and_keeps_the_bytes(stories260k):
    q = quantize_model(stories260k, "attn=int3-g32,*=int4-g32", progress=False)[0]
    a = source_a8(q)
    before = [x for x in jax.tree.leaves(q.params, is_leaf=is_q) if is_q(x)]
    after = [x for x in jax.tree.leaves(a.params, is_leaf=is_q) if is_q(x)]
    assert len(before) == len(after) > 0
    for b, x in zip(before, after):
        assert x.packed is b.packed and x.scale is b.scale  # the same arrays, not copies
        assert x.spec.a8 == (b.spec.bits in (4, 8)) and str(x.spec).removesuffix("-a8") == str(b.spec)
    assert a.quant.endswith("-a8")
    ids = q.tokenizer.encode("Once upon a time")
    out = generate(a.params, a.config, [ids], max_new_tokens=8, eos_ids=()).tokens[0]
    assert len(out) == 8


def test_a_model_without_integer_weights_is_refused(stories260k):
    with pytest.raises(ValueError, match="no int8 or int4 weight"):
        source_a8(stories260k)


def run(capsys, *args):
    code = cli.main(list(args))
    return code, capsys.readouterr()


def test_cli_refuses_source_a8_where_it_means_nothing(capsys, tmp_path):
    code, out = run(capsys, "generate", "default-small", "Once", "--quant", "source-a8")
    assert code == 2 and "holds no int8 or int4 weight" in out.err and out.err.strip().count("\n") == 0, out.err
    code, out = run(capsys, "quantize", "default-small", "--quant", "source-a8", "-o", str(tmp_path / "never"))
    assert code == 2 and "int4-g32-a8" in out.err and out.err.strip().count("\n") == 0, out.err
    assert not (tmp_path / "never").exists()
