"""Errors a user can act on. The command line prints their message alone, without a traceback."""

from __future__ import annotations


class FusionrankError(Exception):
    """Base class for an expected failure whose message tells the user what is wrong and what to do."""


class DataError(FusionrankError):
    """Input data is missing, altered, malformed or breaks the data contract."""


class ValidationFailed(FusionrankError):
    """The data validation suites found rows that break an expectation."""


class ConfigError(FusionrankError):
    """A setting is missing or has a value that cannot work."""


class RegistryError(FusionrankError):
    """The model registry refused an operation (unknown version, no previous champion, ...)."""


class ServiceUnavailable(FusionrankError):
    """An external service (online store, registry server, cluster) cannot be reached."""


class ContractViolation(FusionrankError):
    """A built Bento failed its contract check (golden requests, health, batched vs single scores)."""
