"""`hmem pretrain`: a general-English anchor pretrained on open text that packages install here.

The text comes from `opentext` (the standard library's docstrings, the Python documentation, the
King James Bible, WordNet; each source's licence is in `docs/pretrain.md`); `pretrain_data`
trains a BPE tokenizer on it and packs it into windows; a Llama-shape anchor of a preset size is
trained on them with `train.Trainer`, and a held-out share of the windows gives the validation
loss every `eval_every` steps.

The output is a Hugging Face checkpoint directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with BOS, EOS and the chat template) that `hmem build
--anchor DIR` adds memories to, plus `pretrain.json`: the settings, the sources and their
licences, and the loss curve. As `hmem build` does, the run keeps its state in a hidden work
directory beside the output (`.NAME.pretrain-work`, held with an flock): run again with the same
settings, an interrupted pretrain resumes from its last checkpoint, on the tokenizer and windows
it made before. The output is written into a partial directory and renamed into place whole.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from server.model.anchor import Anchor
from server.model.checkpoint import save_anchor
from server.model.config import AnchorConfig
from server.tokenizer import TOKENIZER, TOKENIZER_CONFIG
from server.training.opentext import gather, resolve_sources
from server.training.pretrain_data import PretrainData, load_prepared, prepare
from server.training.threads import build_threads, use_threads
from server.training.tokenizer import BOS_ID, EOS_ID, tokenizer_config
from server.training.train import Sequences, StageSettings, Trainer, lm_loss, new_anchor

RECORD = "pretrain.json"  # in the output: settings, sources and licences, the loss curve


@dataclass(frozen=True)
class Preset:
    """An anchor's shape and the training settings that size defaults to."""

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float


PRESETS: dict[str, Preset] = {
    # Tests: seconds on one CPU thread.
    "tiny": Preset(64, 2, 4, 2, 192, vocab_size=512, seq_len=64, batch_size=8, steps=60, lr=3e-3),
    # A CPU run (docs/results.md): 2.8M parameters.
    "small": Preset(192, 4, 6, 2, 512, vocab_size=4096, seq_len=256, batch_size=16, steps=4000,
                    lr=2e-3),
    # GPU sizes: 27M and 88M parameters.
    "base": Preset(512, 8, 8, 4, 1536, vocab_size=8192, seq_len=512, batch_size=32, steps=20000,
                   lr=1e-3),
    "large": Preset(768, 12, 12, 4, 2048, vocab_size=16384, seq_len=1024, batch_size=32,
                    steps=30000, lr=6e-4),
}  # fmt: skip
TRAINING = ("vocab_size", "seq_len", "batch_size", "steps", "lr")  # a preset's, unless given


class PretrainError(ValueError):
    """The pretrain cannot start or go on; the message names the problem."""


@dataclass(frozen=True)
class PretrainSettings:
    """What `hmem pretrain` trains. A training value left None is the size's preset value."""

    out: Path
    size: str = "small"
    sources: tuple[str, ...] = ("auto",)  # "auto": every source installed here
    text_dir: Path | None = None  # the user's own .txt and .md files, as one more source
    max_chars_per_source: int | None = 6_000_000  # so that no one source outweighs the rest
    vocab_size: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    lr: float | None = None
    val_fraction: float = 0.02
    eval_every: int = 250
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True

    def training(self) -> dict[str, Any]:
        """vocab_size, seq_len, batch_size, steps and lr: these settings', else the preset's."""
        if self.size not in PRESETS:
            raise PretrainError(f"--size must be one of {', '.join(PRESETS)}, not {self.size!r}")
        preset = asdict(PRESETS[self.size])
        return {n: preset[n] if getattr(self, n) is None else getattr(self, n) for n in TRAINING}

    def fingerprint(self) -> str:
        skip = ("out", "overwrite", "progress", "threads", "device")  # none changes the result
        keep = {k: str(v) for k, v in asdict(self).items() if k not in skip}
        keep |= {k: str(v) for k, v in self.training().items()}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PretrainPlan:
    """What a pretrain is about to do, told before it starts."""

    info: dict[str, Any]  # the data's: sources with licences, missing sources, tokens
    train_windows: int
    val_windows: int
    config: AnchorConfig
    params: int
    steps: int
    start_step: int
    seconds_per_step: float | None  # measured on a copy of the model; None when nothing is left
    threads: int
    device: str

    def text(self) -> str:
        lines = [
            f"{s['name']:<14}{s['chars'] / 1e6:6.2f} M chars, {s['documents']:,} documents "
            f"({s['what']}; {s['licence']})"
            for s in self.info["sources"]
        ]
        lines += [f"{m['name']:<14}not installed: {m['install']}" for m in self.info["missing"]]
        c = self.config
        lines.append(
            f"data          {self.info['tokens']:,} tokens, vocabulary {c.vocab_size:,}: "
            f"{self.train_windows:,} training and {self.val_windows:,} held-out windows"
        )
        lines.append(
            f"anchor        {self.params:,} parameters (d={c.d_model}, {c.n_layers} layers, "
            f"{c.n_heads} heads, {c.n_kv_heads} KV heads, FFN {c.intermediate_size})"
        )
        todo = self.steps - self.start_step
        where = f"{self.device}, {self.threads} torch thread(s)"
        if self.start_step:
            where += f", resuming at step {self.start_step:,}"
        if self.seconds_per_step is not None and todo > 0:
            lines.append(
                f"estimate      {self.seconds_per_step * todo / 60:.1f} min for {todo:,} steps "
                f"({self.seconds_per_step:.3f} s/step measured; {where})"
            )
        else:
            lines.append(f"steps         {self.steps:,} ({where})")
        return "\n".join(lines)


@dataclass
class PretrainSummary:
    out: Path
    params: int
    tokens: int
    steps: int
    resumed_at: int | None
    curve: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"anchor      {self.out} ({self.params:,} parameters)"]
        if self.curve:
            last = self.curve[-1]
            lines.append(
                f"loss        {last['train_loss']:.3f} training, {last['val_loss']:.3f} held out "
                f"({last['val_bits_per_byte']:.3f} bits per byte) after {self.steps:,} steps"
            )
        if self.resumed_at is not None:
            lines.append(f"resumed     at step {self.resumed_at:,} from its checkpoint")
        lines.append(f"time        {self.seconds / 60:.1f} min")
        lines.append(f"next        hmem build --anchor {self.out} --corpus ... --out BANK")
        return "\n".join(lines)


def _check(s: PretrainSettings, t: dict[str, Any]) -> None:
    if min(t["steps"], t["batch_size"], s.eval_every, s.checkpoint_every) < 1:
        raise PretrainError("--steps, --batch-size, --eval-every, --checkpoint-every must be >= 1")
    if t["vocab_size"] < 512 or t["seq_len"] < 8:
        raise PretrainError("--vocab-size must be >= 512 and --seq-len >= 8")
    if s.max_chars_per_source is not None and s.max_chars_per_source < 1:
        raise PretrainError("--max-mb-per-source must be > 0 (0 on the command line: all)")
    if not 0 < s.val_fraction < 0.5:
        raise PretrainError(f"the held-out fraction must be in (0, 0.5), got {s.val_fraction}")
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise PretrainError("--device cuda: no CUDA device is available")
    if s.out.exists() and not s.out.is_dir():
        raise PretrainError(f"{s.out} exists and is not a directory")
    if s.out.is_dir() and any(s.out.iterdir()) and not s.overwrite:
        raise PretrainError(f"{s.out} is not empty; pass --overwrite to replace it")
    resolve_sources(s.sources, text_dir=s.text_dir)  # an unknown name is refused now


@contextlib.contextmanager
def _claimed(work: Path, out: Path) -> Iterator[None]:
    """Hold `work` (an flock) for one pretrain of `out`; remove partials that dead runs left."""
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PretrainError(
            f"another hmem pretrain is writing {out}: wait for it to finish, or stop it and run "
            "this one again (it resumes)"
        ) from None
    try:
        for partial in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(partial, ignore_errors=True)
        yield
    finally:
        os.close(fd)


def pretrain(
    s: PretrainSettings,
    *,
    on_plan: Callable[[PretrainPlan], None] | None = None,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> PretrainSummary:
    """Pretrain an anchor into `s.out`. `on_plan` hears the plan (with the time it will take)
    before training starts, `on_eval` each point of the loss curve as it is measured."""
    started = time.perf_counter()
    t = s.training()
    _check(s, t)
    out = s.out.absolute()
    work = out.parent / f".{out.name}.pretrain-work"
    with _claimed(work, out):
        stamp = work / "stamp.json"
        try:
            fingerprint = json.loads(stamp.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            fingerprint = None  # none, or one a killed run left half-written
        if fingerprint != s.fingerprint():  # another run's state: nothing to resume
            for entry in work.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            stamp.write_text(json.dumps({"fingerprint": s.fingerprint()}))
        data = load_prepared(work) or _prepare(s, t, work)
        model, summary = _train(s, t, work, data, on_plan=on_plan, on_eval=on_eval)
        _export(s, out, model, summary, data)
        shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _prepare(s: PretrainSettings, t: dict[str, Any], work: Path) -> PretrainData:
    """Gather the text, train the tokenizer, pack the windows (`pretrain_data.prepare`)."""
    try:
        text = gather(
            resolve_sources(s.sources, text_dir=s.text_dir),
            required="auto" not in s.sources,  # a source the user named must be there
            max_chars_per_source=s.max_chars_per_source,
        )
        return prepare(text, work, vocab_size=t["vocab_size"], seq_len=t["seq_len"],
                       val_fraction=s.val_fraction, seed=s.seed, progress=s.progress)  # fmt: skip
    except ValueError as exc:  # OpenTextError, or too little text
        raise PretrainError(str(exc)) from None


def _new_anchor(s: PretrainSettings, t: dict[str, Any], vocab_size: int) -> Anchor:
    p = PRESETS[s.size]
    config = AnchorConfig(
        vocab_size=vocab_size, d_model=p.d_model, n_layers=p.n_layers, n_heads=p.n_heads,
        n_kv_heads=p.n_kv_heads, intermediate_size=p.intermediate_size,
        max_seq_len=max(512, t["seq_len"]), tie_embeddings=True, bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )  # fmt: skip
    return new_anchor(config, s.seed)  # initialised as hmem build's


def _seconds_per_step(model: Anchor, windows: torch.Tensor, batch_size: int) -> float:
    """Time a few training steps of a copy of the model: the real one and its RNG are untouched."""
    trial = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(trial.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(4):
        begun = time.perf_counter()
        idx = torch.randint(len(windows), (min(batch_size, len(windows)),), generator=gen)
        tokens = windows[idx.to(windows.device)]
        loss = lm_loss(trial(tokens), tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if windows.is_cuda:
            torch.cuda.synchronize(windows.device)
        times.append(time.perf_counter() - begun)
    return sum(times[1:]) / 3  # the first step pays for allocation and warm-up


@torch.no_grad()
def _val_loss(model: Anchor, val: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [
        float(lm_loss(model(val[i : i + batch_size]), val[i : i + batch_size]))
        for i in range(0, len(val), batch_size)
    ]
    return sum(losses) / len(losses)


def _train(
    s: PretrainSettings,
    t: dict[str, Any],
    work: Path,
    data: PretrainData,
    *,
    on_plan: Callable[[PretrainPlan], None] | None,
    on_eval: Callable[[dict[str, float]], None] | None,
) -> tuple[Anchor, PretrainSummary]:
    model = _new_anchor(s, t, data.tokenizer.get_vocab_size())
    params = sum(p.numel() for p in model.parameters())
    threads = build_threads(s.threads, params)
    use_threads(threads)
    device = torch.device(s.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 training at tensor-core speed
    model.to(device)
    train, val = data.train.to(device), data.val.to(device)
    no_paths = torch.zeros(len(train), 0, dtype=torch.long)  # no memories: no cluster paths
    stage = StageSettings(steps=t["steps"], lr=t["lr"], batch_size=t["batch_size"])
    trainer = Trainer("pretrain", model=model, memory=None, data=Sequences(train, no_paths),
                      settings=stage, work_dir=work, seed=s.seed,
                      checkpoint_every=s.checkpoint_every)  # fmt: skip
    resumed_at = trainer.step if trainer.resume() else None
    curve_file = work / "curve.json"
    curve: list[dict[str, float]] = []
    if resumed_at is not None and curve_file.is_file():
        curve = [p for p in json.loads(curve_file.read_text()) if p["step"] <= trainer.step]
    if on_plan is not None:
        todo = trainer.step < stage.steps
        seconds = _seconds_per_step(model, train, stage.batch_size) if todo else None
        on_plan(PretrainPlan(
            info=data.info, train_windows=len(train), val_windows=len(val), config=model.config,
            params=params, steps=stage.steps, start_step=trainer.step, seconds_per_step=seconds,
            threads=threads, device=str(device),
        ))  # fmt: skip

    def evaluate() -> None:
        tail = trainer.losses[-s.eval_every :]
        loss = _val_loss(model, val, stage.batch_size)
        bits = loss / math.log(2) / data.info["bytes_per_token"]
        point = {"step": trainer.step, "train_loss": sum(tail) / max(1, len(tail)),
                 "val_loss": loss, "val_bits_per_byte": bits}  # fmt: skip
        curve.append(point)
        tmp = curve_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(curve))
        tmp.replace(curve_file)
        if on_eval is not None:
            on_eval(point)

    if resumed_at is not None and (not curve or curve[-1]["step"] < trainer.step):
        evaluate()  # the point a run killed after its last checkpoint did not record
    while trainer.step < stage.steps:
        trainer.run(progress=s.progress, until=(trainer.step // s.eval_every + 1) * s.eval_every)
        evaluate()
    summary = PretrainSummary(out=s.out, params=params, tokens=data.info["tokens"],
                              steps=stage.steps, resumed_at=resumed_at, curve=curve)  # fmt: skip
    return model.cpu(), summary


def _export(
    s: PretrainSettings, out: Path, model: Anchor, summary: PretrainSummary, data: PretrainData
) -> None:
    """Write the checkpoint into a partial directory beside `out`, then rename it into place."""
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    save_anchor(model, partial)
    data.tokenizer.save(str(partial / TOKENIZER))
    config = tokenizer_config(model_max_length=model.config.max_seq_len)
    (partial / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
    for name in ("out", "overwrite", "progress"):
        settings.pop(name)
    record = {"settings": settings | s.training(), **data.info, "params": summary.params,
              "curve": summary.curve}  # fmt: skip
    (partial / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)  # an empty directory, or the one --overwrite replaces
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "PRESETS",
    "RECORD",
    "PretrainError",
    "PretrainPlan",
    "PretrainSettings",
    "PretrainSummary",
    "pretrain",
]
