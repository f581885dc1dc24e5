"""The engine's user-facing errors: each is caught once at the edge (CLI, web) and shown as one line."""


class UserError(ValueError):
    """A setting or input the user can fix; the message says how."""


class DatasetError(UserError):
    """A dataset cannot be found, read or is not what it claims to be."""


class ConfigError(UserError):
    """A combination of settings that cannot work (e.g. initial set larger than the pool)."""
