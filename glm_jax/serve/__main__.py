"""`python -m glm_jax.serve --checkpoint DIR` (console script `glm-serve`): the OpenAI-compatible server.

DIR is anything `glm_jax.chat` loads (THUDM or transformers checkpoint, train.py run directory); the tokenizer is
`--tokenizer`, else the checkpoint's own, else (with a warning) the small one shipped with glm_jax, as
for the chat CLI. `--knowledge INDEX_DIR` loads a knowledge index for grounded chat requests
(docs/knowledge.md). Exit status: 0 after SIGTERM / Ctrl-C (running requests are finished first), 2 for bad
arguments or files, reported as one `error: ...` line on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

import uvicorn

from glm_jax import GLMForCausalLM, make_mesh, quantize_params
from glm_jax.checkpoints import default_tokenizer, load_checkpoint, shipped_tokenizer_warning, tokenizer_or_shipped
from glm_jax import knowledge
from glm_jax.config import DTYPES
from glm_jax.model import decoding_layout
from glm_jax.model.layers.pooling import POOLINGS
from glm_jax.platforms import skip_absent_tpu
from glm_jax.serve.engine import Engine
from glm_jax.serve.server import build_app

log = logging.getLogger("glm_jax.serve")


def _arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glm_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="THUDM / transformers checkpoint or train.py run directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / tokenizer.model or a directory "
                                                       "(default: the checkpoint's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model name clients use (default: DIR's name)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ routes")
    p.add_argument("--max-num-seqs", type=int, default=16, help="decode slots (requests generating at once)")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + reply (default: the model's)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV cache size in tokens (default: every slot at --max-model-len)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens computed per request per step")
    p.add_argument("--max-waiting", type=int, default=1024, help="queued requests before answering 429")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--quantization-bit", type=int, choices=(8, 4), default=None, help="weight-only int8 / int4")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="compute and parameter dtype")
    p.add_argument("--mesh", default=None, metavar="tensor=N[,expert=M]",
                   help="shard the model over this many devices: tensor parallel (KV heads, MLP) and, for MoE, "
                        "expert parallel (default: one device)")
    p.add_argument("--speculative", choices=("mtp", "ngram"), default=None,
                   help="speculative decoding: drafts from the model's MTP layer or from the context (n-gram)")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="drafts per verify step (default: 1 for mtp, 3 for ngram)")
    p.add_argument("--scan-layers", action="store_true",
                   help="keep the blocks' weights stacked (one scanned block per step program): each program "
                        "compiles several times faster, and decodes slower (docs/serving.md)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every step program before serving: a longer start, and no request waits for a "
                        "compile (Engine.warm_up)")
    p.add_argument("--knowledge", default=None, metavar="INDEX_DIR",
                   help="a knowledge index (python -m glm_jax.knowledge index) that chat requests with "
                        "\"knowledge\" are grounded in")
    p.add_argument("--embedding-pooling", choices=POOLINGS, default="last",
                   help="how /v1/embeddings pools the model's hidden states (glm_jax.embed)")
    p.add_argument("--log-level", default="info")
    return p


def _check(args) -> None:
    for name in ("max_num_seqs", "page_size", "prefill_chunk", "max_waiting"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    for name in ("max_model_len", "kv_cache_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port: must be in 1..65535, got {args.port}")


def parse_mesh(text: str | None):
    """`--mesh tensor=N[,expert=M]` -> a `glm_jax.make_mesh` mesh (None without the option)."""
    if text is None:
        return None
    sizes = {}
    for part in text.replace(" ", "").split(","):
        axis, _, value = part.partition("=")
        if axis not in ("tensor", "expert") or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: expected tensor=N[,expert=M] with N, M >= 1, got {text!r}")
        sizes[axis] = int(value)
    try:
        return make_mesh(**sizes)
    except ValueError as e:
        raise ValueError(f"--mesh: {e}") from None


def _speculative_options(args) -> dict:
    if args.speculative is None:
        return {}
    if args.mesh is not None:
        raise ValueError("--speculative: runs on one device (not with --mesh)")
    return dict(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)


def build(args):
    """(app, engine) for parsed arguments; ValueError / OSError naming the option for bad ones."""
    _check(args)
    mesh = parse_mesh(args.mesh)
    index = None
    if args.knowledge is not None:
        try:
            index = knowledge.KnowledgeIndex.load(args.knowledge)  # bm25s (JAX's backends) loads here, not before
        except (OSError, ValueError) as e:
            raise ValueError(f"--knowledge: {e}") from None
    source = args.tokenizer if args.tokenizer is not None else default_tokenizer(args.checkpoint)
    tokenizer = tokenizer_or_shipped(source)  # the chat CLI's choice, shipped tokenizer included
    overrides = dict(dtype=args.dtype, param_dtype=args.dtype) if args.dtype else {}
    cfg, params = load_checkpoint(args.checkpoint, **overrides)
    if source is None:
        print(shipped_tokenizer_warning(args.checkpoint), file=sys.stderr, flush=True)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's "
                         f"({tokenizer.vocab_size})")
    if args.quantization_bit:
        cfg, params = quantize_params(cfg, params, args.quantization_bit)
    if not args.scan_layers:  # one weight buffer per block, split in place (docs/serving.md, "Weights")
        cfg, params = decoding_layout(cfg, params, free_stacked=True)
    engine = Engine(GLMForCausalLM(cfg), params, tokenizer, max_num_seqs=args.max_num_seqs,
                    max_model_len=args.max_model_len, page_size=args.page_size, kv_cache_tokens=args.kv_cache_tokens,
                    prefill_chunk=args.prefill_chunk, prefix_caching=args.prefix_caching,
                    max_waiting=args.max_waiting, mesh=mesh, **_speculative_options(args))
    if args.warmup:
        start = time.monotonic()
        count = engine.warm_up()
        log.info("warm-up: %d step programs in %.1f s", count, time.monotonic() - start)
    name = args.served_model_name or Path(args.checkpoint).resolve().name
    return build_app(engine, tokenizer, served_model_name=name, api_key=args.api_key, knowledge=index,
                     embedding_pooling=args.embedding_pooling), engine


class _Server(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown on SIGTERM / SIGINT ends in exit status 0 (uvicorn re-raises the
    signal after shutting down, which would end the process with -15)."""

    def capture_signals(self):
        server = super().capture_signals()
        self._captured_signals = _Forgetful()
        return server


class _Forgetful(list):
    """A list that keeps nothing: the signals uvicorn would re-raise after its shutdown."""

    def append(self, item):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _arg_parser().parse_args(argv)
    skip_absent_tpu()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app, _ = build(args)
    except (OSError, ValueError, KeyError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
        return 2
    _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)).run()
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
