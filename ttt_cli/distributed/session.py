"""This process's place in a torchrun job: ranks, device, shares, the process group (inert without torchrun).

torch is imported only where a job is joined or left (`_init_group`, `Session.device`, `Session.close`): the
CLI asks `current()` and `quiet()` for every message it prints, usage errors included, and those must not wait
seconds for torch to import.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from . import ending
from .link import Link

RANKS_DIR = ".ranks"              # per-rank outputs inside --out
DEFAULT_TIMEOUT = 600.0           # --dist-timeout, seconds
FAULT_ENV = "TTT_FAULT_RANK_EXIT"


class _Terminated(SystemExit):
    """SIGTERM (torchrun stopping the job's other ranks after a failure, SLURM's scancel)."""


@dataclass
class Session:
    """This process's place in a torchrun job (inert without torchrun).

    Args:
        rank, world_size, local_rank: from torchrun's environment.
        backend: the process group's backend (None without one).
        timeout: --dist-timeout in seconds: bounds every collective and the silence of a peer.
        shares: what each rank was given, {"<rank>": [document ids or input paths]} (provenance).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    shares: dict[str, list[str]] = field(default_factory=dict)
    resume_hint: str = "outputs finished before it are kept"
    delivered: bool = False           # this rank handed its results over (`gather`)
    link: Link | None = None
    _items: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        """`[rank r/N] ` for messages of a rank, empty without torchrun."""
        return f"[rank {self.rank}/{self.world_size}] " if self.active else ""

    def record(self) -> dict:
        """The `distributed` provenance of outputs: world size, backend and every rank's share."""
        return {"world_size": self.world_size, "backend": self.backend,
                "shares": {str(r): list(self.shares.get(str(r), [])) for r in range(self.world_size)}}

    def set_shares(self, shares: tp.Sequence[tp.Sequence[str]]) -> None:
        self.shares = {str(r): [str(x) for x in s] for r, s in enumerate(shares)}

    def mine(self) -> list[str]:
        return list(self.shares.get(str(self.rank), []))

    def rank_dir(self, out: Path | str) -> Path:
        """`OUT/.ranks/<rank>/`: where this rank writes its finished items."""
        return Path(out) / RANKS_DIR / str(self.rank)

    def device(self, device: str) -> str:
        """This rank's device for `--device`: `cuda:<LOCAL_RANK>` (modulo the visible GPUs) under torchrun."""
        if not self.active or device == "cpu":
            return device
        import torch  # under torchrun only (see the module docstring)
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    # -- exchanges (identity without torchrun) -------------------------------------------------------
    def share(self, name: str, obj: tp.Any = None) -> tp.Any:
        """Rank 0's `obj` (JSON-able) on every rank (PeerStopped / PeerLost when rank 0 fails first)."""
        return self.link.share(name, obj) if self.active else obj

    def gather(self, name: str, payload: tp.Any) -> list | None:
        """Every rank's `payload` on rank 0, by rank (None elsewhere); marks this rank's work as delivered."""
        self.delivered = True
        return self.link.gather(name, payload) if self.active else [payload]

    def sync(self, name: str) -> None:
        """Every rank reached this point (bounded by --dist-timeout)."""
        if self.active:
            self.link.sync(name)

    def check(self) -> None:
        """Raises PeerStopped / PeerLost when another rank failed or went silent."""
        if self.active:
            self.link.check()

    def after_item(self) -> None:
        """Called when this rank finished one item; the test hook `TTT_FAULT_RANK_EXIT=<rank>:<n>` makes that
        rank leave silently after its n-th (as a process on a lost node looks to the others)."""
        self._items += 1
        spec = os.environ.get(FAULT_ENV, "")
        if spec and self.active:
            rank, _, n = spec.partition(":")
            if int(rank) == self.rank and self._items >= int(n or 1):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)  # a zero exit: torchrun does not stop the others, the timeout path runs

    def finish(self, code: int, message: str | None = None) -> int:
        """The exit code every rank agrees on (`ending.agree_exit`); leaves the process group."""
        if not self.active:
            return code
        try:
            return ending.agree_exit(self.link, code, self.delivered, message, self.label)
        finally:
            self.close()

    def close(self) -> None:
        """Stops the heartbeat and leaves the process group (idempotent)."""
        global _CURRENT
        if self.link is not None:
            self.link.stop()
        if self.active:
            try:
                import torch.distributed as dist  # under torchrun only (see the module docstring)
                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:
                pass
        if _CURRENT is self:
            _CURRENT = None


_CURRENT: Session | None = None


def current() -> Session:
    """The session of this command run (an inert one without torchrun or before `start`)."""
    return _CURRENT if _CURRENT is not None else Session()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} in the environment is not an integer (torchrun sets it).") from None


def start(timeout: float = DEFAULT_TIMEOUT, device: str = "auto", resume_hint: str | None = None) -> Session:
    """Joins the torchrun job when `WORLD_SIZE` > 1 (else an inert session): process group, heartbeat.

    Args:
        timeout: --dist-timeout in seconds (> 0): every collective, and how long a silent peer is waited for.
        device: the command's --device: CUDA ranks use NCCL for CUDA tensors (`cpu:gloo,cuda:nccl`; this
            tool's own exchanges are small objects through the store), CPU ranks gloo.
        resume_hint: how the user continues after a failure (named in messages).
    Raises:
        ConfigError: a bad --dist-timeout or torchrun environment, or the process group cannot form.
    """
    global _CURRENT
    if not timeout > 0:
        raise ConfigError(f"--dist-timeout must be > 0 seconds, got {timeout:g}.")
    s = Session(rank=_env_int("RANK", 0), world_size=max(_env_int("WORLD_SIZE", 1), 1),
                local_rank=_env_int("LOCAL_RANK", 0), timeout=float(timeout))
    if resume_hint:
        s.resume_hint = resume_hint
    _CURRENT = s
    if not s.active:
        s.shares = {}
        return s
    if not 0 <= s.rank < s.world_size:
        raise ConfigError(f"RANK={s.rank} is outside WORLD_SIZE={s.world_size} (torchrun sets both).")
    _init_group(s, device)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    return s


def _init_group(s: Session, device: str) -> None:
    """Joins the process group (its connection report kept off stdout) and opens this rank's link."""
    import torch  # under torchrun only (see the module docstring)
    import torch.distributed as dist
    cuda = device in ("auto", "cuda") and torch.cuda.is_available() or device.startswith("cuda:")
    if cuda:
        torch.cuda.set_device(torch.device(s.device("cuda")))
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # gloo prints its connection report on stdout, which --json owns
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=s.timeout))
    except Exception as e:
        raise ConfigError(f"{s.label}could not join the torchrun job ({str(e).strip().splitlines()[0]}). Start "
                          f"the command with torchrun (README: scale-out), with the same rendezvous flags on "
                          f"every node.") from None
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    s.backend = "nccl" if cuda else "gloo"
    # The progress display, when a command opens one, sets the link's `on_wait` (`progress.progress`).
    s.link = Link(dist.distributed_c10d._get_default_store(), s.rank, s.world_size, s.timeout, s.resume_hint)


def _on_sigterm(signum, frame) -> None:
    s = current()
    ending.say(f"{s.label}stopped by SIGTERM: torchrun stops the other ranks when one fails (its report names "
               f"it), and SLURM when the job is cancelled; {s.resume_hint}.")
    raise _Terminated(143)


def finish(code: int, message: str | None = None) -> int:
    """The exit code of this run for every rank (`Session.finish`); the code itself without a session."""
    global _CURRENT
    s, _CURRENT = _CURRENT, None  # a command's session ends with it (in-process callers run several)
    return s.finish(code, message) if s is not None else code


def quiet() -> bool:
    """True on ranks other than 0: they print only their errors (rank 0 reports for the job)."""
    return _CURRENT is not None and _CURRENT.active and not _CURRENT.is_main
