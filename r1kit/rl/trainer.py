"""The GRPO step as three separate stages over a batch: rollout, score, update.

Each process runs them in turn on its device: `rollout` samples G completions per prompt from the
policy through a Generator (the engine or HF), `score` turns them into rewards, and `update` takes
the optimizer steps. The stages pass plain data: completions, reward tensors, metrics.

Under torchrun each rank rolls out and scores its own slice of every step's prompts with its own
generator; groups never straddle ranks, so group advantages need no communication. The update runs
under DDP or FSDP, its loss normalised by the counts of the whole step so that the averaged gradient is the
one-process gradient of the union batch; batch statistics and metrics are computed over all ranks. Under
FSDP each rank's generator reads a whole copy of the weights of its own, gathered after every update.
A rank's sampling seed is shifted so that its sequences sample as they would at their place in the
one-process step: a run gives the same rollouts on any number of ranks.
"""

from __future__ import annotations

import functools
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from r1kit import distributed
from r1kit.config import TrainConfig
from r1kit.prompts import build_prompt
from r1kit.rewards import RewardFn, reward_columns, score_completions
from r1kit.rl.advantages import group_advantages, informative_groups
from r1kit.rl.checkpoint import TrainerState
from r1kit.rl.logprobs import target_logprobs
from r1kit.rl.loss import policy_loss
from r1kit.rollout import Completion, Generator, SamplingParams
from r1kit.rollout.sampler import shifted_seed
from r1kit.tasks import Row, Task

REFLECTION = re.compile(r"\b(wait|verify|check again|re-?check|double[- ]check|let me check|hmm+)\b", re.IGNORECASE)
# metrics of the update that every rank holds alike (the gradient is all-reduced); the others are each rank's share
SAME_ON_EVERY_RANK = ("grad_norm", "skipped", "lr")


@dataclass
class LossInputs:
    """One rank's update batch as tensors: padded sequences, loss mask, advantages, old and reference logprobs."""

    tensors: dict[str, torch.Tensor]
    mask: torch.Tensor
    advantages: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None


@dataclass
class Rollouts:
    """One step's groups: a row and its prompt ids per group, G completions per group, their rewards."""

    rows: list[Row]
    prompt_ids: list[list[int]]
    completions: list[Completion]
    rewards: torch.Tensor
    per_reward: dict[str, list[float]]
    stats: dict[str, float] = field(default_factory=dict)


class PromptStream:
    """Indices of training rows in a seeded order, reshuffled each epoch; its position is checkpointed."""

    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError("no training rows to draw from")
        self.size, self.seed, self.epoch, self.index = size, seed, 0, 0

    def take(self, k: int) -> list[int]:
        """The next k row indices."""
        out: list[int] = []
        while len(out) < k:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
            take = order[self.index : self.index + k - len(out)].tolist()
            out += take
            self.index += len(take)
            if self.index >= self.size:
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """Linear warmup over warmup_steps, then constant, linear or cosine decay to 0 at total_steps."""

    def factor(opt_step: int) -> float:
        if opt_step < warmup_steps:
            return (opt_step + 1) / (warmup_steps + 1)
        progress = min(1.0, (opt_step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def pad_sequences(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Each prompt and its completion as one row, right-padded: (N, T) ids that need no attention mask.

    Pads only after a row's real tokens are kept out of every real position by causal attention alone. Left
    padding needs a mask in which a pad query attends to nothing, and such fully masked rows are a known
    source of NaN gradients in attention kernels' backward (pytorch/pytorch#103749, #119320); without a mask
    the kernel is the plain causal one. `next_ids` are the tokens predicted at positions first-1 .. T-1 (first:
    the shortest prompt), the span of logits the forward keeps; `index` places each completion token in it.
    """
    width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
    first = min(map(len, prompt_ids))
    c_len = max(1, max(map(len, completion_ids)))
    ids = [p + c + [pad_id] * (width - len(p) - len(c)) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    input_ids = torch.tensor(ids, device=device)
    offsets = torch.tensor([len(p) - first for p in prompt_ids], device=device)
    kept = width - first + 1
    return {
        "input_ids": input_ids,
        "next_ids": torch.cat([input_ids[:, first:], input_ids.new_full((len(ids), 1), pad_id)], dim=1),
        "index": (offsets[:, None] + torch.arange(c_len, device=device)).clamp(max=kept - 1),
        "targets": torch.tensor([c + [pad_id] * (c_len - len(c)) for c in completion_ids], device=device),
        "mask": torch.tensor([[1] * len(c) + [0] * (c_len - len(c)) for c in completion_ids], device=device,
                             dtype=torch.float32),
    }


def step_list(steps: list[int], shown: int = 6) -> str:
    """'3, 5, 9', or for a long list its first and last steps around '...'."""
    if len(steps) <= shown:
        return ", ".join(map(str, steps))
    half = shown // 2
    return ", ".join(map(str, steps[:half])) + ", ..., " + ", ".join(map(str, steps[-half:]))


def micro_batch_text(index: int, n: int, size: int) -> str:
    """'micro-batch 2 of 3 (sequences 5-8)' for micro-batch `index` (from 0) of n sequences in micro-batches of size."""
    start = index * size
    return f"micro-batch {index + 1} of {math.ceil(n / size)} (sequences {start + 1}-{min(n, start + size)})"


def token_logprobs(model, batch: dict[str, torch.Tensor], rows: slice, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) under softmax(logits / temperature) for the completion tokens of batch[rows]."""
    next_ids, index = batch["next_ids"][rows], batch["index"][rows]
    out = model(input_ids=batch["input_ids"][rows], logits_to_keep=next_ids.shape[1], use_cache=False)
    logp, entropy = target_logprobs(out.logits, next_ids, temperature, with_entropy)
    return logp.gather(1, index), None if entropy is None else entropy.gather(1, index)


COUNTED = ("groups_generated", "zero_variance_groups", "generated_tokens", "reward_failures")  # summed over ranks
TIMED = ("generation_s", "sync_s", "scoring_s")  # the slowest rank's, as the step waits for it (update_s, step_s too)


def step_record(batch: Rollouts, update: dict[str, float], update_s: float, step_s: float) -> dict[str, Any]:
    """What a rank's share of a step's metrics is made of: per-sequence values, rollout stats, the update's."""
    return {"rewards": batch.rewards, "lengths": [len(c.token_ids) for c in batch.completions],
            "truncated": sum(c.finish_reason == "length" for c in batch.completions),
            "reflective": sum(bool(REFLECTION.search(c.text)) for c in batch.completions),
            "per_reward": batch.per_reward, "stats": batch.stats, "update": update,
            "update_s": update_s, "step_s": step_s}


def merge_records(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of a whole step from its ranks' step_records, in rank order (the one-process batch order):
    sequences concatenated, counts summed, times the slowest rank's, the update's shares added up."""
    per_reward: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part["per_reward"].items():
            per_reward.setdefault(name, []).extend(values)
    stats = [part["stats"] for part in parts]
    merged = {k: sum(s[k] for s in stats) for k in COUNTED} | {k: max(s[k] for s in stats) for k in TIMED}
    merged["rollout_reward_mean"] = (sum(s["rollout_reward_mean"] * s["groups_generated"] for s in stats)
                                     / merged["groups_generated"])
    keys = dict.fromkeys(k for part in parts for k in part["update"])
    update = {k: parts[0]["update"][k] if k in SAME_ON_EVERY_RANK else sum(p["update"].get(k, 0.0) for p in parts)
              for k in keys}
    return {"rewards": torch.cat([part["rewards"] for part in parts]),
            "lengths": [n for part in parts for n in part["lengths"]],
            "truncated": sum(part["truncated"] for part in parts),
            "reflective": sum(part["reflective"] for part in parts), "per_reward": per_reward, "stats": merged,
            "update": update, **{k: max(part[k] for part in parts) for k in ("update_s", "step_s")}}


class GRPOTrainer(TrainerState):
    """Holds the policy, its optimizer and the data stream; `step()` runs rollout, score and update once."""

    def __init__(self, cfg: TrainConfig, model, tokenizer, task: Task, rewards: dict[str, tuple[RewardFn, float]],
                 generator: Generator, ref_model=None, rollout_model=None, device: str | None = None):
        """Under parallel=fsdp the policy (and the reference) may come on the CPU: their shards move to `device`;
        the generator then reads rollout_model, an unsharded copy that sync_generator refreshes."""
        self.cfg, self.model, self.tokenizer, self.task = cfg, model, tokenizer, task
        self.rewards, self.generator, self.ref_model, self.rollout_model = rewards, generator, ref_model, rollout_model
        self.world = distributed.world()
        if cfg.prompts_per_step % self.world.size:
            raise ValueError(f"prompts_per_step={cfg.prompts_per_step} does not split over {self.world.size} "
                             "processes; make it a multiple of the number of processes")
        self.share = cfg.prompts_per_step // self.world.size  # groups this rank rolls out and trains on per step
        if cfg.parallel == "fsdp":  # in place: model and policy are the one sharded module
            device = device or next(model.parameters()).device
            self.policy = distributed.fully_sharded(model, self.world, device)
            if ref_model is not None:
                distributed.fully_sharded(ref_model, self.world, device)
        else:  # the update's forward goes through DDP; rollouts, evaluation and checkpoints use the model itself
            self.policy = distributed.data_parallel(model, self.world)
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = lr_scheduler(self.optimizer, cfg.lr_schedule, cfg.warmup_steps,
                                      cfg.steps * cfg.num_iterations)
        self.prompts = [build_prompt(row["prompt"], tokenizer, cfg.template, task.answer_format) for row in task.rows]
        self.prompt_ids = [generator.encode(p) for p in self.prompts]  # the update's inputs, encoded once
        fits = [len(ids) <= cfg.max_prompt_tokens for ids in self.prompt_ids]
        if not all(fits):
            warnings.warn(f"{fits.count(False)} of {len(fits)} training prompts are longer than max_prompt_tokens="
                          f"{cfg.max_prompt_tokens} and are skipped", RuntimeWarning, stacklevel=2)
            task.rows, self.prompts, self.prompt_ids = (
                [x for x, ok in zip(column, fits, strict=True) if ok]
                for column in (task.rows, self.prompts, self.prompt_ids))
        if not task.rows:
            raise ValueError(f"no training prompt fits max_prompt_tokens={cfg.max_prompt_tokens}")
        self.stream = PromptStream(len(task.rows), cfg.seed)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.step_count = 0
        self._synced_step: int | None = None  # the step whose weights the generator holds
        self.sync_s = 0.0  # this step's weight refresh, seconds
        self._warned: set[tuple[type[Warning], str]] = set()  # kinds of reward warnings shown so far
        self.uninformative_steps: list[int] = []  # steps in which no group's rewards differed

    def sampling(self, round_: int) -> SamplingParams:
        """Rollout sampling; the seed depends only on (seed, step, round) and the rank's place in the step, so a
        resumed run samples the same, on any number of ranks."""
        cfg = self.cfg
        seed = (cfg.seed * 1_000_003 + self.step_count * 101 + round_) % 2**63
        return SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              max_tokens=cfg.max_completion_tokens,
                              seed=shifted_seed(seed, self.world.rank * self.share * cfg.group_size))

    def sync_generator(self) -> None:
        """Bring the generator's weights to the last update: under FSDP its unsharded copy, gathered from the shards
        (a collective: the first rollout round of a step runs on every rank), then the engine's buffers (bf16
        copies, merged LoRA); once per update however many rollout rounds follow it; its time adds to sync_s."""
        sync = getattr(self.generator, "sync_weights", None)
        if (sync is None and self.rollout_model is None) or self._synced_step == self.step_count:
            return
        started = time.perf_counter()
        if self.rollout_model is not None:
            distributed.gather_into(self.model, self.rollout_model)
        if sync is not None:
            sync()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the copies run on the GPU: time them, not their launch
        self.sync_s += time.perf_counter() - started
        self._synced_step = self.step_count

    # -- rollout -------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, indices: list[int], round_: int = 0) -> list[Completion]:
        """G completions for each training row index, group-major, from the current policy."""
        self.model.eval()
        self.sync_generator()
        with self.autocast():
            completions = self.generator.generate([self.prompts[i] for i in indices], self.sampling(round_))
        self.model.train()
        return completions

    # -- score ---------------------------------------------------------------------------------
    def score(self, indices: list[int], completions: list[Completion]) -> tuple[torch.Tensor, dict, dict]:
        """(total reward per completion, each reward's scores, failure counts)."""
        g = self.cfg.group_size
        rows = [self.task.rows[i] for i in indices for _ in range(g)]
        prompts = [self.prompts[i] for i in indices for _ in range(g)]
        columns = {**reward_columns(rows, prompts), "completion_ids": [c.token_ids for c in completions]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every one recorded; _show_first_of_each_kind filters
            scores = score_completions(self.rewards, [c.text for c in completions], columns)
        self._show_first_of_each_kind(caught)
        return torch.tensor(scores.total, dtype=torch.float32), scores.per_reward, scores.failures

    def _show_first_of_each_kind(self, caught: list[warnings.WarningMessage]) -> None:
        """Issue again the first reward warning of each kind in this run (a step can raise hundreds, and the
        counts and exception messages in their text vary, so a kind is the category and the text with its
        numbers and the exception's message left out: its type stays)."""
        for w in caught:
            text = re.sub(r"\(first: (\w+)[^)]*\); scored", r"(first: \1); scored", str(w.message))
            kind = (w.category, re.sub(r"\d+", "#", text))
            if kind not in self._warned:
                self._warned.add(kind)
                warnings.warn_explicit(f"step {self.step_count + 1}: {w.message} (the first of its kind; later "
                                       "ones are not shown)", w.category, w.filename, w.lineno)

    def collect(self) -> Rollouts:
        """Roll out and score this rank's share of prompts_per_step groups; with dynamic sampling, keep only
        informative groups, in rounds until every rank has its share (or max_rollout_rounds)."""
        cfg, g, share = self.cfg, self.cfg.group_size, self.share
        kept_idx: list[int] = []
        kept_completions: list[Completion] = []
        kept_rewards: list[torch.Tensor] = []
        kept_per: dict[str, list[float]] = {}
        stats = {"generation_s": 0.0, "scoring_s": 0.0, "groups_generated": 0, "zero_variance_groups": 0,
                 "generated_tokens": 0, "reward_failures": 0}
        all_rewards: list[torch.Tensor] = []
        self.sync_s = 0.0
        for round_ in range(cfg.max_rollout_rounds if cfg.dynamic_sampling else 1):
            # every rank draws the whole round from one stream and takes its slice, so the streams stay alike
            indices = self.world.share(self.stream.take(cfg.prompts_per_step))
            if len(kept_idx) < share:  # a rank whose share is full waits out the others' extra rounds
                completions, rewards, per_reward = self._round(indices, round_, stats)
                all_rewards.append(rewards)
                useful = informative_groups(rewards, g)
                stats["zero_variance_groups"] += int((~useful).sum())
                keep = useful if cfg.dynamic_sampling else torch.ones_like(useful)
                for j in keep.nonzero().flatten().tolist()[: share - len(kept_idx)]:
                    kept_idx.append(indices[j])
                    kept_completions += completions[j * g : (j + 1) * g]
                    kept_rewards.append(rewards[j * g : (j + 1) * g])
                    for name, values in per_reward.items():
                        kept_per.setdefault(name, []).extend(values[j * g : (j + 1) * g])
            if not self.world.any(len(kept_idx) < share)[0]:
                break
        stats["rollout_reward_mean"] = torch.cat(all_rewards).mean().item()
        stats["sync_s"] = self.sync_s  # inside generation_s
        return Rollouts(
            rows=[self.task.rows[i] for i in kept_idx],
            prompt_ids=[self.prompt_ids[i] for i in kept_idx],
            completions=kept_completions,
            rewards=torch.cat(kept_rewards) if kept_rewards else torch.zeros(0),
            per_reward=kept_per, stats=stats)

    def _round(self, indices: list[int], round_: int, stats: dict[str, float]
               ) -> tuple[list[Completion], torch.Tensor, dict[str, list[float]]]:
        """Roll out and score one round of groups, its times and counts added to stats."""
        t0 = time.perf_counter()
        completions = self.rollout(indices, round_)
        t1 = time.perf_counter()
        rewards, per_reward, failures = self.score(indices, completions)
        stats["generation_s"] += t1 - t0
        stats["scoring_s"] += time.perf_counter() - t1
        stats["groups_generated"] += len(indices)
        stats["generated_tokens"] += sum(len(c.token_ids) for c in completions)
        stats["reward_failures"] += sum(failures.values())
        return completions, rewards, per_reward

    # -- update --------------------------------------------------------------------------------
    def update(self, batch: Rollouts) -> dict[str, float]:
        """num_iterations optimizer steps on the batch; the old logprobs stay those of the policy that sampled it.

        Under torchrun the batch is this rank's share and DDP (FSDP) averages the ranks' gradients, so each rank
        divides its loss by the normalizer of the whole step (its sequences or tokens on every rank) over the world
        size: the average is then the gradient of the one-process loss over the union batch, for every loss_type."""
        cfg, n = self.cfg, len(batch.completions)
        passes = self._passes(n)
        inputs = self._loss_inputs(batch, self._batch_std(batch.rewards), passes)
        total_n, total_tokens = self.world.sum([n, inputs.mask.sum().item() if inputs else 0.0])
        if total_n == 0:
            return {"skipped": 1.0}
        tokens = max(total_tokens, 1.0)
        normalizer = {"grpo": total_n, "bnpo": tokens, "dapo": tokens,
                      "dr_grpo": total_n * cfg.max_completion_tokens}[cfg.loss_type] / self.world.size
        accumulate = functools.partial(self._accumulate, inputs, passes, normalizer, tokens)
        totals: dict[str, float] = {}
        skipped = 0
        for _ in range(cfg.num_iterations):
            sums, bad_loss = accumulate()
            grad_norm = distributed.clip_grad_norm(self.params, cfg.max_grad_norm) if bad_loss is None else math.nan
            # one bad batch (overflow, a degenerate sequence) must not turn the weights into NaN; the ranks skip
            # together, or their weights would part
            if self.world.any(not math.isfinite(grad_norm))[0]:
                reason = self._skip_reason(bad_loss, accumulate, n)
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                # numbered as the metrics row of this step is (step_count grows when the step ends)
                warnings.warn(f"step {self.step_count + 1}: {reason}", RuntimeWarning, stacklevel=2)
                continue
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            for key, value in {**sums, "grad_norm": grad_norm}.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.num_iterations
        totals["skipped"] = float(skipped)
        totals["lr"] = self.scheduler.get_last_lr()[0]
        return totals

    def _passes(self, n: int) -> int:
        """Micro-batches this rank runs over its n sequences. FSDP gathers weights in every forward and backward, a
        collective, so there every rank runs as many as the busiest (a rank short of sequences runs idle ones)."""
        mine = math.ceil(n / self.cfg.micro_batch_size)
        return max(self.world.gather(mine)) if distributed.is_sharded(self.model) else mine

    def _batch_std(self, rewards: torch.Tensor) -> torch.Tensor | None:
        """For advantage_scale=batch over several ranks, the std of the whole step's rewards (None: the batch's)."""
        if self.cfg.advantage_scale != "batch" or self.world.size == 1:
            return None
        everything = torch.cat(self.world.gather(rewards))
        return everything.std() if everything.numel() > 1 else torch.tensor(0.0)

    def _loss_inputs(self, batch: Rollouts, batch_std: torch.Tensor | None, passes: int) -> LossInputs | None:
        """The batch as padded tensors, with its loss mask, advantages, and old and reference logprobs, these in
        `passes` forwards; None for a rank without sequences (which still runs its forwards, idle)."""
        cfg, g = self.cfg, self.cfg.group_size
        tensors = pad_sequences([p for p in batch.prompt_ids for _ in range(g)],
                                [c.token_ids for c in batch.completions], self.pad_id,
                                self.device) if batch.completions else None
        old_logp = self._old_logprobs(batch, tensors, passes)
        ref_logp = self._ref_logprobs(tensors, passes) if cfg.beta > 0 else None
        if tensors is None:
            return None
        mask = tensors["mask"]
        if cfg.mask_truncated:
            truncated = torch.tensor([c.finish_reason == "length" for c in batch.completions], device=self.device)
            mask = mask * (~truncated)[:, None]
        advantages = group_advantages(batch.rewards, g, cfg.advantage_scale, batch_std).to(self.device)
        return LossInputs(tensors, mask, advantages, old_logp, ref_logp)

    def _accumulate(self, inputs: LossInputs | None, passes: int, normalizer: float, tokens: float,
                    sync: bool = True, after_backward: Callable[[int], None] | None = None
                    ) -> tuple[dict, int | None]:
        """Forward/backward every micro-batch, the gradients all-reduced over the ranks in the last one's backward
        when `sync` (FSDP reduce-scatters in each); metrics are this rank's share of the step's (weighted by the
        step's tokens), so the ranks' shares add up to them. A rank with fewer than `passes` micro-batches (at least
        one) runs idle ones, which add nothing: dynamic sampling can leave a rank short of groups or without any,
        and the all-reduce (FSDP's every pass) waits for every rank. Also returns the index of the first
        micro-batch whose loss is non-finite (else None): one process stops there, a rank of several goes on to
        join the collectives. after_backward(index) follows each backward."""
        n, size = 0 if inputs is None else inputs.mask.shape[0], self.cfg.micro_batch_size
        count = max(1, passes)
        sums: dict[str, float] = {"loss": 0.0}
        bad = None
        for index in range(count):
            rows = slice(index * size, (index + 1) * size)
            with distributed.grad_sync(self.policy, sync and index == count - 1):
                if rows.start >= n:
                    distributed.zero_backward(self.policy, self.pad_id)
                else:
                    loss, metrics = self._micro_loss(inputs, rows, normalizer)
                    if not torch.isfinite(loss):
                        bad = index if bad is None else bad
                        if self.world.size == 1:
                            break
                    loss.backward()
                    sums["loss"] += loss.item() / self.world.size
                    share = inputs.mask[rows].sum().item() / tokens
                    for key, value in metrics.items():
                        sums[key] = sums.get(key, 0.0) + value * share
            if after_backward is not None:
                after_backward(index)
        return sums, bad

    def _micro_loss(self, inputs: LossInputs, rows: slice, normalizer: float) -> tuple[torch.Tensor, dict]:
        """The policy loss of one micro-batch and its metrics, through the (DDP-wrapped or sharded) policy."""
        cfg = self.cfg
        with self.autocast():
            logp, entropy = token_logprobs(self.policy, inputs.tensors, rows, cfg.temperature, with_entropy=True)
        return policy_loss(
            logp, inputs.old_logp[rows], inputs.advantages[rows], inputs.mask[rows],
            ref_logp=None if inputs.ref_logp is None else inputs.ref_logp[rows], beta=cfg.beta,
            clip_low=cfg.clip_low, clip_high=cfg.clip_high, loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_tokens, normalizer=normalizer, entropy=entropy)

    def _skip_reason(self, bad_loss: int | None, accumulate: Callable[..., tuple[dict, int | None]], n: int) -> str:
        """Why an update of n sequences is skipped: the micro-batch of a non-finite loss, or which parameter tensors
        got a non-finite gradient and after which micro-batch first. Only a skipped update pays for the search:
        its micro-batches run again, the gradients checked after each backward (not all-reduced: on this rank's
        sequences alone; under FSDP, reduce-scattered in each backward, on every rank's)."""
        size = self.cfg.micro_batch_size
        if bad_loss is not None:
            return f"non-finite loss, update skipped: in {micro_batch_text(bad_loss, n, size)}"
        first: list[int] = []

        def check(index: int) -> None:
            if not first and distributed.nonfinite_grads(self.model):
                first.append(index)

        self.optimizer.zero_grad(set_to_none=True)
        accumulate(sync=False, after_backward=check)
        names = distributed.nonfinite_grads(self.model)
        what = "non-finite gradient, update skipped"
        if not first:
            alone = self.world.size == 1 or distributed.is_sharded(self.model)  # checked on every rank's sequences
            cause = "a nondeterministic kernel" + ("" if alone else ", or another rank's sequences")
            return f"{what}; not reproduced when its micro-batches ran again ({cause}?)"
        shown = ", ".join(names[:2]) + (", ..." if len(names) > 2 else "")
        return (f"{what}: in {len(names)} of {len(self.params)} parameter tensors ({shown}), first after "
                f"{micro_batch_text(first[0], n, size)}")

    @torch.no_grad()
    def _old_logprobs(self, batch: Rollouts, tensors, passes: int) -> torch.Tensor | None:
        if self.cfg.old_logprobs == "recompute":
            return self._forward_logprobs(self.model, tensors, passes)
        if tensors is None:
            return None
        width = tensors["targets"].shape[1]
        rows = [c.logprobs + [0.0] * (width - len(c.logprobs)) for c in batch.completions]
        return torch.tensor(rows, device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def _ref_logprobs(self, tensors, passes: int) -> torch.Tensor | None:
        if self.ref_model is not None:
            logp = self._forward_logprobs(self.ref_model, tensors, passes)
            if distributed.is_sharded(self.ref_model):  # FSDP keeps a root's weights gathered for its backward
                self.ref_model.reshard()
            return logp
        with self.model.disable_adapter():  # LoRA: the reference is the base model, adapters off
            return self._forward_logprobs(self.model, tensors, passes)

    def _forward_logprobs(self, model, tensors, passes: int) -> torch.Tensor | None:
        """The completion tokens' logprobs under model in `passes` micro-batch forwards (None without tensors): a
        rank short of sequences runs idle ones, as FSDP gathers weights in every forward."""
        size, n = self.cfg.micro_batch_size, 0 if tensors is None else tensors["targets"].shape[0]
        parts = []
        for start in range(0, passes * size, size):
            with self.autocast():
                if start < n:
                    parts.append(token_logprobs(model, tensors, slice(start, start + size),
                                                self.cfg.temperature)[0].float())
                else:
                    distributed.idle_forward(model, self.pad_id)
        return torch.cat(parts) if parts else None

    # -- one step ------------------------------------------------------------------------------
    def step(self) -> tuple[dict[str, Any], Rollouts]:
        """Rollout, score and update once; the step's metrics and its rollouts."""
        t0 = time.perf_counter()
        batch = self.collect()
        t1 = time.perf_counter()
        update = self.update(batch)
        t2 = time.perf_counter()
        self.step_count += 1
        whole = merge_records(self.world.gather(step_record(batch, update, t2 - t1, t2 - t0)))
        self._warn_if_uninformative(whole["stats"])
        return self._metrics(whole), batch

    def _warn_if_uninformative(self, stats: dict[str, float]) -> None:
        """Warn when every group of this step got equal rewards (all advantages 0: nothing to learn), at the 1st,
        2nd, 4th, 8th... such step, naming the steps: a run that stalls this way says so without flooding the log."""
        if stats["zero_variance_groups"] < stats["groups_generated"]:
            return
        self.uninformative_steps.append(self.step_count)
        count, cfg = len(self.uninformative_steps), self.cfg
        if count & (count - 1):  # not a power of two
            return
        if cfg.dynamic_sampling:
            outcome, raise_ = "update skipped", "group_size, temperature or max_rollout_rounds"
        else:
            outcome, raise_ = "nothing to learn from it", "group_size or temperature"
        warnings.warn(f"step {self.step_count}: all {cfg.group_size} completions of each of the "
                      f"{stats['groups_generated']:.0f} prompts rolled out got the same reward, so every advantage is "
                      f"0: {outcome} ({count} such step{'s' * (count > 1)} so far: "
                      f"{step_list(self.uninformative_steps)}). For rewards that differ within a group, raise "
                      f"{raise_}, or add a reward that gives partial credit, e.g. rewards.format=0.2",
                      RuntimeWarning, stacklevel=3)

    def _metrics(self, whole: dict[str, Any]) -> dict[str, Any]:
        """The step's metrics row from its record (merge_records: over every rank)."""
        rewards, lengths = whole["rewards"], whole["lengths"] or [0]
        n = max(len(whole["lengths"]), 1)
        m: dict[str, Any] = {"step": self.step_count}
        m["reward"] = rewards.mean().item() if rewards.numel() else 0.0
        m["reward_std"] = rewards.std().item() if rewards.numel() > 1 else 0.0
        for name, values in whole["per_reward"].items():
            m[f"rewards/{name}"] = sum(values) / n
        m["completion_length_mean"] = sum(lengths) / len(lengths)
        m["completion_length_max"] = max(lengths)
        m["truncation_rate"] = whole["truncated"] / n
        m["reflection_rate"] = whole["reflective"] / n
        m.update(whole["update"])
        s = whole["stats"]
        m.update({k: s[k] for k in ("rollout_reward_mean", "groups_generated", "zero_variance_groups",
                                    "reward_failures", "generation_s", "sync_s", "scoring_s")})
        m["update_s"], m["step_s"] = whole["update_s"], whole["step_s"]
        m["tokens_per_s"] = s["generated_tokens"] / s["generation_s"] if s["generation_s"] else 0.0
        if self.device.type == "cuda":
            m["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return m

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._synced_step = None  # the weights were loaded after the generator was built
