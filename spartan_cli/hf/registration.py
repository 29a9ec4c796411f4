"""Make ``import spartan_cli`` enough for ``AutoModelForCausalLM.from_pretrained`` to load a gated model.

A model directory written by ``spartan export --format hf`` says ``"attn_implementation": "spartan"`` in its
config.json; transformers checks that name against its attention registry while building the model, so
the gated attention must be registered by then. Registering needs transformers (and torch), but
``import spartan_cli`` must stay cheap (``spartan --help`` imports neither), so ``install()``:
1. registers at once when ``transformers.modeling_utils`` (home of the attention registry) is already
   imported: torch and transformers are loaded anyway, nothing extra is paid;
2. otherwise puts a one-shot finder at the front of ``sys.meta_path``. When Python next imports
   ``transformers.modeling_utils`` the finder removes itself, asks the other finders for the module's
   real spec and wraps its loader so that, right after the module has executed, the gated attention is
   registered. Every model class imports ``modeling_utils`` before a model can be built, so registration
   always precedes ``from_pretrained``'s check. Nothing else about the import changes.
``install()`` is idempotent; registration itself is ``attention.register`` (also idempotent).
"""

from __future__ import annotations

import importlib.abc
import logging
import sys

log = logging.getLogger(__name__)

TARGET = "transformers.modeling_utils"


def _register() -> None:
    from spartan_cli.gating.attention import register

    register()


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps the real loader of ``transformers.modeling_utils``: executes it, then registers."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _register()
        except ImportError as exc:  # a transformers without the attention-function interface: say so, keep importing
            log.warning("spartan gated attention not registered with transformers (%s); "
                        "call spartan_cli.gating.attention.register() after fixing it", exc)

    def __getattr__(self, name):  # get_source, is_package, get_filename... of the real loader
        return getattr(self._loader, name)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """One-shot finder for ``transformers.modeling_utils`` (see the module docstring, step 2)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        _uninstall()  # one shot; also keeps the search below from finding this finder again
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterOnImport)]


def install() -> None:
    """Register the gated attention now if transformers' registry is loaded, else when it first loads."""
    if TARGET in sys.modules:
        _register()
        return
    if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
