"""Errors a user can fix. Scripts turn them into one line on stderr and a non-zero exit."""


class UserError(Exception):
    """Base for problems caused by input (a flag, a config, a file), not by a bug."""


class ConfigError(UserError, ValueError):
    """A config file or a flag value is wrong; the message says which and what is expected."""
