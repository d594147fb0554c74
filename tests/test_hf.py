"""Hugging Face folders: pytorch_model.bin (and shards) to the safetensors layout, never unpickling."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import safeckpt
from safeckpt import CheckpointFormatError, UnsafeCheckpointError
from safeckpt.cli import main
from safeckpt.hf import convert_folder, parse_size

@dataclasses.dataclass
class FakeTrainingArguments:
    """Stands for transformers.TrainingArguments, a dataclass (the real one needs accelerate to pickle)."""

    output_dir: str
    learning_rate: float = 3e-4
    lr_scheduler_type: str = "linear"


TOKENS = torch.tensor([[3, 17, 42, 5, 9, 11, 2]])


def tiny_bert() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=32, tie_word_embeddings=True)
    return transformers.BertForMaskedLM(config).eval()


def tiny_gpt2() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(config).eval()


def legacy_folder(model: transformers.PreTrainedModel, folder: Path, shards: int = 1) -> Path:
    """What transformers < 5 wrote: config.json and pytorch_model.bin (or shards + index), via torch.save."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 32}\n')
    state = model.state_dict()
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return folder
    names = list(state)
    weight_map, total = {}, 0
    for i in range(shards):
        part = {n: state[n] for n in names[i::shards]}
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: t.clone() for n, t in part.items()}, folder / file)
        weight_map.update({n: file for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def never_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("conversion unpickled a file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert-tied", "gpt2-tied"])
def test_tied_model_converts_to_one_file_and_loads_bit_identically(
    build, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build()
    src = legacy_folder(model, tmp_path / "src")
    with monkeypatch.context() as m:
        never_unpickles(m)
        written = convert_folder(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    assert written == [dst / "model.safetensors"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    with safe_open(dst / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
    tied = {n for n, t in model.state_dict().items() if t.data_ptr() == model.get_input_embeddings().weight.data_ptr()}
    assert len(tied) == 2  # the input embedding and the output head share storage
    assert len(tied & names) == 1 and model.base_model_prefix in next(iter(tied & names))
    loaded = type(model).from_pretrained(dst).eval()
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(logits(loaded), logits(model))


def test_three_shards_keep_their_split_and_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt2()
    src = legacy_folder(model, tmp_path / "src", shards=3)
    with monkeypatch.context() as m:
        never_unpickles(m)
        convert_folder(src, tmp_path / "dst")
    dst = tmp_path / "dst"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    old = json.loads((src / "pytorch_model.bin.index.json").read_text())["weight_map"]
    files = [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted({*index["weight_map"].values()}) == files
    assert index["weight_map"] == {n: f.replace("pytorch_model", "model").replace(".bin", ".safetensors")
                                   for n, f in sorted(old.items())}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    on_disk = 0
    for file in files:
        with safe_open(dst / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            on_disk += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == on_disk
    loaded = transformers.GPT2LMHeadModel.from_pretrained(dst).eval()
    assert torch.equal(logits(loaded), logits(model))


def test_max_shard_size_resplits(tmp_path: Path) -> None:
    model = tiny_bert()
    src = legacy_folder(model, tmp_path / "src")
    convert_folder(src, tmp_path / "dst", max_shard_size="20KB")
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3
    for file in files:
        with safe_open(tmp_path / "dst" / file, "pt") as f:
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1  # a tensor larger than the limit sits alone
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "dst").eval()
    assert torch.equal(logits(loaded), logits(model))


def test_destination_inside_the_source(tmp_path: Path) -> None:
    model = tiny_gpt2()
    src = legacy_folder(model, tmp_path / "m")
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    convert_folder(src, src / "safe")
    assert sorted(p.name for p in (src / "safe").iterdir()) == ["config.json", "model.safetensors", "tokenizer",
                                                                "tokenizer_config.json"]
    assert (src / "safe" / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert torch.equal(logits(transformers.GPT2LMHeadModel.from_pretrained(src / "safe").eval()), logits(model))


def test_parse_size() -> None:
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("500MiB") == 500 << 20
    assert parse_size(1000) == 1000
    for bad in ("", "5 parsecs", 0, "0KB"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_in_place_keeps_legacy_unless_asked(tmp_path: Path) -> None:
    src = legacy_folder(tiny_gpt2(), tmp_path / "m", shards=3)
    convert_folder(src)
    assert (src / "pytorch_model-00001-of-00003.bin").is_file() and (src / "model.safetensors.index.json").is_file()
    with pytest.raises(FileExistsError):
        convert_folder(src)
    convert_folder(src, overwrite=True, remove_legacy=True)
    assert sorted(p.name for p in src.iterdir()) == [
        "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer_config.json",
    ]
    with pytest.raises(ValueError, match="in place"):
        convert_folder(src, tmp_path / "other", remove_legacy=True)


def test_trainer_folder_files_convert_beside_them(tmp_path: Path) -> None:
    model = tiny_gpt2()
    src = legacy_folder(model, tmp_path / "checkpoint-10")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(TOKENS, labels=TOKENS).loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    torch.save(opt.state_dict(), src / "optimizer.pt")
    torch.save({k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}, src / "scheduler.pt")
    torch.save({"python": __import__("random").getstate(), "cpu": torch.get_rng_state()}, src / "rng_state.pth")
    torch.save(FakeTrainingArguments(str(tmp_path / "out")), src / "training_args.bin")
    written = convert_folder(src, trainer_files=True)
    names = {p.name for p in written}
    assert {"optimizer.safetensors", "scheduler.safetensors", "rng_state.safetensors",
            "training_args.safetensors", "safeckpt_converted.json"} <= names
    assert (src / "optimizer.pt").is_file()  # originals stay without remove_legacy
    record = json.loads((src / "safeckpt_converted.json").read_text())
    assert {r["source"]: r["file"] for r in record["files"]}["optimizer.pt"] == "optimizer.safetensors"
    got = safeckpt.load(src / "optimizer.safetensors")
    want = opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for i, s in want["state"].items():
        assert torch.equal(got["state"][i]["exp_avg"], s["exp_avg"])
    rng = safeckpt.load(src / "rng_state.safetensors")
    assert rng["cpu"].dtype == torch.uint8 and isinstance(rng["python"], tuple)
    stored_args = safeckpt.load(src / "training_args.safetensors")["training_args"]
    assert isinstance(stored_args, safeckpt.OpaqueObject)  # inert: TrainingArguments was not imported to read it
    assert {r["source"]: r["wrapped_in"] for r in record["files"]}["training_args.bin"] == "training_args"


def test_malicious_weights_refused_nothing_written(tmp_path: Path) -> None:
    src = tmp_path / "evil"
    src.mkdir()
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    torch.save({"weight": Payload()}, src / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        convert_folder(src, tmp_path / "dst")
    assert not sentinel.exists()
    assert not (tmp_path / "dst").exists()


def test_index_naming_a_file_outside_the_folder_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "outside.bin")
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.bin"}}))
    with pytest.raises(CheckpointFormatError, match="refused"):
        convert_folder(src, tmp_path / "dst")


def test_index_disagreeing_with_shard_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "m"
    src.mkdir()
    torch.save({"w": torch.ones(2)}, src / "pytorch_model-00001-of-00001.bin")
    (src / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin", "v": "pytorch_model-00001-of-00001.bin"}}))
    with pytest.raises(CheckpointFormatError, match="missing"):
        convert_folder(src, tmp_path / "dst")


def test_cli_convert_hf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_bert()
    src = legacy_folder(model, tmp_path / "src", shards=3)
    assert main(["convert", "--hf", str(src), str(tmp_path / "dst"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and len(doc["outputs"]) == 4
    assert main(["convert", "--hf", str(src), str(tmp_path / "dst")]) == 2  # exists
    assert "exists" in capsys.readouterr().err
    loaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "dst").eval()
    assert torch.equal(logits(loaded), logits(model))


def test_importing_safeckpt_imports_no_framework() -> None:
    code = ("import sys, safeckpt, safeckpt.hf, safeckpt.signing, safeckpt.integrations, safeckpt.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('transformers', 'lightning', 'pytorch_lightning', 'model_signing', 'huggingface_hub')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
