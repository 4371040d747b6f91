"""The ChatGLM3 tokenizer's historical import path; the code lives in `glm_jax.tokenizers.sentencepiece`.

New code should use `glm_jax.load_tokenizer` (any GLM generation, see docs/tokenizer.md).
"""

from glm_jax.tokenizers.sentencepiece import (DEFAULT_MODEL_FILE, ROLES, SPECIAL_TOKENS, TOOL_CALL_PREFIX,  # noqa: F401
                                              TOOL_CALL_SUFFIX, ChatGLMTokenizer, format_tool_call, parse_tool_call)

__all__ = ["DEFAULT_MODEL_FILE", "ROLES", "SPECIAL_TOKENS", "TOOL_CALL_PREFIX", "TOOL_CALL_SUFFIX",
           "ChatGLMTokenizer", "format_tool_call", "parse_tool_call"]
