"""The tier protocol: an async key -> bytes store where a miss is `None`.

Every tier exposes `read(key, consume)`: the tier hands `consume` a read-only `memoryview` of the
block's bytes, on a worker thread, while those bytes are guaranteed valid (inside an LMDB read
transaction, over a freshly read file buffer, over an S3 body), and returns what `consume`
returns. That is how LMDB reads stay zero-copy without a view ever outliving its transaction, and
how verification and decoding happen off the event loop. `get` is `read` with a copy to `bytes`.

`ThreadedTier` implements the async protocol on top of four blocking methods and a bounded
thread pool: blocking SDK and file calls never run on the event loop, and at most `concurrency`
of them run at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar, runtime_checkable

from tiers.errors import TierError, TierUnavailableError
from tiers.keys import validate_key

log = logging.getLogger("tiers")

T = TypeVar("T")
R = TypeVar("R")
Buffer = bytes | bytearray | memoryview
Consume = Callable[[memoryview], T]


def to_bytes(view: memoryview) -> bytes:
    """The default `consume`: bytes that may outlive the tier's buffer.

    Disk and S3 reads hand over a view of a fresh `bytes` object that nothing else holds: that
    object is returned as it is. A view of borrowed memory (an LMDB page) is copied out.
    """
    obj = view.obj
    if type(obj) is bytes and view.c_contiguous and view.nbytes == len(obj):
        return obj
    return view.tobytes()


@runtime_checkable
class Tier(Protocol):
    """An async store of blocks by key. A missing key is `None`, never an exception."""

    name: str

    async def read(self, key: str, consume: Consume[T]) -> T | None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def put(self, key: str, data: Buffer) -> None: ...

    async def contains(self, key: str) -> bool: ...

    async def delete(self, key: str) -> bool: ...

    async def scan(self) -> list[tuple[str, int]]: ...

    async def aclose(self) -> None: ...


class TierWrapper:
    """A tier that adds behaviour around another one; every call not overridden is passed on."""

    def __init__(self, inner: Tier) -> None:
        self.inner = inner
        self.name = inner.name

    async def read(self, key: str, consume: Consume[T]) -> T | None:
        return await self.inner.read(key, consume)

    async def get(self, key: str) -> bytes | None:
        return await self.read(key, to_bytes)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    async def put(self, key: str, data: Buffer) -> None:
        await self.inner.put(key, data)

    async def contains(self, key: str) -> bool:
        return await self.inner.contains(key)

    async def delete(self, key: str) -> bool:
        return await self.inner.delete(key)

    async def scan(self) -> list[tuple[str, int]]:
        return await self.inner.scan()

    async def aclose(self) -> None:
        await self.inner.aclose()


class ThreadedTier(ABC):
    """Base of the blocking-backend tiers: runs `_read`, `_put`, ... in a bounded thread pool.

    Subclasses implement the blocking methods; this class validates keys, wraps every exception
    that is not already a `TierError` (an `OSError`, an SDK's error, any other type) as
    `TierUnavailableError`, and refuses calls after `aclose`.
    """

    # SDK exceptions that mean "the backend could not answer"; wrapped as TierUnavailableError.
    backend_errors: tuple[type[Exception], ...] = ()

    def __init__(self, name: str, *, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError(f"tier {name!r}: concurrency must be >= 1, got {concurrency}")
        self.name = name
        self.concurrency = concurrency
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"tier-{name}")
        self._closed = False

    # -- blocking backend, run on the pool ------------------------------------------------------

    @abstractmethod
    def _read(self, key: str, consume: Consume[T]) -> T | None: ...

    @abstractmethod
    def _put(self, key: str, data: Buffer) -> None: ...

    @abstractmethod
    def _contains(self, key: str) -> bool: ...

    @abstractmethod
    def _delete(self, key: str) -> bool: ...

    @abstractmethod
    def _scan(self) -> Iterator[tuple[str, int]]: ...

    @abstractmethod
    def _close(self) -> None:
        """Release backend resources; called once, after the calls in flight, by `aclose`."""

    # -- async protocol -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., R], *args: object) -> R:
        if self._closed:
            raise TierUnavailableError(self.name, "tier is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, functools.partial(fn, *args))
        except TierError:
            raise
        except OSError as exc:
            raise TierUnavailableError(self.name, f"{type(exc).__name__}: {exc.strerror}") from exc
        except self.backend_errors as exc:
            raise TierUnavailableError(self.name, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            # Whatever else a backend raised (an SDK's own bug included: botocore once raised
            # AttributeError reading a deleted object): the tier failed this call. It counts
            # toward its breaker, and the read falls to the next copy, as for any failure.
            log.warning("tier %s: unexpected %s from its backend", self.name, type(exc).__name__)
            raise TierUnavailableError(self.name, f"{type(exc).__name__}: {exc}") from exc

    async def read(self, key: str, consume: Consume[T]) -> T | None:
        return await self._run(self._read, validate_key(key), consume)

    async def get(self, key: str) -> bytes | None:
        return await self.read(key, to_bytes)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        for key in keys:
            validate_key(key)
        return list(await asyncio.gather(*(self.get(k) for k in keys)))

    async def put(self, key: str, data: Buffer) -> None:
        await self._run(self._put, validate_key(key), data)

    async def contains(self, key: str) -> bool:
        return await self._run(self._contains, validate_key(key))

    async def delete(self, key: str) -> bool:
        return await self._run(self._delete, validate_key(key))

    async def scan(self) -> list[tuple[str, int]]:
        """Every (key, size in bytes) the tier holds. Used to rebuild cache accounting."""
        return await self._run(lambda: list(self._scan()))

    async def aclose(self) -> None:
        """Refuse new calls, wait for the ones in flight, then release the backend."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        await asyncio.to_thread(self._close)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
