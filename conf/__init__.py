"""The Hydra configs, installed as the package ``compress.conf`` (see pyproject.toml)."""
