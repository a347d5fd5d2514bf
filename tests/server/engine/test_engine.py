"""The engine: continuous batching on a model thread, each sequence with its own memory.

A tiny random anchor on CPU and random FFN memory blocks (non-zero `down`, so they change the
logits). The reference for every greedy sequence is `greedy_decode` of that sequence alone: the
engine's batching, admission mid-flight, heterogeneous memories and row compaction must not
change a single token.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from server.engine.engine import (
    EndEvent,
    Engine,
    EngineClosedError,
    EngineOverloadedError,
    EngineSequence,
    Event,
    PromptEvent,
    TokenEvent,
)
from server.engine.sampling import SamplingParams
from server.model.anchor import Anchor
from server.model.memory import MemoryBlock
from server.model.memory_batch import build_memory_batch
from server.training.evaluate import greedy_decode
from tests.server.engine.engine_helpers import (
    CFG,
    LONG,
    Request,
    block,
    collect,
    first_tokens,
    greedy,
    prompt,
)

# -- exactness ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    prompt: list[int]
    memory: list[MemoryBlock]
    max_tokens: int


async def test_staggered_sequences_decode_exactly_as_each_would_alone(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    a, b, c = block(8, seed=1), block(4, seed=2), block(12, seed=3)
    cases = {
        "first": Case(prompt(5, 0), [a, b], 48),
        "bare": Case(prompt(9, 1), [], 6),
        "wide": Case(prompt(3, 2), [c], 20),
        "short": Case(prompt(7, 3), [a], 3),
        "all": Case(prompt(2, 4), [b, c, a], 11),
        "one": Case(prompt(1, 5), [b], 1),
        "late": Case(prompt(11, 6), [c, b], 9),
    }
    expected = {
        name: greedy_decode(model, [k.prompt], max_new_tokens=k.max_tokens, memory=[k.memory])[0]
        for name, k in cases.items()
    }
    # The memories matter: without them some sequence would decode differently.
    assert any(
        expected[name] != greedy_decode(model, [k.prompt], max_new_tokens=k.max_tokens)[0]
        for name, k in cases.items()
        if k.memory
    )

    engine = engines(max_batch=3, max_queue=16)

    def submit(*names: str) -> list[EngineSequence]:
        requests = [(cases[n].prompt, greedy(cases[n].max_tokens), cases[n].memory) for n in names]
        return engine.submit(requests)

    (first,) = submit("first")
    first_stream = first.stream()
    head = await first_tokens(first_stream, 2)
    # More than the free slots: some wait in the queue and are admitted as others end.
    group = submit("bare", "wide", "short", "all", "one")
    wide_stream = group[1].stream()
    wide_head = await first_tokens(wide_stream, 3)
    (late,) = submit("late")  # joins whatever is running by now

    runs = await asyncio.gather(
        collect(first, first_stream),
        collect(group[0]),
        collect(group[1], wide_stream),
        *(collect(g) for g in group[2:]),
        collect(late),
    )
    got = dict(zip(["first", "bare", "wide", "short", "all", "one", "late"], runs, strict=True))
    got["first"].tokens[:0] = head
    got["wide"].tokens[:0] = wide_head
    for name, run in got.items():
        assert run.tokens == expected[name], name
        assert run.reason == "length", name
        assert len(run.tokens) == cases[name].max_tokens
    stats = engine.stats()
    assert stats.tokens == sum(k.max_tokens for k in cases.values())
    # The five submitted at once were admitted together, as slots allowed, and decoded side by
    # side: fewer steps than one sequence at a time would take.
    assert stats.steps < sum(k.max_tokens - 1 for k in cases.values())
    assert (stats.waiting, stats.max_batch, stats.max_queue) == (0, 3, 16)


async def test_a_seeded_sample_is_the_same_alone_and_batched(
    engines: Callable[..., Engine],
) -> None:
    memory = [block(8, seed=7)]
    sampled: Request = (
        prompt(6, 10),
        SamplingParams(max_tokens=16, temperature=1.0, seed=1234),
        memory,
    )

    alone_engine = engines(max_batch=4)
    (alone,) = alone_engine.submit([sampled])
    alone_run = await collect(alone)

    engine = engines(max_batch=4)
    others: list[Request] = [
        (prompt(3, 11), SamplingParams(max_tokens=20, temperature=1.0), [block(4, seed=8)]),
        (prompt(9, 12), greedy(5), []),
        (prompt(4, 13), SamplingParams(max_tokens=30, temperature=0.7, seed=99), memory),
    ]
    (long_one,) = engine.submit([others[0]])
    await first_tokens(long_one.stream(), 1)  # the sampled one now joins a running batch
    gens = engine.submit([others[1], sampled, others[2]])
    runs = await asyncio.gather(*(collect(g) for g in gens))
    assert runs[1].tokens == alone_run.tokens
    assert len(alone_run.tokens) == 16
    assert alone_run.reason == "length"

    other_seed: Request = (
        sampled[0],
        SamplingParams(max_tokens=16, temperature=1.0, seed=4321),
        memory,
    )
    (different,) = engine.submit([other_seed])
    assert (await collect(different)).tokens != alone_run.tokens


# -- endings --------------------------------------------------------------------------------------


async def test_eos_ends_a_sequence_with_stop_and_is_not_sent(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    memory = [block(8, seed=21)]
    p = prompt(6, 20)
    plain = greedy_decode(model, [p], max_new_tokens=10, memory=[memory])[0]
    # An EOS id greedy reaches after at least one other token.
    eos_at = next(i for i in range(1, len(plain)) if plain[i] not in plain[:i])
    eos = plain[eos_at]
    engine = engines(max_batch=2, eos_ids=[eos])
    other: Request = (prompt(4, 21), greedy(12), [])
    other_expected = greedy_decode(model, [other[0]], max_new_tokens=12, eos_ids={eos})[0]
    gen, other_gen = engine.submit([(p, greedy(10), memory), other])
    run, other_run = await collect(gen), await collect(other_gen)
    assert run.tokens == plain[:eos_at]
    assert eos not in run.tokens
    assert run.reason == "stop"
    assert isinstance(run.events[-1], EndEvent)
    assert run.events[-1].error is None
    assert gen.events.empty()  # and nothing after its end
    assert other_run.tokens == other_expected  # its batch mate's EOS changed nothing for it


@pytest.mark.parametrize("max_tokens", [1, 2, 7])
async def test_max_tokens_ends_with_length_after_exactly_that_many_tokens(
    engines: Callable[..., Engine], max_tokens: int
) -> None:
    engine = engines(max_batch=2)
    (gen,) = engine.submit([(prompt(5, 30), greedy(max_tokens), [block(4, seed=30)])])
    run = await collect(gen)
    assert [type(e) for e in run.events] == [TokenEvent] * max_tokens + [EndEvent]
    assert run.reason == "length"
    assert gen.events.empty()  # nothing after the end


async def test_a_sequence_may_fill_the_context_exactly(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    engine = engines(max_batch=2, max_len=16)
    p = prompt(6, 31)
    (gen,) = engine.submit([(p, greedy(10), [])])
    run = await collect(gen)
    assert run.tokens == greedy_decode(model, [p], max_new_tokens=10)[0]
    assert run.reason == "length"


# -- cancellation and admission -------------------------------------------------------------------


async def test_cancelling_a_running_sequence_frees_its_slot_for_a_queued_one(
    engines: Callable[..., Engine],
) -> None:
    engine = engines(max_batch=1, max_queue=4)
    (running,) = engine.submit([(prompt(4, 40), greedy(LONG), [block(4, seed=40)])])
    stream = running.stream()
    await first_tokens(stream, 1)
    (queued,) = engine.submit([(prompt(3, 41), greedy(3), [])])
    stats = engine.stats()
    assert (stats.active, stats.waiting) == (1, 1)

    running.cancel()
    queued_run = await collect(queued)
    assert queued_run.reason == "length"
    assert len(queued_run.tokens) == 3
    stats = engine.stats()
    assert stats.waiting == 0
    assert stats.active <= 1

    run = await collect(running, stream)
    assert run.reason == "cancelled"
    assert len(run.tokens) + 1 < LONG


async def test_leaving_a_stream_early_cancels_the_sequence(
    engines: Callable[..., Engine],
) -> None:
    engine = engines(max_batch=1, max_queue=4)
    (running,) = engine.submit([(prompt(4, 42), greedy(LONG), [])])
    (queued,) = engine.submit([(prompt(3, 43), greedy(2), [])])
    seen = 0
    async for event in running.stream():
        assert isinstance(event, TokenEvent)
        seen += 1
        if seen == 2:
            break
    # The queued sequence only gets the one slot once the abandoned one has been cancelled.
    queued_run = await collect(queued)
    assert queued_run.reason == "length"
    assert running.cancelled
    rest: list[Event] = []
    while not rest or not isinstance(rest[-1], EndEvent):
        rest.append(await running.events.get())
    end = rest[-1]
    assert isinstance(end, EndEvent)
    assert end.reason == "cancelled"
    assert seen + len(rest) - 1 < LONG


async def test_a_sequence_cancelled_while_queued_never_runs(
    engines: Callable[..., Engine],
) -> None:
    engine = engines(max_batch=1, max_queue=4)
    (running,) = engine.submit([(prompt(4, 44), greedy(LONG), [])])
    stream = running.stream()
    await first_tokens(stream, 1)
    skipped, after = engine.submit([(prompt(3, 45), greedy(5), []), (prompt(3, 46), greedy(2), [])])
    skipped.cancel()
    running.cancel()
    assert (await collect(after)).reason == "length"
    skipped_run = await collect(skipped)
    assert skipped_run.tokens == []
    assert skipped_run.reason == "cancelled"
    assert (await collect(running, stream)).reason == "cancelled"


# -- admission limits and validation --------------------------------------------------------------


async def test_overload_is_refused_all_or_nothing(engines: Callable[..., Engine]) -> None:
    engine = engines(max_batch=1, max_queue=1)
    request: Request = (prompt(4, 50), greedy(LONG), [])
    with pytest.raises(EngineOverloadedError) as caught:
        engine.submit([request, request, request])  # 3 > 1 slot + 1 queued: none of them
    assert caught.value.retry_after_s >= 1
    stats = engine.stats()
    assert (stats.active, stats.waiting) == (0, 0)

    (first,) = engine.submit([request])
    stream = first.stream()
    await first_tokens(stream, 1)
    with pytest.raises(EngineOverloadedError):
        engine.submit([request, request])  # one would fit, two do not: neither is queued
    assert engine.stats().waiting == 0
    (second,) = engine.submit([request])
    with pytest.raises(EngineOverloadedError) as caught:
        engine.submit([request])
    assert caught.value.retry_after_s >= 1
    assert (engine.stats().active, engine.stats().waiting) == (1, 1)
    first.cancel()
    second.cancel()
    assert (await collect(first, stream)).reason == "cancelled"
    assert (await collect(second)).reason == "cancelled"


async def test_ended_sequences_do_not_count_against_the_queue(
    engines: Callable[..., Engine],
) -> None:
    """A batch that has just finished is idle: the next full batch is admitted, not refused."""
    engine = engines(max_batch=4, max_queue=0)
    requests: list[Request] = [(prompt(4, 70 + i), greedy(2), []) for i in range(4)]
    for _ in range(5):
        gens = engine.submit(requests)  # raised EngineOverloadedError before ended rows counted
        runs = [await collect(g) for g in gens]
        assert [r.reason for r in runs] == ["length"] * 4


async def test_bad_prompts_are_refused_and_nothing_is_queued(
    engines: Callable[..., Engine],
) -> None:
    engine = engines(max_batch=2, max_len=32)
    ok: Request = (prompt(4, 60), greedy(3), [])
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([ok, ([], greedy(3), [])])
    with pytest.raises(ValueError, match="context length 32"):
        engine.submit([ok, (prompt(20, 61), greedy(13), [])])  # 20 + 13 > 32
    stats = engine.stats()
    assert (stats.active, stats.waiting, stats.tokens) == (0, 0, 0)
    (gen,) = engine.submit([(prompt(20, 61), greedy(12), [])])  # 20 + 12 = 32 fits
    assert (await collect(gen)).reason == "length"


async def test_the_default_context_is_the_models(engines: Callable[..., Engine]) -> None:
    engine = engines(max_batch=1)
    assert engine.max_len == CFG.max_seq_len
    with pytest.raises(ValueError, match=f"context length {CFG.max_seq_len}"):
        engine.submit([(prompt(2, 62), greedy(CFG.max_seq_len - 1), [])])


# -- logprobs -------------------------------------------------------------------------------------


async def test_echo_with_logprobs_sends_the_prompts_logprobs_first(
    model: Anchor, engines: Callable[..., Engine]
) -> None:
    memory = [block(8, seed=70)]
    p = prompt(6, 70)
    engine = engines(max_batch=2)
    params = greedy(4, logprobs=2, echo=True)
    gen, plain = engine.submit([(p, params, memory), (prompt(3, 71), greedy(4, logprobs=1), [])])
    run, plain_run = await collect(gen), await collect(plain)

    head = run.events[0]
    assert isinstance(head, PromptEvent)
    assert len(head.logprobs) == len(p)
    assert head.logprobs[0] == (None, [])
    with torch.inference_mode():
        mem = build_memory_batch([memory], dtype=torch.float32)
        logp = torch.log_softmax(model(torch.tensor([p]), memory=mem)[0].float(), dim=-1)
    for t in range(1, len(p)):
        lp, top = head.logprobs[t]
        assert lp == pytest.approx(float(logp[t - 1, p[t]]), abs=1e-4)
        assert [i for i, _ in top] == logp[t - 1].topk(2).indices.tolist()
    tokens = [e for e in run.events[1:] if isinstance(e, TokenEvent)]
    assert len(tokens) == 4
    for e in tokens:  # greedy: the chosen token is the most likely one
        assert e.top is not None
        assert len(e.top) == 2
        assert e.top[0] == (e.token, e.logprob)
    # Without echo, no prompt event; each token has its one alternative.
    assert not any(isinstance(e, PromptEvent) for e in plain_run.events)
    assert all(len(e.top or []) == 1 for e in plain_run.events if isinstance(e, TokenEvent))


async def test_echo_without_logprobs_sends_no_prompt_event(engines: Callable[..., Engine]) -> None:
    engine = engines(max_batch=1)
    (gen,) = engine.submit([(prompt(4, 72), greedy(2, echo=True), [])])
    run = await collect(gen)
    assert [type(e) for e in run.events] == [TokenEvent, TokenEvent, EndEvent]
    assert all(isinstance(e, TokenEvent) and e.top is None for e in run.events[:2])


# -- shutdown -------------------------------------------------------------------------------------


async def test_close_cancels_live_and_queued_sequences_and_refuses_new_ones(
    engines: Callable[..., Engine],
) -> None:
    engine = engines(max_batch=1, max_queue=4)
    (running,) = engine.submit([(prompt(4, 80), greedy(LONG), [block(4, seed=80)])])
    stream = running.stream()
    await first_tokens(stream, 1)
    queued = engine.submit([(prompt(3, 81), greedy(5), []), (prompt(5, 82), greedy(5), [])])
    await engine.close()
    run = await collect(running, stream)
    assert run.reason == "cancelled"
    assert len(run.tokens) + 1 < LONG
    for gen in queued:
        queued_run = await collect(gen)
        assert queued_run.tokens == []
        assert queued_run.reason == "cancelled"
    with pytest.raises(EngineClosedError):
        engine.submit([(prompt(3, 83), greedy(2), [])])
    await engine.close()  # idempotent
