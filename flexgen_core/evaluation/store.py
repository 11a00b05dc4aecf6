"""Run store: durable, resumable request results for chunked generation (one SQLite file per run directory).

Each request has a stable key (`request_key`). After each chunk (one engine block) its results are written in
ONE transaction (`put_chunk`): a crash mid-write leaves the store readable and the chunk simply absent, so a
rerun regenerates exactly the missing keys. One writer per run directory, enforced with an exclusive
non-blocking `flock` on `run_store.lock` held for the writer's lifetime; readers (scoring) take no lock.
The SQLite file uses a rollback journal with `synchronous=FULL`, so a committed chunk survives power loss.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STORE_FILENAME = "run_store.sqlite"
LOCK_FILENAME = "run_store.lock"
SCHEMA_VERSION = 1
KEY_VERSION = 1
REQUEST_KEY_FIELDS = ("model", "weights_revision", "prompt", "generation", "compression")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (chunk_id INTEGER PRIMARY KEY, num_results INTEGER NOT NULL,
                                   committed_at REAL NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, chunk_id INTEGER NOT NULL, result TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS writes (key TEXT NOT NULL, chunk_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS writes_by_key ON writes (key);
"""


class StoreLockedError(RuntimeError):
    """Another process holds the run directory's writer lock."""


class DuplicateResultError(ValueError):
    """A chunk holds keys that are already stored (regenerating them is a planning bug)."""


# --- keys ------------------------------------------------------------------------------------------------------

def _canonical(value: Any, path: str = "payload") -> Any:
    """JSON-native copy: tuples become lists, integral floats become ints (0.0 and 0 give one key)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{path} is {value}; request keys need finite numbers")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{path} has non-string keys; request keys need JSON objects")
        return {k: _canonical(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) is int or type(v) is str for v in value):  # token ids, stop sequences: already canonical
            return list(value)
        return [_canonical(v, f"{path}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{path} has type {type(value).__name__}; request keys take JSON values only")


def request_key(payload: Mapping[str, Any]) -> str:
    """A stable sha256 hex key of a request: same payload, same key, in any process, on any machine.

    The payload must hold everything that changes the output, and nothing that does not:
      model: model identity (e.g. "facebook/opt-1.3b" or a local checkpoint path's name);
      weights_revision: hub commit or a hash of the checkpoint files (never None: two weight versions
        would share results);
      prompt: the prompt text, or its token ids when the engine is fed ids;
      generation: the settings, e.g. max_tokens, temperature, top_p, stop sequences, num_completions, seed,
        echo/logprob flags;
      compression: weight/KV-cache compression (e.g. {"weights": "4bit-g64", "cache": None}).
    Extra fields (e.g. engine_version, a trial index used as `random`) are allowed. Offload fractions and batch
    sizes must NOT be in the key, so a resume may re-batch the remainder under another policy.
    """
    missing = [f for f in REQUEST_KEY_FIELDS if f not in payload]
    if missing:
        raise ValueError(f"request key payload lacks {missing}; it needs {list(REQUEST_KEY_FIELDS)}")
    for name in ("model", "weights_revision", "prompt"):
        if payload[name] is None or payload[name] == "":
            raise ValueError(f"request key payload field {name!r} is empty; results could not be trusted")
    doc = _canonical({"key_version": KEY_VERSION, **payload})
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- planning --------------------------------------------------------------------------------------------------

def plan_chunks(pending: Iterable[tuple[str, int, Hashable]], chunk_size: int, *,
                longest_first: bool = True) -> list[list[str]]:
    """Cut pending requests `(key, prompt_length, group)` into chunks of at most `chunk_size` keys.

    A chunk never mixes groups (requests that must share generation settings). Groups are ordered by their JSON
    form; within a group requests are sorted by length, longest first by default (the first chunk is the worst
    case, so running out of memory shows at once), ties by key. Deterministic for any input order. A key listed
    twice is planned once; listed with different lengths or groups it is an error.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    seen: dict[str, tuple[int, Hashable]] = {}
    for key, length, group in pending:
        if key in seen and seen[key] != (length, group):
            raise ValueError(f"request {key} is pending twice with different lengths or groups: "
                             f"{seen[key]} and {(length, group)}")
        seen[key] = (length, group)
    groups: dict[str, list[tuple[int, str]]] = {}
    for key, (length, group) in seen.items():
        label = json.dumps(group, sort_keys=True, default=repr)
        groups.setdefault(label, []).append((-length if longest_first else length, key))
    chunks: list[list[str]] = []
    for label in sorted(groups):
        keys = [key for _, key in sorted(groups[label])]
        chunks += [keys[i:i + chunk_size] for i in range(0, len(keys), chunk_size)]
    return chunks


# --- the store -------------------------------------------------------------------------------------------------

class RunStore:
    """Request results of one run directory. `RunStore(dir)` writes (and holds the lock); `readonly=True` reads."""

    def __init__(self, run_dir: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.db_path = self.run_dir / STORE_FILENAME
        self.readonly = readonly
        self._lock_fd: int | None = None
        if readonly:
            if not self.db_path.exists():
                raise FileNotFoundError(f"no run store in {self.run_dir} ({STORE_FILENAME} is missing); "
                                        "generate first or check --output-path")
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _acquire_lock(self.run_dir)
        try:
            self._conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=30.0)
            self._conn.execute("PRAGMA synchronous=FULL")
            if readonly:
                self._conn.execute("PRAGMA query_only=ON")
            else:
                self._conn.execute("PRAGMA journal_mode=DELETE")
                self._conn.executescript(_SCHEMA)
                self._conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            self._check_schema()
        except sqlite3.DatabaseError as e:
            self.close()
            if isinstance(e, sqlite3.OperationalError) and "no such table" not in str(e):
                raise  # e.g. "database is locked": not a format problem
            raise RuntimeError(f"{self.db_path} is not a run store ({e}); use another --output-path") from e
        except BaseException:
            self.close()
            raise

    def _check_schema(self) -> None:
        row = self._conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        if row is None or int(row[0]) != SCHEMA_VERSION:
            raise RuntimeError(f"{self.db_path} has schema version {row and row[0]}, this code reads "
                               f"{SCHEMA_VERSION}; use another --output-path")

    def close(self) -> None:
        """Close the database and release the writer lock (idempotent)."""
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None  # type: ignore[assignment]
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # reads
    def has(self, key: str) -> bool:
        return self._conn.execute("SELECT 1 FROM results WHERE key = ?", (key,)).fetchone() is not None

    __contains__ = has

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def completed_keys(self) -> set[str]:
        return {k for (k,) in self._conn.execute("SELECT key FROM results")}

    def get(self, key: str) -> dict[str, Any]:
        row = self._conn.execute("SELECT result FROM results WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(f"request {key} is not in the run store {self.db_path}")
        return json.loads(row[0])

    def items(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """All (key, result) pairs in write order."""
        for key, text in self._conn.execute("SELECT key, result FROM results ORDER BY chunk_id, rowid"):
            yield key, json.loads(text)

    def chunks(self) -> list[dict[str, Any]]:
        """Committed chunks: chunk_id, num_results, committed_at (unix time) and the caller's metadata."""
        rows = self._conn.execute("SELECT chunk_id, num_results, committed_at, metadata FROM chunks ORDER BY chunk_id")
        return [{"chunk_id": c, "num_results": n, "committed_at": t, "metadata": json.loads(m)}
                for c, n, t, m in rows]

    def write_count(self, key: str) -> int:
        """How many committed chunks wrote `key` (append-only log): 1 for a request generated once."""
        return self._conn.execute("SELECT COUNT(*) FROM writes WHERE key = ?", (key,)).fetchone()[0]

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check`: "ok" when the file is sound."""
        return self._conn.execute("PRAGMA integrity_check").fetchone()[0]

    # writes
    def put_chunk(self, results: Mapping[str, Mapping[str, Any]], metadata: Mapping[str, Any] | None = None, *,
                  overwrite: bool = False) -> int:
        """Store one chunk's results and metadata (timings, policy, engine stats) in ONE transaction.

        All or nothing: any error (a duplicate key without `overwrite`, a failed or non-JSON result) rolls the
        whole chunk back. Results with `"success": False` are refused, so a rerun retries them. Returns the
        chunk id.
        """
        if self.readonly:
            raise PermissionError(f"{self.db_path} is open read-only")
        if not results:
            raise ValueError("put_chunk needs at least one result")
        meta_text = json.dumps(dict(metadata or {}), sort_keys=True)
        with self._transaction():
            if not overwrite:
                self._refuse_duplicates(list(results))
            chunk_id = self._conn.execute("SELECT COALESCE(MAX(chunk_id), 0) + 1 FROM chunks").fetchone()[0]
            self._conn.execute("INSERT INTO chunks VALUES (?, ?, ?, ?)", (chunk_id, len(results), time.time(),
                                                                         meta_text))
            self._conn.executemany("INSERT OR REPLACE INTO results (key, chunk_id, result) VALUES (?, ?, ?)",
                                   _encoded(results, chunk_id))
            self._conn.executemany("INSERT INTO writes VALUES (?, ?)", ((k, chunk_id) for k in results))
        return chunk_id

    def _refuse_duplicates(self, keys: list[str]) -> None:
        stored: list[str] = []
        for i in range(0, len(keys), 500):
            batch = keys[i:i + 500]
            marks = ",".join("?" * len(batch))
            stored += [k for (k,) in self._conn.execute(f"SELECT key FROM results WHERE key IN ({marks})", batch)]
        if stored:
            raise DuplicateResultError(f"{len(stored)} result(s) of this chunk are already stored (e.g. {stored[0]}); "
                                       "skip stored keys when planning, or pass overwrite=True to replace them")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")


def _encoded(results: Mapping[str, Mapping[str, Any]], chunk_id: int) -> Iterator[tuple[str, int, str]]:
    """Rows for the results table, validated lazily inside the transaction."""
    for key, result in results.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"result keys must be non-empty strings (request_key), got {key!r}")
        if not isinstance(result, Mapping):
            raise TypeError(f"result for {key} must be a JSON object (dict), got {type(result).__name__}")
        if result.get("success") is False:
            raise ValueError(f"result for {key} has success=False; failed requests are not stored, so a rerun "
                             "retries them")
        try:  # allow_nan=False: a NaN log-prob means the model overflowed; storing it would poison scoring
            text = json.dumps(result, sort_keys=True, allow_nan=False)
        except ValueError as e:
            raise ValueError(f"result for {key} contains NaN or infinity (the model overflowed its dtype); it is "
                             "not stored, so a rerun retries it") from e
        except TypeError as e:
            raise TypeError(f"result for {key} is not JSON-serializable: {e}") from e
        yield key, chunk_id, text


def _acquire_lock(run_dir: Path) -> int:
    """Take the run directory's writer lock (non-blocking) and record our PID in the lock file."""
    path = run_dir / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLockedError(f"run directory {run_dir} is being written by process {holder} (lock {path}); "
                               "wait for it or use another --output-path") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
