"""Project exceptions. Messages name the offending path, key or value.

The CLI turns any :class:`VisionOpsError` into one red line and exit code 2; the API
turns it into a 4xx JSON body.
"""


class VisionOpsError(Exception):
    """Base class for errors caused by input a user can fix."""


class ConfigError(VisionOpsError):
    """A params file or override is invalid."""


class DataError(VisionOpsError):
    """A data file is missing, unreadable, altered or malformed."""


class DataValidationError(DataError):
    """The validate stage found problems; the message lists them."""


class ModelError(VisionOpsError):
    """A model cannot be built, loaded, exported or served."""


class RegistryError(VisionOpsError):
    """A registry operation is impossible (no such model, version or alias)."""
