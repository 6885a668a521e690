"""Text data: embedded translation and summarization corpora, metrics."""
