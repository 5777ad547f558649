"""Runners: how the service executes a model (see ``service.runners.base`` for the contract)."""

from service.runners.base import Runner, RunnerInfo, RunnerOutput, snap_to

__all__ = ["Runner", "RunnerInfo", "RunnerOutput", "snap_to"]
