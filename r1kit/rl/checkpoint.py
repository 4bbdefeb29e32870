"""Checkpoints written atomically (temp dir, then rename): model, optimizer, scheduler, RNG, data position."""

from __future__ import annotations

import contextlib
import pickle
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from r1kit import distributed
from r1kit.models import atomic_folder, save_model

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (numpy's for libraries that use it), as tensors and numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() saved (a checkpoint from before numpy's was saved leaves numpy's as it is)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# what torch.load(weights_only=True) takes besides containers: no object whose loading could run code
_PLAIN = (str, bytes, int, float, complex, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def plain(value: Any, where: str = "trainer state") -> Any:
    """value with numpy scalars as Python numbers; a TypeError naming anything else that a weights-only load
    refuses (it would make the checkpoint unloadable, found only at the resume)."""
    if isinstance(value, np.generic):  # before _PLAIN: numpy's float64 is a float, yet refused by the load
        return value.item()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if type(value) in (list, tuple, set):  # not their subclasses (a namedtuple is loaded through its class)
        return type(value)(plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}: a checkpoint holds only "
                    "tensors, numbers, strings, lists and dicts")


def save_checkpoint(folder: Path, step: int, model, tokenizer, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically; keep only the newest `keep` checkpoints."""
    final = folder / f"step-{step}"
    trainer_state = plain({**state, "step": step, "rng": rng_state()})  # before writing anything
    with atomic_folder(final) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / STATE_FILE)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in folder, oldest first (half-written temp dirs are ignored)."""
    if not folder.is_dir():
        return []
    found = [(int(m[1]), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (optimizer, scheduler, data position, RNG, step), loaded weights-only:
    a file that holds other objects is refused, since unpickling them could run code."""
    path = checkpoint / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"a reference to {found[1]}" if found else "other objects"
        raise ValueError(f"resume: {path} holds {what}; a trainer state holds only tensors, numbers, strings, "
                         "lists and dicts, and loading anything else could run code, so it is refused. Resume only "
                         "from checkpoints that r1kit wrote") from None


def find_checkpoint(resume: str | None, out: Path) -> Path | None:
    """The checkpoint `resume` names: `latest` in the run folder `out`, or a checkpoint folder."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(out / "checkpoints")
        if not found:
            raise ValueError(f"resume=latest: no checkpoint in {out}/checkpoints")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"resume: {path} is not a checkpoint (no {STATE_FILE})")
    return path


class StopRequest:
    """First Ctrl-C (or SIGTERM, as schedulers send before a kill) asks the loop to checkpoint and stop
    after the current step; a second one, at least REPEAT_S later, aborts.

    A signal again within REPEAT_S is the same stop delivered twice, not a second request: GNU `timeout`
    signals its child and then the child's process group, and a run stopped that way aborted in the
    middle of its step's grading instead of checkpointing (seen on the GPU machine, 2026-12-01)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 1.0

    def __init__(self, clock=time.monotonic):
        self.requested, self.clock, self._first = False, clock, 0.0
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        now = self.clock()
        if self.requested and now - self._first >= self.REPEAT_S:
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, now

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class TrainerState:
    """What the GRPO and SFT trainers share: their checkpointed state besides the weights (optimizer,
    scheduler, data stream, step count) and their mixed precision. Mixed into trainers with those attributes
    and a `device`."""

    def autocast(self):
        """bf16 autocast on GPU (fp32 master weights); nothing on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a resumed run needs."""
        return {"optimizer": distributed.optimizer_state(self.model, self.optimizer),
                "scheduler": self.scheduler.state_dict(), "stream": self.stream.state_dict(),
                "step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        distributed.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.step_count = state["step_count"]


IDENTITY = ("model_sha256", "data_sha256")  # what a resumed run must start from as the checkpointed one did
CARRIED = ("train_s", "before")  # what a resumed run takes over from the checkpointed one


def resume_run(checkpoint: Path, trainer: TrainerState, summary: dict[str, Any]) -> None:
    """Load a checkpoint's trainer state and RNG states into a run that continues it, with the time trained
    and the evaluation before training; refused when the run starts from another model or other data."""
    state = load_state(checkpoint)
    before = state.get("summary", {})
    changed = [k for k in IDENTITY if k in before and k in summary and before[k] != summary[k]]
    if changed:
        what = " and ".join(k.split("_")[0] for k in changed)
        raise ValueError(f"resume: {checkpoint} was trained from another {what} than this run's; start a new run "
                         "(another out) or give it the same again")
    trainer.load_state_dict(state)
    set_rng_state(state["rng"])
    summary.update({k: before[k] for k in CARRIED if k in before})


def save_run(out: Path, trainer: TrainerState, tokenizer, summary: dict[str, Any], keep: int) -> Path:
    """Checkpoint a run at its trainer's step: weights, trainer state and the run summary so far. Under torchrun
    rank 0 alone writes it (the ranks hold the same weights, optimizer state and, drawing their rollouts from one
    seeded stream, the same data position; FSDP's shards are first gathered to it), and every rank gets its path."""
    return _save_run(out, trainer, tokenizer, summary, keep)[0]


def save_final(out: Path, trainer: TrainerState, tokenizer, summary: dict[str, Any], keep: int,
               dtype: torch.dtype) -> tuple[Path, Path | None]:
    """The run's last checkpoint (as save_run) and final/, the trained model as a plain HF folder in `dtype` (LoRA
    merged), from one gathering of FSDP's shards; (the checkpoint's path, final/ on rank 0 and None elsewhere)."""
    path, model = _save_run(out, trainer, tokenizer, summary, keep)
    if not distributed.world().is_main:
        return path, None
    return path, save_model(model, tokenizer, out / "final", dtype)  # last: merging LoRA changes the model


def _save_run(out: Path, trainer: TrainerState, tokenizer, summary: dict[str, Any], keep: int
              ) -> tuple[Path, torch.nn.Module | None]:
    """save_run's checkpoint; its path, and the whole model it was written from (None where FSDP gathers none)."""
    model, state = distributed.full_model(trainer.model), trainer.state_dict()  # on every rank: FSDP gathers
    path = out / "checkpoints" / f"step-{trainer.step_count}"
    if distributed.world().is_main:
        save_checkpoint(out / "checkpoints", trainer.step_count, model, tokenizer, {**state, "summary": summary},
                        keep)
    return path, model
