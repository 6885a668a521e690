"""Embedded summarization corpus: docstrings of installed Python packages.

For every module, class and function docstring found by parsing the packages'
source files with :mod:`ast` (nothing is imported), the *summary* is the
docstring's first sentence and the *document* is the text that follows it,
cleaned of markup. The standard library, torch, transformers and a few other
packages that kd's dependencies install are used; packages that are not
installed are skipped and the manifest records which versions were read.

Cleaning (docs/data.md has the reasons): the docstring is cut at its first
structured section (``Args:``, ``Parameters``/``-----``, ``Returns``,
``Examples``, ``:param x:`` field lists, …); doctest examples, fenced and
literal code blocks, reST directives and deeply indented lines are removed;
inline markup is reduced to its text (``:class:`~a.B``` -> ``B``, ````x```` ->
``x``, ``[text](url)`` -> ``text``, ``<Tip>`` tags and bare URLs dropped).
Pairs are then filtered by length and form, deduplicated by document, and split
*by package* (a stdlib top-level module or a third-party distribution is one
package) so that test documents come from packages never seen in training.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import platform
import re
import sys
import sysconfig
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcore.config import default_cache_dir
from kdcore.errors import KDUserError
from kdcore.progress import track

from .corpus import CleanRecords, Corpus, dedup_key, letter_fraction, normalize_space, split_rank
from .manifest import cached_corpus

log = logging.getLogger(__name__)

BUILDER_VERSION = "docstrings/1"
STDLIB = "stdlib"
DEFAULT_PACKAGES: tuple[str, ...] = (
    STDLIB, "torch", "transformers", "numpy", "sympy", "networkx", "jinja2", "pydantic", "huggingface_hub",
    "tokenizers", "nltk", "matplotlib", "click", "rich", "pygments", "yaml", "sacrebleu", "pluggy", "tqdm")
# Stdlib parts that are test suites, demos or GUI code rather than library documentation.
_STDLIB_SKIP = frozenset({"test", "idlelib", "lib2to3", "turtledemo", "tkinter", "ensurepip", "site-packages",
                          "__phello__", "this", "antigravity"})
_SKIP_DIRS = frozenset({"test", "tests", "testing", "_vendor", "vendored", "__pycache__", "benchmarks", "examples"})

MIN_SUMMARY_WORDS = 4
MAX_SUMMARY_WORDS = 60
MIN_DOCUMENT_WORDS = 20
MAX_DOCUMENT_WORDS = 400
MIN_LETTER_FRACTION = 0.6

# --------------------------------------------------------------------------------- markup cleaning

# Headers after which a docstring holds parameter lists, examples or references, not prose.
_SECTION_NAMES = (r"args|arguments|parameters|params|other parameters|keyword args|keyword arguments|kwargs|"
                  r"returns?|yields?|raises|raise|exceptions?|warns|examples?|see also|references?|notes?|"
                  r"attributes|methods|inputs?|outputs?|shape|usage|todo|warnings?|versionadded|"
                  r"versionchanged|deprecated|type|rtype")
_SECTION_COLON = re.compile(rf"^\s*(?:{_SECTION_NAMES})\s*:\s*$", re.IGNORECASE)
_SECTION_PLAIN = re.compile(rf"^\s*(?:{_SECTION_NAMES})\s*$", re.IGNORECASE)
_UNDERLINE = re.compile(r"^\s*([-=~^*+#])\1{2,}\s*$")
_FIELD = re.compile(r"^\s*:[A-Za-z_][\w ]*(?:\s+[^:]+)?:(?:\s|$)")
_DIRECTIVE = re.compile(r"^\s*\.\.\s+[\w:-]+::")
_FENCE = re.compile(r"^\s*(```|~~~)")
_DOCTEST = re.compile(r"^\s*(>>>|\.\.\.\s)")
_ROLE = re.compile(r":(?:[\w-]+:)*[\w-]+:`([^`]+)`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`__?")
_DOUBLE_BACKTICK = re.compile(r"``([^`]+)``")
_BACKTICK = re.compile(r"`([^`]+)`_{0,2}")
_MD_LINK = re.compile(r"\[([^\[\]]+)\]\([^)]*\)")
_MD_REF = re.compile(r"\[([^\[\]]+)\]")
_STRONG = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")
_HTML_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_URL = re.compile(r"https?://\S+|www\.\S+")
# Sentence end: .!? then space and an upper-case letter, digit or opening quote/bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_ABBREVIATION_END = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|Dr|Mr|Mrs|No|approx|resp|incl)|\b[A-Za-z])\.$")


def _role_text(match: re.Match[str]) -> str:
    """Text of a reST role: ``a <b>`` -> ``a``; ``~x.y.Z`` -> ``Z``; ``!x`` -> ``x``."""
    text = match.group(1).strip()
    link = re.match(r"(.+?)\s*<[^>]*>$", text)
    if link:
        return link.group(1)
    text = text.lstrip("!")
    if text.startswith("~"):
        return text[1:].rsplit(".", 1)[-1]
    return text.lstrip(".")


def strip_inline_markup(text: str) -> str:
    """Inline reST/Sphinx/Markdown markup reduced to its text; HTML tags and URLs removed."""
    text = _ROLE.sub(_role_text, text)
    text = _RST_LINK.sub(r"\1", text)
    text = _DOUBLE_BACKTICK.sub(r"\1", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _BACKTICK.sub(lambda match: match.group(1).lstrip("~"), text)
    # transformers writes [`Trainer`] and [`~utils.Foo`]: after the backticks go, keep the name.
    text = _MD_REF.sub(lambda match: match.group(1).lstrip("~").rsplit(".", 1)[-1]
                       if re.fullmatch(r"~?[\w.]+", match.group(1)) else match.group(0), text)
    text = _STRONG.sub(lambda match: match.group(1) or match.group(2), text)
    text = _HTML_TAG.sub(" ", text)
    text = _URL.sub("", text)
    return normalize_space(text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def prose_paragraphs(docstring: str) -> list[str]:
    """The prose paragraphs of a cleaned (``inspect.cleandoc``-ed) docstring, each as one line of plain text."""
    lines = docstring.expandtabs().splitlines()
    kept: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if (_SECTION_COLON.match(line) or _FIELD.match(line)
                or (_SECTION_PLAIN.match(line) and _UNDERLINE.match(following))):
            break  # everything from the first structured section on is parameters/examples
        if _FENCE.match(line):
            index += 1
            while index < len(lines) and not _FENCE.match(lines[index]):
                index += 1
            index += 1
            continue
        if _DOCTEST.match(line):
            # A doctest runs until the next blank line (its expected output included).
            while index < len(lines) and lines[index].strip():
                index += 1
            continue
        if _DIRECTIVE.match(line):
            base = _indent(line)
            index += 1
            while index < len(lines) and (not lines[index].strip() or _indent(lines[index]) > base):
                index += 1
            continue
        if _UNDERLINE.match(line):  # a section underline we did not stop at (a titled prose section)
            if kept:
                kept.pop()  # its title
            index += 1
            continue
        if _indent(line) >= 4:
            index += 1  # literal blocks, continuation of parameter lists: code, not prose
            continue
        kept.append(line)
        index += 1
    text = "\n".join(kept).replace("::\n", ":\n")
    paragraphs = [strip_inline_markup(block) for block in re.split(r"\n\s*\n", text)]
    return [paragraph for paragraph in paragraphs if paragraph]


def split_first_sentence(paragraph: str) -> tuple[str, str]:
    """``(first sentence, rest)`` of a paragraph; abbreviations such as "e.g." do not end a sentence."""
    for match in _SENTENCE_END.finditer(paragraph):
        candidate = paragraph[:match.start()]
        if not _ABBREVIATION_END.search(candidate):
            return candidate.strip(), paragraph[match.end():].strip()
    return paragraph.strip(), ""


def docstring_pair(docstring: str) -> tuple[str, str] | None:
    """``(summary, document)`` of one docstring, or None when it has no prose."""
    paragraphs = prose_paragraphs(docstring)
    if not paragraphs:
        return None
    summary, rest_of_first = split_first_sentence(paragraphs[0])
    document = " ".join(part for part in [rest_of_first, *paragraphs[1:]] if part)
    return summary, document


def rejection_reason(summary: str, document: str) -> str | None:
    """Why a pair is dropped (a filter name counted in the manifest), or None to keep it."""
    if not document:
        return "no_body"
    if not summary.endswith((".", "!", "?")) or summary.endswith(("..", ":.")):
        return "summary_not_a_sentence"
    summary_words, document_words = len(summary.split()), len(document.split())
    if summary_words < MIN_SUMMARY_WORDS:
        return "summary_too_short"
    if summary_words > MAX_SUMMARY_WORDS:
        return "summary_too_long"
    if document_words < MIN_DOCUMENT_WORDS:
        return "document_too_short"
    if document_words > MAX_DOCUMENT_WORDS:
        return "document_too_long"
    if letter_fraction(summary) < MIN_LETTER_FRACTION or letter_fraction(document) < MIN_LETTER_FRACTION:
        return "few_letters"
    if dedup_key(summary) in dedup_key(document):
        return "summary_in_document"  # copying would score perfectly: not a summarization example
    return None


# ------------------------------------------------------------------------------------ source files


@dataclass(frozen=True)
class SourceFile:
    """One file to read: its split ``unit`` (package), owning ``package`` and paths."""

    unit: str
    package: str
    path: Path
    relative: str


def package_version(package: str) -> str | None:
    """Installed version of an import name (``stdlib`` -> the Python version); None when not installed."""
    if package == STDLIB:
        return platform.python_version()
    if importlib.util.find_spec(package) is None:
        return None
    distributions = importlib.metadata.packages_distributions().get(package, [])
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def source_files(package: str) -> Iterator[SourceFile]:
    """The ``.py`` files of an import name (or of the standard library), tests and vendored code excluded.

    ``importlib.util.find_spec`` only locates a top-level package; it does not run its code.
    """
    if package == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        for module in sorted(sys.stdlib_module_names):
            if module in _STDLIB_SKIP or module.startswith("_"):
                continue
            if (root / module).is_dir():
                for path in sorted((root / module).rglob("*.py")):
                    if not _SKIP_DIRS & set(path.relative_to(root).parts[:-1]):
                        yield SourceFile(f"{STDLIB}/{module}", STDLIB, path, str(path.relative_to(root)))
            elif (root / f"{module}.py").is_file():
                yield SourceFile(f"{STDLIB}/{module}", STDLIB, root / f"{module}.py", f"{module}.py")
        return
    spec = importlib.util.find_spec(package)
    if spec is None:
        return
    if spec.submodule_search_locations:
        for location in sorted(spec.submodule_search_locations):
            base = Path(location)
            for path in sorted(base.rglob("*.py")):
                if not _SKIP_DIRS & set(path.relative_to(base).parts[:-1]):
                    yield SourceFile(package, package, path, f"{package}/{path.relative_to(base)}")
    elif spec.origin and spec.origin.endswith(".py"):
        yield SourceFile(package, package, Path(spec.origin), Path(spec.origin).name)


def file_docstrings(path: Path) -> Iterator[tuple[str, int, str]]:
    """``(qualified name, line, docstring)`` of the module and every class/function in a file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError, UnicodeDecodeError) as error:
        log.debug("Skipping %s: %s", path, error)
        return
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        docstring = ast.get_docstring(node, clean=True) if isinstance(
            node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
        if docstring:
            yield prefix or "<module>", getattr(node, "lineno", 0), docstring
        for child in reversed(list(ast.iter_child_nodes(node))):
            name = getattr(child, "name", None)
            stack.append((child, f"{prefix}.{name}".lstrip(".") if name else prefix))


# ------------------------------------------------------------------------------------------ build


def file_pairs(source: SourceFile) -> FilePairs:
    """``(qualified name, line, (summary, document) or None, rejection reason or None)`` per docstring of a file."""
    pairs: FilePairs = []
    for qualified_name, line, docstring in file_docstrings(source.path):
        pair = docstring_pair(docstring)
        pairs.append((qualified_name, line, pair, "no_prose" if pair is None else rejection_reason(*pair)))
    return pairs


_PARSING = "summarization corpus: parsing docstrings"


def _parse_all(files: list[SourceFile], workers: int) -> list[FilePairs]:
    """The pairs of each file, in the order of ``files``, parsed by ``workers`` processes.

    Parsing ~68,000 docstrings is pure-Python and CPU-bound (45 s in one process, 22 s in two), so processes,
    not threads; ``map`` keeps the file order, so the corpus is the same for any number of workers.
    """
    if workers > 1 and len(files) > 1:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                return list(track(pool.map(file_pairs, files, chunksize=64), _PARSING, total=len(files), unit="file"))
        except (OSError, BrokenProcessPool) as error:  # no process support here (e.g. no /dev/shm)
            log.warning("Parsing the docstrings in one process (%d workers failed: %s).", workers, error)
    return [file_pairs(source) for source in track(files, _PARSING, unit="file")]


def collect_pairs(files: Iterable[SourceFile], workers: int = 1) -> CleanRecords:
    """Docstrings of ``files`` -> cleaned pairs, each dropped docstring counted under its reason.

    ``workers`` > 1 parses the files in that many processes; the result does not depend on it.
    """
    files = list(files)
    return _collect(zip(files, _parse_all(files, workers)))


def _collect(parsed: Iterable[tuple[SourceFile, FilePairs]]) -> CleanRecords:
    docstrings = 0
    dropped: dict[str, int] = {}
    seen_documents: set[str] = set()
    records: list[dict[str, str]] = []
    duplicates = 0
    for source, pairs in parsed:
        for qualified_name, line, pair, reason in pairs:
            docstrings += 1
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            summary, document = pair  # type: ignore[misc]
            key = dedup_key(document)
            if key in seen_documents:
                duplicates += 1  # e.g. transformers' "Copied from" docstrings: first one kept (files are sorted)
                continue
            seen_documents.add(key)
            records.append({"id": f"{source.relative}:{line}:{qualified_name}", "package": source.package,
                            "unit": source.unit, "summary": summary, "document": document})
    counts = {"docstrings": docstrings, "dropped": dict(sorted(dropped.items(), key=lambda item: -item[1])),
              "clean_pairs": len(records) + duplicates, "duplicate_documents": duplicates,
              "final_pairs": len(records)}
    return CleanRecords(records, counts)


def split_by_unit(records: Sequence[dict[str, str]], valid_size: int, test_size: int,
                  max_heldout_unit_fraction: float = 0.25) -> tuple[dict[str, list[dict[str, str]]], dict[str, Any]]:
    """Split so every package (unit) lies in one split only; return the splits and which units went where.

    Units are visited in the order of the sha256 of their name (deterministic, not
    alphabetical). A unit may go to test/valid only if it holds at most
    ``max_heldout_unit_fraction`` of that split's size, so no single package makes
    up a held-out set. The unit that fills a held-out split is truncated there and
    its remaining records are dropped (counted), never put into train.
    """
    by_unit: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_unit.setdefault(record["unit"], []).append(record)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "valid": [], "test": []}
    units: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    truncated = 0
    targets = {"test": test_size, "valid": valid_size}
    for unit in sorted(by_unit, key=split_rank):
        unit_records = sorted(by_unit[unit], key=lambda record: split_rank(record["id"]))
        destination = "train"
        for name in ("test", "valid"):
            if len(splits[name]) < targets[name] and len(unit_records) <= max_heldout_unit_fraction * targets[name]:
                destination = name
                break
        if destination != "train":
            room = targets[destination] - len(splits[destination])
            truncated += max(0, len(unit_records) - room)
            unit_records = unit_records[:room]
        splits[destination].extend(unit_records)
        units[destination].append(unit)
    for name, target in targets.items():
        if len(splits[name]) < target:
            raise KDUserError(
                f"Only {len(splits[name])} docstring pairs from small enough packages are left for the {name} split "
                f"(wanted {target}). Add packages (data.packages) or ask for a smaller {name} split.")
    splits["train"].sort(key=lambda record: split_rank(record["id"]))
    info = {"units": {name: len(names) for name, names in units.items()},
            "heldout_units": {"valid": units["valid"], "test": units["test"]},
            "truncated_heldout_records": truncated}
    return splits, info


def summarization_corpus_dir(cache_dir: Path, packages: Sequence[str] = DEFAULT_PACKAGES) -> Path:
    """Cache folder of the corpus; other package lists get their own folder so they never evict the default."""
    base = cache_dir / "data" / "summarization"
    if tuple(packages) == DEFAULT_PACKAGES:
        return base / "docstrings"
    key = hashlib.sha256("\0".join(packages).encode("utf-8")).hexdigest()[:12]
    return base / f"docstrings-{key}"


def load_summarization_corpus(cache_dir: str | Path | None = None, *,
                              packages: Sequence[str] = DEFAULT_PACKAGES, valid_size: int = 300,
                              test_size: int = 1000, force: bool = False) -> Corpus:
    """The docstring corpus, built at first use (tens of seconds) and then read from the cache.

    Records are ``{"id", "package", "unit", "summary", "document"}``. The cache is
    reused while its manifest matches the requested packages, their installed
    versions, this builder version and the split sizes; otherwise it is rebuilt.
    Packages that are not installed are skipped (their version is recorded as null).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    directory = summarization_corpus_dir(cache_dir, packages)
    versions = {package: package_version(package) for package in packages}
    if not any(versions.values()):
        raise KDUserError(f"None of the packages {list(packages)} is installed, so there are no docstrings to "
                          "build the summarization corpus from. Name installed packages in data.packages.")
    expected = {
        "builder": BUILDER_VERSION,
        "source": {"packages": versions, "python": platform.python_version(),
                   "license": "each package's own (PSF-2.0 for the standard library, BSD-3-Clause for torch, "
                              "Apache-2.0 for transformers, …)"},
        "params": {"valid_size": valid_size, "test_size": test_size, "min_summary_words": MIN_SUMMARY_WORDS,
                   "max_summary_words": MAX_SUMMARY_WORDS, "min_document_words": MIN_DOCUMENT_WORDS,
                   "max_document_words": MAX_DOCUMENT_WORDS},
    }
    splits, manifest = cached_corpus(directory, expected, lambda: build_summarization_corpus(expected),
                                     what="the docstring summarization corpus", force=force)
    log.info("Docstring summarization corpus in %s: %s", directory, manifest["splits"])
    return Corpus(splits["train"], splits["valid"], splits["test"], manifest, directory)


def build_summarization_corpus(expected: Mapping[str, Any]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Parse, clean, dedupe and split the docstrings: the splits and the counts (cached by the caller)."""
    started = time.perf_counter()
    packages = [name for name, version in expected["source"]["packages"].items() if version]
    files = (source for package in packages for source in source_files(package))
    corpus = collect_pairs(files, workers=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                           else (os.cpu_count() or 1))
    per_package: dict[str, int] = {}
    for record in corpus.records:
        per_package[record["package"]] = per_package.get(record["package"], 0) + 1
    params = expected["params"]
    splits, split_info = split_by_unit(corpus.records, params["valid_size"], params["test_size"])
    return splits, {"counts": {**corpus.counts, "per_package": per_package, **split_info},
                    "build_seconds": round(time.perf_counter() - started, 2)}
