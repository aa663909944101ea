"""dpg: Dataset Policy Gradient. The pure torch + transformers core (no orchestration, tracking or storage)."""

from dpg.config import SFTConfig
from dpg.errors import DPGError
from dpg.metagrad import MetagradResult, metagradients
from dpg.models import load_causal_lm
from dpg.sft import train
from dpg.targets import TARGETS, Target, get_target

__all__ = ["DPGError", "MetagradResult", "SFTConfig", "TARGETS", "Target", "get_target", "load_causal_lm",
           "metagradients", "train"]
__version__ = "0.1.0"
