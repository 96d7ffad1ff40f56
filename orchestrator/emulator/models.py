"""The web services' models: a small registry, name -> model (never loaded by import path).

A model turns the byte stream of its first input into the byte stream of its output, chunk by
chunk, so a large file never sits whole in memory. `ModelError` carries a message a person can
act on; it becomes the job's `Details`.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Protocol

from orchestrator.emulator import hashing

#: Bytes of output gathered before they are handed on as one chunk.
OUTPUT_CHUNK_BYTES = 256 * 1024


class ModelError(Exception):
    """The input or the parameters cannot be scored; the message is the job's Details."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Table:
    """A request-response (RRS) table."""

    columns: list[str]
    types: list[str]
    values: list[list[str]]


class Model(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> tuple[str, ...]:
        """Global parameters the model understands (listed in swagger.json by default)."""

    def check_parameters(self, params: Mapping[str, str]) -> str | None:
        """A message if a global parameter value is unusable, else None."""

    def transform(
        self, chunks: AsyncIterator[bytes], params: Mapping[str, str], *,
        input_name: str, in_ext: str, out_ext: str,
    ) -> AsyncIterator[bytes]:
        """The output stream for the input stream."""

    def score_table(self, table: Table, params: Mapping[str, str], *, input_name: str) -> Table:
        """The RRS form: rows in, rows out."""


def _delimiter(ext: str) -> str:
    return "\t" if ext.lower() == ".tsv" else ","


class _Feeder:
    """An iterator for csv.reader that can run dry and be refilled: it is only ever given
    whole records, so the reader never stops inside one."""

    def __init__(self) -> None:
        self.records: deque[str] = deque()

    def __iter__(self) -> _Feeder:
        return self

    def __next__(self) -> str:
        if not self.records:
            raise StopIteration
        return self.records.popleft()


class _RecordSplitter:
    """Cuts decoded text into whole CSV records: a line ends a record only when the quotes
    seen so far in the record are balanced (a quoted field may hold newlines)."""

    def __init__(self) -> None:
        self._tail = ""
        self._record: list[str] = []
        self._open = False

    def feed(self, text: str, *, final: bool = False) -> list[str]:
        text = self._tail + text
        if final:
            self._tail = ""
        else:
            cut = text.rfind("\n") + 1
            self._tail = text[cut:]
            text = text[:cut]
        done: list[str] = []
        for line in text.splitlines(keepends=True):
            self._record.append(line)
            if line.count('"') % 2:
                self._open = not self._open
            if not self._open:
                done.append("".join(self._record))
                self._record.clear()
        if final and self._record:
            done.append("".join(self._record))  # unbalanced quote: csv reports it
            self._record.clear()
        return done


async def read_rows(chunks: AsyncIterator[bytes], *, input_name: str, delimiter: str
                    ) -> AsyncIterator[list[list[str]]]:
    """Batches of parsed rows (the header first) from a UTF-8 (BOM tolerated) CSV stream."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    splitter = _RecordSplitter()
    feeder = _Feeder()
    reader = csv.reader(feeder, delimiter=delimiter, strict=True)
    final = False
    iterator = aiter(chunks)
    while not final:
        try:
            chunk = await anext(iterator)
        except StopAsyncIteration:
            chunk, final = b"", True
        try:
            text = decoder.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            raise ModelError(
                f"{input_name} is not UTF-8 text (bad byte at offset {exc.start} of a chunk); "
                "save the file as UTF-8 CSV"
            ) from None
        feeder.records.extend(splitter.feed(text, final=final))
        try:
            rows = [row for row in reader if row]
        except csv.Error as exc:
            raise ModelError(
                f"{input_name} is not valid CSV near line {reader.line_num}: {exc}"
            ) from None
        if rows:
            yield rows


class _Writer:
    def __init__(self, delimiter: str) -> None:
        self._buf = io.StringIO()
        self._csv = csv.writer(self._buf, delimiter=delimiter, lineterminator="\r\n")

    def write(self, row: Sequence[object]) -> None:
        self._csv.writerow(row)

    def take(self, *, force: bool = False) -> bytes | None:
        if self._buf.tell() < OUTPUT_CHUNK_BYTES and not (force and self._buf.tell()):
            return None
        data = self._buf.getvalue().encode("utf-8")
        self._buf.seek(0)
        self._buf.truncate()
        return data


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HashingParams:
    column: str
    bits: int
    ngrams: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureHashing:
    """Azure ML's Feature Hashing module: keeps the input columns, appends the features."""

    name: str = "feature_hashing"
    column: str = "Col2"
    bits: int = 3
    ngrams: int = 2
    parameters: tuple[str, ...] = ("Hashing bitsize", "N-grams", "Target column")

    def _params(self, params: Mapping[str, str]) -> _HashingParams:
        def number(key: str, default: int, high: int) -> int:
            raw = params.get(key)
            if raw is None or str(raw).strip() == "":
                return default
            try:
                value = int(str(raw).strip())
            except ValueError:
                raise ModelError(f"Global parameter '{key}' must be a whole number, "
                                 f"got {raw!r}") from None
            if not 1 <= value <= high:
                raise ModelError(f"Global parameter '{key}' must be 1..{high}, got {value}")
            return value

        column = str(params.get("Target column") or self.column)
        return _HashingParams(
            column=column,
            bits=number("Hashing bitsize", self.bits, hashing.MAX_BITS),
            ngrams=number("N-grams", self.ngrams, hashing.MAX_NGRAMS),
        )

    def check_parameters(self, params: Mapping[str, str]) -> str | None:
        try:
            self._params(params)
        except ModelError as exc:
            return str(exc)
        return None

    @staticmethod
    def _column_index(header: list[str], column: str, input_name: str) -> int:
        try:
            return header.index(column)
        except ValueError:
            raise ModelError(
                f"Column '{column}' not found in {input_name}; columns are: "
                + ", ".join(header)
            ) from None

    def _hashed(self, header: list[str], rows: Iterator[list[str]], p: _HashingParams,
                input_name: str, first_line: int) -> Iterator[list[object]]:
        index = self._column_index(header, p.column, input_name)
        width = len(header)
        for n, row in enumerate(rows, start=first_line):
            if len(row) > width:
                raise ModelError(f"{input_name} row {n} has {len(row)} fields but the header "
                                 f"has {width}")
            row = row + [""] * (width - len(row))
            yield [*row, *hashing.feature_counts(row[index], bits=p.bits, ngrams=p.ngrams)]

    async def transform(
        self, chunks: AsyncIterator[bytes], params: Mapping[str, str], *,
        input_name: str, in_ext: str, out_ext: str,
    ) -> AsyncIterator[bytes]:
        p = self._params(params)
        writer = _Writer(_delimiter(out_ext))
        header: list[str] | None = None
        done_rows = 0
        async for batch in read_rows(chunks, input_name=input_name,
                                     delimiter=_delimiter(in_ext)):
            rows = iter(batch)
            if header is None:
                header = next(rows)
                self._column_index(header, p.column, input_name)
                writer.write([*header, *hashing.feature_names(p.column, bits=p.bits)])
            for out in self._hashed(header, rows, p, input_name, done_rows + 1):
                writer.write(out)
                done_rows += 1
            data = writer.take()
            if data:
                yield data
        if header is None:
            raise ModelError(f"{input_name} is empty: expected a header row with a column "
                             f"'{p.column}'")
        data = writer.take(force=True)
        if data:
            yield data

    def score_table(self, table: Table, params: Mapping[str, str], *, input_name: str) -> Table:
        p = self._params(params)
        values = [[str(v) for v in row]
                  for row in self._hashed(table.columns, iter(table.values), p, input_name, 1)]
        names = hashing.feature_names(p.column, bits=p.bits)
        return Table(columns=[*table.columns, *names],
                     types=[*table.types, *(["Int32"] * len(names))], values=values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Identity:
    """Copies its input to its output byte for byte."""

    name: str = "identity"
    parameters: tuple[str, ...] = ()

    def check_parameters(self, params: Mapping[str, str]) -> str | None:
        return None

    async def transform(
        self, chunks: AsyncIterator[bytes], params: Mapping[str, str], *,
        input_name: str, in_ext: str, out_ext: str,
    ) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    def score_table(self, table: Table, params: Mapping[str, str], *, input_name: str) -> Table:
        return table


#: Every model a service can be bound to (`--service NAME=MODEL`).
REGISTRY: dict[str, Model] = {
    "feature_hashing": FeatureHashing(),
    "identity": Identity(),
}
