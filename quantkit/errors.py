"""User-facing errors: the CLI prints str(err) on one line and exits non-zero, never a traceback."""


class QuantkitError(Exception):
    """A user mistake or bad input. The message names the file/tensor/option and what was expected."""


class UnsupportedArchitecture(QuantkitError):
    pass


class BadInput(QuantkitError):
    pass
