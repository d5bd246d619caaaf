"""The measured routing table: which backend `auto` picks per device, libraries, op and shape.

`fp8dispatch tune` measures the backends and writes a JSON document of tables, one table per
environment (device name, capability, library versions). Each entry maps (op, variant, N, K,
M bucket) (fp8dispatch/routing_keys.py) to the backends ranked fastest first. The registry consults `lookup` after the
environment variables and before the static priority order; decisions are cached per problem,
so this runs once per new problem, never on the hot path.

Two sources, the first that has an entry wins: the user's table (`FP8DISPATCH_TUNING`, else
`~/.cache/fp8dispatch/routing.json`; `off` disables both) and the tables shipped in
`fp8dispatch/tuned/`, one per GPU it was measured on (`h200.json`). A file is only ever parsed as
JSON and checked field by field: a corrupt or stale (other library versions) file is ignored with a
warning. A GPU without a table of its own borrows the closest measured GPU of its architecture
(same compute capability) as a prior, and `routing_source` says so; a table of another
architecture is never used.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from fp8dispatch.devices import gpu_slug
from fp8dispatch.routing_keys import key_of, m_bucket
from fp8dispatch.user_table import ENV_VAR, user_path

log = logging.getLogger("fp8dispatch")

FORMAT = "fp8dispatch-routing"
SCHEMA = 1
SHIPPED_DIR = Path(__file__).parent / "tuned"
# The libraries whose versions change which backend is fastest (kernels, cuBLASLt, autotuners).
DISTRIBUTIONS = ("torch", "triton", "fbgemm-gpu-genai", "torchao", "fp8dispatch")
# Two backends whose medians are within 2% are a tie (about the spread of one L2-flushed median
# on the H100); a tie goes to the smaller error, so `auto` stays within 0.98x of the fastest.
TIE = 0.02
HOST_WEIGHT = 2.0  # `cost`: a GEMM's host time, doubled for the work the host issues around it
OPS = ("quantize", "dequantize", "matmul", "grouped_linear")


class TuningWarning(UserWarning):
    """A routing table was found but not used: corrupt, stale or measured on another GPU."""


# --- the environment --------------------------------------------------------------------------

_identities: dict[torch.device, tuple[str, list[int] | None]] = {}
_libraries: dict[str, str | None] | None = None


def device_identity(device: torch.device) -> tuple[str, list[int] | None]:
    """(name, [major, minor]) of a device, read once; CPUs are ('cpu', None)."""
    ident = _identities.get(device)
    if ident is None:
        if device.type == "cuda":
            ident = (torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device)))
        else:
            ident = (device.type, None)
        _identities[device] = ident
    return ident


def libraries() -> dict[str, str | None]:
    """Installed versions of the libraries that decide speed, from package metadata (no imports)."""
    global _libraries
    if _libraries is None:
        found = {}
        for dist in DISTRIBUTIONS:
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                found[dist] = None
        found["torch"] = torch.__version__  # the one actually imported, whatever pip metadata says
        _libraries = found
    return _libraries


def environment(device: torch.device) -> dict:
    name, capability = device_identity(device)
    return {"device": name, "capability": capability, "libraries": dict(libraries())}


# --- building a table from measurements ---------------------------------------------------------


def cost(t: dict) -> float:
    """What a call costs a model run eagerly: its GPU time, or twice its host time where that is
    longer. The host must keep ahead of the GPU for the GPU to set the pace, and around each GEMM
    it also issues the activation quantize and the model's own ops, which cost it about as much
    again (on the H200's host: `fd.quantize` 16-23 µs against a bound GEMM's 10-30 µs,
    docs/results/h200/model.md, host-tune.json). At decode sizes the library backends' calls cost
    the host 3-5x the triton backend's (docs/results/h200/host-per-backend.md), so a kernel a few
    µs faster there loses the model more than it wins. One ranking serves every mode, so a
    compiled graph routes as eager does and keeps its bits."""
    return max(t["median_s"], HOST_WEIGHT * (t.get("host_s") or 0.0))


def rank(timings: list[dict]) -> list[dict]:
    """Backends cheapest first (`cost`); those within TIE of the cheapest are ordered by error."""
    ok = sorted((t for t in timings if _finite(t.get("median_s")) and _finite(t.get("error"))), key=cost)
    if not ok:
        return []
    limit = cost(ok[0]) * (1 + TIE)
    tied = sorted((t for t in ok if cost(t) <= limit), key=lambda t: (t["error"], cost(t)))
    return tied + [t for t in ok if cost(t) > limit]


def build_table(rows: list[dict], env: dict, command: str = "") -> dict:
    """One table from bench rows: rows need key, backend, median_s, error and ok."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if not row.get("ok") or row.get("backend") in (None, "auto") or not row.get("key"):
            continue
        op, variant, n, k, m = row["key"]
        timing = {"backend": row["backend"], "median_s": row["median_s"], "error": row["error"]}
        if _finite(row.get("host_s")):
            timing["host_s"] = row["host_s"]
        groups.setdefault((op, variant, n, k, m_bucket(m)), []).append(timing)
    entries = []
    for (op, variant, n, k, bucket), timings in sorted(groups.items()):
        best: dict[str, dict] = {}
        for t in timings:  # several M in one bucket: keep each backend's costliest (the safe side)
            if t["backend"] not in best or cost(t) > cost(best[t["backend"]]):
                best[t["backend"]] = t
        ranking = rank(list(best.values()))
        if ranking:
            entries.append({"op": op, "variant": variant, "n": n, "k": k, "m_bucket": bucket,
                            "ranking": ranking})
    return {"environment": env, "command": command, "measured": date.today().isoformat(), "entries": entries}


def merge(document: dict | None, table: dict) -> dict:
    """Add `table` to a document; a table of the same environment gains or replaces entries."""
    tables = list(document["tables"]) if document else []
    for i, old in enumerate(tables):
        if old["environment"] == table["environment"]:
            keep = {_entry_key(e): e for e in old["entries"]}
            keep.update({_entry_key(e): e for e in table["entries"]})
            tables[i] = {**table, "entries": [keep[k] for k in sorted(keep)]}
            break
    else:
        tables.append(table)
    return {"format": FORMAT, "schema": SCHEMA, "tables": tables}


def _entry_key(e: dict) -> tuple:
    return e["op"], e["variant"], e["n"], e["k"], e["m_bucket"]


def write(path: Path, document: dict) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    validate(document)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- reading and checking -----------------------------------------------------------------------


class InvalidTable(ValueError):
    pass


def read(path: Path) -> dict:
    """Parse and validate a document; raises InvalidTable (or OSError) naming what is wrong. Deep
    nesting (RecursionError) and numbers past int's digit limit (ValueError) are broken files too."""
    try:
        document = json.loads(Path(path).read_bytes())
        validate(document)
    except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as e:
        raise e if isinstance(e, InvalidTable) else InvalidTable(f"not JSON: {type(e).__name__}: {e}"[:300]) from None
    return document


def validate(document) -> None:
    _need(isinstance(document, dict), "top level: expected an object")
    _need(document.get("format") == FORMAT, f"format: expected {FORMAT!r}, got {document.get('format')!r}")
    _need(document.get("schema") == SCHEMA, f"schema: expected {SCHEMA}, got {document.get('schema')!r}")
    tables = document.get("tables")
    _need(isinstance(tables, list), "tables: expected a list")
    for i, table in enumerate(tables):
        _need(isinstance(table, dict), f"tables[{i}]: expected an object")
        env = table.get("environment")
        _need(isinstance(env, dict) and isinstance(env.get("device"), str), f"tables[{i}].environment.device: expected a string")
        cap = env.get("capability")
        _need(cap is None or (isinstance(cap, list) and len(cap) == 2 and all(_int(c) for c in cap)),
              f"tables[{i}].environment.capability: expected [major, minor] or null, got {cap!r}")
        libs = env.get("libraries")
        _need(isinstance(libs, dict) and all(isinstance(k, str) and (v is None or isinstance(v, str))
                                             for k, v in libs.items()),
              f"tables[{i}].environment.libraries: expected an object of version strings")
        entries = table.get("entries")
        _need(isinstance(entries, list), f"tables[{i}].entries: expected a list")
        for j, e in enumerate(entries):
            where = f"tables[{i}].entries[{j}]"
            _need(isinstance(e, dict) and e.get("op") in OPS, f"{where}.op: expected one of {OPS}")
            _need(isinstance(e.get("variant"), str), f"{where}.variant: expected a string")
            for field in ("n", "k", "m_bucket"):
                _need(_int(e.get(field)) and e[field] >= 0, f"{where}.{field}: expected an int >= 0")
            _need(e["m_bucket"] == m_bucket(e["m_bucket"]), f"{where}.m_bucket: expected a power of two")
            ranking = e.get("ranking")
            _need(isinstance(ranking, list) and ranking, f"{where}.ranking: expected a non-empty list")
            for r in ranking:
                _need(isinstance(r, dict) and isinstance(r.get("backend"), str) and r["backend"].isidentifier(),
                      f"{where}.ranking: expected backend names")
                _need(_finite(r.get("median_s")) and r["median_s"] > 0 and _finite(r.get("error")),
                      f"{where}.ranking[{r['backend']}]: expected finite median_s > 0 and error")
                _need("host_s" not in r or (_finite(r["host_s"]) and r["host_s"] > 0),
                      f"{where}.ranking[{r['backend']}].host_s: expected a finite number > 0 when given")


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidTable(message)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(version: str | None) -> str | None:
    """'2.11.0+cu130' -> '2.11': the release series a shipped table is allowed to serve."""
    return None if version is None else ".".join(version.split("+")[0].split(".")[:2])


def _stale(recorded: dict, here: dict, exact: bool) -> list[str]:
    names = DISTRIBUTIONS if exact else tuple(d for d in DISTRIBUTIONS if d != "fp8dispatch")
    same = (lambda a, b: a == b) if exact else (lambda a, b: _series(a) == _series(b))
    return [f"{d} {recorded.get(d)} (here {here.get(d)})" for d in names if not same(recorded.get(d), here.get(d))]


# --- lookup: the routing hook -------------------------------------------------------------------


@dataclass
class _Source:
    path: Path
    shipped: bool


@dataclass
class _Loaded:
    """Entries for one device: key -> (sorted buckets, rankings), in the order they are consulted;
    per table, (its source, the GPU it was measured on, whether it is a prior: another GPU)."""

    tables: list[dict[tuple, tuple[list[int], list[tuple[str, ...]]]]]
    used: list[tuple[_Source, str, bool]] = field(default_factory=list)


_loaded: dict[torch.device, _Loaded] = {}
_decided: dict[tuple, str | None] = {}


def sources() -> list[_Source]:
    """Where tables are read from, first match first; empty when FP8DISPATCH_TUNING=off."""
    user = user_path()
    if user is None:
        return []
    shipped = sorted(SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []
    return [_Source(user, False)] + [_Source(p, True) for p in shipped]


def _load(device: torch.device) -> _Loaded:
    """This GPU's own tables (the user's first), then the same architecture's as priors.

    Priors are ordered: the same name family first (an H100 PCIe borrows the H100 SXM's table
    before the H200's), then the user's own before shipped ones, then the newest measurement.
    """
    name, capability = device_identity(device)
    here = libraries()
    own, priors = [], []
    for source in sources():
        if not source.path.is_file():
            continue
        try:
            document = read(source.path)
        except (OSError, InvalidTable) as e:
            _warn(source, f"routing table {source.path} ignored: {e}", always=True)
            continue
        same_arch = [t for t in document["tables"]
                     if t["environment"]["capability"] == capability
                     and (capability is not None or t["environment"]["device"] == name)]
        if not same_arch:
            seen = sorted({t["environment"]["device"] for t in document["tables"]})
            # A table for the GPU says nothing about CPU calls: only another GPU deserves a warning.
            _warn(source, f"routing table {source.path} ignored: measured on {', '.join(seen) or 'no device'}, "
                          f"this is {name} ({_arch(capability)})", quiet=device.type != "cuda")
            continue
        fresh = [t for t in same_arch if not _stale(t["environment"]["libraries"], here, not source.shipped)]
        if not fresh:
            diff = "; ".join(_stale(same_arch[0]["environment"]["libraries"], here, not source.shipped))
            _warn(source, f"routing table {source.path} ignored: measured with other libraries: {diff}; "
                          f"re-run `fp8dispatch tune`")
            continue
        mine = [t for t in fresh if t["environment"]["device"] == name]
        own += [(source, mine[-1])] if mine else []
        priors += [(source, t) for t in fresh if t["environment"]["device"] != name]
    family = gpu_slug(name)
    priors.sort(key=lambda st: str(st[1].get("measured", "")), reverse=True)  # stable sorts: newest first
    priors.sort(key=lambda st: (gpu_slug(st[1]["environment"]["device"]) != family, st[0].shipped))
    loaded = _Loaded([])
    for source, table in own + priors:
        index: dict[tuple, tuple[list[int], list[tuple[str, ...]]]] = {}
        for e in sorted(table["entries"], key=lambda e: e["m_bucket"]):
            buckets, rankings = index.setdefault((e["op"], e["variant"], e["n"], e["k"]), ([], []))
            buckets.append(e["m_bucket"])
            rankings.append(tuple(r["backend"] for r in e["ranking"]))
        measured_on = table["environment"]["device"]
        loaded.tables.append(index)
        loaded.used.append((source, measured_on, measured_on != name))
        log.info("routing table %s: %d entries measured on %s, for %s", source.path, len(table["entries"]),
                 measured_on, name)
    return loaded


def _arch(capability) -> str:
    return "no GPU" if capability is None else f"sm{capability[0]}{capability[1]}"


def _warn(source: _Source, message: str, always: bool = False, quiet: bool = False) -> None:
    """The user's own file warns; a shipped table for another GPU or library series is expected."""
    if (source.shipped and not always) or quiet:
        log.info(message)
    else:
        warnings.warn(message, TuningWarning, stacklevel=3)


def ranking_for(problem) -> tuple[str, ...]:
    """The measured ranking for a problem (nearest measured M bucket), or () if none applies."""
    key = key_of(problem)
    if key is None:
        return ()
    op, variant, n, k, m = key
    for index in _tables_for(problem.device).tables:
        found = index.get((op, variant, n, k))
        if found:
            return found[1][_nearest(found[0], m_bucket(m))]
    return ()


def _tables_for(device: torch.device) -> _Loaded:
    loaded = _loaded.get(device)
    if loaded is None:
        loaded = _loaded[device] = _load(device)
    return loaded


def _nearest(buckets: list[int], bucket: int) -> int:
    """Index of the bucket closest to `bucket` in log2 distance; a tie goes to the larger one."""
    i = bisect.bisect_left(buckets, bucket)
    if i == len(buckets):
        return i - 1
    if buckets[i] == bucket or i == 0:
        return i
    return i if math.log2(buckets[i] / bucket) <= math.log2(bucket / buckets[i - 1]) else i - 1


def lookup(problem) -> str | None:
    """The routing hook: the fastest measured backend that can run `problem`, else None."""
    from fp8dispatch import registry

    if problem in _decided:
        return _decided[problem]
    choice = None
    for name in ranking_for(problem):
        try:
            backend = registry.get_backend(name)
        except registry.UnknownBackend:
            continue  # measured with a backend this process does not have
        if not registry.reasons(backend, problem):
            choice = name
            break
    _decided[problem] = choice
    return choice


def reset() -> None:
    """Forget loaded tables (the registry calls this from `refresh()`)."""
    _loaded.clear()
    _decided.clear()


def install() -> None:
    """Plug `lookup` into the registry (idempotent)."""
    from fp8dispatch import registry

    if lookup not in registry.routing_hooks:
        registry.routing_hooks.append(lookup)
    if reset not in registry._refresh_hooks:
        registry._refresh_hooks.append(reset)


def status(device: torch.device) -> list[str]:
    """Where `auto` routes from on `device`, then one line per table source (for `fp8dispatch info`)."""
    if not sources():
        return [routing_source(device)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = _load(device)
    lines = [routing_source(device, loaded)]
    for source in sources():
        kind = "shipped" if source.shipped else "user"
        if not source.path.is_file():
            lines.append(f"{kind} table {source.path}: none")
    lines += [f"{len(index)} (op, variant, N, K) keys from {_label(source, measured_on)}"
              + (f" (a prior: same {_arch(device_identity(device)[1])})" if prior else "")
              for index, (source, measured_on, prior) in zip(loaded.tables, loaded.used)]
    lines += [str(w.message) for w in caught]
    return lines


def routing_source(device: torch.device, loaded: _Loaded | None = None) -> str:
    """One line for `info` and `explain`: which measured table `auto` routes from, or why none."""
    name, capability = device_identity(device)
    if not sources():
        return f"routing by the static order: routing tables are off ({ENV_VAR}={os.environ.get(ENV_VAR)})"
    loaded = loaded or _tables_for(device)
    own = [_label(source, on) for source, on, prior in loaded.used if not prior]
    priors = [_label(source, on) for source, on, prior in loaded.used if prior]
    measure = "run `fp8dispatch tune` to measure this GPU"
    if own:
        return (f"routing from {' and '.join(own)} (measured on this {'GPU' if capability else 'device'})"
                + (f", then {priors[0]} (same {_arch(capability)}) for shapes not measured here" if priors else ""))
    if priors:
        return f"routing from {priors[0]} (same {_arch(capability)}); {measure}"
    if capability is None:
        return f"routing by the static order (no routing table for {name})"
    return f"routing by the static order (no table measured on an {_arch(capability)} GPU); {measure}"


def _label(source: _Source, measured_on: str) -> str:
    return f"the {measured_on} table" if source.shipped else f"your table {source.path} ({measured_on})"
