"""RRS behind the backend seam (`kind = "rrs"`): a small CSV is sent as one request-response
call, `POST {base}/workspaces/{ws}/services/{id}/execute?api-version=2.0&details=true`, and the
answer is written as the result file. No blob storage is involved.

How a synchronous call fits the lifecycle (docs/architecture.md, "The backend seam"):
`prepare_input` checks the file against the row and byte limits (a file over them fails at once,
telling the user to use kind = "bes"); `submit` names the request (no call: there is no remote
job to create); `start` has nothing to do; `status` makes the one execute call and reports
Finished with the scored tables, or Failed with the service's reason; `open_result` streams a
table as CSV. Scoring is a pure function of the input, so repeating the call after a crash
(the tables are kept in memory only) is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp

from orchestrator import config, errors, jobs
from orchestrator.backends import base
from orchestrator.backends.bes import client as client_mod
from orchestrator.backends.bes import throttle

#: Rows and bytes above which a file is refused: RRS is meant for small, quick requests.
DEFAULT_MAX_ROWS = 1000
DEFAULT_MAX_BYTES = 1024 * 1024
#: Status words kept in the history's `bes_status` column.
STATUS_READY = "Ready"
STATUS_FINISHED = "Finished"
STATUS_FAILED = "Failed"
#: Result extensions RRS answers can be written as (a table: CSV or TSV).
DELIMITERS = {".csv": ",", ".tsv": "\t"}
#: Streamed out in pieces of this size.
CHUNK_BYTES = 1024 * 1024


@dataclasses.dataclass(frozen=True, kw_only=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False)
class RrsResult:
    """One output table of an execute answer, held in memory until it is written."""

    public_url: str
    table: Table

    def __repr__(self) -> str:
        return f"RrsResult(public_url={self.public_url!r}, rows={len(self.table.rows)})"


# ---- pure: input limits, request body, answer parsing, CSV text ----------------------------


def too_large(*, name: str, rows: int | None, size: int, max_rows: int, max_bytes: int
              ) -> str | None:
    """The refusal message for a file over a limit, or None when it fits."""
    advice = 'request-response is for small inputs: use kind = "bes" for this file'
    if size > max_bytes:
        return (f"{name} is {size} bytes, over this service's RRS limit of {max_bytes} bytes"
                f" (max_bytes); {advice}")
    if rows is not None and rows > max_rows:
        return (f"{name} has {rows} rows, over this service's RRS limit of {max_rows} rows"
                f" (max_rows); {advice}")
    return None


def parse_csv(data: bytes, name: str) -> Table:
    """The input file as a table: the first row names the columns; blank lines are skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise errors.PermanentError(f"{name} is not UTF-8 text", code="InputUnreadable") from None
    delimiter = "\t" if name.lower().endswith(".tsv") else ","
    try:
        lines = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
    except csv.Error as exc:
        raise errors.PermanentError(f"{name} is not valid CSV: {exc}",
                                    code="InputUnreadable") from None
    if not lines:
        raise errors.PermanentError(f"{name} is empty: no header row", code="InputUnreadable")
    return Table(columns=lines[0], rows=lines[1:])


def execute_body(table: Table, input_name: str, global_parameters: Mapping[str, str]
                 ) -> dict[str, Any]:
    return {
        "Inputs": {input_name: {"ColumnNames": list(table.columns),
                                "Values": [list(r) for r in table.rows]}},
        "GlobalParameters": {str(k): str(v) for k, v in global_parameters.items()},
    }


def _cell(value: object) -> str:
    return "" if value is None else str(value)


def parse_answer(body: object) -> dict[str, Table]:
    """Output name -> table of an execute answer: `{"Results": {name: {"type": "table",
    "value": {"ColumnNames", "Values"}}}}` (the `value` wrapper is optional)."""
    results = body.get("Results") if isinstance(body, Mapping) else None
    if not isinstance(results, Mapping):
        raise errors.PermanentError("RRS answer has no Results", code="BadResponse")
    out: dict[str, Table] = {}
    for name, entry in results.items():
        value = entry.get("value", entry) if isinstance(entry, Mapping) else None
        columns = value.get("ColumnNames") if isinstance(value, Mapping) else None
        rows = value.get("Values") if isinstance(value, Mapping) else None
        if not isinstance(columns, list) or not isinstance(rows, list) or not all(
            isinstance(r, list) for r in rows
        ):
            raise errors.PermanentError(f"RRS answer: output {name!r} is not a table",
                                        code="BadResponse")
        out[str(name)] = Table(columns=[_cell(c) for c in columns],
                               rows=[[_cell(v) for v in r] for r in rows])
    return out


def table_text(table: Table, ext: str) -> bytes:
    """The table as the result file's bytes: header then rows (CRLF, as BES writes them)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=DELIMITERS.get(ext, ","), lineterminator="\r\n")
    writer.writerow(table.columns)
    writer.writerows(table.rows)
    return buf.getvalue().encode("utf-8")


# ---- the backend ----------------------------------------------------------------------------


class RrsBackend:
    """One RRS service. Same key handling, throttle gate, errors and metrics as BES (it is the
    same web service's other endpoint, reached through the same client)."""

    kind = "rrs"
    noun = "RRS request"
    code_prefix = "Rrs"

    def __init__(self, service: config.RrsService, session: aiohttp.ClientSession) -> None:
        self.name: str = service.name
        self.service = service
        self.outputs: Mapping[str, str] = dict(service.outputs)
        self.max_rows = service.max_rows
        self.max_bytes = service.max_bytes
        self._url = service.execute_url
        self.client = client_mod.BesClient(
            service, session, gate=throttle.ServiceGate(),
            service_url=self._url.removesuffix("/execute"), execute_url=self._url)
        for name, ext in self.outputs.items():
            if ext not in DELIMITERS:
                raise errors.ConfigError(f"services.{self.name}.outputs.{name}",
                                         f"RRS results are tables: use {' or '.join(DELIMITERS)}")

    def _read(self, job: jobs.Job) -> Table:
        """Blocking: the spooled input, checked against the limits, as a table."""
        path = Path(job.input_path)
        try:
            size = os.stat(path).st_size
            refusal = too_large(name=job.input_name, rows=None, size=size,
                                max_rows=self.max_rows, max_bytes=self.max_bytes)
            if refusal:
                raise errors.PermanentError(refusal, code="TooLargeForRrs")
            data = path.read_bytes()
        except OSError as exc:
            raise errors.PermanentError(f"cannot read input {job.input_name!r}: {exc.strerror}",
                                        code="InputUnreadable") from None
        table = parse_csv(data, job.input_name)
        refusal = too_large(name=job.input_name, rows=len(table.rows), size=len(data),
                            max_rows=self.max_rows, max_bytes=self.max_bytes)
        if refusal:
            raise errors.PermanentError(refusal, code="TooLargeForRrs")
        return table

    async def prepare_input(self, job: jobs.Job) -> str:
        table = await asyncio.to_thread(self._read, job)
        return f"{len(table.rows)} rows fit the RRS limits (nothing to upload)"

    async def submit(self, job: jobs.Job, *, maybe_submitted: bool) -> base.Submitted:
        del maybe_submitted  # nothing remote is created: the call happens at status
        return base.Submitted(remote_id=f"rrs-{job.id}", status=STATUS_READY,
                              message="RRS request prepared; it runs at the first status check")

    async def start(self, job: jobs.Job, *, maybe_started: bool) -> str:
        del job, maybe_started
        return "RRS request: nothing to start"

    async def status(self, job: jobs.Job) -> base.Report:
        table = await asyncio.to_thread(self._read, job)
        body = execute_body(table, self.service.input_name, self.service.global_parameters)
        try:
            answer = await self.client.execute(body)
        except errors.PermanentError as exc:
            if exc.status == 400:  # the service refused the input: the job failed, as in BES
                return base.Report(phase=base.Phase.FAILED, status=STATUS_FAILED,
                                   details=str(exc))
            if exc.status == 413:  # within our limits, yet too large for the service
                raise errors.PermanentError(
                    f"{exc}; the request is too large for RRS: lower max_rows/max_bytes,"
                    ' or use kind = "bes" for this file', code=exc.code, status=413) from None
            raise
        tables = parse_answer(answer)
        missing = [n for n in self.outputs if n not in tables]
        if missing:
            raise errors.PermanentError(
                f"RRS answer has no output {', '.join(missing)} (it has:"
                f" {', '.join(tables) or 'none'})", code="NoResults")
        results = {n: RrsResult(public_url=f"{self._url}#{n}", table=tables[n])
                   for n in self.outputs}
        return base.Report(phase=base.Phase.FINISHED, status=STATUS_FINISHED, results=results)

    async def cancel(self, remote_id: str) -> None:
        """A request-response call cannot be cancelled; nothing runs between calls."""

    def open_result(self, ref: base.ResultRef
                    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        if not isinstance(ref, RrsResult):
            raise errors.PermanentError("not an RRS result", code="BadResult")
        name = ref.public_url.rsplit("#", 1)[-1]
        return _chunks(table_text(ref.table, self.outputs.get(name, ".csv")))

    async def cleanup(self, job: jobs.Job) -> None:
        """Nothing was stored."""

    async def close(self) -> None:
        """The session is shared."""


@contextlib.asynccontextmanager
async def _chunks(data: bytes) -> AsyncIterator[AsyncIterator[bytes]]:
    async def gen() -> AsyncIterator[bytes]:
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start:start + CHUNK_BYTES]

    yield gen()
