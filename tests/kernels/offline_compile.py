"""Compile Triton kernels for a GPU target on the CPU: a script run in a subprocess without the interpreter
(Triton's bundled ptxas for NVIDIA, its AMD backend for ROCm) prints its JSON result after "RESULT"."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def require_ptxas() -> None:
    """Skip the calling test when no ptxas can compile the NVIDIA path."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not bundled.exists() and not shutil.which("ptxas"):
        pytest.skip("no ptxas to compile the NVIDIA path")


def run_compile_script(script: str, stdin: str | None = None, env_extra: dict | None = None, timeout: int = 300,
                       argv: tuple = (), env_unset: tuple = ()):
    """The JSON value `script` prints after "RESULT" (run from the repository root with arguments argv,
    TRITON_INTERPRET and the names in env_unset unset, env_extra set)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and k not in env_unset}
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", script, *argv], input=stdin, env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def run_gluon_compile_script(script: str):
    """run_compile_script for a script that compiles Gluon kernels (compile_gluon_sm90): skips the calling test
    where this Triton has no Gluon or no ptxas."""
    pytest.importorskip("triton.experimental.gluon")
    require_ptxas()
    return run_compile_script(script)


def compile_gluon_sm90(fn, signature: dict, constexprs: dict, divisible=(), num_warps: int = 4):
    """Compile a Gluon kernel for sm_90 (for the scripts run_compile_script runs): signature maps every argument to
    its type ("constexpr" for the constexprs' keys), divisible names the arguments Triton would specialize as
    multiples of 16 at run time (pointers always are). Returns the CompiledKernel (asm["ptx"], asm["cubin"])."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = {n: signature[n] for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, v) in enumerate(sig.items())
             if v.startswith("*") or n in divisible}
    src = GluonASTSource(fn=fn, signature=sig, attrs=attrs, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
