"""Built-in kd methods (installed as ``kd_plugins``; the folder is ``plugins/``)."""
