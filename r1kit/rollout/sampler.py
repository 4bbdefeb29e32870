"""Token sampling on the device, shared by every backend.

Per-row settings (temperature, top-k, top-p, min-p) are tensors, so one call serves a batch of
requests with different settings. Randomness is Gumbel-max with noise hashed from a per-sequence key
and the token position: a sequence samples the same tokens whatever else is in its batch, which makes
continuous batching, group sharing and the HF backend agree token for token under a fixed seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1kit.rollout.compiled import compiled
from r1kit.rollout.thresholds import kernel_filters, threshold_filter
from r1kit.rollout.types import SamplingParams

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of an int64 tensor, elementwise."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def request_seed(seed: int | None) -> int:
    """The seed a request samples with: its own, or a fresh random one."""
    return seed if seed is not None else int(torch.randint(0, 2**31, ()).item())


def sequence_key(seed: int, index: int) -> int:
    """The key of the index-th sequence of a seeded request."""
    return int(hash32(torch.tensor([(seed * _GOLDEN + index) & _MASK32]) ^ 0x5BD1E995).item())


def shifted_seed(seed: int, first: int) -> int:
    """The request seed whose sequences sample as the sequences from `first` on of a request under `seed`:
    a key hashes (seed * GOLDEN + index) mod 2^32, so adding first / GOLDEN mod 2^32 to the seed adds `first`
    to every index (a rank's slice of a step samples as it would in the one-process step)."""
    return (seed + first * pow(_GOLDEN, -1, 2**32)) % 2**32 if first else seed


def column_codes(vocab: int, device: torch.device) -> torch.Tensor:
    """Each token id's share of the noise hash, as an int64 tensor.

    Passed in rather than computed from an arange, which torch.compile turns into an int32 index
    that the 32-bit constants overflow."""
    return torch.arange(vocab, device=device, dtype=torch.int64) * _GOLDEN


def uniform_noise(keys: torch.Tensor, steps: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, vocab) uniforms in (0, 1), a pure function of each row's (key, step); `codes` from column_codes."""
    row = hash32(keys.to(torch.int64) ^ hash32(steps.to(torch.int64) * _GOLDEN))
    return to_unit(hash32(row[:, None] ^ codes[None, :]))


def to_unit(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes to float32 uniforms strictly inside (0, 1).

    23 bits, not 24: (2^24 - 0.5) / 2^24 rounds to 1.0 in float32, and a uniform of 1.0 is an infinite
    Gumbel draw that wins over any logit (seen as a stray token once every few hundred steps).
    """
    return ((bits >> 9).to(torch.float32) + 0.5) / float(1 << 23)


@dataclass
class SamplingBatch:
    """Sampling settings of a batch, one entry per row."""

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    filtered: bool = True  # some row keeps fewer than all tokens (top-k, top-p or min-p)
    penalized: bool = False  # some row has a repetition penalty (then sample() needs the token history)

    @classmethod
    def of(cls, params: list[SamplingParams], device: torch.device | str) -> SamplingBatch:
        """The settings of each row's SamplingParams as tensors."""
        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        # decided on the host, so that checking them costs no device synchronization
        filtered, penalized = any(p.filtered for p in params), any(p.penalized for p in params)
        return cls(column("temperature", torch.float32), column("top_k", torch.int64),
                   column("top_p", torch.float32), column("min_p", torch.float32),
                   column("repetition_penalty", torch.float32), filtered, penalized)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
                  ) -> torch.Tensor:
    """Logits outside each row's top-k, min-p and (then) nucleus set to -inf; the top token is always kept.

    top-k 0, top-p 1 and min-p 0 keep everything. The nucleus is taken over the distribution left after
    top-k and min-p.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k[:, None] > 0) & (ranks[None, :] >= top_k[:, None])
    probs = sorted_logits.softmax(-1)
    drop |= probs < min_p[:, None] * probs[:, :1]
    kept = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (kept.cumsum(-1) - kept) >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def penalize(logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's repetition penalty: logits of tokens in each row's history (B, L; -1 pads) divided by the
    penalty when positive, multiplied when negative."""
    counts = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(
        1, history.clamp(min=0), (history >= 0).to(torch.int32))
    p = penalty[:, None]
    return torch.where(counts > 0, torch.where(logits > 0, logits / p, logits * p), logits)


def _scale(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits / T per row, T=1 for greedy rows."""
    return logits / torch.where(temperature == 0, torch.ones_like(temperature), temperature)[:, None]


def sample(logits: torch.Tensor, batch: SamplingBatch, keys: torch.Tensor, steps: torch.Tensor,
           history: torch.Tensor | None = None, compile: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs) for (B, vocab) float32 logits; a row with temperature 0 is greedy.

    logprobs are log softmax(logits / T) of the chosen token, untruncated by top-k/top-p/min-p and
    unpenalized (raw logits for greedy rows): what the trainer's forward computes for the same token.
    `history` (B, L) holds the tokens the repetition penalty looks at. On a GPU the draw runs compiled unless
    `compile` is False (the same tokens either way).
    """
    choice = None  # the scores tokens are drawn from, when they differ from logits / T
    if history is not None and batch.penalized:
        choice = _scale(penalize(logits, history, batch.repetition_penalty), batch.temperature)
    # filtering is the sampler's main cost (a sort of the vocabulary, or on a GPU a search of it): skip it when
    # nothing is cut
    if batch.filtered:
        scores = _scale(logits, batch.temperature) if choice is None else choice
        cut = threshold_filter if kernel_filters(scores) else filter_logits
        choice = cut(scores, batch.top_k, batch.top_p, batch.min_p)
    where = (logits.shape[-1], logits.device)
    if where not in _codes:
        _codes[where] = column_codes(*where)
    args = (logits, batch.temperature, keys, steps, _codes[where], choice)
    return _compiled(*args) if compile and logits.is_cuda else draw(*args)


CHUNKED_BELOW = 64  # rows: from here on a batch fills the GPU, and one pass shares its reads with log-softmax


def chunked_argmax(x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """argmax over the last dimension (the first of equal maxima, as torch.argmax); for fewer than
    CHUNKED_BELOW rows in two stages, per chunk of columns and then over the chunks: compiled, a batch of
    one row spreads over a GPU program per chunk where one program would walk the whole vocabulary (35 us
    of a 1-ms decode step on the H200)."""
    rows, width = x.shape
    if rows >= CHUNKED_BELOW:
        return x.argmax(-1)
    if width % chunk:
        x = F.pad(x, (0, chunk - width % chunk), value=float("-inf"))
    values, within = x.view(rows, -1, chunk).max(-1)
    best = values.argmax(-1, keepdim=True)
    return (best * chunk + within.gather(-1, best)).squeeze(-1)


def draw(logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor,
         codes: torch.Tensor, choice: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens drawn from softmax(choice) by Gumbel-max with noise hashed from each row's (key, step), argmax
    for greedy rows, and their log softmax(logits / T); choice defaults to logits / T. `codes` from
    column_codes."""
    scaled = _scale(logits, temperature)
    choice = scaled if choice is None else choice
    noisy = choice - torch.log(-torch.log(uniform_noise(keys, steps, codes)))
    tokens = chunked_argmax(torch.where((temperature == 0)[:, None], choice, noisy))  # one pass for both kinds
    return tokens, scaled.gather(-1, tokens[:, None]).squeeze(-1) - scaled.logsumexp(-1)


_codes: dict[tuple[int, torch.device], torch.Tensor] = {}
_compiled_draw = None


def as_views(args) -> list:
    """The tensors among args as views of themselves (the rest as they are).

    torch.compile guards on whether an input is a view: the decode step's slices of its buffers and the
    prefill's fresh tensors would each need their own compilations of the sampler, and the two kinds
    together pass torch's limit of 8 (after which it runs eagerly). As views, they share them."""
    return [a.view(a.shape) if isinstance(a, torch.Tensor) else a for a in args]


def _compiled(*args) -> tuple[torch.Tensor, torch.Tensor]:
    # on a GPU the hash, noise, argmax and log softmax are ~30 passes over (batch, vocab); compiled, two
    global _compiled_draw
    if _compiled_draw is None:
        _compiled_draw = compiled(draw, "the sampler")
    return _compiled_draw(*as_views(args))


def top_logprobs(logits: torch.Tensor, batch: SamplingBatch, n: int) -> list[dict[int, float]]:
    """The n most likely tokens of each row with their logprobs under softmax(logits / T)."""
    values, ids = _scale(logits, batch.temperature).log_softmax(-1).topk(n, dim=-1)
    return [dict(zip(row_ids, row_values, strict=True)) for row_ids, row_values in zip(ids.tolist(), values.tolist(),
                                                                                        strict=True)]
