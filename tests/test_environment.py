"""The pins the suite is tested with agree across pyproject, the lock file and the conda environment."""

import tomllib

import yaml

from conftest import REPO


def lock_pins():
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_torch_is_pinned_to_the_cpu_build_on_disk():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert lock_pins()["torch"] == "2.13.0"


def test_conda_environment_uses_the_lock_file_versions():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = lock_pins()
    for requirement in pip_section:
        name, version = requirement.split("==")
        assert pins[name.lower()] == version, requirement
    assert {"torch", "monai", "nibabel", "pandas", "scipy", "statsmodels", "matplotlib"} <= {
        r.split("==")[0] for r in pip_section}


def test_lock_file_holds_the_test_tools_and_snakemake():
    pins = lock_pins()
    assert pins["snakemake"].startswith("9.") and "pytest" in pins and "pytest-benchmark" in pins
