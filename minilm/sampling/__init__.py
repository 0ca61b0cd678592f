"""From logits to tokens: the sampler settings, the stages that reshape a distribution, the stack
that applies them and draws, and generation over the KV cache (continuous batching included).

    settings.py   SamplerSettings: every knob (defaults, ranges, help), the stage orders
    history.py    History: the tokens so far, the penalties' counts, per-row state and generators
    stages.py     the processors (bias, penalties, DRY, scaling, filters, XTC, Mirostat, guidance)
    stack.py      SamplerStack: the processors in order, then an exact draw; SampleInfo
    request.py    Request: prompts that decode together with one sampler; Step, Completion
    batch.py      RunningBatch: the rows of many Requests over one KV cache (continuous batching)
    prefix_cache.py  PrefixCache: KV blocks of computed prefixes, reused by later prompts
    generation.py generate / complete / prompt_states / next_token_table: one Request alone
    lens.py       the logit lens: each layer's next-token distribution
"""
from minilm.sampling.history import History
from minilm.sampling.settings import SamplerSettings, user_logit_bias
from minilm.sampling.stack import SampleInfo, SamplerStack
from minilm.sampling.stages import (
    DRY,
    STAGES,
    XTC,
    ClassifierFreeGuidance,
    EpsilonCutoff,
    EtaCutoff,
    FrequencyPenalty,
    LogitBias,
    MinP,
    Mirostat,
    PresencePenalty,
    RepetitionPenalty,
    Temperature,
    TopH,
    TopK,
    TopNSigma,
    TopP,
    TypicalP,
    classifier_free_guidance,
    unconditional_prompt,
)

__all__ = [
    "History", "SamplerSettings", "user_logit_bias", "STAGES", "SampleInfo", "SamplerStack", "DRY",
    "XTC", "ClassifierFreeGuidance", "EpsilonCutoff", "EtaCutoff", "FrequencyPenalty", "LogitBias",
    "MinP", "Mirostat", "PresencePenalty", "RepetitionPenalty", "Temperature", "TopH", "TopK",
    "TopNSigma", "TopP", "TypicalP", "classifier_free_guidance", "unconditional_prompt",
]
