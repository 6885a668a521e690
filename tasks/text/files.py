"""Reading a user's text data: plain-text pairs, TSV, CSV, JSONL, datasets saved to disk, sacrebleu test sets.

Every reader returns :class:`TextRecord` dicts ``{"id", "source", "target", "origin"}``
(``origin`` = ``file:line``, used in messages). Input problems are reported as
:class:`~kdcore.errors.KDUserError` naming the file and line: bytes that are not
UTF-8, parallel files of different lengths, malformed JSON or rows with missing
columns. Empty source or target lines are either an error (evaluation files: a
skipped line would misalign the references) or skipped, counted and logged
(training data), as the caller chooses.

The standard library's :mod:`csv` and :mod:`json` do the parsing; what is written
here is only the error reporting and the mapping of columns to source/target.
"""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcore.errors import KDUserError

from .data_config import SplitFiles

log = logging.getLogger(__name__)

TextRecord = dict[str, str]


@dataclass(frozen=True)
class Layout:
    """Which columns of a row hold the source and the target (``a.b`` reaches into nested dicts)."""

    name: str
    source: str
    target: str
    id: str | None = None


@dataclass
class ReadStats:
    """Rows read and rows skipped (by reason, with the first few ``file:line`` places)."""

    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, origin: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(origin)

    def log(self, what: str) -> None:
        for reason, count in self.skipped.items():
            log.warning("%s: skipped %d of %d rows (%s), e.g. %s.", what, count, self.rows, reason,
                        ", ".join(self.examples[reason]))


def _decode_error(path: Path, data: bytes, error: UnicodeDecodeError) -> KDUserError:
    line = data.count(b"\n", 0, error.start) + 1
    return KDUserError(f"{path}:{line}: the file is not valid UTF-8 ({error.reason} at byte {error.start}: "
                       f"{data[error.start:error.start + 4]!r}). Save it as UTF-8 text.")


def read_text(path: Path) -> str:
    """The whole file as text; a missing file or non-UTF-8 bytes are reported with the line number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KDUserError(f"Data file '{path}' does not exist.") from None
    except IsADirectoryError:
        raise KDUserError(f"Data file '{path}' is a directory; expected a text file.") from None
    try:
        return data.decode("utf-8-sig")  # -sig: a BOM written by some editors is not part of the first line
    except UnicodeDecodeError as error:
        raise _decode_error(path, data, error) from None


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file without line endings (a final newline does not add an empty line)."""
    text = read_text(path)
    if not text.strip():
        raise KDUserError(f"'{path}' is empty; expected one sentence per line.")
    return text.splitlines()


def read_parallel_lines(source_path: Path, reference_path: Path, *, empty: str = "error",
                        stats: ReadStats | None = None) -> list[TextRecord]:
    """Line i of ``source_path`` paired with line i of ``reference_path``.

    ``empty="error"`` rejects an empty line (naming file and line); ``"skip"`` drops the pair
    and counts it in ``stats``.
    """
    sources, references = read_lines(source_path), read_lines(reference_path)
    if len(sources) != len(references):
        raise KDUserError(f"'{source_path}' has {len(sources)} lines but '{reference_path}' has {len(references)}; "
                          f"a source file and its reference file need one line per sentence, in the same order.")
    stats = stats if stats is not None else ReadStats()
    records: list[TextRecord] = []
    for index, (source, reference) in enumerate(zip(sources, references), start=1):
        stats.rows += 1
        for path, text in ((source_path, source), (reference_path, reference)):
            if not text.strip():
                if empty == "error":
                    raise KDUserError(f"{path}:{index}: empty line. Every line must hold a sentence (its pair in the "
                                      f"other file is line {index} too); remove the pair from both files.")
        if not source.strip() or not reference.strip():
            stats.skip("empty line", f"{source_path}:{index}")
            continue
        records.append({"id": f"{source_path.name}:{index}", "source": source.strip(), "target": reference.strip(),
                        "origin": f"{source_path}:{index}"})
    return records


# --------------------------------------------------------------------------------------- row formats

#: File endings :func:`format_of` recognises, and the reader format each one means.
FORMAT_OF_SUFFIX = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}


def format_of(path: Path, declared: str) -> str:
    """``declared`` unless it is ``auto``; then ``dataset`` for a folder, else the format of the file ending."""
    if declared != "auto":
        return declared
    if path.is_dir():
        return "dataset"
    suffix = path.suffix.lower()
    if suffix not in FORMAT_OF_SUFFIX:
        raise KDUserError(f"Cannot tell the format of '{path}' from its extension '{suffix}'. Use .tsv, .csv, .jsonl "
                          f"or a dataset folder, or set data.format.")
    return FORMAT_OF_SUFFIX[suffix]



def read_tsv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a tab-separated file as ``{"0": col0, "1": col1, ...}`` (no header, no quoting)."""
    rows = []
    for index, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            rows.append((f"{path}:{index}", {}))
            continue
        columns = line.split("\t")
        rows.append((f"{path}:{index}", {str(i): value for i, value in enumerate(columns)}))
    return rows


def read_csv_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a CSV file with a header line (RFC 4180 quoting, via the csv module)."""
    text = read_text(path)
    reader = csv.DictReader(text.splitlines(keepends=True))
    if not reader.fieldnames:
        raise KDUserError(f"'{path}' has no header line; a CSV file needs column names on its first line.")
    try:
        return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]
    except csv.Error as error:
        raise KDUserError(f"{path}:{reader.line_num}: malformed CSV ({error}).") from None


def read_jsonl_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Objects of a JSON-lines file, one per non-empty line."""
    rows = []
    for index, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise KDUserError(f"{path}:{index}: not valid JSON ({error.msg} at column {error.colno}); a JSONL file "
                              f"holds one JSON object per line.") from None
        if not isinstance(value, dict):
            raise KDUserError(f"{path}:{index}: a JSON {type(value).__name__}, expected an object such as "
                              f'{{"source": "...", "target": "..."}}.')
        rows.append((f"{path}:{index}", value))
    return rows


def read_dataset_rows(path: Path, split: str | None) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a Hugging Face dataset saved with ``save_to_disk`` (needs the ``datasets`` package)."""
    try:
        import datasets
    except ImportError:
        raise KDUserError(f"'{path}' is read with datasets.load_from_disk, but the 'datasets' package is not "
                          f"installed. Install it (pip install datasets) or export the data as JSONL/TSV.") from None
    if not Path(path).is_dir():
        raise KDUserError(f"Dataset directory '{path}' does not exist (expected a folder written by "
                          f"Dataset.save_to_disk).")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as error:
        raise KDUserError(f"'{path}' is not a dataset saved with save_to_disk: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None or split not in loaded:
            raise KDUserError(f"'{path}' holds the splits {sorted(loaded)}; name one with the split key "
                              f"(got {split!r}).")
        loaded = loaded[split]
    return [(f"{path}[{split or ''}]#{index}", dict(row)) for index, row in enumerate(loaded)]


def _get(row: Mapping[str, Any], key: str) -> Any:
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def pick_layout(row: Mapping[str, Any], layouts: Sequence[Layout], origin: str) -> Layout:
    """The first layout whose source and target columns exist in ``row``."""
    for layout in layouts:
        if _get(row, layout.source) is not None and _get(row, layout.target) is not None:
            return layout
    described = "; ".join(f"{layout.name}: '{layout.source}' + '{layout.target}'" for layout in layouts)
    raise KDUserError(f"{origin}: the columns {sorted(row)} match none of the known layouts ({described}). Set "
                      f"data.source_field and data.target_field to the column names.")


def records_from_rows(rows: Iterable[tuple[str, Mapping[str, Any]]], layouts: Sequence[Layout], *,
                      prefix: str, stats: ReadStats) -> list[TextRecord]:
    """Map rows to records with the layout detected on the first row; empty or missing fields are skipped."""
    records: list[TextRecord] = []
    layout: Layout | None = None
    for number, (origin, row) in enumerate(rows):
        stats.rows += 1
        if not row:
            stats.skip("empty line", origin)
            continue
        layout = layout or pick_layout(row, layouts, origin)
        source, target = _get(row, layout.source), _get(row, layout.target)
        if isinstance(source, list) and layout.source == layout.target:
            # Chat records (a 'messages' list): the last message is the completion, the ones before it the prompt,
            # which the task renders with a chat template (kd_tasks.text.lm).
            reason = chat_rejection(source)
            if reason:
                stats.skip(reason, origin)
                continue
            identifier = _get(row, layout.id) if layout.id else None
            records.append({"id": f"{prefix}:{identifier if identifier is not None else number}", "source": "",
                            "target": " ".join(source[-1]["content"].split()), "origin": origin,
                            "messages": [{"role": m["role"], "content": m["content"]} for m in source[:-1]]})
            continue
        if not isinstance(source, str) or not isinstance(target, str):
            stats.skip(f"missing '{layout.source}' or '{layout.target}'", origin)
            continue
        if not source.strip() or not target.strip():
            stats.skip("empty source or target", origin)
            continue
        identifier = _get(row, layout.id) if layout.id else None
        records.append({"id": f"{prefix}:{identifier if identifier is not None else number}",
                        "source": " ".join(source.split()), "target": " ".join(target.split()), "origin": origin})
    return records


def chat_rejection(messages: list[Any]) -> str | None:
    """Why a chat record's ``messages`` cannot be a prompt + completion pair (None when they can): each message
    needs a string ``role`` and ``content``, the last one is the assistant's non-empty reply, and one comes before
    it."""
    if not all(isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in messages):
        return "a message without string 'role' and 'content'"
    if len(messages) < 2:
        return "fewer than two messages (a prompt and a reply)"
    if messages[-1]["role"] != "assistant":
        return "the last message is not the assistant's reply"
    if not messages[-1]["content"].strip():
        return "empty source or target"
    return None


def sacrebleu_test_set(name: str, langpair: str) -> list[TextRecord]:
    """A sacrebleu test set (e.g. ``wmt14``, ``en-de``) read from sacrebleu's local cache; never downloads."""
    from sacrebleu.dataset import DATASETS

    if name not in DATASETS:
        from kdcore.errors import did_you_mean

        raise KDUserError(f"data.sacrebleu_test_set '{name}' is not a sacrebleu test set.{did_you_mean(name, DATASETS)}")
    dataset = DATASETS[name]
    if langpair not in dataset.langpairs:
        raise KDUserError(f"sacrebleu test set '{name}' has no language pair '{langpair}'; it has "
                          f"{', '.join(sorted(k for k in dataset.langpairs if '-' in k))}.")
    # get_source_file()/get_files() would download a missing set, so the paths are computed the way
    # sacrebleu lays out its processed text files, and only read.
    fields = dataset.fieldnames(langpair)
    source_path = Path(dataset._get_txt_file_path(langpair, "src"))
    reference_paths = [Path(dataset._get_txt_file_path(langpair, name)) for name in fields if name.startswith("ref")]
    if not source_path.is_file() or not reference_paths or not reference_paths[0].is_file():
        raise KDUserError(f"The sacrebleu test set {name} ({langpair}) is not in sacrebleu's local cache "
                          f"({source_path.parent}); kd never downloads it. On a machine with internet run "
                          f"'sacrebleu -t {name} -l {langpair} --echo src > /dev/null' and copy the folder "
                          f"(or set $SACREBLEU to it).")
    return read_parallel_lines(source_path, reference_paths[0], empty="skip")


def configured_layouts(source_field: str | None, target_field: str | None,
                       detected: tuple[Layout, ...]) -> tuple[Layout, ...]:
    """The layout named by ``data.source_field``/``target_field`` when set, else the task's ``detected`` ones."""
    if source_field or target_field:
        if not (source_field and target_field):
            raise KDUserError("Set both data.source_field and data.target_field (or neither, to detect them).")
        return (Layout("data.source_field/target_field", source_field, target_field, "id"),)
    return detected


def read_split_files(name: str, files: SplitFiles, declared_format: str,
                     layouts: tuple[Layout, ...]) -> list[TextRecord]:
    """The records of split ``name`` from its files (``data.<name>.*``); skipped rows are counted and logged."""
    stats = ReadStats()
    if files.path is None:
        assert files.source is not None and files.reference is not None  # SplitFiles guarantees one origin
        records = read_parallel_lines(Path(files.source).expanduser(), Path(files.reference).expanduser(),
                                      empty="skip", stats=stats)
    else:
        path = Path(files.path).expanduser()
        if not path.exists():
            raise KDUserError(f"data.{name}.path '{path}' does not exist.")
        kind = format_of(path, declared_format)
        readers = {"tsv": read_tsv_rows, "csv": read_csv_rows, "jsonl": read_jsonl_rows}
        rows = read_dataset_rows(path, files.split or name) if kind == "dataset" else readers[kind](path)
        # A TSV file has no header: its first column is the source, its second the target.
        records = records_from_rows(rows, (Layout("tsv", "0", "1"),) if kind == "tsv" else layouts,
                                    prefix=f"{name}:{path.name}", stats=stats)
    stats.log(f"data.{name}")
    if not records:
        raise KDUserError(f"data.{name} holds no usable examples ({stats.rows} rows read, skipped: "
                          f"{stats.skipped or 'none'}).")
    return records


__all__ = ["FORMAT_OF_SUFFIX", "Layout", "ReadStats", "TextRecord", "configured_layouts", "format_of", "pick_layout",
           "chat_rejection", "read_csv_rows", "read_dataset_rows", "read_jsonl_rows", "read_lines", "read_parallel_lines",
           "read_split_files", "read_text", "read_tsv_rows", "records_from_rows", "sacrebleu_test_set"]
