"""The SFT step: a batch of examples, packed into micro-batches, one optimizer step on their token-mean loss.

Under torchrun every rank draws the same batch from one seeded stream and plans the same micro-batches; rank r
trains on micro-batches r, r + N, ... under DDP or FSDP, its loss divided by the batch's target tokens over N so that
the averaged gradient is the one-process gradient of the whole batch."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from r1kit import distributed
from r1kit.config import SFTConfig
from r1kit.rl.checkpoint import TrainerState
from r1kit.rl.trainer import PromptStream, lr_scheduler
from r1kit.sft.batch import collate, plan_micro_batches, token_nll
from r1kit.sft.data import Example


def total_steps(cfg: SFTConfig, examples: int) -> int:
    """Optimizer steps of a run: `steps`, else enough batches for `epochs` passes over the data."""
    return cfg.steps or max(1, math.ceil(cfg.epochs * examples / cfg.batch_size))


class SFTTrainer(TrainerState):
    """Holds the model, its optimizer and the example stream; `step()` trains on the next batch. Under FSDP the model
    may come on the CPU: its shards move to `device`."""

    def __init__(self, cfg: SFTConfig, model, tokenizer, examples: list[Example], device: str | None = None):
        self.cfg, self.model, self.examples = cfg, model, examples
        self.world = distributed.world()
        if cfg.parallel == "fsdp":  # in place: model and policy are the one sharded module
            self.policy = distributed.fully_sharded(model, self.world, device or next(model.parameters()).device)
        else:  # the forward with gradients goes through DDP
            self.policy = distributed.data_parallel(model, self.world)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.steps = total_steps(cfg, len(examples))
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, cfg.lr_schedule, cfg.warmup_steps, self.steps)
        self.stream = PromptStream(len(examples), cfg.seed)
        self.step_count = 0

    def plan(self, examples: list[Example]) -> list[list[Example]]:
        """The examples grouped into micro-batches of at most micro_batch_tokens, alike on every rank."""
        return plan_micro_batches(examples, self.cfg.micro_batch_tokens, self.cfg.packing)

    def micro_batches(self, plan: list[list[Example]]) -> list[dict[str, torch.Tensor]]:
        """The model inputs of planned micro-batches."""
        return [collate(group, self.cfg.packing, self.pad_id, self.device) for group in plan]

    def passes(self, planned: int) -> int:
        """Forward/backward passes of this rank in a step of `planned` micro-batches. Under FSDP every pass gathers
        and reduce-scatters, collectives all ranks join, so each runs as many as the busiest; under DDP only the last
        synchronises, which a rank without a micro-batch must still join."""
        if distributed.is_sharded(self.model):
            return math.ceil(planned / self.world.size)
        return max(1, len(range(self.world.rank, planned, self.world.size)))

    def step(self) -> dict[str, Any]:
        """One optimizer step on the next batch_size examples; its metrics."""
        started = time.perf_counter()
        batch = [self.examples[i] for i in self.stream.take(self.cfg.batch_size)]
        targets = sum(ex.target_tokens for ex in batch)
        plan = self.plan(batch)
        mine = self.micro_batches(plan[self.world.rank::self.world.size])
        loss_sum, fed = 0.0, 0
        for index, inputs in enumerate(mine):
            with distributed.grad_sync(self.policy, index == len(mine) - 1):
                with self.autocast():
                    nll = token_nll(self.policy, inputs)
                # the step's loss is the mean over all its target tokens (times the ranks, as DDP averages them)
                (nll * self.world.size / targets).backward()
            loss_sum += nll.item()
            fed += inputs["input_ids"].numel()
        for _ in range(self.passes(len(plan)) - len(mine)):  # more ranks than micro-batches, or not a multiple
            distributed.zero_backward(self.policy, self.pad_id)
        loss_sum, fed = self.world.sum([loss_sum, fed])
        grad_norm = distributed.clip_grad_norm(self.params, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        skipped = self.world.any(not math.isfinite(grad_norm))[0]  # the ranks skip together, or their weights part
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_s = time.perf_counter() - started
        tokens = sum(map(len, batch))
        metrics = {"loss": loss_sum / targets, "grad_norm": grad_norm, "lr": lr, "skipped": float(skipped),
                   "tokens": tokens, "target_tokens": targets, "padding_share": 1 - tokens / fed,
                   "tokens_per_s": tokens / step_s, "step_s": step_s, "epoch": self.stream.epoch}
        if self.device.type == "cuda":
            metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    @torch.no_grad()
    def eval_loss(self, examples: list[Example]) -> float:
        """Mean loss per target token over the examples."""
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        for inputs in self.micro_batches(self.plan(examples)):
            with self.autocast():
                total += token_nll(self.model, inputs).item()
        self.model.train(was_training)
        return total / max(1, sum(ex.target_tokens for ex in examples))
