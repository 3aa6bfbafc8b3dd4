"""Running one model on several ranks over `mx.distributed`: starting local ranks, joining a group, and failing fast.

MLX's ring backend (the one a CPU-only MLX has) has no timeouts: a rank that exits makes its neighbours raise
"[ring] connection to a peer was lost" at once, but a rank that is alive and stuck leaves the others waiting
forever, and two jobs on the same ports join each other's rings without an error (their sums are silently wrong).
So mlxc:

- starts local ranks itself (`launch`): fresh loopback ports in a hostfile of its own, a random job id every rank
  checks against all the others before doing anything (`join`), each rank in its own process group, rank 0's
  output passed through and the others' kept in a log shown on failure;
- watches them: each rank writes a heartbeat file (from a thread, so a rank waiting in a collective still beats)
  with how many model steps it has started; the launcher fails the job, naming the rank, when one exits with an
  error or dies, stops beating (stopped, or stuck in native code) for `rank_timeout` seconds, or stays behind the
  others' step while they wait for it that long; a hard `timeout` bounds the whole job; on failure every process
  group is killed and the job's files removed;
- under another launcher (`mlx.launch --hostfile hosts.json -- mlxc run ...`) joins the group it was started in:
  the same job check (a hash of the command and the hostfile, or `MLXC_JOB`), and the hard timeout enforced by
  each rank on itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..ir.errors import MlxcError
from .model import CompiledModel

JOB, JOB_DIR, TIMEOUT = "MLXC_JOB", "MLXC_JOB_DIR", "MLXC_JOB_TIMEOUT"  # set by `launch` for its ranks
BEAT = 0.5  # seconds between heartbeats
_PEER_LOST = "[ring]"  # MLX's ring errors start with this


class DistributedError(MlxcError):
    pass


def launched() -> bool:
    """Whether this process was started as one rank of a group (by `launch` or `mlx.launch`)."""
    return "MLX_RANK" in os.environ and ("MLX_HOSTFILE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ)


# ------------------------------------------------------------------------------------------------ one rank


@dataclass
class _Rank:
    group: object
    rank: int
    size: int
    steps: int = 0
    phase: str = "starting"
    seed: int = 0
    done: threading.Event = field(default_factory=threading.Event)


_CURRENT: _Rank | None = None


def current():
    """This process's rank (group, rank, size, ...) once `join` ran, else None."""
    return _CURRENT


def join(argv: Sequence[str] = (), timeout: float | None = None) -> _Rank:
    """Join the group this process was launched in: `mx.distributed.init(strict=True)` (the ring backend when a
    hostfile is given), then check that every rank belongs to this job, start the heartbeat and, on ranks other
    than 0, silence stdout (rank 0 prints what a single process would). `timeout` (seconds; else MLXC_JOB_TIMEOUT)
    bounds this rank's whole run: under a launcher that watches nothing, a rank waiting on a stuck peer still
    ends."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    import mlx.core as mx

    job_dir = os.environ.get(JOB_DIR)
    rank = int(os.environ.get("MLX_RANK", "0"))
    state = _Rank(None, rank, 0)
    if job_dir:
        _Heartbeat(state, Path(job_dir)).start()
    _watch_timeout(state, timeout)
    backend = os.environ.get("MLXC_BACKEND") or ("ring" if "MLX_HOSTFILE" in os.environ else "any")
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except Exception as e:  # MLX raises RuntimeError / ValueError with its own wording
        raise DistributedError(f"rank {rank}: cannot join the group ({backend} backend): {e}") from None
    state.group, state.rank, state.size = group, group.rank(), group.size()
    _check_job(state, argv)
    state.phase = "loading"
    if state.rank != 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        sys.stdout.flush()
        os.dup2(devnull, 1)
        os.close(devnull)
    _CURRENT = state
    return state


def _check_job(state: _Rank, argv: Sequence[str]) -> None:
    """Every rank gathers every rank's (job id, rank, size): a rank of another job on the same ports, or a rank
    that thinks it has another place, fails here instead of computing wrong sums. The job's seed comes along."""
    import mlx.core as mx

    job = os.environ.get(JOB)
    if job is None:  # another launcher: the same command and hostfile make the same job
        hostfile = os.environ.get("MLX_HOSTFILE", "")
        text = Path(hostfile).read_text() if hostfile and Path(hostfile).is_file() else hostfile
        job = hashlib.sha256(json.dumps([list(argv), text]).encode()).hexdigest()
    digest = hashlib.sha256(job.encode()).digest()
    words = [int.from_bytes(digest[i:i + 3], "little") for i in (0, 3, 6)]
    seed = secrets.randbits(24)
    mine = mx.array(words + [state.rank, state.size, seed], dtype=mx.int32)
    try:
        everyone = mx.distributed.all_gather(mine[None], group=state.group).tolist()
    except Exception as e:
        raise DistributedError(f"rank {state.rank}: the first exchange between ranks failed: {e}") from None
    for r, row in enumerate(everyone):
        if row[:3] != words or row[3] != r or row[4] != state.size:
            raise DistributedError(
                f"rank {state.rank}: rank {r} of this group belongs to another job (or disagrees on its place: "
                f"rank {row[3]} of {row[4]}); two jobs are using the same ports. Start each job with its own "
                "ports (mlxc --ranks picks fresh ones; mlx.launch --starting-port)")
    state.seed = everyone[0][5]  # rank 0's: every rank samples alike


class _Heartbeat(threading.Thread):
    """Writes `rank<r>.json` (time, phase, steps) every BEAT seconds, and ends the process when the launcher that
    started it is gone (nothing is left running)."""

    def __init__(self, state: _Rank, job_dir: Path):
        super().__init__(name="mlxc-heartbeat", daemon=True)
        self.state, self.dir, self.parent = state, job_dir, os.getppid()

    def run(self) -> None:
        path, tmp = self.dir / f"rank{self.state.rank}.json", self.dir / f".rank{self.state.rank}.json"
        while not self.state.done.is_set():
            if os.getppid() != self.parent:  # the launcher died: do not outlive it
                os._exit(1)
            try:
                tmp.write_text(json.dumps({"time": time.time(), "phase": self.state.phase,
                                           "steps": self.state.steps}))
                os.replace(tmp, path)
            except OSError:  # the job's directory is being removed: the launcher is ending the job
                return
            time.sleep(BEAT)


def _watch_timeout(state: _Rank, limit: float | None = None) -> None:
    """The job's hard timeout (`limit`, else seconds in MLXC_JOB_TIMEOUT), enforced by the rank itself: under a
    launcher that has none, a rank waiting forever on a stuck peer still ends (exit code 124)."""
    limit = limit or float(os.environ.get(TIMEOUT) or 0)
    if limit <= 0:
        return

    def expire() -> None:
        if not state.done.wait(limit):
            sys.stderr.write(f"error: rank {state.rank}: the job did not finish within {limit:g} s "
                             "(--timeout); stopping this rank\n")
            sys.stderr.flush()
            os._exit(124)

    threading.Thread(target=expire, name="mlxc-timeout", daemon=True).start()


def finish() -> None:
    """This rank is done: heartbeats and the timeout stop."""
    if _CURRENT is not None:
        _CURRENT.phase = "done"
        _CURRENT.done.set()


def describe_failure(error: BaseException) -> str | None:
    """A rank's one-line account of an MLX communication error (a peer died), or None for other errors."""
    text = str(error)
    if _CURRENT is None or _PEER_LOST not in text:
        return None
    status = Path(os.environ[JOB_DIR]) / f"rank{_CURRENT.rank}.error" if os.environ.get(JOB_DIR) else None
    if status is not None:
        try:
            status.write_text("peer")
        except OSError:
            pass
    return (f"rank {_CURRENT.rank} of {_CURRENT.size} lost its connection to another rank ({text.strip()}): "
            "a rank failed, was killed or stopped")


# ------------------------------------------------------------------------------------------------ the model


class DistributedModel(CompiledModel):
    """One rank's share of a model. It runs like a whole model: every rank calls it alike (same ids, same
    sampling) and gets the whole logits; each call counts as a step for the launcher's watch."""

    def __init__(self, *args, vocab_size: int, parallel: str, rank: _Rank, **kwargs):
        super().__init__(*args, **kwargs)
        self.vocab_size = vocab_size
        self.parallel = parallel
        self.rank, self.ranks = rank.rank, rank.size
        self._state = rank
        rank.phase = "running"

    def __repr__(self) -> str:
        return f"DistributedModel(source={self.source!r}, rank={self.rank} of {self.ranks}, {self.parallel})"

    def forward(self, ids, cache=None, logits_to_keep: int = 0):
        """The logits, whose computation is queued now: ranks must meet in their collectives in the same order,
        and a pipeline stage's `recv` depends on nothing earlier, so two calls evaluated together could swap their
        transfers on one rank and not on another."""
        import mlx.core as mx

        self._state.steps += 1
        logits = super().forward(ids, cache, logits_to_keep)
        mx.async_eval(logits)
        return logits

    def _sampling(self, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens):
        # unseeded sampling draws from MLX's global generator, which differs per rank: the job's seed instead
        seed = self._state.seed if seed is None else seed
        return super()._sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_tokens)


def peak_memory() -> list[tuple[float, float]]:
    """Every rank's peak memory in GB, (MLX's allocator, the process's resident set), in rank order (this
    process's alone outside a group). Every rank must call it: it is a collective."""
    import mlx.core as mx

    mine = [mx.get_peak_memory() / 1e9, _peak_resident() / 1e9]
    return [(a, b) for a, b in gather_floats(mine)]


def _peak_resident() -> float:
    """This process's peak resident set in bytes. Linux's VmHWM counts this program alone: getrusage's ru_maxrss
    keeps the launching process's size across exec (a launcher that once held a checkpoint would show in every
    rank)."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak) if sys.platform == "darwin" else float(peak) * 1024  # bytes on macOS, KiB elsewhere


def gather_floats(values: Sequence[float]) -> list[list[float]]:
    """Every rank's `values` (e.g. its peak memory), on every rank, in rank order."""
    import mlx.core as mx

    if _CURRENT is None:
        return [list(values)]
    got = mx.distributed.all_gather(mx.array([list(values)], dtype=mx.float32), group=_CURRENT.group)
    return got.tolist()


# ------------------------------------------------------------------------------------------------ launching


@dataclass
class _Proc:
    rank: int
    popen: subprocess.Popen
    log: Path | None
    started: float
    code: int | None = None
    ended: float | None = None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports the OS says are free now (all held open until every one is chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch(command: Sequence[str], ranks: int, *, timeout: float | None = None, rank_timeout: float = 60.0,
           stdin_tee: bool = False, stdout=None, stderr=None, env: dict | None = None, quiet: bool = False) -> int:
    """Run `command` as `ranks` local processes of one ring group on loopback and wait for all of them.

    Returns 0 when every rank exits 0. Otherwise stops the job (every rank's process group is killed), prints one
    `error:` line naming the rank that failed first and why (unless rank 0 already printed its own error), and
    returns rank 0's exit code when rank 0 failed by itself, else 1. `stdin_tee` copies this process's stdin to
    every rank (they must all read the same input); otherwise ranks read nothing. Rank 0 writes to `stdout` /
    `stderr` (default: this process's); the others' stdout is dropped and their stderr kept for the error report.
    """
    if ranks < 2:
        raise DistributedError(f"launch needs at least 2 ranks, got {ranks}")
    job_dir = Path(tempfile.mkdtemp(prefix="mlxc-job-"))
    procs: list[_Proc] = []
    err = stderr if stderr is not None else sys.stderr
    try:
        hostfile = job_dir / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_ports(ranks)]))
        base = dict(os.environ if env is None else env)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        base.setdefault("OPENBLAS_NUM_THREADS", str(max(1, cpus // ranks)))  # ranks share the cores
        base.update({JOB: secrets.token_hex(16), JOB_DIR: str(job_dir), "MLX_HOSTFILE": str(hostfile)})
        if timeout:
            base[TIMEOUT] = str(timeout + 5)  # each rank's own backstop, after the launcher's
        for r in range(ranks):
            log = None if r == 0 else job_dir / f"rank{r}.log"
            popen = subprocess.Popen(
                list(command), env={**base, "MLX_RANK": str(r)}, start_new_session=True,
                stdin=subprocess.PIPE if stdin_tee else subprocess.DEVNULL,
                stdout=stdout if r == 0 else subprocess.DEVNULL,
                stderr=stderr if r == 0 else open(log, "wb"))
            procs.append(_Proc(r, popen, log, time.time()))
        if stdin_tee:
            threading.Thread(target=_tee, args=([p.popen.stdin for p in procs],), daemon=True).start()
        failure = _watch(procs, job_dir, timeout, rank_timeout)
        if failure is None:
            return 0
        message, code = _report(procs, job_dir, failure)
        if message and not quiet:
            err.write(f"error: {message}\n")
            err.flush()
        return code
    except KeyboardInterrupt:
        _kill(procs)
        raise
    finally:
        _kill(procs)
        shutil.rmtree(job_dir, ignore_errors=True)


def _tee(pipes) -> None:
    """This process's stdin, line by line, to every rank (a rank that has exited is skipped)."""
    live = list(pipes)
    for line in iter(sys.stdin.buffer.readline, b""):
        for p in list(live):
            try:
                p.write(line)
                p.flush()
            except (BrokenPipeError, ValueError, OSError):
                live.remove(p)
    for p in live:
        try:
            p.close()
        except OSError:
            pass


@dataclass
class _Failure:
    kind: str  # "exit", "silent", "behind", "timeout"
    ranks: list[int]
    detail: str = ""


def _watch(procs: list[_Proc], job_dir: Path, timeout: float | None, rank_timeout: float) -> _Failure | None:
    start = time.time()
    last_steps: dict[int, int] = {}
    moved = time.time()
    while True:
        now = time.time()
        for p in procs:
            if p.code is None and (code := p.popen.poll()) is not None:
                p.code, p.ended = code, now
        failed = [p for p in procs if p.code not in (None, 0)]
        if failed:
            _settle(procs, 1.0)  # the others notice within milliseconds; let them say why they stopped
            return _Failure("exit", [p.rank for p in procs if p.code not in (None, 0)])
        if all(p.code == 0 for p in procs):
            return None
        if timeout and now - start > timeout:
            return _Failure("timeout", [p.rank for p in procs if p.code is None], f"{timeout:g} s")
        beats = {p.rank: _beat(job_dir, p.rank) for p in procs if p.code is None}
        silent = [r for r, b in beats.items() if now - (b["time"] if b else procs[r].started) > rank_timeout]
        if silent:
            return _Failure("silent", silent, f"{rank_timeout:g} s")
        steps = {r: b["steps"] for r, b in beats.items() if b and b["phase"] == "running"}
        if steps != last_steps:
            last_steps, moved = steps, now
        elif steps and len(set(steps.values())) > 1 and now - moved > rank_timeout:
            behind = min(steps.values())
            return _Failure("behind", [r for r, s in steps.items() if s == behind],
                            f"step {behind + 1}, which the others started {now - moved:.0f} s ago")
        time.sleep(0.1)


def _beat(job_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((job_dir / f"rank{rank}.json").read_text())
    except (OSError, ValueError):
        return None


def _settle(procs: list[_Proc], seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end and any(p.code is None for p in procs):
        for p in procs:
            if p.code is None and (code := p.popen.poll()) is not None:
                p.code, p.ended = code, time.time()
        time.sleep(0.02)


def _kill(procs: list[_Proc]) -> None:
    """Kill every rank's whole process group and reap it: nothing of the job is left running."""
    for p in procs:
        try:
            os.killpg(p.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        try:
            code = p.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        if p.code is None:
            p.code = code
        for stream in (p.popen.stdin,):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_error(p: _Proc) -> str:
    """The last `error:` line a rank wrote on stderr (its log), if any."""
    if p.log is None:
        return ""
    try:
        lines = p.log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1].strip()


def _report(procs: list[_Proc], job_dir: Path, failure: _Failure) -> tuple[str, int]:
    """The error line for a failed job and the launcher's exit code."""
    if failure.kind == "timeout":
        return f"the job did not finish within {failure.detail} (--timeout); stopped ranks " + \
            ", ".join(map(str, failure.ranks)), 124
    if failure.kind == "silent":
        ranks = ", ".join(map(str, failure.ranks))
        return (f"rank {ranks} stopped responding (no heartbeat for {failure.detail}: stopped, or stuck outside "
                f"Python); the job was stopped"), 1
    if failure.kind == "behind":
        ranks = ", ".join(map(str, failure.ranks))
        return (f"rank {ranks} is stuck: it has not started {failure.detail} (--rank-timeout); "
                "the job was stopped"), 1
    # exits: the ranks that failed on their own, not because a peer went away
    failed = [p for p in procs if p.code not in (None, 0) and p.rank in failure.ranks]
    peer = {p.rank for p in failed if (job_dir / f"rank{p.rank}.error").exists()}
    roots = [p for p in failed if p.rank not in peer] or failed
    roots.sort(key=lambda p: (p.code >= 0, p.ended or 0))  # a killed rank first, then the earliest
    first = roots[0]
    if first.rank == 0 and first.code > 0:
        return "", first.code  # rank 0 printed its own error, as a single process would
    why = _last_error(first)
    tail = f": {why}" if why and first.code > 0 else ""
    others = [p.rank for p in failed if p is not first]
    also = f"; rank {', '.join(map(str, others))} then stopped" if others else ""
    return f"rank {first.rank} {_how(first.code)}{tail}{also}; the job was stopped", 1
