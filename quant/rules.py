"""Precision rules: which precision each parameter gets, chosen by regex over its path.

As qwix's rules and MaxText's ``quant_cfg_path`` JSON: an ordered list of
``(regex, spec)``; the first regex that *searches* successfully in a parameter's path wins,
otherwise ``default`` applies.  Paths join pytree keys with ``/`` (``layers_0/mlp/up/kernel``).

Lookup order for a parameter: the user's rules (first match wins), then, unless
``keep_16bit=False``, the keep-16-bit rules (:data:`KEEP_16BIT_RULES`: norms, embeddings and the
LM head in bf16), then ``default``.  So every form below keeps those tensors in bf16 unless a
rule of the user's names them (``embed=int8,*=int4-g128`` quantizes the embedding).

Integer specs only apply to arrays of rank >= 2 (matmul weights): for a rank-0/1 parameter (norm
scale, bias) a rule with an integer spec does not match and the lookup goes on, so such
parameters keep their dtype unless a rule gives them a float spec.  ``PrecisionRules.parse``
reads the forms the CLI accepts:

* a spec: ``int4-g128``
* inline rules: ``"attn=int8,*=int4-g128"`` (``*`` names the default)
* a JSON file, named by a path that ends in ``.json`` or contains a ``/`` (never guessed from a
  bare word, so a file called ``int8`` in the working directory cannot replace the spec ``int8``):
  ``{"__default__": "int4-g128", "rules": [["attn", "int8"], ...], "keep_16bit": true, "spec_version": 2}``
  (``keep_16bit`` optional, default true).  ``spec_version`` is the spec grammar its specs are
  written in (:mod:`cascade.quant.spec`); a file without it was written before version 2 and is
  read with the old meaning (``int3-g32`` = narrow), with a warning where that differs from the
  current grammar.  :meth:`PrecisionRules.to_json` writes version 2 with every grid explicit.
* the same object as JSON text, ``'{"__default__": "int4-g128", "rules": []}'`` (how a checkpoint
  records rules that were given as a file or chosen by ``--quant auto``).

A rule that decides no parameter of a model (:meth:`PrecisionRules.unused`: a typo such as
``atn=int8``, a rule an earlier one shadows, an integer spec on vectors only) is refused by
:meth:`PrecisionRules.check_used`, which :func:`cascade.models.quantize.check_quantize` runs
wherever rules are applied to a model; :func:`cascade.quant.quantize_params` applies rules as given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import warnings

from cascade.quant.spec import SPEC_VERSION, IntSpec, Spec, check_version, parse_spec

# Mixed-precision fallback that LLM quantizers use by default (GPTQ/AWQ leave these unquantized):
# norms are tiny and sensitive; embeddings and the LM head see every token.
KEEP_16BIT_RULES: tuple[tuple[str, str], ...] = (
    (r"norm", "bf16"),
    (r"embed|token_embd", "bf16"),  # HF embed_tokens, Meta tok_embeddings, GGUF token_embd
    (r"(^|[/.])lm_head([/.]|$)|^(params[/.])?output([/.]|$)", "bf16"),  # HF lm_head; Meta/GGUF output
)

_KEEP_16BIT_SPECS = tuple((pattern, parse_spec(spec)) for pattern, spec in KEEP_16BIT_RULES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionRules:
    """Ordered (regex -> spec) rules with a default spec."""

    rules: tuple[tuple[str, Spec], ...] = ()  # the user's rules: first regex that matches the path wins
    default: Spec | None = None  # spec for unmatched parameters; None leaves them unchanged
    keep_16bit: bool = True  # after the user's rules, KEEP_16BIT_RULES (norms, embeddings, LM head -> bf16)

    def __post_init__(self):
        if not isinstance(self.keep_16bit, bool):
            raise ValueError(f"keep_16bit must be true or false, got {self.keep_16bit!r}")
        checked = []
        for pattern, spec in self.rules:
            if not isinstance(pattern, str):
                raise ValueError(f"precision rule pattern must be a string, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regex {pattern!r} in precision rules: {e}") from None
            checked.append((pattern, parse_spec(spec)))
        object.__setattr__(self, "rules", tuple(checked))
        if self.default is not None:
            object.__setattr__(self, "default", parse_spec(self.default))

    @classmethod
    def from_spec(cls, spec: Spec | str, keep_16bit: bool = True, *, version: int = SPEC_VERSION) -> "PrecisionRules":
        """One spec for every matmul weight; norms, embeddings and LM head in bf16 if ``keep_16bit``."""
        return cls(default=parse_spec(spec, version=version), keep_16bit=keep_16bit)

    @classmethod
    def parse(cls, text: "str | PrecisionRules", *, version: int = SPEC_VERSION) -> "PrecisionRules":
        """A spec, inline ``regex=spec,...`` rules, or a path to a JSON rules file.  ``version``: the
        spec grammar of a spec or inline rules (1 for text saved before version 2; a JSON object
        says its own, ``spec_version``, and is version 1 without it)."""
        if isinstance(text, PrecisionRules):
            return text
        if not isinstance(text, str):
            raise ValueError(f"precision rules must be a spec, inline rules or a JSON path, got {type(text).__name__}")
        text = text.strip()
        if not text:
            raise ValueError("empty precision rules: expected a spec (e.g. int8, int4-g128), inline rules "
                             "(e.g. 'attn=int8,*=int4-g128') or a rules file (a path ending in .json)")
        if is_rules_path(text):
            return cls.from_json_file(text)
        if text.startswith("{"):  # a rules object as JSON text (how a checkpoint records rules given as a file)
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"precision rules {text[:40]!r}... are not valid JSON: {e}") from None
            return cls.from_json(data, "precision rules")
        if "=" not in text:
            return cls.from_spec(text, version=version)
        rules, default = [], None
        for item in text.split(","):
            pattern, sep, spec = item.rpartition("=")
            if not sep or not pattern:
                raise ValueError(f"bad precision rule {item!r}: expected REGEX=SPEC")
            if pattern.strip() == "*":
                if default is not None:
                    raise ValueError(f"precision rules {text!r} set the default (*) twice")
                default = spec.strip()
            else:
                rules.append((pattern.strip(), parse_spec(spec.strip(), version=version)))
        return cls(rules=tuple(rules), default=None if default is None else parse_spec(default, version=version))

    @classmethod
    def from_json_file(cls, path: str) -> "PrecisionRules":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"precision rules file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"precision rules file {path} is not valid JSON: {e}") from None
        return cls.from_json(data, path)

    @classmethod
    def from_json(cls, data, path: str) -> "PrecisionRules":
        """Rules from a parsed rules object (``path`` names where it came from in errors)."""
        if not isinstance(data, dict) or not set(data) <= {"__default__", "rules", "keep_16bit", "spec_version"}:
            raise ValueError(f"{path}: expected an object with keys '__default__', 'rules' and optionally "
                             "'keep_16bit' and 'spec_version'")
        rules = data.get("rules", [])
        if not isinstance(rules, list) or not all(isinstance(r, list) and len(r) == 2 for r in rules):
            raise ValueError(f"{path}: 'rules' must be a list of [regex, spec] pairs")
        default = data.get("__default__")
        if default is not None and not isinstance(default, str):
            raise ValueError(f"{path}: '__default__' must be a spec string or null")
        try:
            version = check_version(data.get("spec_version", 1), "'spec_version'")
            specs = [s for _, s in rules] + ([default] if default is not None else [])
            if version == 1 and any(isinstance(s, str) and str(parse_spec(s, version=1)) != str(parse_spec(s)) for s in specs):
                changed = ", ".join(f"{s} -> {parse_spec(s, version=1).explicit}" for s in specs
                                    if isinstance(s, str) and str(parse_spec(s, version=1)) != str(parse_spec(s)))
                warnings.warn(f"{path} has no \"spec_version\": read as written before spec grammar version 2 "
                              f"({changed}); add \"spec_version\": 2 to use the current grammar (full grid at 2-4 bits)",
                              stacklevel=3)

            def spec(s):
                return parse_spec(s, version=version) if isinstance(s, str) else s
            return cls(rules=tuple((p, spec(s)) for p, s in rules), default=None if default is None else spec(default),
                       keep_16bit=data.get("keep_16bit", True))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self) -> dict:
        """The rules as a JSON object (spec grammar version 2, every grid explicit)."""
        return {"__default__": None if self.default is None else self.default.explicit,
                "rules": [[p, s.explicit] for p, s in self.rules], "keep_16bit": self.keep_16bit,
                "spec_version": SPEC_VERSION}

    def text(self) -> str:
        """The rules as text that means the same under either spec grammar: a lone spec
        (``int3-g32-full``), inline rules (``attn=int8,*=int3-g32-full``), or JSON text when the
        inline form cannot say it (no keep-16-bit rules, a rule with ``,`` or ``=``)."""
        inline = self.keep_16bit and all("," not in p and "=" not in p and p.strip() == p and p != "*" and p
                                         for p, _ in self.rules)
        if inline and not self.rules and self.default is not None:
            return self.default.explicit
        if inline and self.rules:
            default = [] if self.default is None else [f"*={self.default.explicit}"]
            return ",".join([f"{p}={s.explicit}" for p, s in self.rules] + default)
        return json.dumps(self.to_json(), sort_keys=True)

    def spec_for(self, path: str, ndim: int) -> Spec | None:
        """The spec for a parameter, or None to leave it unchanged (see the module docstring)."""
        keep = _KEEP_16BIT_SPECS if self.keep_16bit else ()
        for pattern, spec in (*self.rules, *keep, ("", self.default)):
            if spec is None or (isinstance(spec, IntSpec) and ndim < 2):
                continue  # integer specs do not apply to vectors and scalars
            if re.search(pattern, path):
                return spec
        return None


    def unused(self, params) -> list[tuple[str, Spec, str]]:
        """The user's rules that decide the precision of none of ``params`` (``(path, ndim)`` pairs,
        e.g. a model's parameter paths and ranks), each as ``(pattern, spec, why)``: its regex
        matches no path (a typo: ``atn=int8``), it matches only vectors that an integer spec skips,
        or every parameter it matches is taken by an earlier rule.  The default (``*``) is not a rule."""
        params = list(params)
        decided: set[int] = set()
        for path, ndim in params:
            for i, (pattern, spec) in enumerate(self.rules):
                if not (isinstance(spec, IntSpec) and ndim < 2) and re.search(pattern, path):
                    decided.add(i)
                    break
        out = []
        for i, (pattern, spec) in enumerate(self.rules):
            if i in decided:
                continue
            hits = [ndim for path, ndim in params if re.search(pattern, path)]
            why = ("matches no parameter path" if not hits else
                   "matches only vectors (norm scales, biases), which an integer spec leaves as they are"
                   if isinstance(spec, IntSpec) and all(n < 2 for n in hits) else
                   "matches only parameters that an earlier rule decides")
            out.append((pattern, spec, why))
        return out

    def check_used(self, params, where: str = "the model") -> None:
        """A ValueError naming the first rule of :meth:`unused` (a rule that does nothing is a
        mistake: a typo would otherwise leave those tensors at the default precision unnoticed)."""
        params = list(params)
        unused = self.unused(params)
        if not unused:
            return
        pattern, spec, why = unused[0]
        kinds: dict[str, str] = {}  # one example path per kind of matrix (embed, attn, mlp, lm_head)
        for p, n in params:
            parts = p.split("/")
            if n >= 2 and (parts[0] == "layers_0" or not parts[0].startswith("layers_")):
                kinds.setdefault(parts[1] if parts[0] == "layers_0" and len(parts) > 2 else parts[0], p)
        shown = list(kinds.values())[:4]
        more_paths = sum(n >= 2 for _, n in params) > len(shown)
        examples = ", ".join(shown + ["..."] * more_paths) if shown else "it has no matrices"
        more = f" ({len(unused) - 1} more rule(s) do nothing too)" if len(unused) > 1 else ""
        raise ValueError(f"precision rule '{pattern}={spec}' does nothing for {where}: it {why}{more}; a rule is "
                         f"REGEX=SPEC, its regex searched in each parameter path ({examples}), the first rule that "
                         "matches wins")


def is_rules_path(text: str) -> bool:
    """Whether ``text`` names a rules file rather than a spec or inline rules: it ends in ``.json``,
    or it contains a path separator and no ``=``.  Nothing is looked up in the working directory."""
    text = text.strip()
    return text.endswith(".json") or ("=" not in text and ("/" in text or os.sep in text))

