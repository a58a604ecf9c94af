"""Training tasks: the built-in synthetic arithmetic task and loaders for GSM8K, SVAMP and MATH-style data.

Every task is a list of `Problem(question, answer)` split into train and held-out parts; prompts are
rendered with the tokenizer's chat template (`render_prompts`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass

from nreft_engine.chat import chat_prompt_ids

logger = logging.getLogger(__name__)

DATASETS = ("arithmetic", "gsm8k", "svamp", "math")
# difficulty -> (operand range, operators, number of operands)
_ARITHMETIC_LEVELS: dict[int, tuple[int, str, int]] = {
    1: (20, "+", 2),
    2: (99, "+-", 2),
    3: (99, "+-*", 3),
}


@dataclass(frozen=True)
class Problem:
    """One question and its reference final answer (as text, e.g. '42' or '\\frac{1}{2}')."""

    question: str
    answer: str


@dataclass
class Task:
    """Train problems (cycled through during training) and held-out problems (for evaluation)."""

    name: str
    train: list[Problem]
    heldout: list[Problem]

    def __post_init__(self) -> None:
        if not self.train or not self.heldout:
            raise ValueError(f"task {self.name!r} has {len(self.train)} train and {len(self.heldout)} "
                             f"held-out problems; training and evaluation need at least 1 of each")


def arithmetic_task(seed: int = 0, difficulty: int = 1, num_heldout: int = 200) -> Task:
    """Distinct random arithmetic problems from `seed`; held-out questions never appear in train.

    Difficulty 1: a + b with a, b in [0, 20]; 2: a ± b in [0, 99]; 3: three operands with + - *.
    """
    if difficulty not in _ARITHMETIC_LEVELS:
        levels = sorted(_ARITHMETIC_LEVELS)
        raise ValueError(f"arithmetic difficulty must be one of {levels}, got {difficulty}")
    high, ops, count = _ARITHMETIC_LEVELS[difficulty]
    space = (high + 1) ** count * len(ops) ** (count - 1)
    if num_heldout >= space // 2:
        raise ValueError(f"difficulty {difficulty} has only {space} distinct problems; ask for fewer than "
                         f"{space // 2} held-out problems")
    rng = random.Random(seed)
    questions: dict[str, None] = {}
    for _ in range(20 * space):
        if len(questions) >= min(space, 4000):
            break
        terms = [str(rng.randint(0, high))]
        for _ in range(count - 1):
            terms += [rng.choice(ops), str(rng.randint(0, high))]
        questions.setdefault(" ".join(terms), None)
    problems = [Problem(f"{q} = ?", str(eval(q))) for q in questions]
    return Task("arithmetic", train=problems[num_heldout:], heldout=problems[:num_heldout])


def load_task(
    name: str, path: str | None = None, *, seed: int = 0, difficulty: int = 1, num_heldout: int = 200
) -> Task:
    """The task `name` (one of DATASETS); file-backed ones read `path`: a local file or a hub dataset id.

    A local file keeps its order shuffled by `seed`, and its first `num_heldout` problems are held out.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(num_heldout, bool) or not isinstance(num_heldout, int) or num_heldout < 1:
        raise ValueError(f"--num-heldout {num_heldout!r}: must be an integer >= 1 (they measure accuracy)")
    if name == "arithmetic":
        return arithmetic_task(seed, difficulty, num_heldout)
    if not path:
        raise ValueError(f"dataset {name!r} needs --data-path: a local .json/.jsonl file or a hub dataset id")
    rows = _read_rows(path)
    problems = [_to_problem(name, path, row) for row in rows]
    random.Random(seed).shuffle(problems)
    if len(problems) <= num_heldout:
        raise ValueError(f"{path} has {len(problems)} problems; need more than num_heldout={num_heldout}")
    logger.info("loaded %d %s problems from %s", len(problems), name, path)
    return Task(name, train=problems[num_heldout:], heldout=problems[:num_heldout])


def _read_rows(path: str) -> list[dict]:
    """Rows of a local .json (a list of objects) or .jsonl (an object per line) file, or of a hub dataset's
    train split (through `datasets`)."""
    if os.path.exists(path) or path.endswith((".json", ".jsonl")) or os.sep in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"dataset file not found: {path}")
        return _read_json_rows(path)
    import datasets

    return list(datasets.load_dataset(path, split="train"))


def _read_json_rows(path: str) -> list[dict]:
    """The objects of a JSON list or of JSON lines; a ValueError names the file (and the line) if it has none
    or is not JSON."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"dataset file {path} is empty")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as err:
            raise ValueError(f"dataset file {path} is not JSON ({err})") from err
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except ValueError as err:
                raise ValueError(f"dataset file {path} line {n} is not JSON ({err})") from err
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"dataset file {path} must hold JSON objects (in a list, or one per line)")
    return rows


def _column(row: dict, key: str, name: str, path: str) -> str:
    if key not in row or row[key] is None:
        raise ValueError(f"{name} data at {path} has no {key!r} column (columns: {', '.join(sorted(row))})")
    return str(row[key])


def _to_problem(name: str, path: str, row: dict) -> Problem:
    """Map one row of a GSM8K / SVAMP / MATH file to a Problem."""
    if name == "gsm8k":
        answer = _column(row, "answer", name, path)
        if "####" not in answer:
            raise ValueError(f"gsm8k answer without '#### <number>' in {path}: {answer[-80:]!r}")
        final = answer.split("####")[-1].strip().replace(",", "")
        return Problem(_column(row, "question", name, path), final)
    if name == "svamp":
        body, question = _column(row, "Body", name, path), _column(row, "Question", name, path)
        answer = _format_number(_column(row, "Answer", name, path))
        return Problem(f"{body.strip()} {question.strip()}", answer)
    question = _column(row, "problem", name, path)
    if row.get("answer") is not None:
        return Problem(question, str(row["answer"]))
    boxed = last_boxed(_column(row, "solution", name, path))
    if boxed is None:
        raise ValueError(f"math solution without \\boxed{{...}} in {path}: {str(row['solution'])[-80:]!r}")
    return Problem(question, boxed)


def _format_number(text: str) -> str:
    """'7.0' -> '7', so integer answers compare as written."""
    value = float(text)
    return str(int(value)) if value.is_integer() else str(value)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


# A strict short format the numeric reward can teach. With "a + b = ?" and this instruction the embedded
# SmolLM2-135M answers ~30% of difficulty-1 problems greedily (vs ~16% for "a + b =" / "the final number").
INSTRUCTION = "Answer with just the number."


def render_prompts(tokenizer, problems: list[Problem], system: str = INSTRUCTION) -> list[list[int]]:
    """Token ids of each problem as a chat turn (system instruction + user question), ready to generate."""
    return [chat_prompt_ids(tokenizer, p.question, system) for p in problems]


def batch_at(task: Task, step: int, batch_size: int, seed: int) -> list[Problem]:
    """The train problems of `step`: a seeded permutation per epoch, so the data position is just the step."""
    n = len(task.train)
    orders: dict[int, list[int]] = {}
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, index = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = random.Random(seed * 7919 + epoch).sample(range(n), n)
        out.append(task.train[orders[epoch][index]])
    return out

