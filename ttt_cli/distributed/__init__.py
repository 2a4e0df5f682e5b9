"""Scale-out on torch.distributed (SPEC §5.6): eval, infer and export-state under `torchrun`.

What every command needs, in one place: the ranks from torchrun's environment, the process group
(gloo on CPU, NCCL for CUDA tensors), each rank's device (`LOCAL_RANK`), deterministic shares of
whole items balanced by duration (`shares`), rank 0's plan handed to every rank and every rank's
results handed to rank 0 (`link`), liveness (a rank that dies makes the others stop within
`--dist-timeout` seconds with a message naming it), one aggregated progress display (`progress`),
the exit code every rank agrees on (`ending`, called by `cli.common.handle_errors`), and the
sharing and accounting of whole input files for the per-file commands (`files`).
Without torchrun (`WORLD_SIZE` unset or 1) the session is inert: one process, no process group.
"""

from .files import gather_accounts, share_files
from .link import PeerLost, PeerStopped
from .progress import progress
from .session import DEFAULT_TIMEOUT, FAULT_ENV, RANKS_DIR, Session, current, finish, quiet, start
from .shares import balance, header_seconds

__all__ = ["PeerLost", "PeerStopped", "progress", "DEFAULT_TIMEOUT", "FAULT_ENV", "RANKS_DIR", "Session",
           "current", "finish", "quiet", "start", "balance", "header_seconds", "share_files", "gather_accounts"]
