"""MagCache magnitude tables: recorded once per model on a plain run, then reused by every job.

MagCache (``wan.optim.step_cache.magcache_schedule``) decides which steps may reuse the cached
residual of the transformer blocks from a table of magnitude ratios |residual_i| / |residual_i-1|
between consecutive steps. Its premise is that this curve belongs to the model and the sampling
schedule, not to the prompt. We do not ship the published tables, so the first job with MagCache
on for a model computes every step (its output is exactly the plain output), records the ratios
of both passes with :class:`~wan.optim.step_cache.MagnitudeRecorder`, and saves them here; later
jobs of that model read them.

Store: ``<folder>/<model id>.json`` (default folder ``<checkpoint_dir>/magcache/``), one file per
model, holding one table per (sampler, shift), each with what it was recorded with (steps, frames,
size, boundary, date). For each pass ("cond", "uncond") a table lists the recorded steps'
timesteps, the expert that ran them, and the ratios (1.0 where an expert's run of steps begins).

Reuse for another step count. For a fixed sampler and shift, a step's timestep is a fixed
function of its normalised position in the run (unipc, dpm++ and euler all place step i of N at
the shifted sigma of i/N), so the timestep is the position axis, and any step count's steps land
on the recorded curve. What is interpolated is the cumulative log magnitude of each expert
(log |residual| relative to the expert's first recorded step, the running sum of log ratios),
linearly over the timestep; a job's ratio between two of its steps is the exponential of the
difference. Interpolating the per-step ratios themselves would be wrong: with twice the steps,
each step's ratio is about the square root of the recorded one. Taken at the recorded steps, the
table gives back the recorded ratios.

Limits: a table recorded with another sampler or shift describes another schedule and is never
reused (a new one is recorded alongside it). Steps whose timestep lies outside the recorded range
(e.g. the last steps of a run with more steps than the recording: its final timestep is lower)
are always computed, since nothing is known of the curve there. Linear interpolation smooths the
curve between recorded steps, so a table recorded with few steps serves many-step runs coarsely;
record with the step count you use most (delete the file to record again). Frame count, size,
guidance, LoRAs and prompt are assumed not to change the curve much (MagCache's premise);
they are stored for the record only.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from wan.fileio import write_text_atomic
from wan.optim.step_cache import MagnitudeRecorder

FORMAT = "wan-studio magcache tables"
VERSION = 1
PASSES = ("cond", "uncond")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A residual that grows or shrinks a thousandfold in one step is no recording of a working model
# (real ratios stay near 1); recorded ratios are clamped to this range, and files outside it refused.
RATIO_RANGE = (1e-3, 1e3)


class TableError(ValueError):
    """A table file that cannot be used: names the file and what is wrong."""


def table_file_name(model_id: str) -> str:
    """A file name for ``model_id`` that cannot leave the folder.

    Plain ids (letters, digits, ``._-``, not starting with a dot, up to 100 characters) are used
    as they are; any other id has its unsafe characters replaced by ``_`` and a hash of the whole
    id appended, so two ids never share a file.
    """
    if _SAFE_NAME.fullmatch(model_id) and ".." not in model_id:
        return f"{model_id}.json"
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).replace("..", "_").lstrip("._-")[:80] or "model"
    digest = hashlib.sha256(model_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{cleaned}-{digest}.json"


class MagnitudeTables:
    """The folder of magnitude tables, one JSON file per model (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, model_id: str) -> Path:
        path = self.folder / table_file_name(model_id)
        if path.parent != self.folder:  # cannot happen with table_file_name; kept as the guard
            raise TableError(f"model id {model_id!r} gives a file outside {self.folder}")
        return path

    def read(self, model_id: str) -> list[dict]:
        """The model's tables ([] when it has no file).

        Raises:
            TableError: the file is not a valid table file for this model.
            OSError: the file exists but cannot be read.
        """
        path = self.path(model_id)
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd nesting
            raise TableError(f"{path}: not valid JSON ({e})") from None
        return check_file(data, model_id, path)

    def find(self, model_id: str, sampler: str, shift: float) -> dict | None:
        """The table recorded with this sampler and shift, or None (see :meth:`read` for errors)."""
        return next((t for t in self.read(model_id) if t["sampler"] == sampler
                     and math.isclose(t["shift"], shift, rel_tol=1e-9)), None)

    def save(self, model_id: str, table: dict) -> Path:
        """Adds ``table`` to the model's file, replacing one of the same sampler and shift.
        An unreadable existing file is replaced whole."""
        try:
            kept = [t for t in self.read(model_id) if not (t["sampler"] == table["sampler"]
                                                             and math.isclose(t["shift"], table["shift"]))]
        except (TableError, OSError):
            kept = []
        data = {"format": FORMAT, "version": VERSION, "model": model_id, "tables": kept + [table]}
        return write_text_atomic(self.path(model_id), json.dumps(data, indent=1) + "\n")

    def set_aside(self, model_id: str) -> Path:
        """Renames the model's (unusable) file out of the way; returns the new name."""
        path = self.path(model_id)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        aside = path.with_name(f"{path.name}.bad-{stamp}")
        path.replace(aside)
        return aside


def check_file(data, model_id: str, path: Path) -> list[dict]:
    """The tables of a parsed file, after checking every field the lookup relies on."""
    def bad(where: str, what: str):
        return TableError(f"{path}: {where}: {what}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad("format", f"expected {FORMAT!r}")
    if data.get("version") != VERSION:
        raise bad("version", f"{data.get('version')!r}, expected {VERSION}")
    if data.get("model") != model_id:
        raise bad("model", f"{data.get('model')!r}, expected {model_id!r}")
    tables = data.get("tables")
    if not isinstance(tables, list):
        raise bad("tables", "expected a list")
    for n, table in enumerate(tables):
        where = f"tables[{n}]"
        if not isinstance(table, dict) or not isinstance(table.get("sampler"), str):
            raise bad(f"{where}.sampler", "expected a sampler name")
        if not _finite(table.get("shift")) or table["shift"] <= 0:
            raise bad(f"{where}.shift", f"{table.get('shift')!r}, expected a number > 0")
        passes = table.get("passes")
        if not isinstance(passes, dict) or any(k not in passes for k in PASSES):
            raise bad(f"{where}.passes", f"expected {', '.join(PASSES)}")
        for kind in PASSES:
            _check_pass(passes[kind], f"{where}.passes.{kind}", bad)
    return tables


def _check_pass(p, where: str, bad) -> None:
    if not isinstance(p, dict):
        raise bad(where, "expected timesteps, experts and ratios")
    ts, experts, ratios = p.get("timesteps"), p.get("experts"), p.get("ratios")
    if not (isinstance(ts, list) and isinstance(experts, list) and isinstance(ratios, list)) \
            or not len(ts) == len(experts) == len(ratios) or len(ts) < 2:
        raise bad(where, "expected lists timesteps, experts, ratios of one length, at least 2")
    if not all(_finite(t) for t in ts) or any(a <= b for a, b in itertools.pairwise(ts)):
        raise bad(f"{where}.timesteps", "expected finite numbers, strictly decreasing")
    if not all(isinstance(e, str) for e in experts):
        raise bad(f"{where}.experts", "expected expert names")
    if not all(_finite(r) and RATIO_RANGE[0] <= r <= RATIO_RANGE[1] for r in ratios):
        raise bad(f"{where}.ratios", f"expected numbers from {RATIO_RANGE[0]:g} to {RATIO_RANGE[1]:g}")


def _clamp(ratio: float) -> float:
    return min(max(ratio, RATIO_RANGE[0]), RATIO_RANGE[1]) if math.isfinite(ratio) else 1.0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------
# Recording and resampling


def table_from_recording(recorder: MagnitudeRecorder, timesteps: list[float]) -> dict[str, dict] | None:
    """The per-pass tables of a recorded run (``timesteps`` [steps] of the run), or None when a
    pass has fewer than two recorded steps.

    Steps a pass did not run (CFG skipping, CFG-Zero*'s first steps) are simply absent: the ratio
    of the next recorded step spans the gap, and the timestep axis keeps it in place. Where one
    pass ran on fewer than half of an expert's steps that the other pass ran on (CFG skipping on
    the last steps, skip-layer guidance's "uncond" mode, which replaces the plain negative pass),
    that pass takes the other's points for that expert: the two curves are close (within about
    1% per step on the TEST models), far closer than a curve guessed across the gap.
    """
    points: dict[str, dict[str, list]] = {kind: {} for kind in PASSES}  # kind -> expert -> [(step, norm)]
    for name, norms in recorder.norms.items():
        expert, _, kind = name.rpartition("/")
        if kind in points:
            for step, norm in norms.items():
                points[kind].setdefault(expert or "transformer", []).append((step, norm))
    for kind, other in zip(PASSES, PASSES[::-1]):
        for expert, theirs in points[other].items():
            if len(points[kind].get(expert, ())) < len(theirs) / 2:
                points[kind][expert] = list(theirs)
    out = {}
    for kind in PASSES:
        rows = sorted((step, expert, norm) for expert, pts in points[kind].items() for step, norm in pts)
        if len(rows) < 2:
            return None
        ratios = [1.0 if i == 0 or e != rows[i - 1][1] else _clamp(n / rows[i - 1][2] if rows[i - 1][2] > 0 else 1.0)
                  for i, (_, e, n) in enumerate(rows)]
        out[kind] = {"timesteps": [float(timesteps[s]) for s, _, _ in rows], "experts": [e for _, e, _ in rows],
                     "ratios": ratios}
    return out


def resample(table_pass: dict, timesteps: list[float], experts: list[str]) -> tuple[list[float], set[int]] | None:
    """One pass's ratios at a job's steps, and the steps that must be computed.

    Args:
        table_pass: {"timesteps", "experts", "ratios"} as recorded.
        timesteps: the job's timesteps [steps] (0..1000, decreasing).
        experts: the expert that runs each of the job's steps.

    Returns:
        (ratios [steps], forced steps): the first step, each expert's first step, and steps
        outside the recorded range of their expert, with ratio 1.0; None when the table has no
        recording for one of the job's experts.
    """
    rec_t = np.asarray(table_pass["timesteps"], dtype=np.float64)
    rec_e = np.asarray(table_pass["experts"])
    rec_r = np.asarray(table_pass["ratios"], dtype=np.float64)
    curves = {}
    for expert in set(experts):
        mask = rec_e == expert
        if not mask.any():
            return None
        # cumulative log magnitude of this expert's run, 0 at its first recorded step
        level = np.concatenate([[0.0], np.cumsum(np.log(rec_r[mask][1:]))])
        curves[expert] = (rec_t[mask][::-1], level[::-1])  # increasing timesteps for np.interp
    ratios, forced, prev = [], set(), None
    for j, (t, expert) in enumerate(zip(timesteps, experts)):
        xs, ys = curves[expert]
        level = float(np.interp(t, xs, ys))
        inside = xs[0] - 1e-6 <= t <= xs[-1] + 1e-6
        if j == 0 or experts[j - 1] != expert or not inside or prev is None:
            ratios.append(1.0)
            forced.add(j)
        else:
            ratios.append(math.exp(level - prev))
        prev = level if inside else None
    return ratios, forced


# ---------------------------------------------------------------------------------------------
# One job's access to the store


@dataclass
class MagCacheJob:
    """What one job's step savers use (``StepSavers.magcache_source``): the ratio tables for its
    steps (:meth:`ratios`), or a recorder (:meth:`recorder`) whose table :meth:`finish` saves.

    ``expert_at(t)`` names the expert that runs timestep ``t`` ("transformer" for one network).
    Nothing here raises into the job: file problems become notices.
    """

    store: MagnitudeTables
    model_id: str
    sampler: str
    shift: float
    boundary: float | None = None
    frames: int | None = None
    size: tuple[int, int] | None = None
    notices: list[str] = field(default_factory=list)
    _recording: tuple | None = None   # (recorder, timesteps, steps) while a recording runs

    def expert_at(self, t: float) -> str:
        if self.boundary is None:
            return "transformer"
        return "high_noise" if t >= self.boundary * 1000 else "low_noise"  # as the expert plan's choice

    def ratios(self, sampler, start: int = 0) -> tuple[dict[str, list[float]], dict[str, set[int]]] | None:
        """({"cond": ratios, "uncond": ratios} [steps], {pass: forced steps}) for this job's
        sampler, or None when no usable table exists (missing, other sampler or shift, lacking
        one of the job's experts, or unreadable: then set aside with a notice)."""
        timesteps = [float(t) for t in sampler.timesteps]
        experts = [self.expert_at(t) for t in timesteps]
        table = self._find()
        if table is None:
            return None
        tables, forced = {}, {}
        for kind in PASSES:
            try:
                found = resample(table["passes"][kind], timesteps, experts)
            except (ValueError, TypeError, KeyError, OverflowError) as e:  # checked on read: a last guard
                self._set_aside(TableError(f"{self.store.path(self.model_id)}: {kind}: {e}"))
                return None
            if found is None:
                return None
            tables[kind], forced[kind] = found
        return tables, forced

    def _find(self) -> dict | None:
        try:
            return self.store.find(self.model_id, self.sampler, self.shift)
        except TableError as e:
            self._set_aside(e)
        except OSError as e:
            self.notices.append(f"MagCache: cannot read the magnitude table of {self.model_id} ({e})")
        return None

    def _set_aside(self, error: TableError) -> None:
        try:
            aside = self.store.set_aside(self.model_id)
            self.notices.append(f"MagCache: the magnitude table file of {self.model_id} is unusable ({error}); "
                                f"it was moved to {aside.name} and a new one is recorded")
        except OSError as err:
            self.notices.append(f"MagCache: the magnitude table file of {self.model_id} is unusable ({error}) "
                                f"and could not be moved aside ({err})")

    def recorder(self, sampler, start: int = 0) -> MagnitudeRecorder | None:
        """A block runner recording this run's magnitudes (blocks computed as without it), or None
        for runs that do not start from pure noise (their table would miss the first steps)."""
        if start > 0:
            self.notices.append(f"MagCache: no magnitude table for {self.model_id} yet, and it is recorded only "
                                f"on a run from pure noise (this one starts at step {start + 1}); every step computed")
            return None
        recorder = MagnitudeRecorder()
        self._recording = (recorder, [float(t) for t in sampler.timesteps], int(sampler.steps))
        return recorder

    def not_used(self, why: str) -> None:
        self.notices.append(f"MagCache: not used for this job: {why}")

    def finish(self) -> list[str]:
        """After a finished run: saves what was recorded. Returns the job's notices."""
        if self._recording is not None:
            recorder, timesteps, steps = self._recording
            self._recording = None
            passes = table_from_recording(recorder, timesteps)
            if passes is None:
                self.notices.append(f"MagCache: this run of {self.model_id} computed too few passes to record "
                                    "a magnitude table; every step was computed")
                return self.notices
            table = {"sampler": self.sampler, "shift": self.shift, "steps": steps, "model": self.model_id,
                     "frames": self.frames, "size": list(self.size) if self.size else None,
                     "boundary": self.boundary,
                     "recorded": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                     "passes": passes}
            try:
                self.store.save(self.model_id, table)
                self.notices.append(f"MagCache: no magnitude table for {self.model_id} ({self.sampler}, shift "
                                    f"{self.shift:g}) yet; this run computed every step and recorded one; "
                                    "the next runs use it")
            except OSError as e:
                self.notices.append(f"MagCache: the magnitude table of {self.model_id} could not be saved "
                                    f"to {self.store.folder} ({e}); every step was computed")
        return self.notices


def bind_magcache(savers, store: MagnitudeTables, req, spec):
    """``savers`` with a :class:`MagCacheJob` for this request when they ask for MagCache without
    an explicit ratio table; otherwise ``savers`` unchanged."""
    wants = savers.magcache_speedup is not None or savers.magcache_threshold is not None
    if not wants or savers.magcache_ratios is not None or savers.magcache_source is not None:
        return savers
    job = MagCacheJob(store, spec.id, req.sampler, float(req.shift), req.boundary, req.frames,
                      (req.width, req.height))
    return replace(savers, magcache_source=job)
