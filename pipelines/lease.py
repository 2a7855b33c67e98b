"""One writer per output: a lease with an owner and a heartbeat.

A job that writes a training run, a pretokenize output or a run's evaluations first takes
the lease `lease.json` in that folder (the run folder, the output, the run's `evals/`),
renews it every `heartbeat_seconds` while it works and deletes it when it ends. A second
job finds it held and stops with LeaseHeld: one line naming the holder (exit 2). A lease
nobody renewed for `stale_seconds` (its holder was killed, its machine died) is taken over,
and so at once is a lease whose holder ran on this machine and whose process is gone.

The lease names an owner id that whoever launches the job makes once: a restarted process
of the same job (torchrun restarts its ranks under one run id) takes its own lease back at
once instead of waiting for it to go stale.

Every change is a conditional write (storage.write_if, storage.remove_if): taking needs
the lease absent or unchanged since it was read, renewing and releasing need it unchanged
since this holder wrote it. Where the store decides those conditions (S3 If-None-Match and
If-Match, a lock for local files) two jobs never both create a lease. Taking over an
existing lease is also read back after `settle_seconds`: SeaweedFS 4.48 refuses a stale
If-Match but let two concurrent writes with the same ETag both succeed (measured: in 2 of
20 rounds of 6 writers), and only the last one is the lease. Where the store ignores the
conditions (storage.honours_conditions) every take is checked that way: best-effort.

Staleness compares the time the holder wrote with the reader's clock: the hosts' clocks
must agree to well within `stale_seconds`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from enat.models.errors import UserError
from enat.pipelines import storage
from enat.pipelines.config import LeaseConfig

LEASE_NAME = "lease.json"
_ATTEMPTS = 5  # a lease that changes between reading and writing is read again, this often


class LeaseHeld(UserError, RuntimeError):
    """Another job holds the lease; the message names it and says what to do."""


class LeaseLost(UserError, RuntimeError):
    """This job's lease was taken over, or could not be renewed before it went stale."""


def process_space() -> str:
    """This kernel boot and pid namespace (Linux): two processes with the same value see each
    other's pids. A hostname is not enough: containers on other machines may share one."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def new_owner(kind: str) -> str:
    """A fresh owner id for one job, e.g. `train-3f2a9c1b04de`."""
    return f"{kind}-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Holder:
    """What a lease records."""

    owner: str
    host: str
    pid: int
    acquired: float  # time.time() when it was taken
    renewed: float  # ... and of the last heartbeat
    stale_seconds: float  # the holder's own setting decides when its lease is stale
    process_space: str = ""  # where `pid` means something (process_space()); "" if unknown

    def age(self) -> float:
        return time.time() - self.renewed

    def stale(self) -> bool:
        return self.age() >= self.stale_seconds

    def dead(self) -> bool:
        """Whether the holder's process is known to be gone: it ran where this process can
        see its pid (same kernel boot, same pid namespace) and that pid is not running.
        A job killed with SIGKILL, or ended by a storage outage that kept it from removing
        its lease, is then taken over at once instead of after `stale_seconds`."""
        if not self.process_space or self.process_space != process_space():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # running, as another user
            return False
        return False

    def describe(self) -> str:
        return f"{self.owner} (host {self.host}, pid {self.pid}, last heartbeat {self.age():.0f} s ago)"


class Lease:
    """The lease of the output folder `folder`; `what` names the output in messages."""

    def __init__(self, folder: str, owner: str, what: str, config: LeaseConfig):
        self.url = storage.join(folder, LEASE_NAME)
        self.owner, self.what, self.config = owner, what, config
        self.holder: Holder | None = None  # what this job last wrote, while it holds the lease
        self.tag: str | None = None  # ... and its tag: renewing and releasing need it unchanged
        self.lost: LeaseLost | None = None

    def acquire(self) -> None:
        """Take the lease if nobody holds it, its holder went stale or is this owner;
        else raise LeaseHeld."""
        for _ in range(_ATTEMPTS):
            current = storage.read_tagged(self.url)
            previous = self._parse(current.data) if current is not None else None
            if previous is not None and previous.owner != self.owner and not previous.stale() \
                    and not previous.dead():
                raise LeaseHeld(self._held_message(previous))
            now = time.time()
            holder = Holder(self.owner, socket.gethostname(), os.getpid(), acquired=now, renewed=now,
                            stale_seconds=self.config.stale_seconds, process_space=process_space())
            tag = storage.write_if(self.url, _dump(holder), current.tag if current is not None else None)
            if tag is not None and self._settled(holder, created=current is None):
                if previous is not None and previous.owner != self.owner:
                    how = "stale lease" if previous.stale() else "lease (its process is gone)"
                    print(f"{self.what}: took over the {how} of {previous.describe()}", file=sys.stderr,
                          flush=True)
                self.holder, self.tag, self.lost = holder, tag, None
                return
        raise LeaseHeld(f"{self.what}: its lease {self.url} kept changing while this job tried to take it "
                        f"(another job is starting on it): try again in a minute")

    def renew(self) -> None:
        """One heartbeat: rewrite the lease with the time now if it is still this job's;
        else raise LeaseLost."""
        holder = replace(self.holder, renewed=time.time())
        tag = storage.write_if(self.url, _dump(holder), self.tag)
        if tag is None:
            current = storage.read_tagged(self.url)
            by = f"taken over by {self._parse(current.data).describe()}" if current is not None else "removed"
            raise LeaseLost(f"{self.what}: its lease {self.url} was {by}; this job stopped so that two jobs "
                            f"never write it at once")
        self.holder, self.tag = holder, tag

    def release(self) -> None:
        """Delete the lease, unless it is no longer this job's."""
        try:
            if self.tag is not None and self.lost is None:
                storage.remove_if(self.url, self.tag)
        except OSError as err:  # the job's own outcome matters more: say it, and let the lease go stale
            print(f"warning: {self.what}: could not remove its lease {self.url} ({err}); the next job takes "
                  f"it over after {self.config.stale_seconds:.0f} s", file=sys.stderr, flush=True)
        self.holder = self.tag = None

    @contextlib.contextmanager
    def held(self) -> Iterator[Lease]:
        """Hold the lease for the block (in the main thread): take it, renew it from a
        thread, release it after. A lease lost meanwhile interrupts the main thread, as
        Ctrl-C would, so the job stops writing; the block then raises LeaseLost."""
        self.acquire()
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), name="lease-heartbeat", daemon=True)
        beat.start()
        try:
            yield self
        except KeyboardInterrupt:
            if self.lost is None:
                raise
            raise self.lost from None
        finally:
            stop.set()
            beat.join()
            self.release()

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.config.heartbeat_seconds):
            try:
                self.renew()
                continue
            except LeaseLost as err:
                self.lost = err
            except OSError as err:  # the store did not answer: retry while the lease is fresh
                silent = time.time() - self.holder.renewed
                if silent < self.config.stale_seconds:
                    print(f"warning: {self.what}: could not renew its lease {self.url} ({err}); retrying",
                          file=sys.stderr, flush=True)
                    continue
                self.lost = LeaseLost(f"{self.what}: could not renew its lease {self.url} for {silent:.0f} s "
                                      f"({err}); this job stopped, as another may have taken it over")
            if not stop.is_set():  # a real signal: it also wakes a main thread that sleeps or waits
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            return

    def _settled(self, holder: Holder, created: bool) -> bool:
        """Whether `holder`, just written, is still the lease: at once if it was created
        where the store decides conditional writes, else after `settle_seconds` (another
        job's write in that time wins)."""
        if created and storage.honours_conditions(self.url):
            return True
        time.sleep(self.config.settle_seconds)
        current = storage.read_tagged(self.url)
        return current is not None and self._parse(current.data) == holder

    def _parse(self, data: bytes) -> Holder:
        try:
            return Holder(**json.loads(data))
        except (ValueError, TypeError):
            raise LeaseHeld(f"{self.what}: {self.url} is not a lease enat wrote; remove it if no job "
                            f"is writing this output") from None

    def _held_message(self, holder: Holder) -> str:
        remaining = holder.stale_seconds - holder.age()
        return (f"{self.what} is in use by {holder.describe()}: wait for that job to end; if it is dead, "
                f"remove {self.url}, or it is taken over once its heartbeat is {holder.stale_seconds:.0f} s "
                f"old (in {remaining:.0f} s)")


def _dump(holder: Holder) -> bytes:
    return json.dumps(asdict(holder), indent=1).encode()
