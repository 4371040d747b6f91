"""Knowledge bases for GLM models: passages from files, BM25 retrieval with Chinese word segmentation, saved
indexes, text embeddings from a GLM model (docs/knowledge.md)."""

from glm_jax.knowledge.documents import Passage, read_passages
from glm_jax.knowledge.embeddings import Embedder, embed
from glm_jax.knowledge.evaluate import read_questions, recall
from glm_jax.knowledge.index import Hit, KnowledgeIndex
from glm_jax.knowledge.lexical import chars, words

__all__ = ["Embedder", "Hit", "KnowledgeIndex", "Passage", "chars", "embed", "read_passages", "read_questions", "recall",
           "words"]
