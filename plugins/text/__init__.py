"""Text teachers, students and methods (ImitKD and baselines)."""
