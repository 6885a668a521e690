"""Speech teachers, students and methods (GenDistiller, DistilHuBERT)."""
