"""The end of a torchrun job: every rank leaves with the exit code they agree on (SPEC §5.6)."""

from __future__ import annotations

import signal
import sys
import threading
import time

from .link import KEY, Link, PeerLost


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def agree_exit(link: Link, code: int, delivered: bool, message: str | None, label: str) -> int:
    """Agrees on the job's exit code (the largest of every rank's) and waits for every rank.

    A rank that ends before delivering its work (an error, Ctrl-C) first tells the others to stop.
    Every rank then reports its code; rank 0 waits for all of them (or for --dist-timeout of
    silence) and publishes the largest; the others wait for it, then all pass a barrier so that none
    leaves (which would make torchrun stop the rest) before rank 0 has written the outputs.

    Args:
        link: this rank's link.
        code: this rank's own exit code.
        delivered: this rank handed its work over (its exit is a normal one for the others).
        message: this rank's error message, if any (named in the others' messages).
        label: `[rank r/N] ` for this rank's messages.
    Returns:
        The exit code for this process.
    """
    final, agreed = code, False
    try:
        if not delivered:
            link.abort(code, message)
        link.store.set(f"{KEY}exit/{link.rank}", str(code))
        link.store.add(f"{KEY}exit/{link.rank}/n", 1)
        if link.rank == 0:
            final = _collect_exits(link, code, label)
            link.store.set(f"{KEY}final", str(final))
            link.store.add(f"{KEY}final/n", 1)
        else:
            while not link.count(f"{KEY}final/n"):
                link.check_alive([0], skip_exited=False)
                time.sleep(link.poll())
            final = max(code, int(link.store.get(f"{KEY}final")))
        agreed = not link.lost
    except PeerLost as e:
        say(f"{label}error: {e}")
        final = max(code, 1)
    except Exception as e:
        say(f"{label}error: {link.store_lost(e, 'the exit codes of the other ranks')}")
        final = max(code, 1)
    if agreed:
        _barrier(label)
    _ignore_sigterm()  # past the barrier: torchrun's SIGTERM (after a rank's exit 1) must not cut this exit
    return final


def _ignore_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _collect_exits(link: Link, code: int, label: str) -> int:
    codes, lost = {0: code}, [p for p in set(link.lost) if p]  # already reported lost: not waited for again
    while len(codes) + len(lost) < link.world_size:
        for p in range(1, link.world_size):
            if p in codes or p in lost:
                continue
            if link.count(f"{KEY}exit/{p}/n"):
                codes[p] = int(link.store.get(f"{KEY}exit/{p}"))
                continue
            try:
                link.check_alive([p])
            except PeerLost as e:
                say(f"{label}error: {e}")
                lost.append(p)
        if link.on_wait is not None:
            link.on_wait()
        time.sleep(link.poll())
    return max(list(codes.values()) + ([1] if lost else []))


def _barrier(label: str) -> None:
    import torch.distributed as dist  # under torchrun only: this package is imported by every CLI message
    try:
        dist.barrier()
    except Exception as e:  # a peer died after agreeing: nothing is lost, say it and go
        say(f"{label}warning: the final barrier failed ({str(e).strip().splitlines()[0]}).")
