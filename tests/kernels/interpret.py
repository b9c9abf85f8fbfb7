"""Load a Triton kernel module fresh under ``TRITON_INTERPRET=1`` so its kernels run on CPU tensors.

``triton.jit`` reads TRITON_INTERPRET when it decorates a function, so the module is executed again from its
file under another name with the variable set; the package's own (compiled) copy is left alone.

Triton 3.6's interpreter turns loop bounds into ints with ``int(array_of_shape_(1,))``, which NumPy >= 2.4
refuses; ``load_interpreted`` patches that one conversion (to ``.item()``) while the interpreter runs.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest


def _patch_interpreter_index(interpreter):
    if interpreter is None:
        from triton.runtime import interpreter
    if getattr(interpreter, "_seqmamba_index_patch", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._seqmamba_index_patch = True


def _triton_modules():
    return {m: sys.modules[m] for m in list(sys.modules)
            if (m == "triton" or m.startswith("triton.")) and not m.startswith("triton._C")}


def _reimport_triton_interpreted():
    """triton.language's own helpers (tl.zeros, tl.sum's combine, ...) are ``@jit`` functions decorated when
    triton is first imported; if that happened in compiled mode (torch, lightning and transformers import
    triton), drop those modules and import triton again, now interpreted. Modules already holding the old
    triton objects keep working with them."""
    import triton.language as tl

    if isinstance(tl.standard.zeros, _interpreted_function_type()):
        return
    for name in _triton_modules():
        del sys.modules[name]
    import triton.language  # noqa: F401  (fresh, interpreted)
    import triton.experimental.gluon  # noqa: F401  (imported lazily by the launcher otherwise, maybe too late)


def _interpreted_function_type():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def load_interpreted(module: str):
    """Return a fresh copy of ``module`` (a dotted name) whose ``@triton.jit`` kernels are interpreted."""
    pytest.importorskip("triton")
    name = module + "__interpreted"
    if name in sys.modules:  # loaded once per process: its custom ops are registered once
        return sys.modules[name]
    spec = importlib.util.find_spec(module)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    compiled = _triton_modules()
    try:
        _reimport_triton_interpreted()
        fresh = importlib.util.spec_from_file_location(name, spec.origin)
        mod = importlib.util.module_from_spec(fresh)
        sys.modules[name] = mod
        fresh.loader.exec_module(mod)
    finally:
        # put the compiled-mode triton back for everything imported later in this process (the interpreted
        # copy stays reachable from the module loaded here)
        interpreted = _triton_modules()
        for name in interpreted:
            if name not in compiled:
                del sys.modules[name]
        sys.modules.update(compiled)
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
    _patch_interpreter_index(interpreted.get("triton.runtime.interpreter"))
    return mod
