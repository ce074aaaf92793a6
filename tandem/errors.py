"""Typed errors. Each names its cause and a fix; HTTP status and exit code live here, in one place."""

from __future__ import annotations


class TandemError(Exception):
    """Base error: `cause` says what went wrong, `fix` says what the user can do about it."""

    http_status: int = 500
    error_type: str = "server_error"
    exit_code: int = 1

    def __init__(self, cause: str, fix: str = "", *, param: str | None = None, code: str | None = None):
        self.cause = cause
        self.fix = fix
        self.param = param
        self.code = code
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return f"{self.cause}: {self.fix}" if self.fix else self.cause

    def to_openai(self) -> dict:
        """OpenAI's error body shape."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


def about_model(err: TandemError, role: str) -> TandemError:
    """The same error, its cause prefixed with which model it is about ("main model: ...", "draft model: ...")."""
    if not err.cause.startswith(role):  # "draft X cannot be used with ..." already says
        err.cause = f"{role} model: {err.cause}"
        err.args = (err.message,)
    return err


class BadInputError(TandemError):
    """The request or command line is invalid."""

    http_status = 400
    error_type = "invalid_request_error"
    exit_code = 2


class AuthError(TandemError):
    http_status = 401
    error_type = "authentication_error"
    exit_code = 2


class ModelNotFoundError(TandemError):
    """A model file or name that does not exist."""

    http_status = 404
    error_type = "not_found_error"
    exit_code = 2


class ForbiddenError(TandemError):
    """A request names something it may not use (a model file outside the models folder)."""

    http_status = 403
    error_type = "permission_error"
    exit_code = 2


class NotGGUFError(BadInputError):
    """A file that is not a GGUF model."""


class BodyTooLargeError(TandemError):
    http_status = 413
    error_type = "invalid_request_error"
    exit_code = 2


class IncompatibleDraftError(TandemError):
    """Draft and main model vocabularies differ."""

    http_status = 422
    error_type = "invalid_request_error"
    exit_code = 2


class ContextOverflowError(BadInputError):
    """The prompt does not fit the context."""


class LoadingError(TandemError):
    """The server is still loading its models."""

    http_status = 503
    error_type = "server_error"


class BusyError(TandemError):
    """Too many requests are waiting for the engine (HTTP 503 with Retry-After)."""

    http_status = 503
    error_type = "server_error"
    retry_after = 1
    """Seconds a client should wait before retrying (the Retry-After header)."""


class DoesNotFitError(TandemError):
    """The memory plan says the model does not fit (HTTP 507 Insufficient Storage)."""

    http_status = 507
    error_type = "server_error"
    exit_code = 3


class EngineError(TandemError):
    """llama.cpp failed (allocation, decode)."""

    http_status = 500
    error_type = "server_error"
    exit_code = 1


class LoadFailedError(EngineError):
    """llama.cpp could not load a model or allocate its context."""


class CancelledError(TandemError):
    """The client went away; generation was stopped."""

    http_status = 499


class DownloadError(TandemError):
    """`tandem models pull` could not fetch or verify a model (the source is named in the cause)."""

    http_status = 502
    error_type = "server_error"
    exit_code = 1
