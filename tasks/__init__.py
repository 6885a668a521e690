"""Built-in kd tasks (installed as ``kd_tasks``; the folder is ``tasks/``)."""
