"""What pyproject.toml can't say: the wheel's minilm/configs is the repository's configs/ folder,
so the configs exist once (top level, for users to copy) and ship as package data (found by
minilm.config.shipped_configs)."""
from pathlib import Path

from setuptools import find_namespace_packages, setup

# configs/ and each folder below it with configs: minilm.configs, minilm.configs.ablation, ...
config_packages = sorted({".".join(("minilm", *p.parent.parts))
                          for p in Path("configs").rglob("*.yaml")})
setup(
    packages=find_namespace_packages(include=["minilm", "minilm.*"]) + config_packages,
    package_dir={"minilm.configs": "configs"},
    package_data={**{package: ["*.yaml"] for package in config_packages},
                  "minilm.serving": ["static/*"]},  # the explorer page
)
