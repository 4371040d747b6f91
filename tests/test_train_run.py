"""End-to-end training runs (CPU, glm-test sized): loss falls, exact resume, 8 fake devices and two processes
match one device, NaN and SIGTERM handling, SFT / classification / LoRA."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.preset=glm-test", "model.overrides.vocab_size=8192", "data.seq_len=32", "data.max_tokens=20000",
         "data.eval_fraction=0.05", "train.global_batch_size=8", "train.lr=1e-2", "train.warmup_steps=2",
         "train.eval_every=6", "train.eval_batches=2", "checkpoint.every=4", "checkpoint.keep=5"]
STEPS = ["train.steps=12"]


# train.py runs share the suite's persistent XLA cache (tests/conftest.py), keeping every program: the runs of
# this module and of the fault tests build the same few programs, which then compile once.
CACHE = dict(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def env_for(devices=1, **extra):
    return dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                **CACHE, **extra)


def train(run_dir, *overrides, devices=1, env=None, check=True, timeout=300, config=()):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *config, *SMALL, *overrides, f"run_dir={run_dir}"],
                       cwd=ROOT, env=env_for(devices, **(env or {})), capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline")
    r = train(run_dir, *STEPS)
    return run_dir, r


def test_short_run_lowers_the_loss_and_logs(baseline):
    run_dir, r = baseline
    ls = losses(run_dir)
    assert sorted(ls) == list(range(1, 13))
    assert np.mean([ls[s] for s in (10, 11, 12)]) < ls[1] - 1.0, ls
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(recs[1])
    evals = [r_ for r_ in recs if "eval_loss" in r_]
    assert len(evals) == 2 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] + 0.5
    assert "mesh: {'data': 1, 'fsdp': 1" in r.stdout and "parameters" in r.stdout and "MFLOPs/token" in r.stdout
    assert "resolved config:" in r.stdout
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]
    png = run_dir / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert any(p.name.startswith("events.out.tfevents") and p.stat().st_size > 0
               for p in (run_dir / "tensorboard").iterdir())


def test_resume_equals_uninterrupted(baseline, tmp_path):
    run_dir, _ = baseline
    # the state of an interrupted run: only the step-4 checkpoint exists
    shutil.copytree(run_dir / "checkpoints", tmp_path / "checkpoints")
    for s in ("8", "12"):
        shutil.rmtree(tmp_path / "checkpoints" / s)
    r = train(tmp_path, *STEPS)
    assert "resumed from" in r.stdout and "(step 4, data position 4)" in r.stdout
    ref, got = losses(run_dir), losses(tmp_path)
    assert sorted(got) == list(range(5, 13))
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])


def test_prepared_data_gives_the_same_run(baseline, tmp_path):
    """--prepare-data packs the corpus once; a run on the memory-mapped rows (no text read at all) equals the
    run that tokenized in memory, evaluation included. Bad prepared data is a one-line error naming the file."""
    run_dir, _ = baseline
    prep = tmp_path / "prep"
    r = train(tmp_path / "unused", "--prepare-data", str(prep))
    assert "train with: data.prepared=" in r.stdout and (prep / "meta.json").exists()
    train(tmp_path / "run", *STEPS, f"data.prepared={prep}", "data.train_files=[]")
    ref, got = losses(run_dir), losses(tmp_path / "run")
    assert sorted(got) == sorted(ref)
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])
    evals = lambda d: [json.loads(l)["eval_loss"] for l in (d / "metrics.jsonl").read_text().splitlines()  # noqa
                       if "eval_loss" in l]
    np.testing.assert_allclose(evals(tmp_path / "run"), evals(run_dir), atol=1e-6)

    r = train(tmp_path / "bad1", *STEPS, f"data.prepared={prep}", "data.seq_len=64", check=False)
    assert r.returncode == 2 and "meta.json: rows of 32 tokens, but data.seq_len=64" in r.stderr, r.stderr
    with open(prep / "train.tokens.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4)
    r = train(tmp_path / "bad2", *STEPS, f"data.prepared={prep}", check=False)
    assert r.returncode == 2 and "train.tokens.bin: expected" in r.stderr, r.stderr


@pytest.mark.slow
def test_8_devices_data_fsdp_tensor_match_one_device(baseline, tmp_path):
    run_dir, _ = baseline
    r = train(tmp_path, *STEPS, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", devices=8)
    assert "mesh: {'data': 2, 'fsdp': 2, 'expert': 1, 'sequence': 1, 'tensor': 2}" in r.stdout
    ref, got = losses(run_dir), losses(tmp_path)
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5, atol=2e-5)


def test_gradient_accumulation_matches_one_big_batch(baseline, tmp_path):
    run_dir, _ = baseline
    train(tmp_path, *STEPS, "train.grad_accum=4")
    ref, got = losses(run_dir), losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5, atol=2e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(baseline, tmp_path):
    run_dir, _ = baseline
    port = _free_port()
    procs = []
    for pid in range(2):
        env = env_for(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *SMALL, *STEPS, "mesh.data=2", "mesh.fsdp=1",
             f"run_dir={tmp_path}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert "2 process(es)" in outs[0][0]
    ref, got = losses(run_dir), losses(tmp_path)
    assert sorted(got) == sorted(ref)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)], rtol=2e-5, atol=2e-5)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]


# Step 1 is finite, step 2 overflows: float16 compute after one step of the largest valid learning rate (an
# absurd one such as 1e30 is a config error, train.lr <= 10).
NAN = ["train.steps=5", "train.lr=10", "train.weight_decay=0", "model.dtype=float16", "train.warmup_steps=0",
       "train.schedule=constant", "checkpoint.every=1", "train.eval_every=0"]


def test_nan_stops_without_overwriting_the_last_good_checkpoint(tmp_path):
    r = train(tmp_path, *NAN, check=False)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "is not finite; stopping without saving (last good checkpoint: 1)" in r.stderr
    ls = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert ls[-1]["step"] == 2 and ls[-1]["loss"] is None and "loss" in ls[-1]["nonfinite"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_nan_skip_mode_drops_the_updates(tmp_path):
    r = train(tmp_path, *NAN, "train.on_nan=skip")
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "loss" in l]
    assert [x["skipped"] for x in recs if "skipped" in x] == [0, 1, 2, 3, 4]
    assert "update skipped" in r.stderr


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, "train.steps=100000", "checkpoint.every=100000",
           "train.eval_every=0", f"run_dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"stopped by SIGTERM at step {last}; checkpoint saved" in out
    assert sorted(int(x.name) for x in (tmp_path / "checkpoints").iterdir() if x.name.isdigit()) == [last]
    # the same command resumes from there
    r = train(tmp_path, "train.steps=100000", "checkpoint.every=100000", "train.eval_every=0",
              f"train.steps={last + 2}", check=True)
    assert "resumed from" in r.stdout and f"(step {last}, data position {last})" in r.stdout
    assert max(losses(tmp_path)) == last + 2


def test_lora_sft_trains_only_adapters_and_exports_base_plus_delta(tmp_path):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from glm_jax import GLMConfig, GLMForCausalLM, load_hf
    from glm_jax.convert.hf import get_path
    from glm_jax.train import lora as lora_lib

    export = tmp_path / "export"
    train(tmp_path, "data.seq_len=256", "train.steps=3", "train.global_batch_size=4", "train.mode=lora",
              "lora.rank=4", "lora.alpha=8", "lora.targets=[query, value, wo]", "train.eval_every=0",
              "checkpoint.every=3", f"export.path={export}", "export.format=transformers",
              config=["--config", str(ROOT / "configs" / "sft-tiny.yaml")])
    final = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and np.isfinite(final["eval_loss"])  # held-out SFT conversations (data/sft/eval.jsonl)
    state = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints" / "3" / "state").absolute())
    trained = state["params"]
    assert set(trained) == {"query", "value", "wo"}
    n_lora = sum(x.size for x in jax.tree.leaves(trained))
    n_opt = sum(np.size(x) for x in jax.tree.leaves(state["opt_state"]))
    assert 2 * n_lora <= n_opt <= 2 * n_lora + 8  # Adam moments of the adapters only (+ step counters)
    assert all(float(np.abs(ab["b"]).max()) > 0 for ab in trained.values())  # the adapters did train

    cfg = GLMConfig.from_preset("glm-test", vocab_size=8192)
    base = jax.jit(lambda k: nn.unbox(GLMForCausalLM(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.key(0))  # the run's seed-0 initialisation
    merged = lora_lib.merge(base, jax.tree.map(jnp.asarray, trained), alpha=8, rank=4)
    _, exported = load_hf(export)
    for path, changed in [(("model", "layers", "attention", "query", "kernel"), True),
                          (("model", "layers", "attention", "value", "kernel"), True),
                          (("model", "layers", "mlp", "wo", "kernel"), True),
                          (("model", "layers", "attention", "key", "kernel"), False),
                          (("model", "embed", "embedding"), False)]:
        get = lambda t: np.asarray(get_path(t, path))  # noqa: E731
        np.testing.assert_allclose(get(exported), get(merged), atol=1e-6, err_msg=str(path))
        assert (np.abs(get(exported) - get(base)).max() > 1e-6) == changed, path
    # The run directory itself loads for inference (chat) with the adapters merged, as the export.
    from glm_jax.checkpoints import load_checkpoint

    _, from_run = load_checkpoint(tmp_path)
    for a, b in zip(jax.tree.leaves(from_run), jax.tree.leaves(exported)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_classification_reports_accuracy(tmp_path):
    train(tmp_path, "data.seq_len=64", "train.steps=4", "train.global_batch_size=8", "train.eval_every=2",
              "train.eval_batches=2", "checkpoint.every=4", config=["--config", str(ROOT / "configs" / "classify-tiny.yaml")])
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= x["accuracy"] <= 1 for x in recs if "accuracy" in x)
    assert [x["step"] for x in recs if "eval_accuracy" in x] == [2, 4]
    import orbax.checkpoint as ocp

    params = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints" / "4" / "state").absolute())["params"]
    assert "lm_head" not in params and params["score"]["kernel"].shape[-1] == 2  # the classification head


def test_ptuning_trains_only_the_prefix(tmp_path):
    import orbax.checkpoint as ocp

    train(tmp_path, "data.seq_len=128", "train.steps=3", "train.global_batch_size=4", "train.mode=ptuning",
              "ptuning.pre_seq_len=4", "train.eval_every=0", "checkpoint.every=3", "train.lr=1e-1",
              config=["--config", str(ROOT / "configs" / "sft-tiny.yaml")])
    state = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints" / "3" / "state").absolute())
    assert list(state["params"]) == ["prefix"] and state["params"]["prefix"].shape == (2, 2, 4, 2, 16)
    n_opt = sum(np.size(x) for x in __import__("jax").tree.leaves(state["opt_state"]))
    assert 2 * state["params"]["prefix"].size <= n_opt <= 2 * state["params"]["prefix"].size + 8
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from glm_jax import GLMConfig, GLMForCausalLM

    cfg = GLMConfig.from_preset("glm-test", vocab_size=8192, pre_seq_len=4)
    init = jax.jit(lambda k: nn.unbox(GLMForCausalLM(cfg).init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.key(0))["model"]["prefix"]
    assert np.abs(np.asarray(state["params"]["prefix"]) - np.asarray(init)).max() > 1e-3  # the prefix trained
    assert all(np.isfinite(v) for v in losses(tmp_path).values())


@pytest.mark.parametrize("mode", ["full", "ptuning"])
def test_init_from_a_converted_checkpoint(tmp_path, mode):
    """model.init_from loads a THUDM checkpoint (load_hf); with a ~zero learning rate the export is that
    checkpoint again. P-tuning starts from a base checkpoint that has no prefix yet."""
    import jax

    from glm_jax import GLMConfig, GLMForCausalLM, init_params, load_hf, save_hf

    cfg = GLMConfig.from_preset("glm-test", vocab_size=8192)
    params = init_params(GLMForCausalLM(cfg), jax.random.key(123))
    save_hf(cfg, params, tmp_path / "ckpt", format="thudm")
    extra = ["train.mode=ptuning", "ptuning.pre_seq_len=4"] if mode == "ptuning" else []
    r = train(tmp_path / "run", "train.steps=2", "train.lr=1e-12", "train.eval_every=0", "checkpoint.every=2",
              f"model.init_from={tmp_path / 'ckpt'}", f"export.path={tmp_path / 'export'}", "export.format=thudm",
              *extra)
    assert all(np.isfinite(v) for v in losses(tmp_path / "run").values()), r.stdout
    cfg2, exported = load_hf(tmp_path / "export")
    assert cfg2.pre_seq_len == (4 if mode == "ptuning" else 0)
    assert ("prefix" in exported["model"]) == (mode == "ptuning")
    from glm_jax.train.build import load_run

    run_cfg, from_run = load_run(tmp_path / "run")
    assert run_cfg.pre_seq_len == cfg2.pre_seq_len
    assert jax.tree.structure(from_run) == jax.tree.structure(exported)
    for a, b in zip(jax.tree.leaves(from_run), jax.tree.leaves(exported)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    exported["model"].pop("prefix", None)
    assert jax.tree.structure(exported) == jax.tree.structure(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(exported)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_keep_best_holds_the_lowest_eval_loss(tmp_path):
    # lr 0.3 makes the eval loss bounce, so "best" differs from "latest" more often than not.
    train(tmp_path, "train.steps=8", "train.eval_every=2", "train.lr=0.3", "checkpoint.keep_best=true",
          "checkpoint.every=4")
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in recs if r.get("eval_loss") is not None}
    assert sorted(evals) == [2, 4, 6, 8]
    kept = [int(p.name) for p in (tmp_path / "checkpoints_best").iterdir() if p.name.isdigit()]
    assert kept == [min(evals, key=evals.get)], (kept, evals)
