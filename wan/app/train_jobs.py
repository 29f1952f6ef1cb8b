"""Training jobs in the app's queue: accepting a request, queueing it, running it, stopping it with its
state saved, resuming it, and putting the LoRA where the LoRA browser finds it.

A run (:func:`run_training`, the queue's runner for a training request):

1. checks the request again (the queue file may have been edited since it was queued);
2. caches the dataset's VAE latents and umT5 outputs with the same functions as ``wgp.py cache_latents``
   / ``cache_text_encoder_outputs`` (existing caches that fit are kept);
3. trains with :class:`wan.train.trainer.Trainer`, one optimizer step per ``train(until_step=...)`` call,
   reporting each step to the queue; between two steps it looks at the job's cancel token, and a Stop
   saves the LoRA and the training state of the step reached (``<name>-stepNNNNNNNN-state``) before the
   job ends as cancelled;
4. copies the final LoRA into the LoRA folder of its model family (``loras/<family>/<name>.safetensors``,
   its trigger words in ``modelspec.trigger_phrase``) with a preset of the same name holding it and a
   sample prompt. A run that fails leaves the LoRA folder as it was.

Resuming (:func:`queue_resume`) queues the same request with ``resume`` = the run's last saved state.
A training job that was running when the server stopped is not started again by itself: the queue
marks it failed with :data:`INTERRUPTED` (see ``JobQueue``'s ``interrupted``) and the Train tab offers
to resume it from its last saved state. With a fixed seed, a resumed run ends with the LoRA an
uninterrupted run gives (bit for bit on the CPU: the trainer's states hold every random state).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

from wan.app.jobs import Job, RunOutcome
from wan.app.train_request import (EXPERTS, REQUEST_KEYS, TRAIN_KEY, TrainRequestError, check_expert, check_limits,
                                   check_model, check_sample_prompts, check_trigger_words, checked_config, is_training,
                                   run_folder, short)

log = logging.getLogger(__name__)

INTERRUPTED = ("interrupted: the server stopped while this training ran. Resume it from its last saved state "
               "(Train tab, Resume)")
SNAPSHOT = "dataset.toml"          # the run's copy of its dataset TOML
PROMPTS_FILE = "sample_prompts.txt"
STUDIO_LOG = "studio.log"          # what the run said, one line each
SAMPLE_FOLDER = "sample"
DEFAULT_SAVES = 10                 # a state saved about 10 times a run (none further apart than MAX_SAVE_EVERY)
MAX_SAVE_EVERY = 500
KEPT_SAVES = 3                     # the step saves kept (older ones are removed as the run goes on)


def interrupted_reason(job: Job) -> str | None:
    """For the queue, at load: a training job found running is not restarted (it is offered for
    resumption instead); None for the other jobs (restarted as usual)."""
    return INTERRUPTED if is_training(job.request) else None


# ---------------------------------------------------------------------------------------------
# Accepting and queueing


def accept_train_request(data, state, fresh: bool = True) -> dict:
    """A client's training request as the server will queue it, every field checked, with the fields
    the server fills (``output_dir``, ``save_state``, a save interval).

    ``fresh``: a new run (not a resume, not the worker's check): its LoRA name must be free.

    Raises:
        TrainRequestError: naming the field (``train.<flag>``, ``dataset``, ``expert``...).
    """
    from wan.app.security import check_train_path
    from wan.app.train_dataset import preview, require_usable
    if not isinstance(data, dict) or not isinstance(data.get(TRAIN_KEY), dict):
        raise TrainRequestError.bad("request", data, 'an object {"train": {<training settings>}, "expert": ..., '
                                                     '"trigger_words": ..., "sample_prompts": ...}')
    unknown = sorted(str(k) for k in set(data) - set(REQUEST_KEYS))
    if unknown:
        raise TrainRequestError("request", f"{short(unknown[0])}: unknown field; the fields are {', '.join(REQUEST_KEYS)}")
    settings = state.settings
    flat = dict(data[TRAIN_KEY])
    given_dir = flat.pop("output_dir", None)
    cfg = checked_config(flat)
    check_limits(cfg, settings)
    spec = check_model(cfg.model, state)
    expert = check_expert(data.get("expert"), spec)
    trigger = check_trigger_words(data.get("trigger_words"))
    prompts = check_sample_prompts(data.get("sample_prompts"), spec, settings)
    run = run_folder(settings, cfg.output_name)
    if given_dir is not None and (not isinstance(given_dir, str) or os.path.realpath(given_dir) != str(run)):
        raise TrainRequestError.bad("train.output_dir", given_dir, f"{run} (runs are written to <output folder>/train/"
                                                                   "<output_name>), or left out")
    try:
        toml = check_train_path(cfg.dataset_config, settings, "train.dataset_config")
    except ValueError as e:
        raise TrainRequestError("train.dataset_config", str(e).removeprefix("train.dataset_config: ")) from None
    if not toml.is_file():
        raise TrainRequestError.bad("train.dataset_config", cfg.dataset_config, "an existing dataset TOML file")
    dataset = preview(str(toml), {}, settings)
    require_usable(dataset)
    uncaptioned = [i.name for l in dataset.listings if l.blueprint.is_video for i in l.items if i.caption is None]
    if uncaptioned:
        raise TrainRequestError("dataset", f"{', '.join(uncaptioned[:5])}: no caption; write it in the preview "
                                           "(a video without a caption stops the text caching)")
    if cfg.max_train_epochs is not None:
        steps = cfg.max_train_epochs * math.ceil(_batches_per_epoch(dataset) / cfg.gradient_accumulation_steps)
        if steps > settings.max_train_steps:
            raise TrainRequestError.bad("train.max_train_epochs", cfg.max_train_epochs,
                                        f"{cfg.max_train_epochs} epochs are about {steps} steps here; at most "
                                        f"{settings.max_train_steps} on this server (--max_train_steps)")
    resume = _check_resume(cfg.resume, run) if cfg.resume is not None else None
    if resume is None and fresh:
        taken = name_taken(state, cfg.output_name, spec)
        if taken:
            raise TrainRequestError.bad("train.output_name", cfg.output_name, taken)
    out = dict(data[TRAIN_KEY])
    out["output_dir"] = str(run)
    out["dataset_config"] = str(toml)  # resolved: a relative path was the datasets folder's, not the server's
    if resume is not None:
        out["resume"] = str(resume)
    out.setdefault("save_state", True)
    if "save_every_n_steps" not in out and "save_every_n_epochs" not in out:
        steps = cfg.max_train_steps if cfg.max_train_epochs is None else settings.max_train_steps
        every = min(max(steps // DEFAULT_SAVES, 1), MAX_SAVE_EVERY)
        out["save_every_n_steps"] = every
        out.setdefault("save_last_n_steps", every * KEPT_SAVES)
    if prompts and "sample_every_n_steps" not in out and "sample_every_n_epochs" not in out:
        out["sample_every_n_steps"] = out.get("save_every_n_steps") or max(cfg.max_train_steps // DEFAULT_SAVES, 1)
    checked_config({k: v for k, v in out.items() if k != "output_dir"})  # what the server added fits too
    return {TRAIN_KEY: out, "expert": expert, "trigger_words": trigger, "sample_prompts": "\n".join(prompts)}


def _batches_per_epoch(dataset) -> int:
    total = 0
    for listing in dataset.listings:
        bp = listing.blueprint
        used = [i for i in listing.items if i.used and i.size]
        units = sum(len(i.windows) for i in used) if bp.is_video else len(used)
        total += math.ceil(units * bp.num_repeats / bp.batch_size)
    return max(total, 1)


def _check_resume(resume, run: Path) -> Path:
    from wan.app.security import is_inside
    from wan.train.checkpoints import StateError, read_progress
    path = Path(os.path.realpath(resume)) if isinstance(resume, str) and Path(resume).is_absolute() else None
    if path is None or not is_inside(path, run) or path == run:
        raise TrainRequestError.bad("train.resume", resume, f"a state folder of this run, inside {run}")
    try:
        read_progress(path)
    except StateError as e:
        raise TrainRequestError("train.resume", str(e).removeprefix("--resume ")) from None
    return path


def name_taken(state, name: str, spec) -> str | None:
    """Why a new run may not be called ``name`` (None when it may): a run of that name saved a LoRA or a
    state already, its LoRA is in the LoRA folder, or a waiting or running job trains it."""
    run = run_folder(state.settings, name)
    lora = family_lora_path(state, spec, name)
    if lora is not None and lora.exists():
        return f"a LoRA of that name is in the LoRA folder ({lora}); pick another name"
    if run.is_dir() and any(p.suffix == ".safetensors" or p.name.endswith("-state") for p in run.iterdir()):
        return f"an earlier run of that name saved files in {run}: resume it (Train tab) or pick another name"
    for job in state.queue.jobs(include_finished=False):
        if is_training(job.request) and isinstance(job.request[TRAIN_KEY], dict) \
                and job.request[TRAIN_KEY].get("output_name") == name:
            return f"job {job.id} trains a LoRA of that name already; pick another name"
    return None


def queue_training(state, request: dict, session: str, label: str | None = None) -> Job:
    """Checks ``request`` (:func:`accept_train_request`), snapshots its dataset TOML into the run's
    folder (the job trains on what was checked now) and queues it for ``session``."""
    from wan.fileio import write_text_atomic
    settings = request.get(TRAIN_KEY) if isinstance(request, dict) else None
    accepted = accept_train_request(request, state, fresh=not (isinstance(settings, dict) and "resume" in settings))
    train = accepted[TRAIN_KEY]
    run = Path(train["output_dir"])
    snapshot = run / SNAPSHOT
    if Path(train["dataset_config"]).resolve() != snapshot.resolve():
        write_text_atomic(snapshot, Path(train["dataset_config"]).read_text(encoding="utf-8"))
        train["dataset_config"] = str(snapshot)
    return state.queue.add(accepted, session, label=label or job_label(accepted))


def job_label(request: dict) -> str:
    train = request[TRAIN_KEY]
    length = (f"{train['max_train_epochs']} epochs" if train.get("max_train_epochs")
              else f"{train.get('max_train_steps', 1600)} steps")
    resumed = " · resumed" if train.get("resume") else ""
    return f"train: {train.get('output_name')} · {train.get('model')} · {length}{resumed}"


# ---------------------------------------------------------------------------------------------
# Runs: what a job wrote, its last state, resumption


def run_of(job: Job) -> tuple[Path, str] | None:
    """(run folder, output name) of a training job, or None for another job or a malformed request."""
    if not is_training(job.request) or not isinstance(job.request[TRAIN_KEY], dict):
        return None
    train = job.request[TRAIN_KEY]
    folder, name = train.get("output_dir"), train.get("output_name")
    if not isinstance(folder, str) or not isinstance(name, str):
        return None
    return Path(folder), name


def last_state(run: Path, name: str) -> tuple[Path, int] | None:
    """The run's saved state with the most steps done, and that step; None when it saved none."""
    from wan.train.checkpoints import StateError, read_progress
    best = None
    if not run.is_dir():
        return None
    for folder in run.glob(f"{name}*-state"):
        try:
            progress, _ = read_progress(folder)
        except StateError:
            continue
        if best is None or progress.step > best[1]:
            best = (folder, progress.step)
    return best


def total_steps(job: Job) -> int | None:
    """The steps the run trains to (from its progress while it runs, else its settings; None for epochs)."""
    if job.progress is not None and job.progress.expert == "train":
        return job.progress.total
    train = job.request.get(TRAIN_KEY) or {}
    if train.get("max_train_epochs"):
        return None
    value = train.get("max_train_steps", 1600)
    return value if isinstance(value, int) else None


def resume_offer(state, job: Job, jobs: list | None = None) -> tuple[Path, int] | None:
    """(state folder, step) a stopped, failed or interrupted run can resume from; None when it cannot:
    not a training job, not ended so, no state saved, or a later job of the same run exists."""
    where = run_of(job)
    if where is None or job.status not in ("failed", "cancelled"):
        return None
    jobs = state.queue.jobs() if jobs is None else jobs
    for other in jobs:
        if other.id != job.id and run_of(other) == where and (other.created or 0) > (job.created or 0):
            return None  # resumed (or started again) since
    found = last_state(*where)
    if found is None:
        return None
    total = total_steps(job)
    return None if total is not None and found[1] >= total else found


def queue_resume(state, job_id, session: str, owner: str | None = None) -> Job:
    """Queues job ``job_id``'s run again from its last saved state. ``owner`` (a shared server): only a
    job of that session. Raises ValueError saying why not."""
    job = state.queue.get(job_id) if isinstance(job_id, str) else None
    if job is None:
        raise ValueError(f"job {short(job_id)} is not in the queue or its history")
    if owner is not None and job.session != owner:
        raise ValueError(f"job {job.id} is another session's job: on this shared server a session can only "
                         "resume its own runs")
    offer = resume_offer(state, job)
    if offer is None:
        raise ValueError(f"job {job.id} cannot be resumed: " + ("it is not a training job" if run_of(job) is None
                         else f"it is {job.status}" if job.status not in ("failed", "cancelled")
                         else "no training state was saved, or the run was resumed already"))
    request = {k: copy.deepcopy(v) for k, v in job.request.items() if k in REQUEST_KEYS}
    request[TRAIN_KEY]["resume"] = str(offer[0])
    train = request[TRAIN_KEY]
    return queue_training(state, request, session,
                          label=f"train: {train.get('output_name')} · {train.get('model')} · resume from step {offer[1]}")


# ---------------------------------------------------------------------------------------------
# The runner


def run_training(state, job: Job, progress, cancel) -> RunOutcome:
    """The queue's runner for a training job (see the module docstring)."""
    from wan.engine.loop import Cancelled
    request = accept_train_request(job.request, state, fresh=False)
    train = request[TRAIN_KEY]
    run, name = Path(train["output_dir"]), train["output_name"]
    run.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    lines = _Say(run / STUDIO_LOG)
    if "resume" not in train:
        _set_aside_old_log(run, name)

    def phase(step: int, total: int, what: str) -> None:
        progress(SimpleNamespace(step=step, total=total, expert=what, eta=0.0, elapsed=time.monotonic() - started))
        if cancel.cancelled:
            raise Cancelled("training stopped before it began")
    from wan.registry import get_model
    spec = get_model(train["model"])
    phase(0, 2, "caching")
    files = _model_files(state, spec)
    device = _device()
    notices = _cache(train["dataset_config"], spec, files, device, lines, lambda: phase(0, 2, "caching"))
    phase(1, 2, "caching")
    cfg, sampler = _config(state, request, spec, files, device, run, lines)
    from wan.train.trainer import Trainer
    trainer = Trainer(cfg, sampler=sampler, say=lines, progress=False)
    try:
        trainer.setup()
        result = _train(trainer, progress, cancel, started, lines)
    finally:
        trainer.close()
    placed = place_lora(state, spec, result.lora_path, name, request.get("trigger_words") or "",
                        request.get("sample_prompts") or "", request.get("expert"))
    samples = sorted(str(p) for p in (run / SAMPLE_FOLDER).glob("*") if p.suffix in (".mp4", ".png"))
    notices += [f"LoRA: {placed['lora']}", f"preset: {placed['preset']}"]
    return RunOutcome([str(placed["lora"]), *samples], notices)


class _Say:
    """Where the trainer's lines go: the server log and the run's ``studio.log``."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str) -> None:
        log.info("training: %s", line)
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(f"{time.strftime('%H:%M:%S')} {line}\n")
        except OSError:
            pass


def _set_aside_old_log(run: Path, name: str) -> None:
    """A new run of a name whose earlier run stopped before saving anything: its step log is kept aside,
    so the plots show this run alone."""
    old = run / f"{name}.log.jsonl"
    if old.exists():
        os.replace(old, run / f"{name}.log.jsonl.old-{time.strftime('%Y%m%d-%H%M%S')}")


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_files(state, spec) -> dict[str, str]:
    """Role -> file of every component of ``spec``: the models folders' first, else the checkpoints
    folder's (present: the model was checked ready; a TEST model's are generated)."""
    roles = [r for r in spec.files]
    found = state.model_files(spec)
    files = {r: str(found[r]) for r in roles if r in found}
    needed = [r for r in roles if r not in files]
    if needed:
        from wan.loading.download import ensure_files
        paths = ensure_files(spec, state.settings.checkpoint_dir, variant="fp32" if spec.test_model else "bf16",
                             components=needed, progress=False)
        files.update({r: str(p) for r, p in paths.items()})
    return files


def _cache(dataset_config: str, spec, files: dict, device, say, check) -> list[str]:
    """The dataset's latent and text caches (kept where they fit), with the engine's loaders."""
    import torch

    import wan
    from wan.train.caching import cache_latents, cache_text_encoder_outputs
    from wan.train.dataset_config import load_dataset_config
    config = load_dataset_config(dataset_config)
    cpu = device.type == "cpu"
    i2v = spec.arch.model_type in ("i2v", "flf2v")

    def step(line: str) -> None:
        say(line)
        check()
    say(f"caching latents with {files['vae']}")
    vae = wan.load_vae(files["vae"], device=device, dtype=torch.float32 if cpu else torch.bfloat16)
    clip = None
    if i2v and spec.needs_clip:
        clip = wan.load_clip(files["clip"], device=device, dtype=torch.float32 if cpu else torch.float16)
    latents = cache_latents(config, vae, clip=clip, i2v=i2v, skip_existing=True, device=device, progress=step)
    del vae, clip
    check()
    say(f"caching the captions' text-encoder outputs with {files['text_encoder']}")
    te = wan.load_text_encoder(files["text_encoder"], device=device, dtype=torch.float32 if cpu else torch.bfloat16,
                               tokenizer=files.get("tokenizer"))
    texts = cache_text_encoder_outputs(config, te, skip_existing=True, progress=step)
    del te
    if not cpu:
        torch.cuda.empty_cache()
    for line in latents.lines() + texts.lines():
        say(line)
    if not (latents.written or latents.reused) or not (texts.written or texts.reused):
        failed = "; ".join(f"{Path(k).name}: {why}" for k, why in (latents.failed + texts.failed)[:5])
        raise TrainRequestError("dataset", f"nothing could be cached: {failed or 'no item'}")
    return [latents.lines()[0], texts.lines()[0]]


def _config(state, request: dict, spec, files: dict, device, run: Path, say):
    """The run's TrainConfig (the request's settings plus the server's: model files, device, the sample
    prompt file) and its sampler (None without sample prompts)."""
    from wan.fileio import write_text_atomic
    from wan.train.config import TrainConfig
    flat = dict(request[TRAIN_KEY])
    flat.update(checkpoint_dir=state.settings.checkpoint_dir, device=str(device))
    expert = request.get("expert")
    if spec.is_two_expert:
        if expert is None:
            flat.update(dit=files["transformer_low_noise"], dit_high_noise=files["transformer_high_noise"])
        else:
            flat["dit"] = files[f"transformer_{expert}"]
            boundary = round(spec.defaults.boundary * 1000) if spec.defaults.boundary is not None else None
            if boundary is not None and "min_timestep" not in flat and "max_timestep" not in flat:
                flat.update({"min_timestep": boundary, "max_timestep": 1000} if expert == "high_noise"
                            else {"min_timestep": 0, "max_timestep": boundary})
    else:
        flat["dit"] = files["transformer"]
    sampler = None
    if request.get("sample_prompts"):
        prompts = write_text_atomic(run / PROMPTS_FILE, request["sample_prompts"] + "\n")
        flat.update(sample_prompts=str(prompts), vae=files["vae"], t5=files["text_encoder"])
        if spec.needs_clip and "clip" in files:
            flat["clip"] = files["clip"]
    cfg = TrainConfig.of(**{k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()})
    if cfg.sample_prompts:
        from wan.train.samples import TrainingSampler
        sampler = TrainingSampler(cfg, say=say)
    return cfg, sampler


def _train(trainer, progress, cancel, started: float, say):
    """The loop, one optimizer step per call; a Stop saves the step's LoRA and state, then cancels."""
    from wan.engine.loop import Cancelled
    from wan.train import checkpoints as ckpt
    total, first = trainer.max_steps, trainer.progress.step
    steps_started = time.monotonic()
    result = None
    while trainer.progress.step < total:
        if cancel.cancelled:
            step = trainer.progress.step
            base = ckpt.step_name(trainer.cfg.output_name, step)
            trainer.save_lora(ckpt.lora_file(base))
            folder = trainer.save_state(ckpt.state_folder(base))
            say(f"stopped at step {step}: saved {folder}")
            raise Cancelled(f"stopped at step {step}; its state is saved in {folder}")
        result = trainer.train(until_step=trainer.progress.step + 1)
        step = trainer.progress.step
        rate = (step - first) / max(time.monotonic() - steps_started, 1e-9)
        progress(SimpleNamespace(step=step, total=total, expert="train", eta=(total - step) / rate if rate else 0.0,
                                 elapsed=time.monotonic() - started))
    if result is None or result.lora_path is None:  # resumed at its last step: the final save only
        result = trainer.train()
    return result


# ---------------------------------------------------------------------------------------------
# The result: the LoRA folder and its preset


def family_lora_path(state, spec, name: str) -> Path | None:
    """Where a LoRA of ``name`` trained on ``spec`` lands: ``<lora_dir>/<family folder>/<name>.safetensors``
    (None for a model no family folder covers)."""
    from wan.lora.library import FAMILY_FOLDERS, family_for_model
    family = family_for_model(spec)
    if family is None:
        return None
    return Path(state.settings.lora_dir) / FAMILY_FOLDERS[family] / f"{name}.safetensors"


def place_lora(state, spec, lora: Path, name: str, trigger_words: str, prompts: str,
               expert: str | None) -> dict:
    """Copies the run's final LoRA into its family folder (atomically, never over another file; the
    trigger words in its metadata) and writes the preset ``name`` (the LoRA at multiplier 1, or 1;0 /
    0;1 for one expert of Wan 2.2 A14B, and a sample prompt starting with the trigger words). With two
    experts trained as two LoRAs, the second one done also writes the pair's preset."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from wan.lora.library import save_preset
    dest = family_lora_path(state, spec, name)
    if dest is None:
        return {"lora": lora, "preset": "(none: no LoRA family folder for this model)"}
    n = 2
    while dest.exists():
        dest = dest.with_name(f"{name}-{n}.safetensors")
        n += 1
    with safe_open(str(lora), "pt") as fh:
        metadata = dict(fh.metadata() or {})
    if trigger_words:
        metadata["modelspec.trigger_phrase"] = trigger_words
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        save_file(load_file(str(lora)), str(tmp), metadata=metadata)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    root = Path(state.settings.lora_dir)
    entry = dest.relative_to(root).with_suffix("").as_posix()
    multiplier = {"high_noise": "1;0", "low_noise": "0;1"}.get(expert or "", "1.0")
    prompt = preset_prompt(trigger_words, prompts)
    save_preset(root, dest.stem, [(entry, multiplier)], prompt)
    if expert is not None:  # the pair's preset, once both experts' LoRAs are there
        base = name.removesuffix(f"_{expert}")
        other = [e for e in EXPERTS if e != expert][0]
        twin = dest.with_name(f"{base}_{other}.safetensors")
        if twin.exists():
            pair = sorted([(entry, multiplier), (twin.relative_to(root).with_suffix("").as_posix(),
                                                 {"high_noise": "1;0", "low_noise": "0;1"}[other])])
            save_preset(root, base, pair, prompt)
    return {"lora": dest, "preset": dest.stem}


def preset_prompt(trigger_words: str, prompts: str) -> str | None:
    """The trigger words, then the first sample prompt's text (its inline options left out)."""
    first = next((line for line in (prompts or "").splitlines() if line.strip()), "")
    text = (" " + first).split(" --")[0].strip()
    joined = ", ".join(p for p in (trigger_words.strip(), text) if p)
    return joined or None
