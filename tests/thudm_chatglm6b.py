"""THUDM's ChatGLM-6B code as the oracle of tests/test_chatglm6b.py. ModelScope ships THUDM's
tokenization_chatglm.py and modeling_chatglm.py for chatglm-6b (modelscope/models/nlp/chatglm/tokenization.py
and text_generation.py, with ModelScope's registration added; the `modelscope` package of the test extra). They
are loaded from the installed files without importing modelscope itself, whose package init needs far more than
these two files do: the few names they import from modelscope are stand-ins while they load."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import sys
import types
from pathlib import Path

import torch


def source_dir() -> Path | None:
    spec = importlib.util.find_spec("modelscope")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "nlp" / "chatglm"
    return path if (path / "tokenization.py").is_file() else None


class _Model:
    def __init__(self, *args, **kwargs):
        pass


class _TorchModel(_Model, torch.nn.Module):
    """ModelScope's base: THUDM's class calls `super(Model, self).__init__(config)`, which then reaches
    transformers' PreTrainedModel."""

    def __init__(self, *args, **kwargs):
        pass


class _Registry:
    def register_module(self, *args, **kwargs):
        return lambda cls: cls


def _stand_ins() -> dict[str, types.ModuleType]:
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    logger = module("modelscope.utils.logger", get_logger=lambda *a, **k: logging.getLogger("thudm_chatglm6b"))
    return {
        "modelscope": module("modelscope"),
        "modelscope.utils": module("modelscope.utils", logger=logger),
        "modelscope.utils.logger": logger,
        "modelscope.utils.constant": module("modelscope.utils.constant",
                                            Tasks=types.SimpleNamespace(chat="chat")),
        "modelscope.metainfo": module("modelscope.metainfo", Models=types.SimpleNamespace(chatglm_6b="chatglm-6b")),
        "modelscope.models": module("modelscope.models", MODELS=_Registry(), Model=_Model, TorchModel=_TorchModel),
        "modelscope.outputs": module("modelscope.outputs", OutputKeys=types.SimpleNamespace(TEXT="text",
                                                                                             HISTORY="history")),
    }


@contextlib.contextmanager
def _stubbed():
    stand_ins = _stand_ins()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


@functools.lru_cache(maxsize=None)
def load(name: str) -> types.ModuleType:
    """THUDM's module `name`: "configuration", "tokenization" or "text_generation" (the modeling code)."""
    root = source_dir()
    if root is None:
        raise ModuleNotFoundError("modelscope (the test extra) is not installed")
    package = types.ModuleType("thudm_chatglm6b_src")
    package.__path__ = [str(root)]
    sys.modules.setdefault("thudm_chatglm6b_src", package)
    with _stubbed():
        spec = importlib.util.spec_from_file_location(f"thudm_chatglm6b_src.{name}", root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod
