"""Prompts that the base model writes itself: what people ask a small chat model.

No dataset can be downloaded, yet the streams must learn the model's habits on every
kind of request, not on one source. So the base model plays the user: the chat
template is fed up to the start of a user turn, followed by an *opener* (the first
words of a request of one domain, often with a topic: "Write a short story about a
lighthouse keeper"), and the model samples the rest of the message until it ends its
turn. Requests that need a given text ("Summarise this paragraph:") get the text from
the model too: it writes it as part of the user message.

Each candidate has an index; its opener, topic and sampling seed are a pure function
of (seed, domain, index). Candidates that do not end within the length limit, are too
short, or repeat an earlier prompt (normalised text, or the same first words) are
dropped. The split is decided by a hash of the id, before any answer exists, so each
domain has its own held-out prompts.

Output: one JSON object per line, as `distill.read_prompts` reads them:
    {"id": "self:code:00042", "domain": "code", "split": "train", "index": 42,
     "opener": "...", "messages": [{"role": "user", "content": "..."}]}
The file is appended to line by line; a stopped run resumes after the highest index
it wrote (a half-written last line is dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from .errors import StreamspecError

# ---------------------------------------------------------------------------------
# Domains: openers ({topic} is filled from the domain's topics, {lang} from LANGUAGES).

EVERYDAY = [
    "cooking pasta", "baking bread", "saving money", "learning a language", "sleep", "running",
    "houseplants", "a job interview", "moving to a new city", "coffee", "dogs", "cats", "the weather",
    "public transport", "a birthday party", "gardening", "vitamins", "renting an apartment", "taxes",
    "climate change", "the moon", "volcanoes", "the Roman Empire", "World War II", "the ocean",
    "electric cars", "bicycles", "chess", "football", "the guitar", "photography", "a road trip",
    "camping", "meditation", "stress at work", "making friends", "time management", "recycling",
    "smartphones", "social media", "video games", "museums", "the human heart", "dinosaurs",
    "honey bees", "the solar system", "a healthy breakfast", "vegetarian food", "tea", "chocolate",
    "a wedding speech", "a first car", "credit cards", "the stock market", "a small business",
    "online shopping", "passwords", "the flu", "drinking water", "a rainy day", "birds", "mountains",
]
SCIENCE = [
    "photosynthesis", "gravity", "inflation in economics", "black holes", "DNA", "vaccines",
    "the internet", "machine learning", "blockchain", "electricity", "magnetism", "evolution",
    "the water cycle", "plate tectonics", "supply and demand", "compound interest", "democracy",
    "the immune system", "quantum computing", "encryption", "neural networks", "antibiotics",
    "the greenhouse effect", "relativity", "entropy", "the stock exchange", "a recession",
    "how airplanes fly", "how a refrigerator works", "how batteries work", "recursion",
    "object-oriented programming", "databases", "operating systems", "HTTP", "DNS", "cloud computing",
    "caching", "sorting algorithms", "big O notation", "git branches", "unit tests", "APIs",
    "the placebo effect", "opportunity cost", "the French Revolution", "the Renaissance",
    "nutrition labels", "carbon dating", "tides", "rainbows", "earthquakes", "solar panels",
]
LANGUAGES = [
    "Python", "JavaScript", "TypeScript", "Java", "C", "C++", "Go", "Rust", "Ruby", "PHP", "C#",
    "Kotlin", "Swift", "Bash",
]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "reads a CSV file", "sorts a list of dictionaries by a key",
    "counts the words in a text", "finds the largest element in an array", "merges two sorted lists",
    "validates an email address", "computes the Fibonacci numbers", "removes duplicates from a list",
    "parses a date string", "calls a REST API", "flattens a nested list", "implements a stack",
    "implements binary search", "converts Celsius to Fahrenheit", "reads a file line by line",
    "checks if a string is a palindrome", "computes a factorial", "generates a random password",
    "groups items by a key", "retries a function call", "caches function results", "walks a directory tree",
    "formats a number as currency", "splits a list into chunks", "implements a linked list",
    "finds the most common element", "computes the average of a list", "downloads a web page",
]
SHELL_TASKS = [
    "find all files larger than 100 MB", "count the lines in every .py file", "rename many files at once",
    "show the processes that use the most memory", "search a folder for a word", "compress a folder",
    "copy files to a remote server", "check free disk space", "list open ports", "schedule a daily job",
    "kill a process by name", "show the last lines of a log file", "change file permissions",
    "create a new user", "replace text in many files", "download a file", "extract a tar archive",
]
SQL_TASKS = [
    "finds the top 5 customers by total orders", "counts users per country", "joins orders and products",
    "finds duplicate emails", "computes monthly revenue", "deletes old rows", "finds employees earning more than their manager",
    "lists products that were never ordered", "computes a running total", "ranks students by score",
    "creates a table for blog posts", "updates prices by 10 percent", "finds the second highest salary",
]
THINGS = [
    "a book", "a movie", "a recipe", "a product", "a user profile", "a weather report", "an invoice",
    "a to-do list", "a flight booking", "a restaurant", "a student", "an employee", "a song", "a city",
    "a car", "a hotel reservation", "an event", "a bank transaction", "a blog post", "a pet",
]
STORY = [
    "a lighthouse keeper", "a robot who learns to paint", "a lost dog", "a dragon", "a time traveller",
    "a small village", "a detective", "two friends", "a haunted house", "a space station", "a baker",
    "a talking cat", "the last day of summer", "a magic key", "a storm at sea", "a young inventor",
    "a forgotten letter", "a city under the sea", "a king and a beggar", "a school trip",
]

DOMAINS: dict[str, dict[str, Any]] = {
    "qa": {"what": "everyday questions", "topics": EVERYDAY, "openers": [
        "What is the best way to", "Why do people", "Is it true that", "What are the benefits of {topic}",
        "What should I know about {topic}", "Can you tell me about {topic}", "What's the difference between",
        "Who invented", "When is the best time to", "How long does it take to", "What do you think about {topic}",
        "Is it healthy to", "Why is {topic}", "What are some facts about {topic}", "Should I",
    ]},
    "explain": {"what": "explanations", "topics": SCIENCE, "openers": [
        "Explain {topic} in simple terms", "Can you explain how", "Explain the concept of {topic}",
        "Help me understand {topic}", "Explain {topic} to a ten-year-old", "What is {topic} and why does it matter",
        "How does {topic} work", "Explain the difference between", "Why does", "Describe how",
    ]},
    "howto": {"what": "how-to steps", "topics": EVERYDAY, "openers": [
        "How do I", "What are the steps to", "Give me step-by-step instructions for", "How can I",
        "What is the easiest way to", "Teach me how to", "How should I prepare for {topic}",
        "I want to get better at {topic}. How", "Walk me through", "What do I need to",
    ]},
    "rewrite": {"what": "summaries and rewrites of a given text", "topics": EVERYDAY + SCIENCE, "openers": [
        "Summarize the following text in two sentences:\n\n", "Summarize this paragraph about {topic}:\n\n",
        "Rewrite this email to sound more professional:\n\n", "Paraphrase the following paragraph:\n\n",
        "Fix the grammar and spelling in this text:\n\n", "Make this paragraph shorter and clearer:\n\n",
        "Rewrite the following for a ten-year-old:\n\n", "Give me the main points of this article about {topic}:\n\n",
        "Turn these notes into a short paragraph:\n\n", "Rewrite this sentence in a friendlier tone:",
    ]},
    "story": {"what": "short stories and poems", "topics": STORY, "openers": [
        "Write a short story about {topic}", "Write a poem about {topic}", "Tell me a bedtime story about {topic}",
        "Write a haiku about", "Write a funny story about {topic}", "Write the opening paragraph of a novel about {topic}",
        "Write a fairy tale about {topic}", "Write a short dialogue between", "Write a limerick about",
        "Write a story that starts with",
    ]},
    "lists": {"what": "lists", "topics": EVERYDAY + SCIENCE, "openers": [
        "Give me a list of", "List 5", "What are 10", "Name some", "Make a checklist for {topic}",
        "List the pros and cons of {topic}", "Give me 7 ideas for", "What are the top 5", "List three facts about {topic}",
        "Suggest a few",
    ]},
    "code": {"what": "code in several languages", "topics": CODE_TASKS, "openers": [
        "Write a {lang} function that {topic}", "How do I {lang_task} in {lang}?", "Write a {lang} program that",
        "What does this {lang} code do?\n\n```\n", "Fix the bug in this {lang} code:\n\n```\n",
        "Write a {lang} class that", "Explain this {lang} snippet:\n\n```\n", "In {lang}, how can I",
        "Write a unit test in {lang} for a function that {topic}", "Convert this Python code to {lang}:\n\n```python\n",
    ]},
    "shell_sql": {"what": "shell commands and SQL", "topics": SHELL_TASKS, "openers": [
        "Write a bash command to {topic}", "How do I {topic} on Linux?", "Write a shell script that",
        "What does this command do?\n\n", "Write a SQL query that {sql_task}", "Write a SQL query to",
        "Explain this SQL query:\n\n```sql\n", "How do I use grep to", "Write a PowerShell command to {topic}",
        "How can I {topic} from the terminal?",
    ]},
    "json": {"what": "structured output such as JSON", "topics": THINGS, "openers": [
        "Return a JSON object that describes {topic}", "Give me a JSON list of", "Convert the following into JSON:\n\n",
        "Write a JSON schema for {topic}", "Output a markdown table of", "Write a YAML configuration for",
        "Create a CSV with", "Extract the names and dates from this text as JSON:\n\n",
        "Format this information about {topic} as JSON:", "Generate sample JSON data for {topic}",
    ]},
}
STDLIB_DOMAIN = "stdlib"  # the standard library's source (models/prompts.py)
ALL_DOMAINS = tuple(DOMAINS) + (STDLIB_DOMAIN,)
HELDOUT_PERCENT = 5
MIN_WORDS = 4
DEDUP_WORDS = 10  # prompts that share their first 10 words count as repeats
DEFAULT_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "top_k": 50}


@dataclass(frozen=True)
class Candidate:
    domain: str
    index: int
    opener: str
    seed: int

    @property
    def id(self) -> str:
        return f"self:{self.domain}:{self.index:05d}"


def split_of(record_id: str) -> str:
    """'heldout' for about HELDOUT_PERCENT % of ids, by a hash of the id."""
    bucket = int(hashlib.sha256(record_id.encode("utf-8")).hexdigest(), 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


def parse_domains(text: Optional[str]) -> list[str]:
    """A comma-separated domain list ('all' or None: every domain) -> checked names."""
    if text is None or text.strip().lower() == "all":
        return list(ALL_DOMAINS)
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in ALL_DOMAINS]
    if unknown or not names:
        raise StreamspecError(
            f"Unknown domain {unknown[0] if unknown else text!r}; choose from {', '.join(ALL_DOMAINS)} (or 'all').")
    return list(dict.fromkeys(names))


def candidate(domain: str, index: int, seed: int = 0) -> Candidate:
    """The opener and sampling seed of a domain's candidate `index` (a pure function)."""
    spec = DOMAINS[domain]
    rng = random.Random(f"{seed}:{domain}:{index}")
    opener = rng.choice(spec["openers"]).format(
        topic=rng.choice(spec["topics"]), lang=rng.choice(LANGUAGES),
        lang_task=_verb_phrase(rng.choice(CODE_TASKS)),
        sql_task=rng.choice(SQL_TASKS))
    # Without a fixed ending, the model chooses how the request goes on; a trailing
    # space would make it start with an odd token, so the opener ends in a word.
    return Candidate(domain, index, opener, rng.getrandbits(32))


def _verb_phrase(task: str) -> str:
    """'reverses a string' -> 'reverse a string' (for 'How do I ... in Go?')."""
    verb, _, rest = task.partition(" ")
    if verb.endswith("es") and verb[-3] in "sxhz":
        verb = verb[:-2]
    elif verb.endswith("s"):
        verb = verb[:-1]
    return f"{verb} {rest}"


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def user_turn_prefix(tokenizer: Any) -> str:
    """The chat template's text up to where a user message's content starts."""
    marker = "\u0000MARKER\u0000"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=False)
    if marker not in text:
        raise StreamspecError("The chat template does not show a user message as written; self-prompts need one.")
    return text[: text.index(marker)]


def _read_progress(out_path: Path) -> tuple[dict[str, int], dict[str, int], set[str], set[str]]:
    """(next index per domain, prompts kept per domain, normalised texts, first-words
    keys) of an existing output file, after dropping a half-written last line."""
    next_index: dict[str, int] = {}
    kept: dict[str, int] = {}
    seen_text: set[str] = set()
    seen_start: set[str] = set()
    if not out_path.exists():
        return next_index, kept, seen_text, seen_start
    data = out_path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # killed mid-write: cut the partial line
        with open(out_path, "r+b") as handle:
            handle.truncate(end)
        data = data[:end]
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            domain, index, content = record["domain"], int(record["index"]), record["messages"][0]["content"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError):
            raise StreamspecError(f"Line {number} of {out_path} is not a self-prompt record; pick another output path.") from None
        next_index[domain] = max(next_index.get(domain, 0), index + 1)
        words = normalise(content)
        seen_text.add(words)
        seen_start.add(" ".join(words.split()[:DEDUP_WORDS]))
        kept[domain] = kept.get(domain, 0) + 1
    return next_index, kept, seen_text, seen_start


def generate_prompts(
    base: Optional[str],
    out_path: Union[str, os.PathLike],
    count: int,
    domains: Sequence[str] = tuple(DOMAINS),
    seed: int = 0,
    batch_size: int = 48,
    max_new_tokens: int = 160,
    threads: int = 2,
    progress: bool = True,
) -> dict[str, int]:
    """Append self-written prompts to `out_path` until it holds `count` prompts spread
    evenly over `domains` (the model-written ones; 'stdlib' is harvested elsewhere).

    Returns {"kept", "written", "dropped"} for this call.
    """
    from .batched import Job, SlotDecoder
    from .distill import _progress_bar
    from .loading import load_tokenizer, resolve_base
    from .model import build_model
    import torch

    from streamspec.runtime.sampling import SamplingParams

    domains = [d for d in domains if d != STDLIB_DOMAIN]
    if count < 1:
        raise StreamspecError(f"The number of self-written prompts must be at least 1, got {count}.")
    if not domains:
        raise StreamspecError("Self-written prompts need at least one domain other than 'stdlib'.")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise StreamspecError(f"The output path {out_path} is a folder, not a file.")
    next_index, per_domain, seen_text, seen_start = _read_progress(out_path)
    quota = {d: -(-count // len(domains)) for d in domains}  # an even share per domain
    for domain in domains:
        per_domain.setdefault(domain, 0)
    stats = {"kept": sum(per_domain[d] for d in domains), "written": 0, "dropped": 0}
    if all(per_domain[d] >= quota[d] for d in domains):
        return stats
    folder = resolve_base(base, progress=progress)
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(folder)
    prefix = user_turn_prefix(tokenizer)
    model = build_model(folder)
    eos_ids = _turn_end_ids(tokenizer)
    in_flight = {d: 0 for d in domains}

    def jobs() -> Iterator[Job]:
        # Round-robin over the domains that still need prompts, so a stopped run is
        # balanced. The decoder asks for a job only after writing the finished ones, so
        # the counts are current; a domain near its quota gets few slots at a time.
        index = {d: next_index.get(d, 0) for d in domains}
        while True:
            short = [d for d in domains if per_domain[d] < quota[d]]
            if not short:
                return
            limited = [d for d in short if in_flight[d] <= 2 * (quota[d] - per_domain[d])]
            for domain in limited or short:
                cand = candidate(domain, index[domain], seed)
                index[domain] += 1
                in_flight[domain] += 1
                ids = tokenizer(prefix + cand.opener, add_special_tokens=False)["input_ids"]
                yield Job(cand, ids, max_new_tokens, SamplingParams(seed=cand.seed, **DEFAULT_SAMPLING))

    decoder = SlotDecoder(model, batch_size, max_length=max_new_tokens + 256)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a", encoding="utf-8") as handle, _progress_bar(progress) as bar:
        task = bar.add_task("writing prompts", total=sum(quota.values()), completed=stats["kept"]) if bar else None
        for job, tokens in decoder.decode(jobs(), eos_ids):
            cand: Candidate = job.key
            in_flight[cand.domain] -= 1
            ended = tokens[-1] in eos_ids
            text = (cand.opener + tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=True)).strip()
            words = normalise(text)
            start = " ".join(words.split()[:DEDUP_WORDS])
            if not ended or len(words.split()) < MIN_WORDS or words in seen_text or start in seen_start \
                    or per_domain[cand.domain] >= quota[cand.domain]:
                stats["dropped"] += 1
                continue
            seen_text.add(words)
            seen_start.add(start)
            record = {"id": cand.id, "domain": cand.domain, "split": split_of(cand.id), "index": cand.index,
                      "opener": cand.opener, "messages": [{"role": "user", "content": text}]}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            per_domain[cand.domain] += 1
            stats["kept"] += 1
            stats["written"] += 1
            if bar:
                bar.update(task, completed=stats["kept"])
    return stats


def _turn_end_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a chat turn (SmolLM2: <|im_end|>), and the tokenizer's EOS."""
    ids = []
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id and token_id is not None:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise StreamspecError("The tokenizer names no token that ends a turn; self-prompts need one.")
    return ids
