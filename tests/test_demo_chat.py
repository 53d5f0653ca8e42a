"""demo_chat.py driven the way a person uses it: piped lines, one-shot prompts, and a pseudo-terminal with Ctrl-C.

Every test runs the real script in a subprocess (tiny random models for the mechanics, SmolLM2-135M for real
answers); the pseudo-terminal test makes the pty the child's controlling terminal so that \\x03 really sends SIGINT.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
import types
from pathlib import Path

import records


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "demo_chat.py"
PYTHON = sys.executable
# One torch thread: the tests check behaviour, not speed, and on a shared machine two spinning OpenMP threads per
# process run several times slower than one (--threads 0, the default, would take every idle core).
THREADS_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ONE_THREAD = ["--threads", "1"]
# CSI sequences (colours, cursor moves), OSC sequences and two-character escapes.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-Z\\-_]")


def run_chat(args: list, stdin: str = "", env: dict | None = None, timeout: float = 180):
    env = {**os.environ, **THREADS_ENV, "TERM": "dumb", **(env or {})}
    return subprocess.run([PYTHON, str(SCRIPT), *args, *ONE_THREAD], input=stdin, capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def saved_records(results_dir: Path) -> list:
    return [json.loads(path.read_text()) for path in sorted(results_dir.glob("chat-*.json"))]


class PtySession:
    """The script on a pseudo-terminal that is its controlling terminal (so Ctrl-C becomes SIGINT)."""

    def __init__(self, args: list, env: dict, columns: int = 110, rows: int = 40):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))

        def become_controlling_terminal():
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            # as a shell on a terminal starts it: a runner started in the background (`cmd &` in a script)
            # hands down SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        self.process = subprocess.Popen([PYTHON, str(SCRIPT), *args, *ONE_THREAD], stdin=slave, stdout=slave,
                                        stderr=slave, env=env, cwd=REPO, preexec_fn=become_controlling_terminal)
        os.close(slave)
        self.fd, self.raw, self.reads = master, b"", []  # reads: (monotonic time, bytes) of every read

    def read(self, timeout: float) -> None:
        if select.select([self.fd], [], [], timeout)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                return
            self.raw += data
            self.reads.append((time.monotonic(), data))

    def screen(self) -> str:
        return ANSI.sub("", self.raw.decode("utf-8", "replace"))

    def expect(self, pattern: str, start: int = 0, timeout: float = 90) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (match := re.search(pattern, self.screen()[start:])):
            if time.monotonic() > deadline or self.process.poll() is not None and \
                    not select.select([self.fd], [], [], 0)[0]:
                raise AssertionError(f"{pattern!r} never appeared; the screen ends with:\n{self.screen()[-3000:]}")
            self.read(0.2)
        return match

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        os.close(self.fd)


def test_piped_session_on_tiny_models(tiny_models, results_dir, tmp_path):
    """History, trimming, settings, every error case, a side-by-side comparison and /save in one piped session."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    lines = ["hello there", "the quick brown fox", "tell me about the lazy dog and small models",
             "Paris " * 200,  # longer than the whole 96-token window
             "/temp abc", "/max-new-tokens 1.5", "/bogus", "/model no-such-model", f"/model {broken}",
             "/max-new-tokens 6", "/temp 0", "one more question",
             f"/compare {tiny_models['gpt_neox']}", "What is the capital of France?",
             "/save", "/quit", "never read"]
    done = run_chat(["--model", str(tiny_models["llama"]), "--context-tokens", "96", "--max-new-tokens", "10",
                     "--temperature", "0.8", "--seed", "1"], stdin="\n".join(lines) + "\n")
    assert "\x1b" not in done.stdout and "\x1b" not in done.stderr
    assert "Traceback" not in done.stderr
    assert done.returncode == 1, done.stderr  # the chat went on, but says that some lines failed
    assert done.stderr.count("TTFT ") == 4
    assert "history trimmed: dropped the" in done.stderr
    assert "context window is 96 tokens" in done.stderr
    assert "error: temperature must be a number from 0 to 5, not 'abc'." in done.stderr
    assert "error: max-new-tokens must be a whole number from 1 to 100000, not '1.5'." in done.stderr
    assert "Unknown command /bogus" in done.stderr
    assert "Unknown model 'no-such-model'" in done.stderr
    assert "broken-model/model.safetensors is damaged or truncated" in done.stderr
    assert "never read" not in done.stderr  # /quit left before it
    # the comparison: a plain two-column table on stdout, a base model with a plain prompt, the speed summary
    assert "gpt_neox: " in done.stderr and "plain User/Assistant prompt (no chat template)" in done.stderr
    header = next(line for line in done.stdout.splitlines() if "gpt_neox" in line)
    assert re.fullmatch(r"\| llama +\| gpt_neox +\|", header)  # side by side, one column each
    assert done.stdout.count("TTFT ") == 2
    assert re.search(r"(llama|gpt_neox) was faster: \d+\.\d\dx the tokens/sec of (llama|gpt_neox)", done.stderr)
    # each column shows its own model's weights; the process's peak memory is said once, under the table
    table_rows = [line for line in done.stdout.splitlines() if "TTFT " in line]
    assert len(table_rows) == 1 and table_rows[0].count("weights ") == 2 and "RSS" not in table_rows[0]
    assert done.stderr.count("Process peak RSS") == 1

    [record] = saved_records(results_dir)
    assert record["kind"] == "chat" and record["schema_version"] == records.VERSIONS["chat"]
    assert record["model"]["name"] == "llama" and record["environment"]["versions"]["torch"]
    assert {model["name"] for model in record["models"]} == {"llama", "gpt_neox"}
    replies = [entry for entry in record["transcript"] if entry["role"] == "assistant"]
    users = [entry["content"] for entry in record["transcript"] if entry["role"] == "user"]
    assert record["n_replies"] == len(replies) == 6
    assert [reply["model"] for reply in replies] == ["llama"] * 5 + ["gpt_neox"]
    assert users == ["hello there", "the quick brown fox", "tell me about the lazy dog and small models",
                     "one more question", "What is the capital of France?"]  # the over-long prompt was refused
    stats = [reply["stats"] for reply in replies]
    for one in stats:
        assert one["n_prompt_tokens"] + 10 <= 96 and one["ttft_sec"] > 0
        assert 0 < one["n_completion_tokens"] <= 10 and one["memory_in_use_bytes"] > one["weight_bytes"] > 0
        assert one["stop_reason"] in ("stop_token", "stop_text", "max_tokens")
        assert one["decode_tok_per_sec"] is None or one["decode_tok_per_sec"] > 0
    assert stats[1]["n_trimmed_messages"] == 0 and stats[1]["n_prompt_tokens"] > stats[0]["n_prompt_tokens"]
    # the second turn reuses the first turn's KV cache: at least the first prompt is not computed again
    assert stats[0]["n_cached_tokens"] == 0 and stats[1]["n_cached_tokens"] >= stats[0]["n_prompt_tokens"]
    trimmed = [one for one in stats[2:4] if one["n_trimmed_messages"] > 0]
    assert trimmed and trimmed[0]["n_cached_tokens"] < trimmed[0]["n_prompt_tokens"] // 2  # encoded again
    assert re.search(r"history trimmed: dropped the \d+ oldest messages to fit llama's 96-token context; "
                     r"the \d+ tokens kept are encoded again, once\)", done.stderr)
    assert replies[3]["settings"]["temperature"] == 0 and replies[3]["settings"]["max_new_tokens"] == 6
    assert all(one["n_completion_tokens"] <= 6 for one in stats[3:])
    assert [entry["role"] for entry in record["transcript"]].count("comparison") == 1
    # before the table, stdout carries exactly the single-model replies, nothing else
    assert done.stdout.startswith("".join(reply["content"] + "\n" for reply in replies[:4]) + "+---")


def test_unknown_start_model_is_one_sentence():
    done = run_chat(["--model", "no-such-model", "--prompt", "hi"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: Unknown model 'no-such-model'")
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_one_shot_prompt_on_smollm2(smollm2):
    """--prompt in a shell pipeline: the answer alone on stdout, the timings on stderr."""
    done = run_chat(["--model", "smollm2-135m", "--temperature", "0", "--max-tokens", "24",
                     "--prompt", "What is the capital of France?"])
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "\x1b" not in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1 and "TTFT" not in done.stdout
    timing = re.search(r"TTFT (\d+\.\d+) s, (\d+\.\d) tok/s, prompt (\d+) tok, reply (\d+) tok, RSS", done.stderr)
    assert timing and float(timing[1]) > 0 and float(timing[2]) > 0
    assert int(timing[3]) > 20  # SmolLM2's template adds its default system prompt
    assert 0 < int(timing[4]) < 24  # it ended on <|im_end|>, not on the length limit


def test_terminal_menu_streaming_ctrl_c_and_side_by_side(smollm2, tiny_models):
    """In a real terminal: the menu, a reply streamed token by token, Ctrl-C mid-reply, then /compare."""
    env = {**os.environ, **THREADS_ENV, "TERM": "xterm-256color", "COLUMNS": "110", "LINES": "40"}
    env.pop("NO_COLOR", None)
    chat = PtySession(["--temperature", "0", "--max-new-tokens", "200"], env)
    try:
        chat.expect(r"smollm2-135m\W+135M\W+ready")  # the menu lists the downloaded default model
        chat.expect(r"Enter = smollm2-135m\]: ")
        chat.send("\r")
        chat.expect(r"the model loads meanwhile")
        chat.expect(r"you> ")  # up while the model loads
        assert "\x1b[" in chat.raw.decode("utf-8", "replace")  # colour: it knows it is on a terminal
        chat.read(0.5)
        chat.send("\r")  # an empty Enter: a fresh prompt on a line of its own
        chat.expect(r"you> *\r?\n(\x1b\[[0-9;]*m)*you> ")
        assert "you> you>" not in chat.screen()
        start, n_reads = len(chat.screen()), len(chat.reads)
        chat.send("Count from 1 to 100, separated by commas.\r")
        chat.expect(r"\d+, \d+, \d+, \d+, \d+, ", start=start)
        digit_reads = [when for when, data in chat.reads[n_reads:] if re.search(rb"\d", data)]
        assert len(digit_reads) >= 3 and digit_reads[-1] - digit_reads[0] > 0.05  # streamed, not all at once
        chat.send("\x03")
        chat.expect(r"reply \d+ tok, RSS .*stopped by Ctrl-C", start=start)
        after_stop = len(chat.screen())
        chat.expect(r"you> ", start=after_stop - 5)  # the chat goes on

        chat.send("/max-new-tokens 24\r")
        chat.expect(r"max-new-tokens = 24", start=after_stop)
        chat.send(f"/compare {tiny_models['llama']}\r")
        chat.expect(r"Comparing smollm2-135m and llama", start=after_stop)
        chat.send("Say hello.\r")
        summary = chat.expect(r"was faster: \d+\.\d\dx the tokens/sec", start=after_stop)
        tail = chat.screen()[after_stop:]
        assert re.search(r"│ smollm2-135m +│ llama +│", tail)  # two columns, side by side
        assert tail.count("TTFT ") >= 2 and summary
        assert tail.count("Process peak RSS") == 1
        chat.expect(r"you> ", start=len(chat.screen()) - 5)
        chat.read(0.5)  # let input() take the terminal, or the Ctrl-D lands before readline and is lost
        chat.send("\x04")  # Ctrl-D leaves
        assert chat.process.wait(30) == 0
    finally:
        chat.close()


def test_ctrl_d_at_the_menu_leaves_quietly(tiny_models, tmp_path):
    """The menu names the download script's list, and Ctrl-D there is a way out, not an error."""
    env = {**os.environ, **THREADS_ENV, "TERM": "xterm-256color"}
    chat = PtySession(["--models-dir", str(tmp_path)], env)
    try:
        chat.expect(r"python download_models.py --list")
        chat.expect(r"Enter = smollm2-135m\]: ")
        chat.read(0.5)
        chat.send("\x04")
        assert chat.process.wait(30) == 0
        chat.read(0.5)
        assert "error" not in chat.screen().lower() and "Traceback" not in chat.screen()
    finally:
        chat.close()


def test_word_wrap_breaks_streamed_text_between_words():
    import demo_chat
    text = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun.\nShort line."
    for size in (1, 3, 7):  # however the stream is cut into pieces
        wrap = demo_chat.WordWrap(width=20, column=6)
        shown = "".join(wrap.feed(text[i:i + size]) for i in range(0, len(text), size)) + wrap.feed("", final=True)
        lines = ("x" * 6 + shown).split("\n")  # the label "model> " takes the first 6 columns
        assert all(len(line) <= 20 for line in lines), lines
        assert shown.split() == text.split()  # no word cut, none lost
        assert lines[-1] == "Short line."


def test_save_failure_keeps_the_chat(tiny_models, tmp_path):
    """An unwritable results folder is named at the start; /save then fails in one line and the chat goes on."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should be")
    done = run_chat(["--model", str(tiny_models["llama"]), "--max-new-tokens", "4",
                     "--results-dir", str(blocker / "results")], stdin="hello\n/save\nhello again\n")
    assert "Traceback" not in done.stderr and done.returncode == 1
    assert re.search(r"note: The results folder .*not-a-folder/results cannot be written", done.stderr)
    assert re.search(r"error: Not saved: Could not write chat-llama-\S+\.json into \S+ \(.+\)\. The chat goes on\.",
                     done.stderr)
    assert done.stderr.count("TTFT ") == 2  # the turn after the failed /save was answered


def test_kv_cache_reuse_matches_a_fresh_prefill(tiny_models):
    """The cache a chat keeps holds exactly its token ids: the next token's logits equal a full prefill's,
    also after the cache is cropped back to a shorter common prefix."""
    import torch

    import common

    import chat as chatlib
    import models
    chat = chatlib.load_chat_model(str(tiny_models["llama"]), device="cpu", dtype="float32", quantize="none",
                                   context_tokens=512, models_dir=common.MODELS_DIR, log=lambda *_: None)
    settings = chatlib.Settings(system="", temperature=0.0, top_p=1.0, max_new_tokens=8)
    side = chatlib.Side(chat)
    for text in ("hello there", "the quick brown fox", "and the lazy dog"):
        ids, _, _ = chatlib.build_prompt(chat, side.history, settings, text)
        _, stats, _ = chatlib.turn(side, text, settings)
        assert side.cache.get_seq_length() == len(side.cached_ids)
    assert stats.n_cached_tokens > len(ids) // 2  # the third turn computed only its new tokens

    def next_logits(probe: list):
        n_cached = side.reuse_cache(probe)
        with torch.inference_mode():
            cached = models.forward_logits(chat.loaded.model, probe[n_cached:], side.cache)
            fresh = models.forward_logits(chat.loaded.model, probe, models.new_cache())
        side.cached_ids += probe[n_cached:]
        return n_cached, cached, fresh

    probe, _, _ = chatlib.build_prompt(chat, side.history, settings, "one more")
    n_cached, cached, fresh = next_logits(probe)
    assert 0 < n_cached < len(probe) and torch.allclose(cached, fresh, atol=1e-4)
    half = n_cached // 2
    diverged = probe[:half] + probe[-5:]  # shares only about half of what the cache holds: it is cropped
    n_cached, cached, fresh = next_logits(diverged)
    assert half <= n_cached < len(probe)
    assert side.cache.get_seq_length() == len(diverged) and torch.allclose(cached, fresh, atol=1e-4)


def test_multi_line_messages_from_a_pipe(tiny_models, results_dir):
    """A trailing backslash and a \"\"\" block each make one message of several lines: one reply, not one per line."""
    lines = ["/help", "first line\\", "second line", '"""', "block one", "", "block two", '"""', "single", "/save"]
    done = run_chat(["--model", str(tiny_models["llama"]), "--max-new-tokens", "3"], stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("TTFT ") == 3
    assert "end each line but the last with \\" in done.stderr  # /help says how
    [record] = saved_records(results_dir)
    users = [entry["content"] for entry in record["transcript"] if entry["role"] == "user"]
    assert users == ["first line\nsecond line", "block one\n\nblock two", "single"]


def test_bracketed_paste_in_a_terminal_is_one_message(tiny_models, results_dir):
    """Pasted lines arrive wrapped in ESC[200~ ... ESC[201~: the chat answers them once, as one message."""
    env = {**os.environ, **THREADS_ENV, "TERM": "xterm-256color", "BILLION_LLM_RESULTS_DIR": str(results_dir)}
    chat = PtySession(["--model", str(tiny_models["llama"]), "--max-new-tokens", "3"], env)
    try:
        chat.expect(r"you> ")
        chat.read(0.5)
        chat.send("\x1b[200~pasted one\rpasted two\x1b[201~\r")
        chat.expect(r"TTFT ", timeout=300)  # the model loads in the background meanwhile
        chat.expect(r"you> ", start=len(chat.screen()) - 5)
        chat.send("/save\r")
        chat.expect(r"Saved ")
        chat.read(0.5)
        chat.send("\x04")
        assert chat.process.wait(30) == 0
    finally:
        chat.close()
    [record] = saved_records(results_dir)
    users = [entry["content"] for entry in record["transcript"] if entry["role"] == "user"]
    assert users == ["pasted one\npasted two"]


def test_comparing_a_model_with_itself_names_no_winner():
    import chat
    a = chat.ReplyStats("llama", ttft_sec=0.1, generate_sec=1.1, n_decode_steps=10)
    b = chat.ReplyStats("llama", ttft_sec=0.2, generate_sec=1.2, n_decode_steps=10)
    text = chat.speed_summary(a, b, same_tokenizer=True)
    assert "faster" not in text and text.startswith("Both columns are llama: 10.0 vs 10.0 tok/s")
    other = chat.speed_summary(a, dataclasses.replace(b, model="gpt_neox", generate_sec=2.2), same_tokenizer=True)
    assert other.startswith("llama was faster: 2.00x the tokens/sec of gpt_neox")


def test_menu_never_cuts_a_model_name_at_40_columns(tiny_models, tmp_path, monkeypatch):
    import io

    from rich.console import Console

    import demo_chat
    shutil.copytree(tiny_models["llama"], tmp_path / "stablelm-2-12b-chat")  # the longest registry name
    ui = demo_chat.Terminal(batch=True)
    ui.out = Console(width=40, file=io.StringIO(), highlight=False)
    monkeypatch.setattr(ui, "ask", lambda prompt, colour=False: "1")
    assert demo_chat.choose_model(ui, tmp_path) == "stablelm-2-12b-chat"
    shown = ui.out.file.getvalue()
    assert re.search(r"│ 1 │ stablelm-2-12b-chat │", shown), shown


def test_a_line_typed_during_a_failed_load_is_not_sent_to_the_next_model(monkeypatch):
    """In a terminal the model loads while the user types; when that load fails and the user picks another model
    at the menu, the line typed for the first one is not answered by the second."""
    from concurrent.futures import Future

    import common
    import demo_chat
    failed, loaded = Future(), Future()
    failed.set_exception(common.UserError("broken-model failed to load."))
    loaded.set_result(["the-second-model"])
    ui = demo_chat.Terminal(batch=True)
    session = demo_chat.Session(demo_chat.Settings("", 0.0, 1.0, 4), device="cpu", dtype="float32", quantize="none",
                                context_tokens=None, models_dir=Path("."), results_dir=Path("."), threads=1, seed=0)
    session.pending = (failed, [])
    answered, notes = [], []

    def pick_again(session, ui, names, interactive):
        session.pending = (loaded, [])
        return True
    monkeypatch.setattr(demo_chat, "start_models", pick_again)
    monkeypatch.setattr(demo_chat.Session, "use", lambda self, chats: setattr(self, "sides", [
        types.SimpleNamespace(chat=chat) for chat in chats]))
    monkeypatch.setattr(demo_chat, "column_labels", lambda chats: chats)
    monkeypatch.setattr(demo_chat, "answer", lambda session, ui, text: answered.append((session.chats, text)))
    monkeypatch.setattr(ui, "info", notes.append)
    monkeypatch.setattr(ui, "error", notes.append)
    demo_chat.chat_loop(session, ui, ["typed while loading", "typed after the menu"], interactive=True)
    assert answered == [(["the-second-model"], "typed after the menu")]
    assert any("not sent" in note and "the-second-model" in note for note in notes), notes
