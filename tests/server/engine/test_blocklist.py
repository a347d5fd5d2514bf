"""The blocklist: clusters blocked with their subtrees, persisted atomically, reloaded at start."""

from __future__ import annotations

import json
import logging
import multiprocessing
from pathlib import Path

import pytest

from server.engine.blocklist import FORMAT_VERSION, Blocklist, BlocklistError, warn_legacy_file

LEVELS, B = 3, 4  # 4 / 16 / 64 clusters


def load(path: Path | None) -> Blocklist:
    return Blocklist.load(path, levels=LEVELS, branching=B)


def path_nodes(*children: int) -> list[int]:
    """Node ids (level 1 first) of a path of child indices."""
    nodes, node = [], 0
    for i in children:
        node = node * B + i
        nodes.append(node)
    return nodes


def test_an_absent_file_is_an_empty_list(tmp_path: Path) -> None:
    blocklist = load(tmp_path / "blocklist.json")
    assert blocklist.entries() == []
    assert blocklist.blocked_levels(path_nodes(1, 2, 3)) == []
    assert not (tmp_path / "blocklist.json").exists()  # loading writes nothing


def test_block_and_unblock_persist_and_reload_in_a_new_instance(tmp_path: Path) -> None:
    file = tmp_path / "state" / "blocklist.json"  # its directory is created on the first write
    blocklist = load(file)
    assert blocklist.block(1, 2) is True
    assert blocklist.block(3, 17) is True
    assert load(file).entries() == [(1, 2), (3, 17)]
    assert json.loads(file.read_text()) == {
        "version": FORMAT_VERSION,
        "bank_id": None,  # a list of no bank (`load` without one): as in tests of the tree alone
        "fingerprint": None,
        "blocked": [{"level": 1, "node": 2}, {"level": 3, "node": 17}],
    }

    assert blocklist.unblock(1, 2) is True
    reloaded = load(file)
    assert reloaded.entries() == [(3, 17)]
    assert not reloaded.covers(2, 9)  # (2, 9) sits under (1, 2): no longer blocked
    assert reloaded.covers(3, 17)


def test_block_returns_false_when_already_blocked_and_unblock_when_not(tmp_path: Path) -> None:
    file = tmp_path / "blocklist.json"
    blocklist = load(file)
    assert blocklist.block(2, 5) is True
    written = file.stat().st_mtime_ns, file.read_text()
    assert blocklist.block(2, 5) is False
    assert blocklist.unblock(2, 6) is False
    assert (file.stat().st_mtime_ns, file.read_text()) == written  # nothing rewritten
    assert blocklist.entries() == [(2, 5)]


def test_blocking_a_level_1_cluster_blocks_its_whole_subtree() -> None:
    blocklist = load(None)  # in memory only
    blocklist.block(1, 2)
    assert blocklist.blocked_levels(path_nodes(2, 0, 3)) == [1, 2, 3]
    assert blocklist.blocked_levels(path_nodes(2, 3, 3)) == [1, 2, 3]
    assert blocklist.blocked_levels(path_nodes(1, 3, 3)) == []  # a sibling subtree
    assert blocklist.blocked_levels(path_nodes(3, 0, 0)) == []
    # Every node under (1, 2): level-2 nodes 8..11, level-3 nodes 32..47.
    assert [n for n in range(B**2) if blocklist.covers(2, n)] == list(range(8, 12))
    assert [n for n in range(B**3) if blocklist.covers(3, n)] == list(range(32, 48))
    assert blocklist.covers(1, 2)
    assert not blocklist.covers(1, 1)
    assert blocklist.covered([(1, 2), (2, 9), (3, 47), (3, 48), (2, 12)]) == [
        (1, 2),
        (2, 9),
        (3, 47),
    ]


def test_blocking_a_deep_cluster_leaves_the_levels_above_it() -> None:
    blocklist = load(None)
    blocklist.block(2, path_nodes(1, 3)[1])
    assert blocklist.blocked_levels(path_nodes(1, 3, 0)) == [2, 3]
    assert blocklist.blocked_levels(path_nodes(1, 2, 0)) == []
    assert not blocklist.covers(1, 1)


def test_unblocking_a_child_keeps_a_blocked_ancestors_subtree_blocked(tmp_path: Path) -> None:
    blocklist = load(tmp_path / "blocklist.json")
    blocklist.block(1, 0)
    blocklist.block(2, 1)  # also blocked on its own
    assert blocklist.unblock(2, 1) is True
    assert blocklist.covers(2, 1)  # still, through (1, 0)
    assert blocklist.blocked_levels(path_nodes(0, 1, 2)) == [1, 2, 3]
    assert blocklist.unblock(3, 5) is False  # never blocked by itself: nothing to unblock
    assert blocklist.covers(3, 5)
    assert blocklist.unblock(1, 0) is True
    assert blocklist.blocked_levels(path_nodes(0, 1, 2)) == []


@pytest.mark.parametrize(
    ("level", "node"),
    [(0, 0), (4, 0), (-1, 0), (1, 4), (2, 16), (3, 64), (1, -1)],
)
def test_a_cluster_outside_the_tree_is_refused(tmp_path: Path, level: int, node: int) -> None:
    file = tmp_path / "blocklist.json"
    blocklist = load(file)
    with pytest.raises(BlocklistError):
        blocklist.block(level, node)
    with pytest.raises(BlocklistError):
        blocklist.unblock(level, node)
    assert blocklist.entries() == []
    assert not file.exists()


@pytest.mark.parametrize(
    "body",
    [
        "{not json",
        "[1, 2]",
        json.dumps({"version": 3, "blocked": []}),
        json.dumps({"blocked": [{"level": 1, "node": 0}]}),
        json.dumps({"version": FORMAT_VERSION}),
        json.dumps({"version": FORMAT_VERSION, "blocked": [{"level": 1}]}),
        json.dumps({"version": FORMAT_VERSION, "blocked": [{"level": "one", "node": 0}]}),
        # A cluster this tree does not have (a file written for another bank).
        json.dumps({"version": FORMAT_VERSION, "blocked": [{"level": 1, "node": 9}]}),
        json.dumps({"version": FORMAT_VERSION, "blocked": [{"level": 5, "node": 0}]}),
    ],
    ids=[
        "not-json",
        "a-list",
        "wrong-version",
        "no-version",
        "no-entries",
        "entry-without-node",
        "non-integer-level",
        "node-out-of-range",
        "level-out-of-range",
    ],
)
def test_an_unusable_file_is_refused_naming_it(tmp_path: Path, body: str) -> None:
    file = tmp_path / "blocklist.json"
    file.write_text(body)
    with pytest.raises(BlocklistError, match=r"blocklist\.json"):
        load(file)
    assert file.read_text() == body  # left for an operator to look at


def test_a_directory_in_the_files_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / "blocklist.json").mkdir()
    with pytest.raises(BlocklistError, match=r"blocklist\.json"):
        load(tmp_path / "blocklist.json")


def test_writes_leave_no_temp_files_behind(tmp_path: Path) -> None:
    file = tmp_path / "blocklist.json"
    blocklist = load(file)
    for node in range(B):
        blocklist.block(1, node)
    blocklist.unblock(1, 3)
    blocklist.block(3, 63)
    # the list, and the (empty) lock file its writers take turns on
    assert sorted(p.name for p in tmp_path.iterdir()) == [".blocklist.json.lock", "blocklist.json"]
    assert load(file).entries() == [(1, 0), (1, 1), (1, 2), (3, 63)]


def test_a_failed_write_changes_nothing_and_leaves_no_temp_file(tmp_path: Path) -> None:
    file = tmp_path / "blocklist.json"
    blocklist = load(file)
    blocklist.block(1, 1)
    # A directory where the file should be: the change's read of the file fails, and so would
    # the rename after the temp file is written.
    file.unlink()
    file.mkdir()
    with pytest.raises(BlocklistError, match="not usable"):
        blocklist.block(1, 2)
    assert blocklist.entries() == [(1, 1)]  # not in effect: it was never persisted
    assert not blocklist.covers(1, 2)
    # the list, and the (empty) lock file its writers take turns on
    assert sorted(p.name for p in tmp_path.iterdir()) == [".blocklist.json.lock", "blocklist.json"]


# -- a blocklist belongs to one bank build --------------------------------------------------------


def load_for(path: Path, bank_id: str, fingerprint: str) -> Blocklist:
    return Blocklist.load(
        path, levels=LEVELS, branching=B, bank_id=bank_id, fingerprint=fingerprint
    )


def test_the_file_records_its_bank_and_build(tmp_path: Path) -> None:
    file = tmp_path / "blocklists" / "alpha-0123456789abcdef.json"
    load_for(file, "alpha", "0123456789abcdef").block(2, 7)
    assert json.loads(file.read_text()) == {
        "version": FORMAT_VERSION,
        "bank_id": "alpha",
        "fingerprint": "0123456789abcdef",
        "blocked": [{"level": 2, "node": 7}],
    }
    assert load_for(file, "alpha", "0123456789abcdef").entries() == [(2, 7)]


@pytest.mark.parametrize(
    ("bank_id", "fingerprint", "owner"),
    [
        ("beta", "0123456789abcdef", "belongs to bank 'alpha' build 0123456789abcdef"),
        ("alpha", "fedcba9876543210", "belongs to bank 'alpha' build 0123456789abcdef"),
    ],
    ids=["another-bank", "another-build"],
)
def test_a_file_of_another_bank_or_build_is_refused_naming_both(
    tmp_path: Path, bank_id: str, fingerprint: str, owner: str
) -> None:
    file = tmp_path / "list.json"
    load_for(file, "alpha", "0123456789abcdef").block(1, 1)
    written = file.read_text()
    with pytest.raises(BlocklistError) as info:
        load_for(file, bank_id, fingerprint)
    message = str(info.value)
    assert str(file) in message
    assert owner in message
    assert f"not to the served bank {bank_id!r} build {fingerprint}" in message
    assert "blocklist_file" in message
    assert file.read_text() == written  # left as it was


def test_a_file_recording_no_bank_is_not_applied_to_a_bank(tmp_path: Path) -> None:
    file = tmp_path / "blocklist.json"
    file.write_text(json.dumps({"version": 1, "blocked": [{"level": 1, "node": 0}]}))
    with pytest.raises(BlocklistError, match="records no bank"):
        load_for(file, "alpha", "0123456789abcdef")
    assert load(file).entries() == [(1, 0)]  # still readable as a list of no bank


def test_the_legacy_file_is_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    legacy = tmp_path / "blocklist.json"
    warn_legacy_file(legacy)  # absent: nothing to say
    assert not caplog.records
    legacy.write_text(json.dumps({"version": 1, "blocked": []}))
    with caplog.at_level(logging.WARNING, logger="server.engine.blocklist"):
        warn_legacy_file(legacy)
        warn_legacy_file(legacy)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert str(legacy) in warnings[0]
    assert "not applied" in warnings[0]


def test_two_holders_of_one_file_keep_each_others_entries(tmp_path: Path) -> None:
    """Two servers (or replicas) on one bank build: each change is made to the file as it is
    now, so neither overwrites the other's entries (the file was last-writer-wins)."""
    path = tmp_path / "blocklist.json"
    a, b = load(path), load(path)
    assert a.block(1, 0)
    assert b.block(1, 1)  # b never saw a's entry in memory
    assert a.block(2, 9)
    assert load(path).entries() == [(1, 0), (1, 1), (2, 9)]
    assert b.entries() == [(1, 0), (1, 1)]  # taken in at its last change
    assert not b.block(2, 9)  # already in the file: nothing to change, and now known
    assert b.entries() == [(1, 0), (1, 1), (2, 9)]
    assert b.unblock(1, 0)
    assert load(path).entries() == [(1, 1), (2, 9)]


def _block_many(path: str, level: int, nodes: list[int]) -> None:
    blocklist = load(Path(path))
    for node in nodes:
        blocklist.block(level, node)


def test_processes_blocking_at_once_lose_no_entry(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.json"
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_block_many, args=(str(path), 3, list(range(start, 64, 2))))
        for start in (0, 1)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert load(path).entries() == [(3, n) for n in range(64)]
