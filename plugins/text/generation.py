"""Batched decoding for text models: greedy, top-k sampling, full-vocabulary sampling and beam search.

:func:`generate` is the student's decoder during ImitKD training (its rollouts)
and the greedy decoder for metrics: encode once, then one decoder step per token
reusing the key/value cache. It is written here rather than calling
``model.generate`` because sampling must draw from a caller-supplied
``torch.Generator`` and reproduce kd's top-k draw (Hugging Face samples from the
global RNG, over the whole vocabulary after masking, so the same seed gives other
tokens); for greedy decoding Hugging Face gives the same tokens but does more work
per step around the same model calls (docs/performance.md, "Student rollouts").

:func:`beam_search` is used for sequence-level KD targets and beam evaluation.
It runs transformers' beam-search algorithm (v5 ``_beam_search``, early stopping)
in a leaner loop of its own (:func:`_lean_beam_search`: same outputs; the wmt
student's beam-5 pass over 100 sentences took 0.68 s instead of 0.85 s) whenever the model's generation config uses
only what that loop implements, and Hugging Face ``generate(num_beams=...)``
otherwise. Both share a cache that does not reorder the cross-attention
keys/values after each step (:class:`BeamSharedCrossAttentionCache`).

Both return a :class:`Generated`: decoder tokens *without* the decoder start
token, padded with the model's pad id after the end, and per-row lengths that
count the end-of-sequence token when one was produced.
"""
from __future__ import annotations

import functools
import inspect
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from kdcore.signals import IGNORE_INDEX
from kd_plugins.text.models import HFTextModel

#: greedy: argmax; top_k: sample among the k most likely tokens; sample: sample from the whole softmax (GKD's and
#: MiniLLM's on-policy student samples). Both samplers divide the logits by the temperature first.
Strategy = Literal["greedy", "top_k", "sample"]


@dataclass
class Generated:
    """Padded decoder sequences and their lengths (eos included when produced)."""

    sequences: torch.Tensor  # (B, L) long, padded with pad_token_id
    lengths: torch.Tensor  # (B,) long

    def labels(self) -> torch.Tensor:
        """The sequences as training labels: positions past each length are -100."""
        positions = torch.arange(self.sequences.shape[1], device=self.sequences.device)
        return self.sequences.masked_fill(positions[None, :] >= self.lengths[:, None], IGNORE_INDEX)

    def to_lists(self) -> list[list[int]]:
        """Token ids per row, eos included, padding dropped."""
        return [row[:length].tolist() for row, length in zip(self.sequences, self.lengths.tolist())]


def generation_length_limit(longest: int, cap: int, ratio: float | None, offset: int) -> int:
    """How many tokens to decode for a batch whose longest reference (target or source) has ``longest`` tokens.

    ``cap`` when ``ratio`` is None, else ``ceil(ratio * longest) + offset`` but at most ``cap`` and at least 1: a
    model that has not yet learnt to stop would otherwise decode ``cap`` tokens for every short sentence.
    """
    if ratio is None:
        return cap
    return max(1, min(cap, math.ceil(ratio * longest) + offset))


def longest_target(labels: torch.Tensor) -> int:
    """The most target positions (labels that are not ``IGNORE_INDEX``) in any row of ``labels``; 0 when empty."""
    return int((labels != IGNORE_INDEX).sum(dim=1).max()) if labels.numel() else 0


def _require_seq2seq(model: HFTextModel) -> None:
    if not model.is_encoder_decoder:
        raise NotImplementedError(
            f"generation is implemented for encoder-decoder models; {type(model.hf_model).__name__} is decoder-only")


def _next_tokens(logits: torch.Tensor, strategy: Strategy, top_k: int, temperature: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    if strategy == "greedy":
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if strategy == "sample":
        # A banned token's -inf logit is probability 0 here, as in the top-k draw.
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)
    values, indices = scaled.topk(min(top_k, scaled.shape[-1]), dim=-1)
    probabilities = torch.softmax(values, dim=-1)
    choice = torch.multinomial(probabilities, 1, generator=generator)
    return indices.gather(-1, choice).squeeze(-1)


def _lengths_from(sequences: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """Length of each row up to and including its first eos (the full width when there is none)."""
    width = sequences.shape[1]
    if eos_token_id is None or width == 0:
        return torch.full((sequences.shape[0],), width, dtype=torch.long, device=sequences.device)
    is_eos = sequences == eos_token_id
    first_eos = is_eos.long().argmax(dim=1)  # index of the first True (0 when there is none)
    return torch.where(is_eos.any(dim=1), first_eos + 1, torch.full_like(first_eos, width))


class _DecodingSteps:
    """Next-token logits of a batch, one decoding step at a time (the state of :func:`generate`'s loop).

    Encoder-decoder models run the encoder once. With ``use_cache`` each step feeds
    only the newest token and reuses the key/value cache (the cross-attention
    keys/values are projected from the encoder output on the first step only);
    without it the decoder re-reads the whole prefix, the reference the cache is
    checked against. ``banned_token`` gets logit ``-inf``.

    ``stack_only``: the decoder stack is called directly and the LM head applied
    here as ``head(hidden) + final_logits_bias``, exactly the operations of the
    model's forward for the heads :func:`_head_is_plain_linear` accepts (Marian,
    BART, Pegasus), so the logits are the same floats, under bf16 autocast too
    (:meth:`HFTextModel.logits_from_hidden`'s single ``addmm`` would round
    differently, and add the bias in bf16 under autocast). What it saves per step is
    the model wrapper's work around them: the banned token is folded into the
    bias once instead of cloning and overwriting every step's logits, and the
    seq2seq wrapper's argument handling is skipped. Other models run their full
    forward on each step's new token.
    """

    def __init__(self, model: HFTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                 use_cache: bool, stack_only: bool, banned_token: int | None) -> None:
        self.model, self.hf = model, model.hf_model
        self.use_cache, self.banned_token = use_cache, banned_token
        self.attention_mask = attention_mask
        self.past: Any = None
        batch_size, device = input_ids.shape[0], input_ids.device
        if model.is_encoder_decoder:
            self.encoder_outputs = self.hf.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                                         return_dict=True)
            self.prefix = torch.full((batch_size, 1), model.decoder_start_token_id, dtype=torch.long, device=device)
        else:
            # Decoder-only: the prompts are the prefix. They must be left-padded so that every row's
            # next token goes in the same column; positions count only attended tokens.
            self.prefix = input_ids
            self.positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.decoder = self.hf.get_decoder() if stack_only else None
        self.cache_argument = _cache_argument(self.decoder if stack_only else self.hf)
        if stack_only:
            bias = self.hf.final_logits_bias
            if banned_token is not None:
                bias = bias.clone()
                bias[..., banned_token] = float("-inf")
            self.head, self.head_bias = self.hf.get_output_embeddings(), bias
        # A cached causal LM's first step reads the whole prompt; only its last position's logits are needed.
        # (Not without the cache: that path stays the plain reference.)
        self.keeps_last_logits_only = (use_cache and not model.is_encoder_decoder
                                       and "logits_to_keep" in inspect.signature(self.hf.forward).parameters)

    def next_logits(self) -> torch.Tensor:
        """``(B, V)`` logits of the token after the current prefix."""
        incremental = self.use_cache and self.past is not None
        inputs = self.prefix[:, -1:] if incremental else self.prefix
        if self.decoder is not None:
            outputs = self.decoder(input_ids=inputs, encoder_hidden_states=self.encoder_outputs.last_hidden_state,
                                   encoder_attention_mask=self.attention_mask, use_cache=True, return_dict=True,
                                   **{self.cache_argument: self.past})
            self.past = outputs[self.cache_argument]
            return (self.head(outputs.last_hidden_state) + self.head_bias)[:, -1, :]
        if self.model.is_encoder_decoder:
            outputs = self.hf(encoder_outputs=self.encoder_outputs, attention_mask=self.attention_mask,
                              decoder_input_ids=inputs, use_cache=self.use_cache, return_dict=True,
                              **{self.cache_argument: self.past})
        else:
            outputs = self.hf(input_ids=inputs, attention_mask=self.attention_mask,
                              position_ids=self.positions[:, -1:] if incremental else self.positions,
                              use_cache=self.use_cache, return_dict=True, **{self.cache_argument: self.past},
                              **({"logits_to_keep": 1} if self.keeps_last_logits_only else {}))
        if self.use_cache:
            self.past = outputs[self.cache_argument]
        logits = outputs.logits[:, -1, :]
        if self.banned_token is not None:
            logits[:, self.banned_token] = float("-inf")  # the model's own output tensor, used for nothing else
        return logits

    def append(self, tokens: torch.Tensor) -> None:
        """Extend every row's prefix by its token of this step."""
        self.prefix = torch.cat([self.prefix, tokens[:, None]], dim=1)
        if not self.model.is_encoder_decoder:
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((tokens.shape[0], 1))],
                                            dim=1)
            self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)


@torch.no_grad()
def generate(model: HFTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             strategy: Strategy = "greedy", top_k: int = 5, temperature: float = 1.0, max_new_tokens: int = 64,
             generator: torch.Generator | None = None, use_cache: bool = True, suppress_pad: bool = True,
             implementation: Literal["auto", "model-forward"] = "auto") -> Generated:
    """Greedy, top-k sampled or sampled (whole vocabulary) decoding of a batch, under ``no_grad``.

    Encoder-decoder models: ``input_ids`` are the sources (any padding side);
    decoder-only models: ``input_ids`` are left-padded prompts and the result is
    the continuation only.

    The encoder runs once and each step decodes one token per row with the
    key/value cache. ``implementation="auto"`` calls the decoder stack and the LM
    head directly where the model's logits are ``head(hidden) + final_logits_bias``
    (Marian, BART, Pegasus: same logits, less work per step, see
    :class:`_DecodingSteps`); ``"model-forward"`` always runs the model's forward.
    ``use_cache=False`` re-runs the decoder over the whole prefix each step (the
    reference the cache is checked against). ``suppress_pad`` forbids the pad
    token mid-sequence (as Marian's generation config does), since a generated
    pad would be indistinguishable from padding. The model's train/eval mode is
    left as it is: callers choose whether dropout is on while sampling.
    """
    if strategy not in ("greedy", "top_k", "sample"):
        raise ValueError(f"unknown decoding strategy {strategy!r}")
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    if implementation not in ("auto", "model-forward"):
        raise ValueError(f"generate: implementation must be 'auto' or 'model-forward', not {implementation!r}")
    batch_size = input_ids.shape[0]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad_banned = suppress_pad and model.pad_token_id is not None and model.pad_token_id != model.eos_token_id
    stack_only = (implementation == "auto" and use_cache and model.is_encoder_decoder
                  and _head_is_plain_linear(model))
    steps = _DecodingSteps(model, input_ids, attention_mask, use_cache=use_cache, stack_only=stack_only,
                           banned_token=model.pad_token_id if pad_banned else None)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    produced: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        tokens = _next_tokens(steps.next_logits(), strategy, top_k, temperature, generator)
        tokens = tokens.masked_fill(finished, model.pad_token_id)
        produced.append(tokens)
        if model.eos_token_id is not None:
            finished = finished | (tokens == model.eos_token_id)
        if bool(finished.all()):
            break
        steps.append(tokens)
    sequences = torch.stack(produced, dim=1) if produced else input_ids.new_zeros((batch_size, 0))
    return Generated(sequences, _lengths_from(sequences, model.eos_token_id))


def _cache_argument(hf_model: Any) -> str:
    """The name of the key/value cache in ``hf_model``'s forward and outputs: ``cache`` in transformers >= 5.2x
    (where ``past_key_values`` warns and is to be removed), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"


@functools.cache
def _encoder_decoder_cache_class() -> type:
    # Built on first use: importing transformers' cache module at import time would slow `kd list` and the CLI.
    from transformers.cache_utils import EncoderDecoderCache

    class BeamSharedCrossAttentionCache(EncoderDecoderCache):
        """An encoder-decoder cache whose beam reordering leaves the cross-attention part alone.

        Beam search reorders the cache rows after every step, but only among the
        beams of one sentence (row ``i`` takes row ``beam_idx[i]`` of the same
        sentence), and every beam of a sentence holds the same cross-attention
        keys/values (all are projections of that sentence's one encoder output).
        Reordering them is therefore a copy of equal values; transformers does it
        anyway, for every layer and step: skipping it halved the summarization
        teacher's beam-5 time on 100-token documents (8.83 s -> 4.42 s for 100
        sentences, benchmarks/test_bench_decode.py; the student's 1.85 s -> 1.52 s).
        """

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    return BeamSharedCrossAttentionCache


def beam_cache(model: HFTextModel) -> Any:
    """A fresh :class:`BeamSharedCrossAttentionCache` for ``model``'s ``generate`` (encoder-decoder models)."""
    from transformers.cache_utils import DynamicCache

    config = model.hf_model.config
    return _encoder_decoder_cache_class()(DynamicCache(config=config), DynamicCache(config=config))


#: Generation-config fields whose processors :func:`_lean_beam_search` does not implement, with their neutral
#: values; a config that sets any of them to something else is decoded by transformers' ``generate`` instead.
_NEUTRAL_GENERATION_FIELDS: dict[str, tuple[Any, ...]] = {
    "min_length": (None, 0), "min_new_tokens": (None, 0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "forced_bos_token_id": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "sequence_bias": (None,), "exponential_decay_length_penalty": (None,),
    "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0), "constraints": (None,),
    "force_words_ids": (None,), "renormalize_logits": (None, False), "remove_invalid_values": (None, False),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "stop_strings": (None,), "max_time": (None,),
    "forced_decoder_ids": (None,),
}


def _banned_tokens(generation_config: Any) -> list[int] | None:
    """The single-token ``bad_words_ids`` (Marian bans its pad token), or None when a longer bad word is listed."""
    bad_words = getattr(generation_config, "bad_words_ids", None) or []
    if any(len(word) != 1 for word in bad_words):
        return None
    return [word[0] for word in bad_words]


def lean_beam_search_supported(generation_config: Any) -> bool:
    """Whether :func:`_lean_beam_search` reproduces ``generate`` for this config (else ``generate`` is used)."""
    for name, neutral in _NEUTRAL_GENERATION_FIELDS.items():
        value = getattr(generation_config, name, None)
        if value not in neutral and not (isinstance(value, (list, tuple, dict)) and not value):
            return False
    eos = generation_config.eos_token_id
    return (_banned_tokens(generation_config) is not None and generation_config.early_stopping is True
            and not isinstance(eos, (list, tuple)))


def _take_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``tensor[b, indices[b, j], ...]`` for (batch, beam, ...) tensors (transformers' ``_gather_beams``)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


@torch.no_grad()
def _lean_beam_search(model: HFTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      generation_config: Any) -> torch.Tensor:
    """transformers' beam search (v5 ``_beam_search`` with ``early_stopping=True``), step for step, made cheap.

    Hand-written because transformers spends most of a small model's beam-search
    time outside the model: per step it copies the logits, adds every beam's
    score to all ``beams x vocab`` log-probabilities and takes top-k over that
    whole row per sentence, and it reorders the cross-attention cache. Here each
    beam first keeps its own ``2 x beams`` best tokens (the global top ``2 x
    beams`` of a sentence are always among them), beam scores are added to those
    only, and the cross-attention cache is never reordered. The candidate scores
    are the same float operations on the same values, so the chosen tokens are
    those of ``generate`` (tests compare token for token on Marian, BART and T5).
    Returns the best hypothesis per sentence, decoder start token included, as
    wide as the longest one.
    """
    from transformers.modeling_outputs import BaseModelOutput

    hf = model.hf_model
    num_beams, length_penalty = generation_config.num_beams, generation_config.length_penalty
    eos_token_id, forced_eos = generation_config.eos_token_id, generation_config.forced_eos_token_id
    banned = _banned_tokens(generation_config) or []
    batch_size, device = input_ids.shape[0], input_ids.device
    rows = batch_size * num_beams
    max_length = 1 + generation_config.max_new_tokens  # the decoder start token is the prompt
    encoded = hf.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    encoder_outputs = BaseModelOutput(last_hidden_state=encoded.last_hidden_state.repeat_interleave(num_beams, 0))
    encoder_mask = attention_mask.repeat_interleave(num_beams, 0)
    cache = beam_cache(model)
    cache_argument = _cache_argument(hf)
    keep = 2 * num_beams  # as transformers: enough candidates that num_beams stay open after some end
    top_beams = torch.arange(keep, device=device) < num_beams
    sentence_offsets = torch.arange(batch_size, device=device)[:, None] * num_beams
    filler = model.pad_token_id if model.pad_token_id is not None else 0

    running = torch.full((batch_size, num_beams, max_length), filler, dtype=torch.long, device=device)
    running[:, :, 0] = model.decoder_start_token_id
    running_scores = torch.zeros(batch_size, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # step one expands the first beam only (all beams are equal)
    finished = running.clone()
    finished_scores = torch.full((batch_size, num_beams), -1e9, device=device)
    finished_lengths = torch.zeros(batch_size, num_beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch_size, num_beams, dtype=torch.bool, device=device)
    may_improve = torch.ones(batch_size, 1, dtype=torch.bool, device=device)
    length = 1
    # Marian/BART/Pegasus: the decoder stack and the LM head with its bias in one addmm, instead of the model's
    # forward, which adds final_logits_bias to all beams x vocab logits in a separate pass.
    decoder = hf.get_decoder() if _head_is_plain_linear(model) else None
    decoder_cache_argument = _cache_argument(decoder) if decoder is not None else cache_argument
    while True:
        step_inputs = running.view(rows, max_length)[:, length - 1:length]
        if decoder is not None:
            hidden = decoder(input_ids=step_inputs, encoder_hidden_states=encoder_outputs.last_hidden_state,
                             encoder_attention_mask=encoder_mask, use_cache=True, return_dict=True,
                             **{decoder_cache_argument: cache}).last_hidden_state
            logits = model.logits_from_hidden(hidden[:, -1, :])
        else:
            logits = hf(encoder_outputs=encoder_outputs, attention_mask=encoder_mask, decoder_input_ids=step_inputs,
                        use_cache=True, return_dict=True, **{cache_argument: cache}).logits[:, -1, :]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        del logits
        if banned:
            log_probs[:, banned] = float("-inf")
        if forced_eos is not None and length == max_length - 1:
            log_probs.fill_(float("-inf"))
            log_probs[:, forced_eos] = 0.0
        beam_best, beam_tokens = log_probs.topk(keep, dim=-1)  # (rows, keep)
        candidates = (beam_best.view(batch_size, num_beams, keep) + running_scores[:, :, None]).view(batch_size, -1)
        top_scores, top_flat = candidates.topk(keep, dim=-1)  # (batch, keep)
        source_beams = top_flat // keep
        top_tokens = beam_tokens.view(batch_size, -1).gather(1, top_flat)
        top_sequences = _take_beams(running, source_beams)
        top_sequences[:, :, length] = top_tokens
        ends = (top_tokens == eos_token_id) | (length + 1 >= max_length)

        # The open beams of the next step: the best candidates that did not end.
        open_scores = top_scores + ends.to(torch.float32) * -1.0e9
        next_beams = open_scores.topk(num_beams, dim=-1).indices
        running = _take_beams(top_sequences, next_beams)
        running_scores = _take_beams(open_scores, next_beams)
        parent_rows = (_take_beams(source_beams, next_beams) + sentence_offsets).view(-1)

        # Ended candidates among the first num_beams join the finished hypotheses if they beat them.
        just_finished = ends & top_beams[None, :]
        ended_scores = top_scores / (length ** length_penalty)
        ended_scores += is_finished.all(dim=-1, keepdim=True).to(torch.float32) * -1.0e9
        ended_scores += (~may_improve).to(torch.float32) * -1.0e9
        ended_scores += (~just_finished) * -1.0e9
        merged_scores = torch.cat((finished_scores, ended_scores), dim=1)
        best = merged_scores.topk(num_beams, dim=-1).indices
        finished = _take_beams(torch.cat((finished, top_sequences), dim=1), best)
        finished_scores = _take_beams(merged_scores, best)
        finished_lengths = _take_beams(torch.cat((finished_lengths, torch.full_like(ends, length, dtype=torch.long)),
                                                 dim=1), best)
        is_finished = _take_beams(torch.cat((is_finished, just_finished), dim=1), best)

        cache.reorder_cache(parent_rows)
        length += 1
        # transformers' stopping heuristic with early_stopping=True: stop when no open beam can beat the worst
        # finished hypothesis at its current length, when every sentence has num_beams finished ones, or at
        # the length limit.
        best_open = running_scores[:, :1] / ((length - 1) ** length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
        may_improve = may_improve & (best_open > worst_finished).any(dim=-1, keepdim=True)
        if not bool(may_improve.any()) or bool(is_finished.all()) or bool(ends.all()):
            break
    width = int(finished_lengths[:, 0].max())
    return finished[:, 0, :1 + width]


def _head_is_plain_linear(model: HFTextModel) -> bool:
    """Whether the model's logits are ``decoder_output @ head.weight.T + final_logits_bias`` and nothing else.

    That is the forward of the models that carry a ``final_logits_bias`` (Marian, BART, Pegasus); T5 rescales the
    decoder output first and some models cap their logits, so those keep their own forward.
    """
    config = model.hf_model.config
    return (getattr(model.hf_model, "final_logits_bias", None) is not None
            and not getattr(config, "scale_decoder_outputs", False)
            and getattr(config, "final_logit_softcapping", None) is None)


def _beam_generation_config(model: HFTextModel, num_beams: int, max_new_tokens: int, length_penalty: float) -> Any:
    import copy

    generation_config = copy.deepcopy(model.hf_model.generation_config)
    generation_config.update(num_beams=num_beams, do_sample=False, max_new_tokens=max_new_tokens, max_length=None,
                             num_return_sequences=1, length_penalty=length_penalty, early_stopping=True,
                             pad_token_id=model.pad_token_id, eos_token_id=model.eos_token_id,
                             decoder_start_token_id=model.decoder_start_token_id, top_k=None, top_p=None,
                             temperature=None)
    return generation_config


@torch.no_grad()
def beam_search(model: HFTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                num_beams: int = 5, max_new_tokens: int = 64, length_penalty: float = 1.0,
                implementation: Literal["auto", "transformers"] = "auto") -> Generated:
    """Beam search with the model's generation config and these overrides.

    ``auto`` decodes with :func:`_lean_beam_search` (transformers' algorithm, same
    outputs, less work per step) when the config uses only what it implements,
    otherwise, as ``transformers`` always does, with Hugging Face ``generate``.
    """
    _require_seq2seq(model)
    if implementation not in ("auto", "transformers"):
        raise ValueError(f"beam_search: implementation must be 'auto' or 'transformers', not {implementation!r}")
    hf = model.hf_model
    generation_config = _beam_generation_config(model, num_beams, max_new_tokens, length_penalty)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if implementation == "auto" and lean_beam_search_supported(generation_config):
        output = _lean_beam_search(model, input_ids, attention_mask, generation_config)
    else:
        output = hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config,
                             **{_cache_argument(hf): beam_cache(model)})
    sequences = output[:, 1:]  # drop the decoder start token
    lengths = _lengths_from(sequences, model.eos_token_id)
    positions = torch.arange(sequences.shape[1], device=sequences.device)
    sequences = sequences.masked_fill(positions[None, :] >= lengths[:, None], model.pad_token_id)
    return Generated(sequences.contiguous(), lengths)


def decode(model: HFTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
           num_beams: int = 1, max_new_tokens: int = 64) -> Generated:
    """Deterministic decoding for evaluation: greedy (``num_beams=1``, KV cache) or beam search."""
    if num_beams <= 1:
        return generate(model, input_ids, attention_mask, strategy="greedy", max_new_tokens=max_new_tokens)
    return beam_search(model, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens)


@dataclass
class DecodingSpeed:
    """Throughput of one decoding configuration."""

    seconds: float
    sentences_per_second: float
    tokens_per_second: float
    tokens: int


def measure_speed(model: HFTextModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  use_cache: bool = True, max_new_tokens: int = 64, repeats: int = 1, warmup: bool = True) -> DecodingSpeed:
    """Greedy decoding throughput (generated tokens, eos included) over ``repeats`` runs of the batch.

    ``warmup`` runs the batch once untimed first: the first call pays one-off costs
    (kernel selection, allocator growth) that would otherwise dominate small runs.
    """
    was_training = model.training
    model.eval()
    try:
        if warmup:
            generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, use_cache=use_cache)
        tokens = 0
        started = time.perf_counter()
        for _ in range(repeats):
            result = generate(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, use_cache=use_cache)
            tokens += int(result.lengths.sum())
        seconds = time.perf_counter() - started
    finally:
        model.train(was_training)
    sentences = repeats * input_ids.shape[0]
    return DecodingSpeed(seconds, sentences / seconds, tokens / seconds, tokens)


__all__ = ["DecodingSpeed", "Generated", "Strategy", "beam_cache", "beam_search", "decode", "generate",
           "generation_length_limit", "longest_target",
           "lean_beam_search_supported", "measure_speed"]
