"""What `glimpse.load` returns for a vlm run: `VisionLanguagePipeline` (glimpse/infer/vision_language.py,
shared with the video LLaVA family)."""

from glimpse.infer.vision_language import VisionLanguagePipeline

__all__ = ["VisionLanguagePipeline"]
