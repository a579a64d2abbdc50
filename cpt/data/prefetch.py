"""Read the next global batch in a background thread while the current step runs.

:class:`Prefetcher` wraps a :class:`~cpt.data.loader.CPTDataLoader`. A worker thread calls ``loader.batch(s)``
for ``s = start, start + 1, ...`` strictly in order, at most ``depth`` batches ahead of the loop, and pins each
batch's memory on CUDA (so the host-to-device copy is asynchronous: copying from pageable memory would make the
host wait for the GPU). The batches are exactly those of calling ``loader.batch`` in the loop.

At most ``depth`` batches are read ahead (a batch is read only once a slot is free).
The loader's state moves ahead with the worker, so each batch travels with the loader's ``state_dict()`` and
``metrics()`` taken right after it was read: :meth:`Prefetcher.state_dict` and :meth:`Prefetcher.metrics` describe
the last batch the *loop* took, which is what a checkpoint must record (a batch read ahead but not trained on is
read again after resume). The worker starts at the first :meth:`Prefetcher.batch` call, so a resume can restore
the loader's position through :meth:`Prefetcher.load_state_dict` first (the prefetcher is the run's ``data``
component in the state registry, cpt/state.py).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

_STOP = object()


class Prefetcher:
    def __init__(self, loader: Any, start_step: int | None = None, depth: int = 1, pin_memory: bool | None = None,
                 enabled: bool = True):
        """``start_step``: the step of the first batch the loop will ask for (None: whichever it asks for first)."""
        if depth < 1:
            raise ValueError("depth must be at least 1")
        self.loader, self.enabled = loader, enabled
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.next_step = start_step
        self._state = loader.state_dict()  # before any batch: the resume position itself
        self._metrics = loader.metrics()
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(depth)  # a batch is read only when fewer than `depth` wait unconsumed
        self._closed = threading.Event()
        self._thread = None
        self._started = False

    # ------------------------------------------------------------ worker

    def _work(self, step: int) -> None:
        try:
            while True:
                while not self._slots.acquire(timeout=0.1):
                    if self._closed.is_set():
                        return
                if self._closed.is_set():
                    return
                batch = self.loader.batch(step)
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                self._queue.put((step, batch, self.loader.state_dict(), self.loader.metrics()))
                step += 1
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it
            self._queue.put(e)

    # ------------------------------------------------------------ the loop's side

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch of ``step`` (steps must be asked for in order, from ``start_step``)."""
        if self.next_step is None:
            self.next_step = step
        if step != self.next_step:
            raise ValueError(f"prefetcher expected step {self.next_step}, got {step}")
        if not self._started:
            self._started = True
            if self.enabled:  # (disabled: every batch is read in the loop's thread, as without a prefetcher)
                self._thread = threading.Thread(target=self._work, args=(step,), name="cpt-prefetch", daemon=True)
                self._thread.start()
        if not self.enabled:
            batch = self.loader.batch(step)
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            self._state, self._metrics = self.loader.state_dict(), self.loader.metrics()
            self.next_step += 1
            return batch
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        got, batch, self._state, self._metrics = item
        self._slots.release()
        assert got == step, (got, step)
        self.next_step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The loader's state after the last batch the loop took."""
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loader's position (before the first batch only)."""
        if self._started:
            raise RuntimeError("Prefetcher.load_state_dict: the prefetcher has already started reading batches")
        self.loader.load_state_dict(state)
        self._state, self._metrics = self.loader.state_dict(), self.loader.metrics()

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def close(self) -> None:
        """Stop the worker (a batch read ahead is dropped); idempotent."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
