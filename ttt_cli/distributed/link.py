"""The ranks' link through the job's key-value store: heartbeats, liveness, abort, share/gather/sync.

Waiting is done on the store that `init_process_group` connects to, never inside a collective: a
peer that is busy for hours with a long share is alive (its heartbeat thread says so), a peer that
died is not, and every wait ends within `--dist-timeout` seconds of a peer's silence.
"""

from __future__ import annotations

import json
import os
import threading
import time
import typing as tp

from ..errors import TTTError

KEY = "ttt/"                      # namespace of this tool's keys in the job's store


class PeerLost(TTTError):
    """Another rank of the job stopped answering (died, hangs, or its node or the store is gone): exit 1."""

    exit_code = 1
    default_hint = "run the same command with --resume (any number of processes) to continue"


class PeerStopped(TTTError):
    """Another rank stopped with an error before delivering its work; this rank stops too (its exit code)."""

    default_hint = "see the error of the rank named in the message"


def dumps(obj: tp.Any) -> str:
    return json.dumps(obj, default=str, ensure_ascii=True)


class Link:
    """One rank's view of the store: liveness of its peers and the small exchanges between ranks.

    Args:
        store: the process group's store (`torch.distributed`'s default store).
        rank, world_size: this rank and the number of ranks.
        timeout: --dist-timeout: seconds of a peer's silence before it counts as lost.
        resume_hint: how the user continues (named in the messages).
        on_wait: called while waiting (rank 0 redraws the job's progress bar).
    """

    def __init__(self, store, rank: int, world_size: int, timeout: float, resume_hint: str,
                 on_wait: tp.Callable[[], None] | None = None):
        self.store, self.rank, self.world_size, self.timeout = store, rank, world_size, timeout
        self.resume_hint = resume_hint
        self.on_wait = on_wait
        self.lost: list[int] = []
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (heartbeat count, monotonic time it last changed)
        self._last_check = 0.0
        try:
            beat_store = store.clone()  # its own connection: a beat never waits behind a long get
        except Exception:               # a store type without clone(): share the connection
            beat_store = store
        self._beat = self._heartbeat(beat_store, max(0.01, min(2.0, timeout / 8)))

    # -- heartbeat and liveness ----------------------------------------------------------------------
    def _heartbeat(self, store, every: float) -> threading.Event:
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                try:
                    store.add(f"{KEY}hb/{self.rank}", 1)
                except Exception:
                    return  # the store is gone: the waits of this rank report it
                stop.wait(every)

        threading.Thread(target=beat, name="ttt-heartbeat", daemon=True).start()
        return stop

    def stop(self) -> None:
        self._beat.set()

    def poll(self) -> float:
        # How long a waiting rank sleeps between looks at the store. Every wait (the plan, the results, the exit
        # code) costs half of it on average, several times per job: short for a few ranks (a look is a few
        # local store calls), longer for many so that their looks do not crowd the store.
        return max(0.02, min(0.5, self.timeout / 20, 0.025 * self.world_size))

    def count(self, key: str) -> int:
        return int(self.store.add(key, 0))

    def check(self, force: bool = False) -> None:
        """Raises PeerStopped / PeerLost when another rank failed or went silent (cheap; rate-limited)."""
        now = time.monotonic()
        if not force and now - self._last_check < self.poll():
            return
        self._last_check = now
        self.check_abort()
        self.check_alive([0] if self.rank else range(1, self.world_size))

    def check_abort(self) -> None:
        if self.count(f"{KEY}abort") > 0:
            info = json.loads(self.store.get(f"{KEY}abort/1"))
            if info["rank"] != self.rank:
                e = PeerStopped(f"rank {info['rank']} stopped with exit code {info['code']}"
                                + (f": {info['message']}" if info.get("message") else "")
                                + f" So this run stops too; {self.resume_hint}.")
                e.exit_code = int(info["code"]) or 1
                e.silent = self.rank != 0  # type: ignore[attr-defined]  # rank 0 says it once
                raise e

    def check_alive(self, peers: tp.Iterable[int], skip_exited: bool = True) -> None:
        now = time.monotonic()
        for p in peers:
            if skip_exited and self.count(f"{KEY}exit/{p}/n"):
                continue  # it is past its work, agreeing on the exit code
            n = self.count(f"{KEY}hb/{p}")
            last = self._seen.get(p)
            if last is None or last[0] != n:
                self._seen[p] = (n, now)
            elif now - last[1] > self.timeout:
                self.lost.append(p)
                raise PeerLost(f"rank {p} stopped answering: no sign of life for {self.timeout:g} s "
                               f"(--dist-timeout); it died, hangs, or its node is gone. This rank stops; "
                               f"{self.resume_hint}.")

    def wait(self, done: tp.Callable[[], bool], what: str, peers: tp.Iterable[int] | None = None) -> None:
        """Waits until `done()`, watching `peers` (default rank 0) and the abort flag.

        Raises:
            PeerStopped / PeerLost: a rank failed, went silent, or the store is gone.
        """
        peers = [0] if peers is None else list(peers)
        try:
            while not done():
                self.check_abort()
                self.check_alive(peers)
                if self.on_wait is not None:
                    self.on_wait()
                time.sleep(self.poll())
        except (PeerLost, PeerStopped):
            raise
        except Exception as e:  # the store itself is gone (the node hosting it died)
            raise self.store_lost(e, what) from None

    def store_lost(self, e: BaseException, what: str) -> PeerLost:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return PeerLost(f"the job's store at {where} stopped answering while waiting for {what} ({first}): the node "
                        f"that hosts it (torchrun's rendezvous) is gone. This rank stops; {self.resume_hint}.")

    # -- exchanges -----------------------------------------------------------------------------------
    def share(self, name: str, obj: tp.Any = None) -> tp.Any:
        """Rank 0's `obj` (JSON-able) on every rank; the others wait for it while rank 0 is alive."""
        key = f"{KEY}share/{name}"
        if self.rank == 0:
            self.store.set(key, dumps(obj))
            self.store.add(key + "/n", 1)
            return obj
        self.wait(lambda: self.count(key + "/n") >= 1, f"rank 0's {name}")
        return json.loads(self.store.get(key))

    def gather(self, name: str, payload: tp.Any) -> list | None:
        """Every rank's `payload` (JSON-able) on rank 0, by rank; None on the other ranks, which go on."""
        key = f"{KEY}gather/{name}"
        self.store.set(f"{key}/{self.rank}", dumps(payload))
        self.store.add(key + "/n", 1)
        if self.rank != 0:
            return None
        self.wait(lambda: self.count(key + "/n") >= self.world_size, f"the results of every rank ({name})",
                  range(self.world_size))
        return [json.loads(v) for v in self.store.multi_get([f"{key}/{r}" for r in range(self.world_size)])]

    def sync(self, name: str) -> None:
        """Waits until every rank reached this point (a barrier bounded by --dist-timeout, not a collective)."""
        key = f"{KEY}sync/{name}"
        self.store.add(key, 1)
        self.wait(lambda: self.count(key) >= self.world_size, f"every rank ({name})", range(self.world_size))

    def abort(self, code: int, message: str | None) -> None:
        """Tells the other ranks that this one stopped before delivering its work (the first names the cause)."""
        if int(self.store.add(f"{KEY}abort/seq", 1)) == 1:
            self.store.set(f"{KEY}abort/1", dumps({"rank": self.rank, "code": code or 1, "message": message}))
            self.store.add(f"{KEY}abort", 1)
