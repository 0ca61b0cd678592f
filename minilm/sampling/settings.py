"""The sampler settings: one dataclass is the single source of every knob of the sampler stack.

Each field is a knob: its default is the no-op value, and its metadata (``knob(...)``) holds its
range, its help, the stage it belongs to, generate.py's own default where nanoGPT's differs, and the
span of the explorer page's slider. The CLI's flags, the server's request fields and the page's
controls (``GET /v1/sampler_settings``, ``describe()``) are all generated from it, so a knob is
written once.

    s = SamplerSettings(temperature=0.8, top_k=50)  # checks itself: a SettingError naming the knob
    s.pipeline()                                    # the stages in use, in order
    SamplerStack.from_settings(s, tokenizer=tok)    # the processors (minilm.sampling.stack)

A stage with several knobs (DRY, XTC, Mirostat, classifier-free guidance) has one *switch* knob:
the stage runs when its switch is off its no-op value; its other knobs are parameters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable, Mapping, Sequence

from minilm.errors import SettingError

NEG_INF = float("-inf")
BAN = -100.0  # a logit bias of -100 (or less) bans the token, as in the OpenAI API
ID_KEY, TEXT_KEY = "id:", "text:"  # explicit logit_bias keys: "id:5" token id 5, "text:5" the text
MAX_BREAKER_CHARS = 40  # llama.cpp cuts a DRY sequence breaker there; minilm refuses longer ones

# The kinds of knob, and how each is written in JSON (the server's request model reads these).
KINDS = ("number", "integer", "choice", "token_bias", "texts", "order", "prompt")

# The stage orders. "default" is HF generate's and vLLM's (penalties, temperature, then the
# filters, HF's warper order for the ones HF has); classifier-free guidance first (HF's processor
# #1), Mirostat last (it selects the token; its state update reads the drawn token's probability
# under its own truncation). "llama.cpp" is llama.cpp's default chain (common/common.h: penalties,
# dry, top_n_sigma, top_k, typical, top_p, min_p, xtc, temperature) after the logit bias, which
# common_sampler_init adds before the chain; HF's stages sit before XTC, where they would filter.
# With Mirostat on, llama.cpp runs logit bias → temperature → mirostat only (see pipeline()).
ORDERS: dict[str, tuple[str, ...]] = {
    "default": ("guidance", "logit_bias", "repetition_penalty", "presence_penalty",
                "frequency_penalty", "dry", "temperature", "top_n_sigma", "top_h", "top_k", "top_p",
                "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "xtc", "mirostat"),
    "llama.cpp": ("guidance", "logit_bias", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p",
                  "top_h", "epsilon_cutoff", "eta_cutoff", "xtc", "temperature", "mirostat"),
}
FIRST_STAGE, LAST_STAGE = "guidance", "mirostat"  # where any order must put them
LLAMA_CPP_MIROSTAT = ("guidance", "logit_bias", "temperature", "mirostat")


@dataclass(frozen=True)
class Knob:
    """One knob's description (built from a field's ``knob(...)`` metadata; see ``knobs()``)."""
    name: str
    kind: str
    default: Any
    help: str
    stage: str | None         # None for order, which ranks the stages
    switch: bool              # the knob that turns its stage on (single-knob stages: itself)
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    off_at_most: float | None = None  # the stage is off for values <= this; else off at default
    cli_default: Any = None           # generate.py's default, where it is not `default`
    ui: Mapping[str, float] | None = None  # the page's slider: {"min", "max", "step"}

    def is_on(self, value: Any) -> bool:
        """Whether ``value`` of this switch knob turns its stage on."""
        if self.off_at_most is not None:
            return value > self.off_at_most
        return value != self.default

    def interval(self) -> str:
        return (f"{'(' if self.lo_open else '['}{_num(self.lo)}, "
                f"{_num(self.hi)}{')' if self.hi_open or self.hi == math.inf else ']'}")


def knob(default: Any, help: str, *, kind: str = "number", lo: float = -math.inf,
         hi: float = math.inf, lo_open: bool = False, hi_open: bool = False,
         choices: tuple = (), stage: str | None = None, switch: bool = True,
         off_at_most: float | None = None, cli_default: Any = None,
         ui: Mapping[str, float] | None = None) -> Any:
    """A dataclass field that is a sampler knob: ``default`` is its no-op value; ``stage`` the
    stage it belongs to (its own name if None); ``switch=False`` for a parameter of a multi-knob
    stage; ``off_at_most`` when every value up to it is off (top_k's -1 and 0)."""
    if kind not in KINDS:
        raise ValueError(f"unknown knob kind {kind!r}")
    meta = dict(kind=kind, help=help, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open,
                choices=choices, stage=stage, switch=switch, off_at_most=off_at_most,
                cli_default=cli_default, ui=ui)
    return field(default=default, metadata={"knob": meta})


@dataclass(frozen=True)
class SamplerSettings:
    """Every sampler knob, at its no-op value by default (so ``SamplerSettings()`` samples the raw
    model distribution). Validated on construction: a bad value is one SettingError naming it.
    Sequences are stored as tuples, so settings compare equal when they sample alike."""

    guidance_scale: float = knob(
        1.0, "classifier-free guidance: logits = uncond + s·(cond − uncond) over log-softmaxes, "
        "as HF's UnbatchedClassifierFreeGuidanceLogitsProcessor; 1 = off",
        stage="guidance", ui=dict(min=-1, max=5, step=0.1))
    negative_prompt: str | tuple[int, ...] | None = knob(
        None, "the unconditional context of guidance (text or token ids); default: the prompt's "
        "last token, as HF", kind="prompt", stage="guidance", switch=False)
    logit_bias: Mapping[int, float] | None = knob(
        None, "{token id: bias} added to the logits; -100 (or -inf) bans the token, as OpenAI",
        kind="token_bias")
    repetition_penalty: float = knob(
        1.0, "CTRL's penalty on every token of prompt + output: z > 0 → z/θ, else z·θ; 1 = off",
        lo=0.0, lo_open=True, ui=dict(min=0.5, max=2, step=0.01))
    presence_penalty: float = knob(
        0.0, "OpenAI's: z −= a for every token generated so far", lo=-2.0, hi=2.0,
        ui=dict(min=-2, max=2, step=0.05))
    frequency_penalty: float = knob(
        0.0, "OpenAI's: z −= a·count for every token generated so far", lo=-2.0, hi=2.0,
        ui=dict(min=-2, max=2, step=0.05))
    dry_multiplier: float = knob(
        0.0, "DRY (llama.cpp): a token extending a repeat of length L ≥ allowed_length gets "
        "z −= multiplier·base^(L − allowed_length); 0 = off", lo=0.0, stage="dry",
        ui=dict(min=0, max=3, step=0.05))
    dry_base: float = knob(1.75, "DRY's base (≥ 1)", lo=1.0, stage="dry", switch=False,
                           ui=dict(min=1, max=4, step=0.05))
    dry_allowed_length: int = knob(2, "DRY: repeats shorter than this go unpenalised",
                                   kind="integer", lo=1, stage="dry", switch=False,
                                   ui=dict(min=1, max=10, step=1))
    dry_penalty_last_n: int = knob(
        -1, "DRY looks back this many tokens (-1 = the whole history, 0 = none)", kind="integer",
        lo=-1, stage="dry", switch=False, ui=dict(min=-1, max=1024, step=1))
    dry_sequence_breakers: tuple[str, ...] = knob(
        ("\n", ":", "\"", "*"), "DRY: texts that end a repeat (a token containing one breaks "
        "it; as llama.cpp)", kind="texts", stage="dry", switch=False)
    temperature: float = knob(1.0, "z / t; 0 = greedy", lo=0.0, cli_default=0.8,
                              ui=dict(min=0, max=2, step=0.01))
    top_n_sigma: float = knob(
        0.0, "keep z ≥ max − n·σ of the kept logits (Tang et al. 2024, llama.cpp); ≤ 0 = off",
        off_at_most=0.0, ui=dict(min=0, max=5, step=0.05))
    top_h: float = knob(
        0.0, "Top-H (HF's TopHLogitsWarper): the top-100 prefix whose entropy stays within "
        "τ·H; 0 = off (1 still caps at 100 tokens)", lo=0.0, hi=1.0,
        ui=dict(min=0, max=1, step=0.01))
    top_k: int = knob(0, "keep the k most likely tokens (ties kept); 0 or -1 = off",
                      kind="integer", lo=-1, off_at_most=0, cli_default=200,
                      ui=dict(min=0, max=100, step=1))
    top_p: float = knob(1.0, "nucleus: the most likely tokens up to probability p; 1 = off",
                        lo=0.0, hi=1.0, lo_open=True, ui=dict(min=0.01, max=1, step=0.01))
    min_p: float = knob(0.0, "drop tokens less likely than p × the top one; 0 = off", lo=0.0,
                        hi=1.0, ui=dict(min=0, max=1, step=0.01))
    typical_p: float = knob(1.0, "locally typical sampling; 1 = off", lo=0.0, hi=1.0,
                            lo_open=True, ui=dict(min=0.01, max=1, step=0.01))
    epsilon_cutoff: float = knob(
        0.0, "drop tokens of probability < ε, never the top one (HF); 0 = off", lo=0.0, hi=1.0,
        hi_open=True, ui=dict(min=0, max=0.01, step=0.0001))
    eta_cutoff: float = knob(
        0.0, "drop tokens of probability < min(ε, √ε·e^−H) (HF's eta sampling); 0 = off",
        lo=0.0, hi=1.0, hi_open=True, ui=dict(min=0, max=0.01, step=0.0001))
    xtc_probability: float = knob(
        0.0, "XTC (llama.cpp): with this probability per token, drop every token of probability "
        "≥ threshold but the least likely of them; 0 = off", lo=0.0, hi=1.0, stage="xtc",
        ui=dict(min=0, max=1, step=0.01))
    xtc_threshold: float = knob(0.1, "XTC's threshold (above 0.5 it never acts)", lo=0.0,
                                hi=1.0, stage="xtc", switch=False,
                                ui=dict(min=0, max=0.5, step=0.01))
    mirostat: int = knob(0, "2 = Mirostat 2.0 (Basu et al. 2021, llama.cpp's); 0 = off",
                         kind="choice", choices=(0, 2))
    mirostat_tau: float = knob(5.0, "Mirostat's target surprise, in bits", lo=0.0,
                               stage="mirostat", switch=False, ui=dict(min=0, max=10, step=0.1))
    mirostat_eta: float = knob(0.1, "Mirostat's learning rate", lo=0.0, stage="mirostat",
                               switch=False, ui=dict(min=0, max=1, step=0.01))
    order: str | tuple[str, ...] = knob(
        "default", f"the stage order: {' | '.join(ORDERS)} or a list of stage names",
        kind="order", switch=False)

    def __post_init__(self):
        for k in knobs():
            object.__setattr__(self, k.name, check_knob(k.name, getattr(self, k.name)))
        self._check_order_fits()

    def stages_in_use(self) -> list[str]:
        """The stages whose switch knob is on, in the default order."""
        on = {k.stage for k in knobs() if k.switch and k.is_on(getattr(self, k.name))}
        return [name for name in ORDERS["default"] if name in on]

    def pipeline(self) -> list[str]:
        """The stages in use, in the order they run. With the "llama.cpp" order and Mirostat on,
        llama.cpp's own chain: logit bias → temperature → mirostat, the other stages left out,
        as common_sampler_init does (the stack's repr and --show_distribution show them)."""
        used = self.stages_in_use()
        order = ORDERS[self.order] if isinstance(self.order, str) else self.order
        if self.order == "llama.cpp" and LAST_STAGE in used:
            order = LLAMA_CPP_MIROSTAT
        return [name for name in order if name in used]

    def named_tokens(self) -> list[int]:
        """The token ids these settings single out (the logit-biased ones): what a next-token
        table shows beside the most likely tokens."""
        return sorted(self.logit_bias or {})

    def _check_order_fits(self) -> None:
        """A list order must name every stage in use, guidance first and mirostat last."""
        if isinstance(self.order, str):
            return
        used = self.stages_in_use()
        missing = [n for n in used if n not in self.order]
        if missing:
            raise SettingError("order", f"order leaves out the stage(s) in use {missing}")
        ranked = [n for n in self.order if n in used]
        for stage, at, where in ((FIRST_STAGE, 0, "first"), (LAST_STAGE, -1, "last")):
            if stage in ranked and ranked[at] != stage:
                raise SettingError("order", f"{stage} must come {where} in order, got "
                                            f"{list(self.order)}")


@cache
def knobs() -> tuple[Knob, ...]:
    """Every knob of SamplerSettings, in field order (``order`` too: a knob of no stage)."""
    out = []
    for f in dataclasses.fields(SamplerSettings):
        if "knob" in f.metadata:
            meta = dict(f.metadata["knob"])
            meta["stage"] = meta["stage"] or (f.name if meta["switch"] else None)
            out.append(Knob(name=f.name, default=f.default, **meta))
    return tuple(out)


def knob_named(name: str) -> Knob:
    return next(k for k in knobs() if k.name == name)


def check_knob(name: str, value: Any) -> Any:
    """``value`` checked against knob ``name``'s kind and range, normalised (floats as float,
    sequences as tuples); else a SettingError naming the knob. The processors check their
    arguments with it too, so a range is written once."""
    k = knob_named(name)
    return _CHECKS[k.kind](k, value)


def _check_number(k: Knob, value: Any) -> float:
    ok = _is_real(value) and math.isfinite(value)
    v = float(value) if ok else math.nan
    if not ((k.lo < v if k.lo_open else k.lo <= v) and (v < k.hi if k.hi_open else v <= k.hi)):
        raise SettingError(k.name, f"{k.name} must be in {k.interval()}, got {value!r}")
    return v


def _check_integer(k: Knob, value: Any) -> int:
    if not (_is_int(value) and k.lo <= value <= k.hi):
        limits = f">= {_num(k.lo)}" if k.hi == math.inf else f"in {k.interval()}"
        off = f" ({_num(k.off_at_most)} or less = off)" if k.off_at_most is not None else ""
        raise SettingError(k.name, f"{k.name} must be an integer {limits}{off}, got {value!r}")
    return int(value)


def _check_choice(k: Knob, value: Any) -> int:
    if not (_is_int(value) and value in k.choices):
        raise SettingError(k.name, f"{k.name} must be one of {list(k.choices)} ({k.help}), "
                                   f"got {value!r}")
    return int(value)


def _check_token_bias(k: Knob, value: Any) -> dict[int, float] | None:
    if value is None or (isinstance(value, Mapping) and not value):
        return None
    if not isinstance(value, Mapping):
        raise SettingError(k.name, f"{k.name} must be a mapping of token ids to biases, "
                                   f"got {value!r}")
    for key, bias in value.items():
        if not _is_int(key):
            raise SettingError(k.name, f"{k.name} keys must be integer token ids, got {key!r}")
        if key < 0:
            raise SettingError(k.name, f"{k.name} key {key} is outside the vocabulary")
        if not (_is_real(bias) and not math.isnan(bias) and bias != math.inf):
            raise SettingError(k.name, f"{k.name} value for token {key} must be finite or -inf, "
                                       f"got {bias!r}")
    return {int(key): float(bias) for key, bias in value.items()}


def _check_texts(k: Knob, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence) or not value \
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_BREAKER_CHARS for s in value):
        raise SettingError(k.name, f"{k.name} must be a non-empty list of non-empty strings of at "
                                   f"most {MAX_BREAKER_CHARS} characters, got {value!r}")
    return tuple(value)


def _check_prompt(k: Knob, value: Any) -> str | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if not isinstance(value, str) and isinstance(value, Sequence) and value \
            and all(_is_int(t) and t >= 0 for t in value):
        return tuple(int(t) for t in value)
    raise SettingError(k.name, f"{k.name} must be a non-empty text or list of token ids, "
                               f"got {value!r}")


def _check_order(k: Knob, value: Any) -> str | tuple[str, ...]:
    """A preset name, or a list of distinct stage names (normalised to a tuple)."""
    if isinstance(value, str) and value in ORDERS:
        return value
    if isinstance(value, str) or not isinstance(value, Sequence) \
            or not all(isinstance(n, str) for n in value):
        raise SettingError(k.name, f"{k.name} must be one of {list(ORDERS)} or a list of stage "
                                   f"names, got {value!r}")
    names, allowed = tuple(value), ORDERS["default"]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SettingError(k.name, f"unknown stage name(s) {unknown} in {k.name}; allowed: "
                                   f"{list(allowed)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SettingError(k.name, f"stage name(s) {repeated} appear more than once in {k.name}")
    return names


_CHECKS: dict[str, Callable[[Knob, Any], Any]] = {
    "number": _check_number, "integer": _check_integer, "choice": _check_choice,
    "token_bias": _check_token_bias, "texts": _check_texts, "order": _check_order,
    "prompt": _check_prompt}


def prompt_ids(value: str | Sequence[int], encode: Callable[[str], list[int]] | None,
               vocab_size: int, name: str = "negative_prompt") -> list[int]:
    """A prompt knob's value (text or ids) as token ids in [0, vocab_size); else a SettingError."""
    if isinstance(value, str):
        if encode is None:
            raise SettingError(name, f"{name} is a text and there is no tokenizer to encode it")
        try:
            ids = list(encode(value))
        except ValueError as e:
            raise SettingError(name, f"{name}: {e}") from None
    else:
        ids = list(value)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad or not ids:
        raise SettingError(name, f"{name} must be token ids in [0, {vocab_size - 1}], got "
                                 f"{bad[:3] or ids}")
    return ids


# ------------------------------------------------------------------------------------------------------
# user forms: what the CLI and the API send


def settings_from_user(values: Mapping[str, Any], encode: Callable[[str], list[int]] | None = None,
                       prefix: str = "") -> SamplerSettings:
    """SamplerSettings from a user's values (the CLI's flags, a request's fields): a token_bias
    knob takes a JSON object with string keys (``user_logit_bias``). Errors name the knob as
    ``prefix + name`` (the CLI's "--")."""
    values = dict(values)
    for k in knobs():
        if k.kind == "token_bias" and values.get(k.name) is not None:
            values[k.name] = user_logit_bias(values[k.name], encode, prefix + k.name)
    try:
        return SamplerSettings(**values)
    except TypeError as e:  # an unknown name: a programming error, but say which
        raise SettingError("settings", f"unknown sampler setting: {e}") from None


def user_logit_bias(bias: Mapping[str, object], encode: Callable[[str], list[int]] | None = None,
                    name: str = "logit_bias") -> dict[int, float]:
    """A user's logit bias (a JSON object: the CLI's --logit_bias, the API's ``logit_bias``) as
    {token id: bias}. Keys (_bias_token): ``"5"`` or ``"id:5"`` is token id 5 (digits are OpenAI's
    form); ``"text:5"`` is the text "5", which must ``encode`` to one token (the only way to name a
    digit's token); any other key is a text too. Values are numbers in [-100, 100], added to the
    logit; -100 bans the token (-inf), as in the OpenAI API. Two keys naming one token are refused
    rather than one silently winning. Errors name the setting as ``name``."""
    param = name.lstrip("-")
    if not isinstance(bias, Mapping):
        raise SettingError(param, f"{name} must be a JSON object such as '{{\"1234\": -100}}'")
    out: dict[int, float] = {}
    keys: dict[int, object] = {}  # token -> the key that named it
    for key, value in bias.items():
        if not _is_real(value) or not -100 <= value <= 100:
            raise SettingError(param, f"{name} value for {key!r} must be a number in "
                                      f"[-100, 100], got {value!r}")
        token = _bias_token(key, encode, name)
        if token in keys:
            raise SettingError(param, f"{name} keys {keys[token]!r} and {key!r} are the same "
                                      f"token {token}")
        keys[token] = key
        out[token] = NEG_INF if value <= BAN else float(value)
    return out


def _bias_token(key: object, encode: Callable[[str], list[int]] | None, name: str) -> int:
    """The token a logit bias key names: ``id:N`` or ASCII digits: id N; ``text:T`` or any other
    string: the one token T encodes to."""
    param = name.lstrip("-")
    if not isinstance(key, str):
        raise SettingError(param, f"{name} keys must be token ids (strings of digits), got {key!r}")
    if key.startswith(ID_KEY):
        digits = key[len(ID_KEY):]
        if not _is_digits(digits):
            raise SettingError(param, f"{name} key {key!r}: a token id after {ID_KEY} must be "
                                      "digits")
        return int(digits)
    if _is_digits(key):
        return int(key)
    if encode is None:
        raise SettingError(param, f"{name} key {key!r}: no tokenizer to encode it; give a token id "
                                  f'("5" or "{ID_KEY}5")')
    try:
        ids = encode(key.removeprefix(TEXT_KEY))
    except ValueError as e:
        raise SettingError(param, f"{name} key {key!r}: {e}") from None
    if len(ids) != 1:
        raise SettingError(param, f"{name} key {key!r} is {len(ids)} tokens {ids}, not one; use a "
                                  f'single-token text or a token id ("{ID_KEY}5")')
    return ids[0]


# ------------------------------------------------------------------------------------------------------
# the page's description


def describe() -> dict[str, Any]:
    """Every knob and the stage orders as JSON (``GET /v1/sampler_settings``): what the explorer
    page builds its controls from. Infinite bounds are null."""
    return {
        "knobs": [_knob_json(k) for k in knobs()],
        "stages": list(ORDERS["default"]),
        "orders": {name: list(order) for name, order in ORDERS.items()},
        "first_stage": FIRST_STAGE, "last_stage": LAST_STAGE,
        "llama.cpp_with_mirostat": list(LLAMA_CPP_MIROSTAT),
    }


def _knob_json(k: Knob) -> dict[str, Any]:
    def finite(x: float) -> float | None:
        return None if x is None or math.isinf(x) else x

    default = list(k.default) if isinstance(k.default, tuple) else k.default
    off = {"at_most": k.off_at_most} if k.off_at_most is not None else {"equals": default}
    return {
        "name": k.name, "type": k.kind, "default": default,
        "cli_default": default if k.cli_default is None else k.cli_default,
        "help": k.help, "stage": k.stage, "switch": k.switch, "off": off if k.switch else None,
        "range": None if k.kind not in ("number", "integer") else {
            "min": finite(k.lo), "max": finite(k.hi), "min_open": k.lo_open,
            "max_open": k.hi_open or k.hi == math.inf},
        "choices": list(k.choices) or None, "ui": dict(k.ui) if k.ui else None,
    }


# ------------------------------------------------------------------------------------------------------
# small helpers


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit alone takes "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def _num(x: float) -> str:
    """A bound as the messages write it: 0.0, 2.0, inf; integers without a point."""
    return "inf" if x == math.inf else "-inf" if x == -math.inf else str(x)
