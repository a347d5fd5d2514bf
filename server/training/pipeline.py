"""`hmem build`: corpus -> tokenizer -> embeddings -> cluster tree -> anchor -> memories -> bank.

Every input is checked before any work starts, with a one-line error that names the problem.
Training state lives in a hidden work directory beside the output (`.NAME.build-work`): a build
that is interrupted resumes from its last checkpoint when run again with the same settings. The
bank itself is written by `BankWriter` into a hidden partial directory and renamed into place only
when complete, so an interrupted build never leaves a directory that looks like a bank.

One build at a time writes a given `--out`: it holds an flock on its work directory, which the
kernel releases however the process ends. Holding it, a build removes the partial directories
(`.NAME.partial-*`) that builds killed outright (kill -9, power loss) left beside the output:
no live build can own them, and resuming never reads them (it resumes from the work directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

from server.bank.layout import ModelShape
from server.bank.paths import ANCHOR_FILES
from server.bank.writer import BankWriter
from server.model.anchor import Anchor
from server.model.checkpoint import WEIGHTS, load_anchor, save_anchor
from server.model.config import AnchorConfig
from server.model.errors import ModelError
from server.model.memory import LORA_TARGETS, MemoryType
from server.routing import Router, cluster_hierarchically
from server.routing.embedders import EMBEDDERS, Embedder, make_embedder
from server.tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER, TOKENIZER_CONFIG, AnchorTokenizer
from server.training.corpus import CorpusError, load_corpus, split_windows
from server.training.memory_params import MemoryParams
from server.training.restate import mine
from server.training.threads import build_threads, use_threads
from server.training.tokenizer import BOS_ID, EOS_ID, byte_tokenizer, write_byte_tokenizer
from server.training.train import Sequences, StageSettings, Trainer, new_anchor

# Anchors hmem trains from scratch: (d_model, n_layers, n_heads, n_kv_heads, intermediate_size).
ANCHOR_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (64, 2, 4, 2, 192),
    "small": (128, 4, 4, 2, 384),
    "base": (256, 6, 8, 4, 768),
}


class BuildError(ValueError):
    """The build cannot start or go on; the message names the problem."""


STAMP = "build.json"  # in the work directory: the settings' fingerprint and the builder's pid


@dataclass(frozen=True)
class BuildSettings:
    """What `hmem build` trains. The defaults are the settings measured best on paraphrased
    long-tail corpora of a few thousand documents (`docs/results.md`, "Facts in other words"):
    a tiny anchor pretrained and then frozen, memories of about 27% of it per path, facts
    restated in every phrasing of their relation, 5,000 memory steps of 32 windows."""

    corpus: Path
    out: Path
    levels: int = 2
    branching: int = 8
    widths: tuple[int, ...] = (48, 32)
    memory_type: MemoryType = MemoryType.FFN
    lora_targets: tuple[str, ...] = ("q", "v")
    # Words alone route queries in new wording best (docs/results.md, "Routing that survives
    # new wording"); `server.routing.EMBEDDERS` lists the others.
    embedder: str = "hashed-tfidf-unigram"
    embed_dim: int = 8192
    minilm_dir: Path | None = None
    anchor_size: str = "tiny"
    anchor_dir: Path | None = None  # an existing Hugging Face checkpoint (docs/models.md)
    freeze_anchor: bool = True  # memories only after pretraining: the anchor stays the baseline
    restate: bool = True  # add the corpus's facts restated in each phrasing of their relation
    pretrain_steps: int = 1500
    memory_steps: int = 5000
    batch_size: int = 32
    lr: float = 6e-3
    anchor_lr_scale: float = 0.1
    seq_len: int = 256
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None  # torch threads; None: `threads.build_threads`' choice
    bank_id: str | None = None
    overwrite: bool = False
    progress: bool = True

    @staticmethod
    def default_widths(levels: int) -> tuple[int, ...]:
        """48 neurons at level 1, 32 at level 2, then halving: shallow blocks large, deep small."""
        return (48, 32, 16, 8)[:levels]

    def fingerprint(self) -> str:
        skip = ("overwrite", "progress", "threads")  # none of these changes what is trained
        keep = {k: str(v) for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class BuildSummary:
    bank: Path
    documents: int
    windows: int
    clusters: list[int]
    anchor_params: int
    fetched_params: int
    bank_params: int
    pretrain_loss: float | None
    memory_loss: float | None
    seconds: float
    resumed: list[str]
    threads: int = 1
    restated: str | None = None  # what `restate.mine` found, when the build restates facts

    def text(self) -> str:
        share = self.fetched_params / max(1, self.anchor_params)
        lines = [
            f"bank        {self.bank}",
            f"corpus      {self.documents} documents, {self.windows} windows",
            f"clusters    {' / '.join(map(str, self.clusters))} (per level)",
            f"anchor      {self.anchor_params:,} parameters",
            f"memory      {self.fetched_params:,} fetched per path ({share:.0%} of the anchor), "
            f"{self.bank_params:,} in the bank",
        ]
        if self.pretrain_loss is not None:
            lines.append(f"pretrain    final loss {self.pretrain_loss:.3f}")
        if self.memory_loss is not None:
            lines.append(f"memories    final loss {self.memory_loss:.3f}")
        if self.resumed:
            lines.append(f"resumed     {', '.join(self.resumed)} from checkpoints")
        if self.restated is not None:
            lines.append(f"restated    {self.restated}")
        lines.append(f"time        {self.seconds / 60:.1f} min on {self.threads} torch thread(s)")
        return "\n".join(lines)


def _check(s: BuildSettings) -> None:
    if len(s.widths) != s.levels:
        raise BuildError(f"--widths has {len(s.widths)} values for {s.levels} levels")
    if any(w < 0 for w in s.widths) or not any(s.widths):
        raise BuildError("--widths must be >= 0 with at least one level of memory")
    if not 1 <= s.levels <= 4 or not 2 <= s.branching <= 64:
        raise BuildError("--levels must be 1..4 and --branching 2..64")
    if s.memory_type is MemoryType.LORA and not set(s.lora_targets) <= set(LORA_TARGETS):
        raise BuildError(f"--lora-targets must be among {', '.join(LORA_TARGETS)}")
    if s.anchor_dir is None and s.anchor_size not in ANCHOR_SIZES:
        raise BuildError(f"--anchor-size must be one of {', '.join(ANCHOR_SIZES)}")
    if s.embedder not in EMBEDDERS:
        raise BuildError(f"--embedder must be one of {', '.join(EMBEDDERS)}")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError("--device cuda: no CUDA device is available")
    if (s.out / "manifest.json").exists() and not s.overwrite:
        raise BuildError(f"{s.out} already holds a bank; pass --overwrite to replace it")
    if s.out.exists() and not s.out.is_dir():
        raise BuildError(f"{s.out} exists and is not a directory")


@dataclass(frozen=True)
class Framing:
    """How a training window becomes ids: the anchor's own tokenizer, with the BOS its prompts
    start with (none for Qwen's) and its first EOS after the window, as the server will frame a
    prompt and stop a generation."""

    tokenizer: Tokenizer
    bos: tuple[int, ...]
    eos: tuple[int, ...]

    @classmethod
    def of_checkpoint(cls, directory: Path, config: AnchorConfig) -> Framing:
        if not (directory / TOKENIZER).is_file():
            raise BuildError(f"anchor directory {directory} has no {TOKENIZER}")
        tok = AnchorTokenizer.from_dir(directory, config)
        bos = (tok.bos_id,) if tok.adds_bos and tok.bos_id is not None else ()
        eos = (min(tok.eos_ids),) if tok.eos_ids else ()
        return cls(Tokenizer.from_file(str(directory / TOKENIZER)), bos, eos)

    def ids(self, text: str) -> list[int]:
        return [*self.bos, *self.tokenizer.encode(text, add_special_tokens=False).ids, *self.eos]


def _anchor(s: BuildSettings, tokenizer: Tokenizer) -> tuple[Anchor, Framing]:
    if s.anchor_dir is not None:
        try:
            model = load_anchor(s.anchor_dir)  # refuses unsupported checkpoints by name
        except ModelError as exc:
            raise BuildError(f"--anchor {s.anchor_dir}: {exc}") from None
        return model, Framing.of_checkpoint(s.anchor_dir, model.config)
    d, n_layers, heads, kv, ff = ANCHOR_SIZES[s.anchor_size]
    config = AnchorConfig(
        vocab_size=tokenizer.get_vocab_size(), d_model=d, n_layers=n_layers, n_heads=heads,
        n_kv_heads=kv, intermediate_size=ff, max_seq_len=max(512, s.seq_len),
        tie_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    return new_anchor(config, s.seed), Framing(tokenizer, (BOS_ID,), (EOS_ID,))


def _embedder(s: BuildSettings, texts: Sequence[str]) -> Embedder:
    return make_embedder(s.embedder, texts, dim=s.embed_dim, seed=s.seed, minilm_dir=s.minilm_dir)


def _embed(embedder: Embedder, texts: Sequence[str], progress: bool) -> torch.Tensor:
    chunk = 256
    parts = [
        embedder.embed(texts[i : i + chunk])
        for i in tqdm(range(0, len(texts), chunk), desc="embed", disable=not progress, unit="chunk")
    ]
    return torch.cat(parts)


def build_bank(s: BuildSettings) -> BuildSummary:
    started = time.perf_counter()
    _check(s)
    try:
        docs = load_corpus(s.corpus)
    except CorpusError as exc:
        raise BuildError(str(exc)) from None
    base_tok = byte_tokenizer()
    model, framing = _anchor(s, base_tok)
    threads = build_threads(s.threads, sum(p.numel() for p in model.parameters()))
    use_threads(threads)
    windows = [w for doc in docs for w in split_windows(doc.text, max(16, s.seq_len - 2))]
    n_clusters = s.branching**s.levels
    if len(windows) < n_clusters:
        raise BuildError(
            f"{len(windows)} documents for {n_clusters} clusters ({s.branching}^{s.levels}): "
            "use a larger corpus, or fewer levels or a smaller branching"
        )
    work = s.out.parent / f".{s.out.name}.build-work"
    with _claimed(work, s.out):
        summary = _train_and_export(s, work, docs=len(docs), windows=windows, model=model,
                                    framing=framing, started=started)  # fmt: skip
    summary.threads = threads
    return summary


@contextlib.contextmanager
def _claimed(work: Path, out: Path) -> Iterator[None]:
    """Hold `work` (an flock) for one build of `out`; remove what dead builds of `out` left."""
    for _ in range(3):
        work.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(work, os.O_RDONLY)
        except FileNotFoundError:
            continue  # removed by a build of `out` that just finished: again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(work)):
                break  # locked, and still the directory at that path
        except BlockingIOError:
            os.close(fd)
            raise BuildError(
                f"another hmem build{_owner(work)} is writing {out}: wait for it to finish, "
                "or stop it and run this build again (it resumes)"
            ) from None
        except FileNotFoundError:
            pass
        os.close(fd)
    else:
        raise BuildError(f"could not take {work}: other builds of {out} keep replacing it")
    try:
        for partial in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def _owner(work: Path) -> str:
    """The pid of the build holding `work`, as its stamp records it: " (pid N)", or ""."""
    try:
        return f" (pid {int(json.loads((work / STAMP).read_text())['pid'])})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _train_and_export(
    s: BuildSettings,
    work: Path,
    *,
    docs: int,
    windows: list[str],
    model: Anchor,
    framing: Framing,
    started: float,
) -> BuildSummary:
    stamp = work / STAMP
    try:
        fingerprint = json.loads(stamp.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        fingerprint = None  # no stamp, or one a killed build left half-written
    if fingerprint != s.fingerprint():
        # An earlier build with other settings: nothing to resume. Emptied, not removed: the
        # directory itself is what this build holds locked.
        for entry in work.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    stamp.write_text(json.dumps({"fingerprint": s.fingerprint(), "pid": os.getpid()}))

    embedder = _embedder(s, windows)
    x = _embed(embedder, windows, s.progress)
    clustering = cluster_hierarchically(x, branching=s.branching, levels=s.levels, seed=s.seed)
    tree = clustering.tree
    texts = list(windows)
    mined = mine(windows) if s.restate else None
    if mined is not None and mined.sentences:  # facts in each phrasing of their relation
        texts += mined.sentences
        x = torch.cat([x, _embed(embedder, mined.sentences, s.progress)])
    paths = tree.route(x).node_ids  # greedy routing: the path a query of this text would get
    ids = [framing.ids(w) for w in texts]
    data = Sequences.build(ids, paths, s.seq_len)
    device = torch.device(s.device)
    model.to(device)
    data = Sequences(data.tokens.to(device), data.paths)
    resumed: list[str] = []

    pretrain_loss = None
    if s.anchor_dir is None and s.pretrain_steps > 0:
        stage = StageSettings(steps=s.pretrain_steps, lr=s.lr, batch_size=s.batch_size)
        t = Trainer("pretrain", model=model, memory=None, data=data, settings=stage,
                    work_dir=work, seed=s.seed)  # fmt: skip
        if t.resume():
            resumed.append(f"pretrain at step {t.step}")
        _announce(t, s.progress)
        pretrain_loss = _final(t.run(progress=s.progress))

    shape = ModelShape(
        n_layers=model.config.n_layers, d_model=model.config.d_model,
        n_heads=model.config.n_heads, n_kv_heads=model.config.n_kv_heads,
        head_dim=model.config.head_dim, intermediate_size=model.config.intermediate_size,
    )  # fmt: skip
    memory = MemoryParams(
        memory_type=s.memory_type, model=shape, branching=s.branching, widths=s.widths,
        lora_targets=s.lora_targets if s.memory_type is MemoryType.LORA else None, seed=s.seed,
    ).to(device)  # fmt: skip
    memory_loss = None
    if s.memory_steps > 0:
        scale = 0.0 if s.freeze_anchor else s.anchor_lr_scale
        stage = StageSettings(steps=s.memory_steps, lr=s.lr, batch_size=s.batch_size,
                              anchor_lr_scale=scale)  # fmt: skip
        t = Trainer("memories", model=model, memory=memory, data=data, settings=stage,
                    work_dir=work, seed=s.seed + 1, generic_prob=1 / (s.branching + 1))  # fmt: skip
        if t.resume():
            resumed.append(f"memories at step {t.step}")
        _announce(t, s.progress)
        memory_loss = _final(t.run(progress=s.progress))

    _export(s, model.cpu(), framing.tokenizer, memory.cpu(), Router(embedder, tree), shape, work)
    shutil.rmtree(work, ignore_errors=True)
    fetched = sum(
        p.numel() for b in memory.path_blocks([0] * s.levels) for p in b.tensors().values()
    )
    bank_params = sum(p.numel() for p in memory.parameters())
    counts = [s.branching**lvl for lvl in range(1, s.levels + 1)]
    return BuildSummary(
        bank=s.out, documents=docs, windows=len(windows), clusters=counts,
        anchor_params=sum(p.numel() for p in model.parameters()), fetched_params=fetched,
        bank_params=bank_params, pretrain_loss=pretrain_loss, memory_loss=memory_loss,
        seconds=time.perf_counter() - started, resumed=resumed,
        restated=None if mined is None else mined.summary(),
    )  # fmt: skip


def _announce(t: Trainer, progress: bool) -> None:
    """Say, before a stage starts, how long it will take: a few steps timed on copies."""
    left = t.s.steps - t.step
    if not progress or left <= 0:
        return
    per_step = t.seconds_per_step()
    print(
        f"{t.name}: {left} steps at {per_step:.2f} s each: about {_duration(left * per_step)}",
        file=sys.stderr,
        flush=True,
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _final(losses: list[float]) -> float | None:
    tail = losses[-50:]
    return sum(tail) / len(tail) if tail else None


def _export(
    s: BuildSettings,
    model: Anchor,
    tokenizer: Tokenizer,
    memory: MemoryParams,
    router: Router,
    shape: ModelShape,
    work: Path,
) -> None:
    anchor_dir = work / "anchor"
    if s.anchor_dir is not None and s.freeze_anchor:
        # The anchor was not trained: the bank holds the user's files byte for byte.
        anchor_dir.mkdir(parents=True, exist_ok=True)
        for name in ANCHOR_FILES:
            if (s.anchor_dir / name).is_file():
                shutil.copyfile(s.anchor_dir / name, anchor_dir / name)
        if not (s.anchor_dir / WEIGHTS).is_file():  # sharded: one file, as the bank holds it
            save_anchor(model, anchor_dir)
    else:
        save_anchor(model, anchor_dir)
        _write_tokenizer(s, tokenizer, anchor_dir, model_max_length=model.config.max_seq_len)
    router_file = work / "router.safetensors"
    router.save(router_file)
    bank_id = s.bank_id or s.out.name
    with BankWriter(
        s.out, bank_id=bank_id, memory_type=s.memory_type, levels=s.levels,
        branching=s.branching, widths=s.widths, dtype=s.dtype,  # type: ignore[arg-type]
        model=shape, embedder=router.embedder.spec,
        lora_targets=list(s.lora_targets) if s.memory_type is MemoryType.LORA else None,
        overwrite=s.overwrite,
    ) as writer:  # fmt: skip
        with torch.no_grad():
            blocks = list(memory.blocks())
            for level, node, block in tqdm(blocks, desc="export", disable=not s.progress):
                writer.write_block(level, node, block)
            for level, block in zip(memory.levels(), memory.generic_blocks(), strict=True):
                writer.write_generic(level, block)
        writer.write_router(load_file(str(router_file)))
        writer.copy_anchor(anchor_dir)


def _write_tokenizer(
    s: BuildSettings, tokenizer: Tokenizer, anchor_dir: Path, *, model_max_length: int
) -> None:
    """The anchor's tokenizer files: hmem's byte-level ones, or an existing checkpoint's own."""
    if s.anchor_dir is None:
        write_byte_tokenizer(anchor_dir, model_max_length=model_max_length)
        return
    tokenizer.save(str(anchor_dir / TOKENIZER))
    for name in (TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE):
        if (s.anchor_dir / name).is_file():
            shutil.copyfile(s.anchor_dir / name, anchor_dir / name)


__all__ = [
    "ANCHOR_SIZES",
    "BuildError",
    "BuildSettings",
    "BuildSummary",
    "Framing",
    "build_bank",
]
