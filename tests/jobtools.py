"""Helpers for tests that run real FLARE (thin aliases of fssl_covid.jobs, the one copy of this code)."""

from __future__ import annotations

from pathlib import Path

from fssl_covid.jobs import (  # noqa: F401
    JOBS, REPO as ROOT, customize_job, flare_env, job_training_config, run_simulator,
)


def small_job(name: str, dst: Path, rounds: int, config: dict, min_clients: int | None = None) -> Path:
    """Copy ``jobs/<name>`` to ``dst`` with ``rounds`` rounds and ``config`` merged into the training config."""
    return customize_job(name, dst, rounds=rounds, config=config, min_clients=min_clients)
