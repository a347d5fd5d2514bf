"""Long-tail evaluation on untrained banks: structure, scoring, decoding, and which blocks apply.

The banks are random (no training), so accuracy is not the point here; what is: the report's
shape, that a continuation is scored right, that batched greedy decoding with a KV cache is the
plain argmax loop, and that "memory" mode applies exactly the routed path's blocks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from server.bank import Bank, BankWriter, ModelShape, write_random_bank
from server.bank.random_bank import DEFAULT_EMBEDDER, random_centroids
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor, save_anchor
from server.model.config import AnchorConfig
from server.model.memory import MemoryBlock, MemoryType, block_from_tensors
from server.model.memory_batch import build_memory_batch
from server.routing import HashedTfidfEmbedder, Router
from server.tokenizer import AnchorTokenizer
from server.training.evaluate import (
    MODES,
    EvalReport,
    Tally,
    answer_tokens,
    evaluate,
    greedy_decode,
    level1_ranking,
    load_router,
    score,
)
from server.training.facts import Fact
from server.training.synth import generate_corpus
from tiers.keys import BlockKey

SPECIALS = ["<pad>", "<s>", "</s>"]
CONFIG = AnchorConfig(
    vocab_size=264, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64,
    max_seq_len=128, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
SHAPE = ModelShape(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64
)


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: the 256 byte symbols after three special tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def random_anchor(seed: int = 0, std: float = 0.3) -> Anchor:
    """Weights large enough that different prompts get different continuations."""
    torch.manual_seed(seed)
    model = Anchor(CONFIG).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, std)
    return model


def write_strong_bank(out: Path, anchor_dir: Path, *, std: float = 0.5) -> None:
    """Random FFN memories large enough to change greedy continuations; level 2 holds none."""
    gen = torch.Generator().manual_seed(7)
    embedder = HashedTfidfEmbedder(dim=64, ngram_max=2, seed=0)
    with BankWriter(
        out,
        bank_id="strong",
        memory_type=MemoryType.FFN,
        levels=3,
        branching=4,
        widths=(8, 0, 4),
        dtype="float32",
        model=SHAPE,
        embedder=DEFAULT_EMBEDDER,
    ) as writer:
        router = {
            f"centroids.L{lvl}": random_centroids(4**lvl, 64, generator=gen) for lvl in (1, 2, 3)
        }
        router.update({f"embedder.{k}": v for k, v in embedder.state_tensors().items()})
        writer.write_router(router)
        for level in writer.manifest.memory_levels():
            shapes = writer.manifest.block_shapes(level)
            for node in [*range(4**level), None]:
                tensors = {n: torch.randn(s, generator=gen) * std for n, s in shapes.items()}
                block = block_from_tensors(MemoryType.FFN, tensors)
                if node is None:
                    writer.write_generic(level, block)
                else:
                    writer.write_block(level, node, block)
        writer.copy_anchor(anchor_dir)
        writer.commit()


@pytest.fixture(scope="module")
def banks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("banks")
    anchor_dir = root / "anchor"
    save_anchor(random_anchor(), anchor_dir)
    byte_tokenizer().save(str(anchor_dir / "tokenizer.json"))
    for name, zero, generic in (
        ("random", False, True),
        ("zero", True, True),
        ("no-generic", False, False),
    ):
        write_random_bank(
            root / name, model=SHAPE, anchor_dir=anchor_dir, zero_down=zero, generic=generic, seed=1
        )
    write_strong_bank(root / "strong", anchor_dir)
    return {name: root / name for name in ("random", "zero", "no-generic", "strong")}


@pytest.fixture(scope="module")
def facts() -> list[Fact]:
    """Facts of every family and bucket (every 7th of the default corpus: 40 facts)."""
    return generate_corpus(seed=0).facts[::7]


def continuations(report: EvalReport, mode: str) -> list[str]:
    return [p.continuation for p in report.predictions if p.mode == mode]


# -- scoring ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("continuation", "answer", "correct"),
    [
        (" 26", " 26", True),
        (" 26.", " 26", True),
        (" 26 and", " 26", True),
        (" 26\n", " 26", True),
        (" 262", " 26", False),  # a longer number is another number
        (" 2", " 26", False),
        (" 2.6", " 26", False),
        ("26.", " 26", False),  # the corpus states " 26": the space is part of the answer
        (" 27.", " 26", False),
        (" Mipa.", " Mipa", True),
        (" Mipalo", " Mipa", False),  # a longer name is another name
        (" 1766, in", " 1766", True),
    ],
)
def test_score_wants_the_answer_and_then_the_end_of_its_word(
    continuation: str, answer: str, correct: bool
) -> None:
    assert score(continuation, answer) is correct


def test_answer_tokens_counts_the_answer_after_its_query() -> None:
    tok = AnchorTokenizer(byte_tokenizer(), CONFIG)
    assert answer_tokens(tok, "The atomic number of Iron is", " 26") == 3
    assert answer_tokens(tok, "Tupo Methu was born in", " 1766") == 5


# -- decoding -----------------------------------------------------------------------------------


def argmax_loop(model: Anchor, prompt: list[int], blocks: list[MemoryBlock], n: int) -> list[int]:
    """The reference: one sequence, no cache, the whole prefix recomputed at every step."""
    dtype = next(model.parameters()).dtype
    memory = build_memory_batch([blocks], dtype=dtype)
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]), memory=memory)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_batched_greedy_decoding_is_the_argmax_loop_of_each_prompt(
    banks: dict[str, Path],
) -> None:
    model = random_anchor(seed=3).double()
    bank = Bank.open(banks["strong"])
    prompts = [[1, 40, 41, 42, 43, 44, 45], [1, 90], [1, 7, 8, 9, 10], [1, 200, 201, 33]]
    memory: list[list[MemoryBlock]] = [
        [bank.read_block("strong/L1/0"), bank.read_block("strong/L3/5")],
        [],
        [bank.read_block("strong/L1/2")],
        [bank.read_block("strong/L1/0"), bank.read_block("strong/L3/63")],
    ]
    batched = greedy_decode(model, prompts, max_new_tokens=6, memory=memory)
    alone = [argmax_loop(model, p, m, 6) for p, m in zip(prompts, memory, strict=True)]
    assert batched == alone
    assert len({tuple(c) for c in batched}) > 1
    without = greedy_decode(model, prompts, max_new_tokens=6)
    assert without == [argmax_loop(model, p, [], 6) for p in prompts]


def test_decoding_stops_at_eos_and_refuses_what_does_not_fit() -> None:
    model = random_anchor(seed=3)
    first = greedy_decode(model, [[1, 50, 51]], max_new_tokens=4)[0]
    # Declaring the second generated token an EOS cuts the continuation before it.
    assert greedy_decode(model, [[1, 50, 51]], max_new_tokens=4, eos_ids={first[1]})[0] == [
        first[0]
    ]
    with pytest.raises(ValueError, match="context length"):
        greedy_decode(model, [[1] * 120], max_new_tokens=10)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_decode(model, [[1], []], max_new_tokens=2)


# -- evaluating a bank ---------------------------------------------------------------------------


def test_report_structure_from_a_facts_file(
    banks: dict[str, Path], facts: list[Fact], tmp_path: Path
) -> None:
    corpus = generate_corpus(seed=0)
    corpus.write(tmp_path)
    n = len(corpus.facts)
    report = evaluate(banks["random"], tmp_path / "facts.jsonl", batch_size=64, progress=False)
    assert report.modes == MODES
    assert len(report.predictions) == 3 * n
    assert report.families == ["element", "island", "person"]
    for mode in MODES:
        total = report.tally(mode)
        assert total.total == n
        assert sum(report.tally(mode, bucket=b).total for b in range(5)) == n
        assert report.tally(mode, family="element").total == 118
        assert report.tally(mode, family="element", bucket=4).total == 23
    for p in report.predictions:
        assert p.correct is score(p.continuation, p.fact.answer)
        assert (p.path is not None) is (p.mode == "memory")
        if p.path is not None:
            assert len(p.path) == 2
            assert 0 <= p.path[0] < 4
            assert 0 <= p.path[1] < 16

    table = report.table()
    element, rest = table.split("### all families")
    pooled, by_form = rest.split("### buckets 3, 4 by query form")
    assert element.startswith("### element (118 facts)")
    assert "(278 facts)" in pooled
    for section in (element, pooled):
        rows = [line for line in section.splitlines() if line.startswith("| ")]
        assert rows[0] == "| bucket | mentions | memory | anchor | generic |"
        assert [r.split(" | ")[0] for r in rows[2:]] == ["| 0", "| 1", "| 2", "| 3", "| 4", "| all"]
    assert "| 4 | 2 |" in element
    # The synthetic facts say whether their query's form is in the corpus: the rare buckets
    # are split by it.
    form_rows = [line for line in by_form.splitlines() if line.startswith("| ")]
    assert form_rows[0] == "| query form | memory | anchor | generic |"
    assert [r.split(" | ")[0] for r in form_rows[2:]] == ["| form seen", "| form not seen"]

    data = json.loads(report.to_json())
    assert data["n_facts"] == n
    assert data["modes"] == list(MODES)
    assert data["accuracy"]["anchor"]["element"]["4"]["total"] == 23
    assert data["accuracy"]["memory"]["all"]["all"]["total"] == n
    assert len(data["predictions"]) == 3 * n
    rare = [f for f in corpus.facts if f.bucket >= 3]
    by_form = data["by_query_form"]
    assert by_form["buckets"] == [3, 4]
    for mode in MODES:
        split = by_form["accuracy"][mode]
        assert split["seen"]["total"] == sum(f.query_form_seen is True for f in rare)
        assert split["not_seen"]["total"] == sum(f.query_form_seen is False for f in rare)


def test_a_known_answer_is_scored_correct(banks: dict[str, Path], facts: list[Fact]) -> None:
    # What the anchor says after each query becomes the expected answer: all must be correct.
    first = evaluate(banks["random"], facts, modes=["anchor"], max_new_tokens=4, progress=False)
    said = [
        Fact(f.entity, f.family, f.query, text, f.mentions, f.bucket)
        for f, text in zip(facts, continuations(first, "anchor"), strict=True)
    ]
    again = evaluate(banks["random"], said, modes=["anchor"], max_new_tokens=4, progress=False)
    assert again.tally("anchor") == Tally(correct=len(facts), total=len(facts))
    assert "100.0%" in again.table()


def test_zero_memories_change_nothing(banks: dict[str, Path], facts: list[Fact]) -> None:
    report = evaluate(banks["zero"], facts, batch_size=7, progress=False)
    anchor = continuations(report, "anchor")
    assert continuations(report, "memory") == anchor
    assert continuations(report, "generic") == anchor
    assert len(set(anchor)) > 1


def test_memory_mode_applies_the_routed_path_blocks(
    banks: dict[str, Path], facts: list[Fact]
) -> None:
    report = evaluate(banks["strong"], facts, batch_size=16, progress=False)
    memory, anchor = continuations(report, "memory"), continuations(report, "anchor")
    assert memory != anchor
    assert continuations(report, "generic") != anchor

    # The same continuations, one query at a time, from blocks looked up by hand.
    bank = Bank.open(banks["strong"])
    m = bank.manifest
    model = load_anchor(bank.anchor_dir)
    tok = AnchorTokenizer.from_dir(bank.anchor_dir, model.config)
    router = Router.load(
        bank.path / "router.safetensors", m.embedder, branching=m.branching, levels=m.levels
    )
    routes = router.route_texts([f.query for f in facts]).node_ids.tolist()
    paths = [p.path for p in report.predictions if p.mode == "memory"]
    assert paths == [(r[0], r[2]) for r in routes]  # level 2 has width 0: no block
    assert len(set(paths)) > 3
    for fact, route, text in zip(facts, routes, memory, strict=True):
        blocks = [bank.read_block(BlockKey("strong", 1, route[0]))]
        blocks.append(bank.read_block(BlockKey("strong", 3, route[2])))
        n = answer_tokens(tok, fact.query, fact.answer) + 1
        ids = greedy_decode(model, [tok.encode(fact.query)], max_new_tokens=n, memory=[blocks])
        assert tok.decode(ids[0]) == text


def test_bad_modes_and_a_bank_without_generic_memory_are_refused(
    banks: dict[str, Path], facts: list[Fact]
) -> None:
    with pytest.raises(ValueError, match="modes"):
        evaluate(banks["random"], facts, modes=["memory", "oracle"], progress=False)
    with pytest.raises(ValueError, match="no generic memory"):
        evaluate(banks["no-generic"], facts, progress=False)
    report = evaluate(banks["no-generic"], facts, modes=["memory", "anchor"], progress=False)
    assert report.modes == ("memory", "anchor")
    assert "| bucket | mentions | memory | anchor |" in report.table()


# -- blocking the best-matching subtree ----------------------------------------------------------


def squared_distances(centroids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[N, n] squared L2 distances of x [N, dim] to centroids [n, dim], as routing computes them."""
    return (centroids[None] - x[:, None]).pow(2).sum(dim=2)


def nearest_child(router: Router, level: int, parent: int, x: torch.Tensor) -> int:
    """The child at `level` of `parent` (a node of level - 1) whose centroid is nearest `x`."""
    b = router.tree.branching
    children = router.tree.centroids[level - 1][parent * b : (parent + 1) * b]
    return parent * b + int(squared_distances(children, x[None])[0].argmin())


def test_level1_ranking_orders_the_subtrees_nearest_first(
    banks: dict[str, Path], facts: list[Fact]
) -> None:
    queries = [f.query for f in facts]
    bank = Bank.open(banks["strong"])
    router = load_router(bank)
    ranking = level1_ranking(banks["strong"], queries)
    assert ranking.shape == (len(facts), 4)
    assert all(sorted(row) == [0, 1, 2, 3] for row in ranking.tolist())
    route = router.route_texts(queries)
    assert torch.equal(ranking[:, 0], route.node_ids[:, 0])
    assert len(set(ranking[:, 0].tolist())) > 1
    embeddings = router.embedder.embed(queries)
    ordered = squared_distances(router.tree.centroids[0], embeddings).gather(1, ranking)
    assert bool((ordered[:, 1:] >= ordered[:, :-1]).all())
    assert torch.equal(level1_ranking(bank, queries), ranking)
    assert level1_ranking(bank, []).shape == (0, 4)
    # Routed below the level-1 node routing picks, a path is the routed one.
    under = router.tree.route_under(embeddings, route.node_ids[:, 0])
    assert torch.equal(under.node_ids, route.node_ids)
    assert torch.equal(under.child_index, route.child_index)


def test_a_blocked_subtree_is_passed_over_for_the_next_nearest(
    banks: dict[str, Path], facts: list[Fact]
) -> None:
    queries = [f.query for f in facts]
    bank = Bank.open(banks["strong"])
    router = load_router(bank)
    routed = router.route_texts(queries).node_ids[:, 0].tolist()
    ranking = level1_ranking(bank, queries).tolist()
    blocked = [{node} for node in routed]
    report = evaluate(
        banks["strong"], facts, modes=["memory"], blocked=blocked, batch_size=16, progress=False
    )
    embeddings = router.embedder.embed(queries)
    for p, node, rank, x in zip(report.predictions, routed, ranking, embeddings, strict=True):
        assert p.path is not None
        level1, level3 = p.path  # level 2 holds no memory
        assert level1 != node
        assert level1 == rank[1]
        # Below the subtree, greedy as routing is: level 3 lies under level 1's nearest child.
        assert level3 == nearest_child(router, 3, nearest_child(router, 2, level1, x), x)
        assert level3 // 16 == level1

    # The blocks of that path are the ones applied.
    model = load_anchor(bank.anchor_dir)
    tok = AnchorTokenizer.from_dir(bank.anchor_dir, model.config)
    for p in report.predictions[:4]:
        assert p.path is not None
        level1, level3 = p.path
        blocks = [bank.read_block(BlockKey("strong", 1, level1))]
        blocks.append(bank.read_block(BlockKey("strong", 3, level3)))
        n = answer_tokens(tok, p.fact.query, p.fact.answer) + 1
        ids = greedy_decode(model, [tok.encode(p.fact.query)], max_new_tokens=n, memory=[blocks])
        assert tok.decode(ids[0]) == p.continuation


def test_blocking_nothing_changes_nothing_and_blocking_all_leaves_no_memory(
    banks: dict[str, Path], facts: list[Fact]
) -> None:
    unblocked = evaluate(banks["strong"], facts, batch_size=16, progress=False)
    empty = evaluate(banks["strong"], facts, batch_size=16, progress=False, blocked=[()] * 40)
    assert empty.predictions == unblocked.predictions

    # Odd facts have every subtree blocked, even ones none; one fact per batch.
    blocked = [set(range(4)) if i % 2 else set() for i in range(len(facts))]
    report = evaluate(
        banks["strong"], facts, modes=["memory", "anchor"], batch_size=1, blocked=blocked,
        progress=False,
    )  # fmt: skip
    memory = [p for p in report.predictions if p.mode == "memory"]
    anchor = continuations(report, "anchor")
    routed = [p.path for p in unblocked.predictions if p.mode == "memory"]
    for i, p in enumerate(memory):
        if i % 2:
            assert p.path == ()
            assert p.continuation == anchor[i]
        else:
            assert p.path == routed[i]
    assert all(p.path is None for p in report.predictions if p.mode == "anchor")


def test_bad_blocked_sets_are_refused(banks: dict[str, Path], facts: list[Fact]) -> None:
    with pytest.raises(ValueError, match="3 blocked sets for 40 facts"):
        evaluate(banks["strong"], facts, blocked=[()] * 3, progress=False)
    with pytest.raises(ValueError, match=r"blocked\[1\] = \[2, 4\]: level-1 node ids are 0..3"):
        evaluate(banks["strong"], facts, blocked=[(), {4, 2}] + [()] * 38, progress=False)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "The atomic number of Iron is", "answer": " 26"}\n',
         r"qa\.jsonl:1: a fact needs the fields entity \(str\), family \(str\), query \(str\), "
         r"answer \(str\), mentions \(int\), bucket \(int\); missing or of another type here: "
         r"entity, family, query, mentions, bucket \(the line has question, answer\)"),
        ("question,answer\nThe atomic number of Iron is,26\n",
         r"qa\.jsonl:1 is not valid JSON \(Expecting value\); expected one JSON object per line "
         r"with entity \(str\), .*, as `hmem synth` writes facts\.jsonl"),
        ("\n\n", r"facts file .*qa\.jsonl holds no facts; expected one JSON object per line"),
        ('[\n  {"entity": "Iron"}\n]\n', r"qa\.jsonl:1 opens a JSON array; expected"),
        ('{"entity": "Iron"}\n[1, 2]\n', r"qa\.jsonl:1: a fact needs the fields"),
    ],
)  # fmt: skip
def test_facts_in_another_format_are_refused_before_any_model_loads(
    tmp_path: Path, content: str, message: str
) -> None:
    facts = tmp_path / "qa.jsonl"
    facts.write_text(content)
    # The bank does not even exist: the facts are read, and refused, first.
    with pytest.raises(ValueError, match=message):
        evaluate(tmp_path / "no-bank", facts, progress=False)


def test_int8_weights_are_evaluated_as_served(banks: dict[str, Path], facts: list[Fact]) -> None:
    """`hmem eval --weights int8` asks the anchor as `hmem serve --weights int8` holds it. Beside
    float32 this random anchor's continuations keep their first token; later tokens of a
    random model may tip on near ties."""
    kw: dict[str, Any] = {"modes": ["anchor", "memory"], "max_new_tokens": 1, "progress": False}
    ref = evaluate(banks["random"], facts, **kw)
    int8 = evaluate(banks["random"], facts, weights="int8", dtype=torch.bfloat16, **kw)
    for mode in ("anchor", "memory"):
        a, b = continuations(ref, mode), continuations(int8, mode)
        assert len(b) == len(a) == len(facts)
        assert sum(x == y for x, y in zip(a, b, strict=True)) >= 0.9 * len(a), (mode, a, b)
