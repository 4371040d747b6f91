"""Built-in chat formats, only for checkpoints that ship no template (docs/tokenizer.md, "Built-in formats").

ChatGLM3 (SentencePiece) is built in code (`SentencePieceTokenizer`, its exact special-id rule). A GLM-4-9B
tiktoken `tokenizer.model` found alone gets `GLM4_TEMPLATE`: glm-4-9b-chat's layout (`[gMASK]<sop>`, then per
message `<|role|>metadata\\n content`, tools listed in a leading system message, calls as `metadata` messages,
results as `observation`) written as a jinja template in the GLM-4 message dialect of `formats.openai_to_glm4`.
"""

GLM4_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- if tools %}<|system|>{{ '\\n' }}# 可用工具"
    "{%- for tool in tools %}{%- set f = tool.function if tool.function is defined else tool %}"
    "{{- '\\n\\n## ' + f.name + '\\n\\n' + (f | tojson(indent=4))"
    " + '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' }}"
    "{%- endfor %}{%- endif %}"
    "{%- for m in messages %}"
    "{{- '<|' + m.role + '|>' + (m.metadata if m.metadata is defined else '') + '\\n' + m.content }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)
