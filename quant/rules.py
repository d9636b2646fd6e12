"""Precision rules: which precision each parameter gets, chosen by regex over its path.

As qwix's rules and MaxText's ``quant_cfg_path`` JSON: an ordered list of
``(regex, spec)``; the first regex that *searches* successfully in a parameter's path wins,
otherwise ``default`` applies.  Paths join pytree keys with ``/`` (``layers_0/mlp/up/kernel``).

Integer specs only apply to arrays of rank >= 2 (matmul weights); rank-0/1 parameters (norm
scales, biases) are never integer-quantized and keep their dtype unless a rule gives them a
float spec.  ``PrecisionRules.parse`` reads the forms the CLI accepts:

* a spec: ``int4-g128`` (default rules keep norms, embeddings and the LM head in bf16)
* inline rules: ``"embed|lm_head=bf16,attn=int8,*=int4-g128"`` (``*`` names the default)
* a JSON file: ``{"__default__": "int4-g128", "rules": [["embed|lm_head", "bf16"], ...]}``
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from quant.spec import FloatSpec, IntSpec, Spec, parse_spec

# Mixed-precision fallback that LLM quantizers use by default (GPTQ/AWQ leave these unquantized):
# norms are tiny and sensitive; embeddings and the LM head see every token.
KEEP_16BIT_RULES: tuple[tuple[str, str], ...] = (
    (r"norm", "bf16"),
    (r"embed|token_embd", "bf16"),  # HF embed_tokens, Meta tok_embeddings, GGUF token_embd
    (r"(^|[/.])lm_head([/.]|$)|^(params[/.])?output([/.]|$)", "bf16"),  # HF lm_head; Meta/GGUF output
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrecisionRules:
    """Ordered (regex -> spec) rules with a default spec."""

    rules: tuple[tuple[str, Spec], ...] = ()  # first regex that matches the path wins
    default: Spec | None = None  # spec for unmatched parameters; None leaves them unchanged

    def __post_init__(self):
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
    def from_spec(cls, spec: Spec | str, keep_16bit: bool = True) -> "PrecisionRules":
        """One spec for every matmul weight; norms, embeddings and LM head in bf16 if ``keep_16bit``."""
        return cls(rules=KEEP_16BIT_RULES if keep_16bit else (), default=parse_spec(spec))

    @classmethod
    def parse(cls, text: "str | PrecisionRules") -> "PrecisionRules":
        """A spec, inline ``regex=spec,...`` rules, or a path to a JSON rules file."""
        if isinstance(text, PrecisionRules):
            return text
        if not isinstance(text, str):
            raise ValueError(f"precision rules must be a spec, inline rules or a JSON path, got {type(text).__name__}")
        text = text.strip()
        if text.endswith(".json") or os.path.isfile(text):
            return cls.from_json_file(text)
        if "=" not in text:
            return cls.from_spec(text)
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
                rules.append((pattern.strip(), spec.strip()))
        return cls(rules=tuple(rules), default=default)

    @classmethod
    def from_json_file(cls, path: str) -> "PrecisionRules":
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"precision rules file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"precision rules file {path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not set(data) <= {"__default__", "rules"}:
            raise ValueError(f"{path}: expected an object with keys '__default__' and 'rules'")
        rules = data.get("rules", [])
        if not all(isinstance(r, list) and len(r) == 2 for r in rules):
            raise ValueError(f"{path}: 'rules' must be a list of [regex, spec] pairs")
        return cls(rules=tuple(tuple(r) for r in rules), default=data.get("__default__"))

    def to_json(self) -> dict:
        return {"__default__": None if self.default is None else str(self.default),
                "rules": [[p, str(s)] for p, s in self.rules]}

    def spec_for(self, path: str, ndim: int) -> Spec | None:
        """The spec for a parameter, or None to leave it unchanged."""
        spec = self.default
        for pattern, rule_spec in self.rules:
            if re.search(pattern, path):
                spec = rule_spec
                break
        if isinstance(spec, IntSpec) and ndim < 2:
            return None
        return spec

