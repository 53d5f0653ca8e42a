"""demo_chat.py driven the way a person uses it: piped lines, one-shot prompts, and a pseudo-terminal with Ctrl-C.

Every test runs the real script in a subprocess (tiny random models for the mechanics, SmolLM2-135M for real
answers); the pseudo-terminal test makes the pty the child's controlling terminal so that \\x03 really sends SIGINT.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "demo_chat.py"
PYTHON = sys.executable
# One torch thread: the tests check behaviour, not speed, and on a shared machine two spinning OpenMP threads per
# process run several times slower than one.
THREADS_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# CSI sequences (colours, cursor moves), OSC sequences and two-character escapes.
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[@-Z\\-_]")


def run_chat(args: list, stdin: str = "", env: dict | None = None, timeout: float = 180):
    env = {**os.environ, **THREADS_ENV, "TERM": "dumb", **(env or {})}
    return subprocess.run([PYTHON, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
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

        self.process = subprocess.Popen([PYTHON, str(SCRIPT), *args], stdin=slave, stdout=slave, stderr=slave,
                                        env=env, cwd=REPO, preexec_fn=become_controlling_terminal)
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


def test_help_lists_commands_and_flags():
    done = run_chat(["--help"])
    assert done.returncode == 0
    for text in ("--compare", "--prompt", "--quantize", "--device", "/compare", "/save", "/max-tokens"):
        assert text in done.stdout


def test_piped_session_on_tiny_models(tiny_models, results_dir, tmp_path):
    """History, trimming, settings, every error case, a side-by-side comparison and /save in one piped session."""
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_models["llama"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    lines = ["hello there", "the quick brown fox", "tell me about the lazy dog and small models",
             "Paris " * 200,  # longer than the whole 96-token window
             "/temp abc", "/bogus", "/model no-such-model", f"/model {broken}",
             "/max-tokens 6", "/temp 0", "one more question",
             f"/compare {tiny_models['gpt_neox']}", "What is the capital of France?",
             "/save", "/quit", "never read"]
    done = run_chat(["--model", str(tiny_models["llama"]), "--context-tokens", "96", "--max-tokens", "10",
                     "--temperature", "0.8", "--seed", "1"], stdin="\n".join(lines) + "\n")
    assert "\x1b" not in done.stdout and "\x1b" not in done.stderr
    assert "Traceback" not in done.stderr
    assert done.returncode == 1, done.stderr  # the chat went on, but says that some lines failed
    assert done.stderr.count("TTFT ") == 4
    assert "history trimmed: dropped the" in done.stderr
    assert "context window is 96 tokens" in done.stderr
    assert "temperature must be a float from 0.0 to 5.0, not 'abc'" in done.stderr
    assert "Unknown command /bogus" in done.stderr
    assert "Unknown model 'no-such-model'" in done.stderr
    assert "broken-model failed to load" in done.stderr
    assert "never read" not in done.stderr  # /quit left before it
    # the comparison: a plain two-column table on stdout, a base model with a plain prompt, the speed summary
    assert "gpt_neox: " in done.stderr and "plain User/Assistant prompt (no chat template)" in done.stderr
    header = next(line for line in done.stdout.splitlines() if "gpt_neox" in line)
    assert re.fullmatch(r"\| llama +\| gpt_neox +\|", header)  # side by side, one column each
    assert done.stdout.count("TTFT ") == 2
    assert re.search(r"(llama|gpt_neox) was faster: \d+\.\d\dx the tokens/sec of (llama|gpt_neox)", done.stderr)

    [record] = saved_records(results_dir)
    assert record["kind"] == "chat" and record["schema_version"] == 1
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
    assert any(one["n_trimmed_messages"] > 0 for one in stats[2:4])
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
    chat = PtySession(["--temperature", "0", "--max-tokens", "200"], env)
    try:
        chat.expect(r"smollm2-135m\W+135M\W+ready")  # the menu lists the downloaded default model
        chat.expect(r"Enter = smollm2-135m\]: ")
        chat.send("\r")
        chat.expect(r"you> ")
        assert "\x1b[" in chat.raw.decode("utf-8", "replace")  # colour: it knows it is on a terminal
        start, n_reads = len(chat.screen()), len(chat.reads)
        chat.send("Count from 1 to 100, separated by commas.\r")
        chat.expect(r"\d+, \d+, \d+, \d+, \d+, ", start=start)
        digit_reads = [when for when, data in chat.reads[n_reads:] if re.search(rb"\d", data)]
        assert len(digit_reads) >= 3 and digit_reads[-1] - digit_reads[0] > 0.05  # streamed, not all at once
        chat.send("\x03")
        chat.expect(r"reply \d+ tok, RSS .*stopped by Ctrl-C", start=start)
        after_stop = len(chat.screen())
        chat.expect(r"you> ", start=after_stop - 5)  # the chat goes on

        chat.send("/max-tokens 24\r")
        chat.expect(r"max_new_tokens = 24", start=after_stop)
        chat.send(f"/compare {tiny_models['llama']}\r")
        chat.expect(r"Comparing smollm2-135m and llama", start=after_stop)
        chat.send("Say hello.\r")
        summary = chat.expect(r"was faster: \d+\.\d\dx the tokens/sec", start=after_stop)
        tail = chat.screen()[after_stop:]
        assert re.search(r"│ smollm2-135m +│ llama +│", tail)  # two columns, side by side
        assert tail.count("TTFT ") >= 2 and summary
        chat.expect(r"you> ", start=len(chat.screen()) - 5)
        chat.read(0.5)  # let input() take the terminal, or the Ctrl-D lands before readline and is lost
        chat.send("\x04")  # Ctrl-D leaves
        assert chat.process.wait(30) == 0
    finally:
        chat.close()
