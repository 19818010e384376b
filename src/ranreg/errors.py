"""Errors that the command line reports as one ``error: ...`` line with exit code 2."""


class RanregError(Exception):
    """A problem with the user's input (file, option, config) rather than a bug.

    The CLI prints ``error: <message>`` on stderr and exits with code 2; the message
    should name the file or option and say what is wrong with it.
    """
