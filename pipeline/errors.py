"""UserError: the base of every error a command reports as a plain message with exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a missing prerequisite; the message names what is wrong and what to do about it."""
