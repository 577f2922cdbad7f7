"""OFT-Control: orthogonal finetuning for spatially controlled text-to-image diffusion."""

from pathlib import Path

from omegaconf import OmegaConf

#: The repository root (the shipped toy backbone lives in ``assets/`` under it).
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# `${project_root:}` in configs: where the project's own assets are, wherever it is run from.
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
