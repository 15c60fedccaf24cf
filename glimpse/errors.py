"""User-facing errors: one clear line, never a traceback."""


class GlimpseError(Exception):
    """An error caused by the user's input (a file, a flag, a recipe); its message is shown as one line."""


class ContextLengthError(GlimpseError):
    """The prompt plus the tokens to generate do not fit the model's context."""
