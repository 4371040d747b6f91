"""Bad input (issue 9, item 6): each case is one clear line on stderr naming the key, file or line, with the
documented exit code (train.py: 2, "config error: ..." / "data error: ..."; the chat CLI: 2, "error: ..."), and
no traceback. Every train.py case fails before compiling anything, most before importing the training loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glm_jax.train import data as D
from glm_jax.train import pipeline as P
from glm_jax.train.config import MAX_LR, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = ["model.preset=glm-test", "model.overrides.vocab_size=8192", "data.seq_len=32", "data.max_tokens=20000",
         "data.eval_fraction=0.05", "train.global_batch_size=8", "train.lr=1e-2", "train.warmup_steps=2",
         "train.eval_every=6", "train.eval_batches=2", "checkpoint.every=4", "checkpoint.keep=5"]
DEEP = "[" * 100000
GOOD_SFT = {"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}


def env():
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(ROOT)]
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(path))


def train(run_dir, *overrides, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, *overrides, f"run_dir={run_dir}"],
                          cwd=cwd, env=env(), capture_output=True, text=True, timeout=120)


def one_line(r, expected: str, code: int = 2) -> None:
    """Exit `code`, no traceback, and exactly one error line on stderr: `expected`, the last line."""
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == code, r.stderr[-3000:]
    prefix = expected.split(":")[0] + ":"
    errors = [line for line in r.stderr.splitlines() if line.startswith(prefix)]
    assert errors == [expected], r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == expected


# ------------------------------------------------------------------------------------- 1. empty / blank files

@pytest.mark.parametrize("content", ["", "\n   \n\n\t\n"], ids=["empty", "blank"])
def test_an_empty_or_blank_train_file_is_named(tmp_path, content):
    f = tmp_path / "train.txt"
    f.write_text(content)
    r = train(tmp_path / "run", f"data.train_files={f}")  # with data.eval_fraction=0.05: not blamed on it
    one_line(r, f"data error: {f}: no examples (the file is empty or blank)")


def test_an_empty_eval_file_is_named(tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_text("\n")
    r = train(tmp_path / "run", f"data.eval_files={f}")
    one_line(r, f"data error: {f}: no examples (the file is empty or blank)")


def test_builders_name_the_files_that_give_no_example(tmp_path):
    from glm_jax.tokenizers import ChatGLMTokenizer

    tok = ChatGLMTokenizer()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("")
    b.write_text("\n\n")
    with pytest.raises(D.DataError, match=rf"^{a}, {b}: no examples \(the files are empty or blank\)$"):
        P.build_pretrain([a, b], tok, 32, "paragraph", D.BadRecords())
    with pytest.raises(D.DataError, match=rf"^{a}: no examples"):
        P.build_sft([a], tok, 32, D.BadRecords())
    with pytest.raises(D.DataError, match=rf"^{b}: no examples"):
        P.build_classification([b], tok, 32, 2, D.BadRecords())
    b.write_text(json.dumps({"conversations": [{"role": "user", "content": "a long question " * 20},
                                               {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(D.DataError, match=rf"^{b}: no examples \(all 1 conversations were dropped: no assistant "
                                          r"token within the first data.seq_len=16 tokens\)$"):
        P.build_sft([b], tok, 16, D.BadRecords())
    with pytest.raises(D.DataError, match=rf"^{tmp_path}:0: not a file"):
        P.expand_sources([str(tmp_path)])


# ------------------------------------------------------------------------------------- 2-5. config keys and paths

def test_a_missing_tokenizer_file_names_the_key_and_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    r = train(tmp_path / "run", f"data.tokenizer={missing}")
    one_line(r, f"config error: data.tokenizer: file not found: {missing}")
    assert not (tmp_path / "run").exists()  # failed before creating anything


@pytest.mark.parametrize("override,expected", [
    ("train.seed=-1", "train.seed: must be in [0, 2147483647], got -1"),
    ("data.max_tokens=-1", "data.max_tokens: must be positive or null (no limit), got -1"),
    ("train.lr=1e39", f"train.lr: 1e+39 is not a plausible learning rate (must be at most {MAX_LR:g})"),
    ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
    ("train.lr=inf", "train.lr: must be a finite number, got 'inf'"),
])
def test_bad_values_are_config_errors_before_anything_runs(tmp_path, override, expected):
    r = train(tmp_path / "run", override)
    one_line(r, "config error: " + expected)
    assert not (tmp_path / "run").exists()


def test_run_dir_that_is_a_file_or_empty(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    one_line(train(f), f"config error: run_dir: {f} exists and is not a directory")
    one_line(train(f / "sub"), f"config error: run_dir: {f / 'sub'} cannot be created: {f} is not a directory")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = train("", f"data.train_files={ROOT / 'data' / 'corpus' / '*.txt'}", cwd=cwd)
    one_line(r, "config error: run_dir: empty path (the run directory would be the current directory)")
    assert list(cwd.iterdir()) == []  # nothing written into the current directory
    with pytest.raises(ConfigError, match=r"^run_dir: empty path"):
        load_config(TINY, ["run_dir='  '"])
    assert f.read_text() == "x"


@pytest.mark.parametrize("override,expected", [
    ("train.lr=-1", "train.lr: must be >= 0, got -1.0"),
    (f"train.lr={MAX_LR * 1.01}", f"train.lr: {MAX_LR * 1.01} is not a plausible learning rate (must be at most 10)"),
    ("train.lr=1e400", "train.lr: must be a finite number, got inf"),
    ("train.lr=-.inf", "train.lr: must be a finite number, got -inf"),
    ("train.lr=NaN", "train.lr: must be a finite number, got 'NaN'"),
    ("train.clip_norm=.inf", "train.clip_norm: must be a finite number, got inf"),
    ("train.weight_decay=.nan", "train.weight_decay: must be a finite number, got nan"),
    ("train.weight_decay=1000", "train.weight_decay: 1000.0 with train.lr=0.003 decays every weight past zero in "
                                "one step (lr * weight_decay must be below 1)"),
    ("train.warmup_steps=.inf", "train.warmup_steps: expected int, got float inf"),
    ("train.z_loss=.inf", "train.z_loss: must be a finite number, got inf"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio: must be in [0, 1], got 2.0"),
    ("train.b1=1", "train.b1: must be in [0, 1), got 1.0"),
    ("train.b2=-0.5", "train.b2: must be in [0, 1), got -0.5"),
    ("train.eps=0", "train.eps: must be positive, got 0.0"),
    ("train.eps=.nan", "train.eps: must be a finite number, got nan"),
    ("lora.alpha=.inf", "lora.alpha: must be a finite number, got inf"),
    ("lora.alpha=0", "lora.alpha: must be positive, got 0.0"),
    ("data.eval_fraction=.nan", "data.eval_fraction: must be a finite number, got nan"),
    ("train.seed=2147483648", "train.seed: must be in [0, 2147483647], got 2147483648"),
    ("train.max_skips=-1", "train.max_skips: must be >= 0, got -1"),
    ("data.max_tokens=0", "data.max_tokens: must be positive or null (no limit), got 0"),
    ("data.tokenizer=", "data.tokenizer: empty path (null for the tokenizer shipped with glm_jax)"),
    ("data.tokenizer=/", "data.tokenizer: / has no tokenizer.json, tokenizer.model or ice_text.model (expected a "
                         "tokenizer file or a checkpoint directory)"),
])
def test_non_finite_and_absurd_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert str(e.value) == expected


def test_the_boundaries_still_load(tmp_path):
    cfg = load_config(TINY, ["train.seed=2147483647", "data.max_tokens=null", "train.lr=10", "train.weight_decay=0",
                             "train.clip_norm=null", f"run_dir={tmp_path}", "data.tokenizer=null"])
    assert cfg.train.lr == 10 and cfg.data.max_tokens is None
    tok = ROOT / "glm_jax" / "assets" / "tokenizer.model"
    assert load_config(TINY, [f"data.tokenizer={tok}"]).data.tokenizer == str(tok)
    ckpt = tmp_path / "ckpt"  # a checkpoint directory holding a tokenizer file
    ckpt.mkdir()
    (ckpt / "tokenizer.model").write_bytes(tok.read_bytes())
    assert load_config(TINY, [f"data.tokenizer={ckpt}"]).data.tokenizer == str(ckpt)
    # a run's saved config is readable without its paths (e.g. a tokenizer not on this machine)
    assert load_config(TINY, ["data.tokenizer=/nope.model", "run_dir="], check_paths=False).run_dir == ""


def test_a_data_error_is_the_only_line_without_jax_platforms_set(tmp_path):
    """With libtpu installed (the test extra) and no TPU here, jax used to start libtpu, which printed about five
    lines before the error; train.py now leaves TPU out when nothing says one is attached."""
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a"}\n{bad\n')
    no_platforms = {k: v for k, v in env().items() if k != "JAX_PLATFORMS"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL, f"data.train_files={f}",
                        f"run_dir={tmp_path / 'run'}"], cwd=ROOT, env=no_platforms, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"data error: {f}:2: not valid JSON (Expecting property name enclosed in double quotes at column 2) (set "
        f"data.skip_bad_records=true to skip such records)"], r.stderr[-3000:]


def test_config_naming_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value) == f"--config: {tmp_path} is a directory, not a YAML file"


# ------------------------------------------------------------------------------------- 6-7. bad records

def test_deeply_nested_json_is_a_bad_record(tmp_path):
    f = tmp_path / "deep.jsonl"
    f.write_text(json.dumps({"text": "one good document"}) + "\n" + DEEP + "\n")
    r = train(tmp_path / "run", f"data.train_files={f}")
    one_line(r, f"data error: {f}:2: JSON nested too deeply (set data.skip_bad_records=true to skip such records)")
    # skipped with skip_bad_records: nothing good left here, which is then the error, naming the file
    f.write_text(DEEP + "\n")
    r = train(tmp_path / "run", f"data.train_files={f}", "data.skip_bad_records=true")
    assert f"skipping bad record {f}:1: JSON nested too deeply" in r.stderr
    one_line(r, f"data error: {f}: no examples (1 bad record(s) skipped, no good one left)")


def test_deeply_nested_json_is_skipped_by_every_builder(tmp_path):
    from glm_jax.tokenizers import ChatGLMTokenizer

    tok = ChatGLMTokenizer()
    f = tmp_path / "pre.jsonl"
    f.write_text(DEEP + "\n" + json.dumps({"text": "one good document"}) + "\n" + '{"a": ' * 5000 + "\n")
    bad = D.BadRecords(skip=True)
    arrays = P.build_pretrain([f], tok, 16, "paragraph", bad)
    assert len(arrays["input_ids"]) == 1 and bad.count == 2
    assert bad.examples == [f"{f}:1: JSON nested too deeply", f"{f}:3: JSON nested too deeply"]
    s = tmp_path / "sft.jsonl"
    s.write_text(DEEP + "\n" + json.dumps(GOOD_SFT) + "\n")
    bad = D.BadRecords(skip=True)
    arrays, _ = P.build_sft([s], tok, 32, bad)
    assert len(arrays["input_ids"]) == 1 and bad.examples == [f"{s}:1: JSON nested too deeply"]
    with pytest.raises(D.DataError, match=rf"^{s}:1: JSON nested too deeply \(set data.skip_bad_records"):
        P.build_classification([s], tok, 32, 2, D.BadRecords())


@pytest.mark.parametrize("tools,where,why", [
    (5, "tools", "must be a list of tool objects, got int 5"),
    ({"name": "f"}, "tools", "must be a list of tool objects, got dict {'name': 'f'}"),
    ([{"name": "f"}, "g"], "tools[1]", "must be a tool object, got str 'g'"),
])
def test_sft_tools_must_be_a_list_of_objects(tmp_path, tools, where, why):
    from glm_jax.tokenizers import ChatGLMTokenizer

    tok = ChatGLMTokenizer()
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps(GOOD_SFT) + "\n" + json.dumps({**GOOD_SFT, "tools": tools}) + "\n")
    with pytest.raises(D.DataError) as e:
        P.build_sft([f], tok, 64, D.BadRecords())
    assert str(e.value) == f"{f}:2: {where}: {why} (set data.skip_bad_records=true to skip such records)"
    bad = D.BadRecords(skip=True)
    arrays, _ = P.build_sft([f], tok, 64, bad)
    assert len(arrays["input_ids"]) == 1 and bad.examples == [f"{f}:2: {where}: {why}"]


def test_sft_tools_in_a_system_message_and_valid_tools(tmp_path):
    conv = [{"role": "system", "content": "s", "tools": 5}] + GOOD_SFT["conversations"]
    with pytest.raises(ValueError, match=r"^message 0: tools: must be a list of tool objects, got int 5$"):
        D.check_conversation({"conversations": conv})
    tools = [{"name": "get_weather", "parameters": {}}]
    assert D.check_conversation({**GOOD_SFT, "tools": tools})[1] == tools
    assert D.check_conversation({**GOOD_SFT, "tools": None})[1] is None
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({**GOOD_SFT, "tools": 5}) + "\n")
    r = train(tmp_path / "run", "data.task=sft", f"data.train_files={f}", "data.eval_fraction=0")
    one_line(r, f"data error: {f}:1: tools: must be a list of tool objects, got int 5 "
                f"(set data.skip_bad_records=true to skip such records)")


# ------------------------------------------------------------------------------------- 8. broken config.json

@pytest.mark.parametrize("text,why", [
    ('{"model_type": "chatglm",\n', "not valid JSON (Expecting property name enclosed in double quotes at line 2 "
                                    "column 1)"),
    ("", "not valid JSON (Expecting value at line 1 column 1)"),
    ("[1, 2]", "expected a JSON object at the top level, got list"),
    (b"\xff\xfe{", None),
])
def test_a_broken_checkpoint_config_json_is_one_clear_error(tmp_path, text, why):
    from glm_jax import GLMConfig, load_hf
    from glm_jax.convert.hf import detect_format

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    cfg_file = ckpt / "config.json"
    (cfg_file.write_bytes if isinstance(text, bytes) else cfg_file.write_text)(text)
    msg = f"{cfg_file}: {why}" if why else f"{cfg_file}: not valid JSON"
    for call in (lambda: GLMConfig.from_hf(ckpt), lambda: GLMConfig.from_hf(cfg_file), lambda: detect_format(ckpt),
                 lambda: load_hf(ckpt)):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)
        assert type(e.value) is ValueError  # not a bare JSONDecodeError / UnicodeDecodeError


def test_init_from_with_a_broken_config_json(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "chatglm",\n')
    r = train(tmp_path / "run", f"model.init_from={ckpt}")
    one_line(r, f"config error: model.init_from: {ckpt / 'config.json'}: not valid JSON (Expecting property name "
                f"enclosed in double quotes at line 2 column 1)")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A transformers-format checkpoint of the model SMALL trains (glm-test, vocab 8192) and its tensors."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from safetensors.numpy import load_file

    from glm_jax import GLMConfig, GLMForCausalLM, save_hf

    cfg = GLMConfig.from_preset("glm-test", vocab_size=8192)
    params = nn.unbox(GLMForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    ckpt = tmp_path_factory.mktemp("ckpt")
    save_hf(cfg, params, ckpt)
    return ckpt, load_file(ckpt / "model.safetensors")


def damaged_copy(tiny_checkpoint, out: Path, how: str) -> Path:
    import shutil

    from safetensors.numpy import save_file

    ckpt, tensors = tiny_checkpoint
    shutil.copytree(ckpt, out)
    st = out / "model.safetensors"
    name = sorted(tensors)[3]  # model.layers.0.mlp.down_proj.weight
    if how == "truncated":
        st.write_bytes(st.read_bytes()[:2_000_000])
    elif how == "missing tensor":
        save_file({k: v for k, v in tensors.items() if k != name}, st, metadata={"format": "pt"})
    elif how == "wrong shape":
        save_file({**tensors, name: tensors[name][:3, :3]}, st, metadata={"format": "pt"})
    elif how == "unreadable bin":
        st.unlink()
        (out / "pytorch_model.bin").write_bytes(b"not a torch.save archive" * 10)
    return out


@pytest.mark.parametrize("how,why", [
    ("truncated", "{ckpt}/model.safetensors: unreadable safetensors file (Error while deserializing header: "
                  "incomplete metadata, file not fully covered)"),
    ("missing tensor", "{ckpt}: tensor 'model.layers.0.mlp.down_proj.weight' not found in the checkpoint"),
])
def test_a_damaged_init_from_checkpoint_is_a_config_error(tmp_path, tiny_checkpoint, how, why):
    ckpt = damaged_copy(tiny_checkpoint, tmp_path / "ckpt", how)
    r = train(tmp_path / "run", f"model.init_from={ckpt}", "train.steps=1")
    one_line(r, "config error: model.init_from: " + why.format(ckpt=ckpt))


@pytest.mark.parametrize("how,why", [
    ("wrong shape", "{ckpt}/model.safetensors: tensor 'model.layers.0.mlp.down_proj.weight' has shape (3, 3), "
                    "expected (64, 160) for this config"),
    ("unreadable bin", "{ckpt}/pytorch_model.bin: unreadable PyTorch checkpoint (not the zip archive torch.save "
                       "writes: truncated, or another format)"),
])
def test_load_hf_names_the_damaged_file_and_tensor(tmp_path, tiny_checkpoint, how, why):
    """What train.py turns into `config error: model.init_from: ...` (the two cases above run it end to end)."""
    from glm_jax import load_hf

    ckpt = damaged_copy(tiny_checkpoint, tmp_path / "ckpt", how)
    with pytest.raises(ValueError) as e:
        load_hf(ckpt)
    assert str(e.value) == why.format(ckpt=ckpt)


# ------------------------------------------------------------------------------------- 9. the chat CLI

def chat(*args):
    return subprocess.run([sys.executable, "-m", "glm_jax.chat", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=120, input="/exit\n")


def test_chat_cli_missing_tokenizer_and_bad_tools(tmp_path):
    missing = tmp_path / "missing.model"
    one_line(chat("--checkpoint", tmp_path, "--tokenizer", missing), f"error: --tokenizer: {missing}: no such file")
    assert "RuntimeWarning" not in chat("--checkpoint", tmp_path, "--tokenizer", missing).stderr  # runpy's
    tools = tmp_path / "tools.json"
    tools.write_text("5")
    one_line(chat("--checkpoint", tmp_path, "--tools", tools),
             f"error: --tools: {tools}: must hold a list of tool objects (or one object), got int")


def test_chat_cli_argument_errors_in_process(tmp_path, capsys):
    from glm_jax import chat as C

    tools = tmp_path / "tools.json"
    cases = [("[1, 2]", f"error: --tools: {tools}: must hold a list of tool objects (or one object), got a list "
                        f"holding non-objects"),
             ('"get_weather"', f"error: --tools: {tools}: must hold a list of tool objects (or one object), got str"),
             ("[{", f"error: --tools: {tools}: not valid JSON (Expecting property name enclosed in double quotes at "
                    f"line 1 column 3)"),
             (DEEP, f"error: --tools: {tools}: not valid JSON (nested too deeply)")]
    for text, expected in cases:
        tools.write_text(text)
        assert C.main(["--checkpoint", str(tmp_path), "--tools", str(tools)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [expected]
    assert C.main(["--checkpoint", str(tmp_path), "--tools", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --tools: {tmp_path / 'none.json'}: cannot read the tools JSON (No such file or "
                   f"directory)"]
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_text("not a sentencepiece model")
    assert C.main(["--checkpoint", str(tmp_path), "--tokenizer", str(not_a_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --tokenizer: {not_a_model}: cannot load"), err
    assert C.main(["--checkpoint", str(tmp_path), "--knowledge", str(tmp_path)]) == 2  # before the model loads
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --knowledge: {tmp_path}: not a knowledge index (no index.json of format glm_jax.knowledge/1; build "
        f"one with python -m glm_jax.knowledge index)"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{")
    assert C.main(["--checkpoint", str(ckpt)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {ckpt / 'config.json'}: not valid JSON (Expecting property name enclosed in double quotes at line 1 "
        f"column 2)"]


@pytest.mark.parametrize("args,expected", [
    (["--max-new-tokens", "-1"], "error: --max-new-tokens: must be >= 1, got -1"),
    (["--temperature", "-1"], "error: --temperature: must be >= 0 (0 is greedy), got -1.0"),
    (["--temperature", "nan"], "error: --temperature: must be >= 0 (0 is greedy), got nan"),
    (["--top-p", "5"], "error: --top-p: must be in (0, 1], got 5.0"),
    (["--top-p", "0"], "error: --top-p: must be in (0, 1], got 0.0"),
    (["--top-k", "-3"], "error: --top-k: must be >= 0 (0 keeps every token), got -3"),
    (["--repetition-penalty", "0"], "error: --repetition-penalty: must be > 0 (1 is none), got 0.0"),
])
def test_chat_cli_sampling_options_are_checked_before_loading(tmp_path, capsys, args, expected):
    from glm_jax import chat as C

    # the checkpoint does not exist: the option is refused before anything would be loaded
    assert C.main(["--checkpoint", str(tmp_path / "nope"), *args]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [expected]


@pytest.mark.parametrize("tools,expected", [
    ({"name": "get_weather", "parameters": 5},
     'tools[0]: parameters: must be a JSON-schema object ({"type": "object", ...}), got int 5'),
    ([{"name": "ok"}, {"function": "get_weather"}], "tools[1]: function: must be an object with a name, got str"),
    ({"type": "retrieval", "function": {"name": "f"}}, "tools[0]: type: only \"function\" tools are supported, got "
                                                      "'retrieval'"),
    ({"type": "function", "function": {"parameters": {}}}, "tools[0]: function.name: must be a non-empty string, "
                                                            "got None"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}},
     'tools[0]: function.parameters: must be a JSON-schema object ({"type": "object", ...}), got type \'string\''),
    ({"name": "f", "description": 3}, "tools[0]: description: must be a string, got int"),
])
def test_chat_cli_names_the_tool_that_is_not_a_function_tool(tmp_path, capsys, tools, expected):
    from glm_jax import chat as C
    from glm_jax.tokenizers.formats import check_tools

    f = tmp_path / "tools.json"
    f.write_text(json.dumps(tools))
    assert C.main(["--checkpoint", str(tmp_path / "nope"), "--tools", str(f)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --tools: {f}: {expected} (OpenAI function tools: "), err
    good = [{"type": "function", "function": {"name": "get_weather", "description": "d",
                                              "parameters": {"type": "object", "properties": {}}}},
            {"name": "bare", "parameters": {"properties": {}}}]
    check_tools(good)  # both accepted forms


def test_chat_cli_says_when_it_falls_back_to_the_shipped_tokenizer(tiny_checkpoint, capsys, monkeypatch):
    import io

    from glm_jax import chat as C

    ckpt, _ = tiny_checkpoint  # config.json and weights, no tokenizer files
    monkeypatch.setattr(sys, "stdin", io.StringIO("/exit\n"))
    assert C.main(["--checkpoint", str(ckpt)]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: {ckpt} has no tokenizer.json, tokenizer.model or ice_text.model: using the small SentencePiece "
        f"tokenizer shipped with glm_jax (pass --tokenizer for the model's own)"]


# ------------------------------------------------------------------------------------- 10. the library

def test_eager_apply_refuses_out_of_range_ids():
    import jax
    import jax.numpy as jnp

    from glm_jax import GLMConfig, GLMForCausalLM

    cfg = GLMConfig.from_preset("glm-test")
    model = GLMForCausalLM(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    for bad, lo, hi in ((cfg.vocab_size, 1, cfg.vocab_size), (-1, -1, 2)):
        with pytest.raises(ValueError) as e:
            model.apply(variables, jnp.array([[1, 2, bad]]))
        assert str(e.value) == (f"input_ids: token ids must be in [0, {cfg.vocab_size}) (the model's vocab_size), got "
                                f"ids from {lo} to {hi}")
    assert model.apply(variables, jnp.array([[1, 2, cfg.vocab_size - 1]])).shape == (1, 3, cfg.vocab_size)


def test_save_hf_takes_model_init_output_and_leaves_nothing_on_failure(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from glm_jax import GLMConfig, GLMForCausalLM, load_hf, save_hf

    cfg = GLMConfig.from_preset("glm-test")
    variables = GLMForCausalLM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))  # boxed, wrapped
    save_hf(cfg, variables, tmp_path / "a")
    _, loaded = load_hf(tmp_path / "a")
    want = nn.unbox(variables["params"])
    np.testing.assert_array_equal(loaded["lm_head"]["kernel"], want["lm_head"]["kernel"])
    with pytest.raises(ValueError, match=r"^save_hf: params must be the model's parameter tree .* got \['foo'\]$"):
        save_hf(cfg, {"foo": 1}, tmp_path / "b")
    broken = {**want, "model": {k: v for k, v in want["model"].items() if k != "final_norm"}}
    with pytest.raises(Exception):
        save_hf(cfg, broken, tmp_path / "c")  # fails while writing: the directory it created goes again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
