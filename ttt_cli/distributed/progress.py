"""Progress under torchrun: one job-wide bar on rank 0 (a terminal) or per-rank plain lines (SPEC §5.6)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
import typing as tp

from ..progress import NullProgress, make_progress
from .link import KEY, dumps
from .session import Session, current

PUBLISH_EVERY = 1.0               # seconds between progress publications / aggregate refreshes


class RankProgress:
    """The progress hook of a rank: its own events, published for rank 0, and checked for lost peers.

    On a terminal, rank 0 shows one bar for the whole job (the sum of every rank's completed work
    over the sum of their totals) and the other ranks show nothing; otherwise every rank prints
    its own plain lines, prefixed with its rank. Every event also checks that no other rank failed
    (raising PeerStopped / PeerLost into the work loop, which stops there).

    Args:
        inner: the hook that displays (`ttt_cli.progress`).
        session: the distributed session.
        aggregate: one job-wide bar on rank 0 (a terminal) instead of per-rank lines.
    """

    def __init__(self, inner, session: Session, aggregate: bool):
        self.inner, self.s, self.aggregate = inner, session, aggregate
        self.done: dict[str, float] = {}
        self.totals: dict[str, float] = {}
        self._last = 0.0
        self._started = False

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= PUBLISH_EVERY:
            self._last = now
            mine = (sum(min(v, self.totals.get(k) or v) for k, v in self.done.items()), sum(self.totals.values()))
            self.s.link.store.set(f"{KEY}progress/{self.s.rank}", dumps(mine))
            self.refresh()

    def refresh(self) -> None:
        """Rank 0, a terminal: redraws the job-wide bar from every rank's last publication."""
        if not (self.aggregate and self.s.is_main):
            return
        store = self.s.link.store
        keys = [f"{KEY}progress/{r}" for r in range(self.s.world_size)]
        have = [k for k in keys if store.check([k])]
        vals = [json.loads(v) for v in store.multi_get(have)] if have else []
        done, total = sum(v[0] for v in vals), sum(v[1] for v in vals)
        if not self._started:
            self.inner.start("job", f"work of {self.s.world_size} ranks", total or 1.0)
            self._started = True
        self.inner.update("job", done, total=total or 1.0, ranks_reporting=f"{len(have)}/{self.s.world_size}")

    def start(self, key, description, total):
        self.totals[str(key)] = float(total or 0.0)
        self.done.setdefault(str(key), 0.0)
        self.s.check()
        if not self.aggregate:
            self.inner.start(key, f"{self.s.label}{description}", total)
        self._publish()

    def update(self, key, completed, **info):
        self.done[str(key)] = float(completed)
        self.s.check()
        if not self.aggregate:
            self.inner.update(key, completed, **info)
        self._publish()

    def finish(self, key, **info):
        self.done[str(key)] = self.totals.get(str(key)) or self.done.get(str(key), 0.0)
        if not self.aggregate:
            self.inner.finish(key, **info)
        self._publish(force=True)

    def log(self, message):
        self.s.check()
        if not self.aggregate:
            self.inner.log(f"{self.s.label}{message}")
        elif self.s.is_main:
            self.inner.log(message)

    def close(self) -> None:
        if self.aggregate and self.s.is_main and self._started:
            self.refresh()
            self.inner.finish("job")


@contextlib.contextmanager
def progress(quiet: bool = False) -> tp.Iterator[tp.Any]:
    """The command's progress hook: `ttt_cli.progress.make_progress` without torchrun, a RankProgress with.
    While it is open, the rank's link redraws the job-wide bar whenever it waits (`Link.on_wait`).

    Args:
        quiet: no display (--json); under torchrun the events still check for lost peers.
    """
    s = current()
    if not s.active:
        with make_progress(quiet=quiet) as p:
            yield p
        return
    aggregate = sys.stderr.isatty() or quiet
    show = not quiet and (not aggregate or s.is_main)
    with make_progress(quiet=not show) as inner:
        rp = RankProgress(inner if show else NullProgress(), s, aggregate)
        s.link.on_wait = rp.refresh
        try:
            yield rp
        finally:
            s.link.on_wait = None
            with contextlib.suppress(Exception):
                rp.close()
