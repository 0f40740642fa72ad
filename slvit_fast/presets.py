"""``slvit_fast.presets``: the public name of the backbone presets (``presets.build("resnet152")``).

The code lives in :mod:`slvit_fast.backbone_presets` (backbones, their branch points, building a
network with exits); the paper's per-branch exit settings live in :mod:`slvit_fast.exit_presets`.
"""

from .backbone_presets import *  # noqa: F401,F403  (re-exports the public names, see its __all__)
from .backbone_presets import __all__  # noqa: F401
