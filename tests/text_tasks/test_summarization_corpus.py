"""The docstring corpus builder: the same corpus whether the files are parsed in one process or several."""
from __future__ import annotations

import itertools

from kd_tasks.text.summarization_data import STDLIB, collect_pairs, docstring_pair, source_files


def test_parallel_parsing_gives_the_same_corpus_in_the_same_order() -> None:
    files = list(itertools.islice((f for f in source_files(STDLIB) if f.unit in {
        f"{STDLIB}/email", f"{STDLIB}/json", f"{STDLIB}/logging", f"{STDLIB}/argparse", f"{STDLIB}/textwrap"}), 200))
    assert len(files) > 10
    serial = collect_pairs(files, workers=1)
    parallel = collect_pairs(files, workers=2)
    assert serial.records and serial.records == parallel.records
    assert serial.counts == parallel.counts


def test_docstring_pair_is_first_sentence_and_body() -> None:
    summary, document = docstring_pair("Return the sum of two numbers.\n\nBoth numbers may be ints or floats; the "
                                       "result has the wider type.\n\nArgs:\n    a: first\n")  # type: ignore[misc]
    assert summary == "Return the sum of two numbers."
    assert document.startswith("Both numbers may be ints or floats") and "Args" not in document
