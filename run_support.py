"""Run support for lpi.py: what a run stands on, not what the method is.

  errors     LPIError, a problem with the user's input, printed without a traceback
  processes  torchrun: this process's place, sharding and the few collectives a run needs
  precision  autocast of the frozen encoders (bf16 / fp16), prompts and losses in fp32
  files      atomic writes, checkpoints read with weights_only=True, one run per folder
  devices    --device auto / cpu / cuda / mps
  switches   the tables of settings (lpi.LPIConfig, lpi.RunConfig) and the flags made from them
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


class LPIError(Exception):
    """A problem with the user's input (paths, data, flags): printed without a traceback."""


# ---------------------------------------------------------------------------------------
# Several processes (torchrun): what each one does, and the few collectives they share
#
# `torchrun --nproc_per_node N lpi.py ...` starts N copies; each trains on its share of every
# global batch, encodes its shard of every set, and gets the others' results back. Only the
# current task's prompts train, so gradients are small: they are averaged with one
# all-reduce per step (no DistributedDataParallel wrapper needed). Only process 0 prints
# and writes files.
# ---------------------------------------------------------------------------------------

@dataclass
class Dist:
    """This process's place among the processes of a run (1 process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Env:
    """Where a run executes, as opposed to what it does (RunConfig): the device, CLIP's
    preprocessing of image files, this process among torchrun's, the autocast precision."""
    device: torch.device
    preprocess: Callable | None = None
    dist: Dist = field(default_factory=Dist)
    precision: str = "fp32"       # autocast dtype of the frozen encoders: fp32 | bf16 | fp16



def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on the CPU); one GPU per
    process. Without torchrun (WORLD_SIZE unset or 1): a single process, nothing to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size()), device


def shard(items: range | list, d: Dist) -> range | list:
    """This process's contiguous share of `items` (sizes differ by at most one)."""
    n, r, w = len(items), d.rank, d.world
    return items[r * n // w:(r + 1) * n // w]


def _comm_device() -> torch.device:
    """Where collectives run: NCCL moves CUDA tensors only, gloo CPU ones."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather(x: torch.Tensor, d: Dist) -> list[torch.Tensor]:
    """Every process's x (rows may differ in number), in rank order; no gradient."""
    import torch.distributed as dist

    dev = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(d.world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=dev))
    most = int(max(sizes))
    padded = torch.cat([x.detach().to(dev), x.new_zeros(most - len(x), *x.shape[1:], device=dev)])
    parts = [torch.empty_like(padded) for _ in range(d.world)]
    dist.all_gather(parts, padded.contiguous())
    return [part[: int(n)].to(x.device) for part, n in zip(parts, sizes)]


def gather_rows(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Every process's rows (shards of different lengths), concatenated in rank order."""
    return x if d.world == 1 else torch.cat(_gather(x, d))


def gather_with_grad(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """gather_rows, with this process's own rows still attached to its graph: the global
    contrastive loss then sends each process the gradient of its own rows."""
    if d.world == 1:
        return x
    parts = _gather(x, d)
    parts[d.rank] = x
    return torch.cat(parts)


def all_reduce_ints(values: list[int], d: Dist, op: str = "sum") -> list[int]:
    """Sum (or max) of each value over the processes (the values themselves with one process)."""
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.long, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def average_gradients(params: list[torch.Tensor], d: Dist) -> None:
    """All processes end the step with the mean of their gradients (one flat all-reduce)."""
    if d.world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device())
    dist.all_reduce(flat)
    flat /= d.world
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).to(p.device, copy=True)


def broadcast_(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Process 0's tensor, in place on every process (computed once, the same everywhere)."""
    if d.world > 1:
        import torch.distributed as dist

        y = x.to(_comm_device())
        dist.broadcast(y, 0)
        x.copy_(y)
    return x


# ---------------------------------------------------------------------------------------
# Mixed precision (--precision): the frozen encoders in bf16 / fp16, prompts and losses in fp32
# ---------------------------------------------------------------------------------------

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: torch.device) -> str:
    """--precision auto: bf16 on a CUDA device that supports it, fp32 elsewhere (CPU bf16
    matmuls are slower than fp32 on most CPUs)."""
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(device: torch.device, precision: str = "fp32"):
    """Mixed precision for the frozen encoders' matmuls. The learned prompts stay fp32
    (master weights: the optimiser never sees a half-precision copy) and every loss casts
    its inputs to fp32 before the softmax."""
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ---------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints read with weights_only=True, one run per output folder
# ---------------------------------------------------------------------------------------

def atomic_write(path: Path, write) -> None:
    """Write through a temporary file and rename: an interrupted run never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("task_*.pt"))
    return found[-1] if found else None


CHECKPOINT_KEYS = {"config", "done", "learned", "router", "centroids_img", "centroids_txt", "results"}


def read_checkpoint(path: Path) -> dict:
    """A run's checkpoint, read with weights_only=True: tensors and plain containers only
    (configs and results are dicts of numbers and strings), so a checkpoint someone hands
    you cannot run code on your machine. Anything else is refused with one message."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LPIError(f"{path} was refused: it holds objects other than tensors and plain data, which could run "
                       f"code when unpickled (checkpoints are read with weights_only=True). Detail: {first}") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a torch file: one clear message
        raise LPIError(f"{path} is not a readable checkpoint ({type(e).__name__}): corrupt or truncated? "
                       f"Delete it to redo that task with --resume, or choose another --out") from None
    if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
        raise LPIError(f"{path} is not a checkpoint of lpi.py (expected a dict with {', '.join(sorted(CHECKPOINT_KEYS))})")
    return ckpt


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def run_lock(out: Path):
    """One run per output folder: <out>/.lock holds "pid host" while a run writes there and
    is removed on exit. A lock left by a killed run (its process gone) is stale and taken
    over; a lock of a live process, or of another host, is refused with a message."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LPIError(f"--out {out} cannot be created: {e.strerror or e}") from None
    lock, me = out / ".lock", f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid, _, host = lock.read_text().partition(" ")
            if host.strip() != socket.gethostname() or not pid.isdigit() or _pid_alive(int(pid)):
                raise LPIError(f"{out} is in use by another run (process {pid} on {host.strip() or '?'}; lock file "
                               f"{lock}). Wait for it, or delete the lock file if no such run is alive") from None
            print(f"note: removing the stale lock of a run that is gone (process {pid})")
            lock.unlink(missing_ok=True)
        except OSError as e:
            raise LPIError(f"--out {out} is not writable: {e.strerror or e}") from None
    else:
        raise LPIError(f"{out}: could not take the lock {lock}")
    os.write(fd, me.encode())
    os.close(fd)
    for tmp in list(out.glob(".*.tmp*")) + list((out / "checkpoints").glob(".*.tmp*")):
        tmp.unlink(missing_ok=True)  # half-written files of an interrupted run (never read)
    try:
        yield
    finally:
        if lock.is_file() and lock.read_text() == me:
            lock.unlink()


def check_finite(tensors: dict[str, torch.Tensor], where: str, what: str) -> None:
    """No silent NaN: a non-finite loss term, gradient or parameter stops the run with a
    message naming the task, the step and the term. Every finished task stays checkpointed
    (the current one is not written), so --resume with other settings continues from there."""
    bad = [name for name, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise LPIError(f"{where}: non-finite {what} ({', '.join(bad)}); stopped. The last good checkpoint (if any) "
                       f"holds every finished task: lower --lr, raise the temperatures, or check the data")


# ---------------------------------------------------------------------------------------
# Switch tables: each setting is defined once, as a row of a dataclass (lpi.LPIConfig,
# lpi.RunConfig) carrying its help, its flag and its valid range; the command line, the
# range checks and the reading of a stored config are all made from those rows.
# ---------------------------------------------------------------------------------------

def switch(default, help: str, flag: str | None = None, check: tuple | None = None, resume_free: bool = False,
           **argparse_kw):
    """One row of a switch table: its default, its help, its flag (default --name-with-dashes;
    a bool gets --name / --no-name), the check of its range as (predicate, "expected"),
    whether --resume may change it, and argparse keywords (choices, short, type)."""
    return field(default=default, metadata=dict(help=help, flag=flag, check=check, resume_free=resume_free,
                                                 argparse=argparse_kw))


def at_least(lo):
    return (lambda v: v >= lo, f">= {lo}")


def within(lo, hi):
    return (lambda v: lo <= v <= hi, f"in [{lo}, {hi}]")


POSITIVE = (lambda v: v > 0, "> 0")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def check_switches(*tables) -> None:
    """Every value within its row's range and choices: one clear message otherwise."""
    for table in tables:
        for f in dataclasses.fields(table):
            v, m = getattr(table, f.name), f.metadata
            choices = m["argparse"].get("choices")
            if v is not None and ((m["check"] and not m["check"][0](v)) or (choices and v not in choices)):
                expected = m["check"][1] if m["check"] else "one of " + ", ".join(map(str, choices))
                raise LPIError(f"{flag_of(f)}={v} is out of range: expected {expected}")


def add_switches(group, table) -> None:
    """One flag per row of a switch table (a bool: --name / --no-name)."""
    for f in dataclasses.fields(table):
        kw = dict(f.metadata["argparse"])
        flags = [flag_of(f)] + ([kw.pop("short")] if "short" in kw else [])
        if isinstance(f.default, bool):
            group.add_argument(*flags, dest=f.name, default=f.default, help=f.metadata["help"],
                               action=argparse.BooleanOptionalAction)
        else:
            if f.default is None and "type" not in kw:  # argparse would call NoneType(value)
                raise TypeError(f"switch {f.name} defaults to None: give its row a type=")
            kw.setdefault("type", type(f.default))
            group.add_argument(*flags, dest=f.name, default=f.default, help=f.metadata["help"], **kw)


def from_values(table: type, values: dict | argparse.Namespace) -> object:
    """A switch table filled from a dict (a stored config) or an argparse Namespace; a
    missing row raises KeyError."""
    values = values if isinstance(values, dict) else vars(values)
    return table(**{f.name: values[f.name] for f in dataclasses.fields(table)})


# ---------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------

def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if not available[name]:
        raise LPIError(f"--device {name} is not available on this machine (expected one of: "
                       f"{', '.join(k for k, v in available.items() if v)}, or auto)")
    return torch.device(name)

