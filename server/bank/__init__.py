"""The memory bank on disk (format version 1): manifest, block codec, writer and reader.

    manifest = write_random_bank(tmp / "bank")           # or BankWriter(...) ... commit()
    bank = Bank.open(tmp / "bank", require_anchor=False)
    block = bank.read_block("tiny/L1/3")                   # verified, then viewed, not copied
    store = TieredStore(..., codec=BankBlockCodec(bank.manifest), digests=manifest.digests())

Blocks are safetensors blobs named by `tiers.BlockKey`; the manifest's sha256 index is what
every tier read is verified against. Only JSON and safetensors are ever read.
"""

from server.bank.codec import (
    BLOCK_FORMAT,
    BankBlockCodec,
    as_stored,
    block_nbytes,
    check_shapes,
    decode_block,
    encode_block,
    torch_dtype,
)
from server.bank.errors import (
    BankError,
    BankExistsError,
    BankFileMissingError,
    BankFormatError,
    BlockFormatError,
    BlockIntegrityError,
    BlockNotInBankError,
)
from server.bank.layout import BANK_DTYPES, BankDType, ModelShape, block_shapes, lora_dims
from server.bank.manifest import (
    MANIFEST_NAME,
    BankManifest,
    BlockEntry,
    load_manifest,
    parse_manifest,
)
from server.bank.random_bank import TINY_MODEL, write_random_bank
from server.bank.reader import Bank
from server.bank.router_file import ROUTER_NAME, centroids_name
from server.bank.writer import BankWriter

__all__ = [
    "BANK_DTYPES",
    "BLOCK_FORMAT",
    "MANIFEST_NAME",
    "ROUTER_NAME",
    "TINY_MODEL",
    "Bank",
    "BankBlockCodec",
    "BankDType",
    "BankError",
    "BankExistsError",
    "BankFileMissingError",
    "BankFormatError",
    "BankManifest",
    "BankWriter",
    "BlockEntry",
    "BlockFormatError",
    "BlockIntegrityError",
    "BlockNotInBankError",
    "ModelShape",
    "as_stored",
    "block_nbytes",
    "block_shapes",
    "centroids_name",
    "check_shapes",
    "decode_block",
    "encode_block",
    "load_manifest",
    "lora_dims",
    "parse_manifest",
    "torch_dtype",
    "write_random_bank",
]
