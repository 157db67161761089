"""pyproject.toml as setuptools reads it when building the package."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_reads_without_warnings(monkeypatch):
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)  # package discovery and the readme are relative to the project
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a deprecated field, such as `project.license` as a table
        distribution = pyprojecttoml.apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert distribution.metadata.license_expression == "Apache-2.0"
