"""Next-token sampling for a batch whose rows each carry their own request's parameters.

The model thread calls `Sampler` once per decode step with the last position's logits of every
running sequence. Softmax, the nucleus sort and the top-p mask run over the whole batch; only the
draw is per row, because `torch.multinomial` takes one generator and a seeded request must draw
from its own generator alone: its ids then depend on its seed and logits, never on its batch
mates. Unseeded rows share the global RNG and are drawn together.

No row can fail another. A row whose logits are not finite (a corrupt memory block, say) or
whose distribution cannot be drawn from is reported in `SampleResult.errors` and left out of
the draw; the other rows get the tokens they would get without it. Parameters that cannot be
sampled as asked are read as vLLM reads them: a temperature below `SAMPLING_EPS` is greedy, and
the top-p nucleus always holds the most likely token however small top_p is.

Log-probabilities are those OpenAI reports: of the model's distribution, `log_softmax(logits)`,
before temperature and top-p.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.engine.errors import RequestError

__all__ = [
    "MAX_LOGPROBS",
    "MAX_STOP",
    "NON_FINITE_LOGITS",
    "SAMPLING_EPS",
    "SampleResult",
    "Sampler",
    "SamplingParams",
    "TopLogprobs",
    "make_generator",
    "prompt_logprobs",
]

MAX_LOGPROBS = 20  # vLLM's default max_logprobs; the chat API's top_logprobs goes to 20
MAX_STOP = 32  # lm-evaluation-harness tasks send several `until` strings
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by them overflows.
SAMPLING_EPS = 1e-5
NON_FINITE_LOGITS = (
    "the model's output for this sequence is not finite (NaN or inf); "
    "one of its memory blocks may be corrupt"
)
_UNDRAWABLE = "this sequence's sampling distribution cannot be drawn from"
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


def nth_seed(seed: int, n: int) -> int:
    """The seed of a request's `n`-th choice: `seed + n`, wrapped back into the accepted range
    past its top (a valid seed never makes an invalid one)."""
    value = seed + n
    return value - 2**64 if value > _SEED_MAX else value


TopLogprobs = list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int  # >= 1
    temperature: float = 1.0  # >= 0; below SAMPLING_EPS (0 included) is greedy (argmax)
    top_p: float = 1.0  # in (0, 1]; however small, the most likely token stays in the nucleus
    seed: int | None = None
    logprobs: int | None = None  # alternatives per token, 0..MAX_LOGPROBS; None: no logprobs
    echo: bool = False
    stop: tuple[str, ...] = ()  # up to MAX_STOP non-empty strings
    ignore_eos: bool = False  # go on past EOS to max_tokens (benchmarks; vLLM's extension)

    def __post_init__(self) -> None:
        # The one place these rules are checked: the API's schemas only document them.
        if self.max_tokens < 1:
            raise _invalid("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise _invalid("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise _invalid("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise _invalid("seed", f"must be in [{_SEED_MIN}, {_SEED_MAX}], got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise _invalid("logprobs", f"must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        # A list from a request body is accepted; the frozen params keep a (hashable) tuple.
        object.__setattr__(self, "stop", tuple(self.stop))
        if len(self.stop) > MAX_STOP:
            raise _invalid("stop", f"takes at most {MAX_STOP} strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise _invalid("stop", "strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def _invalid(param: str, rule: str) -> RequestError:
    return RequestError(f"{param} {rule}", param=param)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`; None (the global RNG) when there is no seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True, slots=True)
class SampleResult:
    ids: Tensor  # [B] long: the chosen tokens
    logprobs: Tensor  # [B] float32: log p(chosen) under log_softmax(logits)
    # Per row: the k most likely (id, logprob), most likely first, for params.logprobs == k
    # ([] for k == 0); None for rows that asked for no logprobs, and for failed rows.
    top: list[TopLogprobs | None]
    # Per row: None, or why the row could not be sampled (its id and logprob then mean nothing);
    # the caller ends that sequence with this message and goes on with the others.
    errors: list[str | None]


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
        # One reduction over the batch: a NaN or inf anywhere in a row poisons its softmax.
        finite = torch.isfinite(logits).all(dim=-1)  # [B]

        sampled = [i for i, p in enumerate(params) if not p.greedy]
        probs: Tensor | None = None
        drawable = finite
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            probs = _nucleus_probs(
                logits[rows],
                temperature=[params[i].temperature for i in sampled],
                top_p=[params[i].top_p for i in sampled],
            )  # [S, V], unnormalised
            drawable = finite.clone()
            drawable[rows] &= _drawable(probs)
        # The one host sync of the checks: [finite (B), drawable (B)].
        flags = torch.cat([finite, drawable]).tolist()
        errors: list[str | None] = [
            None if ok else (_UNDRAWABLE if fin else NON_FINITE_LOGITS)
            for fin, ok in zip(flags[:B], flags[B:], strict=True)
        ]

        if probs is not None:
            # Only rows that can be drawn from go to multinomial: on CUDA an invalid row is a
            # device-side assert that no exception handler can catch.
            keep = [j for j, i in enumerate(sampled) if errors[i] is None]
            if keep:
                picked = probs if len(keep) == len(sampled) else probs[keep]
                drawn, draw_errors = _draw(picked, [generators[sampled[j]] for j in keep])
                at = torch.tensor([sampled[j] for j in keep], device=logits.device)
                ids[at] = drawn
                for j, err in zip(keep, draw_errors, strict=True):
                    errors[sampled[j]] = err

        chosen = logp.gather(1, ids[:, None]).squeeze(1)  # [B]
        top = _top_logprobs(logp, params)
        top = [None if err is not None else t for t, err in zip(top, errors, strict=True)]
        return SampleResult(ids=ids, logprobs=chosen, top=top, errors=errors)


def _nucleus_probs(logits: Tensor, *, temperature: list[float], top_p: list[float]) -> Tensor:
    """Softmax of `logits / T` per row, with the tokens outside each row's top-p nucleus zeroed."""
    device = logits.device
    # A temperature past float32's range would be inf here, and -inf / inf is NaN.
    T = torch.tensor(temperature, device=device).clamp_(max=torch.finfo(torch.float32).max)
    T = T[:, None]  # [S, 1]
    # The max is taken out before dividing, so a tiny temperature sends the other logits to
    # -inf (probability 0) rather than the top one to +inf (NaN).
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / T  # [S, V]
    probs = torch.softmax(scaled, dim=-1)
    if all(p >= 1 for p in top_p):
        return probs
    # A top_p below float32's smallest subnormal (5e-324, say) is 0 here: hence the top token
    # is kept below whatever `before < p` says.
    p = torch.tensor(top_p, device=device)[:, None]  # [S, 1]
    # Stable, so that among tied tokens the lowest id ranks first, as argmax picks it.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)  # [S, V] each
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ranked above each token
    # A token is in the nucleus while the mass above it is short of top_p. Rows with
    # top_p == 1 keep everything, whatever the cumsum's rounding says.
    keep_sorted = (before < p) | (p >= 1)
    keep_sorted[:, 0] = True
    keep = torch.empty_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return probs * keep


def _drawable(probs: Tensor) -> Tensor:
    """[S] bool: rows of `probs` [S, V] that `torch.multinomial` accepts.

    Softmax times a mask is never negative, and a NaN or inf anywhere shows in the row's sum.
    """
    total = probs.sum(dim=-1)  # [S]
    return torch.isfinite(total) & (total > 0)


def _draw(
    probs: Tensor, generators: list[torch.Generator | None]
) -> tuple[Tensor, list[str | None]]:
    """One token per row of `probs` [S, V]: seeded rows from their generators, the rest at once.

    A row whose draw raises is reported (the second list) rather than raised, so it fails alone.
    """
    out = torch.zeros(len(generators), dtype=torch.long, device=probs.device)
    errors: list[str | None] = [None] * len(generators)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        rows = torch.tensor(unseeded, device=probs.device)
        try:
            out[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
        except RuntimeError:
            # One bad row fails the whole call: draw each row alone to single it out.
            for i in unseeded:
                errors[i] = _draw_one(probs[i], None, out, i)
    for i, g in enumerate(generators):
        if g is not None:
            errors[i] = _draw_one(probs[i], g, out, i)
    return out, errors


def _draw_one(probs: Tensor, generator: torch.Generator | None, out: Tensor, i: int) -> str | None:
    """Draw `out[i]` from `probs` [V]; the reason when it cannot be drawn."""
    try:
        out[i] = torch.multinomial(probs, 1, generator=generator)[0]
    except RuntimeError as exc:
        return f"sampling failed: {exc}"
    return None


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
    The first token has no prefix: (None, []). Raises ValueError (`NON_FINITE_LOGITS`) when
    the logits are not finite, rather than return NaN, which no JSON encoder should send.
    """
    T = len(tokens)
    if logits.ndim != 2 or logits.shape[0] != T:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {T} prompt tokens")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if T == 0:
        return []
    k = min(k, logits.shape[1])
    scored = logits[:-1].float()  # [T-1, V]: predictions of 1..T-1
    if not bool(torch.isfinite(scored).all()):
        raise ValueError(NON_FINITE_LOGITS)
    logp = torch.log_softmax(scored, dim=-1)  # [T-1, V]
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
