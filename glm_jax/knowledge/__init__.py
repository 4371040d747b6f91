"""Knowledge bases for GLM models: passages from files, BM25 retrieval with Chinese word segmentation, saved
indexes, text embeddings from a GLM model, retrieved passages fused into chat prompts (docs/knowledge.md)."""

from glm_jax.knowledge.documents import Passage, read_passages
from glm_jax.knowledge.embeddings import Embedder, embed
from glm_jax.knowledge.evaluate import read_questions, recall
from glm_jax.knowledge.grounding import grounded_messages, sources
from glm_jax.knowledge.lexical import chars, words

__all__ = ["Embedder", "Hit", "KnowledgeIndex", "Passage", "chars", "embed", "grounded_messages", "read_passages",
           "read_questions", "recall", "sources", "words"]


def __getattr__(name: str):
    # The index is imported on first use: bm25s starts JAX's backends when imported, which must wait until a
    # command line has chosen the platform (glm_jax.platforms.skip_absent_tpu), e.g. in `python -m glm_jax.chat`.
    if name in ("Hit", "KnowledgeIndex"):
        from glm_jax.knowledge import index
        return getattr(index, name)
    raise AttributeError(f"module 'glm_jax.knowledge' has no attribute {name!r}")
