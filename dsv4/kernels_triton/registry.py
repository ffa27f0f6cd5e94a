"""Kernel variants registered by name per op, and the scoped override that picks one.

`register(op, name, fn, formats, max_t, doc)` adds a variant; `TritonOps` asks `resolve(op, fmt, default)`
for the one to run. A researcher swaps one in for a block of code with
`with dsv4.kernels_triton.use(moe="grouped"): ...` (a ContextVar, so threads and nested scopes are
independent), or for a whole engine with `TritonOps(kernels={"moe": "grouped"})`. `variants()` lists
them (for `dsv4 inspect kernels` and tools/bench_kernels.py). Knows names and callables only.
"""
from __future__ import annotations

import enum
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ..quant.formats import QuantFormat


class KernelOp(str, enum.Enum):
    QMATMUL = "qmatmul"  # also serves qmatmul_grouped
    MOE = "moe"


AUTO = "auto"  # the default variant of every op: picks by shape


@dataclass(frozen=True)
class Variant:
    op: KernelOp
    name: str
    fn: Callable
    formats: Optional[frozenset] = None  # None: every format the kernels decode
    max_t: Optional[int] = None  # largest token count it is meant for (callers chunk above it)
    doc: str = ""
    act_quant: bool = False  # rounds activations as TorchOps(act_quant=True) does (ds4's int8 schemes)

    def supports(self, fmt: QuantFormat) -> bool:
        return self.formats is None or QuantFormat(fmt) in self.formats


_VARIANTS: dict[KernelOp, dict[str, Variant]] = {op: {} for op in KernelOp}
_OVERRIDES: ContextVar[dict] = ContextVar("dsv4_kernel_overrides", default={})


def register(op: KernelOp, name: str, fn: Callable, formats=None, max_t: Optional[int] = None, doc: str = "",
             act_quant: bool = False) -> Variant:
    op = KernelOp(op)
    v = Variant(op, name, fn, frozenset(QuantFormat(f) for f in formats) if formats else None, max_t, doc, act_quant)
    _VARIANTS[op][name] = v
    return v


def variants(op: Optional[KernelOp] = None) -> list[Variant]:
    ops = [KernelOp(op)] if op is not None else list(KernelOp)
    return [v for o in ops for v in _VARIANTS[o].values()]


def get(op: KernelOp, name: str) -> Variant:
    op = KernelOp(op)
    try:
        return _VARIANTS[op][name]
    except KeyError:
        raise ValueError(f"no {op.value} kernel named {name!r}; registered: {', '.join(sorted(_VARIANTS[op]))}") from None


def _check_names(choices: dict) -> dict:
    out = {}
    for op, name in choices.items():
        try:
            op = KernelOp(op)
        except ValueError:
            raise ValueError(f"unknown kernel op {op!r}; ops: {', '.join(o.value for o in KernelOp)}") from None
        get(op, name)
        out[op] = name
    return out


@contextmanager
def use(**choices: str) -> Iterator[None]:
    """Scoped override: `with use(qmatmul="gemv", moe="grouped"): ...`."""
    merged = {**_OVERRIDES.get(), **_check_names(choices)}
    token = _OVERRIDES.set(merged)
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def resolve(op: KernelOp, fmt: QuantFormat, defaults: Optional[dict] = None) -> Variant:
    """The variant to run: scoped override, else the engine's choice, else AUTO; one that does not
    decode `fmt` falls back to AUTO."""
    op = KernelOp(op)
    name = _OVERRIDES.get().get(op) or (defaults or {}).get(op) or AUTO
    v = get(op, name)
    return v if v.supports(fmt) else get(op, AUTO)
