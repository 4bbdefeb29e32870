"""GGUF file -> HF checkpoint folder, one tensor at a time.

transformers reads a GGUF by dequantizing every tensor into one dict in memory and then building the model from
it: for a 32B file that is 128 GB of float32 in host memory. Here each tensor is dequantized, renamed and
permuted as transformers does it (its own name map and tensor processors), cast, and appended to the current
safetensors shard, which is written once it holds `shard_bytes`: peak host memory is one shard plus one tensor.
The output is what save_pretrained writes: `model.safetensors` (or numbered shards and their index),
config.json, generation_config.json and the tokenizer, so an import has the same weights sha256 as before.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

SHARD_BYTES = 5 * 10**9  # save_pretrained's default max_shard_size ("5GB")
FLOAT32_MAX_PARAMS = 10**9  # above this a float32 import would only double the disk and load time


def import_dtype(n_params: int) -> torch.dtype:
    """float32 for models small enough to train on one GPU from the import; bf16 (how they are served) above."""
    return torch.float32 if n_params <= FLOAT32_MAX_PARAMS else torch.bfloat16


def gguf_tensors(reader, skeleton) -> Iterator[tuple[str, torch.Tensor]]:
    """A GGUFReader's tensors as (HF name of `skeleton`, float32 tensor), dequantized one at a time."""
    from gguf import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    config = skeleton.config
    architecture = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(skeleton, processor)
    # some processors put tensors straight into parsed["tensors"] (merged experts): pass those on as well
    parsed: dict = {"config": config.to_dict(), "tensors": {}}
    for tensor in reader.tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name in names:  # np.array copies: a float32 tensor comes as the file's read-only memory map
            yield names[result.name], torch.from_numpy(np.array(result.weights))
        while parsed["tensors"]:
            yield parsed["tensors"].popitem()


def write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, dtype: torch.dtype,
                 skip: frozenset[str], shard_bytes: int) -> int:
    """Cast and write tensors as save_pretrained lays them out; returns the total bytes written."""
    from safetensors.torch import save_file

    shard: dict[str, torch.Tensor] = {}
    files: list[Path] = []
    names: list[list[str]] = []
    size = total = 0
    for name, tensor in tensors:
        if name in skip:
            continue
        tensor = tensor.to(dtype).contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            names.append(list(shard))
            files.append(_flush(shard, out_dir, len(files), save_file))
            size = 0
        shard[name] = tensor
        size, total = size + nbytes, total + nbytes
    names.append(list(shard))
    files.append(_flush(shard, out_dir, len(files), save_file))
    _name_shards(files, names, out_dir, total)
    return total


@contextlib.contextmanager
def read_once(path: Path) -> Iterator:
    """The GGUFReader of path, which transformers also gets while the block runs whenever it opens that file,
    and gguf's tensor-name maps built once each.

    transformers parses the file once for the config and again for the tokenizer, and the tensors need a third
    reader: each parse walks the vocabulary's ~100k metadata entries in Python (~5 s for the embedded model).
    Its tensor-name map is built again for every module of the model (397 times, 14 s). transformers imports
    both names from gguf when it uses them, so replacing them for the block reaches it."""
    import gguf

    reader, open_file, name_map = gguf.GGUFReader(path), gguf.GGUFReader, gguf.get_tensor_name_map

    def shared(file, *args, **kwargs):
        return reader if Path(file) == path and not args and not kwargs else open_file(file, *args, **kwargs)

    gguf.GGUFReader, gguf.get_tensor_name_map = shared, functools.cache(name_map)
    try:
        yield reader
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = open_file, name_map


def import_folder(gguf: Path, out_dir: Path, dtype: torch.dtype | None = None) -> torch.dtype:
    """Write the HF checkpoint of a GGUF file into the (empty) folder out_dir; returns the precision it chose."""
    with read_once(gguf) as reader:
        return _import_folder(gguf, reader, out_dir, dtype)


def _import_folder(gguf: Path, reader, out_dir: Path, dtype: torch.dtype | None) -> torch.dtype:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks a GGUF's config as quantized, which blocks training and save_pretrained
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = dtype or import_dtype(sum(int(t.n_elements) for t in reader.tensors))
    with torch.device("meta"):  # the name map needs the module tree, not its weights
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures, config.dtype = [type(skeleton).__name__], dtype
    tied = getattr(config, "tie_word_embeddings", False)
    write_shards(gguf_tensors(reader, skeleton), out_dir, dtype, frozenset({"lm_head.weight"} if tied else ()),
                 SHARD_BYTES)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
    return dtype


def _flush(shard: dict[str, torch.Tensor], out_dir: Path, index: int, save_file) -> Path:
    """Write one shard under a temporary name (the count of shards is known only at the end) and free it."""
    path = out_dir / f"shard-{index:05d}.tmp"
    save_file(shard, str(path), metadata={"format": "pt"})
    shard.clear()
    return path


def _name_shards(files: list[Path], names: list[list[str]], out_dir: Path, total: int) -> None:
    """Rename the shards as save_pretrained names them, and write the index when there are several."""
    if len(files) == 1:
        files[0].rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, (path, keys) in enumerate(zip(files, names, strict=True)):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(out_dir / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
