"""One `m2f segment` run per OUTPUT: a lease on OUTPUT, `OUTPUT/_runs/_lease.json`.

Why: two runs on one OUTPUT (a schedule that overlaps itself, a retry while the first attempt still runs)
break each other — a run removes the work manifests it takes for a dead run's (`resume.remove_stale_work`)
and rewrites part files to drop superseded rows — or both finish and every image has two rows. So a run
takes the lease once OUTPUT is checked and before it writes or deletes anything there, and gives it back
after its final report. A run that finds a live lease writes nothing and exits 75 (EX_TEMPFAIL: try later).

The lease is a small JSON record: the holder's run id, host, pid, start, its stale time and a heartbeat
that a daemon thread refreshes every `stale_after_s / 6` seconds. It is created with an atomic conditional
create (local files: a temporary hard-linked to the name; S3: a PUT with `If-None-Match: *`; GCS:
`ifGenerationMatch=0`; anything else: best effort), so that of two runs starting together exactly one
holds it; segment/lease_store.py says how each kind of storage does it.

Taking over: a lease whose heartbeat is older than its holder's stale time (STALE_AFTER_S, 90 s, at most
MAX_STALE_S; `M2F_LEASE_STALE_S` shortens it for tests) is replaced, but only if it is still the lease that
was judged stale — S3: a PUT with `If-Match` on its ETag; local files: rename it aside under a unique name,
check that the moved file is that inode (else put it back), then create afresh. Of two runs that race to
take over one stale lease, exactly one wins. A holder on this machine whose process is gone (same boot and
pid namespace, its pid gone or reused) is taken over at once: a SIGKILLed run does not hold up its re-run.

A holder that finds at a heartbeat that the lease is no longer its own (it stalled longer than the stale
time and was taken over) sets `lost` and calls `on_lost`: the run stops committing and fails (exit 3). The
part files it committed between the take-over and that heartbeat (at most `stale_after_s / 6` seconds)
cannot be prevented: a part file's write is not conditional on the lease.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem

from m2f.jobs.common.failure import Failure, one_line
from m2f.jobs.segment.lease_store import Store, open_store
from m2f.pipeline.output import RUNS_DIR
from m2f.pipeline.storage import qualify, with_retries

LEASE_NAME = "_lease.json"
EXIT_BUSY = 75  # EX_TEMPFAIL (sysexits.h): a scheduler should try again later
STALE_AFTER_S = 90.0  # six missed heartbeats: long beyond a storage hiccup, short for a re-run after a crash
MAX_STALE_S = 120.0
ATTEMPTS = 5  # rounds of read / create-or-take-over while other runs change the lease under us

log = logging.getLogger(__name__)


def stale_after_s() -> float:
    """STALE_AFTER_S, or `M2F_LEASE_STALE_S` (read at call time), within [1, MAX_STALE_S]."""
    return min(MAX_STALE_S, max(1.0, float(os.environ.get("M2F_LEASE_STALE_S", STALE_AFTER_S))))


# --- the record -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Holder:
    """What a lease says about the run that holds it."""

    run_id: str
    host: str
    pid: int
    started: str
    heartbeat: float  # epoch seconds of the last refresh, by the holder's clock
    stale_after_s: float  # what the holder promised: a heartbeat at least this often
    process: str = ""  # `process_id(pid)`: tells a dead holder on this machine

    @classmethod
    def parse(cls, data: bytes, modified: float) -> Holder:
        """The holder named by `data`; an unreadable record counts as a holder as old as the file."""
        try:
            r = json.loads(data)
            heartbeat = datetime.fromisoformat(r["heartbeat"]).timestamp()
            fields = (str(r["run_id"]), str(r["host"]), int(r["pid"]), str(r["started"]))
            return cls(*fields, heartbeat, float(r["stale_after_s"]), str(r.get("process", "")))
        except (ValueError, KeyError, TypeError):
            return cls("(unreadable lease)", "?", 0, "", modified, stale_after_s())

    def record(self) -> bytes:
        """The lease file's bytes; always the same length for one holder (in-place heartbeats)."""
        beat = datetime.fromtimestamp(self.heartbeat, UTC).isoformat(timespec="milliseconds")
        fields = {**dataclasses.asdict(self), "heartbeat": beat}
        return (json.dumps(fields, indent=1) + "\n").encode("utf-8")

    def age_s(self) -> float:
        return max(0.0, time.time() - self.heartbeat)

    def stale(self) -> bool:
        return self.age_s() > min(MAX_STALE_S, self.stale_after_s) or self.dead()

    def dead(self) -> bool:
        """On this machine (same boot and pid namespace), and its process is gone or its pid reused."""
        here = process_id(os.getpid()).rsplit("/", 2)[0]
        return (
            bool(self.process)
            and bool(here)
            and self.process.rsplit("/", 2)[0] == here
            and (process_id(self.pid) != self.process)
        )

    def describe(self) -> str:
        return f"run {self.run_id} on host {self.host} (pid {self.pid}), heartbeat {self.age_s():.0f} s ago"

    def summary(self) -> dict[str, Any]:
        """For `--json`: who holds OUTPUT, and how fresh its heartbeat is."""
        fields = ("run_id", "host", "pid", "started", "stale_after_s")
        return {name: getattr(self, name) for name in fields} | {"heartbeat_age_s": round(self.age_s(), 1)}


def process_id(pid: int) -> str:
    """`boot/pid-namespace/pid/start-time` of a process of this machine; '' where /proc cannot tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return ""
    return f"{boot}/{namespace}/{pid}/{start}"


class Busy(Failure):
    """A live lease of another run: this run writes nothing and exits 75."""

    def __init__(self, output: str, holder: Holder | None) -> None:
        who = holder.describe() if holder else "another run (the lease changed under every attempt)"
        super().__init__(f"{output} is in use by {who}; one run per OUTPUT: try again later", EXIT_BUSY)
        self.holder = holder.summary() if holder else {}


# --- the lease ------------------------------------------------------------------------------------


class Lease:
    """This run's hold on OUTPUT: `Lease.acquire`, then `lost` while the run goes, `release` at its end."""

    def __init__(self, store: Store, holder: Holder, token: Any, on_lost: Callable[[str], None] | None) -> None:
        self._store, self._holder, self._token = store, holder, token
        self._on_lost = on_lost
        self._lost: str | None = None
        self._released = False
        self._lock = threading.Lock()  # one store operation at a time: the heartbeat's, or release's
        self._done = threading.Event()
        threading.Thread(target=self._beat, name="m2f-lease", daemon=True).start()

    @classmethod
    def acquire(
        cls,
        fs: AbstractFileSystem,
        root: str,
        run_id: str,
        *,
        on_lost: Callable[[str], None] | None = None,
        stale_s: float | None = None,
    ) -> Lease:
        """Take the lease on OUTPUT (`root` on `fs`) for `run_id`, taking over a stale one.

        Raises Busy (a Failure, exit 75) naming the holder while another run's lease is live; reads
        before it writes, so a refused run leaves OUTPUT as it was. `on_lost(reason)` is called from the
        heartbeat thread if the lease is taken over while this run holds it.
        """
        store = open_store(fs, posixpath.join(root, RUNS_DIR, LEASE_NAME))
        stale = min(MAX_STALE_S, stale_s or stale_after_s())
        ours = Holder(run_id, socket.gethostname(), os.getpid(), datetime.now(UTC).isoformat(), time.time(), stale)
        ours = dataclasses.replace(ours, process=process_id(os.getpid()))
        holder = None
        for _ in range(ATTEMPTS):
            current = store.read()
            if current is None:
                token = store.create(ours.record())
            else:
                data, seen, modified = current
                holder = Holder.parse(data, modified)
                if holder.run_id == run_id:  # our own create, retried after its answer was lost
                    return cls(store, ours, seen, on_lost)
                if not holder.stale():
                    raise Busy(qualify(fs, root), holder)
                token = store.replace(ours.record(), seen)
                if token is not None:
                    log.warning("took over the lease on OUTPUT from %s", holder.describe())
            if token is not None:
                return cls(store, ours, token, on_lost)
        raise Busy(qualify(fs, root), holder)

    @property
    def lost(self) -> str | None:
        """Why this run no longer holds OUTPUT (one line for the user); None while it does."""
        return self._lost

    def release(self) -> None:
        """Give OUTPUT back (after the run's final report); removes the lease only if it is still ours."""
        self._done.set()
        with self._lock:
            if self._released:
                return
            self._released = True
            try:
                if self._lost is None and not with_retries(lambda: self._store.remove(self._token)):
                    log.warning("the lease on OUTPUT was no longer ours at release")
            except Exception as e:  # it goes stale by itself: the next run waits at most the stale time
                log.warning("could not release the lease on OUTPUT: %s", one_line(e))
            finally:
                self._store.close()

    def _beat(self) -> None:
        """Refresh the heartbeat every stale_after_s / 6 s until released or lost."""
        period, last = self._holder.stale_after_s / 6, time.monotonic()
        while not self._done.wait(period):
            with self._lock:
                if self._released:
                    return
                try:
                    reason = self._refresh()
                    last = time.monotonic()
                except Exception as e:  # storage trouble: retried at the next beat, until the lease may be stale
                    log.warning("refreshing the lease on OUTPUT failed: %s", one_line(e))
                    stale = self._holder.stale_after_s
                    reason = f"lost the lease on OUTPUT: not refreshed for {stale:.0f} s ({one_line(e)})"
                    reason = reason if time.monotonic() - last >= stale else None
                if reason is not None:
                    self._lost = reason
            if reason is not None:
                log.error("%s", reason)
                if self._on_lost is not None:
                    self._on_lost(reason)
                return

    def _refresh(self) -> str | None:
        """One heartbeat; returns why the lease is lost, or None while it is ours."""
        self._holder = dataclasses.replace(self._holder, heartbeat=time.time())
        token = self._store.replace(self._holder.record(), self._token)
        if token is None:
            current = self._store.read()
            holder = Holder.parse(current[0], current[2]) if current is not None else None
            if holder is None:
                return "lost the lease on OUTPUT: another run removed it"
            if holder.run_id != self._holder.run_id:
                return f"lost the lease on OUTPUT to {holder.describe()}"
            token = current[1]  # ours after all: a write retried after its answer was lost, or put back
        self._token = token
        return None
