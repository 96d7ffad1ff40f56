"""Names of blobs and local files. Pure: deterministic names make every step safe to repeat.

A blob name depends only on the job id and the input/output name, so an upload repeated after a
crash overwrites the same blob. Local names come from untrusted input file names and output
names, so every one is checked to stay inside its folder.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path, PurePosixPath, PureWindowsPath

from orchestrator import errors

#: Output blob names BES accepts (datasets and trained models). The one definition: config,
#: the BES wire format and the emulator use this.
OUTPUT_EXTENSIONS = (".csv", ".tsv", ".arff", ".ilearner")
#: Most file systems refuse longer names (bytes, not characters).
NAME_MAX_BYTES = 255
#: Suffix of the readable failure note written beside a failed input.
ERROR_SUFFIX = ".error.txt"
TEMP_SUFFIX = ".part"
#: The temp name adds a dot, a random tag and `.part`; keep room for them.
_TEMP_STEM_MAX_BYTES = NAME_MAX_BYTES - 24


def _check_component(value: str, what: str) -> str:
    """A single path component: no separators, no `..`, no NUL, not empty."""
    if (
        not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or "\0" in value
        or PureWindowsPath(value).drive
    ):
        raise errors.PermanentError(f"{what} {value!r:.80} is not a usable name", code="BadName")
    if len(value.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
        raise errors.PermanentError(f"{what} is longer than {NAME_MAX_BYTES} bytes",
                                    code="BadName")
    return value


def _check_ext(ext: str) -> str:
    if ext.lower() not in OUTPUT_EXTENSIONS:
        raise errors.PermanentError(
            f"output extension {ext!r:.20} is not one of {', '.join(OUTPUT_EXTENSIONS)}",
            code="BadName",
        )
    return ext.lower()


def input_blob_name(job_id: str, input_name: str, suffix: str) -> str:
    """`jobs/<job_id>/in/<input_name><suffix>`, e.g. jobs/3f…/in/input1.csv."""
    _check_component(job_id, "job id")
    _check_component(input_name, "input name")
    name = _check_component(f"{input_name}{suffix}", "input name")
    return f"jobs/{job_id}/in/{name}"


def output_blob_name(job_id: str, output_name: str, ext: str) -> str:
    """`jobs/<job_id>/out/<output_name><ext>`; the extension must be one BES accepts."""
    _check_component(job_id, "job id")
    _check_component(output_name, "output name")
    name = _check_component(f"{output_name}{_check_ext(ext)}", "output name")
    return f"jobs/{job_id}/out/{name}"


def result_file_name(input_file_name: str, output_name: str, ext: str) -> str:
    """`<input stem>.<output name><ext>`: data.csv + output1 → data.output1.csv."""
    _check_component(input_file_name, "input file name")
    _check_component(output_name, "output name")
    stem = PurePosixPath(input_file_name).stem or input_file_name
    tail = f".{output_name}{_check_ext(ext)}"
    return _check_component(fit(stem, tail) + tail, "result file name")


def error_file_name(input_name: str) -> str:
    """`<input name>.error.txt`, written beside the input in the failed folder."""
    _check_component(input_name, "input file name")
    return _check_component(fit(input_name, ERROR_SUFFIX) + ERROR_SUFFIX, "error file name")


def fit(stem: str, tail: str) -> str:
    """`stem`, cut (at a character boundary) so that `stem + tail` fits in NAME_MAX_BYTES:
    a 255-byte input name still gets its result and error files."""
    room = NAME_MAX_BYTES - len(tail.encode("utf-8", "surrogateescape"))
    encoded = stem.encode("utf-8", "surrogateescape")
    if len(encoded) <= room:
        return stem
    return encoded[:max(room, 0)].decode("utf-8", "ignore")


def safe_child(folder: Path, name: str) -> Path:
    """`folder / name`, refusing any name that could land outside `folder`."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        raise errors.PermanentError(f"{name!r:.80} is an absolute path", code="BadName")
    return folder / _check_component(name, "file name")


def _temp_prefix(final: Path) -> str:
    name = final.name
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > _TEMP_STEM_MAX_BYTES:
        name = encoded[:_TEMP_STEM_MAX_BYTES].decode("utf-8", "ignore")
    return f".{name}."


def temp_name(final: Path) -> Path:
    """A hidden, unique temporary name in the same folder (so the final rename is atomic),
    never longer than NAME_MAX_BYTES whatever the final name's length."""
    return final.with_name(f"{_temp_prefix(final)}{secrets.token_hex(6)}{TEMP_SUFFIX}")


def stale_temps(final: Path) -> list[Path]:
    """Temp files an earlier, killed attempt left for `final` (a SIGKILL skips every
    clean-up). Scans the folder: callers do it only when a job is being resumed."""
    prefix = _temp_prefix(final)
    try:
        with os.scandir(final.parent) as it:
            return [final.parent / e.name for e in it
                    if e.name.startswith(prefix) and e.name.endswith(TEMP_SUFFIX)
                    and len(e.name) == len(prefix) + 12 + len(TEMP_SUFFIX)]
    except FileNotFoundError:
        return []


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)
