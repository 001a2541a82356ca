"""The errors peftedit raises for user mistakes; the CLI prints each as one line."""


class PeftEditError(ValueError):
    """Bad input or an impossible request: the message names the bad value and what to do."""


class ArtifactError(PeftEditError):
    """An edit folder that is missing, incomplete, tampered, of another format or for another model."""


class NumericalError(PeftEditError):
    """A loss became NaN or infinite; the message says which stage and what to try."""


def one_line(err: BaseException) -> str:
    """An error's message with its whitespace collapsed onto one line (its type's name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): for third-party errors, whose
    messages can run to many lines."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def out_of_memory(err: BaseException) -> str | None:
    """A one-line message with what to try for a device out-of-memory error (torch's ``OutOfMemoryError``, the MPS
    backend's RuntimeError, Python's MemoryError); None for any other error."""
    text = one_line(err)
    if not (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or "out of memory" in text):
        return None
    said = ". ".join(text.split(". ")[:2]).rstrip(".")  # torch's: "CUDA out of memory. Tried to allocate 2.00 GiB"
    return (
        f"out of memory ({said}); to lower the peak: the 8 GB recipes (--recipe sd15-8gb, nulltext-sd15-8gb), "
        "--set runtime.offload_idle=true, fewer other programs on the GPU"
    )
