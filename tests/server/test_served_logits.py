"""The served logprobs of a generated bank are the model's own: the anchor's forward with the
path's blocks, fetched here straight from the tiers, in float32 and in bfloat16.

The small shape is generated into LMDB, a directory and S3 (rclone), served from its
`serve.json` through the real app and its lifespan, and asked for a prompt's logprobs (`echo`)
and a few greedy tokens on an explicit four-level path, then with memory off.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import Tensor

from server.api.app import create_app
from server.bank import Bank
from server.bank.codec import decode_block, torch_dtype
from server.bank.generate import SERVE_SETTINGS
from server.model.anchor import Anchor
from server.model.checkpoint import load_anchor
from server.model.memory import MemoryBlock
from server.model.memory_batch import build_memory_batch
from server.settings import load_settings
from server.tokenizer import AnchorTokenizer
from tests.server.test_generate import S3, generate, paper_flags, s3_in_environment, store
from tiers import StoreConfig, open_tier
from tiers.keys import BlockKey, storage_key
from tiers.rclone_server import RcloneS3Server

PROMPT = '''def fibonacci(n):
    """Return the n-th Fibonacci number, counting from zero."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
'''
PATH = [3, 0, 1, 2]  # child index per level: nodes 3, 12, 49, 198
NODES = [3, 12, 49, 198]  # node_l = node_{l-1} * branching + i_l
MAX_TOKENS = 3
# float32: the server's prefill (through its KV cache) and a plain forward agree to rounding.
# bfloat16: a last-bit difference in a bf16 logit near 1 moves its logprob by 2^-8.
ATOL = {"float32": 1e-4, "bfloat16": 1e-2}


@dataclass(frozen=True)
class Reference:
    """The model's own answer: logprobs [T + MAX_TOKENS - 1, V] of the prompt's and greedy
    tokens' positions, and the greedy tokens."""

    logp: Tensor
    greedy: list[int]


@pytest.fixture(scope="module")
def s3(rclone_s3: RcloneS3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    with s3_in_environment(rclone_s3.client_settings(), tmp_path_factory.mktemp("no-aws")) as s3:
        yield s3


@pytest.fixture(scope="module")
def bank(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served")
    generate(root / "bank", store(paper_flags(root, "served-logits"), s3))
    return root / "bank"


async def fetch_path(bank: Bank, config: StoreConfig, nodes: Sequence[int]) -> list[MemoryBlock]:
    """The path's blocks read from each level's home tier, checked against the manifest."""
    m = bank.manifest
    blocks = []
    for level, node in enumerate(nodes, start=1):
        key = BlockKey(m.bank_id, level, node)
        entry = m.blocks[str(key)]
        name = config.placement[level][0]
        tier = open_tier(name, config.tiers[name])
        try:
            data = await tier.get(storage_key(key, entry.sha256))
        finally:
            await tier.aclose()
        assert data is not None, f"{key} is not in tier {name}"
        assert hashlib.sha256(data).hexdigest() == entry.sha256
        blocks.append(
            decode_block(
                data, memory_type=m.memory_type, expected=m.block_shapes(level), dtype=m.dtype
            )
        )
    return blocks


def reference(model: Anchor, ids: list[int], blocks: list[MemoryBlock], steps: int) -> Reference:
    """Greedy decoding by whole-sequence forwards (no cache), with `blocks` as memory."""
    dtype = next(model.parameters()).dtype
    memory = build_memory_batch([blocks], dtype=dtype)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq]), memory=memory)  # [1, T, V]
            seq.append(int(logits[0, -1].argmax()))
        logp = model(torch.tensor([seq[:-1]]), memory=memory)[0].float().log_softmax(-1)
    return Reference(logp=logp, greedy=seq[len(ids) :])


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    r = client.post(
        "/v1/completions",
        json={
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,  # a random model may well pick EOS
            "echo": True,
            "logprobs": 5,
            **body,
        },
    )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def served_vs_reference(
    choice: dict[str, Any], ref: Reference, ids: list[int], tok: AnchorTokenizer
) -> float:
    """The largest difference between served logprobs and the reference's, after checking that
    the served tokens are the prompt's, then the reference's greedy ones."""
    lp = choice["logprobs"]
    served = lp["token_logprobs"]
    targets = ids[1:] + ref.greedy  # each position's token; the BOS is not echoed
    assert len(served) == len(targets) == ref.logp.shape[0]
    assert lp["tokens"] == [tok.decode([t]) for t in targets]
    expected = ref.logp.gather(1, torch.tensor(targets)[:, None]).squeeze(1)  # [T - 1 + MAX]
    worst = float((torch.tensor(served) - expected).abs().max())
    # The most likely alternative at each position is the model's too.
    tops = torch.tensor([max(top.values()) for top in lp["top_logprobs"]])
    return max(worst, float((tops - ref.logp.max(-1).values).abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_served_logprobs_are_the_anchors_forward_with_the_paths_blocks(
    bank: Path, tmp_path: Path, dtype: str
) -> None:
    settings = load_settings(
        config_file=bank / SERVE_SETTINGS, data_dir=tmp_path / "state", warmup=False, dtype=dtype
    )
    assert settings.store is not None
    with TestClient(create_app(settings)) as client:
        with_memory = complete(client, memory={"path": PATH})
        without = complete(client, memory={"mode": "off"})

    memory = with_memory["memory"]
    assert memory["path"] == PATH
    assert [(b["level"], b["node"], b["tier"]) for b in memory["blocks"]] == [
        (1, 3, "flash"), (2, 12, "disk"), (3, 49, "disk"), (4, 198, "cloud"),
    ]  # fmt: skip
    assert memory["degraded"] == []
    assert without["memory"]["blocks"] == []

    model = load_anchor(bank / "anchor", dtype=torch_dtype(dtype))
    tok = AnchorTokenizer.from_dir(bank / "anchor", model.config)
    ids = tok.encode(PROMPT)
    assert ids[0] == tok.bos_id  # what the server feeds: the BOS, then the prompt's tokens
    assert with_memory["usage"]["prompt_tokens"] == len(ids)
    blocks = asyncio.run(fetch_path(Bank.open(bank, check_files=False), settings.store, NODES))
    with_ref = reference(model, ids, blocks, MAX_TOKENS)
    without_ref = reference(model, ids, [], MAX_TOKENS)

    atol = ATOL[dtype]
    (choice,) = with_memory["choices"]
    assert choice["text"].startswith(PROMPT)
    assert served_vs_reference(choice, with_ref, ids, tok) <= atol
    (plain,) = without["choices"]
    assert served_vs_reference(plain, without_ref, ids, tok) <= atol
    # Memory changes the answer: the path's logprobs are not the plain model's.
    prompt_lps = len(ids) - 1
    served_on = torch.tensor(choice["logprobs"]["token_logprobs"][:prompt_lps])
    served_off = torch.tensor(plain["logprobs"]["token_logprobs"][:prompt_lps])
    assert float((served_on - served_off).abs().max()) > 3 * atol
