"""Exit training: classifier-wise (frozen backbone), end-to-end, distillation, copycat, checkpoints."""

from ..checkpoint import load_exits, save_exits
from .copycat import CopycatMix, CopycatSampler, copycat_finetune, copycat_loader, label_with_network
from .feature_cache import FeatureCache, FeatureCacheError, FeatureCacheMismatchError
from .loop import History, evaluate_exits, train_exits
from .losses import Distillation

__all__ = [
    "train_exits", "evaluate_exits", "History", "Distillation", "FeatureCache", "FeatureCacheError", "FeatureCacheMismatchError", "save_exits", "load_exits",
    "label_with_network", "CopycatMix", "CopycatSampler", "copycat_loader", "copycat_finetune",
]
