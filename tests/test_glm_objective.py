"""GLM's objective in train.py (data.objective: blank_infilling; glm_jax/train/blank_infilling.py Corruptor,
pipeline.build_blank_infilling): texts cut to fit, the mix, copies, the configuration errors, and runs of a small
ChatGLM-6B-architecture model: the loss falls, resume is exact, the mesh, LoRA and P-tuning train it, and the
export loads in THUDM's code with our logits."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from glm_jax import load_tokenizer
from glm_jax.tokenizers import CHATGLM6B_VOCABULARY
from glm_jax.train.blank_infilling import Corruptor, SpecialIds, longest_piece, pieces, sentence_end_ids
from test_train_run import ROOT, env_for, losses

CONFIG = ROOT / "configs" / "glm-objective-tiny.yaml"
SMALL = ["model.overrides.hidden_size=64", "model.overrides.num_layers=2", "model.overrides.num_heads=4",
         "model.overrides.num_kv_heads=4", "model.overrides.head_dim=16", "model.overrides.ffn_hidden_size=160",
         "data.seq_len=64", "data.max_tokens=20000", "data.eval_fraction=0.05", "train.global_batch_size=8",
         "train.lr=1e-2", "train.warmup_steps=2", "train.eval_every=6", "train.eval_batches=2", "checkpoint.every=4",
         "checkpoint.keep=5", "train.steps=12"]


def train(run_dir, *overrides, devices=1, check=True, config=CONFIG, env=None):
    """train.py on `config` (configs/glm-objective-tiny.yaml) with `overrides`."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), *overrides,
                        f"run_dir={run_dir}"], cwd=ROOT, env=env or env_for(devices), capture_output=True, text=True,
                       timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(CHATGLM6B_VOCABULARY)


def test_the_shipped_vocabulary_has_glms_tokens_and_sentence_ends(tok):
    special = SpecialIds.of(tok)
    assert (special.mask, special.gmask, special.sop, special.eop, special.end) == (84, 85, 88, 89, 2)
    ends = sentence_end_ids(tok)
    for text in ("。", ".", "？", "!", "\n"):
        assert tok.encode(text, add_special_tokens=False)[-1] in ends, text
    assert not {tok.encode(w, add_special_tokens=False)[-1] for w in ("the", "北京")} & ends
    with pytest.raises(ValueError, match="the tokenizer has no <sop>, <eop>"):
        SpecialIds.of(load_tokenizer(ROOT / "glm_jax" / "assets" / "tokenizer.model"))


def test_pieces_cover_the_document_and_every_example_fits(tok):
    rng = np.random.default_rng(0)
    doc = list(range(100, 400))
    for longest in (7, 50, 299, 300, 1000):
        parts = pieces(doc, longest)
        assert sum(parts, []) == doc and max(map(len, parts)) <= longest
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # no short remainder
    for seq_len in range(8, 300):  # the worst case: every span one token, Part A closed by </s>
        for ratio in (0.05, 0.15, 0.4, 0.9):
            n = longest_piece(seq_len, ratio)
            assert n + 2 * math.ceil(ratio * n) + 1 <= seq_len or n == 2, (seq_len, ratio, n)
    special = SpecialIds.of(tok)
    text = " ".join(open(ROOT / "data" / "corpus" / "bible_asv_en.txt", encoding="utf-8").read().split()[:6000])
    documents = [tok.encode(text, add_special_tokens=False)]
    for seq_len, ratio in ((32, 0.15), (128, 0.15), (64, 0.4)):
        corruptor = Corruptor(special, seq_len, sentence_end_ids(tok), ratio=ratio)
        examples = list(corruptor.examples(documents, rng))
        assert max(len(e.input_ids) for e in examples) <= seq_len
        assert corruptor.counts["tokens"] == len(documents[0])
        assert sum(corruptor.counts[k] for k in ("token", "sentence", "document")) == len(examples)
        for e in examples:  # token spans ([MASK]) cover at least mask_ratio of their piece
            part_a = e.input_ids[:e.context_length].tolist()
            if special.mask in part_a:
                masked = sum(b - a for a, b in e.spans)
                n = len(part_a) - len(e.spans) - (part_a[-1] == special.end) + masked
                assert masked >= ratio * n, (masked, n)
    kinds = Corruptor(special, 128, sentence_end_ids(tok), mix={"token": 1, "sentence": 0, "document": 0})
    list(kinds.examples(documents, rng))
    assert kinds.counts["sentence"] == kinds.counts["document"] == 0 < kinds.counts["token"]


def test_copies_corrupt_each_document_anew(tok):
    special = SpecialIds.of(tok)
    documents = [list(range(100, 160)), list(range(200, 230))]
    one = list(Corruptor(special, 128, copies=1).examples(documents, np.random.default_rng(1)))
    three = list(Corruptor(special, 128, copies=3).examples(documents, np.random.default_rng(1)))
    assert len(three) == 3 * len(one)
    assert [e.spans for e in three[:2]] == [e.spans for e in one]  # the same generator: the first pass is `one`
    assert len({(e.spans, e.order) for e in three[0::2]}) == 3  # the first document, three different corruptions


def test_the_pipeline_is_deterministic_in_the_seed(tok, tmp_path):
    from glm_jax.train import data as D
    from glm_jax.train import pipeline as P

    files = [ROOT / "data" / "corpus" / "bible_cuv_zh.txt"]
    corruptor = Corruptor(SpecialIds.of(tok), 64, sentence_end_ids(tok))

    def build(seed):
        return P.build_blank_infilling(files, tok, corruptor, seed, "paragraph", D.BadRecords(), max_tokens=5000)

    a, b, c = build([0, 0]), build([0, 0]), build([0, 1])
    assert set(a) == {"input_ids", "position_ids", "block_position_ids", "targets", "loss_mask", "segment_ids",
                      "context_ends"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["input_ids"].shape[1] == 64 and not np.array_equal(a["input_ids"][:5], c["input_ids"][:5])
    assert 0.15 < corruptor.counts["masked"] / corruptor.counts["tokens"] < 0.6
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(D.DataError, match="empty.txt: no examples"):
        P.build_blank_infilling([tmp_path / "empty.txt"], tok, corruptor, 0, "paragraph", D.BadRecords())


@pytest.mark.parametrize("overrides,message", [
    (["model.preset=glm-tiny"], "data.objective: blank_infilling needs a model with 2D positions"),
    (["data.objective=causal"], "data.objective: causal pretraining of a model with 2D positions"),
    (["data.task=sft"], "data.task: not with data.objective blank_infilling"),
    (["blank_infilling.mask_ratio=1.5"], "blank_infilling.mask_ratio: must be in (0, 1)"),
    (["blank_infilling.token=0", "blank_infilling.sentence=0", "blank_infilling.document=0"],
     "blank_infilling.token: the mix (token, sentence, document) has no positive weight"),
    ([f"data.tokenizer={ROOT / 'glm_jax' / 'assets' / 'tokenizer.model'}", "model.overrides.vocab_size=8192"],
     "model.overrides.mask_token_id: the model's 84 is not the tokenizer's [MASK]"),
    (["model.overrides.gmask_token_id=90"], "model.overrides.gmask_token_id: the model's 90 is not the tokenizer's"),
])
def test_configuration_errors_name_the_key(tmp_path, overrides, message):
    r = train(tmp_path, *SMALL, *overrides, check=False)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.strip().splitlines()) == 1


def test_prepare_data_refuses_the_objective(tmp_path):
    r = train(tmp_path / "run", *SMALL, "--prepare-data", str(tmp_path / "prep"), check=False)
    assert r.returncode == 2 and "data.objective: --prepare-data packs next-token rows" in r.stderr, r.stderr
    assert not (tmp_path / "prep").exists()


# ------------------------------------------------------------------------------------------------ runs

@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("glm_objective")
    r = train(run_dir, *SMALL, f"export.path={run_dir / 'export'}", "export.format=thudm")
    return run_dir, r


def test_a_run_lowers_the_loss_on_part_b(baseline):
    run_dir, r = baseline
    ls = losses(run_dir)
    assert sorted(ls) == list(range(1, 13))
    assert np.mean([ls[s] for s in (10, 11, 12)]) < ls[1] - 1.0, ls
    assert "data: task pretrain" in r.stdout and "chatglm-6b-tiny" in r.stdout
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert len(evals) == 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_the_run_and_its_export_carry_the_chatglm6b_vocabulary(baseline):
    """The chat CLI, the server and the benchmarks find the vocabulary train.py used: the export holds
    ice_text.model and its tokenizer_config.json (as THUDM's checkpoints), the run directory resolves to the
    shipped ChatGLM-6B-style vocabulary."""
    from glm_jax.checkpoints import default_tokenizer
    from glm_jax.tokenizers import ChatGLM6BTokenizer

    run_dir, _ = baseline
    assert default_tokenizer(run_dir) == CHATGLM6B_VOCABULARY
    export = run_dir / "export"
    assert default_tokenizer(export) == export
    tok = load_tokenizer(export)
    assert isinstance(tok, ChatGLM6BTokenizer) and tok.num_image_tokens == 0 and tok.vocab_size == 8000


def test_resume_equals_uninterrupted(baseline, tmp_path):
    import shutil

    run_dir, _ = baseline
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    for s in ("8", "12"):
        shutil.rmtree(tmp_path / "checkpoints" / s)
    r = train(tmp_path, *SMALL)
    assert "(step 4, data position 4)" in r.stdout
    ref, got = losses(run_dir), losses(tmp_path)
    assert sorted(got) == list(range(5, 13))
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])


@pytest.mark.slow
def test_the_mesh_and_remat_give_the_same_run(baseline, tmp_path):
    run_dir, _ = baseline
    ref = losses(run_dir)
    train(tmp_path / "mesh", *SMALL, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", devices=8)
    train(tmp_path / "remat", *SMALL, "model.remat_policy=full")
    for d in ("mesh", "remat"):
        got = losses(tmp_path / d)
        np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5,
                                   atol=2e-5, err_msg=d)


@pytest.mark.parametrize("mode", ["lora", "ptuning"])
def test_lora_and_ptuning_runs_export_to_thudms_layout(tmp_path, tok, mode):
    """LoRA (merged into the base) and P-tuning v2 (the prefix encoder's embedding) on the objective, exported in
    THUDM's layout: THUDM's ChatGLM-6B code holding the exported tensors gives the run's logits on a
    blank-infilling example (its own 2D positions and GLM mask)."""
    import thudm_chatglm6b

    if thudm_chatglm6b.source_dir() is None:
        pytest.skip("needs modelscope (test extra)")
    import torch
    from safetensors.numpy import load_file

    from glm_jax import GLMForCausalLM
    from glm_jax.train.blank_infilling import blank_infilling
    from glm_jax.train.build import load_run
    from test_chatglm6b import thudm_v1

    extra = ["train.mode=lora", "lora.rank=4"] if mode == "lora" else ["train.mode=ptuning", "ptuning.pre_seq_len=4"]
    export = tmp_path / "export"
    r = train(tmp_path / "run", *SMALL, *extra, "train.steps=4", "train.eval_every=0", "train.lr=5e-2",
              f"export.path={export}", "export.format=thudm")
    assert ("LoRA: rank 4" if mode == "lora" else "P-tuning v2: 4 prefix slots") in r.stdout
    assert all(np.isfinite(v) for v in losses(tmp_path / "run").values())
    cfg, params = load_run(tmp_path / "run")
    written = {}
    for f in export.glob("*.safetensors"):
        written.update(load_file(str(f)))
    config = json.loads((export / "config.json").read_text())
    assert config["position_encoding_2d"] and config.get("pre_seq_len") == (4 if mode == "ptuning" else None)
    theirs = thudm_v1(cfg, {k.removeprefix("transformer."): v for k, v in written.items() if k != "lm_head.weight"},
                      **({"pre_seq_len": 4, "prefix_projection": False} if mode == "ptuning" else {}))
    text = tok.encode("In the beginning God created the heaven and the earth. And the earth was without form.",
                      add_special_tokens=False)
    ex = blank_infilling(text, np.random.default_rng(3), special=SpecialIds.of(tok), kind="token")
    ours = np.asarray(GLMForCausalLM(cfg).apply(
        {"params": params}, ex.input_ids[None], position_ids=ex.position_ids[None],
        block_position_ids=ex.block_position_ids[None], context_ends=np.full((1, len(ex.input_ids)), ex.context_length)))
    with torch.no_grad():
        hidden = theirs(input_ids=torch.as_tensor(ex.input_ids[None].astype(np.int64)),
                        position_ids=torch.as_tensor(np.stack([ex.position_ids, ex.block_position_ids])[None]),
                        attention_mask=torch.as_tensor(~ex.attention_mask()[None, None])).last_hidden_state
    head = torch.as_tensor(written["lm_head.weight"])
    np.testing.assert_allclose(ours[0], (hidden.transpose(0, 1) @ head.T).numpy()[0], atol=2e-5, rtol=0)
