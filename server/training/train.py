"""Training loops: pretrain the anchor, then co-train anchor and memories on mixed-path batches.

Each batch holds documents of many cluster paths, every document with its own path's blocks (a
heterogeneous batch); a document uses the generic memory instead with probability 1/(k+1)
(k = branching), as in the paper. Anchor first, then memories at a lower anchor learning rate:
co-training from scratch lets the anchor hand every fact to the memories, and the anchor alone
stops being a fair baseline (`docs/longtail.md`, finding 5). AdamW (0.9, 0.95), warm-up then cosine
decay, gradient clipping. Training state is saved as safetensors + JSON (never pickle) so an
interrupted build resumes where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm import tqdm

from server.model.anchor import Anchor
from server.model.config import AnchorConfig
from server.model.memory_batch import MemoryBatch, build_memory_batch
from server.training.memory_params import MemoryParams

# Padding after a window's end: an id no vocabulary has (id 0 is a real token of most Hugging
# Face vocabularies, so a pad of 0 would leave those tokens unscored).
PAD = -1


@dataclass(frozen=True, slots=True)
class StageSettings:
    steps: int
    lr: float = 3e-3
    batch_size: int = 16
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    memory_weight_decay: float = 1e-3
    anchor_lr_scale: float = 1.0  # co-training: the anchor's lr is lr * this (0 freezes it)
    grad_clip: float = 1.0


@dataclass
class Sequences:
    """Tokenised training windows, their cluster paths, right-padded into one tensor."""

    tokens: Tensor  # [N, T] long, PAD after each sequence's end
    paths: Tensor  # [N, levels] long node ids

    @classmethod
    def build(cls, ids: Sequence[Sequence[int]], paths: Tensor, seq_len: int) -> Sequences:
        T = min(seq_len, max(len(s) for s in ids))
        tokens = torch.full((len(ids), T), PAD, dtype=torch.long)
        for i, s in enumerate(ids):
            s = s[:T]
            tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return cls(tokens, paths)


def new_anchor(config: AnchorConfig, seed: int) -> Anchor:
    """An anchor to pretrain from scratch: normal(0, 0.02) matrices, the output projections of
    each layer scaled by 1/sqrt(2 n_layers) (GPT-2's residual init), norms at one."""
    torch.manual_seed(seed)
    model = Anchor(config)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if w.ndim > 1:
                torch.nn.init.normal_(w, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                w.mul_(1 / (2 * config.n_layers) ** 0.5)
    return model


def lm_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy, padding (`PAD`) ignored: logits [B, T, V], tokens [B, T]."""
    targets = tokens[:, 1:].clone()
    targets[targets == PAD] = -100
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def _schedule(s: StageSettings) -> Callable[[int], float]:
    warmup = max(1, int(s.steps * s.warmup_frac))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, s.steps - warmup))
        return s.min_lr_frac + (1 - s.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """One training stage, resumable from `work_dir/<name>.safetensors`."""

    def __init__(
        self,
        name: str,
        *,
        model: Anchor,
        memory: MemoryParams | None,
        data: Sequences,
        settings: StageSettings,
        work_dir: Path,
        seed: int,
        generic_prob: float = 0.0,
        checkpoint_every: int = 200,
    ) -> None:
        self.name, self.model, self.memory, self.data = name, model, memory, data
        self.s, self.work_dir, self.generic_prob = settings, work_dir, generic_prob
        self.checkpoint_every = checkpoint_every
        self.gen = torch.Generator().manual_seed(seed)
        self.trains_anchor = settings.lr * settings.anchor_lr_scale > 0
        if not self.trains_anchor:
            model.requires_grad_(False)
        self.opt = self._optimizer(model, memory)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _schedule(settings))
        self.step = 0
        self.losses: list[float] = []

    def _optimizer(self, model: Anchor, memory: MemoryParams | None) -> torch.optim.AdamW:
        groups: list[dict[str, object]] = []
        if self.trains_anchor:
            lr = self.s.lr * self.s.anchor_lr_scale
            groups.append({"params": list(model.parameters()), "lr": lr,
                           "weight_decay": self.s.weight_decay})  # fmt: skip
        if memory is not None:
            groups.append({"params": list(memory.parameters()), "lr": self.s.lr,
                           "weight_decay": self.s.memory_weight_decay})  # fmt: skip
        return torch.optim.AdamW(groups, betas=(0.9, 0.95))

    # -- checkpoints ----------------------------------------------------------------------------

    @property
    def _file(self) -> Path:
        return self.work_dir / f"{self.name}.safetensors"

    def save(self) -> None:
        tensors: dict[str, Tensor] = {}
        if self.trains_anchor:  # a frozen anchor is the one it started as: not saved again
            tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
            if self.model.config.tie_embeddings:
                tensors.pop("model.lm_head.weight")
        if self.memory is not None:
            tensors |= {f"memory.{k}": v for k, v in self.memory.state_tensors().items()}
        opt = self.opt.state_dict()
        for idx, state in opt["state"].items():
            for key, value in state.items():
                tensors[f"opt.{idx}.{key}"] = value
        tensors["rng"] = self.gen.get_state()
        meta = {"step": self.step, "losses": self.losses[-1000:], "sched": self.sched.state_dict(),
                "param_groups": opt["param_groups"], "settings": asdict(self.s)}  # fmt: skip
        # One file, renamed into place: the step count and the weights never disagree, however
        # the process ends.
        weights = self._file
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(tmp),
                  metadata={"trainer": json.dumps(meta)})  # fmt: skip
        tmp.replace(weights)

    def resume(self) -> bool:
        """Load this stage's checkpoint if there is one; True when it was loaded."""
        weights = self._file
        if not weights.is_file():
            return False
        with safe_open(str(weights), framework="pt") as f:
            stored = (f.metadata() or {}).get("trainer")
        if stored is None:
            return False  # written by an older hmem, without its step: start this stage again
        meta = json.loads(stored)
        if meta["settings"] != asdict(self.s):
            return False  # a different build: start this stage again
        tensors = load_file(str(weights))
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        if model_state:
            self.model.load_state_dict(model_state, strict=not self.model.config.tie_embeddings)
        if self.memory is not None:
            self.memory.load_state_tensors(
                {k[7:]: v for k, v in tensors.items() if k.startswith("memory.")}
            )
        state: dict[int, dict[str, Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                state.setdefault(int(idx), {})[key] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.sched.load_state_dict(meta["sched"])
        self.gen.set_state(tensors["rng"])
        self.step, self.losses = int(meta["step"]), list(meta["losses"])
        return True

    # -- the loop -------------------------------------------------------------------------------

    def _batch_memory(
        self, memory: MemoryParams | None, paths: Tensor, gen: torch.Generator
    ) -> MemoryBatch | None:
        if memory is None:
            return None
        use_generic = torch.rand(len(paths), generator=gen) < self.generic_prob
        per_seq = [
            memory.generic_blocks() if g else memory.path_blocks(p.tolist())
            for p, g in zip(paths, use_generic.tolist(), strict=True)
        ]
        return build_memory_batch(per_seq, dtype=torch.float32)

    def _step(
        self,
        model: Anchor,
        memory: MemoryParams | None,
        opt: torch.optim.Optimizer,
        gen: torch.Generator,
    ) -> Tensor:
        """One optimiser step on a random batch; the loss."""
        N = len(self.data.tokens)
        idx = torch.randint(N, (min(self.s.batch_size, N),), generator=gen)
        tokens = self.data.tokens[idx]
        keep = int((tokens != PAD).sum(1).max())  # trim padding columns
        tokens = tokens[:, :keep]
        batch_memory = self._batch_memory(memory, self.data.paths[idx], gen)
        logits = model(tokens.clamp(min=0), memory=batch_memory)  # pads read as id 0, unscored
        loss = lm_loss(logits, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.s.grad_clip)
        opt.step()
        return loss.detach()

    def seconds_per_step(self, trials: int = 3) -> float:
        """Time `trials` steps (after one to warm up) on copies of what trains: the stage's own
        weights, optimiser and random state are untouched."""
        # A frozen anchor is only read: shared, not copied (a large one would double the RAM).
        model = copy.deepcopy(self.model).train() if self.trains_anchor else self.model.train()
        memory = copy.deepcopy(self.memory)
        opt, gen = self._optimizer(model, memory), torch.Generator().manual_seed(0)
        times = []
        for _ in range(trials + 1):
            begun = time.perf_counter()
            self._step(model, memory, opt, gen)
            if self.data.tokens.is_cuda:
                torch.cuda.synchronize(self.data.tokens.device)
            times.append(time.perf_counter() - begun)
        return sum(times[1:]) / trials

    def run(self, *, progress: bool = True, until: int | None = None) -> list[float]:
        """Train to the stage's last step (or to `until`, checkpointing there); the losses."""
        self.model.train()
        stop = self.s.steps if until is None else min(until, self.s.steps)
        bar = tqdm(total=self.s.steps, initial=self.step, desc=self.name, disable=not progress,
                   unit="step", dynamic_ncols=True)  # fmt: skip
        while self.step < stop:
            loss = self._step(self.model, self.memory, self.opt, self.gen)
            self.sched.step()
            self.step += 1
            self.losses.append(float(loss.detach()))
            bar.update(1)
            if self.step % 20 == 0:
                bar.set_postfix(loss=f"{sum(self.losses[-20:]) / 20:.3f}")
            if self.step % self.checkpoint_every == 0 or self.step == stop:
                self.save()
        bar.close()
        self.model.eval()
        return self.losses
