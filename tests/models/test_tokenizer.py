"""models.tokenizer against independent references: SentencePiece itself (tok512.model) and
transformers (its GGUF tokenizer converter and its tokenizer.json / tokenizer.model loaders)."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from cascade.models.tokenizer import CONFIG_FILE, Tokenizer

from tests.shared_data import DATA  # noqa: E402
STORIES_GGUF = DATA / "stories260K" / "stories260K.gguf"
TOK512 = DATA / "stories260K" / "tok512.model"
SMOL_DIR = DATA / "smollm2-135m"
SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VAL = DATA / "text" / "tinystories_val.txt"

# English, digits, punctuation, contractions, unicode/emoji, newlines/tabs/CRLF, runs of spaces,
# code, special tokens inside text, non-breaking and wide spaces
STRINGS = [
    "The capital of France is",
    "Hello world! 123",
    "2024 12345 3.14159 1,000,000 0x1F",
    "Price: $9.99 (20% off!) -- \"quoted\" it's we'll I'M they've",
    "café naïve Ünïcödé 日本語 中文 한국어 😀👍🏽 emoji",
    "line1\nline2\n\n\nline3\r\n\ttab\t\tend",
    "  multiple   spaces   ",
    " leading",
    "trailing ",
    "",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x**2  # comment",
    "<|endoftext|>text<repo_name>x",
    "\u00a0nbsp\u2003emsp",
    "a\n\n  b \n!",
    "ABC123def456 a1b2",
]


# ---------------------------------------------------------------------- GGUF helpers


def gguf_metadata(path) -> dict:
    """Every GGUF key (but the GGUF.* header fields) as plain python values."""
    reader = gguf.GGUFReader(str(path))
    V = gguf.GGUFValueType
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == V.ARRAY:
            if field.types[-1] == V.STRING:
                out[key] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                out[key] = [field.parts[i].tolist()[0] for i in field.data]
        elif field.types[0] == V.STRING:
            out[key] = bytes(field.parts[field.data[0]]).decode("utf-8")
        else:
            out[key] = field.parts[field.data[0]].tolist()[0]
    return out


def write_metadata_gguf(path, meta: dict):
    """A GGUF file holding only ``meta`` (no tensors): enough for transformers' tokenizer loader."""
    V = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(path), meta["general.architecture"])
    for k, v in meta.items():
        if k == "general.architecture":
            continue
        if isinstance(v, list):
            sub = V.STRING if isinstance(v[0], str) else V.FLOAT32 if isinstance(v[0], float) else V.INT32
            w.add_key_value(k, v, V.ARRAY, sub)
        elif isinstance(v, bool):
            w.add_key_value(k, v, V.BOOL)
        elif isinstance(v, str):
            w.add_key_value(k, v, V.STRING)
        elif isinstance(v, float):
            w.add_key_value(k, v, V.FLOAT32)
        else:
            w.add_key_value(k, v, V.UINT32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def val_stories():
    text = VAL.read_text(encoding="utf-8")
    return [s.strip() for s in text.split("\n<|endoftext|>\n") if s.strip()]


def sentencepiece_with(path, **normalizer):
    """tok512.model with normalizer_spec fields overridden (an independent SentencePiece reference)."""
    m = sp_pb2.ModelProto()
    m.ParseFromString(Path(path).read_bytes())
    for k, v in normalizer.items():
        setattr(m.normalizer_spec, k, v)
    return spm.SentencePieceProcessor(model_proto=m.SerializeToString())


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stories_meta():
    return gguf_metadata(STORIES_GGUF)


@pytest.fixture(scope="module")
def tok512():
    return spm.SentencePieceProcessor(model_file=str(TOK512))


@pytest.fixture(scope="module")
def stories():
    s = val_stories()
    assert len(s) == 1000
    return s


@pytest.fixture(scope="module")
def smol_meta():
    return gguf_metadata(SMOL_DIR / SMOL_NAME)


@pytest.fixture(scope="module")
def smol(smol_meta):
    return Tokenizer.from_gguf_metadata(smol_meta, source=SMOL_NAME)


@pytest.fixture(scope="module")
def smol_ref():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOL_DIR), gguf_file=SMOL_NAME)


# ---------------------------------------------------------------------- GGUF llama (SentencePiece)


def test_gguf_llama_vocab_encodes_val_stories_like_tok512(stories_meta, tok512, stories):
    """stories260K.gguf's embedded vocabulary, rebuilt as a SentencePiece model, against tok512.model.

    tok512.model collapses runs of spaces (normalizer remove_extra_whitespaces=true); GGUF has no
    such key here and llama.cpp never collapses whitespace for SentencePiece vocabularies, so by
    default the GGUF tokenizer keeps them. With the key set it matches tok512.model on every story;
    without it, it matches tok512.model with that one normalizer flag switched off.
    """
    collapse = Tokenizer.from_gguf_metadata({**stories_meta, "tokenizer.ggml.remove_extra_whitespaces": True})
    for i, s in enumerate(stories):
        assert collapse.encode(s) == [1] + tok512.encode(s), f"story {i}"

    tok = Tokenizer.from_gguf_metadata(stories_meta, source=str(STORIES_GGUF))
    keep_spaces = sentencepiece_with(TOK512, remove_extra_whitespaces=False)
    runs = 0
    for i, s in enumerate(stories):
        ids = tok.encode(s)
        assert ids == [1] + keep_spaces.encode(s), f"story {i}"
        if "  " in s:
            runs += 1
            assert ids != [1] + tok512.encode(s), f"story {i}"  # the double space survives
        else:
            assert ids == [1] + tok512.encode(s), f"story {i}"
    assert runs == 4  # stories 469, 525, 713, 920 contain a double space


def test_gguf_llama_fields_and_round_trip(stories_meta, stories):
    tok = Tokenizer.from_gguf_metadata(stories_meta, source="stories260K.gguf")
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == ("sentencepiece", 512, 1, (2,), True)
    assert tok.chat_template is None
    assert tok.encode("Once upon a time", add_bos=False) == [403, 407, 261, 378]
    assert [tok.token_str(i) for i in tok.encode("Once upon\n")] == ["<s>", " Once", " upon", "<0x0A>"]
    for s in stories[:50]:
        assert tok.decode(tok.encode(s)) == s
        assert tok.decode(np.array(tok.encode(s) + [2])) == s  # arrays accepted, BOS/EOS dropped
    assert tok.decode([]) == ""
    assert tok.decode(tok.encode("Once", add_bos=False) + [512, 600]) == "Once"  # padded-vocab ids dropped
    with pytest.raises(ValueError, match="negative"):
        tok.decode([-1])
    no_bos = Tokenizer.from_gguf_metadata({**stories_meta, "tokenizer.ggml.add_bos_token": False})
    assert not no_bos.add_bos and no_bos.encode("Once") == tok.encode("Once", add_bos=False)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_sentencepiece_tok512(tok512, stories):
    tok = Tokenizer.from_sentencepiece(TOK512)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == ("sentencepiece", 512, 1, (2,), True)
    for s in stories[:200]:  # llama2.c: BOS + encode(story.strip())
        assert tok.encode(s) == [1] + tok512.encode(s)
        assert tok.encode(s, add_bos=False) == tok512.encode(s)
    assert tok.token_str(1) == "<s>" and tok.token_str(403) == " Once"


# ---------------------------------------------------------------------- GGUF gpt2 (byte-level BPE): SmolLM2


def test_smollm2_fields(smol):
    assert (smol.kind, smol.vocab_size, smol.bos_id, smol.eos_ids, smol.add_bos) == ("hf", 49152, 1, (2,), False)
    assert "<|im_start|>" in smol.chat_template


def test_smollm2_matches_transformers(smol, smol_ref):
    for s in STRINGS:
        assert smol.encode(s) == smol_ref.encode(s, add_special_tokens=False), repr(s)
        assert smol.encode(s, add_bos=True) == [1] + smol_ref.encode(s, add_special_tokens=False), repr(s)
    for s in STRINGS:
        if "<|im_start|>" not in s and "<|im_end|>" not in s:  # those are BOS/EOS here and decode drops them
            assert smol.decode(smol.encode(s)) == s, repr(s)


def test_smollm2_capital_of_france_round_trip(smol, smol_ref):
    s = "The capital of France is"
    ids = smol.encode(s)
    assert ids == smol_ref.encode(s, add_special_tokens=False)
    assert ids[0] != smol.bos_id  # add_bos_token = false in the file
    assert smol.decode(ids) == s
    assert "".join(smol.token_str(i) for i in ids) == s
    assert smol.token_str(ids[1]) == " capital"


def test_smollm2_special_tokens_are_single_ids(smol):
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("<|im_end|>") == [2]
    assert smol.encode("<|endoftext|>") == [0]
    assert smol.encode("<|im_start|>user") == [1] + smol.encode("user")
    assert smol.token_str(1) == "<|im_start|>"


def test_smollm2_digits_split_individually(smol):
    """pre = smollm: every digit is its own pre-token (llama.cpp's \\p{N} split before the GPT-2 regex)."""
    ids = smol.encode("2024 12345")
    assert [smol.token_str(i) for i in ids] == ["2", "0", "2", "4", " ", "1", "2", "3", "4", "5"]


def test_smollm2_chat_template_renders_chatml(smol, smol_ref):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    text = smol.apply_chat_template(msgs)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert text == smol_ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = smol.encode(text)
    assert ids == smol_ref.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2, each one id
    conv = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "Paris."}]
    assert smol.apply_chat_template(conv, add_generation_prompt=False) == smol_ref.apply_chat_template(
        conv, tokenize=False, add_generation_prompt=False)


@pytest.fixture(scope="module")
def small_bpe_meta(smol_meta):
    """SmolLM2's metadata with the vocabulary cut to its first 2000 tokens (and the merges among them),
    so that transformers loads each variant in about a second."""
    n = 2000
    tokens = smol_meta["tokenizer.ggml.tokens"][:n]
    kept = set(tokens)
    merges = [m for m in smol_meta["tokenizer.ggml.merges"]
              if (lambda a, b: a in kept and b in kept and a + b in kept)(*m.split(" "))]
    return {**smol_meta, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": smol_meta["tokenizer.ggml.token_type"][:n], "llama.vocab_size": n}


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2"])
def test_gguf_pre_tokenizers_match_transformers(pre, small_bpe_meta, tmp_path):
    from transformers import AutoTokenizer

    meta = {**small_bpe_meta, "tokenizer.ggml.pre": pre}
    write_metadata_gguf(tmp_path / "tok.gguf", meta)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    tok = Tokenizer.from_gguf_metadata(meta)
    for s in STRINGS:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False), repr(s)
    # the splits themselves (vocabulary-independent), on text where the regexes differ
    for s in ["12345 6789", "it's\n\n  x \n!", "a1b22c333", "hello   world\r\n"]:
        ours = [p for p, _ in tok._backend.pre_tokenizer.pre_tokenize_str(s)]
        theirs = [p for p, _ in ref.backend_tokenizer.pre_tokenizer.pre_tokenize_str(s)]
        assert ours == theirs, (pre, s)


def _toy_bpe(pre):
    """A hand-made byte-level vocabulary in which digits and 'abc' can merge."""
    tokens = ["1", "2", "3", "4", "5", "12", "123", "45", "Ġ", "Ġ1", "a", "b", "c", "ab", "abc", "<|s|>", "<u>"]
    merges = ["Ġ 1", "1 2", "12 3", "4 5", "a b"]  # nothing merges into 'abc'
    types = [1] * 15 + [3, 4]
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 15,
        "tokenizer.ggml.eos_token_id": 15})


@pytest.mark.parametrize("pre, expected", [
    ("gpt-2", ["ab", "c", "Ġ1", "2", "3", "45"]),  # ' 12345' is one pre-token; 'abc' only via merges
    ("smollm", ["ab", "c", "Ġ", "1", "2", "3", "4", "5"]),  # every digit alone
    ("qwen2", ["ab", "c", "Ġ", "1", "2", "3", "4", "5"]),  # \p{N}: single digits
    ("llama-bpe", ["abc", "Ġ", "123", "45"]),  # \p{N}{1,3}; ignore_merges: 'abc' whole from the vocabulary
])
def test_gguf_pre_tokenizer_semantics(pre, expected):
    tok = _toy_bpe(pre)
    assert [tok._backend.id_to_token(i) for i in tok.encode("abc 12345", add_bos=False)] == expected
    assert tok.decode(tok.encode("abc 12345")) == "abc 12345"
    assert tok.encode("<|s|>ab<u>", add_bos=False) == [15, 13, 16]  # control and user-defined tokens stay whole
    assert tok.add_bos is (pre == "llama-bpe")  # llama.cpp's default when the file has no add_bos_token


def test_gguf_unsupported_inputs(smol_meta, stories_meta):
    with pytest.raises(ValueError, match=r"unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf_metadata({**stories_meta, "tokenizer.ggml.model": "bert"}, source="x.gguf")
    with pytest.raises(ValueError, match=r"x\.gguf: unsupported GGUF pre-tokenizer .*'deepseek-llm'"):
        Tokenizer.from_gguf_metadata({**smol_meta, "tokenizer.ggml.pre": "deepseek-llm"}, source="x.gguf")
    meta = dict(stories_meta)
    del meta["tokenizer.ggml.model"]
    with pytest.raises(ValueError, match="tokenizer.ggml.model is missing"):
        Tokenizer.from_gguf_metadata(meta)
    meta = {k: v for k, v in smol_meta.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        Tokenizer.from_gguf_metadata(meta)


# ---------------------------------------------------------------------- save / load


def test_save_load_round_trip(smol, stories_meta, tmp_path):
    sp_tok = Tokenizer.from_gguf_metadata(stories_meta, source="stories260K.gguf")
    for tok, backend_file in [(smol, "tokenizer.json"), (sp_tok, "tokenizer.model")]:
        d = tmp_path / tok.kind
        assert tok.save(d) == [backend_file, CONFIG_FILE]
        back = Tokenizer.load(d)
        for attr in ("kind", "vocab_size", "bos_id", "eos_ids", "add_bos", "chat_template"):
            assert getattr(back, attr) == getattr(tok, attr), attr
        for s in STRINGS:
            assert back.encode(s) == tok.encode(s), repr(s)
            assert back.decode(back.encode(s)) == tok.decode(tok.encode(s))
    # the saved tokenizer.model is a plain SentencePiece model
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "sentencepiece" / "tokenizer.model")).encode(
        "Once upon a time") == sp_tok.encode("Once upon a time", add_bos=False)


def test_load_errors_name_the_file(smol, tmp_path):
    with pytest.raises(ValueError, match=CONFIG_FILE):
        Tokenizer.load(tmp_path)
    smol.save(tmp_path / "a")
    (tmp_path / "a" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.load(tmp_path / "a")
    Tokenizer.from_sentencepiece(TOK512).save(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"tokenizer\.model"):
        Tokenizer.load(tmp_path / "b")
    (tmp_path / "b" / CONFIG_FILE).write_text("[1, 2")
    with pytest.raises(ValueError, match=CONFIG_FILE):
        Tokenizer.load(tmp_path / "b")


# ---------------------------------------------------------------------- Hugging Face directories


def test_hf_dir_llama_style_tokenizer_json(tmp_path, tok512, stories):
    """tok512.model converted to tokenizer.json by transformers (Metaspace + byte fallback, BOS added
    by the post-processor, no add_bos_token in tokenizer_config.json)."""
    from transformers import AutoTokenizer

    slow = tmp_path / "slow"
    slow.mkdir()
    shutil.copy(TOK512, slow / "tokenizer.model")
    (slow / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    AutoTokenizer.from_pretrained(str(slow)).save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "tokenizer.model").exists()
    assert "add_bos_token" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    ref = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))

    tok = Tokenizer.from_hf_dir(tmp_path / "hf")
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == ("hf", 512, 1, (2,), True)
    for s in STRINGS:
        assert tok.encode(s) == ref.encode(s), repr(s)  # exactly one BOS, as transformers adds it
    keep_spaces = sentencepiece_with(TOK512, remove_extra_whitespaces=False)
    for i, s in enumerate(stories):
        assert tok.encode(s, add_bos=False) == keep_spaces.encode(s), f"story {i}"
    assert tok.decode(tok.encode(stories[0])) == stories[0]
    assert [tok.token_str(i) for i in tok.encode("Once upon\n")] == ["<s>", " Once", " upon", "<0x0A>"]


def test_hf_dir_chatml_tokenizer_json(smol, smol_ref, tmp_path):
    """tokenizer.json + tokenizer_config.json with dict tokens, a null BOS and a list-form chat
    template, + generation_config.json EOS ids."""
    from transformers import AutoTokenizer

    smol.save(tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},
        "add_bos_token": False,
        "chat_template": [{"name": "tool_use", "template": "unused"},
                          {"name": "default", "template": smol.chat_template}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 2, "bos_token_id": 1}))

    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.kind, tok.bos_id, tok.eos_ids, tok.add_bos) == ("hf", None, (2, 0), False)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    for s in STRINGS:
        assert tok.encode(s) == ref.encode(s, add_special_tokens=False) == smol_ref.encode(s, add_special_tokens=False)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == smol.apply_chat_template(msgs)
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "<|im_start|>hi"  # only EOS is dropped


def test_hf_dir_sentencepiece_only(tmp_path, tok512):
    shutil.copy(TOK512, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "normalized": False}, "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                         "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.kind, tok.bos_id, tok.eos_ids, tok.add_bos) == ("sentencepiece", 1, (2,), False)
    assert tok.encode("Once upon a time") == tok512.encode("Once upon a time")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[user] hi</s>[assistant]"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=False) == "<s>[user] hi</s>"


def test_hf_dir_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        Tokenizer.from_hf_dir(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot read tokenizer"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)
    with pytest.raises(ValueError, match=r"bad\.model: cannot read SentencePiece model"):
        (tmp_path / "bad.model").write_bytes(b"\x01\x02junk")
        Tokenizer.from_sentencepiece(tmp_path / "bad.model")


def test_hf_dir_unknown_special_token_is_an_error(tmp_path):
    shutil.copy(TOK512, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: bos_token '<\|begin_of_text\|>' is not in"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------------- chat template sandbox


def test_chat_template_is_sandboxed_and_errors_are_value_errors():
    tok = Tokenizer.from_sentencepiece(TOK512)
    msgs = [{"role": "user", "content": 'hé "x"'}]
    tok.chat_template = "{% for m in messages %}{{ m.content|tojson }}{% endfor %}"
    assert tok.apply_chat_template(msgs) == '"hé \\"x\\""'
    for bad, why in [("{% set x = messages.append(1) %}", "unsafe"),
                     ("{{ ''.__class__.__mro__ }}", "unsafe"),
                     ("{{ raise_exception('only user and assistant roles') }}", "only user and assistant roles"),
                     ("{% for %}", "chat template failed")]:
        tok.chat_template = bad
        with pytest.raises(ValueError, match=why):
            tok.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="list of"):
        tok.apply_chat_template("hello")
