"""train config: YAML + dotted overrides, schema validation, one-line errors before any compilation."""

import subprocess
import sys
from pathlib import Path

import pytest

from glm_jax.config import GLMConfig
from glm_jax.train.config import ConfigError, check_model_fit, load_config, resolve_mesh

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_overrides_are_typed_yaml_scalars():
    cfg = load_config(TINY, ["train.steps=30", "train.lr=1e-2", "mesh.fsdp=4", "data.skip_bad_records=true",
                             "data.train_files=[a.txt, b.txt]", "train.clip_norm=null", "run_dir=runs/x"])
    assert cfg.train.steps == 30 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(0.01) and isinstance(cfg.train.lr, float)
    assert cfg.mesh.fsdp == 4 and cfg.data.skip_bad_records is True
    assert cfg.data.train_files == ["a.txt", "b.txt"] and cfg.train.clip_norm is None and cfg.run_dir == "runs/x"


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        # the Minitron recipe's teacher and student are written by its first two commands (the config's header)
        load_config(path, check_paths=path.name != "minitron-tiny.yaml")


@pytest.mark.parametrize("override,key", [
    ("train.stepz=3", "train.stepz"),
    ("nope=1", "nope"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("data.skip_bad_records=3", "data.skip_bad_records"),
    ("train.schedule=cosin", "train.schedule"),
    ("train.steps=0", "train.steps"),
    ("train.global_batch_size=6", "train.global_batch_size"),  # 6 rows over data*fsdp = 4
    ("lora.targets=[query, qkv]", "lora.targets"),
    ("model.overrides.num_layer=2", "model.overrides.num_layer"),
    ("model.overrides.dtype=bfloat16", "model.overrides.dtype"),  # one place: model.dtype
    ("train=3", "train"),
    ("data.prepared=/tmp/x", "data.prepared"),  # with data.task=sft below
])
def test_bad_config_names_the_key(override, key):
    extra = ["mesh.data=2", "mesh.fsdp=2"] if "global_batch" in override else []
    extra += ["data.task=sft"] if "prepared" in override else []
    with pytest.raises(ConfigError) as e:
        load_config(TINY, extra + [override])
    msg = str(e.value)
    assert msg.startswith(key + ":") and "\n" not in msg, msg


def test_device_and_model_dependent_checks():
    cfg = load_config(TINY, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.global_batch_size=8"])
    assert resolve_mesh(cfg, 8) == {"data": 2, "fsdp": 2, "sequence": 1, "tensor": 2}
    with pytest.raises(ConfigError, match=r"^mesh\.data, mesh\.fsdp, mesh\.tensor: .*needs 8 devices, only 4"):
        resolve_mesh(cfg, 4)
    # the error names the axes that were set, not the one left to fill the devices
    cfg = load_config(TINY, ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=3", "train.global_batch_size=8"])
    with pytest.raises(ConfigError) as e:
        resolve_mesh(cfg, 8)
    assert str(e.value) == "mesh.tensor: mesh.tensor=3 (product 3) does not divide the 8 devices that mesh.data=-1 " \
                           "would fill"
    cfg = load_config(TINY, ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=2", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match=r"^mesh\.tensor: mesh data=1 fsdp=1 sequence=1 tensor=2 expert=1 needs 2 "
                                          r"devices, only 1 available$"):
        resolve_mesh(cfg, 1)
    cfg = load_config(TINY, ["mesh.data=1", "mesh.fsdp=-1", "train.global_batch_size=4"])
    assert resolve_mesh(cfg, 4)["fsdp"] == 4
    with pytest.raises(ConfigError, match=r"^train\.global_batch_size: "):
        resolve_mesh(cfg, 8)  # fsdp=-1 -> 8, batch 4 not divisible
    cfg = load_config(TINY, ["data.seq_len=1024"])
    with pytest.raises(ConfigError, match=r"^data\.seq_len: 1024 exceeds the model's max_seq_len=512"):
        check_model_fit(cfg, GLMConfig.from_preset("glm-tiny"))


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "train.stepz=3", f"run_dir={tmp_path}/r"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert lines == ["config error: train.stepz: unknown key (known in train: " + lines[0].split("(known in train: ")[1]]
    assert not (tmp_path / "r").exists()  # failed before creating anything


def test_cli_mesh_larger_than_devices_fails_before_compiling(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                        "train.global_batch_size=8", f"run_dir={tmp_path}/r"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("config error: mesh.data, mesh.fsdp, mesh.tensor: ")
    assert "needs 8 devices, only 1 available" in r.stderr
