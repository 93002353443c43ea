"""Result files -> per-query rows -> trade-off points (mean F1 vs mean latency) + Pareto frontier.

Two on-disk formats are read (both documented where they are written):

* an eval run (`ragserve eval`, ragserve/eval/report.py): `report.json` (meta) and
  `rows.jsonl`, one line per (system, query); latency = `total_s` (includes queueing);
* a tuning sweep (`ragserve tune`, profiles/README.md): `meta.json` and `records.jsonl`,
  one line per (query, plan); latency = `latency_s` on an idle engine.

Eval rows carry no question text: it is looked up by id in the dataset's
`questions.jsonl` when that file is present. Everything here is pure except the readers;
a malformed file raises `ResultFileError`, which names the file and the problem.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ragserve.domain import RagPlan
from ragserve.errors import BadInput
from ragserve.eval.report import pareto_frontier

FORMAT_VERSION = 1
RESULT_DIRS = ("eval/results", "profiles")   # where `discover` looks, relative to the repo
MAX_EXAMPLES = 3
WH_WORDS = ("what", "which", "who", "whom", "whose", "when", "where", "why", "how")
# The datasets name their own query types under these fields (2wiki, qmsum, financebench).
TYPE_FIELDS = ("type", "query_type", "question_type")

ORACLE = "per-query best"   # a sweep's best plan per query (labels.jsonl): the oracle point
QuestionLookup = Callable[[str], Mapping[str, Mapping[str, Any]]]   # dataset -> {id: question record}


class ResultFileError(Exception):
    """A result file that cannot be read; the message names the file and what is wrong."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class ResultRow:
    """One answered (or failed) query of one system or plan."""

    source: str               # the run's label, e.g. "eval/results/smoke-squad"
    dataset: str
    system: str               # "fixed:stuff:2", "adaptive", "metis"; sweeps: "fixed:<plan>", ORACLE
    plan: str                 # the plan that ran, METHOD:CHUNKS[:INTER]
    method: str
    num_chunks: int
    query_id: str
    question: str             # "" when the dataset file is not available
    query_type: str
    quality: float            # the run's primary metric, 0 for a failed query
    f1: float | None
    latency_s: float | None   # None for a failed query
    answer: str
    error: str | None


@dataclass(frozen=True)
class ResultSet:
    label: str
    kind: str                 # "eval run" | "tuning sweep"
    path: Path
    dataset: str
    model: str
    quality_metric: str
    rows: tuple[ResultRow, ...]


@dataclass(frozen=True)
class TradeoffPoint:
    """One dot of the scatter: a system (or a plan) of one result set, over the filtered rows."""

    key: str                  # unique over the loaded sets: "<source> · <name>"
    source: str
    dataset: str
    name: str                 # system name, or plan when grouped by plan
    kind: str                 # fixed | adaptive | metis | metis+blend | oracle | plan
    plans: tuple[tuple[str, int], ...]   # plans that ran, most used first
    num: int
    num_errors: int
    quality: float | None     # mean primary metric (failures count 0)
    f1: float | None          # mean F1
    latency_s: float | None   # mean over answered queries
    examples: tuple[str, ...]
    on_frontier: bool = False


@dataclass(frozen=True)
class Filters:
    """Rows kept; None keeps every value."""

    datasets: frozenset[str] | None = None
    query_types: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    num_chunks: frozenset[int] | None = None


# ---------------------------------------------------------------------------- discovery

def is_eval_run(path: Path) -> bool:
    return (path / "report.json").is_file()


def is_sweep(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "records.jsonl").is_file()


def discover(repo: Path) -> list[Path]:
    """Eval runs and tuning sweeps under the repo's result folders, sorted."""
    found: set[Path] = set()
    for name in RESULT_DIRS:
        root = repo / name
        if root.is_dir():
            for marker in ("report.json", "meta.json"):
                found.update(p.parent for p in root.rglob(marker))
    return sorted(p for p in found if is_eval_run(p) or is_sweep(p))


def set_size_and_date(path: Path) -> tuple[int, str]:
    """(number of queries, when it was made as an ISO string or "") of a result set, from its
    own metadata (file times say when the checkout was made, not the run). (0, "") when
    unreadable."""
    try:
        if is_eval_run(path):
            meta = json.loads((path / "report.json").read_text()).get("meta", {})
            return int(meta.get("num") or 0), str(meta.get("finished") or meta.get("created") or "")
        meta = json.loads((path / "meta.json").read_text())
        return len(meta.get("query_ids") or ()), str(meta.get("finished") or meta.get("created") or "")
    except (OSError, ValueError, TypeError, AttributeError):
        return 0, ""


def default_set(paths: Sequence[Path]) -> Path | None:
    """The set the explorer opens on: the most queries (a 5-query smoke run says little),
    then the newest; None when there are none."""
    return max(paths, key=lambda p: (*set_size_and_date(p), str(p)), default=None)


# ---------------------------------------------------------------------------- readers

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultFileError(path, "file is missing") from None
    except json.JSONDecodeError as exc:
        raise ResultFileError(path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(path, f"cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ResultFileError(path, f"must hold a JSON object, found {type(data).__name__}")
    return data


def _read_jsonl(path: Path, allow_cut_last: bool) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per non-blank line. A killed sweep may leave its last line cut off:
    `allow_cut_last` skips that line, as the tuning reader does."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ResultFileError(path, "file is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultFileError(path, f"cannot be read: {exc}") from None
    out: list[tuple[int, dict[str, Any]]] = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if allow_cut_last and i == last:
                break
            raise ResultFileError(path, f"line {i + 1} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise ResultFileError(path, f"line {i + 1} must be a JSON object, found {type(obj).__name__}")
        out.append((i + 1, obj))
    return out


def _field(path: Path, where: str, obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
           optional: bool = False) -> Any:
    """obj[key], checked against `kind` (None allowed when `optional`)."""
    if key not in obj:
        raise ResultFileError(path, f"{where}: field {key!r} is missing")
    value = obj[key]
    if value is None and optional:
        return None
    numeric = kind in (float, (int, float))
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) if numeric else isinstance(value, kind)
    if not ok:
        want = "a number" if numeric else getattr(kind, "__name__", str(kind))
        raise ResultFileError(path, f"{where}: field {key!r} must be {want}, got {value!r}")
    return value


def _check_version(path: Path, meta: Mapping[str, Any]) -> None:
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ResultFileError(path, f"format_version {version!r} is not supported (this explorer reads "
                                    f"version {FORMAT_VERSION})")


def query_type(record: Mapping[str, Any] | None, question: str) -> str:
    """The dataset's own query type when it has one, else the question's wh-word (squad)."""
    for key in TYPE_FIELDS:
        value = (record or {}).get(key)
        if isinstance(value, str) and value:
            return value
    words = re.findall(r"[a-z]+", question.lower())
    for word in words:
        if word in WH_WORDS:
            return "who" if word in ("whom", "whose") else word
    return "other" if words else "unknown"


def dataset_questions(dataset: str) -> dict[str, dict[str, Any]]:
    """{id: record} from `<datasets dir>/<dataset>/questions.jsonl`; {} when it is absent."""
    from ragserve.config import datasets_dir

    path = datasets_dir() / dataset / "questions.jsonl"
    if not path.is_file():
        return {}
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "id" in record:
            out[str(record["id"])] = record
    return out


def load_result_set(path: Path, label: str | None = None,
                    questions: QuestionLookup = dataset_questions) -> ResultSet:
    """Read an eval run or a tuning sweep directory; raises ResultFileError."""
    path = Path(path)
    label = label or str(path)
    if not path.is_dir():
        raise ResultFileError(path, "no such directory")
    if is_eval_run(path):
        return _load_eval(path, label, questions)
    if is_sweep(path):
        return _load_sweep(path, label, questions)
    raise ResultFileError(path, "not a ragserve result: expected report.json + rows.jsonl (ragserve eval) "
                                "or meta.json + records.jsonl (ragserve tune)")


def _load_eval(path: Path, label: str, questions: QuestionLookup) -> ResultSet:
    report_path = path / "report.json"
    report = _read_json(report_path)
    _check_version(report_path, report)
    meta = _field(report_path, "top level", report, "meta", dict)
    dataset = str(meta.get("dataset") or "unknown")
    lookup = questions(dataset)
    rows_path = path / "rows.jsonl"
    rows = []
    for line, obj in _read_jsonl(rows_path, allow_cut_last=False):
        where = f"line {line}"
        qid = str(_field(rows_path, where, obj, "id", (str, int)))
        record = lookup.get(qid)
        question = str((record or {}).get("question", ""))
        error = _field(rows_path, where, obj, "error", str, optional=True)
        rows.append(ResultRow(
            source=label, dataset=dataset, system=_field(rows_path, where, obj, "system", str),
            plan=_field(rows_path, where, obj, "plan", str), method=_field(rows_path, where, obj, "method", str),
            num_chunks=int(_field(rows_path, where, obj, "num_chunks", (int, float))), query_id=qid,
            question=question, query_type=query_type(record, question),
            quality=float(_field(rows_path, where, obj, "quality", (int, float), optional=True) or 0.0),
            f1=_opt_float(_field(rows_path, where, obj, "f1", (int, float), optional=True)),
            latency_s=None if error else _opt_float(_field(rows_path, where, obj, "total_s", (int, float),
                                                           optional=True)),
            answer=str(obj.get("answer") or ""), error=error))
    return ResultSet(label, "eval run", path, dataset, str(meta.get("model") or "?"),
                     str(meta.get("quality_metric") or "f1"), tuple(rows))


def _load_sweep(path: Path, label: str, questions: QuestionLookup) -> ResultSet:
    meta_path = path / "meta.json"
    meta = _read_json(meta_path)
    _check_version(meta_path, meta)
    dataset = str(_field(meta_path, "top level", meta, "dataset", str))
    lookup = questions(dataset)
    records_path = path / "records.jsonl"
    rows = []
    for line, obj in _read_jsonl(records_path, allow_cut_last=True):
        where = f"line {line}"
        qid = str(_field(records_path, where, obj, "query_id", (str, int)))
        plan = _field(records_path, where, obj, "plan", dict)
        plan_str = obj.get("plan_str") or _plan_str(records_path, where, plan)
        record = lookup.get(qid)
        question = str(obj.get("question") or (record or {}).get("question", ""))
        error = _field(records_path, where, obj, "error", str, optional=True)
        rows.append(ResultRow(
            source=label, dataset=dataset, system=f"fixed:{plan_str}", plan=plan_str,
            method=str(_field(records_path, f"{where} plan", plan, "method", str)),
            num_chunks=int(_field(records_path, f"{where} plan", plan, "num_chunks", (int, float))),
            query_id=qid, question=question, query_type=query_type(record, question),
            quality=float(_field(records_path, where, obj, "quality", (int, float), optional=True) or 0.0),
            f1=_opt_float(_field(records_path, where, obj, "f1", (int, float), optional=True)),
            latency_s=None if error else _opt_float(_field(records_path, where, obj, "latency_s", (int, float),
                                                           optional=True)),
            answer=str(obj.get("answer") or ""), error=error))
    rows += _oracle_rows(path / "labels.jsonl", rows)
    return ResultSet(label, "tuning sweep", path, dataset, str(meta.get("model") or "?"),
                     str(meta.get("quality_metric") or "f1"), tuple(rows))


def _oracle_rows(path: Path, rows: Sequence[ResultRow]) -> list[ResultRow]:
    """The records labels.jsonl names as each query's best plan, as system ORACLE."""
    if not path.is_file():
        return []
    by_key = {(r.query_id, r.plan): r for r in rows}
    out = []
    for line, obj in _read_jsonl(path, allow_cut_last=True):
        qid = str(_field(path, f"line {line}", obj, "query_id", (str, int)))
        plan = _field(path, f"line {line}", obj, "best_plan_str", str)
        if (qid, plan) not in by_key:
            raise ResultFileError(path, f"line {line}: best plan {plan} of query {qid} has no record "
                                        "in records.jsonl")
        out.append(replace(by_key[(qid, plan)], system=ORACLE))
    return out


def _plan_str(path: Path, where: str, plan: Mapping[str, Any]) -> str:
    try:
        return str(RagPlan.from_dict(dict(plan)))
    except BadInput as exc:
        raise ResultFileError(path, f"{where}: {exc}") from None


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


# ---------------------------------------------------------------------------- trade-off

def filter_options(rows: Iterable[ResultRow]) -> dict[str, list[Any]]:
    """The values each filter can take, sorted."""
    rows = list(rows)
    return {"datasets": sorted({r.dataset for r in rows}), "query_types": sorted({r.query_type for r in rows}),
            "methods": sorted({r.method for r in rows}), "num_chunks": sorted({r.num_chunks for r in rows})}


def filter_rows(rows: Iterable[ResultRow], filters: Filters) -> list[ResultRow]:
    def keep(value: Any, allowed: frozenset | None) -> bool:
        return allowed is None or value in allowed

    return [r for r in rows if keep(r.dataset, filters.datasets) and keep(r.query_type, filters.query_types)
            and keep(r.method, filters.methods) and keep(r.num_chunks, filters.num_chunks)]


def _kind(system: str) -> str:
    if system == ORACLE:
        return "oracle"
    return "fixed" if system.startswith("fixed:") else system


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def tradeoff_points(rows: Iterable[ResultRow], group_by: str = "system", metric: str = "f1"
                    ) -> list[TradeoffPoint]:
    """One point per (result set, system) or (result set, plan), frontier marked by `metric`
    (f1 | quality) against mean latency. Points keep the rows' first-seen order. Per plan,
    the oracle's rows are left out: they repeat records the plans already hold."""
    if group_by not in ("system", "plan"):
        raise ValueError(f"group_by={group_by!r} must be 'system' or 'plan'")
    if metric not in ("f1", "quality"):
        raise ValueError(f"metric={metric!r} must be 'f1' or 'quality'")
    groups: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
    for row in rows:
        if group_by == "plan" and row.system == ORACLE:
            continue
        groups[(row.source, row.system if group_by == "system" else row.plan)].append(row)
    points = []
    for (source, name), members in groups.items():
        ok = [r for r in members if not r.error]
        examples = list(dict.fromkeys(r.question or f"id {r.query_id}" for r in members))[:MAX_EXAMPLES]
        points.append(TradeoffPoint(
            key=f"{source} · {name}", source=source, dataset=members[0].dataset, name=name,
            kind=_kind(name) if group_by == "system" else "plan",
            plans=tuple(Counter(r.plan for r in ok or members).most_common()), num=len(members),
            num_errors=len(members) - len(ok), quality=_mean([r.quality for r in members]),
            f1=_mean([r.f1 for r in members if r.f1 is not None]),
            latency_s=_mean([r.latency_s for r in ok if r.latency_s is not None]), examples=tuple(examples)))
    front = set(frontier_keys(points, metric))
    return [replace(p, on_frontier=True) if p.key in front else p for p in points]


def frontier_keys(points: Iterable[TradeoffPoint], metric: str = "f1") -> list[str]:
    """Keys of the points no other point beats on both mean latency and `metric`, by latency."""
    return pareto_frontier((p.key, _nan(p.latency_s), _nan(getattr(p, metric))) for p in points)


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def rows_of(rows: Iterable[ResultRow], point: TradeoffPoint, group_by: str = "system") -> list[ResultRow]:
    """The rows behind `point`."""
    return [r for r in rows if r.source == point.source
            and (r.system if group_by == "system" else r.plan) == point.name]
