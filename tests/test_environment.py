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


def test_the_rules_conda_environment_pins_every_version_of_the_lock_file():
    env = yaml.safe_load((REPO / "workflow" / "envs" / "ssl3d.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert dict(requirement.lower().split("==") for requirement in pip_section) == lock_pins()
    rules = "".join(path.read_text() for path in (REPO / "workflow" / "rules").glob("*.smk"))
    assert rules.count('conda:\n        "../envs/ssl3d.yaml"') == rules.count("shell:")  # every shell rule uses it


def test_lock_file_holds_the_test_tools_and_snakemake():
    pins = lock_pins()
    assert pins["snakemake"].startswith("9.") and {"pytest", "pytest-benchmark", "pytest-xdist"} <= set(pins)
