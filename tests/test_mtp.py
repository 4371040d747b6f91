"""Multi-token prediction (docs/mtp.md): the MTP layer's forward pass against the published definition written
in torch around transformers' own decoder layer (transformers does not run MTP layers; the definition is vLLM's
glm4_moe_mtp.py / DeepSeek-V3's: eh_proj([enorm(embed(x[t+1])) ; hnorm(h[t])]) -> decoder block ->
shared_head.norm -> lm_head, h = the main model's output after its final norm), for glm4_moe, glm4_moe_lite (MLA)
and glm_moe_dsa (DSA) checkpoints."""

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from glm_jax import GLMForCausalLM, load_hf
from glm_jax.model import MTPHead
from hf_models import ORACLES, rel_err, tiny_oracle

MTP_EXTRA = ("enorm", "hnorm", "eh_proj", "shared_head")


def mtp_checkpoint(family, d, seed=0, layers=3, **kw):
    """A transformers checkpoint of `layers - 1` layers plus one MTP layer at model.layers.{layers - 1}, whose
    decoder block is transformers' own layer of a `layers`-layer model: (main oracle, MTP block oracle, the MTP
    layer's other tensors by name)."""
    big = tiny_oracle(family, seed=seed, confident=True, num_hidden_layers=layers, **kw)
    big.save_pretrained(d)
    n = layers - 1
    def fewer_layers(config):  # per-layer lists (layer_types, mlp_layer_types, indexer_types) lose the last layer
        return {**{k: (v[:n] if isinstance(v, list) and len(v) == layers else v) for k, v in config.items()},
                "num_hidden_layers": n}

    config = fewer_layers(json.loads((d / "config.json").read_text()))
    (d / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    sd = np_load_file(str(d / "model.safetensors"))
    h = big.config.hidden_size
    rng = np.random.RandomState(seed + 1)
    extra = {f"model.layers.{n}.{k}": (rng.randn(*s) * 0.2 + ("norm" in k)).astype(np.float32) for k, s in
             (("enorm.weight", (h,)), ("hnorm.weight", (h,)), ("eh_proj.weight", (h, 2 * h)),
              ("shared_head.norm.weight", (h,)))}
    extra[f"model.layers.{n}.eh_proj.weight"] *= 2.0 / np.sqrt(2 * h)
    copies = {f"model.layers.{n}.embed_tokens.weight": sd["model.embed_tokens.weight"],
              f"model.layers.{n}.shared_head.head.weight": sd["lm_head.weight"]}
    np_save_file({**sd, **extra, **copies}, str(d / "model.safetensors"), metadata={"format": "pt"})
    config_cls, model_cls = ORACLES[family]
    main = model_cls(config_cls(**fewer_layers(big.config.to_diff_dict()))).eval()
    main.load_state_dict({k: v for k, v in big.state_dict().items() if not k.startswith(f"model.layers.{n}.")})
    main.config._attn_implementation = big.config._attn_implementation
    return main, big.model.layers[n], {k.split(f"layers.{n}.")[1]: torch.tensor(v) for k, v in extra.items()}


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
    logits, _ = jax.jit(MTPHead(cfg).apply)({"params": params}, hidden, ids)
    assert logits.shape == (1, 2, 12, cfg.vocab_size)
    assert rel_err(np.asarray(logits[0, :, :-1]), expected) < 1e-4
