"""The errors peftedit raises for user mistakes; the CLI prints each as one line."""


class PeftEditError(ValueError):
    """Bad input or an impossible request: the message names the bad value and what to do."""


class ArtifactError(PeftEditError):
    """An edit folder that is missing, incomplete, tampered, of another format or for another model."""


class NumericalError(PeftEditError):
    """A loss became NaN or infinite; the message says which stage and what to try."""
