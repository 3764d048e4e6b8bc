"""``forward_jit``: ``jax.jit`` for large forward-only programs, with oneDNN matmuls on x86 CPUs.

On an x86 CPU backend, a program wrapped in ``forward_jit`` can compile with XLA's oneDNN path
for individual dots (``xla_cpu_use_onednn`` + ``LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT``).
oneDNN's float32 GEMMs are faster than XLA's default (YNNPACK) kernels at large shapes. But
oneDNN adds a fixed cost to every call, about 25 ms for the 8-layer 50M-parameter model on a
2-core VM. Measured there for the full-sequence forward (``dj.logits``):

    tokens/call   32    128   256   512   1024  2048  4096
    oneDNN        0.53x 0.69x 0.80x 0.95x 1.03x 1.07x 1.09x   (speed vs XLA's default)

So the caller gives a predicate (``onednn_when``) that picks oneDNN only for calls large enough
to gain. ``dj.logits`` uses it from 2048 tokens a call (:data:`ONEDNN_MIN_TOKENS`).

Where it is not used, and why:
- The sampler's prefills and the eval scorer: their calls are small, and oneDNN made them slower
  (sampling at batch 1 -15%, scoring -10%).
- The training step gains nothing from it. An earlier try with oneDNN's fused-dot mode crashed
  while compiling the training step.
- The decode loop's skinny matmuls get slower with it.
- Other backends (TPU, GPU) never see these options.

Set ``DROMEDARY_JAX_ONEDNN=0`` to compile every program with XLA's defaults. It is read at each
call, so it also works after import.
"""
from __future__ import annotations

import os
import platform
from typing import Any, Callable

import jax

ONEDNN_DOT_OPTIONS: dict[str, Any] = {
    "xla_cpu_use_onednn": True,
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
ENV_SWITCH = "DROMEDARY_JAX_ONEDNN"
_X86 = ("x86_64", "amd64", "i686", "i386")


def onednn_enabled(backend: str | None = None) -> bool:
    """Whether oneDNN dots may be used right now: an x86 CPU backend, and
    ``DROMEDARY_JAX_ONEDNN`` not set to 0/false/no/off."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in _X86:
        return False
    return (backend or jax.default_backend()) == "cpu"


class ForwardJit:
    """Two ``jax.jit`` wrappers of one function, one with the oneDNN options and one without.

    A top-level call or ``.lower`` goes to the oneDNN one when :func:`onednn_enabled` and
    ``onednn_when(*args, **kwargs)`` are both true. A call inside another trace (jit,
    ``jax.eval_shape``, grad) always goes to the plain one, because compiler options only apply to a
    top-level jit. Each wrapper keeps its own compile cache."""

    def __init__(self, fun: Callable, onednn_when: Callable[..., bool], **jit_kwargs):
        self.__wrapped__ = fun
        self.__doc__ = fun.__doc__
        self.__name__ = getattr(fun, "__name__", "forward_jit")
        self._onednn_when = onednn_when
        self._plain = jax.jit(fun, **jit_kwargs)
        self._onednn = jax.jit(fun, compiler_options=ONEDNN_DOT_OPTIONS, **jit_kwargs)

    def _pick(self, args, kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return self._plain
        if onednn_enabled() and self._onednn_when(*args, **kwargs):
            return self._onednn
        return self._plain

    def __call__(self, *args, **kwargs):
        return self._pick(args, kwargs)(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """``jax.jit(...).lower(*args, **kwargs)`` of the wrapper a call with these arguments
        would use (oneDNN or plain, as for ``__call__``)."""
        return self._pick(args, kwargs).lower(*args, **kwargs)


def forward_jit(*, onednn_when: Callable[..., bool], **jit_kwargs):
    """Decorator, like ``functools.partial(jax.jit, **jit_kwargs)``, for forward-only programs
    that should use oneDNN dots on x86 CPUs when ``onednn_when(*args, **kwargs)`` holds. See
    the module docstring."""
    return lambda fun: ForwardJit(fun, onednn_when, **jit_kwargs)
