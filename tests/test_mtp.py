"""Multi-token prediction (docs/mtp.md): the MTP layer's forward pass against the published definition written
in torch around transformers' own decoder layer (transformers does not run MTP layers; the definition is vLLM's
glm4_moe_mtp.py / DeepSeek-V3's: eh_proj([enorm(embed(x[t+1])) ; hnorm(h[t])]) -> decoder block ->
shared_head.norm -> lm_head, h = the main model's output after its final norm), for glm4_moe, glm4_moe_lite (MLA)
and glm_moe_dsa (DSA) checkpoints."""

import jax
import numpy as np
import pytest
import torch

from glm_jax import GLMForCausalLM, load_hf
from glm_jax.model import MTPHead
from hf_models import mtp_checkpoint, rel_err


def torch_mtp_logits(main, block, extra, ids):
    """The MTP layer's logits at positions 0 .. S-2 (each predicts token t + 2), written from the definition."""
    eps = main.config.rms_norm_eps

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    with torch.no_grad():
        ids = torch.tensor(ids)
        hidden = main.model(ids).last_hidden_state[:, :-1]  # after the final norm
        ahead = main.model.embed_tokens(ids[:, 1:])
        x = torch.cat([rms(ahead, extra["enorm.weight"]), rms(hidden, extra["hnorm.weight"])], -1)
        x = x @ extra["eh_proj.weight"].T
        s = x.shape[1]
        pos = torch.arange(s)[None]
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = block(x, attention_mask=mask, position_ids=pos, position_embeddings=main.model.rotary_emb(x, pos))
        out = out[0] if isinstance(out, tuple) else out
        return main.lm_head(rms(out, extra["shared_head.norm.weight"])).numpy()


# DSA: every key selected (index_topk >= the sequence), since the indexer's ReLU scores tie at 0 and torch and XLA
# break top-k ties differently; the sparse selection itself is proven in test_dsa.py, the MTP block is the same.
@pytest.mark.parametrize("family,kw", [("glm4_moe", {}), ("glm4_moe_lite", {}), ("glm_moe_dsa", {"index_topk": 16})])
def test_mtp_logits_match_the_definition(tmp_path, family, kw):
    main, block, extra = mtp_checkpoint(family, tmp_path, seed=4, **kw)
    cfg, params = load_hf(tmp_path)
    assert cfg.num_mtp_layers == 1
    ids = np.random.RandomState(2).randint(3, cfg.vocab_size, size=(2, 12))
    expected = torch_mtp_logits(main, block, extra, ids)
    hidden = GLMForCausalLM(cfg).apply({"params": params}, ids, return_hidden=True)
    logits, _, _ = jax.jit(MTPHead(cfg).apply)({"params": params}, hidden, ids)
    assert logits.shape == (1, 2, 12, cfg.vocab_size)
    assert rel_err(np.asarray(logits[0, :, :-1]), expected) < 1e-4
