"""Knowledge distillation in train.py (distill.teacher): the loss is Hinton et al.'s T^2-scaled KL, written here
from its definition; a run distils a train.py-exported teacher (full and LoRA), logging kl / data_loss and the
eval KL; a teacher whose vocabulary differs is one line, exit 2; the --compile-only plan holds the teacher."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from glm_jax.train.step import distillation_kl
from hf_models import randomize, tiny_hf_config
from test_train_run import train


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


def test_lora_distillation_trains_only_the_adapters(teacher, tmp_path):
    """LoRA under a teacher (bf16, the default): the KL is logged every step and the checkpoint holds the
    adapters only, never the teacher."""
    import orbax.checkpoint as ocp

    train(tmp_path, "train.steps=4", "train.eval_every=0", "checkpoint.every=4", "train.mode=lora",
          f"distill.teacher={teacher}")
    assert [np.isfinite(r["kl"]) for r in records(tmp_path) if "kl" in r] == [True] * 4
    saved = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints" / "4" / "state").absolute())["params"]
    leaves = [str(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved)]
    assert leaves and all("lora" in p.lower() or "'a'" in p or "'b'" in p for p in leaves), leaves[:5]
    assert not any("teacher" in p for p in leaves)


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
