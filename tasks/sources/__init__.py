"""The registry of data sources: one ``Source`` record per name, looked up by the name the user gave.

A source string is ``<name>`` or ``<name>:<location>``; a source that
declares options also takes ``?key=value&...`` after its location (e.g.
``tfds:mnist?data_dir=/data/tfds&download=true``), each mirrored by the form
field ``<name>_<key>``. Adding a source means one module that builds a
``Source`` and one entry in ``SOURCES``; the form's choices, the CLI's help
and the error messages all come from here.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

from cluster.errors import UserError
from tasks.sources import cifar10, digits, folder, tfds
from tasks.sources.base import Materialised, Source, SourceSpec

__all__ = ["SOURCES", "Materialised", "Source", "SourceSpec", "check", "forms", "label", "materialise", "parse",
           "source_string", "stamp"]

SOURCES: dict[str, Source] = {s.name: s for s in (digits.SOURCE, cifar10.SOURCE, folder.SOURCE, tfds.SOURCE)}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def forms() -> str:
    """Every source's one-string form, for help texts and messages."""
    quoted = [f"'{s.form}'" for s in SOURCES.values()]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def _options(source: str, record: Source, query: str) -> dict[str, str | bool]:
    options: dict[str, str | bool] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        kind = record.options.get(key)
        if kind is None:
            raise UserError(f"--dataset {source!r}: {record.name} has no option {key!r}; "
                            f"it takes {', '.join(record.options)}.")
        if kind is bool and value.lower() not in _TRUE | _FALSE:
            raise UserError(f"--dataset {source!r}: {key}={value!r} is not a yes/no value; use {key}=true or false.")
        options[key] = value.lower() in _TRUE if kind is bool else value
    return options


def parse(source: str) -> SourceSpec:
    """Split a source string into its record's name, location and options, validating the syntax (no IO).

    Raises:
        UserError: for an unknown name, a missing or unexpected location, or a bad option.
    """
    kind, colon, rest = source.partition(":")
    record = SOURCES.get(kind)
    if record is None or record.needs_location != bool(colon) or (record.needs_location and not rest):
        raise UserError(f"--dataset {source!r} is not a known source; use {forms()}.")
    location, options = rest, {}
    if record.options and "?" in rest:
        location, _, query = rest.partition("?")
        options = _options(source, record, query)
    record.parse(location)
    return SourceSpec(text=source, kind=kind, location=location, options=options)


def source_string(kind: str, location: str = "", options: dict[str, str | bool | None] | None = None) -> str:
    """The inverse of ``parse``: options that are unset (None, empty, False) are left out."""
    text = f"{kind}:{location}" if location else kind
    given = [(key, "true" if value is True else str(value)) for key, value in (options or {}).items()
             if value not in (None, "", False)]
    return f"{text}?{urlencode(given, quote_via=quote, safe='/~:')}" if given else text


def check(source: str) -> None:
    """Parse, then the source's cheap up-front validation (before any server or cluster starts)."""
    spec = parse(source)
    SOURCES[spec.kind].check(spec)


def stamp(source: str) -> str:
    """The source's cheap fingerprint stamp, for the ingest cache key."""
    spec = parse(source)
    return SOURCES[spec.kind].stamp(spec)


def materialise(source: str, cache: Path) -> Materialised:
    """Class folders of ``source`` on local disk, under ``cache`` where they had to be made."""
    spec = parse(source)
    return SOURCES[spec.kind].materialise(spec, cache)


def label(spec: SourceSpec) -> str:
    """A short name for run names."""
    record = SOURCES[spec.kind]
    return record.label(spec) if record.label else spec.kind
