"""Knowledge distillation in train.py (distill.teacher): the loss is Hinton et al.'s T^2-scaled KL, written here
from its definition; a run distils a train.py-exported teacher (full and LoRA), logging kl / data_loss and the
eval KL; a teacher whose vocabulary differs is one line, exit 2; the --compile-only plan holds the teacher."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from glm_jax.compress.__main__ import main as compress
from glm_jax.train.step import distillation_kl
from hf_models import randomize, tiny_hf_config
from test_train_run import ROOT, train


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_the_kl_is_hintons_definition(kind):
    """sum_v p(v) log(p(v) / q(v)) * T^2 with p = the teacher's softmax(z / T) (forward; the student's for
    reverse) in float64 numpy; zero when the logits agree."""
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 3, 50)) * 3, rng.normal(size=(2, 3, 50)) * 3
    t = 2.0
    ps, pt = softmax(student / t), softmax(teacher / t)
    p, q = (pt, ps) if kind == "forward" else (ps, pt)
    expected = t * t * np.sum(p * np.log(p / q), axis=-1)
    got = np.asarray(distillation_kl(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), t, kind))
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    assert np.abs(np.asarray(distillation_kl(jnp.asarray(student), jnp.asarray(student), t, kind))).max() < 1e-5


def test_top_k_distillation_renormalises_the_teachers_best_k():
    """top_k: p = the teacher's softmax over its k largest logits (at T), q = the student's full softmax at T read
    at those tokens: T^2 sum_k p log(p / q); k = the vocabulary gives the full KL."""
    rng = np.random.default_rng(1)
    student, teacher = rng.normal(size=(2, 4, 30)) * 2, rng.normal(size=(2, 4, 30)) * 2
    t, k = 1.5, 5
    top = np.argsort(-teacher, axis=-1)[..., :k]
    p = softmax(np.take_along_axis(teacher, top, -1) / t)
    q = np.take_along_axis(softmax(student / t), top, -1)
    expected = t * t * np.sum(p * np.log(p / q), axis=-1)
    s32, t32 = jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32)
    np.testing.assert_allclose(np.asarray(distillation_kl(s32, t32, t, "forward", k)), expected, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(distillation_kl(s32, t32, t, "forward", 30)),
                               np.asarray(distillation_kl(s32, t32, t)), rtol=1e-5)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """glm-test trained 20 steps by train.py and exported in the transformers format."""
    d = tmp_path_factory.mktemp("teacher")
    train(d / "run", "train.steps=20", "train.eval_every=0", f"export.path={d / 'export'}")
    return d / "export"


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_distils_the_teacher(teacher, tmp_path):
    """A fresh glm-test student learns the teacher: the logged KL falls; "loss" and "data_loss" are the data
    loss; the eval records carry eval_kl."""
    train(tmp_path, "train.steps=12", "train.eval_every=6", f"distill.teacher={teacher}", "distill.alpha=0.8",
          "distill.temperature=2", "distill.teacher_dtype=float32")
    steps = [r for r in records(tmp_path) if "kl" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all(r["loss"] == r["data_loss"] for r in steps)
    assert np.mean([r["kl"] for r in steps[-3:]]) < 0.8 * steps[0]["kl"], [r["kl"] for r in steps]
    assert all(r["eval_kl"] > 0 for r in records(tmp_path) if "eval_loss" in r)


def test_lora_sft_distillation_resumes_exactly_and_exports(teacher, tmp_path):
    """LoRA on SFT conversations under a teacher (bf16, the default): the KL is logged every step, the checkpoint
    holds the adapters only, never the teacher; a run resumed from step 4 repeats steps 5-8 exactly (loss and
    KL); the export is a loadable checkpoint."""
    import orbax.checkpoint as ocp

    from glm_jax import load_hf

    options = ("data.seq_len=256", "train.global_batch_size=4", "train.steps=8", "train.eval_every=0",
               "checkpoint.every=4", "train.mode=lora", f"distill.teacher={teacher}")
    sft = ("--config", str(ROOT / "configs" / "sft-tiny.yaml"))
    train(tmp_path / "run", *options, f"export.path={tmp_path / 'export'}", config=sft)
    steps = {r["step"]: r for r in records(tmp_path / "run") if "kl" in r}
    assert sorted(steps) == list(range(1, 9)) and all(np.isfinite(r["kl"]) for r in steps.values())
    saved = ocp.StandardCheckpointer().restore((tmp_path / "run" / "checkpoints" / "4" / "state").absolute())
    leaves = [str(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved["params"])]
    assert leaves and all("lora" in p.lower() or "'a'" in p or "'b'" in p for p in leaves), leaves[:5]
    assert not any("teacher" in p for p in leaves)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "run" / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "8")
    train(resumed, *options, config=sft)
    again = {r["step"]: r for r in records(resumed) if "kl" in r}
    assert sorted(again) == [5, 6, 7, 8]
    assert all(again[s]["loss"] == steps[s]["loss"] and again[s]["kl"] == steps[s]["kl"] for s in again), again
    cfg, _ = load_hf(tmp_path / "export")
    assert cfg.vocab_size == 8192


def test_the_hidden_state_loss_compares_the_channels_a_width_pruning_kept():
    """StepBuilder.sums with hidden_weight: hidden_sum is the sum over counted tokens of the mean over the
    student's channels of (student hidden - teacher hidden at the kept channels)^2, the final normed states of
    both models computed here separately; the objective adds it with its weight."""
    from glm_jax import GLMConfig, GLMForCausalLM, init_params
    from glm_jax.compress import PrunePlan, apply_plan
    from glm_jax.train.step import StepBuilder

    cfg = GLMConfig.from_preset("glm-test")
    big = GLMForCausalLM(cfg)
    big_params = init_params(big, jax.random.key(0))
    kept = np.sort(np.random.default_rng(0).permutation(64)[:48])
    small_cfg, small_params = apply_plan(cfg, big_params, PrunePlan(layers=[0, 1], width=kept))
    small = GLMForCausalLM(small_cfg)
    ids = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, 7:] = False
    batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": mask}
    distill = {"temperature": 1.0, "alpha": 0.5, "kl": "forward", "top_k": 0, "hidden_weight": 3.0,
               "hidden_channels": tuple(kept.tolist())}
    builder = StepBuilder(small, None, None, "lm", teacher=big, distill=distill)
    obj, aux = builder.sums(small_params, batch, teacher_params=big_params)
    hs = np.asarray(small.apply({"params": small_params}, ids, return_hidden=True), np.float64)
    ht = np.asarray(big.apply({"params": big_params}, ids, return_hidden=True), np.float64)[..., kept]
    expected = np.sum(np.mean((hs - ht) ** 2, -1) * mask)
    np.testing.assert_allclose(float(aux["hidden_sum"]), expected, rtol=1e-4)
    without = 0.5 * float(aux["kl_sum"]) + 0.5 * float(aux["loss_sum"])
    np.testing.assert_allclose(float(obj), without + 3.0 * expected, rtol=1e-4)
    shuffled = dict(distill, hidden_channels=tuple(np.sort(np.random.default_rng(1).permutation(64)[:48]).tolist()))
    _, other = StepBuilder(small, None, None, "lm", teacher=big, distill=shuffled).sums(
        small_params, batch, teacher_params=big_params)
    assert float(other["hidden_sum"]) > 2 * expected  # other channels: a different (worse) match


def test_a_width_pruned_student_distils_with_top_k_and_hidden_states(teacher, tmp_path):
    """The teacher pruned to 3/4 of its hidden size by glm-compress, then distilled by train.py with top-k logits
    and the hidden-state loss (channels from the checkpoint's prune_report.json): the KL falls, hidden_mse and
    eval_hidden_mse are logged; without the report the widths cannot be matched: one line, exit 2."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "data" / "corpus" / "bible_asv_en.txt").read_text()[:60000])
    pruned = tmp_path / "pruned"
    assert compress(["prune", "--checkpoint", str(teacher), "--calibration", str(corpus), "--out", str(pruned),
                     "--width-keep", "0.75", "--seq-len", "32", "--samples", "8", "--eval-samples", "4"]) == 0
    flags = (f"model.init_from={pruned}", f"distill.teacher={teacher}", "distill.alpha=1.0", "distill.top_k=16",
             "distill.hidden_weight=0.5", "distill.teacher_dtype=float32")
    train(tmp_path / "run", "train.steps=8", "train.eval_every=8", "train.lr=3e-3", *flags)
    steps = [r for r in records(tmp_path / "run") if "hidden_mse" in r]
    assert len(steps) == 8 and all(np.isfinite(r["hidden_mse"]) for r in steps)
    assert steps[-1]["kl"] < steps[0]["kl"] and "eval_hidden_mse" in records(tmp_path / "run")[-1], steps
    (pruned / "prune_report.json").unlink()
    r = train(tmp_path / "run2", "train.steps=2", *flags, check=False)
    assert r.returncode == 2 and "distill.hidden_weight: the teacher's hidden size (64) is not the student's (48)" \
        in r.stderr, r.stderr[-2000:]


def test_a_teacher_of_another_vocabulary_is_one_line_exit_2(tmp_path):
    other = tmp_path / "other"
    randomize(transformers.Glm4ForCausalLM(tiny_hf_config(glm4=True, vocab=128)), seed=0).save_pretrained(other)
    r = train(tmp_path / "run", f"distill.teacher={other}", check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert errors == ["config error: distill.teacher: its vocabulary (128) is not the student's (8192); distillation "
                      "compares their next-token distributions"], r.stderr[-2000:]
    r = train(tmp_path / "run2", f"distill.teacher={tmp_path}", check=False)  # no config.json / config.yaml
    assert r.returncode == 2 and "distill.teacher: " in r.stderr and "not a checkpoint directory" in r.stderr
    for run in ("run", "run2"):  # refused before any step: no checkpoint, no metrics
        assert not (tmp_path / run / "checkpoints").exists() and not (tmp_path / run / "metrics.jsonl").exists()


def test_the_compile_only_plan_holds_the_teacher(teacher, tmp_path):
    r = train(tmp_path / "plan", f"distill.teacher={teacher}", check=False, config=("--compile-only",))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "compiled for 1 x cpu (nothing run)" in r.stdout and not (tmp_path / "plan").exists()
