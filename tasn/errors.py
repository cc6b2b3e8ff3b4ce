"""User-facing errors: the CLI prints the message (which names the file or value) and exits 1."""

from __future__ import annotations


class TASNError(Exception):
    """A failure the user can act on: bad input, bad config, an unreachable server."""

    exit_code = 1


class DataError(TASNError):
    """The dataset on disk is wrong: the message names each offending file and the rule broken."""


class ServiceError(TASNError):
    """A server (MLflow, S3, Kubeflow) could not be reached or refused the request."""


class ConfigError(TASNError, ValueError):
    """A configuration value, key or file is wrong; the message names it (and the file and line)."""


class RegistryError(TASNError):
    """A registry request names something that is not there or not allowed (version, alias, tag)."""
