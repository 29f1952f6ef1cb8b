"""What the Train tab shows of a run while it goes and after: the runs a session may see, its loss
(raw and smoothed) and learning rate against steps from the run's JSONL log, its speed and ETA, the
last checkpoint saved, its sample videos, and what "Use on Generate" puts into the Generate tab.
No gradio here; every function is cheap enough for a refresh each second and never raises on what a
run folder holds (a half-written log line is skipped)."""

from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path

from wan.app.jobs import Job, printable
from wan.app.train_jobs import SAMPLE_FOLDER, last_state, resume_offer, run_of, total_steps
from wan.app.train_request import EXPERTS, TRAIN_KEY, is_training

MAX_POINTS = 1500     # points per plotted series (longer logs are thinned evenly)
SMOOTHING = 0.9       # TensorBoard's smoothing of the loss
MAX_SAMPLES = 12
RATE_WINDOW = 20      # steps the speed is measured over
_STEP_FILE = re.compile(r"-step(\d{8})\.safetensors$")


def visible_runs(state, session: str | None, jobs: list | None = None) -> list[Job]:
    """The training jobs this session may see, newest first (on a shared server only its own)."""
    jobs = state.queue.jobs() if jobs is None else jobs
    shared = bool(getattr(state, "shared", False))
    out = [j for j in jobs if is_training(j.request) and (not shared or j.session == session)]
    return sorted(out, key=lambda j: j.created or 0, reverse=True)


def run_choices(runs: list[Job]) -> list[tuple[str, str]]:
    return [(printable(f"{j.id} · {j.request[TRAIN_KEY].get('output_name')} · {j.status}", 120), j.id)
            for j in runs if isinstance(j.request.get(TRAIN_KEY), dict)]


def default_run(runs: list[Job]) -> str | None:
    """The run a page shows first: the running one, else the newest."""
    running = next((j for j in runs if j.status == "running"), None)
    return (running or (runs[0] if runs else None)).id if (running or runs) else None


# ---------------------------------------------------------------------------------------------
# The log


def log_path(job: Job) -> Path | None:
    where = run_of(job)
    return None if where is None else where[0] / f"{where[1]}.log.jsonl"


def read_log(path: Path | None) -> list[dict]:
    """The step records of a run's JSONL log, one per step (a resumed run appends steps it had done
    before it stopped: the later record of a step wins), in step order."""
    if path is None:
        return []
    try:
        st = os.stat(path)
    except OSError:
        return []
    return list(_read_log(str(path), st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=16)
def _read_log(path: str, size: int, mtime_ns: int) -> tuple[dict, ...]:
    by_step: dict[int, dict] = {}
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # the line being written
                if isinstance(record, dict) and isinstance(record.get("step"), int) \
                        and isinstance(record.get("loss"), (int, float)):
                    by_step[record["step"]] = record
    except (OSError, UnicodeDecodeError):
        return ()
    return tuple(by_step[k] for k in sorted(by_step))


def plot_frames(records: list[dict]):
    """(loss, lr) as DataFrames for gr.LinePlot: ``step, loss, series`` (raw and smoothed) and
    ``step, lr`` (the first learning-rate group); (None, None) without records (an empty frame would
    make the plot take its axes for categories, and keep them so after)."""
    import pandas as pd
    if not records:
        return None, None
    step = max(1, math.ceil(len(records) / MAX_POINTS))
    raw, smooth, lrs, ema = [], [], [], None
    for i, r in enumerate(records):
        loss = float(r["loss"])
        if not math.isfinite(loss):
            continue
        ema = loss if ema is None else SMOOTHING * ema + (1 - SMOOTHING) * loss
        if i % step and i != len(records) - 1:
            continue
        raw.append((r["step"], loss, "loss"))
        smooth.append((r["step"], ema, "smoothed"))
        lr = r.get("lr")
        value = next(iter(lr.values()), None) if isinstance(lr, dict) and lr else lr
        if isinstance(value, (int, float)) and math.isfinite(value):
            lrs.append((r["step"], float(value)))
    loss = pd.DataFrame(raw + smooth, columns=["step", "loss", "series"]) if raw else None
    return loss, pd.DataFrame(lrs, columns=["step", "lr"]) if lrs else None


def speed(records: list[dict]) -> float | None:
    """Steps per second over the last steps of the log (its ``time``: seconds since the run started)."""
    tail = records[-RATE_WINDOW:]
    pairs = [(r["step"], r.get("time")) for r in tail if isinstance(r.get("time"), (int, float))]
    if len(pairs) < 2:
        return None
    (s0, t0), (s1, t1) = pairs[0], pairs[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None


# ---------------------------------------------------------------------------------------------
# Files of a run


def last_checkpoint(job: Job) -> tuple[Path, int] | None:
    """The newest LoRA a run saved on its way (``<name>-stepNNNNNNNN.safetensors``) and its step."""
    where = run_of(job)
    if where is None or not where[0].is_dir():
        return None
    best = None
    for path in where[0].glob(f"{where[1]}-step*.safetensors"):
        match = _STEP_FILE.search(path.name)
        if match and (best is None or int(match.group(1)) > best[1]):
            best = (path, int(match.group(1)))
    return best


def samples(job: Job) -> list[str]:
    """The run's sample videos (and images), newest first."""
    where = run_of(job)
    if where is None:
        return []
    folder = where[0] / SAMPLE_FOLDER
    try:
        found = [(p.stat().st_mtime, str(p)) for p in folder.iterdir() if p.suffix in (".mp4", ".png")
                 and p.is_file() and not p.is_symlink()]
    except OSError:
        return []
    return [p for _, p in sorted(found, reverse=True)[:MAX_SAMPLES]]


# ---------------------------------------------------------------------------------------------
# The run's status in words


def status_text(state, job: Job, jobs: list | None = None) -> str:
    """Markdown: the run, its state, step, speed and ETA, the last checkpoint and state saved, the error
    of a failed run, and whether it can be resumed."""
    train = job.request.get(TRAIN_KEY) or {}
    name = _md(train.get("output_name"))
    total = total_steps(job)
    records = read_log(log_path(job))
    done = records[-1]["step"] if records else 0
    lines = [f"**{name}** · job {_md(job.id)} · {job.status} · model {_md(train.get('model'))}"]
    p = job.progress
    rate = speed(records)
    if job.status == "running":
        if p is None or p.expert == "caching":
            lines.append("caching the dataset's latents and captions...")
        else:
            eta = f" · ETA {p.eta_s:.0f} s" if p.eta_s else ""
            lines.append(f"step {max(p.step, done)} of {p.total}" + (f" · {rate:.2f} it/s" if rate else "") + eta)
    elif records:
        lines.append(f"{done} step(s) logged" + (f" of {total}" if total else "") +
                     (f" · {rate:.2f} it/s" if rate else ""))
    if records:
        lines.append(f"loss {records[-1]['loss']:.4f} at step {done}")
    checkpoint = last_checkpoint(job)
    if checkpoint:
        lines.append(f"last checkpoint: {_md(checkpoint[0].name)} (step {checkpoint[1]})")
    where = run_of(job)
    saved = last_state(*where) if where else None
    if saved:
        lines.append(f"last saved state: step {saved[1]}")
    if job.status == "failed" and job.error:
        lines.append("⚠️ " + _md(printable(job.error, 1500)))
    offer = resume_offer(state, job, jobs)
    if offer:
        lines.append(f"**Resume** continues it from step {offer[1]}.")
    if job.status == "done" and job.files:
        lines.append(f"✓ LoRA: {_md(Path(job.files[0]).name)} in the LoRA folder; **Use on Generate** selects it there.")
    return "  \n".join(lines)


def _md(text) -> str:
    return re.sub(r"([\\`*_{}\[\]<>|~#])", r"\\\1", printable(str(text), 200))


# ---------------------------------------------------------------------------------------------
# Use on Generate


def generate_choice(state, job: Job) -> tuple[str, list[str], str, str | None] | None:
    """(model id, LoRA choices as the LoRA browser names them, multipliers, prompt) of a finished run's
    LoRA (with its twin of the other expert when both were trained); None before it is done."""
    from wan.app.train_jobs import preset_prompt
    if job.status != "done" or not job.files or not is_training(job.request):
        return None
    root = Path(state.settings.lora_dir)
    lora = Path(job.files[0])
    try:
        rel = lora.relative_to(root)
    except ValueError:
        try:
            rel = lora.resolve().relative_to(root.resolve())
        except ValueError:
            return None
    expert = job.request.get("expert")
    picked, mults = [rel.as_posix()], [{"high_noise": "1;0", "low_noise": "0;1"}.get(expert or "", "1.0")]
    if expert in EXPERTS:
        other = [e for e in EXPERTS if e != expert][0]
        twin = lora.with_name(lora.name.replace(f"_{expert}", f"_{other}"))
        if twin != lora and twin.is_file():
            picked.append((rel.parent / twin.name).as_posix())
            mults.append({"high_noise": "1;0", "low_noise": "0;1"}[other])
    prompt = preset_prompt(job.request.get("trigger_words") or "", job.request.get("sample_prompts") or "")
    return job.request[TRAIN_KEY].get("model"), picked, " ".join(mults), prompt
