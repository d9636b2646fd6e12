"""Tokenizers for the Llama family: Hugging Face ``tokenizer.json``, SentencePiece ``.model``, GGUF.

One :class:`Tokenizer` wraps either a `tokenizers <https://github.com/huggingface/tokenizers>`_
``Tokenizer`` (``kind == "hf"``) or a SentencePiece processor (``kind == "sentencepiece"``) and
adds what a checkpoint says around the vocabulary: the BOS id and whether to prepend it, the
EOS ids that end generation, and the Jinja chat template.

Sources:

* :meth:`Tokenizer.from_hf_dir` -- a Hugging Face model directory (``tokenizer.json`` plus
  ``tokenizer_config.json``; ``generation_config.json`` / ``config.json`` add EOS ids; a
  directory with only ``tokenizer.model`` is read with SentencePiece).
* :meth:`Tokenizer.from_sentencepiece` -- a SentencePiece ``.model`` (llama2.c ``tok512.model``).
* :meth:`Tokenizer.from_file` -- a tokenizer given by path (``--tokenizer``): a ``tokenizer.json``
  or a SentencePiece ``.model``, for a model that has no tokenizer of its own.
* :meth:`Tokenizer.from_gguf_metadata` -- the vocabulary embedded in a GGUF file, as llama.cpp
  reads it: ``tokenizer.ggml.model = llama`` is rebuilt as a SentencePiece BPE model proto, so it
  encodes exactly as the original ``.model``; ``gpt2`` is rebuilt as a byte-level BPE
  ``tokenizers.Tokenizer`` with the pre-tokenizer ``tokenizer.ggml.pre`` names.

:meth:`Tokenizer.save` / :meth:`Tokenizer.load` store the backend file (``tokenizer.json`` or
``tokenizer.model``) plus ``cascade_tokenizer.json`` (BOS/EOS ids, ``add_bos``, chat template).

Encoding never adds EOS; it prepends BOS when ``add_bos`` is true (the checkpoint's default, or
the ``add_bos=`` argument). ``tokenizer.json`` post-processors are bypassed so that the decision
is made in one place.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

CONFIG_FILE = "cascade_tokenizer.json"
HF_FILE = "tokenizer.json"
SP_FILE = "tokenizer.model"
_FORMAT = "cascade-tokenizer"

# GGUF ``tokenizer.ggml.token_type`` values (llama.cpp ``llama_token_type``; SentencePiece uses the same numbers).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes for byte-level BPE vocabularies (as in the models' tokenizer.json files and
# llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (pre-tokenizer style, ignore_merges, default add_bos). Styles: "gpt2" = the
# GPT-2 regex (tokenizers' ByteLevel regex); "digits+gpt2" = every digit split off, then GPT-2;
# "llama3" / "qwen2" = the regexes above. ignore_merges / add_bos follow llama.cpp. "default" (files
# written before tokenizer.ggml.pre existed) is plain GPT-2, as transformers reads such files; llama.cpp's
# own fallback regex additionally splits punctuation runs and is documented there as degraded.
_GGUF_PRE = {
    "default": ("gpt2", False, False),
    "gpt2": ("gpt2", False, False),
    "gpt-2": ("gpt2", False, False),
    "phi-2": ("gpt2", False, False),
    "mpt": ("gpt2", False, False),
    "olmo": ("gpt2", False, False),
    "smollm": ("digits+gpt2", False, False),
    "starcoder": ("digits+gpt2", False, False),
    "refact": ("digits+gpt2", False, False),
    "codeshell": ("digits+gpt2", False, False),
    "llama-bpe": ("llama3", True, True),
    "llama3": ("llama3", True, True),
    "llama-v3": ("llama3", True, True),
    "falcon3": ("llama3", True, True),
    "dbrx": ("llama3", False, False),
    "smaug-bpe": ("llama3", False, False),
    "qwen2": ("qwen2", False, False),
    "deepseek-r1-qwen": ("qwen2", False, False),
    "stablelm2": ("qwen2", False, False),
    "megrez": ("qwen2", False, False),
}


class Tokenizer:
    """Text <-> token ids for one checkpoint; see the module docstring."""

    def __init__(self, backend, *, kind: str, bos_id: int | None, eos_ids, add_bos: bool,
                 chat_template: str | None = None, source: str = ""):
        if kind not in ("hf", "sentencepiece"):
            raise ValueError(f"tokenizer kind must be 'hf' or 'sentencepiece', got {kind!r}")
        self._backend = backend
        self.kind = kind
        self.source = source
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True) if kind == "hf"
                              else backend.get_piece_size())
        where = source or "tokenizer"
        for name, i in [("bos", bos_id), *(("eos", e) for e in eos_ids)]:
            if i is not None and not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"{where}: {name} id {i} is outside the vocabulary (size {self.vocab_size})")
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = tuple(dict.fromkeys(int(e) for e in eos_ids))
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template or None
        self._template = None
        self._byte_level = None
        self.gguf_pre = None  # a byte-level BPE read from GGUF: its tokenizer.ggml.pre (kept for a GGUF export)

    def __repr__(self):
        return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, add_bos={self.add_bos}, source={self.source!r})")

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS first when ``add_bos`` (default: the checkpoint's setting)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates, e.g. undecodable bytes from argv (surrogateescape)
            raise ValueError(f"text is not valid UTF-8: unpaired surrogate {text[e.start]!r} at character {e.start}") from None
        if self.kind == "sentencepiece":
            ids = self._encode_sentencepiece(text)
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ValueError(f"{self.source or 'tokenizer'}: add_bos requested but the tokenizer has no BOS token")
            ids = [self.bos_id, *ids]
        return ids

    def _encode_sentencepiece(self, text: str) -> list[int]:
        """SentencePiece ids, with control pieces written in the text (``<s>``, ``</s>`` from a chat
        template) mapped to their ids, as Hugging Face's Llama tokenizer does; SentencePiece alone
        would spell them out as characters."""
        import re

        sp = self._backend
        if not hasattr(self, "_control_pattern"):
            pieces = sorted({sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)} - {""},
                            key=len, reverse=True)
            self._control_ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
            self._control_pattern = re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None
        if self._control_pattern is None:
            return list(sp.encode(text))
        ids = []
        for k, part in enumerate(self._control_pattern.split(text)):
            if k % 2:
                ids.append(self._control_ids[part])
            elif part:
                ids.extend(sp.encode(part))
        return ids

    def decode_completion(self, prompt_ids, new_ids) -> str:
        """The text ``new_ids`` add after ``prompt_ids``: decoded together, because SentencePiece
        drops the leading space of a piece decoded alone."""
        prompt_ids, new_ids = list(prompt_ids), list(new_ids)
        return self.decode(prompt_ids + new_ids)[len(self.decode(prompt_ids)):]

    def decode(self, ids) -> str:
        """Text of ``ids`` (a list, numpy or JAX array); BOS and EOS tokens are dropped, and so are
        ids past the tokenizer's vocabulary (the padding rows of a padded model embedding)."""
        flat = np.asarray(ids).reshape(-1)
        if flat.size and not np.issubdtype(flat.dtype, np.integer):
            raise TypeError(f"decode() takes integer token ids, got dtype {flat.dtype}")
        skip = set(self.eos_ids) | ({self.bos_id} if self.bos_id is not None else set())
        out = []
        for i in flat.tolist():
            if i < 0:
                raise ValueError(f"token id {i} is negative")
            if i < self.vocab_size and i not in skip:
                out.append(i)
        if self.kind == "sentencepiece":
            return self._backend.decode(out)
        return self._backend.decode(out, skip_special_tokens=False)

    def token_str(self, id) -> str:
        """The piece of one token id for display (``▁``/``Ġ`` shown as a space, special tokens verbatim)."""
        i = int(id)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        piece = self._piece(i)
        if self.kind == "hf" and self._is_byte_level():
            table = _unicode_to_byte()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece).decode("utf-8", errors="replace")
        return piece.replace("\u2581", " ")

    def _piece(self, i: int) -> str:
        if self.kind == "sentencepiece":
            return self._backend.id_to_piece(i)
        piece = self._backend.id_to_token(i)
        return "" if piece is None else piece

    def _is_byte_level(self) -> bool:
        if self._byte_level is None:
            dec = self._backend.decoder
            self._byte_level = dec is not None and '"ByteLevel"' in dec.__getstate__().decode("utf-8", "replace")
        return self._byte_level

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the checkpoint's Jinja template.

        The template runs in jinja2's immutable sandbox with the variables Hugging Face provides:
        ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``,
        ``strftime_now`` and a ``tojson`` filter. The result is text: encode it with
        ``add_bos=False`` when the template already writes ``bos_token``.
        """
        if not self.chat_template:
            raise ValueError(f"{self.source or 'tokenizer'}: this tokenizer has no chat template "
                             "(tokenizer_config.json chat_template / GGUF tokenizer.chat_template)")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, Mapping) for m in messages):
            raise ValueError("apply_chat_template: messages must be a list of {'role': ..., 'content': ...} dicts")
        import jinja2

        try:
            if self._template is None or self._template[0] != self.chat_template:
                self._template = (self.chat_template, _jinja_env().from_string(self.chat_template))
            return self._template[1].render(
                messages=[dict(m) for m in messages], add_generation_prompt=bool(add_generation_prompt),
                bos_token=self._piece(self.bos_id) if self.bos_id is not None else "",
                eos_token=self._piece(self.eos_ids[0]) if self.eos_ids else "")
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.source or 'tokenizer'}: chat template failed: {e}") from None

    # ------------------------------------------------------------------ save / load

    def save(self, directory) -> list[str]:
        """Write the backend file and ``cascade_tokenizer.json`` into ``directory``; returns the file names."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        if self.kind == "sentencepiece":
            backend_file = SP_FILE
            with open(os.path.join(directory, SP_FILE), "wb") as f:
                f.write(self._backend.serialized_model_proto())
        else:
            backend_file = HF_FILE
            self._backend.save(os.path.join(directory, HF_FILE))
        meta = {"format": _FORMAT, "version": 1, "kind": self.kind, "bos_id": self.bos_id,
                "eos_ids": list(self.eos_ids), "add_bos": self.add_bos, "chat_template": self.chat_template,
                "source": self.source}
        with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return [backend_file, CONFIG_FILE]

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        """Inverse of :meth:`save`."""
        directory = os.fspath(directory)
        path = os.path.join(directory, CONFIG_FILE)
        meta = _read_json(path, required=True)
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a cascade tokenizer file (format must be {_FORMAT!r})")
        try:
            kind = meta["kind"]
            bos_id, eos_ids, add_bos = meta["bos_id"], meta["eos_ids"], meta["add_bos"]
        except KeyError as e:
            raise ValueError(f"{path}: missing key {e.args[0]!r}") from None
        if kind == "sentencepiece":
            backend = _load_sentencepiece(os.path.join(directory, SP_FILE))
        elif kind == "hf":
            backend = _load_tokenizer_json(os.path.join(directory, HF_FILE))
        else:
            raise ValueError(f"{path}: unknown tokenizer kind {kind!r} (expected 'hf' or 'sentencepiece')")
        return cls(backend, kind=kind, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos,
                   chat_template=meta.get("chat_template"), source=meta.get("source") or directory)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_sentencepiece(cls, path) -> "Tokenizer":
        """A SentencePiece ``.model``: BOS/EOS from the model, BOS prepended (llama2.c, Llama 2)."""
        path = os.fspath(path)
        sp = _load_sentencepiece(path)
        bos, eos = sp.bos_id(), sp.eos_id()
        return cls(sp, kind="sentencepiece", bos_id=bos if bos >= 0 else None,
                   eos_ids=(eos,) if eos >= 0 else (), add_bos=True, source=path)

    @classmethod
    def from_file(cls, path, *, bos_id: int | None = None, eos_ids=()) -> "Tokenizer":
        """A tokenizer named by a file: a Hugging Face ``tokenizer.json`` (with the rest of its
        directory's files, :meth:`from_hf_dir`, when a ``tokenizer_config.json`` is beside it;
        otherwise alone, BOS/EOS from ``bos_id`` / ``eos_ids``: the model's config), or anything
        else read as a SentencePiece ``.model`` (:meth:`from_sentencepiece`)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such tokenizer file")
        folder = os.path.dirname(os.path.abspath(path))
        if not path.lower().endswith(".json"):
            try:
                return cls.from_sentencepiece(path)
            except ValueError as e:
                raise ValueError(f"{e} (a tokenizer is a Hugging Face tokenizer.json or a SentencePiece .model)") from None
        if os.path.basename(path) == HF_FILE and os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return cls.from_hf_dir(folder)
        backend = _load_tokenizer_json(path)
        n = int(backend.get_vocab_size(with_added_tokens=True))
        bos = bos_id if bos_id is not None and 0 <= bos_id < n else None
        with_special = backend.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and len(with_special) > len(backend.encode("a", add_special_tokens=False).ids) \
            and with_special[0] == bos
        return cls(backend, kind="hf", bos_id=bos, eos_ids=[e for e in eos_ids if 0 <= e < n], add_bos=add_bos,
                   source=path)

    @classmethod
    def from_hf_dir(cls, directory) -> "Tokenizer":
        """A Hugging Face model directory; see the module docstring for the files read."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise ValueError(f"{directory}: not a directory")
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        cfg = _read_json(cfg_path) or {}
        if not isinstance(cfg, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
        gen = _read_json(os.path.join(directory, "generation_config.json")) or {}
        model_cfg = _read_json(os.path.join(directory, "config.json")) or {}

        tj, sm = os.path.join(directory, HF_FILE), os.path.join(directory, SP_FILE)
        if os.path.exists(tj):
            backend, kind = _load_tokenizer_json(tj), "hf"
            lookup, source = backend.token_to_id, tj
        elif os.path.exists(sm):
            backend, kind = _load_sentencepiece(sm), "sentencepiece"
            source = sm

            def lookup(piece, _sp=backend):
                i = _sp.piece_to_id(piece)
                return None if i == _sp.unk_id() and piece != _sp.id_to_piece(i) else i
        else:
            raise ValueError(f"{directory}: no {HF_FILE} or {SP_FILE} (not a Hugging Face tokenizer directory)")

        def token_id(key):
            """(present, id) of tokenizer_config's bos_token / eos_token (a str or {"content": ...})."""
            if key not in cfg:
                return False, None
            tok = cfg[key]
            if isinstance(tok, dict):
                tok = tok.get("content")
            if tok is None:
                return True, None
            if not isinstance(tok, str):
                raise ValueError(f"{cfg_path}: {key} must be a string or {{'content': ...}}, got {tok!r}")
            i = lookup(tok)
            if i is None:
                raise ValueError(f"{cfg_path}: {key} {tok!r} is not in the vocabulary of {source}")
            return True, i

        has_bos, bos = token_id("bos_token")
        if not has_bos:
            bos = _first_id(gen.get("bos_token_id"), model_cfg.get("bos_token_id"))
            if bos is None and kind == "sentencepiece" and backend.bos_id() >= 0:
                bos = backend.bos_id()
        _, eos = token_id("eos_token")
        eos_ids = [e for e in (eos,) if e is not None]
        for extra in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            eos_ids += _id_list(extra)
        if not eos_ids and kind == "sentencepiece" and backend.eos_id() >= 0:
            eos_ids = [backend.eos_id()]

        add_bos = cfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            if kind == "sentencepiece":
                add_bos = True  # LlamaTokenizer's default
            else:  # no flag: does the tokenizer.json post-processor add BOS?
                with_special = backend.encode("a", add_special_tokens=True).ids
                plain = backend.encode("a", add_special_tokens=False).ids
                add_bos = bos is not None and len(with_special) > len(plain) and with_special[0] == bos

        return cls(backend, kind=kind, bos_id=bos, eos_ids=eos_ids, add_bos=add_bos,
                   chat_template=_hf_chat_template(directory, cfg, cfg_path), source=directory)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "") -> "Tokenizer":
        """The tokenizer embedded in GGUF metadata (plain python values keyed by GGUF key names)."""
        where = source or "GGUF"
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError(f"{where}: no tokenizer in the GGUF metadata (tokenizer.ggml.model is missing)")
        model = _as_str(model)
        if model not in ("llama", "gpt2"):
            raise ValueError(f"{where}: unsupported GGUF tokenizer model {model!r} (supported: 'llama', 'gpt2')")
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{where}: GGUF metadata has no tokenizer.ggml.tokens")
        tokens = [_as_str(t) for t in meta["tokenizer.ggml.tokens"]]
        n = len(tokens)
        if n == 0:
            raise ValueError(f"{where}: tokenizer.ggml.tokens is empty")
        raw_types = meta.get("tokenizer.ggml.token_type")
        types = [_NORMAL] * n if raw_types is None else [int(t) for t in raw_types]
        if len(types) != n:
            raise ValueError(f"{where}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

        def special(name):
            v = meta.get(f"tokenizer.ggml.{name}_token_id")
            return int(v) if v is not None and 0 <= int(v) < n else None  # llama.cpp ignores out-of-range ids

        bos = special("bos")
        eos_ids = [i for i in (special("eos"), special("eot"), special("eom")) if i is not None]
        add_bos_key = meta.get("tokenizer.ggml.add_bos_token")
        template = meta.get("tokenizer.chat_template")
        template = _as_str(template) if template is not None else None

        if model == "llama":
            backend = _sentencepiece_from_gguf(meta, tokens, types, special("unknown"), bos, eos_ids, where)
            kind, add_bos = "sentencepiece", True
        else:
            pre = _as_str(meta.get("tokenizer.ggml.pre") or "default")
            if pre not in _GGUF_PRE:
                raise ValueError(f"{where}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre = {pre!r} "
                                 f"(supported: {', '.join(sorted(_GGUF_PRE))})")
            style, ignore_merges, add_bos = _GGUF_PRE[pre]
            backend = _byte_level_bpe_from_gguf(meta, tokens, types, style, ignore_merges, where)
            kind = "hf"
        if add_bos_key is not None:
            add_bos = bool(add_bos_key)
        tok = cls(backend, kind=kind, bos_id=bos, eos_ids=eos_ids, add_bos=add_bos, chat_template=template,
                  source=source)
        if kind == "hf":
            tok.gguf_pre = pre
        return tok


# ---------------------------------------------------------------------- helpers


def _as_str(v) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8")
    return str(v)


def _first_id(*values):
    for v in values:
        ids = _id_list(v)
        if ids:
            return ids[0]
    return None


def _id_list(v) -> list[int]:
    if v is None:
        return []
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v if x is not None]
    return [int(v)]


def _read_json(path, required=False):
    if not os.path.exists(path):
        if required:
            raise ValueError(f"{path}: no such file")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None


def _load_tokenizer_json(path):
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        return HFTokenizer.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception subclass for parse errors
        raise ValueError(f"{path}: cannot read tokenizer ({' '.join(str(e).split())[:300]})") from None


def _load_sentencepiece(path):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            data = f.read()
        return spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError for corrupt protos
        raise ValueError(f"{path}: cannot read SentencePiece model ({' '.join(str(e).split())[:300]})") from None


def _hf_chat_template(directory, cfg, cfg_path):
    """tokenizer_config.json chat_template (a str, or a list of {name, template}); else chat_template.jinja/.json."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if t is not None and not isinstance(t, str):
        raise ValueError(f"{cfg_path}: chat_template must be a string or a list of {{name, template}}")
    if t:
        return t
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        try:
            with open(jinja, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{jinja}: cannot read ({e})") from None
    ct = _read_json(os.path.join(directory, "chat_template.json"))
    if isinstance(ct, dict) and isinstance(ct.get("chat_template"), str):
        return ct["chat_template"]
    return None


def _jinja_env():
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


_U2B = None


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for each byte."""
    global _U2B
    if _U2B is None:
        bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        cs = bs[:]
        extra = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + extra)
                extra += 1
        _U2B = {chr(c): b for b, c in zip(bs, cs)}
    return _U2B


def _sentencepiece_from_gguf(meta, tokens, types, unk, bos, eos_ids, where):
    """A SentencePiece BPE ModelProto with the GGUF pieces, scores and types, loaded by SentencePiece."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    scores = [0.0] * n if scores is None else [float(s) for s in scores]
    if len(scores) != n:
        raise ValueError(f"{where}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    types = list(types)
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    if unk is None:
        raise ValueError(f"{where}: the llama (SentencePiece) vocabulary has no unknown token")
    for i, t in enumerate(types):  # SentencePiece wants exactly one UNKNOWN piece
        if t == _UNKNOWN and i != unk:
            types[i] = _CONTROL
    types[unk] = _UNKNOWN

    m = pb.ModelProto()
    valid = {_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE}
    for tok, score, t in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = tok, score, t if t in valid else _NORMAL
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = n
    ts.byte_fallback = _BYTE in types
    ts.unk_id, ts.unk_piece = unk, tokens[unk]
    ts.bos_id = -1 if bos is None else bos
    if bos is not None:
        ts.bos_piece = tokens[bos]
    ts.eos_id = eos_ids[0] if eos_ids else -1
    if eos_ids:
        ts.eos_piece = tokens[eos_ids[0]]
    pad = meta.get("tokenizer.ggml.padding_token_id")
    ts.pad_id = int(pad) if pad is not None and 0 <= int(pad) < n else -1
    if ts.pad_id >= 0:
        ts.pad_piece = tokens[ts.pad_id]
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp never collapses whitespace for SentencePiece vocabularies unless the key says so
    ns.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    ns.escape_whitespaces = True
    try:
        return spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    except Exception as e:
        raise ValueError(f"{where}: cannot build a SentencePiece model from the GGUF vocabulary "
                         f"({' '.join(str(e).split())[:300]})") from None


def _byte_level_bpe_from_gguf(meta, tokens, types, style, ignore_merges, where):
    """A byte-level BPE ``tokenizers.Tokenizer`` from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    merges_raw = meta.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise ValueError(f"{where}: gpt2 (byte-level BPE) vocabulary without tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        parts = _as_str(m).split(" ")
        if len(parts) != 2:
            raise ValueError(f"{where}: malformed merge {m!r} in tokenizer.ggml.merges (expected 'a b')")
        merges.append((parts[0], parts[1]))
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"{where}: token {t!r} appears twice in tokenizer.ggml.tokens (ids {vocab[t]} and {i})")
        vocab[t] = i
    try:
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    except Exception as e:
        raise ValueError(f"{where}: cannot build the BPE model from the GGUF vocabulary "
                         f"({' '.join(str(e).split())[:300]})") from None
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "digits+gpt2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        regex = _LLAMA3_SPLIT if style == "llama3" else _QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>, <|endoftext|>) are matched whole as special tokens; user-defined
    # ones (<think>) are matched whole too, as llama.cpp does, but are not special
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{where}: vocabulary size changed while adding special tokens "
                         f"({len(tokens)} -> {tok.get_vocab_size(with_added_tokens=True)})")
    return tok
