"""The Grain input pipeline (glm_jax/train/pipeline.py) against the plain-numpy builders and loader it replaced
(tests/reference_data.py): the same arrays, the same batches, exact resume through a JSON state, per-process
rows, worker processes, Parquet / datasets."""

import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from glm_jax.tokenizers import ChatGLMTokenizer
from glm_jax.train import data as D
from glm_jax.train import pipeline as P
import reference_data as R


@pytest.fixture(scope="module")
def tok():
    return ChatGLMTokenizer()


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same_batches(xs, ys) -> bool:
    return len(xs) == len(ys) and all(same(x, y) for x, y in zip(xs, ys))


@pytest.fixture(scope="module")
def prepared(tok, tmp_path_factory):
    """A prepared directory (train.py --prepare-data) of the first 60k tokens of the shipped corpus."""
    out = tmp_path_factory.mktemp("prep")
    files = R.expand_files(["data/corpus/*.txt"])
    docs = R.PretrainDocuments(files, tok, "paragraph", D.BadRecords(), max_tokens=60_000)
    n = D.prepare_pretrain(docs, 64, tok.pad_token_id, out, "train", progress=False)
    (out / D.PREPARED_META).write_text(json.dumps({"seq_len": 64, "vocab_size": tok.vocab_size,
                                                   "rows": {"train": n}}))
    return D.open_prepared(out, "train", 64, tok.vocab_size)


# ------------------------------------------------------------------------------------------------ the arrays

def test_pretrain_rows_equal_the_builders(tok, tmp_path):
    corpus = R.expand_files(["data/corpus/*.txt"])
    ref = R.build_pretrain(corpus, tok, 128, "paragraph", D.BadRecords())
    assert ref["input_ids"].shape[0] > 7000
    assert same(P.build_pretrain(corpus, tok, 128, "paragraph", D.BadRecords()), ref)
    docs = [p for p in corpus if p.name == "python_docs_en.txt"]
    for split, max_tokens in (("line", 3000), ("file", 20_000)):  # max_tokens cuts a document mid-row
        assert same(P.build_pretrain(docs, tok, 64, split, D.BadRecords(), max_tokens=max_tokens),
                    R.build_pretrain(docs, tok, 64, split, D.BadRecords(), max_tokens=max_tokens)), split
    j = tmp_path / "docs.jsonl"
    j.write_text("".join(json.dumps({"body": t}) + "\n" for t in ["one doc", "  ", "a second, longer document " * 9]))
    assert same(P.build_pretrain([j], tok, 16, "paragraph", D.BadRecords(), text_key="body"),
                R.build_pretrain([j], tok, 16, "paragraph", D.BadRecords(), text_key="body"))


def test_prepare_data_documents_equal_the_builders(tok, tmp_path):
    """--prepare-data streams packed rows to disk from PretrainDocuments: the same files from both."""
    files = R.expand_files(["data/corpus/*.txt"])
    out = {}
    for name, documents in (("data", R.PretrainDocuments), ("grain", P.PretrainDocuments)):
        docs = documents(files, tok, "paragraph", D.BadRecords(), max_tokens=30_000)
        n = D.prepare_pretrain(docs, 64, tok.pad_token_id, tmp_path / name, "train", progress=False)
        out[name] = (n, docs.tokens, *((tmp_path / name / f"train.{k}.bin").read_bytes()
                                       for k in ("tokens", "segments")))
    assert out["grain"] == out["data"] and out["data"][1] == 30_000


def test_sft_and_classification_equal_the_builders(tok):
    sft = R.expand_files(["data/sft/*.jsonl"])
    for seq_len in (64, 512):  # 64: conversations truncated and some dropped
        ref, ref_stats = R.build_sft(sft, tok, seq_len, D.BadRecords())
        got, stats = P.build_sft(sft, tok, seq_len, D.BadRecords())
        assert same(got, ref) and stats == ref_stats, seq_len
    assert ref_stats["conversations"] > 100
    cls = R.expand_files(["data/classification/*.jsonl"])
    assert same(P.build_classification(cls, tok, 64, 2, D.BadRecords()),
                R.build_classification(cls, tok, 64, 2, D.BadRecords()))


def test_bad_records_are_named_and_skipped_as_by_the_builders(tok, tmp_path):
    good = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"conversations": [{"role": "bot", "content": "x"}]})
                 + "\n" + json.dumps(good) + "\n")
    with pytest.raises(D.DataError, match=rf"^{f}:2: not valid JSON"):
        P.build_sft([f], tok, 64, D.BadRecords())
    bad, ref_bad = D.BadRecords(skip=True), D.BadRecords(skip=True)
    assert same(P.build_sft([f], tok, 64, bad)[0], R.build_sft([f], tok, 64, ref_bad)[0])
    assert bad.count == 2 and bad.examples == ref_bad.examples

    c = tmp_path / "cls.jsonl"
    c.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 7}\n')
    with pytest.raises(D.DataError, match=rf"^{c}:2: label 7 is outside"):
        P.build_classification([c], tok, 16, 2, D.BadRecords())

    j = tmp_path / "pre.jsonl"
    j.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    with pytest.raises(D.DataError, match=rf"^{j}:2: expected an object with a string field 'text'"):
        P.build_pretrain([j], tok, 16, "paragraph", D.BadRecords())
    t = tmp_path / "latin1.txt"
    t.write_bytes(b"ok line\n\xff\xfe broken\n")
    with pytest.raises(D.DataError, match=rf"^{t}:2: not valid UTF-8"):
        P.build_pretrain([t], tok, 16, "paragraph", D.BadRecords())
    e = tmp_path / "empty.jsonl"
    e.write_text("\n")
    with pytest.raises(D.DataError, match="no examples"):
        P.build_sft([e], tok, 16, D.BadRecords())


def test_sources_are_named_by_path(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(D.DataError, match=r"plain:0: not a file \(a directory\?\)"):
        P.expand_sources([str(tmp_path / "plain")])
    with pytest.raises(D.DataError, match=r"nope\.txt:0: no such file"):
        P.expand_sources([str(tmp_path / "nope.txt")])
    dd = tmp_path / "dd"
    (dd / "train").mkdir(parents=True)
    (dd / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(D.DataError, match=rf"^{dd}:0: a Hugging Face DatasetDict: name one of its splits, e.g. "
                                          rf"{dd / 'train'}"):
        P.expand_sources([str(dd)])
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "state.json").write_text("{}")
    (hf / "dataset_info.json").write_text("{}")
    assert P.expand_sources([str(hf), "data/sft/*.jsonl"])[0] == hf
    assert [P.source_format(p, documents=True) for p in (hf, tmp_path / "a.parquet", tmp_path / "a.jsonl",
                                                         tmp_path / "a.txt")] == ["hf", "parquet", "jsonl", "text"]
    assert P.source_format(tmp_path / "a.txt", documents=False) == "jsonl"  # sft / classification: JSONL always


def test_missing_optional_readers_are_one_line_errors(tok, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow.parquet -> ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1")
    with pytest.raises(D.DataError, match=rf"^{pq}:0: reading Parquet needs pyarrow \(pip install pyarrow\)$"):
        P.build_sft([pq], tok, 16, D.BadRecords())
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "state.json").write_text("{}")
    (hf / "dataset_info.json").write_text("{}")
    with pytest.raises(D.DataError, match=rf"^{hf}:0: a Hugging Face dataset directory; reading it needs the "
                                          r"datasets package \(pip install datasets\)$"):
        P.build_classification([hf], tok, 16, 2, D.BadRecords())


def test_parquet_sources_equal_jsonl(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in open("data/sft/train.jsonl") if line.strip()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "sft.parquet")  # structs: absent fields come back None
    ref, ref_stats = R.build_sft([Path("data/sft/train.jsonl")], tok, 256, D.BadRecords())
    got, stats = P.build_sft(P.expand_sources([str(tmp_path / "*.parquet")]), tok, 256, D.BadRecords())
    assert same(got, ref) and stats == ref_stats
    docs = [{"text": t} for t in open("data/corpus/python_docs_en.txt").read().split("\n\n")[:300]]
    pq.write_table(pa.Table.from_pylist(docs + [{"text": None}]), tmp_path / "pre.parquet")
    jl = tmp_path / "pre.jsonl"
    jl.write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert same(P.build_pretrain([tmp_path / "pre.parquet"], tok, 64, "paragraph", D.BadRecords(skip=True)),
                R.build_pretrain([jl], tok, 64, "paragraph", D.BadRecords()))
    with pytest.raises(D.DataError, match=rf"^{tmp_path / 'pre.parquet'}:301: expected an object with a string"):
        P.build_pretrain([tmp_path / "pre.parquet"], tok, 64, "paragraph", D.BadRecords())


def test_hf_dataset_directories_equal_jsonl(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in open("data/classification/train.jsonl") if line.strip()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "cls"))
    with pytest.raises(D.DataError, match="DatasetDict: name one of its splits"):
        P.expand_sources([str(tmp_path / "cls")])
    got = P.build_classification(P.expand_sources([str(tmp_path / "cls" / "train")]), tok, 64, 2, D.BadRecords())
    assert same(got, R.build_classification([Path("data/classification/train.jsonl")], tok, 64, 2,
                                            D.BadRecords()))


# ------------------------------------------------------------------------------------------------ the loader

def _arrays(n=10):
    return {"x": np.arange(n * 2).reshape(n, 2), "y": np.arange(n, dtype=np.int32)}


def test_loader_gives_the_reference_loader_batches(prepared):
    # in memory, a batch larger than the data (several epochs in one batch) and one that is not
    for n, gb, ga, rows in ((10, 4, 2, None), (3, 8, 2, (1, 3)), (10, 6, 3, (0, 1))):
        ref = take(R.Loader(_arrays(n), gb, ga, seed=3, rows=rows), 9)
        assert same_batches(take(P.GrainLoader(_arrays(n), global_batch=gb, grad_accum=ga, seed=3, rows=rows), 9), ref), (n, gb, ga)
    assert not same(next(P.GrainLoader(_arrays(), global_batch=4, grad_accum=2, seed=4)), ref[0])
    # prepared rows (memory-mapped), two epochs
    n = D.num_examples(prepared)
    steps = 2 * n // 16 + 2
    ref = take(R.Loader(prepared, 16, 2, seed=1), steps)
    got = take(P.GrainLoader(prepared, global_batch=16, grad_accum=2, seed=1), steps)
    assert same_batches(got, ref) and got[0]["loss_mask"].dtype == np.float32
    g = P.GrainLoader(prepared, global_batch=16, grad_accum=2, seed=1, prefetch=3)  # a read-ahead thread: the same batches
    assert same_batches(take(g, 5), ref[:5])
    g.close()
    # the held-out split of prepared rows, as the trainer slices it
    train, _ = D.split_holdout(prepared, 0.1)
    assert same_batches(take(P.GrainLoader(train, global_batch=8, seed=2), 4), take(R.Loader(train, 8, seed=2), 4))


def test_resume_is_exact_through_a_json_state(prepared):
    ref = take(P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=5), 12)
    a = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=5, prefetch=4)  # batches read ahead are not counted as delivered
    assert same_batches(take(a, 7), ref[:7])
    state = json.loads(json.dumps(a.state()))  # what orbax's JsonSave / JsonRestore give back
    a.close()
    assert state["position"] == 7 and state["grain"]["iterator"] == {"next_index": 7}
    b = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=5)
    b.restore(state)
    assert b.position == 7 and same_batches(take(b, 5), ref[7:])
    # and twice: a restored loader's own state restores too
    c = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=5)
    c.restore(json.loads(json.dumps(b.state())))
    assert c.position == 12 and same(next(c), take(P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=5), 13)[12])
    # the old loader's checkpoints restore here, and ours there (the state keeps its keys)
    old = R.Loader(prepared, 8, 2, seed=5)
    take(old, 4)
    d = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=5)
    d.restore(json.loads(json.dumps(old.state())))
    assert same_batches(take(d, 3), ref[4:7])
    e = R.Loader(prepared, 8, 2, seed=5)
    e.restore(state)
    assert same_batches(take(e, 5), ref[7:])
    # a Grain state that does not match the position is not trusted: the position decides
    f = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=5)
    f.restore(dict(state, grain=dict(state["grain"], iterator={"next_index": 3})))
    assert same_batches(take(f, 5), ref[7:])


def test_two_processes_rows_make_the_global_batch():
    whole = take(P.GrainLoader(_arrays(), global_batch=4, grad_accum=2, seed=3), 7)
    p0 = P.GrainLoader(_arrays(), global_batch=4, grad_accum=2, seed=3, rows=(0, 1))
    p1 = P.GrainLoader(_arrays(), global_batch=4, grad_accum=2, seed=3, rows=(1, 2))
    for k in range(7):
        a, b = next(p0), next(p1)
        assert a["x"].shape == (2, 1, 2)
        assert all(np.array_equal(np.concatenate([a[n], b[n]], axis=1), whole[k][n]) for n in whole[k])
    # each process reads only its rows
    assert P.GrainLoader(_arrays(), global_batch=4, grad_accum=2, seed=3, rows=(1, 2)).indices(0).shape == (2, 1)


def test_prepared_rows_pickle_as_paths(prepared):
    blob = pickle.dumps(prepared)
    assert len(blob) < 2000  # the files' paths, not their rows
    back = pickle.loads(blob)
    idx = np.array([[3, 1], [0, 7]])
    assert same(back["input_ids"].rows[idx], prepared["input_ids"].rows[idx])
    tail = pickle.loads(pickle.dumps(D.split_holdout(prepared, 0.25)[1]))  # a slice of the files' rows
    n, k = D.num_examples(prepared), D.num_examples(tail)
    assert 0 < k < n and len(pickle.dumps(tail)) < 2000
    assert np.array_equal(tail["targets"][np.array([0, 1])], prepared["targets"][np.array([n - k, n - k + 1])])


def test_worker_processes_give_the_same_batches_and_resume(prepared):
    t = time.perf_counter()
    ref = take(P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=7), 14)
    w = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=7, workers=2)
    try:
        assert same_batches(take(w, 9), ref[:9])
        state = json.loads(json.dumps(w.state()))
        assert state["grain"]["workers"] == 2
    finally:
        w.close()
    r = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=7, workers=2)
    try:
        r.restore(state)  # Grain's own multi-worker iterator state
        assert r._it is not None and r._start == 0  # set through Grain's set_state, not from the position
        assert same_batches(take(r, 5), ref[9:])
    finally:
        r.close()
    s = P.GrainLoader(prepared, global_batch=8, grad_accum=2, seed=7)  # a run resumed with workers=0
    s.restore(state)
    assert same_batches(take(s, 5), ref[9:])
    assert time.perf_counter() - t < 60


def test_config_keys_are_checked():
    from glm_jax.train.config import ConfigError, load_config

    cfg = load_config("configs/tiny.yaml", ["data.workers=2", "data.prefetch=1"], check_paths=False)
    assert (cfg.data.workers, cfg.data.prefetch) == (2, 1)
    assert load_config("configs/tiny.yaml", [], check_paths=False).data.workers == 0
    with pytest.raises(ConfigError, match=r"^data.workers: must be in \[0, 256\], got -1"):
        load_config("configs/tiny.yaml", ["data.workers=-1"], check_paths=False)
