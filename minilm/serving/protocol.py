"""The request bodies (pydantic: types are checked before any handler runs) and the OpenAI error
shape every failure is reported in: {"error": {"message", "type", "param", "code"}}.

Fields follow the OpenAI completions API as vLLM serves it, with vLLM's extras (ignore_eos,
logprobs_mode, return_token_ids). The sampler fields are derived from SamplerSettings: one field per
knob, of the same name (OpenAI's, vLLM's and llama.cpp's names already are the knob names), typed by
its kind; ranges are checked by SamplerSettings itself, a bad value being a 400 naming the field. A
field sent as null takes its default, as in vLLM. Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, create_model

from minilm.errors import SettingError
from minilm.sampling.settings import SamplerSettings, knobs, settings_from_user
from minilm.sampling.stack import SamplerStack
from minilm.tokenizer import Tokenizer

MAX_TOP_N = 100  # tokens a /v1/distribution table may show
MAX_TOKENS_LIMIT = 4096  # --max_tokens_limit's default: the most tokens one choice may ask for
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed accepts
JSON_FLOOR = -9999.0  # a log-probability of -inf is reported as this (as vLLM: JSON has no -inf)

# How a sampler field's type is described when a value of the wrong type comes in, per kind of
# knob (the union types: pydantic reports one error per alternative).
KIND_TYPE_NAMES = {
    "token_bias": 'an object mapping token ids ("5" or "id:5") or single-token texts ("text:5") to '
                  'numbers in [-100, 100]',
    "order": '"default", "llama.cpp" or a list of stage names',
    "prompt": "a text or a list of token ids",
}
TYPE_NAMES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    **{k.name: KIND_TYPE_NAMES[k.kind] for k in knobs() if k.kind in KIND_TYPE_NAMES},
}


def _not_bool(value: Any) -> Any:
    """JSON true/false is not a number (pydantic's lax mode would take it as 1/0)."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
Float = Annotated[float, BeforeValidator(_not_bool)]


class APIError(Exception):
    """An error answered in OpenAI's shape with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """pydantic's errors (FastAPI's RequestValidationError) as one 400 naming the first field."""
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    if not loc:
        return bad_request(f"the request body must be a JSON object ({err['msg']})")
    param = loc[0]
    if err.get("type") == "missing":
        return bad_request(f"{param} is required", param)
    if param in TYPE_NAMES and len(errors) > 1:  # a union: one error per alternative
        return bad_request(f"{param} must be {TYPE_NAMES[param]}, got {_short(err.get('input'))}",
                           param)
    message = err["msg"].removeprefix("Value error, ")
    return bad_request(f"{'.'.join(loc)}: {message}, got {_short(err.get('input'))}", param)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# A sampler knob's JSON type, per kind.
JSON_TYPES: dict[str, Any] = {
    "number": Float, "integer": Int, "choice": Int, "token_bias": dict[str, Float],
    "texts": list[str], "order": str | list[str], "prompt": str | list[Int]}


class _SamplerMethods(_Body):
    def settings(self, encode=None) -> SamplerSettings:
        """The request's SamplerSettings (a field left out or null: the knob's default); a bad
        value is a 400 naming its field."""
        values = {k.name: getattr(self, k.name) for k in knobs()}
        values = {name: value for name, value in values.items() if value is not None}
        try:
            return settings_from_user(values, encode)
        except SettingError as e:
            raise bad_request(str(e), e.param) from None

    def sampler(self, vocab_size: int, tokenizer: Tokenizer) -> SamplerStack:
        """The stack, through SamplerStack.from_settings (the CLI's path too); a bad setting is a
        400 naming it."""
        settings = self.settings(tokenizer.encode)
        try:
            return SamplerStack.from_settings(settings, tokenizer=tokenizer, vocab_size=vocab_size)
        except SettingError as e:
            raise bad_request(str(e), e.param) from None

    def bias(self, encode) -> list[int]:
        """The token ids the settings single out (the logit-biased ones: OpenAI's token-id keys,
        and minilm's "id:5" and "text:5")."""
        return self.settings(encode).named_tokens()


# What the sampler stack is built from: shared by /v1/completions and /v1/distribution. One field
# per SamplerSettings knob, None (absent or null) meaning the knob's default.
SamplerFields = create_model(
    "SamplerFields", __base__=_SamplerMethods,
    **{k.name: (JSON_TYPES[k.kind] | None, None) for k in knobs()})


class StreamOptions(_Body):
    include_usage: bool | None = False


class CompletionRequest(SamplerFields):
    model: str | None = None
    prompt: str | list[str] | list[Int] | list[list[Int]]
    max_tokens: Int | None = 16
    n: Int | None = 1
    stop: str | list[str] | None = None
    seed: Int | None = None
    logprobs: Int | None = None
    echo: bool | None = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    best_of: Int | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM: keep going past the end-of-text token
    logprobs_mode: Literal["raw", "processed", "raw_logprobs", "processed_logprobs"] | None = "raw"
    return_token_ids: bool | None = False  # vLLM: token ids beside the text
    prompt_logprobs: Int | None = None  # vLLM: the prompt tokens' log-probabilities (top N)


class DistributionRequest(SamplerFields):
    model: str | None = None
    prompt: str | list[Int]
    top_n: Int | None = 20


def finite(logprob: float) -> float:
    """A log-probability fit for JSON: -inf (a removed token) becomes JSON_FLOOR."""
    return logprob if logprob >= JSON_FLOOR else JSON_FLOOR  # NaN too: comparisons are False
