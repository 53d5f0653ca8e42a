"""One chat turn with a 1B-class model, as a library: loading a model for chatting (warmed up, its context window
and stop tokens decided), building the prompt from a history trimmed to that window, and streaming a reply over a
KV cache kept across turns, with the timings of every reply. demo_chat.py is the terminal around it;
benchmarks/chat_ttft.py measures it.

    import chat
    model = chat.load_chat_model("smollm2-135m", device="cpu", dtype="auto", quantize="none", context_tokens=None,
                                 models_dir=common.MODELS_DIR)
    side = chat.Side(model); chat.turn(side, "Hello!", chat.Settings("", 0.0, 1.0, 32))
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import common

import models
import transformers_internals

# Default cap on the history window, in tokens: Llama 3.2 advertises 131k, whose KV cache alone would need GiBs.
MAX_CONTEXT_TOKENS = 8192
TRIM_TO_SHARE = 0.75  # trimmed history fills this much of the window: the next turns extend the cache, not re-encode
# Control characters a model may emit (ESC above all) would drive the terminal: they are dropped from replies.
CONTROL_CHARACTERS = dict.fromkeys([*range(0, 9), *range(11, 32), 127, *range(128, 160)])
# A base model continues a plain transcript with the next user turn: the reply ends where that starts.
PLAIN_STOP_TEXTS = ("\nUser:",)
MEMORY_WORDS = {"rss": "RSS", "vram_allocated": "VRAM"}
WARM_UP_TOKENS = 4  # untimed tokens after loading: the first forward passes pay for kernel and cache set-up


@dataclasses.dataclass
class Settings:
    system: str
    temperature: float
    top_p: float
    max_new_tokens: int


@dataclasses.dataclass
class ChatModel:
    loaded: models.LoadedModel
    label: str
    context_tokens: int  # history + reply must fit in this many tokens
    stop_ids: frozenset
    templated: bool  # False: the plain User/Assistant transcript of models.chat_prompt


@dataclasses.dataclass
class ReplyStats:
    model: str
    n_prompt_tokens: int = 0
    n_cached_tokens: int = 0  # of the prompt, already in the KV cache from earlier turns (not computed again)
    n_completion_tokens: int = 0
    n_decode_steps: int = 0  # forward passes after the prefill (a final stop token included)
    n_trimmed_messages: int = 0
    ttft_sec: float | None = None  # prefill of the new tokens + first sample: the wait before the first token
    generate_sec: float = 0.0  # this model's own compute; in a comparison the other model's turns are not counted
    stop_reason: str = "running"  # stop_token, stop_text, max_tokens, context_full or interrupted
    memory_in_use_bytes: int | None = None
    memory_kind: str = "rss"
    weight_bytes: int = 0

    @property
    def decode_tok_per_sec(self) -> float | None:
        decode_sec = self.generate_sec - (self.ttft_sec or 0.0)
        return self.n_decode_steps / decode_sec if self.n_decode_steps and decode_sec > 0 else None

    def line(self, memory: bool = True) -> str:
        """The timing line; memory=False: only the weights (two compared models share one process's memory)."""
        rate = self.decode_tok_per_sec
        cached = f" ({self.n_cached_tokens} cached)" if self.n_cached_tokens else ""
        weights = f"weights {common.human_bytes(self.weight_bytes)}"
        parts = [f"TTFT {self.ttft_sec:.2f} s" if self.ttft_sec is not None else "TTFT -",
                 f"{rate:.1f} tok/s" if rate else "- tok/s",
                 f"prompt {self.n_prompt_tokens} tok{cached}", f"reply {self.n_completion_tokens} tok",
                 f"{MEMORY_WORDS[self.memory_kind]} {common.human_bytes(self.memory_in_use_bytes)} ({weights})"
                 if memory else weights]
        ending = {"interrupted": "stopped by Ctrl-C", "max_tokens": "hit --max-new-tokens",
                  "context_full": "context window full"}.get(self.stop_reason)
        return ", ".join(parts + ([ending] if ending else []))


@dataclasses.dataclass
class Side:
    """One model's side of the chat: its messages, and a KV cache with the exact token ids it holds."""
    chat: ChatModel
    history: list = dataclasses.field(default_factory=list)
    cache: object = None
    cached_ids: list = dataclasses.field(default_factory=list)

    def remember(self, user_text: str, reply: str) -> None:
        if reply:  # an interrupted reply stays in the history: the model sees what the user saw
            self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def reuse_cache(self, prompt_ids: list) -> int:
        """Crop the cache to its longest common prefix with prompt_ids and return that length; only the rest is fed.
        Token ids, not messages: a template may render earlier turns differently later, and a reply read back may
        tokenize differently. The last prompt token is always fed: its logits choose the first reply token."""
        n, limit = 0, min(len(self.cached_ids), len(prompt_ids) - 1)
        while n < limit and self.cached_ids[n] == prompt_ids[n]:
            n += 1
        if 0 < n < len(self.cached_ids) and not transformers_internals.crop_cache(self.cache, keep_tokens=n):
            n = 0  # a sliding-window layer already evicted what we would keep
        if n == 0:
            self.cache = models.new_cache()
        self.cached_ids = self.cached_ids[:n]
        return n


def count_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def load_chat_model(name: str, *, device: str, dtype: str, quantize: str, context_tokens: int | None,
                    models_dir: Path, log=print) -> ChatModel:
    """models.load_model plus what a chat needs, warmed up; any failure becomes one sentence (the chat goes on)."""
    wanted_context = context_tokens or MAX_CONTEXT_TOKENS
    log(f"Loading {name}...")
    try:
        loaded = models.load_model(name, device=device, dtype=dtype, quantize=quantize,
                                   context_tokens=wanted_context, models_dir=models_dir, log=log)
    except common.UserError:
        raise
    except Exception as error:  # a broken folder, an unsupported architecture, a corrupt file...
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise common.UserError(f"{name} failed to load ({type(error).__name__}: {reason}).") from None
    window = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None) or wanted_context
    spec = loaded.resolved.spec
    templated = models.uses_chat_template(loaded.tokenizer, spec)
    chat = ChatModel(loaded, loaded.resolved.label, min(window, wanted_context),
                     frozenset(models.stop_token_ids(loaded.tokenizer, spec)), templated)
    # A few untimed tokens, so the first reply's timings are not one-off start-up costs (seconds on CPU).
    warm_up = Settings(system="", temperature=0.0, top_p=1.0, max_new_tokens=WARM_UP_TOKENS)
    ids = loaded.tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
    for _ in stream_reply(Side(chat), ids, warm_up, WARM_UP_TOKENS, ReplyStats(chat.label)):
        pass
    weights = loaded.quantize if loaded.quantize != "none" else loaded.dtype
    log(f"{chat.label}: {count_text(loaded.n_params)} parameters, {weights} on {loaded.device}, "
        f"{chat.context_tokens}-token context, "
        f"{'its chat template' if templated else 'plain User/Assistant prompt (no chat template)'}, "
        f"loaded in {loaded.load_sec:.1f} s ({common.human_bytes(loaded.weight_bytes)} of weights).")
    return chat


# ---------------------------------------------------------------------------------------- generating
def encode(chat: ChatModel, system: str, messages: list) -> list:
    if system:
        messages = [{"role": "system", "content": system}] + messages
    text = models.chat_prompt(chat.loaded.tokenizer, messages, chat.loaded.resolved.spec)
    # A chat template writes its own BOS; adding special tokens again would double it.
    return chat.loaded.tokenizer(text, add_special_tokens=not chat.templated)["input_ids"]


def build_prompt(chat: ChatModel, history: list, settings: Settings, user_text: str) -> tuple:
    """(prompt ids, n oldest messages dropped, reply budget). When prompt + reply do not fit, whole exchanges go,
    oldest first, until they fit in TRIM_TO_SHARE of the window."""
    new, reply = [{"role": "user", "content": user_text}], settings.max_new_tokens
    for start in range(0, len(history) + 1, 2):
        ids = encode(chat, settings.system, history[start:] + new)
        if len(ids) + reply <= chat.context_tokens * (TRIM_TO_SHARE if start else 1):
            return ids, start, reply
    if len(ids) < chat.context_tokens:  # the new message alone: the reply gets what is left of the window
        return ids, len(history), min(reply, chat.context_tokens - len(ids))
    raise common.UserError(f"That prompt is {len(ids)} tokens (with the system prompt and template) but "
                           f"{chat.label}'s context window is {chat.context_tokens} tokens; shorten it.")


def held_back(text: str, stop_texts: tuple) -> int:
    """How many trailing characters might be the start of a stop text (or half a UTF-8 character)."""
    if text.endswith("\ufffd"):  # the rest of a multi-byte character may be in the next token
        return len(text) - len(text.rstrip("\ufffd"))
    for stop in stop_texts:
        for k in range(len(stop) - 1, 0, -1):
            if text.endswith(stop[:k]):
                return k
    return 0


def stream_reply(side: Side, prompt_ids: list, settings: Settings, max_new_tokens: int, stats: ReplyStats):
    """Yield the reply's text as tokens are sampled (models.decode_steps over the side's KV cache, fed only what it
    does not hold). Only the model's own work is timed, so alternating compared models measures each fairly."""
    import torch
    chat, tokenizer, stop_texts = side.chat, side.chat.loaded.tokenizer, () if side.chat.templated else PLAIN_STOP_TEXTS
    stats.n_prompt_tokens = len(prompt_ids)
    stats.n_cached_tokens = side.reuse_cache(prompt_ids)

    def forward(model, ids, cache):
        try:
            logits = models.forward_logits(model, ids, cache)
        except BaseException:  # Ctrl-C mid-pass: some layers may hold these tokens and some not
            side.cache, side.cached_ids = None, []
            raise
        side.cached_ids += ids  # decode_steps feeds every token but the last one it yields
        return logits

    pick = functools.partial(models.sample_token, temperature=settings.temperature, top_p=settings.top_p)
    steps = models.decode_steps(chat.loaded.model, prompt_ids[stats.n_cached_tokens:], cache=side.cache,
                                max_new_tokens=max_new_tokens, pick=pick, stop_ids=chat.stop_ids, forward=forward)
    generated, text, shown = [], "", 0
    try:
        while True:
            start = time.perf_counter()
            with torch.inference_mode():
                token = next(steps, (None,))[0]  # the sample's int() waits for the device
            if token is None:
                stats.stop_reason = "max_tokens" if max_new_tokens == settings.max_new_tokens else "context_full"
                break
            stats.generate_sec += time.perf_counter() - start
            if stats.ttft_sec is None:
                stats.ttft_sec = stats.generate_sec
            else:
                stats.n_decode_steps += 1
            if token in chat.stop_ids:
                stats.stop_reason = "stop_token"
                break
            generated.append(token)
            stats.n_completion_tokens += 1
            text = tokenizer.decode(generated, skip_special_tokens=True).translate(CONTROL_CHARACTERS)
            cut = min((text.find(stop) for stop in stop_texts if stop in text), default=-1)
            if cut >= 0:
                text, stats.stop_reason = text[:cut], "stop_text"
                break
            visible = len(text) - held_back(text, stop_texts)
            if visible > shown:
                yield text[shown:visible]
                shown = visible
        if len(text.rstrip("\ufffd")) > shown:
            yield text.rstrip("\ufffd")[shown:]
    finally:  # also when Ctrl-C ends the reply: the timing line still shows the memory
        stats.stop_reason = "interrupted" if stats.stop_reason == "running" else stats.stop_reason
        stats.memory_in_use_bytes, stats.memory_kind = common.memory_reading(chat.loaded.device)


def speed_summary(a: ReplyStats, b: ReplyStats, same_tokenizer: bool) -> str:
    """Which model decoded faster, by what factor, and how their first tokens compared."""
    if not (a.decode_tok_per_sec and b.decode_tok_per_sec):
        return "Too few tokens in one of the replies to compare speeds."
    if a.model == b.model:  # one model in both columns: any difference is the machine's noise, not a winner
        return (f"Both columns are {a.model}: {a.decode_tok_per_sec:.1f} vs {b.decode_tok_per_sec:.1f} tok/s, first "
                f"token after {a.ttft_sec:.2f} s vs {b.ttft_sec:.2f} s (the same model: the difference is noise).")
    fast, slow = sorted((a, b), key=lambda s: s.decode_tok_per_sec, reverse=True)
    ratio = fast.decode_tok_per_sec / slow.decode_tok_per_sec
    text = (f"{fast.model} was faster: {ratio:.2f}x the tokens/sec of {slow.model} "
            f"({fast.decode_tok_per_sec:.1f} vs {slow.decode_tok_per_sec:.1f} tok/s); "
            f"first token after {fast.ttft_sec:.2f} s vs {slow.ttft_sec:.2f} s.")
    if not same_tokenizer:
        text += (f" Their tokenizers differ, so a token is not the same amount of text: the whole replies took "
                 f"{fast.generate_sec:.2f} s vs {slow.generate_sec:.2f} s.")
    return text


def turn(side: Side, user_text: str, settings: Settings) -> tuple:
    """One whole turn on this side, as the chat answers it: (reply text, ReplyStats, n oldest messages dropped).
    The history is trimmed and the exchange remembered."""
    ids, n_dropped, budget = build_prompt(side.chat, side.history, settings, user_text)
    del side.history[:n_dropped]
    stats = ReplyStats(side.chat.label, n_trimmed_messages=n_dropped, weight_bytes=side.chat.loaded.weight_bytes)
    reply = "".join(stream_reply(side, ids, settings, budget, stats))
    side.remember(user_text, reply)
    return reply, stats, n_dropped
