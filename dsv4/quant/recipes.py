"""Quantization recipes: which GGUF format each tensor gets, as data (quant.md §3.7).

A recipe is an ordered list of (pattern -> QuantFormat) rules loaded from JSON; the first rule whose
pattern matches a tensor name wins. Patterns are fnmatch globs (case-sensitive) or, prefixed with
're:', regular expressions matched against the whole name. The published q2 and q4 recipes ship as
package data (dsv4/quant/recipes/*.json). `detect_recipe` names a file's recipe from its routed-expert
formats. Knows tensor names and formats only: no tensors, no quantization.
"""
from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import RecipeError
from .formats import QuantFormat

REGEX_PREFIX = "re:"
BUILTIN_RECIPES = ("q2", "q4")
RECIPE_MIXED = "mixed"
RECIPE_NONE = "none"  # a file without routed-expert tensors

# Routed-expert tensor suffixes; their formats name a file's recipe.
_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
# (gate/up format, down format) of each published recipe
_EXPERT_SIGNATURES = {
    (QuantFormat.IQ2_XXS, QuantFormat.Q2_K): "q2",
    (QuantFormat.Q4_K, QuantFormat.Q4_K): "q4",
}


@dataclass(frozen=True)
class Rule:
    """One recipe rule: tensors whose name matches `pattern` are stored as `fmt`."""

    pattern: str
    fmt: QuantFormat
    note: str = ""
    _regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pattern.startswith(REGEX_PREFIX):
            src = self.pattern[len(REGEX_PREFIX):]
            try:
                rx = re.compile(src)
            except re.error as e:
                raise RecipeError(f"recipe pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        else:
            rx = re.compile(fnmatch.translate(self.pattern))
        object.__setattr__(self, "_regex", rx)

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None


def _parse_format(value, where: str) -> QuantFormat:
    if isinstance(value, QuantFormat):
        return value
    key = str(value).strip().upper()
    if key not in QuantFormat.__members__:
        known = ", ".join(QuantFormat.__members__)
        raise RecipeError(f"{where}: unknown format {value!r}; use one of {known}")
    return QuantFormat[key]


@dataclass(frozen=True)
class Recipe:
    """Ordered rules mapping GGUF tensor names to formats; the first match wins."""

    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    source: str = ""  # where it was loaded from (for messages)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def from_rules(name: str, rules: Iterable[tuple[str, QuantFormat | str]], description: str = "") -> "Recipe":
        """Build from (pattern, format) pairs, formats as QuantFormat or names like 'Q4_K'."""
        built = tuple(Rule(p, _parse_format(f, f"recipe {name!r} rule {p!r}")) for p, f in rules)
        if not built:
            raise RecipeError(f"recipe {name!r} has no rules")
        return Recipe(name, built, description)

    @staticmethod
    def from_dict(data: Mapping, source: str = "") -> "Recipe":
        where = f"recipe {source or data.get('name', '?')}"
        if not isinstance(data, Mapping) or not isinstance(data.get("rules"), list) or not data["rules"]:
            raise RecipeError(f"{where}: expected a JSON object with a non-empty 'rules' list")
        rules = []
        for i, r in enumerate(data["rules"]):
            if not isinstance(r, Mapping) or not isinstance(r.get("pattern"), str) or "format" not in r:
                raise RecipeError(f"{where}: rule {i} must be an object with string 'pattern' and 'format', got {r!r}")
            if not r["pattern"] or r["pattern"] == REGEX_PREFIX:
                raise RecipeError(f"{where}: rule {i} has an empty pattern")
            rules.append(Rule(r["pattern"], _parse_format(r["format"], f"{where} rule {i} ({r['pattern']!r})"),
                              str(r.get("note", ""))))
        name = str(data.get("name") or Path(source).stem or "custom")
        return Recipe(name, tuple(rules), str(data.get("description", "")), source)

    @staticmethod
    def load(name_or_path: str | Path) -> "Recipe":
        """A builtin recipe by name ('q2', 'q4') or a JSON recipe file by path."""
        key = str(name_or_path)
        if key in BUILTIN_RECIPES:
            text = resources.files(__package__).joinpath("recipes", f"{key}.json").read_text(encoding="utf-8")
            return Recipe.from_dict(json.loads(text), source=f"builtin:{key}")
        path = Path(key)
        if not path.is_file():
            raise RecipeError(
                f"recipe {key!r} is neither a builtin ({', '.join(BUILTIN_RECIPES)}) nor a readable JSON file"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RecipeError(f"recipe file {path}: cannot read it as JSON ({e})") from None
        return Recipe.from_dict(data, source=str(path))

    def with_overrides(self, rules: Iterable[tuple[str, QuantFormat | str]], name: str | None = None) -> "Recipe":
        """A new recipe whose `rules` take precedence over this one's (e.g. CLI --experts overrides)."""
        extra = Recipe.from_rules(name or self.name, rules).rules
        return Recipe(name or f"{self.name}+custom", extra + self.rules, self.description, self.source)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "rules": [{"pattern": r.pattern, "format": r.fmt.name, **({"note": r.note} if r.note else {})}
                      for r in self.rules],
        }

    # ------------------------------------------------------------------ application

    def rule_for(self, name: str) -> Rule | None:
        for r in self.rules:
            if r.matches(name):
                return r
        return None

    def format_for(self, name: str, shape: Sequence[int]) -> QuantFormat:
        """The format of tensor `name` whose logical (PyTorch-order) shape is `shape` (row length last).

        Raises RecipeError when no rule matches, or the matched format's block does not divide the row."""
        rule = self.rule_for(name)
        if rule is None:
            raise RecipeError(
                f"recipe {self.name!r} has no rule for tensor {name!r}; add a rule whose pattern matches it"
            )
        fmt = rule.fmt
        row = int(shape[-1]) if len(shape) else 1
        if row % fmt.block_size:
            raise RecipeError(
                f"recipe {self.name!r} rule {rule.pattern!r} asks {fmt.name} for {name!r} with rows of {row} "
                f"weights, but {fmt.name} needs a multiple of {fmt.block_size}; add a rule with a format that fits "
                f"(e.g. {'Q8_0' if row % QuantFormat.Q8_0.block_size == 0 else 'F16'})"
            )
        return fmt

    def plan(self, tensors: Mapping[str, Sequence[int]], require_all_rules_used: bool = False) -> dict[str, QuantFormat]:
        """Formats for every tensor of a model ({name: logical shape}). With require_all_rules_used, a rule
        that matches no tensor (a mistyped pattern) is an error too."""
        out = {name: self.format_for(name, shape) for name, shape in tensors.items()}
        if require_all_rules_used:
            unused = [r.pattern for r in self.rules if not any(r.matches(n) for n in tensors)]
            if unused:
                raise RecipeError(f"recipe {self.name!r}: pattern(s) {', '.join(map(repr, unused))} match no tensor")
        return out


def detect_recipe(formats: Mapping[str, QuantFormat]) -> str:
    """Name a model's recipe from its routed-expert formats: 'q2', 'q4', 'mixed' (layers of both),
    'none' (no routed experts), or 'gate_up=X,down=Y' for any other uniform combination."""
    per_layer: dict[int, dict[str, QuantFormat]] = {}
    for name, fmt in formats.items():
        m = _EXPERT_RE.match(name)
        if m:
            per_layer.setdefault(int(m.group(1)), {})[m.group(2)] = QuantFormat(fmt)
    if not per_layer:
        return RECIPE_NONE
    signatures = set()
    for kinds in per_layer.values():
        gate, up, down = kinds.get("gate"), kinds.get("up"), kinds.get("down")
        signatures.add((gate, down) if gate == up else ("split", gate, up, down))
    if len(signatures) > 1:
        return RECIPE_MIXED
    sig = signatures.pop()
    if sig in _EXPERT_SIGNATURES:
        return _EXPERT_SIGNATURES[sig]
    fmt_name = lambda f: f.name if f is not None else "absent"  # noqa: E731
    if sig[0] == "split":
        return f"gate={fmt_name(sig[1])},up={fmt_name(sig[2])},down={fmt_name(sig[3])}"
    return f"gate_up={fmt_name(sig[0])},down={fmt_name(sig[1])}"
