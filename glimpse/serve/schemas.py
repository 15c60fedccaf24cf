"""The request bodies of the OpenAI-compatible API, as pydantic models: they validate every field
(type, range, size) before anything reaches a model, and they are the OpenAPI schema that clients
and the fuzz test read.  Unknown extra fields are ignored, as OpenAI clients send many."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TOKENS = 8192  # above any context glimpse trains; longer asks are refused before the context check
MAX_CHOICES = 8
MAX_MESSAGES = 64
MAX_TEXT = 100_000  # characters in one text part / message string
MAX_EMBED_INPUTS = 256
MAX_IMAGE_PROMPT = 1000  # characters of an image prompt (a text-to-image pipeline's own limit)
MAX_GENERATED_IMAGES = 8  # images per /v1/images/generations request
MAX_HISTORY = 200  # items in a /v1/recommendations history
MAX_RECOMMENDATIONS = 1000


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT)


class ImageURL(_Body):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Body):
    """vLLM's video content part: {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}."""
    type: Literal["video_url"]
    video_url: ImageURL


Part = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[Part], Field(min_length=1, max_length=64)]
    name: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1, max_length=64)]


class ChatCompletionRequest(_Body):
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


Text = Annotated[str, Field(max_length=MAX_TEXT)]


class EmbeddingRequest(_Body):
    model: str
    # strings; a string that is a `data:image/...` URL is embedded as an image (a glimpse extension)
    input: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


Option = Annotated[str, Field(max_length=64)]


class ImageGenerationRequest(_Body):
    model: str
    prompt: str = Field(min_length=1, max_length=MAX_IMAGE_PROMPT)
    n: int | None = Field(1, ge=1, le=MAX_GENERATED_IMAGES)  # null: 1, as OpenAI
    size: Option | None = None  # "SxS" for the model's image size S, or "auto" (checked against the model)
    response_format: Literal["b64_json", "url"] | None = None  # b64_json; url is refused with a reason
    output_format: Literal["png"] | None = None  # the images are PNGs
    stream: bool | None = None  # refused when true: images come whole
    quality: Option | None = None  # accepted and ignored
    style: Option | None = None  # accepted and ignored
    user: Annotated[str, Field(max_length=256)] | None = None  # accepted and ignored
    seed: int = Field(0, ge=0, le=2**63 - 1)  # a glimpse extension: the same seed, the same images


class RecommendationRequest(_Body):
    """POST /v1/recommendations (a glimpse extension): the top k items after a history (item ids, or new
    items as `data:image/...` URLs), or for a known user of the run's data."""
    model: str
    history: Annotated[list[Text], Field(min_length=1, max_length=MAX_HISTORY)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    k: int = Field(10, ge=1, le=MAX_RECOMMENDATIONS)


class ExplainRequest(_Body):
    """POST /v1/explain (a glimpse extension): where the model looked for an answer.  The chat's messages
    (one image); the answer explained is the last assistant message, or the one the model gives now when
    the messages end with the user's turn."""
    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    method: Literal["raw", "rollout", "gradcam", "chefer", "integrated_gradients", "chefer_ig", "occlusion"] = "chefer"
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
