"""Structured pruning (glm_jax/compress): a pruned tiny model of each family is a real smaller checkpoint that
transformers loads with glm_jax's logits; the units kept are the ones the scores rank highest; bad destinations
and arguments are one line and exit 2, and nothing already on disk is touched."""

import json

import jax
import numpy as np
import pytest
import transformers

from glm_jax import GLMForCausalLM, load_hf
from glm_jax.compress import apply_plan, choose_units, collect_importance
from glm_jax.compress.__main__ import main
from hf_models import randomize, rel_err, thudm_to_transformers_state_dict, tiny_hf_config, tiny_oracle, torch_logits
from test_convert import read_dir_state_dict
from test_train_run import ROOT

CORPUS = ROOT / "data" / "corpus" / "bible_asv_en.txt"
VOCAB = 8192  # the shipped tokenizer's (the tiny checkpoints carry no tokenizer files)
SMALL = ["--seq-len", "32", "--samples", "8", "--eval-samples", "4", "--batch-size", "4"]

CASES = {  # family: (oracle, pruning flags, what the pruned config.json says)
    "glm4": (lambda: randomize(transformers.Glm4ForCausalLM(tiny_hf_config(glm4=True, vocab=VOCAB, layers=3, heads=4,
                                                                            groups=2)), seed=1),
             ["--mlp-keep", "0.5", "--heads-keep", "0.5", "--layers-drop", "1", "--width-keep", "0.75"],
             {"num_hidden_layers": 2, "num_key_value_heads": 1, "num_attention_heads": 2, "intermediate_size": 48,
              "hidden_size": 48, "head_dim": 16}),
    "glm4_moe": (lambda: tiny_oracle("glm4_moe", seed=2, vocab_size=VOCAB, n_group=1, topk_group=1),
                 ["--experts-keep", "5", "--mlp-keep", "0.5", "--heads-keep", "0.5", "--width-keep", "0.5"],
                 {"n_routed_experts": 5, "num_key_value_heads": 1, "intermediate_size": 48, "num_hidden_layers": 3,
                  "hidden_size": 32}),
    "glm4_moe_lite": (lambda: tiny_oracle("glm4_moe_lite", seed=3, vocab_size=VOCAB, n_group=1, topk_group=1),
                      ["--experts-keep", "4", "--layers-drop", "1", "--expert-score", "frequency", "--heads-keep",
                       "0.5", "--width-keep", "0.75"],
                      {"n_routed_experts": 4, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 36}),
}


@pytest.mark.parametrize("family", list(CASES))
def test_pruned_checkpoint_loads_in_transformers_with_our_logits(family, tmp_path, capsys):
    make, flags, expected = CASES[family]
    make().save_pretrained(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["prune", "--checkpoint", str(tmp_path / "in"), "--calibration", str(CORPUS), "--out", str(out),
                 *SMALL, *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in expected} == expected
    report = json.loads((out / "prune_report.json").read_text())
    assert report["params_after"] < report["params_before"] and np.isfinite(report["eval_loss_after"])
    assert json.loads(capsys.readouterr().out.splitlines()[0])["params_after"] == report["params_after"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    bias = sum(b.numel() for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias"))  # a buffer there
    assert sum(p.numel() for p in theirs.parameters()) + bias == report["params_after"]
    cfg, params = load_hf(out)
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 12))
    ours = np.asarray(jax.jit(lambda p, x: GLMForCausalLM(cfg).apply({"params": p}, x))(params, ids))
    assert rel_err(ours, torch_logits(theirs, ids)) < 1e-4


def test_the_highest_scores_are_kept():
    """choose_units keeps each layer's top channels / groups / experts by its own scores, drops the blocks that
    change their input least (never the first), and `random` keeps as many units."""
    from glm_jax import GLMConfig

    cfg = GLMConfig.from_preset("glm-moe-test")  # 1 dense + 2 MoE blocks, 4 heads in 2 groups, 8 experts
    rng = np.random.default_rng(0)
    scores = [{"mlp_channels": rng.random(160), "head_norms": np.array([1.0, 1.0, 5.0, 5.0]),
               "block_influence": np.array([influence * 10, 10.0])} for influence in (0.01, 0.5, 0.2)]
    for s in scores[1:]:
        s["expert_reap"] = np.stack([np.arange(8.0), np.full(8, 2.0)])
    for s, width in zip(scores, ([0, 9, 1, 9], [0, 0, 5, 0], [100, 0, 0, 0])):  # the dropped block's: not counted
        s["embed_channels"] = np.repeat(np.array(width, float), 16)
    plan = choose_units(cfg, scores, mlp_keep=0.25, heads_keep=1, layers_drop=1, experts_keep=3, width_keep=0.5)
    assert plan.layers == [0, 1]  # block 2 has the lowest influence; block 0 is never dropped
    np.testing.assert_array_equal(plan.mlp[0], np.sort(np.argsort(-scores[0]["mlp_channels"])[:40]))
    assert plan.kv_groups[1].tolist() == [1] and plan.experts[1].tolist() == [5, 6, 7]
    assert plan.width.tolist() == [*range(16, 32), *range(48, 64)]  # sums 0, 9, 6, 9 over the kept blocks
    rand = choose_units(cfg, scores, mlp_keep=0.25, layers_drop=1, method="random", seed=1)
    assert len(rand.layers) == 2 and all(len(v) == 40 for v in rand.mlp.values())


def test_importance_is_sown_per_block_only_when_asked():
    """collect_importance returns per-block sums for every unit kind; an apply that does not ask for the
    importance collection (training asks for "intermediates") computes none of it."""
    from glm_jax import GLMConfig, init_params

    cfg = GLMConfig.from_preset("glm-moe-test")
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 16)).astype(np.int32)
    scores = collect_importance(model, params, [(tokens, np.ones_like(tokens))] * 2)
    assert len(scores) == 3 and scores[0]["mlp_channels"].shape == (cfg.ffn_hidden_size,)
    assert scores[1]["expert_reap"].shape == (2, 8) and scores[1]["expert_reap"][1].sum() == 2 * 32 * 2
    assert all(s["head_norms"].shape == (4,) and s["block_influence"][1] == 64 for s in scores)
    assert all(s["embed_channels"].shape == (cfg.hidden_size,) and (s["embed_channels"] > 0).all() for s in scores)
    _, variables = model.apply({"params": params}, tokens, mutable=["intermediates"])  # what training asks for
    assert "importance" not in variables and "mlp_channels" not in str(jax.tree_util.tree_structure(variables))
    new_cfg, new_params = apply_plan(cfg, params, choose_units(cfg, scores, experts_keep=4, layers_drop=[2]))
    assert new_cfg.num_layers == 2 and new_params["model"]["moe_layers"]["mlp"]["experts"]["wi"].shape[:2] == (1, 4)


def test_bad_destination_and_flags_are_one_line_and_touch_nothing(tmp_path, capsys):
    cfg_dir = tmp_path / "in"
    randomize(transformers.Glm4ForCausalLM(tiny_hf_config(glm4=True, vocab=VOCAB)), seed=1).save_pretrained(cfg_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    base = ["prune", "--checkpoint", str(cfg_dir), "--calibration", str(CORPUS), *SMALL]
    assert main([*base, "--out", str(busy), "--mlp-keep", "0.5"]) == 2
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    assert main([*base, "--out", str(cfg_dir / "sub")]) == 2  # inside the checkpoint
    assert main([*base, "--out", str(tmp_path / "o"), "--mlp-keep", "1.5"]) == 2
    assert main([*base, "--out", str(tmp_path / "o"), "--layers-drop", "2"]) == 2  # all layers
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 4 and "Traceback" not in stderr, stderr
    assert "--out" in err[0] and "--out" in err[1] and "--mlp-keep" in err[2] and "--layers-drop" in err[3]
    assert not (tmp_path / "o").exists()


def test_a_thudm_checkpoint_is_pruned_into_the_thudm_layout(tmp_path):
    """ChatGLM3's layout in, the same layout out (fused query_key_value, chatglm config.json), holding exactly the
    pruned model: its logits equal those of the plan applied in memory, and those of transformers' GlmForCausalLM
    given its tensors renamed by docs/checkpoints.md (test-side code)."""
    from glm_jax import GLMConfig, init_params, save_hf
    from glm_jax.compress.__main__ import calibration_rows
    from glm_jax.tokenizers import SentencePieceTokenizer

    cfg = GLMConfig.from_preset("glm-test", vocab_size=VOCAB)  # ChatGLM3-shaped: 4 heads in 2 groups, qkv bias
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(4))
    save_hf(cfg, params, tmp_path / "in", format="thudm")
    flags = ["--mlp-keep", "0.75", "--heads-keep", "0.5", "--width-keep", "0.75"]
    assert main(["prune", "--checkpoint", str(tmp_path / "in"), "--calibration", str(CORPUS),
                 "--out", str(tmp_path / "out"), *SMALL, *flags]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["multi_query_group_num"] == 1
    assert config["ffn_hidden_size"] == 120 and config["num_attention_heads"] == 2 and config["hidden_size"] == 48
    cfg2, params2 = load_hf(tmp_path / "out")
    rows = calibration_rows([CORPUS], SentencePieceTokenizer(), 32, 12)[4:]
    scores = collect_importance(model, params, [(rows[:4, 0], rows[:4, 1]), (rows[4:, 0], rows[4:, 1])])
    new_cfg, new_params = apply_plan(cfg, params, choose_units(cfg, scores, mlp_keep=0.75, heads_keep=0.5,
                                                               width_keep=0.75))
    ids = np.random.RandomState(1).randint(3, VOCAB, (2, 10))
    run = lambda c, p: np.asarray(GLMForCausalLM(c).apply({"params": p}, ids))  # noqa: E731
    np.testing.assert_allclose(run(cfg2, params2), run(new_cfg, new_params), atol=1e-5)
    theirs = transformers.GlmForCausalLM(transformers.GlmConfig(
        vocab_size=config["padded_vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"], num_hidden_layers=config["num_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["multi_query_group_num"],
        head_dim=config["kv_channels"], rms_norm_eps=config["layernorm_epsilon"], attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * config.get("rope_ratio", 1.0),
                         "partial_rotary_factor": 0.5}, pad_token_id=0, tie_word_embeddings=False)).eval()
    theirs.load_state_dict(thudm_to_transformers_state_dict(read_dir_state_dict(tmp_path / "out"), config), strict=True)
    assert rel_err(run(cfg2, params2), torch_logits(theirs, ids)) < 1e-4


@pytest.mark.slow
def test_importance_pruning_and_distillation_on_a_trained_model(tmp_path, capsys):
    """glm-test trained by train.py (110 steps) on 80% of a corpus; half its MLP channels and KV groups pruned,
    importance measured on the other 20%:
    - the held-out loss rises by less than half as much as under random pruning of the same units (their mean;
      and less than each draw); masking half of every block linear's weights by Wanda's score raises it by less
      than half as much as by magnitude;
    - recovery on a small text (16 kB, 24 steps, about five epochs of it): distillation from the unpruned model
      (alpha 1) ends with a lower held-out loss than training on the data alone, which overfits.
    Measured 2026-12-04 (docs/compression.md): importance +0.023 against random +0.183, +0.099, +0.133; Wanda
    +0.008 against magnitude +0.023; recovered 4.858 (distilled) against 4.935 (data)."""
    from test_train_run import train

    lines = CORPUS.read_text().splitlines()
    cut = len(lines) * 4 // 5
    (tmp_path / "train.txt").write_text("\n".join(lines[:cut]))
    (tmp_path / "held.txt").write_text("\n".join(lines[cut:]))
    (tmp_path / "small.txt").write_text("\n".join(lines[:cut])[:16000])
    train(tmp_path / "run", f"data.train_files=[{tmp_path / 'train.txt'}]", "data.seq_len=64", "data.max_tokens=null",
          "train.lr=4e-3", "train.warmup_steps=5", "train.steps=110", "train.eval_every=0", "data.eval_fraction=0",
          "checkpoint.every=1000", f"export.path={tmp_path / 'export'}", "export.format=transformers")
    rises = {}
    runs = [(("importance", 0), ["--mlp-keep", "0.5", "--heads-keep", "0.5", "--method", "importance"])]
    runs += [(("random", s), ["--mlp-keep", "0.5", "--heads-keep", "0.5", "--method", "random", "--seed", str(s)])
             for s in range(3)]
    runs += [((m, 0), ["--sparsity", "0.5", "--sparsity-method", m]) for m in ("wanda", "magnitude")]
    for (method, seed), flags in runs:
        out = tmp_path / f"{method}{seed}"
        assert main(["prune", "--checkpoint", str(tmp_path / "export"), "--calibration", str(tmp_path / "held.txt"),
                     "--out", str(out), "--seq-len", "64", "--samples", "32", "--eval-samples", "16", *flags]) == 0
        report = json.loads((out / "prune_report.json").read_text())
        rises[method, seed] = report["eval_loss_after"] - report["eval_loss_before"]
    random = [v for (m, _), v in rises.items() if m == "random"]
    assert 0 < rises["importance", 0] < min(min(random), 0.5 * np.mean(random)), rises
    # half of every block linear's weights masked: Wanda's |W| x ||X|| against magnitude alone
    assert 0 < rises["wanda", 0] < 0.5 * rises["magnitude", 0], rises

    recovered = {}
    for name, extra in (("data", ()), ("distilled", (f"distill.teacher={tmp_path / 'export'}", "distill.alpha=1.0",
                                                     "distill.teacher_dtype=float32"))):
        train(tmp_path / name, f"model.init_from={tmp_path / 'importance0'}",
              f"data.train_files=[{tmp_path / 'small.txt'}]", f"data.eval_files=[{tmp_path / 'held.txt'}]",
              "data.seq_len=64", "train.lr=1e-3", "train.steps=24", "train.eval_every=24", "train.eval_batches=4",
              "checkpoint.every=1000", *extra)
        final = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1])
        recovered[name] = final["eval_loss"]
    assert recovered["distilled"] < recovered["data"] - 0.03, recovered


def test_sparsity_masks_keep_each_outputs_best_weights_by_wanda_or_magnitude():
    """2:4 keeps exactly the 2 best of every 4 consecutive inputs of each output; 0.5 the best half of each
    output's inputs; Wanda's score |W| x ||X|| and magnitude's |W| disagree where input norms differ."""
    from glm_jax.compress.prune import sparsity_masks

    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(8, 3))  # [in, out]
    norms = np.array([1, 1, 1, 1, 100, 100, 0.01, 0.01], np.float64) ** 2
    for sparsity in ("2:4", "0.5"):
        for input_sq in (norms, None):
            keep = sparsity_masks(kernel, input_sq, sparsity, n_in=1)
            score = np.abs(kernel) * (1 if input_sq is None else np.sqrt(input_sq)[:, None])
            groups = [slice(0, 4), slice(4, 8)] if sparsity == "2:4" else [slice(0, 8)]
            for g in groups:
                for o in range(3):
                    kept = np.flatnonzero(keep[g, o])
                    n = 2 if sparsity == "2:4" else 4
                    assert len(kept) == n and set(kept) == set(np.argsort(-score[g, o])[:n]), (sparsity, g, o)
    wanda, magnitude = (sparsity_masks(kernel, q, "0.5", n_in=1) for q in (norms, None))
    assert wanda[4:6].all() and not wanda[6:].any() and (wanda != magnitude).any()


def test_a_2_4_sparse_checkpoint_loads_in_transformers_with_our_logits(tmp_path):
    """GLM-4.7-Flash's family: the MLA projections, the dense, shared and routed expert MLPs all masked 2:4 (the
    routed experts each by the statistics of its own tokens), read by transformers with our logits."""
    tiny_oracle("glm4_moe_lite", seed=3, vocab_size=VOCAB, n_group=1, topk_group=1).save_pretrained(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["prune", "--checkpoint", str(tmp_path / "in"), "--calibration", str(CORPUS), "--out", str(out),
                 *SMALL, "--sparsity", "2:4"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["sparsity"]["zeros"] * 2 == report["sparsity"]["weights"] > 0
    cfg, params = load_hf(out)

    def two_of_four(w, n_in):  # [L, in..., out...]: 2 of every 4 consecutive inputs of each output are zero
        w = np.asarray(w).reshape(w.shape[0], -1, 4, int(np.prod(w.shape[1 + n_in:])))
        return ((w == 0).sum(2) == 2).all()

    dense, moe = params["model"]["layers"], params["model"]["moe_layers"]
    assert two_of_four(dense["mlp"]["wo"]["kernel"], 1) and two_of_four(moe["attention"]["q_b"]["kernel"], 1)
    assert two_of_four(moe["attention"]["out"]["kernel"], 2) and two_of_four(moe["attention"]["kv_a"]["kernel"], 1)
    experts = np.asarray(moe["mlp"]["experts"]["wi"])  # [L, E, H, 2, I]
    assert two_of_four(experts.reshape(-1, *experts.shape[2:]), 1)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 12))
    ours = np.asarray(jax.jit(lambda p, x: GLMForCausalLM(cfg).apply({"params": p}, x))(params, ids))
    assert rel_err(ours, torch_logits(theirs, ids)) < 1e-4
