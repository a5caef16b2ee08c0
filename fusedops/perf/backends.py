"""The backends compared: each is a context manager that yields a Runner for a model and undoes what it
changed on exit (Dynamo caches, Liger's patches of the HF modeling module)."""
from __future__ import annotations

import contextlib
import copy
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from . import models


@dataclass
class Runner:
    """What a backend hands the suite: the callable to measure, the eager module that owns its weights
    (fills caches before decode timing), and for compiled backends a way to compile afresh."""
    fn: Callable
    eager: torch.nn.Module
    recompile: Callable[[], Callable] | None = None


@contextlib.contextmanager
def _eager(model):
    yield Runner(model, model)


def _compiled(backend: str | Callable, **kwargs):
    @contextlib.contextmanager
    def make(model):
        compile_ = lambda: torch.compile(model, backend=backend, dynamic=False, **kwargs)  # noqa: E731
        try:
            yield Runner(compile_(), model, compile_)
        finally:
            torch._dynamo.reset()
    return make


def _fusedops(**kwargs):
    @contextlib.contextmanager
    def make(model):
        from fusedops.backend import fusedops_backend   # ImportError -> error row until it exists
        with _compiled(fusedops_backend, **kwargs)(model) as runner:
            yield runner
    return make


@contextlib.contextmanager
def _liger(model):
    import liger_kernel.transformers as liger          # ImportError -> "not installed" row
    name = models.LIGER_APPLY.get(model.config.model_type)
    if name is None:
        raise ValueError(f"model_type: Liger-Kernel has no patch for {model.config.model_type!r}")
    # Liger patches the HF modeling module's globals (apply_rotary_pos_emb, ...), which every other
    # backend's model also uses: patch a copy of the model and put the module back afterwards.
    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    patched = copy.deepcopy(model)
    try:
        getattr(liger, name)(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                             fused_linear_cross_entropy=False, model=patched)
        yield Runner(patched, patched)
    finally:
        for key in [k for k in vars(module) if k not in saved]:
            delattr(module, key)
        for key, value in saved.items():
            if vars(module).get(key) is not value:
                setattr(module, key, value)
        del patched


@dataclass
class BackendSpec:
    name: str
    make: Callable
    compiled: bool
    needs_cuda: bool = False


BACKENDS = {
    "eager": BackendSpec("eager", _eager, False),
    "inductor": BackendSpec("inductor", _compiled("inductor"), True),
    "inductor-ro": BackendSpec("inductor-ro", _compiled("inductor", mode="reduce-overhead"), True, True),
    "liger": BackendSpec("liger", _liger, False, True),
    # fusedops' default mode captures CUDA graphs and clones outputs; reduce-overhead keeps them static
    "fusedops": BackendSpec("fusedops", _fusedops(), True),
    "fusedops-ro": BackendSpec("fusedops-ro", _fusedops(mode="reduce-overhead"), True),
    "fusedops-inductor": BackendSpec("fusedops-inductor", _fusedops(options=dict(
        fallback="inductor", clone_outputs=False)), True, True),
}
# the defaults leave out fusedops-inductor (ask for it by name): it pays Inductor's compile time once more
# per shape, and the full 32-layer comparison must fit in 8 minutes
DEFAULT_BACKENDS = {"full": [n for n in BACKENDS if n != "fusedops-inductor"],
                    "quick": [n for n in BACKENDS if n != "fusedops-inductor"],
                    "cpu": ["eager", "fusedops"],
                    "parity": ["eager", "inductor", "fusedops-ro"]}
