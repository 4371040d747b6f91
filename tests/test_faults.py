"""Fault injection on train.py: non-finite updates, interrupted ends, shared run directories, damaged checkpoints,
kills at random moments. Each test reproduces one fault of issue 9 and asserts that no work is lost.
(Bad-input messages: tests/test_faults_input.py.)"""

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train_run import NAN, ROOT, SMALL, env_for, losses, train

RUN8 = ["train.steps=8", "checkpoint.every=4", "train.eval_every=0"]


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def ckpt_steps(run_dir, name="checkpoints"):
    d = Path(run_dir) / name
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def one_error_line(stderr: str, start: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith(start)]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at 4 and 8: the reference every resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("run8")
    train(run_dir, *RUN8)
    return run_dir


# ------------------------------------------------------------------------------------- 1. non-finite state

def test_a_non_finite_update_is_caught_on_the_device_and_never_applied_in_skip_mode():
    """Finite loss and gradient, but float16 parameters overflow under an absurd step: the step reports it
    (update_finite False) and, skipping, keeps the old parameters and optimizer state."""
    from glm_jax import GLMConfig, GLMForCausalLM, init_params
    from glm_jax.train.config import TrainSection
    from glm_jax.train.optimizer import make_optimizer
    from glm_jax.train.step import StepBuilder, make_state

    cfg = GLMConfig.from_preset("glm-test", param_dtype="float16")
    model = GLMForCausalLM(cfg)
    tx, schedule = make_optimizer(TrainSection(steps=10, lr=1e-3, warmup_steps=0, clip_norm=None))
    builder = StepBuilder(model, tx, schedule, "lm", on_nan="skip")
    state = make_state(init_params(model, jax.random.key(0)), tx, 0)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (1, 2, 16)), jnp.int32)
    batch = {"input_ids": ids, "targets": ids, "loss_mask": jnp.ones_like(ids), "segment_ids": jnp.ones_like(ids)}
    step = jax.jit(builder.train_step)
    for skip in (True, False):
        new, m = step(state, {}, batch, {"lr": jnp.float32(1e9), "skip_nonfinite": jnp.bool_(skip)})
        assert np.isfinite(float(m["loss"])) and np.isfinite(float(m["grad_norm"]))
        assert not bool(m["update_finite"]) and not bool(m["finite"])
        leaves = jax.tree.leaves(new["params"])
        if skip:
            assert int(new["skipped"]) == 1
            for a, b in zip(leaves, jax.tree.leaves(state["params"])):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            assert not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def test_stop_mode_keeps_a_finite_last_good_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    r = train(tmp_path, *NAN, check=False)
    assert r.returncode == 3, r.stderr[-2000:]
    good = ckpt_steps(tmp_path)
    assert good and f"last good checkpoint: {good[-1]}" in r.stderr
    state = ocp.StandardCheckpointer().restore((tmp_path / "checkpoints" / str(good[-1]) / "state").absolute())
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))


def test_skip_mode_stops_after_max_skips_in_a_row(tmp_path):
    r = train(tmp_path, *NAN, "train.on_nan=skip", "train.max_skips=3", check=False)
    assert r.returncode == 3, r.stderr[-2000:]
    line = one_error_line(r.stderr, "error:")
    assert "3 non-finite steps in a row (train.max_skips=3)" in line and "last good checkpoint" in line
    assert [x["skipped"] for x in records(tmp_path) if "skipped" in x][-1] == 3


# ------------------------------------------------------------------------------------- 2. the end of a run

def test_a_kill_after_the_final_line_is_finished_by_the_rerun(tmp_path):
    """kill -9 as soon as "final:" is printed (the export is then being written): the rerun completes the
    export, writes the final record once and marks the run complete; a third run has nothing to do."""
    export = tmp_path / "export"
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, *RUN8, f"export.path={export}", f"run_dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if line.startswith("final:"):
            p.kill()
            break
    p.wait(timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert not (tmp_path / "complete.json").exists()
    export.mkdir(exist_ok=True)  # what a kill inside save_hf used to leave: an empty export folder
    partial = tmp_path / f".export.tmp-{p.pid}"  # and what a kill inside export_atomically leaves (timing-dependent)
    partial.mkdir(exist_ok=True)
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"cut")

    r = train(tmp_path, *RUN8, f"export.path={export}")
    assert "the run's end did not complete: finishing it" in r.stdout
    assert (export / "config.json").exists() and any(export.glob("*.safetensors"))
    assert not list(tmp_path.glob(".export.tmp-*"))
    recs = records(tmp_path)
    assert [x["step"] for x in recs if not x.get("final")] == list(range(1, 9))
    assert [x["step"] for x in recs if x.get("final")] == [8]
    assert json.loads((tmp_path / "complete.json").read_text())["step"] == 8
    r = train(tmp_path, *RUN8, f"export.path={export}")
    assert "nothing to do" in r.stdout and len(records(tmp_path)) == len(recs)


# ------------------------------------------------------------------------------------- 3. one owner per run

def test_a_live_owner_keeps_the_run_dir_and_a_dead_one_does_not(tmp_path):
    from glm_jax.train.atomic_dir import proc_start

    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock = {"pid": owner.pid, "host": socket.gethostname(), "proc_start": proc_start(owner.pid), "time": "t0"}
        (tmp_path / "run.lock").write_text(json.dumps(lock))
        r = train(tmp_path, *RUN8, check=False)
        assert r.returncode == 2
        assert f"in use by pid {owner.pid}" in one_error_line(r.stderr, "error:")
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        owner.kill()
        owner.wait()
    r = train(tmp_path, "train.steps=2", "checkpoint.every=2", "train.eval_every=0")
    assert "removing the stale lock" in r.stderr
    assert not (tmp_path / "run.lock").exists()  # released at the end


@pytest.mark.slow
def test_two_runs_started_together_never_share_a_directory(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, "train.steps=6", "checkpoint.every=2",
           "train.eval_every=0", f"run_dir={tmp_path}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    assert [x["step"] for x in records(tmp_path)] == [1, 2, 3, 4, 5, 6, 6]  # one run's lines, then its final


def test_a_changed_model_config_is_refused_before_touching_the_run(run8, tmp_path):
    shutil.copytree(run8, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "config.yaml").read_text()
    r = train(tmp_path, "train.steps=12", "checkpoint.every=4", "train.eval_every=0",
              "model.overrides.num_layers=1", check=False)
    assert r.returncode == 2
    line = one_error_line(r.stderr, "config error:")
    assert line.startswith("config error: model.overrides.num_layers: 1 differs from None of the checkpoints")
    assert (tmp_path / "config.yaml").read_text() == before
    # a key that does not define the state may change: more steps resume from 8
    r = train(tmp_path, "train.steps=10", "checkpoint.every=4", "train.eval_every=0", "train.lr=5e-3")
    assert "(step 8, data position 8)" in r.stdout and "lr: 0.005" in (tmp_path / "config.yaml").read_text()


# ------------------------------------------------------------------------------------- 4. damaged checkpoints

def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncated file":
        f = _largest_file(step_dir / "state")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    elif how == "deleted file":
        _largest_file(step_dir / "state").unlink()
    elif how == "missing metadata":  # the index of orbax's OCDBT database: without it no tensor is found
        (step_dir / "state" / "manifest.ocdbt").unlink()
    elif how == "flipped bytes":
        f = _largest_file(step_dir / "state")
        data = bytearray(f.read_bytes())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
        f.write_bytes(bytes(data))
    elif how == "wrong checksum":  # bytes that still decode, but to other values than were saved
        meta = step_dir / "integrity" / "metadata"
        sums = json.loads(meta.read_text())
        key = sorted(k for k in sums["state"] if "embedding" in k)[0]
        sums["state"][key] = (sums["state"][key] + 1) % 2**32
        meta.write_text(json.dumps(sums))


def _abstract_state(step_dir: Path):
    """The abstract train state of a checkpoint (shapes, dtypes, one device), as train.py would build it."""
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore((step_dir / "state").absolute())
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), tree)


@pytest.mark.parametrize("how", ["truncated file", "deleted file", "missing metadata", "wrong checksum"])
def test_a_damaged_latest_checkpoint_is_set_aside_for_the_previous_one(run8, tmp_path, how, capsys):
    from glm_jax.train.checkpoint import Checkpointer

    shutil.copytree(run8 / "checkpoints", tmp_path / "checkpoints")
    abstract = _abstract_state(tmp_path / "checkpoints" / "4")
    _damage(tmp_path / "checkpoints" / "8", how)
    ckpt = Checkpointer(tmp_path)
    step, state, loader = ckpt.restore_latest_good(abstract)
    ckpt.close()
    assert step == 4 and int(state["step"]) == 4 and loader["position"] == 4
    out = capsys.readouterr()
    moved = [line for line in out.out.splitlines() if "is damaged" in line]
    assert len(moved) == 1 and str(tmp_path / "checkpoints" / "8") in moved[0] and "Traceback" not in out.err
    if how == "wrong checksum":
        assert "does not match its checksum" in moved[0]
    assert ckpt_steps(tmp_path) == [4]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["8"]


def test_flipped_bytes_in_the_latest_checkpoint_resume_from_the_previous_one_exactly(run8, tmp_path):
    """End to end: train.py sets the damaged checkpoint aside, resumes from step 4 and equals the reference."""
    shutil.copytree(run8 / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(run8 / "config.yaml", tmp_path / "config.yaml")
    _damage(tmp_path / "checkpoints" / "8", "flipped bytes")
    r = train(tmp_path, *RUN8)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "is damaged" in r.stdout and "(step 4, data position 4)" in r.stdout
    ref, got = losses(run8), losses(tmp_path)
    assert sorted(got) == [5, 6, 7, 8]
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])
    assert ckpt_steps(tmp_path) == [4, 8]


def test_no_restorable_checkpoint_is_one_line_and_moves_nothing(run8, tmp_path):
    shutil.copytree(run8 / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(run8 / "config.yaml", tmp_path / "config.yaml")
    for s in ("4", "8"):
        _damage(tmp_path / "checkpoints" / s, "truncated file")
    r = train(tmp_path, *RUN8, check=False)
    assert r.returncode == 2
    line = one_error_line(r.stderr, "error:")
    assert str(tmp_path / "checkpoints" / "8") in line and "older checkpoint" in line
    assert ckpt_steps(tmp_path) == [4, 8] and not (tmp_path / "checkpoints_corrupt").exists()


def test_checkpoints_of_another_state_are_named_as_such_and_moved_nowhere(run8, tmp_path):
    """Checkpoints that restore fine but hold another state (here: a tensor this run lacks and one it adds) are
    not reported as orbax's "tree structures do not match": the newest is named with the first differing
    tensor, and nothing is set aside."""
    from glm_jax.train.checkpoint import Checkpointer, CheckpointError

    shutil.copytree(run8 / "checkpoints", tmp_path / "checkpoints")
    abstract = _abstract_state(tmp_path / "checkpoints" / "4")
    abstract["params"]["model"]["extra"] = abstract["params"]["model"].pop("final_norm")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest_good(abstract)
    ckpt.close()
    assert str(e.value) == (f"{tmp_path / 'checkpoints' / '8'}: does not match this run's state (this run has "
                            f"params/model/extra/scale, the checkpoint does not; 2 tensor name(s) differ: another "
                            f"model, train.mode, lora.targets or optimizer); nor can the 1 older checkpoint(s)")
    assert ckpt_steps(tmp_path) == [4, 8] and not (tmp_path / "checkpoints_corrupt").exists()


# ------------------------------------------------------------------------------------- 5. metrics and kills

def test_a_cut_last_metrics_line_is_skipped_by_readers_and_dropped_on_resume(run8, tmp_path):
    from glm_jax.train.metrics import plot_loss, read_metrics

    shutil.copytree(run8, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.2')
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == len(records(run8))
    assert plot_loss(tmp_path) is not None
    train(tmp_path, "train.steps=10", "checkpoint.every=4", "train.eval_every=0")
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]  # the old final record of 8 went too


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path):
    """Kills at random offsets (many land inside an asynchronous save), then a resume: the losses equal one
    uninterrupted run and metrics.jsonl holds each step exactly once."""
    steps = ["train.steps=12", "checkpoint.every=2", "train.eval_every=0", "checkpoint.keep=2"]
    ref_dir = tmp_path / "ref"
    train(ref_dir, *steps)
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, *steps, f"run_dir={run_dir}"]
    for _ in range(4):
        p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
        for line in p.stdout:  # once training runs, kill somewhere in the next few steps
            if line.startswith(("resumed from", "data:")):
                time.sleep(rng.uniform(1.0, 4.0))
                break
        p.kill()
        p.wait(timeout=60)
    train(run_dir, *steps)
    ref, got = losses(ref_dir), losses(run_dir)
    assert sorted(got) == list(range(1, 13))
    for s in got:
        assert abs(got[s] - ref[s]) <= 1e-6, (s, got[s], ref[s])
    steps_logged = [x["step"] for x in records(run_dir) if not x.get("final")]
    assert steps_logged == sorted(set(steps_logged)) == list(range(1, 13))
    assert not (run_dir / "run.lock").exists()


# ------------------------------------------------------------------------------------- 6. signals and I/O

def wait_until_caught(pid, sig, timeout=60):
    """Waits until the process has a handler for `sig` (Linux: the SigCgt mask in /proc/<pid>/status): a
    signal sent earlier would hit Python's default action, before train.py could do anything about it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = Path(f"/proc/{pid}/status").read_text()
        caught = int(next(x for x in status.splitlines() if x.startswith("SigCgt:")).split()[1], 16)
        if caught >> (sig - 1) & 1:
            return
        time.sleep(0.01)
    raise TimeoutError(f"process {pid} installed no handler for {sig!r} in {timeout} s")


def test_sigterm_during_start_up_exits_cleanly(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, *RUN8, f"run_dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_caught(p.pid, signal.SIGTERM)  # main() has begun; imports, data and compilation still ahead
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert "stopped by SIGTERM" in out


def test_sigterm_without_checkpoints_does_not_claim_a_save(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *SMALL, "train.steps=100000", "checkpoint.enabled=false",
           "train.eval_every=0", f"run_dir={tmp_path}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((tmp_path / "metrics.jsonl").exists()
                                          and len(records(tmp_path)) >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "nothing saved (checkpoint.enabled=false)" in out and "checkpoint saved" not in out


def test_an_unwritable_checkpoint_directory_is_one_line_exit_5(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    r = train(tmp_path, *RUN8, check=False)
    assert r.returncode == 5, r.stderr[-3000:]
    line = one_error_line(r.stderr, "error:")
    assert line.startswith("error: cannot write") and "checkpoints" in line
