"""Chat with a 1B-class model in the terminal, or with two side by side, and see what every reply cost.

The hands-on way to feel the difference between small models: each model's own chat template (a plain
User/Assistant transcript for base models such as pythia-1b), history trimmed to the context window and kept in the
KV cache across turns (a turn waits only for its own new tokens), tokens streamed as they are sampled, and after
every reply the time to first token, decode tokens/sec, token counts and memory. `/compare` (or `--compare A B`)
answers each prompt with two models in two columns and says which was faster and by how much.

    python demo_chat.py                                    # pick a downloaded model from a menu
    python demo_chat.py --model smollm2-135m --temperature 0 --system "Answer in one sentence."
    python demo_chat.py --compare smollm2-135m qwen-coder-0.5b --quantize 4bit
    echo "What is the capital of France?" | python demo_chat.py --model smollm2-135m   # one answer per line
    python demo_chat.py --prompt "Name three colours." > answer.txt                     # one-shot

In the chat, /help lists the commands; Ctrl-C stops a reply, Ctrl-D or /quit leaves. In a pipe or with --prompt,
stdout carries only the answers (plain text); timings and notes go to stderr. In a terminal the prompt is up at once:
the model loads in the background while you type.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import re
import sys
import threading
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
# The settings /temp, /top-p and /max-new-tokens change: (the user's word for it, type, lowest, highest).
SETTING_LIMITS = {"temperature": ("temperature", float, 0.0, 5.0), "top_p": ("top-p", float, 0.01, 1.0),
                  "max_new_tokens": ("max-new-tokens", int, 1, 100_000)}
SETTING_COMMANDS = {"/temp": "temperature", "/top-p": "top_p", "/max-new-tokens": "max_new_tokens",
                    "/max-tokens": "max_new_tokens", "/system": "system"}  # /max-tokens: the old spelling
COMMANDS = {
    "/help": "list the commands",
    "/model [NAME|PATH]": "switch to another model (no name: the menu)",
    "/compare [A] B | off": "answer each prompt with two models side by side (B against the current model)",
    "/system [TEXT|off]": "show or set the system prompt",
    "/temp [T]": "show or set the temperature (0 = greedy)",
    "/top-p [P]": "show or set nucleus sampling's probability mass",
    "/max-new-tokens [N]": "show or set the longest reply, in tokens",
    "/reset": "forget the conversation (settings stay)",
    "/save": "write the transcript with its timings to the results folder as JSON",
    "/quit": "leave (Ctrl-D does too; Ctrl-C stops a reply)",
}


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


@dataclasses.dataclass
class Session:
    settings: Settings
    load_options: dict  # keywords for load_chat_model
    results_dir: Path
    threads: int  # --threads: 0 = adapt to the idle cores
    seed: int
    sides: list = dataclasses.field(default_factory=list)  # one Side, or two when comparing
    transcript: list = dataclasses.field(default_factory=list)  # everything said, for /save
    identities: dict = dataclasses.field(default_factory=dict)  # label -> LoadedModel.identity()
    pending: tuple = ()  # (future, notes) of the start-up load while it runs in the background
    cpu_threads: object = None  # common.CpuThreads, made on the thread that runs the forward passes
    same_vocab: bool = True
    n_errors: int = 0

    @property
    def chats(self) -> list:
        return [side.chat for side in self.sides]

    def use(self, chats: list) -> None:
        self.sides = [Side(chat) for chat in chats]
        for chat in chats:
            self.identities[chat.label] = chat.loaded.identity()
        # Asked once per pair: comparing two 50k-entry vocabularies on every turn is needless tokenizer work.
        vocabs = [chat.loaded.tokenizer.get_vocab() for chat in chats]
        self.same_vocab = all(vocab == vocabs[0] for vocab in vocabs)
        if self.cpu_threads is None:  # first use, on the main thread: torch's thread count is per thread
            self.cpu_threads = common.CpuThreads(self.threads, enabled=chats[0].loaded.device == "cpu")
            common.set_seed(self.seed)
        self.transcript.append({"role": "event", "content": "models: " + " vs ".join(c.label for c in chats)})


# ------------------------------------------------------------------------------------------- terminal
class WordWrap:
    """Streamed text broken between words (a terminal cuts anywhere): a word is held until it is complete."""

    def __init__(self, width: int, column: int = 0):
        self.width, self.column, self.held = max(width, 8), column, ""

    def feed(self, text: str, final: bool = False) -> str:
        from rich.cells import cell_len
        *parts, self.held = re.split(r"([ \n])", self.held + text)  # words and the gaps; the last word may grow
        parts, self.held = (parts + [self.held], "") if final else (parts, self.held)
        out = []
        for part in parts:
            if part == "\n":
                self.column = 0
            elif part == " " and self.column >= self.width:
                continue  # the line is full: the next word starts the next one anyway
            elif part not in " " and self.column and self.column + cell_len(part) > self.width:
                out.append("\n")
                self.column = 0
            out.append(part)
            self.column += cell_len(part) if part != "\n" else 0
        return "".join(out)


class Terminal:
    """A live, coloured terminal; or plain text with the answers on stdout and everything else on stderr."""

    def __init__(self, batch: bool):
        self.out = common.make_console()
        self.live = self.out.is_terminal
        self.notes = common.make_console(stderr=True) if batch else self.out

    def info(self, text: str) -> None:
        self.notes.print(text, style="dim", markup=False, soft_wrap=True)

    def error(self, text: str) -> None:
        self.notes.print(f"error: {text}", style="bold red", markup=False, soft_wrap=True)

    def ask(self, prompt: str, colour: bool = False) -> str:
        """input(prompt): readline must know the prompt, or an empty Enter stacks them up as `you> you> you>`."""
        if colour and self.out.color_system:
            on, off = "\x1b[1;32m", "\x1b[0m"  # bold green
            if "readline" in sys.modules:  # \x01..\x02: bytes that take no room on the line
                on, off = f"\x01{on}\x02", f"\x01{off}\x02"
            prompt = f"{on}{prompt.rstrip()}{off} "
        return input(prompt)

    def stream(self, label: str, pieces, stats: ReplyStats) -> str:
        """Print a reply as it is generated; Ctrl-C ends it early and the chat goes on."""
        text, wrap = "", None
        if self.live:
            self.out.print(f"{label}> ", style="bold cyan", end="", markup=False)
            wrap = WordWrap(self.out.width, column=len(label) + 2)
        try:
            for piece in pieces:
                text += piece
                print(wrap.feed(piece) if wrap else piece, end="", flush=True)
        except KeyboardInterrupt:
            pass  # the reply ends, the chat goes on
        finally:
            pieces.close()  # marks the reply interrupted and takes its memory reading
        print(wrap.feed("", final=True) if wrap else "", flush=True)
        self.info(stats.line())
        return text

    def compare(self, labels: list, generators: list, stats: list) -> list:
        """Two replies streaming in two columns (redrawn live in a terminal, printed once when plain)."""
        texts = ["" for _ in labels]

        def interleave(on_step) -> None:  # in turns: both stream at once without fighting over the same cores
            active = list(range(len(generators)))
            while active:
                for i in list(active):
                    try:
                        texts[i] += next(generators[i])
                    except StopIteration:
                        active.remove(i)
                    on_step()
        try:
            if self.live:
                from rich.live import Live
                with Live(compare_table(labels, texts, stats, live=True), console=self.out, transient=True,
                          refresh_per_second=10) as live:
                    interleave(lambda: live.update(compare_table(labels, texts, stats, live=True)))
            else:
                interleave(lambda: None)
        except KeyboardInterrupt:
            for one in stats:
                if one.stop_reason == "running":
                    one.stop_reason = "interrupted"
        finally:
            for generator in generators:
                generator.close()
        self.out.print(compare_table(labels, texts, stats, live=self.live))
        return texts


def compare_table(labels: list, texts: list, stats: list, live: bool):
    from rich import box
    from rich.table import Table
    from rich.text import Text
    table = Table(box=box.ROUNDED if live else box.ASCII, expand=True, show_lines=True)
    for label in labels:
        table.add_column(label, ratio=1, style="cyan" if live else None, header_style="bold")
    table.add_row(*[Text(text, overflow="fold") for text in texts])
    table.add_row(*[Text("..." if one.stop_reason == "running" else one.line(memory=False), style="dim")
                    for one in stats])
    return table


# ------------------------------------------------------------------------------------------ models
def downloaded_models(models_dir: Path) -> list:
    """(name, status) for registry models that can load without the hub (models.model_on_disk) and other model
    folders."""
    found = [(name, models.DISK_STATES[state]) for name in models.REGISTRY
             for _, state in [models.model_on_disk(name, models_dir, look_in_hub_cache=False)] if state != "missing"]
    folders = sorted(config.parent for config in models_dir.glob("[!.]*/config.json"))
    return found + [(str(folder), "local folder") for folder in folders if folder.name not in models.REGISTRY]


def count_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def choose_model(ui: Terminal, models_dir: Path) -> str | None:
    """The start-up menu: a number, a name or a path; Enter takes the default model; Ctrl-D gives None."""
    from rich.table import Table
    choices = downloaded_models(models_dir)
    table = Table("#", "model", "parameters", "status", title="Downloaded models", title_justify="left")
    for number, (name, status) in enumerate(choices, 1):
        spec = models.REGISTRY.get(name)  # None for a local folder
        table.add_row(str(number), name, count_text(spec.n_params) if spec else "?", status)
    ui.out.print(table)
    ui.info("Others: `python download_models.py --list` shows every model and how to download it; "
            "or type a model folder or .gguf path.")
    while True:
        try:
            answer = ui.ask(f"Model [1-{len(choices)}, name or path; Enter = {models.DEFAULT_MODEL}]: ").strip()
        except EOFError:
            ui.out.print()
            return None
        if not answer:
            return models.DEFAULT_MODEL
        if not answer.isdigit():
            return answer
        if 1 <= int(answer) <= len(choices):
            return choices[int(answer) - 1][0]
        ui.error(f"There is no model number {answer}.")


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


def load_models(names: list, options: dict, log, loaded: dict | None = None) -> list:
    """ChatModels for the names, reusing those in `loaded` (label -> ChatModel) and loading each label once."""
    loaded, chats = dict(loaded or {}), []
    for name in names:
        if isinstance(name, ChatModel):
            chats.append(name)
            continue
        label = models.resolve_model(name, options["models_dir"]).label
        chats.append(loaded.get(label) or load_chat_model(name, **options, log=log))
        loaded[label] = chats[-1]
    return chats


def open_models(session: Session, ui: Terminal, names: list) -> None:
    """Make the named models the ones that answer; models no longer named are dropped (no weights pile up)."""
    session.use(load_models(names, session.load_options, ui.info, {chat.label: chat for chat in session.chats}))


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


def answer(session: Session, ui: Terminal, user_text: str) -> None:
    """One prompt, answered by the current model or, when comparing, by both side by side."""
    session.cpu_threads.update()
    generators, stats = [], []
    for side in session.sides:  # each side trims its own history and says so
        chat = side.chat
        ids, n_dropped, budget = build_prompt(chat, side.history, session.settings, user_text)
        if n_dropped:
            del side.history[:n_dropped]
            ui.info(f"(history trimmed: dropped the {n_dropped} oldest messages to fit {chat.label}'s "
                    f"{chat.context_tokens}-token context; the {len(ids)} tokens kept are encoded again, once)")
        if budget < session.settings.max_new_tokens:
            ui.info(f"(only {budget} tokens of {chat.label}'s context are left for the reply)")
        stats.append(ReplyStats(chat.label, n_trimmed_messages=n_dropped, weight_bytes=chat.loaded.weight_bytes))
        generators.append(stream_reply(side, ids, session.settings, budget, stats[-1]))
    session.transcript.append({"role": "user", "content": user_text})
    if len(generators) == 1:
        texts = [ui.stream(chat.label, generators[0], stats[0])]
    else:
        texts = ui.compare(column_labels(session.chats), generators, stats)
    settings = dataclasses.asdict(session.settings)
    for side, text, one in zip(session.sides, texts, stats):
        side.remember(user_text, text)
        session.transcript.append({"role": "assistant", "model": side.chat.label, "content": text,
                                   "settings": settings,
                                   "stats": {**dataclasses.asdict(one), "decode_tok_per_sec": one.decode_tok_per_sec}})
    if len(stats) == 2:
        peak, kind = common.memory_reading(session.chats[0].loaded.device, peak=True)
        summary = speed_summary(*stats, same_tokenizer=session.same_vocab)
        session.transcript.append({"role": "comparison", "content": summary, "peak_memory_bytes": peak,
                                   "memory_kind": kind})
        ui.info(f"{summary} Process peak {MEMORY_WORDS[kind]} {common.human_bytes(peak)} (both models).")


def column_labels(chats: list) -> list:
    labels = [chat.label for chat in chats]
    return labels if len(set(labels)) == len(labels) else [f"{label} #{i + 1}" for i, label in enumerate(labels)]


def speed_summary(a: ReplyStats, b: ReplyStats, same_tokenizer: bool) -> str:
    """Which model decoded faster, by what factor, and how their first tokens compared."""
    if not (a.decode_tok_per_sec and b.decode_tok_per_sec):
        return "Too few tokens in one of the replies to compare speeds."
    fast, slow = sorted((a, b), key=lambda s: s.decode_tok_per_sec, reverse=True)
    ratio = fast.decode_tok_per_sec / slow.decode_tok_per_sec
    text = (f"{fast.model} was faster: {ratio:.2f}x the tokens/sec of {slow.model} "
            f"({fast.decode_tok_per_sec:.1f} vs {slow.decode_tok_per_sec:.1f} tok/s); "
            f"first token after {fast.ttft_sec:.2f} s vs {slow.ttft_sec:.2f} s.")
    if not same_tokenizer:
        text += (f" Their tokenizers differ, so a token is not the same amount of text: the whole replies took "
                 f"{fast.generate_sec:.2f} s vs {slow.generate_sec:.2f} s.")
    return text


# ------------------------------------------------------------------------------------------ commands
def set_setting(settings: Settings, field: str, text: str, prefix: str = "") -> None:
    """Set one sampling setting from text, refusing values outside SETTING_LIMITS in the user's own words
    (prefix "--" when the value came from a flag)."""
    if field == "system":
        settings.system = "" if text == "off" else text
        return
    word, kind, low, high = SETTING_LIMITS[field]
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:  # NaN fails the comparison too
        what = "a whole number" if kind is int else "a number"
        raise common.UserError(f"{prefix}{word} must be {what} from {low:g} to {high:g}, not '{text}'.")
    setattr(settings, field, value)


def command_setting(session: Session, ui: Terminal, name: str, arg: str) -> None:
    """/temp, /top-p, /max-new-tokens and /system: show the value, or set it."""
    field = SETTING_COMMANDS[name]
    if name == "/max-tokens":
        ui.info("(/max-tokens is now /max-new-tokens, like the flag)")
    if arg:
        set_setting(session.settings, field, arg)
        session.transcript.append({"role": "event", "content": f"{name} {arg}"})
    value = getattr(session.settings, field)
    if field == "system":
        ui.info(f"system prompt: {value!r}" if value else "system prompt: none (the template's default)")
    else:
        ui.info(f"{SETTING_LIMITS[field][0]} = {value!r}")


def command_compare(session: Session, ui: Terminal, arg: str, interactive: bool) -> None:
    names = arg.split()
    if names == ["off"]:
        session.use(session.chats[:1])
        ui.info(f"Only {session.chats[0].label} answers now (a fresh conversation).")
        return
    if not names and interactive:
        names = [choose_model(ui, session.load_options["models_dir"])]
        if names == [None]:
            return
    if len(names) not in (1, 2):
        raise common.UserError("Use /compare B (against the current model), /compare A B, or /compare off.")
    open_models(session, ui, ([session.chats[0]] + names) if len(names) == 1 else names)
    ui.info(f"Comparing {' and '.join(column_labels(session.chats))}: each prompt goes to both "
            "(a fresh conversation for each).")


def save_transcript(session: Session) -> Path:
    """<results>/chat-<model>-<stamp>.json: the transcript, every reply's timings, the settings and the models."""
    first = session.chats[0].loaded
    options = session.load_options
    config = {"settings": dataclasses.asdict(session.settings), "device": first.device, "dtype": first.dtype,
              "quantize": options["quantize"], "context_tokens": options["context_tokens"],
              "seed": session.seed, "models": [chat.label for chat in session.chats]}
    record = common.result_record("chat", config, common.environment(first.device), model=first.identity(),
                                  models=list(session.identities.values()), transcript=session.transcript,
                                  n_replies=sum(entry["role"] == "assistant" for entry in session.transcript))
    return common.write_result(record, session.results_dir)


def run_command(session: Session, ui: Terminal, line: str, interactive: bool) -> bool:
    """Handle one /command; False means leave."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        for usage, meaning in COMMANDS.items():
            ui.info(f"  {usage:<22} {meaning}")
    elif name == "/model":
        target = arg or (choose_model(ui, session.load_options["models_dir"]) if interactive else None)
        if target is None:
            ui.info("Answering: " + ", ".join(chat.label for chat in session.chats) + ". Use /model NAME|PATH.")
        else:
            open_models(session, ui, [target])
            ui.info(f"Now chatting with {session.chats[0].label} (a fresh conversation).")
    elif name == "/compare":
        command_compare(session, ui, arg, interactive)
    elif name in SETTING_COMMANDS:
        command_setting(session, ui, name, arg)
    elif name == "/reset":
        session.use(session.chats)
        session.transcript.append({"role": "event", "content": "/reset"})
        ui.info("Conversation forgotten.")
    elif name == "/save":
        try:
            ui.info(f"Saved {save_transcript(session)}")
        except common.UserError as error:  # the conversation is not lost: fix the folder and /save again
            raise common.UserError(f"Not saved: {error} The chat goes on.") from None
    else:
        raise common.UserError(f"Unknown command {name}; /help lists the commands.")
    return True


# ---------------------------------------------------------------------------------------- the loop
def terminal_lines(ui: Terminal):
    """Lines typed at the prompt; Ctrl-C on an empty prompt only reminds how to leave; Ctrl-D leaves."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        try:
            yield ui.ask("you> ", colour=True)
        except KeyboardInterrupt:
            ui.info("\n(Ctrl-C stops a reply; Ctrl-D or /quit leaves)")
        except EOFError:
            ui.out.print()
            return


def chat_loop(session: Session, ui: Terminal, lines, interactive: bool) -> None:
    """Answer lines until they run out or /quit; an error is reported and the chat goes on."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if not interactive:
            ui.info(f"you> {line}")
        try:
            if line.split()[0].lower() not in ("/help", "/quit", "/exit") and not ready(session, ui):
                return  # the user left at the menu shown after a failed background load
            if not line.startswith("/"):
                answer(session, ui, line)
            elif not run_command(session, ui, line, interactive):
                return
        except common.UserError as error:
            session.n_errors += 1
            ui.error(str(error))
        except KeyboardInterrupt:
            ui.info("(cancelled)")


def start_models(session: Session, ui: Terminal, names: list | None, interactive: bool) -> bool:
    """The models named on the command line, else the menu (or, without a terminal, the default model). In a
    terminal they load in the background (see ready()). False: the user left at the menu."""
    models_dir = session.load_options["models_dir"]
    if not interactive:
        if names is None:
            ui.info(f"No --model given: using {models.DEFAULT_MODEL}.")
        open_models(session, ui, names or [models.DEFAULT_MODEL])
        return True
    # Most of a start-up is importing torch and transformers: begun now, while the menu waits for the user.
    imports = in_background(functools.partial(importlib.import_module, transformers_internals.MODEL_CODE_MODULE))
    while True:
        try:
            if names is not None:
                for name in names:  # a mistyped name is said now, not after the load
                    models.resolve_model(name, models_dir)
                break
        except common.UserError as error:
            ui.error(str(error))
        names = [choose_model(ui, models_dir)]
        if names == [None]:
            return False
    notes = []
    session.pending = in_background(functools.partial(load_models, names, session.load_options, notes.append),
                                    after=imports), notes
    return True


def in_background(job, after=None):
    """job() on a daemon thread (leaving never waits for it) as a Future, once `after` is done (two threads in
    transformers' lazy imports at once fail)."""
    from concurrent.futures import Future
    future = Future()

    def run():
        if after is not None:
            after.exception()  # waits
        try:
            future.set_result(job())
        except BaseException as error:  # handed to the main thread by future.result()
            future.set_exception(error)
    threading.Thread(target=run, daemon=True, name="model-loader").start()
    return future


def ready(session: Session, ui: Terminal) -> bool:
    """Wait for the background start-up load, if any; if it failed, the menu again. False: the user left there."""
    while session.pending:
        future, notes = session.pending
        error = future.exception()  # waits; Ctrl-C interrupts the wait, not the load
        session.pending = ()
        for note in notes:  # kept until now: printing would have garbled the line being typed
            ui.info(note)
        if error is None:
            session.use(future.result())
        elif isinstance(error, common.UserError):  # only a terminal loads in the background: offer the menu
            ui.error(str(error))
            if not start_models(session, ui, None, interactive=True):
                return False
        else:
            raise error
    return True


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="registry name, model folder or .gguf file; None: the menu in a terminal, "
                                       f"else {models.DEFAULT_MODEL}")
    which.add_argument("--compare", nargs=2, metavar=("A", "B"), help="answer each prompt with two models side by side")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", default="", help="system prompt; empty: the template's own")
    parser.add_argument("--temperature", type=common.non_negative_float, default=0.7,
                        help=f"sampling temperature, 0 = greedy (at most {SETTING_LIMITS['temperature'][3]:g})")
    parser.add_argument("--top-p", type=common.probability, default=0.9, help="nucleus sampling's mass (0.01 to 1)")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=256, help="longest reply, in tokens")
    common.deprecated_alias(parser, "--max-tokens", "--max-new-tokens")
    parser.add_argument("--context-tokens", type=common.positive_int, default=None,
                        help=f"history window in tokens; None: the model's own, at most {MAX_CONTEXT_TOKENS}")
    parser.add_argument("--device", default="auto", choices=common.DEVICE_CHOICES, help="where the model runs")
    parser.add_argument("--dtype", default="auto", choices=common.DTYPE_CHOICES, help="auto: bfloat16 where supported")
    parser.add_argument("--quantize", default="none", choices=common.QUANTIZE_CHOICES, help="bitsandbytes weights")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, so a piped session is repeatable")
    common.add_common_flags(parser)
    parser.epilog = (parser.epilog or "") + "\n\nCommands in the chat: " + ", ".join(c.split()[0] for c in COMMANDS)
    args = parser.parse_args(argv)
    if args.context_tokens is not None and args.context_tokens < 16:  # not even a template's headers fit
        parser.error("argument --context-tokens: must be at least 16")
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    interactive = sys.stdin.isatty() and args.prompt is None
    ui = Terminal(batch=not interactive)
    settings = Settings(system=args.system, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens)
    for field in SETTING_LIMITS:  # the upper limits of the /commands apply to the flags too
        set_setting(settings, field, str(getattr(settings, field)), prefix="--")
    load_options = {"device": args.device, "dtype": args.dtype, "quantize": args.quantize,
                    "context_tokens": args.context_tokens, "models_dir": args.models_dir}
    session = Session(settings, load_options, results_dir=args.results_dir, threads=args.threads, seed=args.seed)
    if args.prompt is None:  # /save can come: say now, not after an hour of chat, when it cannot work
        try:
            common.check_writable(args.results_dir, what="results folder")
        except common.UserError as error:
            ui.info(f"note: {error} Until then /save will fail.")
    if not start_models(session, ui, args.compare or ([args.model] if args.model else None), interactive):
        return 0
    if args.prompt is not None:
        lines = [args.prompt]
    elif interactive:
        ui.info("Type a message (the model loads meanwhile), or /help for the commands. Ctrl-C stops a reply, "
                "Ctrl-D or /quit leaves.")
        lines = terminal_lines(ui)
    else:
        lines = sys.stdin
    chat_loop(session, ui, lines, interactive)
    if session.n_errors and not interactive:
        ui.info(f"{session.n_errors} input line(s) failed (see the errors above).")
        return 1
    return 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
