"""glm_jax: GLM / ChatGLM models in JAX + Flax, with THUDM and transformers checkpoints in and out."""

from glm_jax.config import PRESETS, GLMConfig
from glm_jax.convert import load_hf, save_hf
from glm_jax.model import (GLMForCausalLM, GLMForSequenceClassification, GLMModel, init_cache, init_params,
                           param_specs)
from glm_jax.sharding import LOGICAL_RULES, make_mesh, param_shardings
from glm_jax.tokenizers import ChatGLMTokenizer, Tokenizer, load_tokenizer
from glm_jax.generation import generate, stream_generate
from glm_jax.convert.quant import quantize_params
from glm_jax.serve import Engine, SamplingParams
from glm_jax.compress import apply_plan, choose_units, collect_importance

__all__ = ["PRESETS", "GLMConfig", "load_hf", "save_hf", "GLMForCausalLM", "GLMForSequenceClassification",
           "GLMModel", "init_cache", "init_params", "param_specs", "LOGICAL_RULES", "make_mesh", "param_shardings",
           "ChatGLMTokenizer", "Tokenizer", "load_tokenizer", "generate", "stream_generate", "ChatSession", "quantize_params",
           "Engine", "SamplingParams", "collect_importance", "choose_units", "apply_plan", "KnowledgeIndex",
           "read_passages", "embed"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # ChatSession is imported on first use: were glm_jax.chat imported with the package, `python -m glm_jax.chat`
    # would find its own module already loaded (runpy's RuntimeWarning on every chat start)
    if name == "ChatSession":
        from glm_jax.chat import ChatSession

        return ChatSession
    # the knowledge base too: bm25s starts a JAX backend when imported, which must not happen on `import glm_jax`
    # (jax.distributed.initialize has to come first on many hosts)
    if name in ("KnowledgeIndex", "read_passages", "embed"):
        from glm_jax import knowledge

        return getattr(knowledge, name)
    raise AttributeError(f"module 'glm_jax' has no attribute {name!r}")

