"""One exception type for every input problem the user can fix.

The command line prints its message as a single line; library users catch it.
Messages name the file or tensor at fault and what to do about it.
"""


class MoeLoraError(Exception):
    """A problem with user input (files, configs, arguments), with a fix in its message."""
