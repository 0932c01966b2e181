"""The base class of every error a user can fix: stages print its message in one line, without a traceback."""


class ChestctError(Exception):
    """Something the user can fix (a file, a folder, a parameter); the message names it and says what to do."""
