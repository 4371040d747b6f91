"""Outputs never destroy what the user did not ask to replace (issue 27, items 1-2): export.path and
`--prepare-data DIR` refuse a destination whose replacement would remove something they did not write (exit 2,
one line, every file that existed before still there byte for byte), and write beside the destination and swap
in whole, so that a failure or a kill leaves the previous directory as it was."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glm_jax.train import atomic_dir as A
from glm_jax.train.config import ConfigError, load_config
from glm_jax.train.rundir import EXPORT_MARKER, check_export_path
from test_faults_input import TINY, one_line, train


def snapshot(root: Path) -> dict:
    """Every file under `root` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def fake_run(run_dir: Path) -> dict:
    """A run directory as training leaves it (a checkpoint, metrics, config): what an export must not touch."""
    (run_dir / "checkpoints" / "4" / "state").mkdir(parents=True)
    (run_dir / "checkpoints" / "4" / "state" / "manifest.ocdbt").write_bytes(b"\x00state")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.1}\n')
    (run_dir / "config.yaml").write_text("run_dir: r\n")
    return snapshot(run_dir)


def fake_checkpoint(ckpt: Path) -> None:
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "glm4"}))
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "modeling_chatglm.py").write_text("# the checkpoint's code\n")


# ------------------------------------------------------------------------------------- 1. export.path

def test_train_py_refuses_to_export_over_the_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    before = fake_run(run_dir)
    r = train(run_dir, f"export.path={run_dir}")
    one_line(r, f"config error: export.path: {run_dir} is the run directory (run_dir); writing there would "
                f"replace it (choose another path)")
    assert snapshot(run_dir) == before and "final:" not in r.stdout


def test_train_py_refuses_to_export_over_the_init_from_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt)
    before = snapshot(ckpt)
    r = train(tmp_path / "run", f"model.init_from={ckpt}", f"export.path={ckpt}")
    one_line(r, f"config error: export.path: {ckpt} is the model.init_from checkpoint; writing there would replace "
                f"it (choose another path)")
    assert snapshot(ckpt) == before and not (tmp_path / "run").exists()


def test_every_destination_an_export_must_not_replace(tmp_path):
    run_dir, ckpt, other = tmp_path / "runs" / "a", tmp_path / "ckpt", tmp_path / "other"
    fake_run(run_dir)
    fake_checkpoint(ckpt)
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("x")
    foreign = tmp_path / "foreign_export"
    foreign.mkdir()
    (foreign / EXPORT_MARKER).write_text(json.dumps({"run_dir": "/somewhere/else"}))
    why = "writing there would replace it (choose another path)"
    refuse = "refusing to replace it (choose another path or remove it yourself)"
    cases = {
        run_dir: f"is the run directory (run_dir); {why}",
        tmp_path / "runs": f"holds the run directory (run_dir) ({run_dir}); {why}",
        run_dir / "checkpoints": f"is the run's checkpoints; {why}",
        run_dir / "checkpoints" / "export": f"is inside the run's checkpoints ({run_dir / 'checkpoints'}), which "
                                            f"is not ours to write into (choose another path)",
        run_dir / "metrics.jsonl": f"is the run's metrics.jsonl; {why}",
        ckpt: f"is the model.init_from checkpoint; {why}",
        other: f"is a non-empty directory and holds no {EXPORT_MARKER} (it is not the export of a glm_jax run); "
               f"{refuse}",
        tmp_path / "a_file": f"exists and is not a directory; {refuse}",
        foreign: f"is a non-empty directory and is the export of another run (/somewhere/else); {refuse}",
    }
    for out, expected in cases.items():
        cfg = load_config(TINY, [f"run_dir={run_dir}", f"model.init_from={ckpt}", f"export.path={out}"])
        with pytest.raises(ConfigError) as e:
            check_export_path(cfg)
        assert str(e.value) == f"export.path: {out} {expected}"
    # allowed: a new path, one inside the run directory, an empty directory, this run's earlier export
    empty = tmp_path / "empty"
    empty.mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / EXPORT_MARKER).write_text(json.dumps({"run_dir": str(run_dir.resolve())}))
    for out in (tmp_path / "new" / "export", run_dir / "export", empty, mine):
        check_export_path(load_config(TINY, [f"run_dir={run_dir}", f"model.init_from={ckpt}", f"export.path={out}"]))


def test_a_failed_write_leaves_the_previous_directory_and_nothing_else(tmp_path):
    out = tmp_path / "export"
    A.write_atomically(lambda d: (d.mkdir(), (d / "a.txt").write_text("first")), out)
    before = snapshot(tmp_path)

    def fails(d):
        d.mkdir()
        (d / "a.txt").write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError):
        A.write_atomically(fails, out)
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    A.write_atomically(lambda d: (d.mkdir(), (d / "b.txt").write_text("second")), out)
    assert snapshot(tmp_path) == {"export/b.txt": b"second"}


def test_without_an_atomic_exchange_the_swap_is_two_renames(tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing (another OS, some network file systems) the previous directory
    is renamed aside, the new one into place, and the previous one deleted: the same result, nothing left over."""
    monkeypatch.setattr(A, "_exchange", lambda a, b: False)
    out = tmp_path / "export"
    A.write_atomically(lambda d: (d.mkdir(), (d / "a.txt").write_text("first")), out)
    A.write_atomically(lambda d: (d.mkdir(), (d / "b.txt").write_text("second")), out)
    assert snapshot(tmp_path) == {"export/b.txt": b"second"}


def test_a_swap_cut_between_its_renames_is_undone_by_the_next_write(tmp_path):
    """Where the file system cannot exchange two paths the swap is two renames; a kill between them leaves the
    previous directory under .<name>.old-<pid>: the next write puts it back first (and still refuses nothing)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    out = tmp_path / "prep"
    old = tmp_path / f".prep.old-{dead}"
    old.mkdir()
    (old / "meta.json").write_text("previous")
    half = tmp_path / f".prep.tmp-{dead}"
    half.mkdir()
    (half / "train.tokens.bin").write_bytes(b"cut")
    with pytest.raises(RuntimeError):
        A.write_atomically(lambda d: (_ for _ in ()).throw(RuntimeError("bad input")), out)
    assert snapshot(tmp_path) == {"prep/meta.json": b"previous"}


def test_a_rerun_writes_an_export_that_went_missing(tmp_path):
    """A finished run whose export was deleted (or given a new export.path) writes it again from the final
    checkpoint instead of reporting the run complete."""
    export = tmp_path / "export"
    run = ["train.steps=2", "train.eval_every=0", "checkpoint.every=2", f"export.path={export}"]
    r = train(tmp_path / "run", *run)
    assert r.returncode == 0, r.stderr[-3000:]
    marker = json.loads((export / EXPORT_MARKER).read_text())
    assert marker == {"run_dir": str((tmp_path / "run").resolve()), "step": 2, "format": "transformers"}
    shards = snapshot(export)  # (with the export in place a rerun has nothing to do: test_faults.py's kill test)
    for p in export.iterdir():
        p.unlink()
    export.rmdir()
    r = train(tmp_path / "run", *run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"but {export} holds no export: finishing it" in r.stdout
    assert snapshot(export) == shards  # the same checkpoint exported again, byte for byte


# ------------------------------------------------------------------------------------- 2. --prepare-data

def prepare(out, *overrides):
    return train(out.parent / "unused_run", "--prepare-data", str(out), *overrides)


def test_prepare_data_never_loses_the_prepared_directory(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"document {i} about the weather in spring and autumn" for i in range(200)))
    prep = tmp_path / "prep"
    r = prepare(prep, f"data.train_files={corpus}", "data.eval_fraction=0")
    assert r.returncode == 0, r.stderr[-3000:]
    before = snapshot(prep)
    assert {"meta.json", "train.tokens.bin", "train.segments.bin"} <= set(before)

    bad = tmp_path / "more.jsonl"  # the second file of the new inputs fails half-way through
    bad.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
    r = prepare(prep, f"data.train_files=[{corpus}, {bad}]", "data.eval_fraction=0")
    one_line(r, f"data error: {bad}:2: not valid JSON (Expecting property name enclosed in double quotes at "
                f"column 2) (set data.skip_bad_records=true to skip such records)")
    assert snapshot(prep) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "more.jsonl", "prep"]

    r = prepare(prep, f"data.train_files={corpus}", "data.eval_fraction=0", "data.seq_len=16")
    assert r.returncode == 0, r.stderr[-3000:]  # a prepared directory is replaced whole when asked to
    assert json.loads((prep / "meta.json").read_text())["seq_len"] == 16


def test_prepare_data_refuses_directories_it_did_not_write(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    corpus = data / "corpus.txt"
    corpus.write_text("one document\n\nanother document\n")
    (data / "notes.md").write_text("mine")
    before = snapshot(tmp_path)
    one_line(prepare(data, f"data.train_files={corpus}"),
             f"config error: --prepare-data: {data} holds a train file ({corpus}); writing there would "
             f"replace it (choose another path)")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.bin").write_bytes(b"x")
    before = snapshot(tmp_path)
    one_line(prepare(tmp_path / "other", f"data.train_files={corpus}"),
             f"config error: --prepare-data: {tmp_path / 'other'} is a non-empty directory and holds no meta.json (it "
             f"is not a prepared data directory); refusing to replace it (choose another path or remove it yourself)")
    assert snapshot(tmp_path) == before
