"""Deployment tests: container image, Helm chart, production-stack values, load tests."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
