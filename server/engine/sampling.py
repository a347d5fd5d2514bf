"""Next-token sampling for a batch whose rows each carry their own request's parameters.

The model thread calls `Sampler` once per decode step with the last position's logits of every
running sequence. Softmax, the nucleus sort and the top-p mask run over the whole batch; only the
draw is per row, because `torch.multinomial` takes one generator and a seeded request must draw
from its own generator alone: its ids then depend on its seed and logits, never on its batch
mates. Unseeded rows share the global RNG and are drawn together.

Log-probabilities are those OpenAI reports: of the model's distribution, `log_softmax(logits)`,
before temperature and top-p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "MAX_LOGPROBS",
    "MAX_STOP",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "make_generator",
    "prompt_logprobs",
]

MAX_LOGPROBS = 5  # the legacy completions API's limit
MAX_STOP = 4
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts

TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int  # >= 1
    temperature: float = 1.0  # >= 0; 0 is greedy (argmax)
    top_p: float = 1.0  # in (0, 1]
    seed: int | None = None
    logprobs: int | None = None  # alternatives reported per token, 0..5; None: no logprobs
    echo: bool = False
    stop: tuple[str, ...] = ()  # up to 4 non-empty strings
    ignore_eos: bool = False  # go on past EOS to max_tokens (benchmarks; vLLM's extension)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        # A list from a request body is accepted; the frozen params keep a (hashable) tuple.
        object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`; None (the global RNG) when there is no seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True, slots=True)
class SampleResult:
    ids: Tensor  # [B] long: the chosen tokens
    logprobs: Tensor  # [B] float32: log p(chosen) under log_softmax(logits)
    # Per row: the k most likely (id, logprob), most likely first, for params.logprobs == k;
    # None for rows that asked for no logprobs.
    top: list[TopLogprobs | None]


class Sampler:
    """Samples the next token of each row of a batch, with that row's params and generator."""

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> SampleResult:
        B, _V = logits.shape
        if len(params) != B or len(generators) != B:
            raise ValueError(
                f"{B} rows of logits but {len(params)} params and {len(generators)} generators"
            )
        logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1)  # [B, V]
        ids = torch.argmax(logits, dim=-1)  # [B]; greedy rows keep it

        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = _nucleus_probs(
                logits[rows],
                temperature=[params[i].temperature for i in sampled],
                top_p=[params[i].top_p for i in sampled],
            )  # [S, V], unnormalised
            ids[rows] = _draw(probs, [generators[i] for i in sampled])

        chosen = logp.gather(1, ids[:, None]).squeeze(1)  # [B]
        return SampleResult(ids=ids, logprobs=chosen, top=_top_logprobs(logp, params))


def _nucleus_probs(logits: Tensor, *, temperature: list[float], top_p: list[float]) -> Tensor:
    """Softmax of `logits / T` per row, with the tokens outside each row's top-p nucleus zeroed."""
    device = logits.device
    T = torch.tensor(temperature, device=device)[:, None]  # [S, 1]
    # The max is taken out before dividing, so a tiny temperature sends the other logits to
    # -inf (probability 0) rather than the top one to +inf (NaN).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / T  # [S, V]
    probs = torch.softmax(scaled, dim=-1)
    if all(p >= 1 for p in top_p):
        return probs
    p = torch.tensor(top_p, device=device)[:, None]  # [S, 1]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # [S, V] each
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ranked above each token
    # A token is in the nucleus while the mass above it is short of top_p: the top token always
    # is (0 < top_p). Rows with top_p == 1 keep everything, whatever the cumsum's rounding says.
    keep_sorted = (before < p) | (p >= 1)
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return probs * keep


def _draw(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """One token per row of `probs` [S, V]: seeded rows from their generators, the rest at once."""
    out = torch.empty(len(generators), dtype=torch.long, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        out[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out


def _top_logprobs(logp: Tensor, params: Sequence[SamplingParams]) -> list[TopLogprobs | None]:
    """Each row's top-k (id, logprob) from one `topk` over the batch with the largest k asked."""
    k_max = min(max((p.logprobs or 0 for p in params), default=0), logp.shape[1])
    if k_max == 0:
        return [None if p.logprobs is None else [] for p in params]
    values, indices = torch.topk(logp, k_max, dim=-1)  # [B, k_max] each, descending
    top: list[TopLogprobs | None] = []
    for p, row_ids, row_values in zip(params, indices.tolist(), values.tolist(), strict=True):
        k = p.logprobs
        top.append(None if k is None else list(zip(row_ids[:k], row_values[:k], strict=True)))
    return top


def prompt_logprobs(
    logits: Tensor, tokens: Sequence[int], k: int
) -> list[tuple[float | None, TopLogprobs]]:
    """Logprob of each prompt token given its prefix, and the top-k alternatives at its position.

    `logits` [T, V] are the prefill logits of the T prompt tokens: row t predicts token t + 1.
    The first token has no prefix: (None, []).
    """
    T = len(tokens)
    if logits.ndim != 2 or logits.shape[0] != T:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {T} prompt tokens")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if T == 0:
        return []
    k = min(k, logits.shape[1])
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)  # [T-1, V]: predictions of 1..T-1
    targets = torch.tensor(tokens[1:], dtype=torch.long, device=logits.device)[:, None]
    chosen: list[float] = logp.gather(1, targets).squeeze(1).tolist()  # [T-1]
    if k > 0:
        values, indices = torch.topk(logp, k, dim=-1)  # [T-1, k] each
        tops = [
            list(zip(i, v, strict=True))
            for i, v in zip(indices.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [[] for _ in chosen]
    first: tuple[float | None, TopLogprobs] = (None, [])
    return [first, *zip(chosen, tops, strict=True)]
