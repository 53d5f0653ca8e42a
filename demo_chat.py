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
from pathlib import Path

import common

import models
import transformers_internals
from chat import (MAX_CONTEXT_TOKENS, MEMORY_WORDS, ChatModel, ReplyStats, Settings, Side, build_prompt,
                  count_text, load_chat_model, speed_summary, stream_reply)

# The settings /temp, /top-p and /max-new-tokens change: (the user's word for it, type, lowest, highest).
SETTING_LIMITS = {"temperature": ("temperature", float, 0.0, 5.0), "top_p": ("top-p", float, 0.01, 1.0),
                  "max_new_tokens": ("max-new-tokens", int, 1, 100_000)}
SETTING_COMMANDS = {"/temp": "temperature", "/top-p": "top_p", "/max-new-tokens": "max_new_tokens",
                    "/max-tokens": "max_new_tokens", "/system": "system"}  # /max-tokens: the old spelling
# Multi-line messages: a terminal in bracketed-paste mode wraps pasted text in these, so a pasted block is one
# message rather than one turn per line; typed by hand, a trailing backslash or a \"\"\" block does the same.
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"
BLOCK_MARK = '"""'
MULTILINE_HELP = ('A message of several lines: paste it (it arrives whole), end each line but the last with \\, or '
                  'put it between two lines that are just """.')
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
class Session:
    settings: Settings
    # how models load (the keywords of chat.load_chat_model)
    device: str
    dtype: str
    quantize: str
    context_tokens: int | None
    models_dir: Path
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


def choose_model(ui: Terminal, models_dir: Path) -> str | None:
    """The start-up menu: a number, a name or a path; Enter takes the default model; Ctrl-D gives None."""
    from rich.table import Table
    choices = downloaded_models(models_dir)
    table = Table(title="Downloaded models", title_justify="left")
    table.add_column("#", no_wrap=True)
    # The name is what the user may type: never cut at a narrow terminal (a path folds onto more lines instead).
    table.add_column("model", no_wrap=True, overflow="fold",
                     min_width=max((len(name) for name, _ in choices if name in models.REGISTRY), default=5))
    table.add_column("parameters")
    table.add_column("status")
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


def load_models(session: Session, names: list, log, loaded: dict | None = None) -> list:
    """ChatModels for the names, reusing those in `loaded` (label -> ChatModel) and loading each label once."""
    loaded, chats = dict(loaded or {}), []
    for name in names:
        if isinstance(name, ChatModel):
            chats.append(name)
            continue
        label = models.resolve_model(name, session.models_dir).label
        chats.append(loaded.get(label) or load_chat_model(
            name, device=session.device, dtype=session.dtype, quantize=session.quantize,
            context_tokens=session.context_tokens, models_dir=session.models_dir, log=log))
        loaded[label] = chats[-1]
    return chats


def open_models(session: Session, ui: Terminal, names: list) -> None:
    """Make the named models the ones that answer; models no longer named are dropped (no weights pile up)."""
    session.use(load_models(session, names, ui.info, {chat.label: chat for chat in session.chats}))


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
        names = [choose_model(ui, session.models_dir)]
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
    config = {"settings": dataclasses.asdict(session.settings), "device": first.device, "dtype": first.dtype,
              "quantize": session.quantize, "context_tokens": session.context_tokens,
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
        ui.info(MULTILINE_HELP)
    elif name == "/model":
        target = arg or (choose_model(ui, session.models_dir) if interactive else None)
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
def terminal_reader(ui: Terminal):
    """read(continuing) -> the next line typed at the prompt, or None when Ctrl-D leaves. Ctrl-C on an empty prompt
    only reminds how to leave; in the middle of a multi-line message it drops that message."""
    gnu_readline = False
    with contextlib.suppress(ImportError):
        import readline  # line editing and history for input()
        gnu_readline = "libedit" not in (readline.__doc__ or "")
    if not gnu_readline and ui.live:  # GNU readline turns bracketed paste on and off itself; otherwise we do
        import atexit
        print("\x1b[?2004h", end="", flush=True)
        atexit.register(print, "\x1b[?2004l", end="", flush=True)

    def read(continuing: bool) -> str | None:
        while True:
            try:
                return ui.ask("...> " if continuing else "you> ", colour=True)
            except KeyboardInterrupt:
                if continuing:
                    raise
                ui.info("\n(Ctrl-C stops a reply; Ctrl-D or /quit leaves)")
            except EOFError:
                ui.out.print()
                return None
    return read


def messages(read_line):
    """The messages in a stream of lines (read_line(continuing) -> line or None at the end). A message is one
    line, or several: a bracketed paste (the terminal wraps pasted text in ESC[200~ ... ESC[201~), lines that end
    in a backslash (it is dropped), or a block between two lines that are just \"\"\"."""
    while (line := read_line(False)) is not None:
        try:
            yield gather(line.rstrip("\r\n"), read_line)
        except KeyboardInterrupt:
            continue  # Ctrl-C in the middle of a multi-line message drops it


def gather(line: str, read_line) -> str:
    parts, end = [line], None
    if PASTE_START in line:
        parts[0], end = line.replace(PASTE_START, ""), PASTE_END
    elif line.strip() == BLOCK_MARK:
        parts, end = [], BLOCK_MARK
    elif line.endswith("\\"):
        parts[0], end = line[:-1], "\\"
    while end is not None and not (end == PASTE_END and PASTE_END in parts[-1]):
        more = read_line(True)
        if more is None:
            break
        more = more.rstrip("\r\n")
        if end == BLOCK_MARK and more.strip() == BLOCK_MARK:
            break
        if end == "\\" and not more.endswith("\\"):
            parts.append(more)
            break
        parts.append(more[:-1] if end == "\\" else more)
    return "\n".join(parts).replace(PASTE_END, "")


def chat_loop(session: Session, ui: Terminal, lines, interactive: bool) -> None:
    """Answer messages until they run out or /quit; an error is reported and the chat goes on."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        if not interactive:
            ui.info(f"you> {line}")
        try:
            state = "ready" if line.split()[0].lower() in ("/help", "/quit", "/exit") else ready(session, ui)
            if state == "left":
                return  # the user left at the menu shown after a failed background load
            if state == "replaced":  # typed for the model that failed: not for the one picked since
                ui.info(f"(not sent: that was typed for the model that failed to load; type it again for "
                        f"{' and '.join(column_labels(session.chats))})")
                continue
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
    models_dir = session.models_dir
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
    session.pending = in_background(functools.partial(load_models, session, names, notes.append),
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


def ready(session: Session, ui: Terminal) -> str:
    """Wait for the background start-up load, if any; if it failed, the menu again. "ready": the model that was
    loading answers; "replaced": another model, picked after the failure; "left": the user left at the menu."""
    state = "ready"
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
                return "left"
            state = "replaced"
        else:
            raise error
    return state


def parse_args(argv=None):
    parser = common.argument_parser(__doc__)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="registry name, model folder or .gguf file; None: the menu in a terminal, "
                                       f"else {models.DEFAULT_MODEL}")
    which.add_argument("--compare", nargs=2, metavar=("A", "B"), help="answer each prompt with two models side by side")
    parser.add_argument("--prompt", help="answer this one prompt and exit (it may hold newlines)")
    parser.add_argument("--system", default="", help="system prompt; empty: the template's own")
    parser.add_argument("--temperature", type=common.non_negative_float, default=0.7,
                        help=f"sampling temperature, 0 = greedy (at most {SETTING_LIMITS['temperature'][3]:g})")
    parser.add_argument("--top-p", type=common.probability, default=0.9, help="nucleus sampling's mass (0.01 to 1)")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=256, help="longest reply, in tokens")
    common.deprecated_alias(parser, "--max-tokens", "--max-new-tokens")
    parser.add_argument("--context-tokens", type=common.positive_int, default=None,
                        help=f"history window in tokens; None: the model's own, at most {MAX_CONTEXT_TOKENS}")
    common.add_common_flags(parser, "--device", "--dtype", "--quantize", "--seed", "--threads", "--models-dir",
                            "--results-dir", defaults={"--seed": 0})
    parser.epilog = (parser.epilog or "") + "\n\nCommands in the chat: " + ", ".join(c.split()[0] for c in COMMANDS) \
        + ".\n" + MULTILINE_HELP
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():  # nothing to answer: say so before any model loads
        parser.error("argument --prompt: the prompt is empty; give the text to answer")
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
    session = Session(settings, device=args.device, dtype=args.dtype, quantize=args.quantize,
                      context_tokens=args.context_tokens, models_dir=args.models_dir, results_dir=args.results_dir,
                      threads=args.threads, seed=args.seed)
    if args.prompt is None:  # /save can come: say now, not after an hour of chat, when it cannot work
        try:
            common.check_writable(args.results_dir, what="results folder")
        except common.UserError as error:
            ui.info(f"note: {error} Until then /save will fail.")
    if not start_models(session, ui, args.compare or ([args.model] if args.model else None), interactive):
        return 0
    if args.prompt is not None:
        lines = [args.prompt]  # as given: a one-shot prompt may hold newlines already
    elif interactive:
        ui.info("Type a message (the model loads meanwhile), or /help for the commands. Ctrl-C stops a reply, "
                "Ctrl-D or /quit leaves.")
        lines = messages(terminal_reader(ui))
    else:
        lines = messages(lambda continuing: sys.stdin.readline() or None)
    chat_loop(session, ui, lines, interactive)
    if session.n_errors and not interactive:
        ui.info(f"{session.n_errors} input line(s) failed (see the errors above).")
        return 1
    return 0


def main(argv=None) -> int:
    return common.run_cli(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
