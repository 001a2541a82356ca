"""peftedit: text-based editing of real photos with Stable Diffusion, saved as small safetensors edits.

Python API::

    from peftedit import Artifact, ImagicConfig, imagic, load_base, load_model
    model = load_model(None)                      # the demo model; or a hub id / folder / .safetensors
    edit = imagic.fit(model, "photo.png", "a photo of a sitting dog")
    edit.save("adapters/dog-sitting")
    image = imagic.render(model, Artifact.load("adapters/dog-sitting"), eta=0.7, seed=3)
    later = load_base(Artifact.load("adapters/dog-sitting"))  # the model it was made on, as `peftedit edit` loads it

    from peftedit import nulltext, p2p               # null-text inversion + Prompt-to-Prompt
    inversion = nulltext.invert(model, "cat.png", "a photo of a cat")
    tiger = nulltext.edit(model, inversion, "a photo of a tiger", p2p.Control(blend=["cat", "tiger"]))

    from peftedit import batch                       # many edits, the model loaded once; resumable
    items = batch.read_list("tedbench/input_list.json", images="tedbench/originals")
    batch.run(model, items, ImagicConfig(), out="adapters/tedbench")
"""

__version__ = "0.1.0"

from . import batch  # noqa: E402
from .artifacts import Artifact  # noqa: E402
from .base import load_base  # noqa: E402
from .config import RuntimeConfig, build  # noqa: E402
from .errors import ArtifactError, NumericalError, PeftEditError, RenderDiverged  # noqa: E402
from .methods import imagic, nulltext, p2p  # noqa: E402
from .methods.imagic import ImagicConfig  # noqa: E402
from .methods.nulltext import NullTextConfig  # noqa: E402
from .models import Model, load_model  # noqa: E402

load = Artifact.load

__all__ = [
    "Artifact",
    "ArtifactError",
    "ImagicConfig",
    "Model",
    "NullTextConfig",
    "NumericalError",
    "PeftEditError",
    "RenderDiverged",
    "RuntimeConfig",
    "batch",
    "build",
    "imagic",
    "load",
    "load_base",
    "load_model",
    "nulltext",
    "p2p",
]
