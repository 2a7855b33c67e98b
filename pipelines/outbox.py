"""An ordered outbox: entries delivered by one background thread, kept and retried with
backoff while the receiver is down, so a caller (the training loop) never waits on it.

The outbox knows nothing of MLflow: `deliver(head)` gets the oldest pending entries and
returns how many of them it delivered (it may merge several into one request), or raises.
An error that `permanent(error)` calls permanent (the receiver refused the entry, e.g. a
bad value) drops that entry with a warning: retrying it would block everything behind it.
Any other error means an outage: the entry stays at the head and delivery is retried
after 1, 2, 4 ... seconds up to a cap, so the order of entries never changes. An entry
that failed `probe_after` times in a row while `reachable()` says the receiver answers is
dropped with a warning too (e.g. a server error on one artifact upload): otherwise it
would hold everything behind it forever.

One warning when an outage starts, one line when the backlog is delivered again (how much
was replayed). The buffer is bounded by a count of values and by bytes: when full, the
oldest *droppable* entries (metrics) make room and are counted as dropped; the rest
(parameters, tags, the run's status) is small and always kept.
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from enat.models.typed_config import check


@dataclass(frozen=True)
class Entry:
    kind: str  # what it is, for reports: "metrics", "params", "tags", "artifact", "status", ...
    payload: Any
    values: int = 1  # values it carries: what the buffer bound counts
    nbytes: int = 0  # bytes it holds in memory (artifact contents)
    droppable: bool = False  # may make room when the buffer is full


@dataclass(frozen=True)
class OutboxOptions:
    max_values: int = 100_000  # ~20 MB of metrics: an hour of logging every step of ~30 metrics
    max_bytes: int = 64 << 20  # artifact contents held while the receiver is down
    backoff_initial: float = 1.0  # seconds before the first retry, doubled after each failure
    backoff_max: float = 10.0  # cap: a recovered receiver is noticed within this time
    batch: int = 200  # pending entries handed to one deliver() call at most
    probe_after: int = 3  # failures in a row of one entry before asking whether the receiver answers

    def __post_init__(self) -> None:
        check(self.max_values >= 1, "max_values", ">= 1", self.max_values)
        check(self.max_bytes >= 0, "max_bytes", ">= 0", self.max_bytes)
        check(0 < self.backoff_initial <= self.backoff_max, "backoff_initial",
              "> 0 and <= backoff_max", self.backoff_initial)
        check(self.batch >= 1, "batch", ">= 1", self.batch)
        check(self.probe_after >= 1, "probe_after", ">= 1", self.probe_after)


class Backoff:
    """Delays of initial, 2*initial, 4*initial ... capped at maximum; reset() starts over."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum = initial, maximum
        self.current = initial

    def next(self) -> float:
        delay = self.current
        self.current = min(self.current * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


@dataclass
class OutboxStats:
    delivered: int = 0  # values delivered
    replayed: int = 0  # of those, delivered after an outage had held them
    dropped: int = 0  # values dropped to make room
    refused: int = 0  # values the receiver refused (permanent errors, or failing while it answers)
    outages: int = 0
    lost_kinds: set[str] = field(default_factory=set)  # kinds of what was dropped or refused


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def describe(entries: Sequence[Entry]) -> str:
    """'120 metrics, 3 tags, 1 status' (values by kind, in order of first appearance)."""
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.kind] = counts.get(entry.kind, 0) + entry.values
    return ", ".join(f"{count} {kind}" for kind, count in counts.items()) or "nothing"


class Outbox:
    def __init__(self, name: str, deliver: Callable[[Sequence[Entry]], int],
                 permanent: Callable[[Exception], bool], options: OutboxOptions | None = None,
                 say: Callable[[str], None] = to_stderr, reason: Callable[[Exception], str] = str,
                 reachable: Callable[[], bool] | None = None):
        self.name, self.deliver, self.permanent, self.reachable = name, deliver, permanent, reachable
        self.options = options or OutboxOptions()
        self.say, self.reason = say, reason
        self.stats = OutboxStats()
        self._pending: deque[Entry] = deque()
        self._values = self._bytes = 0
        self._sending = 0  # entries at the head handed to deliver() right now
        self._down_since: float | None = None
        self._replaying = 0
        self._failing: Entry | None = None  # the head entry that failed last, and how often
        self._failures = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the caller's side: never blocks on the receiver -----------------------------------

    def put(self, entry: Entry) -> None:
        with self._changed:
            if self._stop.is_set() or not self._make_room(entry):
                self._drop(entry)
                return
            self._pending.append(entry)
            self._values += entry.values
            self._bytes += entry.nbytes
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"outbox-{self.name}", daemon=True)
                self._thread.start()
                atexit.register(self._at_exit)
            self._changed.notify_all()

    def _make_room(self, entry: Entry) -> bool:
        """Drop the oldest droppable entries not being sent (those that free what is short:
        values or bytes) until `entry` fits. False: it does not fit and may be dropped itself;
        an entry that must be kept is taken beyond the bound."""
        options, index = self.options, self._sending
        if entry.droppable and (entry.values > options.max_values or entry.nbytes > options.max_bytes):
            return False  # it would not fit in an empty buffer: nothing else need go
        while True:
            over_values = self._values + entry.values > options.max_values
            over_bytes = self._bytes + entry.nbytes > options.max_bytes
            if not (over_values or over_bytes):
                return True
            if index >= len(self._pending):
                break
            old = self._pending[index]
            if old.droppable and ((over_values and old.values) or (over_bytes and old.nbytes)):
                del self._pending[index]
                self._values -= old.values
                self._bytes -= old.nbytes
                self._drop(old)
            else:
                index += 1
        return not entry.droppable

    def _drop(self, entry: Entry) -> None:
        self.stats.dropped += entry.values
        self.stats.lost_kinds.add(entry.kind)

    def pending(self) -> list[Entry]:
        with self._changed:
            return list(self._pending)

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for everything put so far to be delivered (or
        refused); True when nothing is left."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True

    def close(self, timeout: float) -> list[Entry]:
        """wait(timeout), then stop delivering; returns what was not delivered (an entry in
        flight at that moment is counted as not delivered: it may still arrive)."""
        self.wait(timeout)
        atexit.unregister(self._at_exit)
        with self._changed:
            self._stop.set()
            self._changed.notify_all()
            return list(self._pending)

    def _at_exit(self) -> None:
        """A process ending without close(): its delivering thread dies with it, say so."""
        left = self.pending()
        if left:
            self.say(f"warning: {self.name} did not get {describe(left)}: the process exited first")

    # -- the delivering thread -------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(self.options.backoff_initial, self.options.backoff_max)
        while True:
            with self._changed:
                while not self._pending and not self._stop.is_set():
                    self._changed.wait()
                if self._stop.is_set():
                    return
                head = [self._pending[i] for i in range(min(len(self._pending), self.options.batch))]
                self._sending = len(head)
            failure = None
            try:
                taken = self.deliver(head)
            except Exception as err:  # noqa: BLE001 - the receiver's failures are this class's job
                failure, taken = err, 1
            refused = failure is not None and self._refuses(failure, head[0])
            down = failure is not None and not refused
            with self._changed:
                self._sending = 0
                if down:
                    self._outage(failure)
                else:
                    self._settle(taken, refused)
                    backoff.reset()
                self._changed.notify_all()
            if down:
                self._stop.wait(backoff.next())

    def _refuses(self, error: Exception, entry: Entry) -> bool:
        """Whether the receiver will not take `entry`: it said so, or it answers (a probe)
        yet failed this entry `probe_after` times in a row. Says why when so."""
        if self.permanent(error):
            self.say(f"warning: {self.name} refused {describe([entry])}, dropped: {self.reason(error)}")
            return True
        self._failures = self._failures + 1 if self._failing is entry else 1
        self._failing = entry
        if self.reachable is None or self._failures < self.options.probe_after or not self.reachable():
            return False
        self.say(f"warning: {self.name} answers but failed {describe([entry])} {self._failures} times "
                 f"in a row, dropped: {self.reason(error)}")
        return True

    def _outage(self, error: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            self.stats.outages += 1
            self.say(f"warning: {self.name} unreachable ({self.reason(error)}); buffering what is logged "
                     f"(at most {self.options.max_values} values, the oldest metrics go first) and "
                     f"retrying every {self.options.backoff_initial:g}-{self.options.backoff_max:g} s")

    def _settle(self, taken: int, refused: bool) -> None:
        """The first `taken` entries left the outbox (delivered, or refused); report the end
        of an outage once the backlog it built up is delivered."""
        for _ in range(taken):
            entry = self._pending.popleft()
            self._values -= entry.values
            self._bytes -= entry.nbytes
            if refused:
                self.stats.refused += entry.values
                self.stats.lost_kinds.add(entry.kind)
                continue
            self.stats.delivered += entry.values
            if self._down_since is not None:
                self._replaying += entry.values
        if self._down_since is not None and not self._pending:
            self.stats.replayed += self._replaying
            dropped = f"; {self.stats.dropped} dropped to stay within the bound" if self.stats.dropped else ""
            self.say(f"{self.name} reachable again after {time.monotonic() - self._down_since:.0f} s: "
                     f"replayed {self._replaying} buffered values in order{dropped}")
            self._down_since, self._replaying = None, 0
