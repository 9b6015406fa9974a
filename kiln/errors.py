"""Named errors, one family per stage. Libraries raise them; the CLI prints them as one line."""


class KilnError(Exception):
    """Base of every error Kiln raises on purpose. `hint` is the command or fix to try next."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class ModelError(KilnError):
    """A model folder is missing, incomplete or of an unsupported kind."""


class DatasetError(KilnError):
    """A source folder or a filter's weights cannot be used."""


class ConfigError(KilnError):
    """A training or merge configuration is invalid; names the field, the value and the fix."""


class TrainingError(KilnError):
    """Training cannot start or continue (missing checkpoint, incompatible resume, ...)."""


class MergeError(KilnError):
    """Adapters cannot be fused into the base model."""


class ExportError(KilnError):
    """ONNX export failed or its inputs are unusable."""


class ParityError(ExportError):
    """An exported model disagrees with its source beyond the stated tolerance."""


class RepositoryError(KilnError):
    """A Triton model repository cannot be built from the given inputs."""


class ServeError(KilnError):
    """The embedded Triton server could not start, stop or become ready."""


class RequestError(KilnError):
    """A generation request has a field out of range; names the field, the value and the range."""

    def __init__(self, field: str, value, allowed: str):
        super().__init__(f"{field}={value!r} is invalid: expected {allowed}")
        self.field = field
        self.value = value
        self.allowed = allowed


class GenerationError(KilnError):
    """A generation went numerically wrong (NaN or inf): it fails rather than return a black image."""


class Cancelled(KilnError):
    """The client cancelled the request or its deadline passed: the generation stopped at a step boundary."""


class ClientError(KilnError):
    """The server could not be reached or answered with an error. `detail`: the server's own message;
    `rejected`: the server refused the request as invalid (HTTP 400, gRPC INVALID_ARGUMENT);
    `unreachable`: no server answered; `status`: the server's status code as its protocol names it
    ("503", "StatusCode.UNAVAILABLE")."""

    def __init__(self, message: str, hint: str | None = None, detail: str | None = None, rejected: bool = False,
                 unreachable: bool = False, status: str = ""):
        super().__init__(message, hint)
        self.detail = detail if detail is not None else message
        self.rejected, self.unreachable, self.status = rejected, unreachable, status


class QualityBarsMissed(KilnError):
    """Measured quality left a stated window (kiln eval's bars and gate): exit code 3, so that CI tells
    a model that got worse from a run that failed."""

    exit_code = 3
