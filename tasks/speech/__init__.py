"""Speech data: synthetic espeak-ng corpus, local corpora, audio I/O."""
