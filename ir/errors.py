"""The root of every error mlxc reports to a user.

It sits in `ir` because `ir` is the bottom layer that every other package may import; the CLI catches
`MlxcError` and prints its message alone, without a traceback.
"""


class MlxcError(Exception):
    """A problem with the user's input or request, described well enough to fix without a traceback."""


class VerifyError(MlxcError):
    """The program breaks an IR rule; the message names the function and the op."""


class ParseError(MlxcError):
    """The IR text is malformed; the message gives the line and column."""


class TypeRuleError(Exception):
    """Raised by an op's type rule; the verifier or builder adds the op's location."""
