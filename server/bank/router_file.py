"""`router.safetensors`: the centroids of the cluster tree, plus tensors the embedder owns.

Level `l` has `branching**l` nodes; its centroids are `centroids.L{l}`, float32
`[branching**l, embedder dim]`, row `n` being node `n`. The children of node `p` at level `l` are
nodes `p * branching + i` (i in 0..branching-1) at level `l + 1`, so the rows are in node-id
order within each parent. Other tensors (e.g. `embedder.idf`) belong to the router's embedder
and are stored as given. The file is read with safetensors only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import Tensor

from server.bank.codec import canonical_safetensors, unshared_cpu
from server.bank.errors import BankFileMissingError, BankFormatError
from server.bank.manifest import BankManifest

ROUTER_NAME = "router.safetensors"
_CENTROIDS_RE = re.compile(r"centroids\.L([0-9]+)")


def centroids_name(level: int) -> str:
    return f"centroids.L{level}"


def check_router_tensors(
    manifest: BankManifest, tensors: Mapping[str, Tensor], *, source: str = ROUTER_NAME
) -> None:
    """Every level has its centroids, float32 `[branching**level, embedder dim]`."""
    dim = int(manifest.embedder["dim"])
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise BankFormatError(f"{source}: {name!r} is a {type(t).__name__}, not a tensor")
        m = _CENTROIDS_RE.fullmatch(name)
        if name.startswith("centroids.") and (m is None or not 1 <= int(m[1]) <= manifest.levels):
            raise BankFormatError(
                f"{source}: unexpected tensor {name!r} (centroids are centroids.L1.."
                f"centroids.L{manifest.levels})"
            )
    for level in range(1, manifest.levels + 1):
        name = centroids_name(level)
        if name not in tensors:
            raise BankFormatError(f"{source}: missing tensor {name!r}")
        t = tensors[name]
        want = (manifest.n_nodes(level), dim)
        if t.dtype != torch.float32 or tuple(t.shape) != want:
            raise BankFormatError(
                f"{source}: tensor {name!r} is {t.dtype} {list(t.shape)}, expected "
                f"torch.float32 {list(want)} (branching**{level} nodes x embedder.dim)"
            )


def encode_router(manifest: BankManifest, tensors: Mapping[str, Tensor]) -> bytes:
    check_router_tensors(manifest, tensors)
    return canonical_safetensors(
        save_safetensors(unshared_cpu(tensors), metadata={"format": "hmem-router"})
    )


def load_router(manifest: BankManifest, path: Path) -> dict[str, Tensor]:
    """Load and check a bank's router tensors."""
    if not path.is_file():
        raise BankFileMissingError(path, "its router")
    try:
        tensors = load_file(path)
    except SafetensorError as exc:
        raise BankFormatError(f"{str(path)!r} is not a valid safetensors file: {exc}") from None
    check_router_tensors(manifest, tensors, source=repr(str(path)))
    return tensors
