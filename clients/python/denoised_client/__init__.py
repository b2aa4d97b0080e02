"""Client for the denoised image server: sync and async clients for both generation endpoints,
streamed progress, raw image files, model listing, health, typed errors and retries. Speaks
HTTP only (httpx)."""

from denoised_client._core import DEFAULT_URL, NO_RETRY, RetryPolicy
from denoised_client.async_client import AsyncClient, AsyncGenerationStream
from denoised_client.client import Client, GenerationStream
from denoised_client.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    DeadlineExceededError,
    DenoisedError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitError,
    ServiceUnavailableError,
    StreamError,
)
from denoised_client.types import (
    GeneratedImage,
    Generation,
    GenerationFile,
    GenerationRequest,
    Model,
    ModelDefaults,
    Progress,
    Readiness,
    Timings,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_URL",
    "NO_RETRY",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AsyncClient",
    "AsyncGenerationStream",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "DeadlineExceededError",
    "DenoisedError",
    "GeneratedImage",
    "Generation",
    "GenerationFile",
    "GenerationRequest",
    "GenerationStream",
    "InternalServerError",
    "InvalidRequestError",
    "Model",
    "ModelDefaults",
    "NotFoundError",
    "PayloadTooLargeError",
    "Progress",
    "RateLimitError",
    "Readiness",
    "RetryPolicy",
    "ServiceUnavailableError",
    "StreamError",
    "Timings",
]
