"""Knowledge bases (glm_jax/knowledge): passages keep to the token budget, overlap and keep their place; Chinese is
segmented into words; BM25 over the shipped bilingual knowledge base finds the passage that answers each
question (recall guarded at its measured level); the index round-trips through its directory and the CLI; bad
input is one line, exit 2, and nothing that is not an index is replaced."""

import json

import pytest

from glm_jax.knowledge import KnowledgeIndex, chars, read_passages, read_questions, recall, words
from glm_jax.knowledge.__main__ import main
from glm_jax.tokenizers import SentencePieceTokenizer
from test_train_run import ROOT

KB = ROOT / "data" / "knowledge"


@pytest.fixture(scope="module")
def shipped():
    return KnowledgeIndex.build(read_passages(KB / "docs")), read_questions(KB / "questions.jsonl")


def test_passages_keep_the_budget_overlap_and_their_place(tmp_path):
    tok = SentencePieceTokenizer()
    count = lambda t: len(tok.encode(t, add_special_tokens=False))  # noqa: E731
    sentences = [f"Sentence number {i} talks about topic {i % 7} in a few words." for i in range(60)]
    (tmp_path / "long.md").write_text("# Book\n\nIntro line.\n\n## Part one\n\n" + " ".join(sentences[:30]) +
                                      "\n\n" + " ".join(sentences[30:]) + "\n")
    (tmp_path / "facts.jsonl").write_text(json.dumps({"title": "水", "text": "水在一百度沸腾。\n\n冰在零度融化。"},
                                                     ensure_ascii=False) + "\n")
    passages = read_passages(tmp_path, tokenizer=tok, max_tokens=96, overlap=40)
    long = [p for p in passages if p.source == "long.md"]
    assert long[0].headings == ("Book",) and long[0].text == "Intro line." and long[0].location == "lines 3-3"
    body = long[1:]
    assert all(p.headings == ("Book", "Part one") for p in body) and len(body) > 3
    assert all(count(p.text) <= 96 for p in body)
    for a, b in zip(body, body[1:]):  # each passage starts with the end of the one before
        assert b.text.split(". ")[0].rstrip(".") in a.text
    assert all(any(s in p.text for p in body) for s in sentences)  # nothing lost
    assert body[0].location == "lines 7-7" and body[-1].location.endswith("-9")
    (fact,) = [p for p in passages if p.source == "facts.jsonl"]
    assert fact.title == "水" and fact.text == "水在一百度沸腾。冰在零度融化。" and fact.location == "record 1"


def test_chinese_is_segmented_into_words():
    assert "布达拉宫" in words("布达拉宫建在哪里？") and "哪里" not in words("布达拉宫建在哪里？")
    assert words("Which planet has the Great Red Spot?") == ["planet", "great", "red", "spot"]
    assert chars("布达拉宫") == ["布", "达", "拉", "宫"]


def test_bm25_finds_the_answering_passage_of_the_shipped_questions(shipped):
    """106 questions (30 English, 76 Chinese) over the 67 passages of data/knowledge/docs. Measured 2026-12-04:
    recall@1 0.972, recall@5 0.991; Chinese with jieba's words 0.987 / 1.0 (MRR 0.993), with single characters
    0.974 / 1.0 (MRR 0.987): a word the characters of which are common elsewhere (钱塘江大潮: 钱塘江, 大潮) is
    found by its word (docs/knowledge.md)."""
    index, questions = shipped
    assert len(index) == 67 and len(questions) == 106
    measured = recall(index, questions, ks=(1, 5))
    assert measured["recall@1"] >= 0.96 and measured["recall@5"] >= 0.99, measured
    chinese = [q for q in questions if q["source"].startswith("zh/")]
    by_words = recall(index, chinese, ks=(1, 5))
    by_chars = recall(KnowledgeIndex.build(index.passages, segmenter="chars"), chinese, ks=(1, 5))
    assert by_words["recall@1"] >= 0.98 and by_words["recall@5"] == 1.0, by_words
    assert by_words["recall@1"] > by_chars["recall@1"] and by_words["mrr@5"] > by_chars["mrr@5"], (by_words, by_chars)
    tide = "钱塘江大潮什么时候最壮观？"
    assert index.search(tide, k=1)[0].passage.title == "潮汐"
    assert KnowledgeIndex.build(index.passages, segmenter="chars").search(tide, k=1)[0].passage.title == "钱塘江"
    top = index.search("布达拉宫建在哪里？", k=3)[0]
    assert top.passage.source == "zh/cities.md" and top.passage.title == "拉萨" and top.rank == 1


def test_the_index_round_trips_through_the_cli(tmp_path, capsys):
    out = tmp_path / "index"
    assert main(["index", "--docs", str(KB / "docs"), "--out", str(out), "--max-tokens", "128"]) == 0
    assert "indexed 67 passages" in capsys.readouterr().out
    loaded = KnowledgeIndex.load(out)
    built = KnowledgeIndex.build(read_passages(KB / "docs", max_tokens=128))
    for q in ("Which planet has rings?", "三峡大坝建在哪条河上？"):
        ours, theirs = loaded.search(q), built.search(q)
        assert [h.passage for h in ours] == [h.passage for h in theirs]
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs])
    assert main(["search", str(out), "三峡大坝建在哪条河上？", "-k", "2", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["headings"] == ["中国的江河", "长江"]
    assert main(["eval", str(out), "--questions", str(KB / "questions.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["recall@5"] >= 0.99
    assert main(["index", "--docs", str(KB / "docs" / "en"), "--out", str(out)]) == 0  # an index is replaced
    assert len(KnowledgeIndex.load(out)) == 27


def test_the_cli_starts_on_the_cpu_where_no_accelerator_is(tmp_path):
    """bm25s starts JAX's backends when imported: the CLI first picks the platform as the chat CLI does
    (glm_jax.platforms.skip_absent_tpu), so that a machine with libtpu installed but no TPU says nothing."""
    import os
    import subprocess
    import sys

    KnowledgeIndex.build(read_passages(KB / "docs" / "en")).save(tmp_path / "index")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, "-m", "glm_jax.knowledge", "search", str(tmp_path / "index"), "rings", "-k",
                        "1"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith("1. [") and r.stderr == "", r.stderr[-2000:]


def test_bad_input_is_one_line_and_nothing_else_is_replaced(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "x"}\n')
    assert main(["index", "--docs", str(KB / "docs"), "--out", str(mine)]) == 2
    assert main(["index", "--docs", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert main(["index", "--docs", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert main(["search", str(mine), "x"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines()]
    assert len(err) == 4 and all(line.startswith("error: ") for line in err), err
    assert "holds files that are not a knowledge index" in err[0] and "nope" in err[1]
    assert "bad.jsonl:1" in err[2] and "not a knowledge index" in err[3]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_embed_pools_each_texts_final_hidden_states(pooling):
    """embed() over right-padded, bucketed batches equals pooling each text's own unpadded forward pass (the
    final normed hidden states; "last": the last token's, "mean": the average), L2-normalised; strings get the
    end-of-text id appended; one compiled program per (rows, bucket) shape."""
    import jax
    import numpy as np

    from glm_jax import GLMConfig, GLMForCausalLM, init_params
    from glm_jax.knowledge.embeddings import _embed_batch, embed

    cfg = GLMConfig.from_preset("glm-test", vocab_size=8192)
    model = GLMForCausalLM(cfg)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    texts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 7, 12, 5, 20, 9)]
    before = _embed_batch._cache_size()
    got = embed(model, params, texts, pooling=pooling, batch_size=4)
    assert _embed_batch._cache_size() - before <= 3  # (4 rows, 8), (2 rows, 16), (2 rows, 32) at most
    for ids, vector in zip(texts, got):
        hidden = np.asarray(model.apply({"params": params}, np.asarray([ids]), return_hidden=True)[0], np.float64)
        expected = hidden[-1] if pooling == "last" else hidden.mean(0)
        np.testing.assert_allclose(vector, expected / np.linalg.norm(expected), atol=2e-5)
    tok = SentencePieceTokenizer()
    text = "布达拉宫建在哪里？"
    np.testing.assert_allclose(embed(model, params, [text], tokenizer=tok, pooling=pooling)[0],
                               embed(model, params, [tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]],
                                     pooling=pooling)[0], atol=1e-6)


@pytest.fixture(scope="module")
def embedding_model(tmp_path_factory):
    """A random glm-test (the shipped tokenizer's vocabulary) saved in the transformers format."""
    import jax

    from glm_jax import GLMConfig, GLMForCausalLM, init_params, save_hf

    cfg = GLMConfig.from_preset("glm-test", vocab_size=8192, max_seq_len=1024)
    return save_hf(cfg, init_params(GLMForCausalLM(cfg), jax.random.key(3)), tmp_path_factory.mktemp("emb") / "m",
                   format="transformers")


def test_dense_and_hybrid_search_round_trip_with_their_embedding_model(embedding_model, tmp_path, capsys):
    """An index built with an embedding model: "dense" ranks by the cosine of embed() vectors (a passage's own
    indexed text finds it first, similarity 1), "hybrid" is reciprocal rank fusion of the BM25 and dense ranks
    (recomputed here from the two rankings); the saved index reloads its model and searches the same; without
    the model where the index says, one error line."""
    import numpy as np

    from glm_jax.knowledge import Embedder
    from glm_jax.knowledge.index import indexed_text

    passages = read_passages(KB / "docs" / "zh")
    index = KnowledgeIndex.build(passages, embedder=Embedder.load(embedding_model))
    target = passages[7]
    top = index.search(indexed_text(target), k=3, mode="dense")[0]
    assert top.passage == target and top.score == pytest.approx(1.0, abs=1e-4)
    query = "三峡大坝建在哪条河上？"
    lexical, dense = index.scores(query), index.similarities(query)
    ranks = lambda s, keep: {i: r for r, i in enumerate([i for i in np.argsort(-s, kind="stable") if keep[i]], 1)}  # noqa: E731
    fused = {i: 0.0 for i in range(len(passages))}
    for rank in (ranks(lexical, lexical > 0), ranks(dense, np.ones(len(dense), bool))):
        for i, r in rank.items():
            fused[i] += 1 / (60 + r)
    hybrid = index.search(query, k=5)  # the default mode with embeddings
    assert [h.score for h in hybrid] == pytest.approx(sorted(fused.values(), reverse=True)[:5])
    out = tmp_path / "index"
    assert main(["index", "--docs", str(KB / "docs" / "zh"), "--out", str(out), "--embedding-model",
                 str(embedding_model)]) == 0
    loaded = KnowledgeIndex.load(out)
    assert [h.passage for h in loaded.search(query, k=5)] == [h.passage for h in hybrid]
    np.testing.assert_allclose(loaded.vectors, index.vectors, atol=1e-5)
    moved = tmp_path / "moved"
    embedding_model.rename(moved)
    capsys.readouterr()
    assert main(["search", str(out), query]) == 2
    assert "its embedding model" in capsys.readouterr().err
    assert main(["search", str(out), query, "--embedding-model", str(moved), "--mode", "dense", "-k", "1"]) == 0
    moved.rename(embedding_model)


def test_a_grounded_chat_turn_holds_the_passages_and_returns_their_sources(embedding_model, shipped, tmp_path,
                                                                             monkeypatch, capsys):
    """ChatSession(knowledge=index): each user turn's retrieved passages enter the prompt before the question (a
    system message in ChatGLM3's format, the head of the user message in ChatGLM2's, which has no system role),
    the reply carries them as "sources", numbered as in the prompt; tool results are not looked up; the chat CLI
    with --knowledge lists the sources after the reply."""
    import io

    from glm_jax import GLMForCausalLM
    from glm_jax.chat import ChatSession, main as chat_main
    from glm_jax.checkpoints import load_checkpoint
    from glm_jax.knowledge import grounded_messages
    from glm_jax.tokenizers import ChatGLM2Tokenizer

    index, _ = shipped
    cfg, params = load_checkpoint(embedding_model)
    question = "布达拉宫建在哪里？"
    hits = index.search(question, k=2)
    tok = SentencePieceTokenizer()
    session = ChatSession(GLMForCausalLM(cfg), params, tok, system="你是助手。", knowledge=index, knowledge_k=2,
                          max_new_tokens=2, temperature=0.0)
    reply = session.send(question)
    assert [s["rank"] for s in reply["sources"]] == [1, 2]
    assert [s["text"] for s in reply["sources"]] == [h.passage.text for h in hits]
    assert reply["sources"][0]["headings"][-1] == "拉萨"
    knowledge, asked = session.history[1:3]
    assert knowledge["role"] == "system" and asked == {"role": "user", "content": question}
    assert knowledge["content"].startswith("参考资料：\n\n[1] zh/cities.md > ")
    assert hits[1].passage.text in knowledge["content"]
    prompt = tok.decode(session.last_prompt)
    assert prompt.index(hits[0].passage.text) < prompt.index(question)
    assert tok.apply_chat_template(session.history[:3], add_generation_prompt=True) == session.last_prompt

    # where the prompt would leave less than max_new_tokens of the context, the worst hits are left out
    one, two = (len(tok.apply_chat_template(session.history[:1] + grounded_messages(tok, question, hits[:n])))
                for n in (1, 2))
    tight = ChatSession(GLMForCausalLM(cfg), params, tok, system="你是助手。", knowledge=index, knowledge_k=2,
                        max_new_tokens=cfg.max_seq_len - two + 1)
    turn = tight._turn_messages(question, "user")
    assert [s["rank"] for s in tight.last_sources] == [1] and hits[1].passage.text not in turn[0]["content"]
    assert len(tight.prompt(turn)) == one <= cfg.max_seq_len - tight.sampling["max_new_tokens"]

    old = ChatGLM2Tokenizer()
    v2 = ChatSession(GLMForCausalLM(cfg), params, old, knowledge=index, knowledge_k=1, max_new_tokens=2)
    reply = v2.send("Which planet has the Great Red Spot?")
    (turn,) = v2.history[:1]
    assert turn["role"] == "user" and turn["content"].startswith("Reference passages:\n\n[1] en/planets.md > ")
    assert turn["content"].endswith("\n\nWhich planet has the Great Red Spot?") and len(reply["sources"]) == 1
    assert "[Round 1]\n\n问：Reference passages:" in old.decode(v2.last_prompt)

    cli_index = index.save(tmp_path / "index")
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n/exit\n"))
    assert chat_main(["--checkpoint", str(embedding_model), "--knowledge", str(cli_index), "--knowledge-k", "2",
                      "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert f"\n[1] {hits[0].passage.citation}\n[2] {hits[1].passage.citation}\n" in capsys.readouterr().out


def test_grounded_sft_records_train_on_the_passages_chat_would_retrieve(shipped, tmp_path, capsys):
    """`python -m glm_jax.knowledge sft`: each (question, answer) becomes an SFT conversation grounded exactly as
    ChatSession(knowledge=...) grounds the question, then the answer; train.py's SFT reader takes the records
    (the answer is the only target); an existing --out is not overwritten."""
    from glm_jax.chat import ChatSession
    from glm_jax.train.data import encode_sft_record

    index, _ = shipped
    out = tmp_path / "index"
    index.save(out)
    qa = tmp_path / "qa.jsonl"
    pairs = [{"question": "布达拉宫建在哪里？", "answer": "拉萨的红山上。"},
             {"question": "Which planet has the Great Red Spot?", "answer": "Jupiter."}]
    qa.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    sft = tmp_path / "sft.jsonl"
    assert main(["sft", str(out), "--qa", str(qa), "--out", str(sft), "-k", "2"]) == 0
    records = [json.loads(line) for line in sft.read_text().splitlines()]
    tok = SentencePieceTokenizer()

    chat = ChatSession(None, None, tok, knowledge=index, knowledge_k=2)  # its turns, without generating
    for pair, record in zip(pairs, records):
        turn = chat._turn_messages(pair["question"], "user")
        assert record["messages"] == [*turn, {"role": "assistant", "content": pair["answer"]}]
        assert [s["rank"] for s in record["sources"]] == [1, 2]
        ids, target = encode_sft_record(tok, record)
        assert tok.decode([i for i, t in zip(ids, target) if t]).strip().startswith(pair["answer"])
    assert records[0]["sources"][0]["headings"][-1] == "拉萨"
    assert main(["sft", str(out), "--qa", str(qa), "--out", str(sft)]) == 2
    assert "exists" in capsys.readouterr().err


def test_an_hnsw_graph_finds_what_exact_search_finds(embedding_model, tmp_path, capsys, monkeypatch):
    """--vector-index hnsw: the dense side searched through usearch's HNSW graph gives exact search's top 5 on
    the shipped base (67 passages: the graph is exhaustive at this size), hybrid ranks the same, the graph is
    saved beside vectors.npy and loads back; without usearch installed, one line naming the extra."""
    pytest.importorskip("usearch")
    from glm_jax.knowledge import Embedder
    from glm_jax.knowledge import index as index_module

    embedder = Embedder.load(embedding_model)
    passages = read_passages(KB / "docs")
    exact = KnowledgeIndex.build(passages, embedder=embedder)
    graph = KnowledgeIndex.build(passages, embedder=embedder, vector_index="hnsw")
    for q in ("三峡大坝建在哪条河上？", "Which planet has rings?", "钱塘江大潮什么时候最壮观？"):
        for mode in ("dense", "hybrid"):
            ours, theirs = graph.search(q, k=5, mode=mode), exact.search(q, k=5, mode=mode)
            assert [h.passage for h in ours] == [h.passage for h in theirs], (q, mode)
            assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-5)
    out = tmp_path / "index"
    assert main(["index", "--docs", str(KB / "docs"), "--out", str(out), "--embedding-model", str(embedding_model),
                 "--vector-index", "hnsw"]) == 0
    assert (out / "vectors.usearch").stat().st_size > 0
    loaded = KnowledgeIndex.load(out, embedder=embedder)
    assert loaded.graph is not None and len(loaded.graph) == 67
    assert [h.passage for h in loaded.search("Which planet has rings?", mode="dense")] == \
        [h.passage for h in exact.search("Which planet has rings?", mode="dense")]
    monkeypatch.setattr(index_module, "HNSWGraph", None)
    capsys.readouterr()
    assert main(["search", str(out), "rings", "--embedding-model", str(embedding_model)]) == 2
    assert capsys.readouterr().err.strip() == ("error: vector index 'hnsw': needs the optional usearch package "
                                               "(pip install 'glm_jax[ann]')")


def test_an_embedding_model_from_outside_glm_jax_plugs_in(tmp_path):
    """Any callable texts -> L2-normalised [n, dim] vectors is an embedder (docs/knowledge.md, "Another embedding
    model"): here character bigrams hashed into 256 dimensions. The index searches with it, saves its vectors,
    and loads back only with it passed again; unnormalised vectors or a query vector of another width: one
    ValueError naming the embedder."""
    import zlib

    import numpy as np

    from glm_jax.knowledge.index import indexed_text

    def bigrams(texts, dim=256):
        out = np.zeros((len(texts), dim), np.float32)
        for i, t in enumerate(texts):
            for a, b in zip(t, t[1:]):
                out[i, zlib.crc32((a + b).encode()) % dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    passages = read_passages(KB / "docs" / "zh")
    index = KnowledgeIndex.build(passages, embedder=bigrams)
    top = index.search(indexed_text(passages[5]), k=1, mode="dense")[0]
    assert top.passage == passages[5] and top.score == pytest.approx(1.0, abs=1e-5)
    assert index.search("钱塘江大潮什么时候最壮观？", k=1, mode="hybrid")[0].passage.title == "潮汐"
    out = index.save(tmp_path / "index")
    with pytest.raises(ValueError, match="outside glm_jax"):
        KnowledgeIndex.load(out)
    loaded = KnowledgeIndex.load(out, embedder=bigrams)
    dense = lambda ix: [h.passage for h in ix.search("长江", mode="dense")]  # noqa: E731
    assert dense(loaded) == dense(index)
    with pytest.raises(ValueError, match="^embedder: vectors must be finite and L2-normalised"):
        KnowledgeIndex.build(passages, embedder=lambda texts: bigrams(texts) * 2)
    loaded.embedder = lambda texts: bigrams(texts, dim=128)
    with pytest.raises(ValueError, match="vector of shape \\(128,\\), the index holds vectors of width 256"):
        loaded.search("长江", mode="dense")


def tiny_pdf(pages) -> bytes:
    """A minimal PDF (one Helvetica text line per paragraph, one page per item of `pages`)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for paragraphs in pages:
        lines = []
        for i, p in enumerate(paragraphs):
            lines.append(f"BT /F1 12 Tf 72 {720 - 40 * i} Td ({p}) Tj ET")
        stream = "\n".join(lines)
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {len(objects)} 0 R >>")
        kids.append(len(objects))
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for n, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{obj}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_pdf_pages_are_passages(tmp_path, monkeypatch):
    """With the optional pypdf (the `pdf` extra): each page's text is a section whose passages say `page N`;
    without it, one ValueError naming the file and the extra."""
    pytest.importorskip("pypdf")
    (tmp_path / "planets.pdf").write_bytes(tiny_pdf([["Saturn has bright rings of ice.", "It is the sixth planet."],
                                                     ["Jupiter has a Great Red Spot."]]))
    passages = read_passages(tmp_path)
    assert [(p.text, p.location, p.headings) for p in passages] == [
        ("Saturn has bright rings of ice. It is the sixth planet.", "page 1", ("planets",)),
        ("Jupiter has a Great Red Spot.", "page 2", ("planets",))]
    assert KnowledgeIndex.build(passages).search("Which planet has the Great Red Spot?", k=1)[0].passage.location == \
        "page 2"
    monkeypatch.setitem(__import__("sys").modules, "pypdf", None)
    with pytest.raises(ValueError, match=r"planets.pdf: reading PDF needs the optional pypdf package \(pip install "
                                         r"'glm_jax\[pdf\]'\)"):
        read_passages(tmp_path)
