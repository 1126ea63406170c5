"""torch.distributed for ``train``: the process group, each rank's shard, a clean shutdown, the launcher.

``mnist-deploy train`` started by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` in the environment, world
size above 1) joins a process group: gloo on the CPU, NCCL on CUDA, chosen from the device. The
model is wrapped in DistributedDataParallel, which averages gradients. Batch-size rule: the global
batch stays ``--batch-size`` (64 by default), so each rank takes ``batch_size / world_size``
samples a step and a step of N ranks is one step of the one-process run, with the same number of
steps per epoch and the same learning-rate schedule.

Shutdown: after DDP's backward, a process that reached interpreter exit with the DDP model still
alive aborted about 1 run in 5 ("terminate called without an active exception", SIGABRT), so
torchrun failed a job whose checkpoint was saved. :func:`shutdown` drops the last reference to the
DDP model and collects garbage before ``destroy_process_group``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import ipaddress
import os
import re
import socket
from dataclasses import dataclass

from ..devices import rank_device, resolve_device
from ..errors import InputError, MnistDeployError, first_line


class DistributedError(MnistDeployError):
    """A rank died or lost contact with the others; the job failed and wrote nothing."""

    exit_code = 1


@dataclass(frozen=True)
class Rank:
    """Where this process stands in the job. ``Rank()`` is the one-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun started (``TORCHELASTIC_RUN_ID`` is torchrun's own variable), or in
    any process given a ``RANK`` in a job of more than one process.

    A torchrun job of one process (``--nproc-per-node 1``) joins a process group of one too: it runs
    the same DDP and NCCL (or gloo) path as a larger job, which is what launching it that way asks for."""
    if "RANK" not in os.environ:
        return False
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str):
    """Join the process group when launched by torchrun; return ``(Rank, torch.device)``."""
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return Rank(), device
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device, local)  # cuda:LOCAL_RANK, made current before NCCL starts
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=_dt.timedelta(minutes=10))
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {rank}: could not join the process group ({first_line(exc)})") from None
    return Rank(rank=rank, world_size=world, local_rank=local, backend=backend), device


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """The global batch split over the ranks; it must divide evenly so every step averages one batch."""
    if batch_size % world_size:
        raise InputError(f"--batch-size {batch_size} does not split over {world_size} processes; "
                         f"use a multiple of {world_size} (the global batch is divided among the ranks)")
    return batch_size // world_size


def shard(n: int, *, epoch: int, seed: int, rank: Rank):
    """This rank's sample indices for ``epoch``: exactly ``DistributedSampler``'s (shared seed, a new
    permutation per epoch, padded with the first indices so every rank has as many)."""
    import torch
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=rank.world_size, rank=rank.rank, shuffle=True,
                                 seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def wrap(model, rank: Rank, device):
    """DistributedDataParallel around ``model`` (rank 0's initial weights are broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(values: list[float], device) -> list[float]:
    """Sum a few numbers over the ranks (epoch loss and accuracy)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    collective(dist.all_reduce, t)
    return t.tolist()


def agree(ok: bool, device) -> bool:
    """A barrier that also tells every rank whether all of them succeeded (rank 0's write, say)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    collective(dist.all_reduce, t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def collective(fn, *args, **kwargs):
    """Run a collective; a dead peer becomes a :class:`DistributedError`, not a backend traceback."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:
        raise DistributedError(f"lost contact with another rank ({first_line(exc)}); nothing was written") from None


def shutdown(rank: Rank) -> None:
    """Leave the process group cleanly. The caller has dropped its DDP model; collect it first."""
    gc.collect()
    if rank.distributed:
        import torch.distributed as dist

        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()
        gc.collect()


DEFAULT_RDZV_TIMEOUT = 300.0  # seconds for every node to join: time to start the other machines, not 10 min
# A DNS name (labels of letters, digits, '-', '_') or an IPv4 address; IPv6 goes in brackets.
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*\.?")


def parse_endpoint(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets, ``[::1]:29500``) -> ``(host, port)``, port in 1..65535.

    Raises :class:`InputError` saying what is wrong; torchrun's own parser let ``HOST`` without a port,
    port 99999 and ``:::`` through to 40-line tracebacks."""
    how = "give HOST:PORT, e.g. 10.0.0.1:29500 or [fd00::1]:29500"
    text = text.strip() if isinstance(text, str) else ""
    m = re.fullmatch(r"\[([^\]]*)\]:(.*)", text) if text.startswith("[") else None
    if m:
        host, port_text = m.groups()
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InputError(f"--rdzv-endpoint {text!r}: {host!r} in brackets is not an IPv6 address; {how}") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise InputError(f"--rdzv-endpoint {text!r}: no {'port' if not colon else 'host'}; {how}")
        if ":" in host:
            raise InputError(f"--rdzv-endpoint {text!r}: an IPv6 address goes in brackets; {how}")
        if not _HOSTNAME.fullmatch(host):
            raise InputError(f"--rdzv-endpoint {text!r}: {host!r} is not a host name or address; {how}")
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise InputError(f"--rdzv-endpoint {text!r}: port {port_text!r} is not a number in 1..65535; {how}")
    return host, int(port_text)


def check_job(*, nnodes: int, node_rank: int, rdzv_endpoint: str | None,
              rdzv_timeout: float = DEFAULT_RDZV_TIMEOUT) -> str | None:
    """Check a multi-node job's arguments before anything starts: the node rank, the endpoint (parsed
    and resolved) and the timeout. Returns the endpoint as torchrun takes it (None for one node)."""
    if nnodes < 1:
        raise InputError(f"--nnodes must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise InputError(f"--node-rank {node_rank} is not a node of this job: with --nnodes {nnodes} it is "
                         f"0..{nnodes - 1}")
    if not rdzv_timeout > 0 or rdzv_timeout != rdzv_timeout or rdzv_timeout > 86400:
        raise InputError(f"--rdzv-timeout must be 0 < seconds <= 86400, got {rdzv_timeout}")
    if nnodes > 1 and not rdzv_endpoint:
        raise InputError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (node 0's address)")
    if rdzv_endpoint is None:
        return None
    host, port = parse_endpoint(rdzv_endpoint)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InputError(f"--rdzv-endpoint {rdzv_endpoint}: cannot resolve {host!r} "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def launch_train(worker_args: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                 rdzv_endpoint: str | None = None, rdzv_timeout: float = DEFAULT_RDZV_TIMEOUT,
                 threads: int | None = None, out: str = "artifacts", announce=None) -> None:
    """Run ``mnist-deploy train WORKER_ARGS`` under torchrun's launcher (torch.distributed.run), as
    ``torchrun --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT] -m mnist_deploy
    train ...`` would. A failed rank is one :class:`DistributedError` naming it; a rendezvous that does
    not complete within ``rdzv_timeout`` seconds is one naming the endpoint and the nodes it waited for.
    ``announce`` (a callable taking a line) is told what a multi-node launch waits for."""
    endpoint = check_job(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_timeout=rdzv_timeout)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    seconds = max(1, round(rdzv_timeout))
    argv = ["--nproc-per-node", str(nproc_per_node), "--nnodes", str(nnodes)]
    if endpoint:
        argv += ["--node-rank", str(node_rank), "--rdzv-endpoint", endpoint, "--rdzv-conf", f"timeout={seconds}"]
    else:
        argv += ["--standalone"]
    argv += ["-m", "mnist_deploy", "train", *worker_args]
    waited = (f"{nnodes} nodes at {endpoint} (this is node {node_rank}; "
              + ("it listens there)" if node_rank == 0 else "node 0 listens there)"))
    if endpoint and announce is not None:
        announce(f"waiting up to {seconds} s for {waited}")
    saved = os.environ.get("OMP_NUM_THREADS")
    # One thread per rank unless told otherwise (what torchrun does, without its warning banner).
    os.environ["OMP_NUM_THREADS"] = str(threads or 1)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as exc:
        global_rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        raise DistributedError(f"distributed training failed: rank {global_rank} {how}; "
                               f"the previous artifacts in {out} are unchanged") from None
    except (RuntimeError, ValueError) as exc:  # the store's timeout, a refused or reset connection
        if not endpoint:
            raise
        raise DistributedError(f"rendezvous did not complete within {seconds} s: waited for {waited} "
                               f"({first_line(exc)}); nothing was trained, {out} is unchanged") from None
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


