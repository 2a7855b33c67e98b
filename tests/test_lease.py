"""One writer per output: the lease on local files and on a real SeaweedFS (S3), the
conditional writes under it, and the commands that refuse to start on a held output."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from enat.pipelines import runs, storage
from enat.pipelines.config import LeaseConfig
from enat.pipelines.lease import Lease, LeaseHeld, LeaseLost, new_owner

REPO = Path(__file__).resolve().parents[1]
QUICK = LeaseConfig(heartbeat_seconds=0.2, stale_seconds=0.8, settle_seconds=0.5)


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return storage.join(request.getfixturevalue("s3_bucket"), "out")


def lease(folder: str, owner: str | None = None, config: LeaseConfig = QUICK) -> Lease:
    return Lease(folder, owner or new_owner("test"), "output 'out'", config)


def test_conditional_writes_create_once_and_replace_or_remove_only_what_was_read(folder):
    url = storage.join(folder, "object.json")
    first = storage.write_if(url, b"one", None)
    assert first is not None and storage.read_tagged(url) == storage.Tagged(b"one", first)
    assert storage.write_if(url, b"again", None) is None  # it exists
    assert storage.write_if(url, b"two", '"not-its-tag"') is None
    second = storage.write_if(url, b"two", first)
    assert second not in (None, first) and storage.read_bytes(url) == b"two"
    assert storage.write_if(url, b"three", first) is None  # changed since `first` was read
    assert not storage.remove_if(url, first)
    assert storage.remove_if(url, second) and storage.read_tagged(url) is None
    assert storage.honours_conditions(url)  # local files, and SeaweedFS 4.48 (measured)


def test_a_second_holder_is_refused_in_one_line_naming_the_holder(folder):
    held = lease(folder, "train-first", LeaseConfig(stale_seconds=120))
    held.acquire()
    with pytest.raises(LeaseHeld) as refused:
        lease(folder).acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("output 'out' is in use by train-first (host ")
    assert "last heartbeat 0 s ago): wait for that job to end; if it is dead, remove " \
           f"{held.url}, or it is taken over once its heartbeat is 120 s old (in 12" in message
    held.release()
    assert not storage.exists(held.url)
    lease(folder).acquire()  # released: free at once


def test_renewing_keeps_the_lease_past_its_timeout(folder):
    with lease(folder).held():
        time.sleep(3 * QUICK.stale_seconds)
        with pytest.raises(LeaseHeld):
            lease(folder).acquire()


def test_a_stale_lease_is_taken_over_and_its_old_holder_has_lost_it(folder, capsys):
    old = lease(folder, "train-old")
    old.acquire()  # and never renewed: its process died
    with pytest.raises(LeaseHeld):
        lease(folder).acquire()
    time.sleep(QUICK.stale_seconds + 0.1)
    new = lease(folder, "train-new")
    new.acquire()
    assert "output 'out': took over the stale lease of train-old (host" in capsys.readouterr().err
    with pytest.raises(LeaseLost, match="was taken over by train-new"):
        old.renew()
    old.release()  # not its lease any more: left alone
    assert storage.exists(new.url)


def test_the_same_owner_takes_its_lease_back_at_once(folder):
    """A restarted rank 0 of one job (the same owner id) does not wait for the timeout."""
    lease(folder, "torchrun-job-1", LeaseConfig()).acquire()
    lease(folder, "torchrun-job-1", LeaseConfig()).acquire()
    with pytest.raises(LeaseHeld):
        lease(folder, "torchrun-job-2", LeaseConfig()).acquire()


@pytest.mark.parametrize("lease_before", ["none", "stale"])
@pytest.mark.parametrize("honoured", [True, False])
def test_of_jobs_starting_together_exactly_one_takes_the_lease(folder, honoured, lease_before, monkeypatch):
    """With conditional writes the store decides; without them (honoured=False: a server that
    ignores If-None-Match), writing, waiting settle_seconds and reading back decides. A stale
    lease is always read back: SeaweedFS let two concurrent If-Match writes both succeed."""
    if not honoured:
        if "://" not in folder:
            pytest.skip("local files always honour conditions")
        monkeypatch.setattr(storage, "honours_conditions", lambda url: False)
    if lease_before == "stale":
        lease(folder, "train-dead").acquire()
        time.sleep(QUICK.stale_seconds + 0.1)
    start, outcomes = threading.Barrier(4), []

    def contend() -> None:
        start.wait()
        try:
            lease(folder, config=LeaseConfig(stale_seconds=60, settle_seconds=1.0)).acquire()
            outcomes.append("held")
        except LeaseHeld:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"]


HOLDER = """
import sys, time
from enat.models.errors import UserError
from enat.pipelines.config import LeaseConfig
from enat.pipelines.lease import Lease
try:
    with Lease(sys.argv[1], "train-holder", "output 'out'", LeaseConfig(0.2, 0.8)).held():
        print("holding", flush=True)
        time.sleep(60)
except UserError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def test_a_holder_whose_lease_is_taken_stops_at_once(tmp_path):
    """The heartbeat finds the lease taken (its process was paused past the timeout): the job is
    interrupted and ends with LeaseLost instead of writing on beside the new holder."""
    folder = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, folder], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline() == "holding\n"
    url = storage.join(folder, "lease.json")
    while True:  # another job takes it over (a renewal between reading and writing: again)
        current = storage.read_tagged(url)
        taken = current.data.replace(b"train-holder", b"train-other")
        if storage.write_if(url, taken, current.tag) is not None:
            break
    _, err = holder.communicate(timeout=30)
    assert holder.returncode == 2
    assert f"output 'out': its lease {url} was taken over by train-other" in err
    assert storage.read_bytes(url) == taken  # the new holder's lease stays


def test_a_lease_whose_process_is_gone_is_taken_over_at_once(tmp_path, capsys):
    """A holder killed with SIGKILL leaves its lease, fresh for 180 s; on the machine where it
    ran, its pid is known to be gone, so the next job takes over at once. A lease written
    elsewhere (another boot or pid namespace) is never judged by a local pid."""
    folder = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.replace("LeaseConfig(0.2, 0.8)", "LeaseConfig()"),
                               folder], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline() == "holding\n"
    with pytest.raises(LeaseHeld, match="in use by train-holder"):
        lease(folder, config=LeaseConfig()).acquire()  # alive: refused
    holder.kill()
    holder.wait()
    url = storage.join(folder, "lease.json")
    elsewhere = storage.read_bytes(url).replace(b'"process_space": "', b'"process_space": "other-boot/')
    storage.write_bytes(url, elsewhere)
    with pytest.raises(LeaseHeld, match="in use by train-holder"):
        lease(folder, config=LeaseConfig()).acquire()
    storage.write_bytes(url, elsewhere.replace(b"other-boot/", b""))
    taker = lease(folder, config=LeaseConfig())
    taker.acquire()
    assert f"took over the lease (its process is gone) of train-holder (host {socket.gethostname()}, " \
           f"pid {holder.pid}" in capsys.readouterr().err
    taker.release()


def test_a_second_eval_watcher_and_a_second_tokenizer_run_are_refused(tmp_path, capsys):
    from enat.cluster.cli import main
    from enat.evaluation.watch import watch_lease

    run_url = runs.run_url(str(tmp_path / "root"), "r")
    watching = watch_lease(run_url, "eval-watch-first", LeaseConfig())
    watching.acquire()
    assert main(["eval", "watch", run_url, "reference=stats.npz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"enat: error: the evaluations of {run_url} is in use by eval-watch-first")

    runs.run_lease(str(tmp_path / "root"), "tok", "tokenizer-first", LeaseConfig()).acquire()
    assert main(["tokenizer", "train", "--root", str(tmp_path / "root"), "--run", "tok",
                 "--source", str(tmp_path / "images")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"enat: error: run 'tok' ({runs.run_url(str(tmp_path / 'root'), 'tok')}) is in use "
                          f"by tokenizer-first") and err.count("\n") == 1
