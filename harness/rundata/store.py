"""The results folder of one run (docs/results-schema.md): manifest, per-point Parquet files, failures.

Every file is written to `<name>.tmp`, flushed to disk, then renamed, so a reader never sees half a file and a
killed run keeps every point it finished. A point counts as done when its samples file exists; its prompts and
telemetry files are renamed into place before it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# the schema's version, its readable versions, its tables and its clock belong to the contract; re-exported here
from contract.manifest import READABLE_VERSIONS as READABLE_VERSIONS
from contract.manifest import SCHEMA_VERSION as SCHEMA_VERSION
from contract.manifest import TABLES as TABLES
from contract.manifest import run_header
from contract.manifest import utc_now as utc_now

WRITE_ORDER = ("prompts", "telemetry", "requests", "samples", "iterations")


class StoreError(RuntimeError):
    """The results folder cannot be used (not a run, other schema, unwritable, disk full)."""


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success flush it and rename it onto `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str), encoding="utf-8")


class RunStore:
    """Reads and writes one run folder. `RunStore.new` is how a driver starts a run: the contract's manifest header
    (contract/manifest.py `run_header`) with the driver's own sections, in a new folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / "manifest.json"

    @classmethod
    def create(cls, out_root: Path, manifest: dict[str, Any], run_id: str | None = None) -> RunStore:
        """Make a new run folder under out_root and write its first manifest."""
        check_writable(out_root)
        run_id = run_id or new_run_id()
        store = cls(out_root / run_id)
        try:
            store.run_dir.mkdir(parents=True)
            for t in TABLES:
                (store.run_dir / t).mkdir()
        except OSError as e:
            raise StoreError(f"cannot create run folder {store.run_dir}: {e.strerror}") from e
        store.write_manifest({"schema_version": SCHEMA_VERSION, "run_id": run_id, **manifest})
        return store

    @classmethod
    def new(cls, kind: str, options: Any, spec: Any, environment: dict[str, Any], **sections: Any) -> RunStore:
        """A new run folder under `options.out_root` (named `options.run_id`, or a fresh id) whose manifest is the
        header of a `kind` run of `spec` (a pydantic spec) started by `options.command`, then `sections`."""
        from harness import __version__

        header = run_header(kind, tool_version=__version__, command=options.command,
                            spec=spec.model_dump(mode="json"), environment=environment, **sections)
        return cls.create(options.out_root, header, run_id=options.run_id)

    @classmethod
    def open(cls, run_dir: Path) -> RunStore:
        """Open an existing run for resuming; refuses folders that are not runs of this schema."""
        store = cls(run_dir)
        if not store.manifest_path.is_file():
            raise StoreError(f"{run_dir} is not a run folder (no manifest.json)")
        manifest = store.read_manifest()
        if manifest.get("schema_version") not in READABLE_VERSIONS:
            raise StoreError(
                f"{run_dir} has schema_version {manifest.get('schema_version')!r}; this harness "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        check_writable(run_dir)
        for t in TABLES:
            (run_dir / t).mkdir(exist_ok=True)
        return store

    def read_manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.manifest_path} is not valid JSON: {e}") from e
        return data

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        write_json_atomic(self.manifest_path, manifest)

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        manifest = self.read_manifest()
        manifest.update(fields)
        self.write_manifest(manifest)
        return manifest

    def discard_partial(self) -> list[Path]:
        """Delete unfinished writes (`*.tmp`) a killed run left; return what was removed."""
        removed = sorted(self.run_dir.rglob("*.tmp"))
        for p in removed:
            p.unlink()
        # prompts/telemetry of a point whose samples never landed are not data either
        done = self.done_points()
        for t in ("prompts", "telemetry", "requests"):
            for p in sorted((self.run_dir / t).glob("*.parquet")):
                if p.stem not in done:
                    p.unlink()
                    removed.append(p)
        return removed

    def done_points(self) -> set[str]:
        """Points (and replay segments) with a samples or iterations file: the file written last."""
        return {p.stem for t in ("samples", "iterations") for p in (self.run_dir / t).glob("*.parquet")}

    def write_point(self, point_id: str, tables: dict[str, pa.Table], order: tuple[str, ...] = WRITE_ORDER) -> None:
        """Write one finished point's tables in `order`; samples (or iterations, for a batch point) last, so its
        presence means the point is complete. A replay segment rewrites its files at each checkpoint, requests
        last (a request is finished once it is in requests)."""
        for name in order:
            if name in tables:
                try:
                    with atomic_path(self.run_dir / name / f"{point_id}.parquet") as tmp:
                        pq.write_table(tables[name], tmp)
                except OSError as e:  # disk filled up or folder went away mid-run; finished points are kept
                    raise StoreError(
                        f"cannot write {name} of point {point_id} under {self.run_dir}: {e.strerror or e}; "
                        f"free space and resume with  profile sweep --resume {self.run_dir}"
                    ) from e

    def record_failure(self, record: dict[str, Any]) -> None:
        """Append one failure record (one JSON line), flushed to disk."""
        path = self.run_dir / "failures.jsonl"
        with path.open("a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # a line cut by a kill must not swallow this record
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
                f.seek(0, os.SEEK_END)
                if cut:
                    f.write(b"\n")
            f.write((json.dumps({**record, "time": utc_now()}, default=str) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def failures(self) -> list[dict[str, Any]]:
        path = self.run_dir / "failures.jsonl"
        if not path.is_file():
            return []
        out = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
        return out

    def read_table(self, name: str) -> pa.Table | None:
        files = sorted((self.run_dir / name).glob("*.parquet"))
        if not files:
            return None
        return pa.concat_tables([pq.read_table(f) for f in files], promote_options="permissive")


MIN_FREE_BYTES = 50 << 20


def check_writable(folder: Path) -> None:
    """Fail before measuring if results could not be kept: unwritable folder or (nearly) full disk."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise StoreError(f"output folder {folder} is not writable: {e.strerror or e}") from e
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise StoreError(f"only {free >> 20} MiB free under {folder}; need at least {MIN_FREE_BYTES >> 20} MiB")
