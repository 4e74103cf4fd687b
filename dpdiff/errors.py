"""Errors a user can cause and fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (path, config value, data) with its fix in the message.

    The CLI prints ``dpdiff: error: <message>`` without a traceback and exits with code 2.
    """

    exit_code = 2
