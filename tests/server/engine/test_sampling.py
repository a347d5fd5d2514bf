"""Sampling: greedy, temperature and top-p draws, seeded reproducibility, OpenAI logprobs, and
rows that cannot be sampled failing alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from server.engine.errors import RequestError
from server.engine.sampling import (
    MAX_LOGPROBS,
    MAX_STOP,
    NON_FINITE_LOGITS,
    Sampler,
    SampleResult,
    SamplingParams,
    _draw,
    make_generator,
    prompt_logprobs,
)

V = 16


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
) -> SampleResult:
    gens = [None] * len(params) if generators is None else generators
    return Sampler()(logits, params, gens)


def frequencies(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(ids, minlength=vocab).float() / ids.numel()


def test_temperature_zero_is_argmax_with_ties_to_the_lowest_id() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    logits[3] = 0.0
    logits[3, 5] = logits[3, 9] = 2.0
    result = sample(logits, [SamplingParams(max_tokens=1, temperature=0.0)] * 4)
    assert result.ids.tolist() == [*logits[:3].argmax(dim=-1).tolist(), 5]
    assert result.ids.dtype == torch.long


def test_unseeded_draws_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(max_tokens=1, temperature=0.7)
    n = 10_000
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ids = sample(logits.expand(n, -1), [params] * n).ids
    expected = torch.softmax(logits / 0.7, dim=-1)
    assert torch.allclose(frequencies(ids, 5), expected, atol=0.02)


def test_seeded_draws_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([[1.0, 0.0, 0.5, -0.5]])
    params = [SamplingParams(max_tokens=1, temperature=1.5, seed=3)]
    gen = make_generator(3, "cpu")
    ids = torch.cat([sample(logits, params, [gen]).ids for _ in range(10_000)])
    expected = torch.softmax(logits[0] / 1.5, dim=-1)
    assert torch.allclose(frequencies(ids, 4), expected, atol=0.02)


def test_top_p_never_samples_outside_the_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 needs the first two (0.5 < 0.75 <= 0.8)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    n = 4000
    params = [SamplingParams(max_tokens=1, top_p=0.75)] * n
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ids = sample(logits.expand(n, -1), params).ids
    freq = frequencies(ids, 4)
    assert freq[2] == 0
    assert freq[3] == 0
    # renormalised over the nucleus: 0.5 / 0.8 and 0.3 / 0.8
    assert torch.allclose(freq[:2], torch.tensor([0.625, 0.375]), atol=0.03)


def test_top_p_below_the_top_probability_keeps_only_the_top_token() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, 2.8])
    n = 500
    params = [SamplingParams(max_tokens=1, temperature=2.0, top_p=1e-6)] * n
    assert sample(logits.expand(n, -1), params).ids.eq(1).all()


def test_top_p_one_can_sample_a_rare_token() -> None:
    logits = torch.tensor([0.0, -4.0])  # p(1) ~ 0.018
    n = 4000
    with torch.random.fork_rng():
        torch.manual_seed(2)
        ids = sample(logits.expand(n, -1), [SamplingParams(max_tokens=1)] * n).ids
    assert 0 < frequencies(ids, 2)[1] < 0.04


def test_a_tiny_temperature_is_greedy_without_nans() -> None:
    logits = torch.tensor([[1e4, 0.0, -1e4, 9999.0]])
    result = sample(logits, [SamplingParams(max_tokens=1, temperature=1e-30)])
    assert result.ids.tolist() == [0]


def test_seeded_rows_reproduce_whatever_their_batch_mates() -> None:
    gen_logits = torch.Generator().manual_seed(4)
    steps = [torch.randn(1, V, generator=gen_logits) for _ in range(20)]
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)

    alone_gen = make_generator(7, "cpu")
    alone = [sample(x, [seeded], [alone_gen]).ids.item() for x in steps]

    mates = [
        SamplingParams(max_tokens=20, temperature=0.0),
        SamplingParams(max_tokens=20, temperature=1.3),
        seeded,
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.5, seed=99),
    ]
    gens = [None, None, make_generator(7, "cpu"), make_generator(99, "cpu")]
    batched = []
    for x in steps:
        others = torch.randn(3, V, generator=gen_logits)
        logits = torch.cat([others[:2], x, others[2:]])
        batched.append(sample(logits, mates, gens).ids[2].item())

    assert batched == alone
    assert len(set(alone)) > 1  # it did sample


def test_logprobs_are_of_the_untempered_unfiltered_distribution() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    params = [
        SamplingParams(max_tokens=1, temperature=0.3, top_p=0.5),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=1.7),
    ]
    result = sample(logits, params)
    expected = torch.log_softmax(logits.float(), dim=-1).gather(1, result.ids[:, None])[:, 0]
    assert result.logprobs.dtype == torch.float32
    assert torch.allclose(result.logprobs, expected)


def test_top_logprobs_are_sorted_and_of_the_asked_length() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(6))
    params = [SamplingParams(max_tokens=1, logprobs=k) for k in (3, 0, None, 5)]
    top = sample(logits, params).top
    logp = torch.log_softmax(logits, dim=-1)

    assert top[1] == []
    assert top[2] is None
    for row, k in ((0, 3), (3, 5)):
        alternatives = top[row]
        assert alternatives is not None
        assert len(alternatives) == k
        ids = [i for i, _ in alternatives]
        values = [v for _, v in alternatives]
        assert values == sorted(values, reverse=True)
        assert ids == logp[row].topk(k).indices.tolist()
        assert values == pytest.approx([logp[row, i].item() for i in ids])


def test_no_row_asking_for_logprobs_gives_no_top() -> None:
    top = sample(torch.zeros(2, V), [SamplingParams(max_tokens=1)] * 2).top
    assert top == [None, None]


def test_prompt_logprobs_score_each_token_given_its_prefix() -> None:
    tokens = [3, 1, 4, 1, 5]
    logits = torch.randn(len(tokens), V, generator=torch.Generator().manual_seed(8))
    logp = torch.log_softmax(logits, dim=-1)
    scored = prompt_logprobs(logits, tokens, 2)

    assert scored[0] == (None, [])
    assert len(scored) == len(tokens)
    for t in range(1, len(tokens)):
        lp, alternatives = scored[t]
        assert lp == pytest.approx(logp[t - 1, tokens[t]].item())
        assert [i for i, _ in alternatives] == logp[t - 1].topk(2).indices.tolist()
    assert [alts for _, alts in prompt_logprobs(logits, tokens, 0)] == [[]] * len(tokens)
    assert prompt_logprobs(logits[:1], tokens[:1], 3) == [(None, [])]


def test_prompt_logprobs_refuse_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="3 prompt tokens"):
        prompt_logprobs(torch.zeros(2, V), [1, 2, 3], 1)


def test_sampler_refuses_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="2 rows"):
        Sampler()(torch.zeros(2, V), [SamplingParams(max_tokens=1)], [None])


def test_make_generator_is_none_without_a_seed() -> None:
    assert make_generator(None, "cpu") is None
    a, b = make_generator(11, "cpu"), make_generator(11, "cpu")
    assert a is not None
    assert b is not None
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_stop_is_kept_as_a_tuple() -> None:
    stop: Any = ["\n", "END"]
    assert SamplingParams(max_tokens=1, stop=stop).stop == ("\n", "END")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": tuple(str(i) for i in range(MAX_STOP + 1))}, "stop"),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_bad_params_are_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError, match=field) as err:
        SamplingParams(**{"max_tokens": 8, **fields})
    assert err.value.param == field


# -- limits ---------------------------------------------------------------------------------------


def test_the_limits_real_clients_need_are_accepted() -> None:
    # lm-evaluation-harness sends several `until` strings; the chat API's top_logprobs goes to 20.
    assert (MAX_STOP, MAX_LOGPROBS) == (32, 20)
    stops = tuple(f"stop{i}" for i in range(32))
    assert SamplingParams(max_tokens=1, stop=stops).stop == stops
    with pytest.raises(ValueError, match="at most 32"):
        SamplingParams(max_tokens=1, stop=(*stops, "one more"))

    logits = torch.randn(2, 64, generator=torch.Generator().manual_seed(12))
    params = [SamplingParams(max_tokens=1, logprobs=20), SamplingParams(max_tokens=1, logprobs=0)]
    result = sample(logits, params)
    top = result.top[0]
    assert top is not None
    assert [i for i, _ in top] == logits[0].topk(20).indices.tolist()
    assert result.top[1] == []
    assert result.errors == [None, None]


# -- values that cannot be sampled as asked -------------------------------------------------------

# Each of these passes validation, and used to reach torch.multinomial as 0 (float32) or as a
# division by zero: `{"top_p": 5e-324}` failed every sequence of its batch.
TINY = [5e-324, 2.2e-309, 1e-45, 1e-38, 1e-6]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiny", TINY)
def test_a_tiny_temperature_or_top_p_gives_the_most_likely_token(
    tiny: float, dtype: torch.dtype
) -> None:
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(13)).to(dtype)
    params = [
        SamplingParams(max_tokens=1, temperature=tiny),
        SamplingParams(max_tokens=1, temperature=tiny, seed=1),
        SamplingParams(max_tokens=1, top_p=tiny),
        SamplingParams(max_tokens=1, top_p=tiny, seed=2),
        SamplingParams(max_tokens=1, temperature=tiny, top_p=tiny, logprobs=0),
    ]
    gens = [make_generator(p.seed, "cpu") for p in params]
    result = sample(logits, params, gens)
    assert result.errors == [None] * 5
    assert result.ids.tolist() == logits.float().argmax(dim=-1).tolist()
    assert torch.isfinite(result.logprobs).all()
    assert result.top[4] == []


def test_temperatures_below_the_epsilon_are_greedy_and_above_it_sample() -> None:
    assert SamplingParams(max_tokens=1, temperature=9e-6).greedy
    assert not SamplingParams(max_tokens=1, temperature=1e-4).greedy
    # Just above the epsilon the draw is still all but greedy, and never NaN.
    logits = torch.tensor([[0.0, 1e-3, 2.0, 1.999]])
    params = [SamplingParams(max_tokens=1, temperature=2e-5, seed=3)]
    result = sample(logits, params, [make_generator(3, "cpu")])
    assert result.ids.tolist() == [2]


def test_a_huge_temperature_samples_the_whole_vocabulary() -> None:
    # 1e300 is inf in float32: dividing a finite logit by it would give NaN for an -inf gap.
    logits = torch.tensor([3e38, -3e38, 0.0, 1.0]).expand(400, -1)
    with torch.random.fork_rng():
        torch.manual_seed(14)
        result = sample(logits, [SamplingParams(max_tokens=1, temperature=1e300)] * 400)
    assert result.errors == [None] * 400
    assert set(result.ids.tolist()) > {0}


# -- rows that cannot be sampled fail alone -------------------------------------------------------


def test_a_row_of_nan_or_inf_logits_is_reported_and_spares_the_others() -> None:
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(15))
    params = [
        SamplingParams(max_tokens=1, temperature=0.0, logprobs=2),
        SamplingParams(max_tokens=1, temperature=0.9, seed=5, logprobs=2),
        SamplingParams(max_tokens=1, temperature=0.9),
        SamplingParams(max_tokens=1, temperature=0.9, logprobs=2),  # NaN row
        SamplingParams(max_tokens=1, temperature=0.0),  # +inf in one logit
        SamplingParams(max_tokens=1, temperature=0.7, top_p=0.5, seed=6),
    ]
    bad = logits.clone()
    bad[3] = float("nan")
    bad[4, 2] = float("inf")
    healthy = [0, 1, 2, 5]

    alone = sample(
        logits[healthy],
        [params[i] for i in healthy],
        [None, make_generator(5, "cpu"), None, make_generator(6, "cpu")],
    )
    gens = [None, make_generator(5, "cpu"), None, None, None, make_generator(6, "cpu")]
    result = sample(bad, params, gens)  # used to raise "invalid multinomial distribution"

    assert result.errors[3] == result.errors[4] == NON_FINITE_LOGITS
    assert [result.errors[i] for i in healthy] == [None] * 4
    assert result.top[3] is None
    # Greedy and seeded rows get exactly the tokens they get without the bad rows.
    for j, i in enumerate(healthy):
        if i != 2:  # the unseeded row shares the global RNG with whatever else is drawn
            assert result.ids[i] == alone.ids[j]
            assert result.top[i] == alone.top[j]
    assert torch.isfinite(result.logprobs[healthy]).all()


@pytest.mark.parametrize("seeded", [False, True])
def test_a_row_that_cannot_be_drawn_from_fails_alone(seeded: bool) -> None:
    probs = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    gens = [make_generator(i, "cpu") if seeded else None for i in range(3)]
    ids, errors = _draw(probs, gens)
    assert errors[0] is None
    assert errors[2] is None
    assert errors[1] is not None
    assert "sampling failed" in errors[1]
    assert ids[0] in (0, 1)
    assert ids[2] == 2


def test_prompt_logprobs_of_non_finite_logits_are_refused_not_sent_as_nan() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(16))
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        prompt_logprobs(logits, [1, 2, 3, 4], 2)
