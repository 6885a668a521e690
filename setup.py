"""Maps the repository folders to distinct import names (see pyproject.toml).

folder ``plugins/`` -> ``kd_plugins``; folder ``tasks/`` -> ``kd_tasks``; folder ``kd/`` -> ``kd``
(``python -m kd``, so that ``torchrun -m kd run ...`` works).
"""
from setuptools import find_packages, setup

FOLDER_TO_IMPORT_NAME = {"kdcore": "kdcore", "plugins": "kd_plugins", "tasks": "kd_tasks", "kd": "kd"}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages: list[str] = []
    package_dir: dict[str, str] = {}
    for folder, import_name in FOLDER_TO_IMPORT_NAME.items():
        packages.append(import_name)
        package_dir[import_name] = folder
        for sub in find_packages(folder):
            packages.append(f"{import_name}.{sub}")
            package_dir[f"{import_name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
