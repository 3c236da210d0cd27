"""The next global batch read in a background thread while the current step trains."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor


class BatchPrefetcher:
    """``get(step)`` returns that step's global batch and the seconds the caller waited for it; the
    following step's batch is then read in the background (reading releases the GIL: file I/O, numpy)."""

    def __init__(self, dataset, batch_size: int, last_step: int):
        self.dataset, self.batch_size, self.last_step = dataset, batch_size, last_step
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="megaprolong-prefetch")
        self._pending: tuple[int, Future] | None = None

    def get(self, step: int) -> tuple[list, float]:
        start = time.perf_counter()
        if self._pending is not None and self._pending[0] == step:
            batch = self._pending[1].result()
        else:  # the first step, or a jump (a resume sets the step before the first get)
            batch = self.dataset.global_batch(step, self.batch_size)
        waited = time.perf_counter() - start
        self._pending = None
        if step + 1 < self.last_step:
            self._pending = (step + 1, self._pool.submit(self.dataset.global_batch, step + 1, self.batch_size))
        return batch, waited

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
