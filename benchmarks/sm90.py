"""Compile a Triton kernel for sm_90 on a machine without a GPU and read what ptxas made of it: registers,
spill stack, and the SASS instruction mix of its innermost loop. Triton's wheel carries ptxas and cuobjdump,
so this needs no device time; the benchmarks' ``--resources`` options use it.

The signature mimics Triton's launch-time specialisation, which is what the real launch compiles: pointers
and the integer arguments named in ``aligned`` get divisibility 16, the ones in ``unit`` are the constant 1,
and everything in ``consts`` is a constexpr. Leaving an argument out of ``aligned`` that is a multiple of 16 at
run time changes the code (e.g. vector loads become scalar ones), so list every stride and size that is.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_INSTR = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*);")


def compile_sm90(fn, consts: dict, *, half=(), i64=(), aligned=(), unit=(), num_warps=4, num_stages=1,
                 maxnreg=None) -> bytes:
    """The cubin of the ``@triton.jit`` function ``fn`` for sm_90: pointer arguments are ``*bf16`` when named
    in ``half``, ``*i64`` in ``i64``, else ``*fp32``; other non-constexpr arguments are i32."""
    consts = {**{a: 1 for a in fn.arg_names if a in unit}, **consts}
    sig = {a: "constexpr" if a in consts else
           ("*bf16" if a in half else "*i64" if a in i64 else "*fp32") if a.endswith("_ptr") else "i32"
           for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a not in consts and (a.endswith("_ptr") or a in aligned)}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages,
                                       **({"maxnreg": maxnreg} if maxnreg else {}))).asm["cubin"]


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> tuple[str, str]:
    """("REG:n", "STACK:bytes") as cuobjdump reports them (a non-zero stack is spilled registers)."""
    line = next((ln for ln in _cuobjdump(cubin, "-res-usage").splitlines() if "REG:" in ln), "? ?")
    return tuple(line.split()[:2])


def innermost_loop(cubin: bytes) -> tuple[int, collections.Counter]:
    """(instruction count, opcode counts) of the shortest backward branch's body: a kernel's innermost loop
    (e.g. the per-state loop of the selective-scan kernels)."""
    instrs = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_INSTR.match, _cuobjdump(cubin, "-sass")
                                                                          .splitlines()) if m]
    loops = []
    for addr, op, rest in instrs:
        target = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        return 0, collections.Counter()
    lo, hi = min(loops, key=lambda r: r[1] - r[0])
    ops = collections.Counter(op.split(".")[0] for addr, op, _ in instrs if lo <= addr <= hi)
    return sum(ops.values()), ops
