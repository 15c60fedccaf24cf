"""The vlm family's model: `VisionLanguageModel` (a part, glimpse/models/vlm.py, which the video LLaVA
family builds on too)."""

from glimpse.models.vlm import VisionLanguageModel, VLMConfig

__all__ = ["VisionLanguageModel", "VLMConfig"]
