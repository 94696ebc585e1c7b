"""Files and the command line against hostile or unlucky input (issue 15): one sentence
and exit code 1, never a traceback, and nothing left half-written.

- Writes: a failed write (disk full, a file-size limit) or a writer killed mid-way
  leaves the file it would replace intact, for every file the project writes.
- streamspec.json: one checked reader; wrong types, ranges, layer counts, paths outside
  the folder are one sentence naming the key (and a property test over random edits).
- Saved conversations: kv.npz is tied to its conversation.json and model by a checksum;
  another conversation's cache, NaN, flipped bytes and truncated files are refused.
- The command line: every number range-checked in one place, usage errors exit 1,
  non-UTF-8 text and a closed stdout handled, profile --json checked before the run.
- Export: the temporary folder of a killed export is removed by the next one.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from builders import SHARPEN, export_tiny, msa_model, sharpened_msa
from streamspec.errors import StreamspecError
from streamspec.runtime import Engine
from streamspec.runtime.conversation import Conversation
from streamspec.runtime.folder import read_folder


def run_python(code: str, *args, **kwargs) -> subprocess.Popen:
    """A child Python running `code` (argv: `args`)."""
    return subprocess.Popen([sys.executable, "-c", code, *args], **kwargs)


def hold_work_folder(out: Path) -> subprocess.Popen:
    """A child that opens an export's temporary folder for `out` (as `export` does),
    prints its path, and waits to be killed."""
    child = run_python("import sys, time; from pathlib import Path\n"
                       "from streamspec.exporter.pipeline import work_folder\n"
                       "with work_folder(Path(sys.argv[1])) as tmp:\n"
                       "    print(tmp, flush=True)\n"
                       "    time.sleep(120)\n", str(out), stdout=subprocess.PIPE, text=True)
    return child


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model with 3 streams, exported after a killed export to the same folder
    left its temporary folder behind: (folder, that leftover). Its own export (the
    other tests share `folder`)."""
    root = tmp_path_factory.mktemp("hardening")
    hf, model = sharpened_msa(root)
    child = hold_work_folder(root / "onnx")
    line = child.stdout.readline().strip()
    child.kill()  # SIGKILL: no cleanup runs
    child.wait()
    # (Without work_folder, before this was fixed: the same leftover, made by hand.)
    leftover = Path(line) if line else Path(tempfile.mkdtemp(prefix=".onnx.tmp-", dir=root))
    assert leftover.is_dir()
    return export_tiny(model, hf, root / "onnx", max_length=128), leftover


@pytest.fixture(scope="module")
def folder(shared_export):
    """The same tiny model with 3 streams (sharpened weights), shared with other test
    files: read only (the tests below edit copies)."""
    return shared_export(sharpen=SHARPEN, max_length=128)


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(folder, provider="cpu")


def cli(*argv: str, commands: tuple = ("generate",)) -> int:
    """`streamspec ARGV` in this process, with only the named commands loaded (the others
    are other people's and may be mid-change)."""
    from streamspec.tools import cli as module

    saved = module.COMMANDS
    module.COMMANDS = {name: name.replace("-", "_") for name in commands}
    try:
        return module.main(list(argv))
    finally:
        module.COMMANDS = saved


CLI_CHILD = ("import sys; from streamspec.tools import cli; cli.COMMANDS = {'generate': 'generate'}; "
             "sys.exit(cli.main())")


# ------------------------------------------------------------------------------ writes
def snapshot(*paths: Path) -> dict:
    return {path: path.read_bytes() for path in paths}


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_failed_write_leaves_every_file_intact(engine, folder, tmp_path, monkeypatch):
    """A full disk at the moment the data is flushed: each writer says so in one sentence
    and the file it would have replaced is unchanged (no temporary file left either)."""
    from streamspec.exporter.pipeline import write_config
    from streamspec.tools import tune
    from streamspec.tools.profiler import report as reports

    chat = engine.conversation()
    chat.send("Hi!", max_new_tokens=4, ignore_eos=True)
    saved = chat.save(tmp_path / "chat")
    report = tmp_path / "profile.json"
    reports.save({"format": reports.FORMAT, "version": reports.VERSION, "old": True}, report)
    tuned = tmp_path / "tuned"
    shutil.copytree(folder, tuned)
    before = snapshot(saved / "conversation.json", saved / "kv.npz", report, tuned / "streamspec.json")
    chat.send("More?", max_new_tokens=4, ignore_eos=True)  # the next save would change both files

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StreamspecError, match="Cannot save the conversation .*No space left on device"):
        chat.save(saved)
    with pytest.raises(StreamspecError, match="The report cannot be written .*No space left on device"):
        reports.save({"format": reports.FORMAT, "version": reports.VERSION, "new": True}, report)
    choice = {"budget": 2, "lookup": 0, "expected_speedup": 1.0, "reason": "test"}
    with pytest.raises(OSError):
        tune.write_choice(tuned, {"choice": choice, "date": "today", "system": {"device_name": "cpu"}, "threads": 1})
    with pytest.raises(OSError):
        write_config({"format": "changed"}, tuned)
    assert snapshot(*before) == before
    assert hidden_files(saved) == hidden_files(tuned) == hidden_files(tmp_path) == []


def test_a_writer_killed_mid_way_leaves_the_old_file(tmp_path):
    target = tmp_path / "streamspec.json"
    target.write_text('{"old": true}\n')
    child = run_python("import sys, time\nfrom streamspec.files import write_atomic\n"
                       "def slow(tmp):\n"
                       "    with open(tmp, 'w') as file:\n"
                       "        file.write('{\"half\": ')\n"
                       "        file.flush()\n"
                       "        print('writing', flush=True)\n"
                       "        time.sleep(120)\n"
                       "write_atomic(sys.argv[1], slow)\n", str(target), stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert target.read_text() == '{"old": true}\n'


def test_a_written_file_has_the_usual_mode(tmp_path):
    """Atomic writes go through a 0600 temporary file; the result must still be readable
    as a file written directly would be (0666 less the umask), and an existing file
    keeps its mode."""
    import os

    from streamspec.files import write_text

    (tmp_path / "direct.json").write_text("{}")
    write_text(tmp_path / "new.json", "{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == (tmp_path / "direct.json").stat().st_mode & 0o777
    (tmp_path / "kept.json").write_text("{}")
    os.chmod(tmp_path / "kept.json", 0o640)
    write_text(tmp_path / "kept.json", "[]")
    assert (tmp_path / "kept.json").stat().st_mode & 0o777 == 0o640


def test_a_file_size_limit_leaves_the_old_file(engine, tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored: the write fails with EFBIG): the profile report
    keeps its old content and the command's sentence names the cause."""
    target = tmp_path / "report.json"
    target.write_text('{"old": true}\n')
    child = run_python(
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))\n"
        "from streamspec.errors import StreamspecError\n"
        "from streamspec.tools.profiler.report import save\n"
        "try:\n"
        "    save({'big': 'x' * 10000}, sys.argv[1])\n"
        "except StreamspecError as error:\n"
        "    print(error)\n", str(target), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = child.communicate(timeout=120)
    assert "The report cannot be written" in out and "Traceback" not in err
    assert target.read_text() == '{"old": true}\n'


# ------------------------------------------------------------------------------ streamspec.json
def edited(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of `folder` whose streamspec.json went through `edit(raw)`."""
    copy_dir = tmp_path / "edited"
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.copytree(folder, copy_dir)
    raw = json.loads((copy_dir / "streamspec.json").read_text())
    edit(raw)
    (copy_dir / "streamspec.json").write_text(json.dumps(raw))
    return copy_dir


def setter(key: str, value):
    def edit(raw: dict) -> None:
        *sections, last = key.split(".")
        for section in sections:
            raw = raw.setdefault(section, {})
        raw[last] = value
    return edit


@pytest.mark.parametrize("key, value, words", [
    ("tree.budget", "x", 'tree.budget must be an integer between 0 and 4096, got "x"'),
    ("graph.dtype", "bf16", 'graph.dtype must be "fp32" or "fp16", got "bf16"'),
    ("model.num_layers", "four", 'model.num_layers must be an integer between 1 and 4096, got "four"'),
    ("model.num_layers", 3, "graph.cache_inputs must list key_cache.0 to value_cache.2 (the caches of 3 layers"),
    ("graph.max_length", float("nan"), "graph.max_length must be an integer between 16 and 1048576, got NaN"),
    ("graph.max_length", 100.0, "graph.max_length must be an integer"),
    ("graph.max_length", 4096, "exceeds the model's 2048 positions"),
    ("tree.prune", 1.5, "tree.prune must be a number in [0.0, 1.0), got 1.5"),
    ("tree.lookup", True, "tree.lookup must be an integer"),
    ("streams.num_msa_layers", 9, "streams.num_msa_layers (9) exceeds model.num_layers (4)"),
    ("model.num_kv_heads", 3, "must be a multiple of model.num_kv_heads (3)"),
    ("tokens.eos_token_ids", [2, "x"], "tokens.eos_token_ids must be a list of token ids"),
    ("attention.backend", "fast", 'attention.backend must be "portable" or "custom"'),
    ("format_version", "1", 'format_version must be the integer 1, got "1"'),
    ("format_version", 2, "was exported in format version 2, but this streamspec reads version 1"),
    ("graph.file", "../model.onnx", 'graph.file must be a file name inside the folder, got "../model.onnx"'),
    ("graph.file", "/etc/passwd", 'graph.file must be a file name inside the folder, got "/etc/passwd"'),
    ("tokenizer.file", "../../tokenizer.json", "tokenizer.file must be a file name inside the folder"),
    ("tokenizer.chat_template", "/etc/hostname", "tokenizer.chat_template must be a file name inside the folder"),
    ("graph.external_data", "sub/../../x", "graph.external_data must be a file name inside the folder"),
])
def test_hand_edited_streamspec_json_is_one_sentence(folder, tmp_path, key, value, words):
    with pytest.raises(StreamspecError) as refused:
        read_folder(edited(folder, tmp_path, setter(key, value)))
    message = str(refused.value)
    assert words in message and "\n" not in message, message


def test_a_file_linked_from_outside_the_folder_is_refused(folder, tmp_path):
    secret = tmp_path / "secret.jinja"
    secret.write_text("{{ 'outside' }}")
    copy_dir = edited(folder, tmp_path, setter("tokenizer.chat_template", "template.jinja"))
    (copy_dir / "template.jinja").symlink_to(secret)
    with pytest.raises(StreamspecError, match="names 'template.jinja', which is outside"):
        read_folder(copy_dir)


@pytest.mark.parametrize("key, value, words", [
    ("model.num_kv_heads", 1, "has caches of shape [1, 2, 'cache_length', 16], but streamspec.json gives 1 KV heads"),
    ("model.head_dim", 8, "but streamspec.json gives 2 KV heads of 8 values"),
])
def test_a_config_that_does_not_match_the_graph_is_one_sentence(folder, tmp_path, key, value, words):
    with pytest.raises(StreamspecError) as refused:
        Engine(edited(folder, tmp_path, setter(key, value)), provider="cpu")
    assert words in str(refused.value)


def test_any_edit_of_streamspec_json_is_loaded_or_one_sentence(folder, tmp_path):
    """Property: whatever a hand edit puts at any key (or removes), `read_folder` gives a
    checked config whose properties all read, or a StreamspecError; never another
    exception. Bounded: 150 examples, no deadline (disk copies)."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    raw = json.loads((folder / "streamspec.json").read_text())
    work = tmp_path / "fuzzed"
    shutil.copytree(folder, work)
    keys = sorted(_paths(raw))
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40)
                               | st.floats(allow_nan=True) | st.text(max_size=10),
                               lambda inner: st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
    properties = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "num_streams",
                  "num_msa_layers", "model_path", "max_length", "dtype", "candidates", "backend",
                  "streams_for_all_nodes", "eos_token_ids", "default_budget", "default_lookup", "can_prune",
                  "default_prune")

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(edits=st.lists(st.tuples(st.sampled_from(keys), st.booleans(), json_values), min_size=1, max_size=3))
    def check(edits):
        changed = copy.deepcopy(raw)
        for key, remove, value in edits:
            _set(changed, key, None if remove else value, remove)
        (work / "streamspec.json").write_text(json.dumps(changed))
        try:
            config = read_folder(work)
        except StreamspecError as error:
            assert "\n" not in str(error)
            return
        for name in properties:
            getattr(config, name)
        config.fingerprint()

    check()


def _paths(raw: dict, prefix: str = "") -> set:
    """Every dotted key of a JSON object (sections and their keys)."""
    keys = set()
    for key, value in raw.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _paths(value, f"{prefix}{key}.")
    return keys


def _set(raw: dict, key: str, value, remove: bool) -> None:
    *sections, last = key.split(".")
    for section in sections:
        raw = raw.get(section)
        if not isinstance(raw, dict):
            return  # an earlier edit replaced the section
    if remove:
        raw.pop(last, None)
    else:
        raw[last] = value


# ------------------------------------------------------------------------------ saved conversations
@pytest.fixture()
def two_saved(engine, tmp_path):
    """Two conversations of the same model, saved: (folder A, folder B)."""
    folders = []
    for name, question in (("a", "Hi! Who are you?"), ("b", "Hi! What is it??")):  # as long: same cache shape
        chat = engine.conversation()
        chat.send(question, max_new_tokens=6, ignore_eos=True)
        folders.append(chat.save(tmp_path / name))
    return folders


def test_another_conversations_cache_is_refused(engine, two_saved):
    a, b = two_saved
    shutil.copy(b / "kv.npz", a / "kv.npz")  # same model, same shape of cache
    with pytest.raises(StreamspecError, match="does not belong to .*conversation.json"):
        Conversation.load(engine, a)


def test_edited_token_ids_are_refused(engine, two_saved):
    a, _ = two_saved
    state = json.loads((a / "conversation.json").read_text())
    state["token_ids"][0] = (state["token_ids"][0] + 1) % 100
    (a / "conversation.json").write_text(json.dumps(state))
    with pytest.raises(StreamspecError, match="does not belong"):
        Conversation.load(engine, a)


def test_a_nan_cache_is_refused_even_with_a_matching_checksum(engine, two_saved):
    from streamspec.runtime.conversation import cache_identity

    a, _ = two_saved
    state = json.loads((a / "conversation.json").read_text())
    with np.load(a / "kv.npz") as archive:
        kv = archive["kv"].copy()
    kv[0, 0, 0, 0] = np.nan
    np.savez(a / "kv.npz", kv=kv)
    state["kv_sha256"] = cache_identity(state["model"], state["token_ids"][:state["rows"]], kv)
    (a / "conversation.json").write_text(json.dumps(state))
    with pytest.raises(StreamspecError, match="holds NaN or infinite values"):
        Conversation.load(engine, a)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_damaged_cache_file_is_one_sentence(engine, two_saved, damage):
    a, _ = two_saved
    path = a / "kv.npz"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x40  # inside the array's bytes
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(StreamspecError) as refused:
        Conversation.load(engine, a)
    assert "kv.npz" in str(refused.value) and "\n" not in str(refused.value)


def test_an_unverifiable_or_mistyped_state_is_refused(engine, two_saved):
    a, _ = two_saved
    state = json.loads((a / "conversation.json").read_text())
    for change, words in (({"format_version": 1}, "saved in format version 1, but this streamspec reads version 2"),
                          ({"format_version": "2"}, 'format version "2"'),
                          ({"token_ids": [1, 2, 999]}, "valid token ids"),
                          ({"rows": True}, "valid token ids"),
                          ({"messages": [{"role": "user", "content": None}]}, "messages must be a list"),
                          ({"kv_sha256": None}, "checksum")):
        (a / "conversation.json").write_text(json.dumps({**state, **change}))
        with pytest.raises(StreamspecError, match=words.replace("(", r"\(")):
            Conversation.load(engine, a)


def test_a_saved_conversation_still_restores(engine, two_saved):
    a, _ = two_saved
    chat = Conversation.load(engine, a)
    assert chat.cached_rows == len(chat.token_ids) - 1  # all but the last answer token, as saved


# ------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize("argv, words", [
    (["--seed", "-1"], "--seed must be between 0 and 18446744073709551615, got -1"),
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--threads", "-1"], "--threads must be between 1 and"),
    (["--threads", "100000"], "--threads must be between 1 and"),
    (["--max-length", "0"], "--max-length must be at least 16, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--top-p", "0"], "--top-p must be a number in (0, 1], got 0"),
    (["--temperature", "nan"], "--temperature must be a number at least 0, got nan"),
    (["--prune", "1"], "--prune must be a number in [0, 1), got 1"),
    (["--budget", "x"], "--budget must be an integer, got 'x'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--system", "Be brief."], "--system needs --chat"),
])
def test_generate_refuses_bad_numbers_in_one_sentence(folder, capsys, argv, words):
    assert cli("generate", str(folder), "--prompt", "Hi", *argv) == 1
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and err.startswith("streamspec"), err


def test_usage_errors_exit_1(capsys):
    assert cli("generate") == 1
    assert "the following arguments are required: DIR, --prompt" in capsys.readouterr().err
    assert cli() == 1  # no command: the help, and exit code 1
    assert cli("nonsense") == 1
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_engine_refuses_zero_lengths_and_thread_counts(folder):
    for options, words in (({"max_length": 0}, "max_length must be between 16"),
                           ({"threads": 0}, "threads must be between 1 and"),
                           ({"threads": 100000}, "threads must be between 1 and"),
                           ({"memory_budget": "nan"}, "A memory size must be a positive number")):
        with pytest.raises(StreamspecError, match=words):
            Engine(folder, provider="cpu", **options)


def test_generate_with_non_utf8_prompt_is_one_sentence(folder):
    done = subprocess.run([sys.executable, "-c", CLI_CHILD, "generate", str(folder), "--prompt", b"caf\xe9 \xff"],
                          capture_output=True, timeout=300)
    err = done.stderr.decode()
    assert done.returncode == 1 and "Traceback" not in err, err
    assert "--prompt is not valid UTF-8 text (undecodable byte at character 3)" in err


def test_generate_into_a_closed_pipe_stops_quietly(folder):
    """`streamspec generate ... | head -c1`: the reader leaves; no BrokenPipeError traceback."""
    child = subprocess.Popen([sys.executable, "-c", CLI_CHILD, "generate", str(folder), "--prompt", "Hello",
                              "--max-new-tokens", "40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the first piece: every write to stdout fails
    err = child.stderr.read().decode()
    assert child.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


@pytest.mark.parametrize("where", ["parent is a file", "a folder"])
def test_profile_json_is_checked_before_the_run(folder, tmp_path, capsys, monkeypatch, where):
    from streamspec.tools.profiler import collect

    ran = []

    def profile(*args):  # the run would take minutes; the path must be refused before it
        ran.append(1)
        raise StreamspecError("The profile ran.")

    monkeypatch.setattr(collect, "run_profile", profile)
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "profile.json" if where == "parent is a file" else tmp_path
    assert cli("profile", str(folder), "--json", str(out), commands=("profile",)) == 1
    err = capsys.readouterr().err
    assert ("--json cannot be written" in err or "--json is a folder" in err) and not ran, err


def test_the_other_commands_check_their_numbers(folder, capsys):
    for command, argv, words in (
            ("serve", ["--threads", "0"], "--threads must be between 1 and"),
            ("serve", ["--max-queue", "0"], "--max-queue must be between 1 and 100000, got 0"),
            ("profile", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
            ("profile", ["--threads", "100000"], "--threads must be between 1 and"),
            ("export", ["--max-length", "0", "--out", "x"], "--max-length must be at least 16, got 0"),
            ("export", ["--candidates", "0", "--out", "x"], "--candidates must be between 1 and 65536, got 0"),
            ("demo", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
            ("report", ["--width", "0"], "--width must be between 20 and 1000, got 0")):
        target = [] if command == "demo" else [str(folder)]
        assert cli(command, *target, *argv, commands=(command,)) == 1, (command, argv)
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_export_refuses_max_length_zero(tiny_llama_dir, tmp_path):
    from streamspec.exporter import export_model

    with pytest.raises(StreamspecError, match="--max-length must be between 16 and the model's 2048 positions, got 0"):
        export_model(msa_model(tiny_llama_dir), tiny_llama_dir, tmp_path / "out", max_length=0, progress=False)


# ------------------------------------------------------------------------------ export leftovers
def test_the_next_export_removed_a_killed_exports_folder(exported):
    folder, leftover = exported
    assert not leftover.exists() and not leftover.with_name(leftover.name + ".lock").exists()
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(".onnx.tmp-")]
    config = read_folder(folder)  # and the export itself is whole
    assert config.num_streams == 3 and config.max_length == 128 and (folder / "model.onnx").is_file()


def test_stale_export_folders_running_and_unknown_ones(tmp_path):
    from streamspec.exporter.pipeline import clean_stale_exports

    out = tmp_path / "model-onnx"
    running = hold_work_folder(out)
    alive = Path(running.stdout.readline().strip())
    killed = hold_work_folder(out)
    dead = Path(killed.stdout.readline().strip())
    killed.kill()
    killed.wait()
    unknown = tmp_path / ".model-onnx.tmp-old"  # an older streamspec's, without a lock file
    unknown.mkdir()
    said = []
    try:
        assert clean_stale_exports(out, said.append) == [dead]
        assert alive.is_dir() and not dead.exists() and unknown.is_dir()
        assert any(".model-onnx.tmp-old" in line and "remove them if no other export is running" in line
                   for line in said), said
    finally:
        running.kill()
        running.wait()


def test_sigterm_during_a_command_cleans_its_temporary_folder(tmp_path):
    out = tmp_path / "model-onnx"
    child = run_python("import sys, time; from pathlib import Path\n"
                       "from streamspec.exporter.pipeline import work_folder\n"
                       "from streamspec.tools import cli\n"
                       "with cli.exit_on_sigterm(), work_folder(Path(sys.argv[1])) as tmp:\n"
                       "    print(tmp, flush=True)\n"
                       "    time.sleep(120)\n", str(out), stdout=subprocess.PIPE, text=True)
    tmp = Path(child.stdout.readline().strip())
    assert tmp.is_dir()
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 5
    while tmp.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tmp.exists() and not list(tmp_path.iterdir())
