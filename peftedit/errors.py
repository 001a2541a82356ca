"""The errors peftedit raises for user mistakes; the CLI prints each as one line."""


class PeftEditError(ValueError):
    """Bad input or an impossible request: the message names the bad value and what to do."""


class ArtifactError(PeftEditError):
    """An edit folder that is missing, incomplete, tampered, of another format or for another model."""


class NumericalError(PeftEditError):
    """A loss became NaN or infinite; the message says which stage and what to try."""


class RenderDiverged(NumericalError):
    """A render whose latents or decoded picture are NaN or infinite, raised once its work is all done (a benchmark
    on random weights measures it all the same)."""


def one_line(err: BaseException) -> str:
    """An error's message with its whitespace collapsed onto one line (its type's name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): for third-party errors, whose
    messages can run to many lines."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# How running out of memory reads: torch's CUDA and MPS errors, its CPU allocator's, cuBLAS' and cuDNN's.
OUT_OF_MEMORY_SIGNS = ("out of memory", "can't allocate memory", "not enough memory", "ALLOC_FAILED")


def out_of_memory(err: BaseException, advice: str) -> str | None:
    """A one-line message for an out-of-memory error (torch's ``OutOfMemoryError``, a RuntimeError that says so,
    Python's MemoryError) ending in ``advice``; None for any other error."""
    text = one_line(err)
    found = isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
    if not (found or any(sign in text for sign in OUT_OF_MEMORY_SIGNS)):
        return None
    said = ". ".join(text.split(". ")[:2]).rstrip(".")  # torch's: "CUDA out of memory. Tried to allocate 2.00 GiB"
    return f"out of memory ({shorten(said, 200)}); {advice}"


def shorten(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
