"""The engine loop: `add_request()` queues a prompt's n sequences, `step()` runs one prefill (of whole prompts or
chunks of long ones) or decode."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from r1kit.rollout.engine.attention import kernel_supports
from r1kit.rollout.engine.block_manager import BlockManager
from r1kit.rollout.engine.decode_step import DecodeStep
from r1kit.rollout.engine.model import PagedDecoder
from r1kit.rollout.engine.prefill_step import PrefillStep
from r1kit.rollout.engine.scheduler import Chunk, Request, Scheduler
from r1kit.rollout.engine.sequence import Sequence
from r1kit.rollout.hf import eos_token_ids
from r1kit.rollout.sampler import CHUNKED_BELOW, SamplingBatch, request_seed, sample, sequence_key, top_logprobs
from r1kit.rollout.types import (
    Completion,
    Progress,
    Round,
    SamplingParams,
    cut_at_stop,
    encode_prompt,
    encode_prompts,
)

BLOCK_SIZE = 16  # tokens in a KV cache block
# While sequences run, a prefill waits until this share of the batch's seats is free (or every waiting sequence
# fits): an eager prefill of a few short prompts costs ~50 ms on an H200, as much as ~8 decode steps of a full
# batch, and admitting each request as soon as its seats freed made half of a GSM8K eval's generation time
# prefill steps (911 of them for 1,319 prompts)
ADMIT_SHARE = 1 / 8
RETIRED_SHARE = 1 / 4  # retired rows past this share of the batch: compact it (upload the live rows)


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """KV cache bytes one token takes across all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * itemsize


@dataclass
class RunningBatch:
    """The sequences whose state the decode step holds on the device, one a row, and what their sampling needs
    from the host. A sequence that ends keeps its row, retired (a padding row on the device), until the next
    upload: uploading the whole set costs the host milliseconds, and a set that changed cannot run a step ahead.
    Uploaded again when sequences join (a prefill) or when retired rows pass RETIRED_SHARE of the rows."""

    rows: list[Sequence]
    filtered: bool  # some sequence keeps fewer than all tokens (top-k, top-p or min-p)
    penalized: bool  # some sequence has a repetition penalty: its sampler needs the token history
    top_n: int  # the most top logprobs a sequence asks for
    retired: int = 0  # rows of ended sequences made padding on the device

    @property
    def runs_ahead(self) -> bool:
        """No setting needs a step's tokens on the host before the next step."""
        return not self.penalized and not self.top_n


@dataclass
class Sampled:
    """A step's sampled tokens on their way to the host: the copy is started, not waited for."""

    seqs: list[Sequence]
    host: torch.Tensor  # (B, 2) float64 token ids and logprobs (float64 holds every token id exactly)
    copied: torch.cuda.Event | None  # None where the copy was synchronous (CPU)
    tops: list[dict[int, float]] | None


@dataclass
class StepCounts:
    """Where an engine's time went: steps, seconds and the longest step by kind (a step's seconds include waiting
    for the device, and a first use's compiling and capturing), uploads of a changed running set, decode steps
    launched ahead of the last one's recording, and rows of ended sequences retired without an upload."""

    prefill_steps: int = 0
    prefill_s: float = 0.0
    prefill_max_s: float = 0.0
    decode_steps: int = 0
    decode_s: float = 0.0
    decode_max_s: float = 0.0
    reloads: int = 0
    reload_s: float = 0.0
    ran_ahead: int = 0
    retired: int = 0

    def add(self, kind: str, seconds: float) -> None:
        """Count a step of this kind ("prefill" or "decode")."""
        setattr(self, f"{kind}_steps", getattr(self, f"{kind}_steps") + 1)
        setattr(self, f"{kind}_s", getattr(self, f"{kind}_s") + seconds)
        setattr(self, f"{kind}_max_s", max(getattr(self, f"{kind}_max_s"), seconds))


class SequencesFailed(RuntimeError):
    """Recording a step's tokens raised for some sequences: they are left as before the step, the others
    recorded (`advanced`); `failed` pairs each failed sequence with its error."""

    def __init__(self, advanced: list[Sequence], failed: list[tuple[Sequence, Exception]]):
        error = failed[0][1]
        super().__init__(f"{len(failed)} sequence(s) failed to record a token: {type(error).__name__}: {error}")
        self.advanced, self.failed = advanced, failed


class LLMEngine:
    """Continuous batching over a paged KV cache, sharing weights with the policy model. `compile`: torch.compile
    the decode layers and the sampler (CUDA graphs either way). A prefill step with no chunk past position 1,024 runs
    as CUDA graphs of up to `graph_prefill_tokens` prompt tokens in 64 chunks each (PrefillStep); any other through
    the packed prefill forward (compiled too with `compile_prefill`)."""

    def __init__(self, model, tokenizer, *, kv_cache_tokens: int = 65_536, block_size: int = BLOCK_SIZE,
                 max_num_seqs: int = 512, max_prefill_tokens: int = 16_384, dtype: torch.dtype | None = None,
                 share_prompts: bool = True, cuda_graphs: bool = True, compile: bool = True,
                 compile_prefill: bool = False, prefill_delay: float = 1.0, graph_prefill_tokens: int = 2048):
        num_blocks = -(-kv_cache_tokens // block_size)
        self.decoder = PagedDecoder(model, num_blocks * block_size, block_size, dtype)
        self.blocks = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_prefill_tokens)
        self.admit_seats = max(1, int(ADMIT_SHARE * max_num_seqs))
        self.tokenizer, self.share_prompts = tokenizer, share_prompts
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.block_size, self.device = block_size, self.decoder.device
        self._next_id = 0
        self._batch: RunningBatch | None = None  # of the last decode step
        self._ahead: Sampled | None = None  # a decode step launched before the last one was recorded
        self.last_step = ""  # "prefill" or "decode": what the last step() ran
        self.counts = StepCounts()
        # A request that arrives while others run waits prefill_delay x the last prefill's duration before
        # it is prefilled, so that arrivals are prefilled together: a prefill of one short prompt costs
        # about as much as of several, and as much as ~10 decode steps of the running batch.
        self.prefill_delay, self.clock, self._prefill_s = prefill_delay, time.perf_counter, 0.0
        # CUDA graphs, and the layers compiled when asked, where the Triton attention kernel runs
        decoder = self.decoder
        graphs = cuda_graphs and kernel_supports(self.device, decoder.dtype, decoder.head_dim)
        if graphs and compile:
            decoder.compile_layers(prefill=compile_prefill)
        width = self.blocks.blocks_for(decoder.max_len)
        self.decode_step = DecodeStep(decoder, max_num_seqs, width, graphs, compile)
        if graphs and compile:
            self.decode_step.prime()
        self.prefill_step = (PrefillStep(decoder, graph_prefill_tokens, width) if graphs and graph_prefill_tokens
                             else None)

    def sync_weights(self) -> None:
        """Refresh the engine's weight buffers after an optimizer step (free when it shares the policy's)."""
        self.decoder.sync_weights()

    def warmup(self) -> dict[str, float]:
        """Compile and capture now what a first use would (every batch size's decode graph, every prefill graph,
        the packed prefill layer, the sampler), so that no later step stalls for seconds: a server's batch changes
        with every request. The seconds each part took."""
        parts = {"decode graphs": self.decode_step.capture_all,
                 "prefill graphs": self.prefill_step.capture_all if self.prefill_step is not None else None,
                 "packed prefill": self._warm_packed_prefill, "sampler": self._warm_sampler}
        seconds = {}
        for part, run in parts.items():
            if run is not None:
                started = time.perf_counter()
                run()
                seconds[part] = time.perf_counter() - started
        self._batch = None  # the captures overwrote the running set's state on the device
        return seconds

    def _warm_packed_prefill(self) -> None:
        # prefills of one prompt and of several, whole and continued (a chunk after earlier ones), writing only
        # to the scratch slot; lengths that equal no dimension of a model, or torch.compile ties them to it and
        # compiles again for any other
        scratch = self.decoder.scratch_slot
        for lengths, ends in (([7], [7]), ([11, 13], [11, 13]), ([17], [29]), ([19, 11], [37, 11])):
            self.decoder.prefill([[0] * n for n in lengths], [[scratch] * end for end in ends])

    def _warm_sampler(self) -> None:
        vocab = self.decoder.w["lm_head.weight"].shape[0]
        # the sampler compiles once for one row, once for fewer rows than CHUNKED_BELOW, once for more
        for rows in (1, 2, CHUNKED_BELOW):
            for params in (SamplingParams(), SamplingParams(top_p=0.9)):  # with and without a filter
                keys, steps = (torch.zeros(rows, dtype=torch.long, device=self.device) for _ in range(2))
                # two tensors, not one twice: the compiled sampler would guard on keys being steps
                sample(torch.zeros(rows, vocab, device=self.device), SamplingBatch.of([params] * rows, self.device),
                       keys, steps, compile=self.decode_step.compile)

    def check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, saying why, for a request that could never run in this engine."""
        if len(prompt_ids) + params.max_tokens > self.decoder.max_len:
            window = (" (the model's sliding attention window, which the engine does not run past; backend=hf does)"
                      if self.decoder.max_len == self.decoder.window else "")
            raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens {params.max_tokens} exceed the "
                             f"engine's context of {self.decoder.max_len} tokens{window}")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, keys: list[int] | None = None) -> Request:
        """Queue params.n sequences of a prompt; `keys` seeds each one's sampling (random when None)."""
        self.check_fits(prompt_ids, params)
        if keys is None:
            base = request_seed(params.seed)
            keys = [sequence_key(base, i) for i in range(params.n)]
        seqs = [Sequence(self._next_id, i, list(prompt_ids), params, keys[i]) for i in range(params.n)]
        request = Request(self._next_id, seqs, shared=self.share_prompts and params.n > 1, arrived=self.clock())
        self.scheduler.add(request)
        self._next_id += 1
        return request

    def abort(self, request: Request) -> None:
        """Stop a request's unfinished sequences (finish reason `abort`) and free their blocks."""
        self.scheduler.drop(request)
        for seq in request.sequences:
            if not seq.finished:
                seq.finish_reason = "abort"
                seq.text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
                self.scheduler.finish(seq)
            elif seq.block_table:  # it ended, but an interrupt came before its blocks went back
                self.scheduler.finish(seq)

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.prefilling or self.scheduler.running)

    def step(self) -> list[Sequence]:
        """One prefill (of prompt chunks, admitting requests) or one decode step; the sequences that got a
        token."""
        started = time.perf_counter()
        advanced = self._step()
        self.counts.add(self.last_step, time.perf_counter() - started)
        return advanced

    def _step(self) -> list[Sequence]:
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            self.last_step = "decode"
            return self._decode(self.scheduler.running, ahead) if self._can_run_ahead() else self._record(ahead)
        kind, work = self.scheduler.schedule(self._admitting())
        self.last_step = kind
        if kind == "prefill":
            return self._prefill(work)
        return self._decode(list(work)) if work else []

    def _admitting(self) -> bool:
        """Whether the next prefill may admit waiting requests: nothing runs, a prompt is being prefilled in
        chunks (a prefill step comes anyway, and an arrival shares it), or the oldest has waited enough and
        enough seats are free (admit_seats, or all that the waiting requests need)."""
        scheduler = self.scheduler
        waiting = scheduler.waiting
        if not waiting:
            return False
        if not scheduler.running or scheduler.prefilling:
            return True
        free = scheduler.max_num_seqs - len(scheduler.running)
        wanted = min(self.admit_seats, len(waiting) * len(waiting[0].sequences))  # requests of one n, mostly
        return free >= wanted and self.clock() - waiting[0].arrived >= self.prefill_delay * self._prefill_s

    def _slot(self, seq: Sequence, position: int) -> int:
        """The KV cache slot of a sequence's token at this position."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        return [self._slot(seq, p) for p in range(start, end)]

    def _prefill(self, chunks: list[Chunk]) -> list[Sequence]:
        """Run a step's prompt chunks; the sequences of the prompts it completes join the running set with their
        first token."""
        started = self.clock()
        logits, firsts = self._prefill_logits(chunks)
        rows, seqs = [], []
        for chunk, first in zip(chunks, firsts, strict=True):
            request = chunk.request
            if not self.scheduler.prefilled(chunk):
                continue
            if request.shared:
                self._copy_partial_block(request)
            rows += [first if request.shared else first + i for i in range(len(request.sequences))]
            seqs += request.sequences
        if not seqs:
            return []
        advanced = self._record(self._first_tokens(seqs, logits[torch.tensor(rows, device=self.device)]))
        self._prefill_s = self.clock() - started  # _record waited for the device (a step of chunks alone does not)
        return advanced

    def _prefill_logits(self, chunks: list[Chunk]) -> tuple[torch.Tensor, list[int]]:
        """Run the chunks (each once per prompt copy it is prefilled for); (each copy's last logits, the first
        copy's row of each chunk)."""
        copies = [(chunk, seq) for chunk in chunks for seq in chunk.request.sequences[: chunk.request.rows]]
        firsts = [0]
        for chunk in chunks[:-1]:
            firsts.append(firsts[-1] + chunk.request.rows)
        tokens = [seq.prompt_ids[chunk.start : chunk.end] for chunk, seq in copies]
        step = self.prefill_step
        if step is not None and step.fits(max(chunk.end for chunk in chunks)):
            starts = [chunk.start for chunk, _ in copies]
            slots = [self._slots(seq, chunk.start, chunk.end) for chunk, seq in copies]
            return step.run(tokens, starts, slots, [seq.block_table for _, seq in copies]), firsts
        return self.decoder.prefill(tokens, [self._slots(seq, 0, chunk.end) for chunk, seq in copies]), firsts

    def _first_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> Sampled:
        """Sample each new sequence's first token from its prompt's last logits."""
        sampling = SamplingBatch.of([s.params for s in seqs], self.device)
        keys = torch.tensor([s.key for s in seqs], device=self.device)
        steps = torch.zeros(len(seqs), dtype=torch.long, device=self.device)
        history = self._history(seqs) if sampling.penalized else None
        tokens, logprobs = sample(logits, sampling, keys, steps, history, self.decode_step.compile)
        return self._to_host(seqs, torch.stack([tokens.double(), logprobs.double()], 1), logits, sampling,
                             max(s.params.top_logprobs for s in seqs))

    def _copy_partial_block(self, request: Request) -> None:
        """Give each group member its own copy of the prompt's last, partly filled block."""
        full, rest = divmod(len(request.prompt_ids), self.block_size)
        if not rest:
            return
        source = request.sequences[0].block_table[full] * self.block_size
        for seq in request.sequences[1:]:
            target = seq.block_table[full] * self.block_size
            for cache in (self.decoder.k_cache, self.decoder.v_cache):
                cache[:, target : target + rest] = cache[:, source : source + rest]

    def _decode(self, seqs: list[Sequence], current: Sampled | None = None) -> list[Sequence]:
        """Record a decode step of these sequences (launching it unless it is `current`); where the same
        sequences will run the next step, that one is launched first, so the GPU computes it while the host
        records this one (a sequence that ends here has its row of it dropped)."""
        current = current or self._launch(seqs)
        if self._can_run_ahead():
            self._ahead = self._launch(seqs)
            self.counts.ran_ahead += 1
        advanced = self._record(current)
        if self._ahead is not None and all(seq.finished for seq in self._ahead.seqs):
            self._ahead = None
        return advanced

    def _launch(self, seqs: list[Sequence]) -> Sampled:
        """Start a decode step of these sequences (and of the loaded batch's retired rows, which it carries)."""
        batch, state = self._running(seqs), self.decode_step
        rows, n = batch.rows, len(batch.rows)
        if batch.penalized:
            sampling = state.sampling(n, batch.filtered, penalized=True)
            drawn = sample(state.forward(n), sampling, state.keys[:n], state.steps[:n], self._history(rows),
                           state.compile)
            return self._to_host(rows, state.advance(n, *drawn), state.logits[:n], sampling, batch.top_n)
        return self._to_host(rows, state.step(n, batch.filtered), state.logits[:n], state.sampling(n, batch.filtered),
                             batch.top_n)

    def _can_run_ahead(self) -> bool:
        """Whether the next step may start before this one's tokens reach the host: the loaded batch runs it
        without an upload (no sequence joined, few enough rows retired; an upload reads the host's state, which
        a step in flight has moved past), no prompt chunk is to be prefilled, no waiting request is due to be
        admitted, and no setting needs the tokens on the host first (the repetition penalty's history, top
        logprobs). A sequence that ends in the step being recorded runs one step more, whose token is dropped:
        its KV writes stay within its reserved blocks (its last token is written at prompt + max_tokens - 1)."""
        batch = self._batch
        return (not self._admitting() and not self.scheduler.prefilling and batch is not None and batch.runs_ahead
                and not self._stale(batch, self.scheduler.running))

    def _stale(self, batch: RunningBatch, seqs: list[Sequence], ended: list[int] | None = None) -> bool:
        """Whether running `seqs` needs an upload: some of them are not among the batch's rows (only prefills
        add to the running set, and ended sequences leave it), or too many rows are retired. `ended`: the rows of
        ended sequences, where the caller has them."""
        count = len(self._ended(batch) if ended is None else ended)
        return len(seqs) != len(batch.rows) - count or count > RETIRED_SHARE * len(batch.rows)

    @staticmethod
    def _ended(batch: RunningBatch) -> list[int]:
        return [i for i, seq in enumerate(batch.rows) if seq.finished]

    def _running(self, seqs: list[Sequence]) -> RunningBatch:
        """The loaded batch, its rows of ended sequences retired; uploaded again with `seqs` where it is stale."""
        batch = self._batch
        ended = self._ended(batch) if batch is not None else []
        if batch is None or self._stale(batch, seqs, ended):
            started = time.perf_counter()
            self.decode_step.load(seqs)
            self.counts.reloads += 1
            self.counts.reload_s += time.perf_counter() - started
            params = [seq.params for seq in seqs]
            self._batch = batch = RunningBatch(list(seqs), any(p.filtered for p in params),
                                               any(p.penalized for p in params), max(p.top_logprobs for p in params))
            ended = []  # a new batch: its sequences run
        if len(ended) > batch.retired:
            self.decode_step.retire(ended)  # the earlier ones again: no bookkeeping of which are new
            self.counts.retired += len(ended) - batch.retired
            batch.retired = len(ended)
        return batch

    def _to_host(self, seqs: list[Sequence], pair: torch.Tensor, logits: torch.Tensor, sampling: SamplingBatch,
                 top_n: int) -> Sampled:
        """Start copying a step's (B, 2) tokens and logprobs to the host (with the top_n logprobs of each row,
        where asked)."""
        tops = top_logprobs(logits, sampling, top_n) if top_n else None
        if not pair.is_cuda:
            return Sampled(seqs, pair.clone(), None, tops)  # the step's buffer is overwritten by the next step
        host = torch.empty(pair.shape, dtype=pair.dtype, pin_memory=True).copy_(pair, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return Sampled(seqs, host, copied, tops)

    def _record(self, sampled: Sampled) -> list[Sequence]:
        """Append each sequence's token once it is on the host and end the sequences that are done; where that
        raises for some sequences, the others are still recorded and SequencesFailed names both."""
        if sampled.copied is not None:
            sampled.copied.synchronize()
        advanced, failed = [], []
        for i, (seq, (token, logprob)) in enumerate(zip(sampled.seqs, sampled.host.tolist(), strict=True)):
            if seq.finished:  # ended (or aborted) before this step, which ran ahead: its token is dropped
                continue
            try:
                self._append(seq, int(token), logprob, sampled.tops[i] if seq.params.top_logprobs else None)
            except Exception as error:  # noqa: BLE001 - one sequence's failure (its text, say) is its own
                failed.append((seq, error))
                continue
            if seq.finished:
                self.scheduler.finish(seq)
            advanced.append(seq)
        if failed:
            raise SequencesFailed(advanced, failed)
        return advanced

    def _append(self, seq: Sequence, token: int, logprob: float, tops: dict[int, float] | None) -> None:
        """Give a sequence its token; if that raises, the sequence is left as it was (its step can be retried)."""
        top = dict(list(tops.items())[: seq.params.top_logprobs]) if tops is not None else None
        seq.output_ids.append(token)
        try:
            self._check_finished(seq)  # sets the finish reason and text together, or neither
        except Exception:
            seq.output_ids.pop()
            raise
        seq.logprobs.append(logprob)
        if top is not None:
            seq.top_logprobs.append(top)

    def isolate_failure(self, error: Exception) -> tuple[list[Sequence], list[tuple[Sequence, Exception]]]:
        """After a decode step raised `error`: (the sequences that got this step's token, (sequence, error) of
        each whose own step fails). A step that failed as a whole is retried in halves until each failing
        sequence runs alone. The failing ones stay running, for the caller to abort their requests."""
        # the device's copy of the running set is ahead of the host's (a step launched, never recorded): the
        # retry loads it again, and a step run ahead is dropped
        self._ahead = self._batch = None
        if isinstance(error, SequencesFailed):
            return error.advanced, error.failed
        return self._bisect(list(self.scheduler.running))

    def _bisect(self, seqs: list[Sequence]) -> tuple[list[Sequence], list[tuple[Sequence, Exception]]]:
        """One decode step of these sequences; where it raises, one of each half, down to single sequences."""
        self._batch = None  # a part of the running set: uploaded for this step (staleness is judged on the whole)
        try:
            return self._record(self._launch(seqs)), []
        except Exception as error:  # noqa: BLE001 - a failing sequence is found, not propagated
            self._batch = None  # the step may have advanced the device's copy of sequences it did not record
            if isinstance(error, SequencesFailed):
                return error.advanced, error.failed
            if len(seqs) <= 1:
                return [], [(seq, error) for seq in seqs]
            half = len(seqs) // 2
            (first, failed_first), (second, failed_second) = self._bisect(seqs[:half]), self._bisect(seqs[half:])
            return first + second, failed_first + failed_second

    def _history(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(s.length for s in seqs)
        return torch.tensor([s.token_ids + [-1] * (width - s.length) for s in seqs], device=self.device)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _check_finished(self, seq: Sequence) -> None:
        params = seq.params
        if seq.output_ids[-1] in self.eos_ids and not params.ignore_eos:
            seq.finish_reason, seq.text = "stop", self._text(seq.output_ids[:-1])
        elif params.stop and (cut := cut_at_stop(self._text(seq.output_ids), params.stop)) is not None:
            seq.finish_reason, seq.text = "stop", cut
        elif len(seq.output_ids) >= params.max_tokens:
            seq.finish_reason, seq.text = "length", self._text(seq.output_ids)


class EngineGenerator:
    """The Generator interface over LLMEngine: same prompts and seed give the HF backend's tokens."""

    def __init__(self, model, tokenizer, **engine_options):
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, **engine_options)

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids as this generator feeds them to the model."""
        return encode_prompt(self.tokenizer, prompt)

    def sync_weights(self) -> None:
        self.engine.sync_weights()

    def generate(self, prompts: list[str], params: SamplingParams, progress: Progress | None = None
                 ) -> list[Completion]:
        """n completions per prompt, grouped by prompt in prompt order."""
        rounds = self.generate_rounds([(prompts, params)], progress)
        try:
            return next(rounds)
        finally:
            rounds.close()

    def generate_rounds(self, rounds: Iterable[Round], progress: Progress | None = None
                        ) -> Iterator[list[Completion]]:
        """generate() of each round in turn, the next round queued while this one runs: its prompts take the
        seats this round's last sequences leave free, so the batch stays full across rounds instead of draining
        to the longest sample of each (a GSM8K eval's round ends with hundreds of decode steps of a few rows).
        A round that cannot be queued (a prompt too long) raises once the rounds before it are yielded."""
        rounds = iter(rounds)
        queued: deque[_EngineRound] = deque()
        owner: dict[int, _EngineRound] = {}  # request id -> its round
        refused: Exception | None = None

        def queue_next() -> None:
            nonlocal refused
            if refused is None and (item := next(rounds, None)) is not None:
                try:
                    queued.append(self._queue(*item))
                except ValueError as error:
                    refused = error
                    return
                owner.update((request.id, queued[-1]) for request in queued[-1].requests)

        try:
            queue_next()
            while queued:
                queue_next()
                current = queued[0]
                while current.pending:
                    if not self.engine.has_work():
                        raise RuntimeError(f"the engine ran out of work with {current.pending} sequences unfinished")
                    finished = [seq for seq in self.engine.step() if seq.finished]
                    for seq in finished:
                        if (round_ := owner.get(seq.request_id)) is not None:  # not a request left by another caller
                            round_.pending -= 1
                    if progress and finished:
                        progress(len(finished))
                queued.popleft()
                for request in current.requests:
                    del owner[request.id]
                yield current.completions()
            if refused is not None:
                raise refused
        finally:  # closed early (a stop, an error): what was queued ahead leaves the engine
            for request in (r for round_ in queued for r in round_.requests):
                self.engine.abort(request)

    def _queue(self, prompts: list[str], params: SamplingParams) -> _EngineRound:
        """Add a round's requests to the engine: all of them, or (ValueError) none."""
        encoded = encode_prompts(self.tokenizer, prompts)
        for ids in encoded:
            self.engine.check_fits(ids, params)
        seed = request_seed(params.seed)
        keys = [[sequence_key(seed, i * params.n + s) for s in range(params.n)] for i in range(len(encoded))]
        requests = [self.engine.add_request(ids, params, keys[i]) for i, ids in enumerate(encoded)]
        return _EngineRound(requests, params, pending=len(prompts) * params.n)


@dataclass
class _EngineRound:
    """A round of generate_rounds in the engine: its requests and how many of their sequences run still."""

    requests: list[Request]
    params: SamplingParams
    pending: int

    def completions(self) -> list[Completion]:
        """n completions per prompt, grouped by prompt in prompt order."""
        return [Completion(text=seq.text, token_ids=seq.output_ids, logprobs=seq.logprobs,
                           finish_reason=seq.finish_reason, prompt_index=i,
                           top_logprobs=seq.top_logprobs if self.params.top_logprobs else None)
                for i, request in enumerate(self.requests) for seq in request.sequences]
