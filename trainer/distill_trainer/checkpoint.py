"""Atomic checkpoints of the student: save, find, resume.

Layout of one checkpoint (the directory name is the commit point):

    <output_dir>/checkpoint-<step>/
        student/              HF model directory: config.json, model.safetensors, tokenizer files.
                              `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
                              load it directly; on resume the pipeline loads the weights from here too
                              (they are stored once).
        optimizer.pt          optimizer.state_dict()
        scheduler.pt          scheduler.state_dict()
        rng_state.pt          python / numpy / torch CPU / torch CUDA generator states (rank 0; rank r > 0 of
                              a multi-rank student: rng_state_<r>.pt)
        trainer_state.json    {"step": <step>, ...whatever the pipeline passes (data position, ...)}
        distill_config.json   the run's config, when given
        run_identity.json     which run wrote it (see run_identity.py), when given

How a save stays atomic: everything is written into a hidden sibling `.checkpoint-<step>.tmp-<pid>`,
every file is fsynced, and only then is the directory renamed to `checkpoint-<step>`. A crash at any
earlier point leaves a hidden temp directory that no reader looks at and that the next save deletes.
Re-saving an existing step renames the old directory aside (`.checkpoint-<step>.old-<pid>`), renames
the new one in, then deletes the old one; a crash between those two renames is repaired at the next
save or resume by moving the old directory back. Pruned checkpoints are likewise renamed to a hidden
name before they are deleted, so a half-deleted directory never looks like a checkpoint.

Run identity: a checkpoint stamped with a `RunIdentity` belongs to that run. `claim_output_dir` refuses (or,
when told to overwrite, deletes) checkpoints of other runs before training starts, `resolve_resume_checkpoint`
refuses to resume from one, and pruning only ever removes the saving run's own checkpoints.

Who writes what: `assembling_checkpoint` (the driver) owns the directory, the trainer state, config and identity;
each student rank writes its own part into it (`write_model_state`, called by its strategy). One run writes an
output_dir at a time; readers may run at any time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import random
import re
import shutil
from typing import Any, Iterator

import numpy as np
import torch

from .run_identity import RunIdentity, differences, read_identity

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STUDENT_DIR = "student"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CONFIG_FILE = "distill_config.json"
IDENTITY_FILE = "run_identity.json"
# Below this many free bytes after a failed write, the disk is taken to be full (torch.save reports a full
# disk as "unexpected pos ..." rather than ENOSPC).
_FULL_DISK_BYTES = 1 << 20

_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
# Hidden work directories: `.checkpoint-<step>.<kind>-<pid>`; the leading dot keeps them out of
# `checkpoint-<int>` matching and out of casual `ls`.
_WORK_RE = re.compile(rf"^\.{re.escape(CHECKPOINT_PREFIX)}(\d+)\.(tmp|old|deleting)-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint the user pointed at is missing or incomplete; the message names the path and the fix."""


class RunConflictError(CheckpointError):
    """``output_dir`` holds checkpoints of another run; the message names both runs and the way out."""


# --------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Snapshot every random generator a training step may draw from.

    Stored with plain Python containers and tensors only, so `torch.load(weights_only=True)` can read
    it back (no pickled numpy objects).
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put every generator back to a `capture_rng_state()` snapshot."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            # A resume on a different number of visible GPUs: restore what lines up rather than fail;
            # bit-exact reproduction is then not promised anyway.
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, %d visible; restoring the first %d",
                len(cuda_states), torch.cuda.device_count(), min(len(cuda_states), torch.cuda.device_count()),
            )
        for device, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, device)


def _as_tuple(value: Any) -> Any:
    # random.setstate wants the exact nested-tuple shape getstate produced.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


# -------------------------------------------------------------------------------------------- save


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict,
    config: dict | None = None,
    identity: RunIdentity | None = None,
    max_to_keep: int = 0,
) -> pathlib.Path:
    """Write `<output_dir>/checkpoint-<step>` atomically and return its path (one process holding everything).

    `model` / `tokenizer` are saved with their `save_pretrained` (HF format, safetensors).
    `trainer_state` must be JSON-serializable; its `step` is set to `step`. After a successful save,
    checkpoints are pruned to the `max_to_keep` newest by step (0 keeps all); the one just written is
    always kept, and with an `identity` only checkpoints of that same run are candidates.
    A full disk raises CheckpointError naming the directory and the newest checkpoint left intact.
    """
    refuse_nonfinite_parameters(model, output_dir_checkpoint(output_dir, step))
    with assembling_checkpoint(
        output_dir, step, trainer_state=trainer_state, config=config, identity=identity, max_to_keep=max_to_keep
    ) as directory:
        write_model_state(directory, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler)
    return output_dir_checkpoint(output_dir, step)


def output_dir_checkpoint(output_dir: str | os.PathLike, step: int) -> pathlib.Path:
    """The path `checkpoint-<step>` of `output_dir` (committed or not)."""
    return pathlib.Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


@contextlib.contextmanager
def assembling_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    trainer_state: dict,
    config: dict | None = None,
    identity: RunIdentity | None = None,
    max_to_keep: int = 0,
) -> Iterator[pathlib.Path]:
    """The one owner of a checkpoint's directory: yields a hidden temporary directory into which the caller
    has the model's state written (`write_model_state`, or each rank's strategy ``save``), then writes the
    trainer state, the config and the run identity, fsyncs and commits it as `checkpoint-<step>`, and prunes.

    Whatever the block raises leaves no trace (the temporary directory is removed); an error from a full
    disk becomes a CheckpointError naming the directory and the previous checkpoint, which stays intact.
    """
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    if "step" in trainer_state and trainer_state["step"] != step:
        raise ValueError(f"trainer_state['step']={trainer_state['step']!r} disagrees with step={step}")
    # Serialize the JSON parts first: a non-serializable value fails here, before anything is written.
    state_json = json.dumps({**trainer_state, "step": step}, indent=2, sort_keys=True)
    config_json = json.dumps(config, indent=2, sort_keys=True) if config is not None else None
    identity_json = json.dumps(identity.to_json(), indent=2, sort_keys=True) if identity is not None else None

    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _recover_interrupted_saves(output_dir)

    final = output_dir_checkpoint(output_dir, step)
    tmp = output_dir / f".{CHECKPOINT_PREFIX}{step}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
        (tmp / TRAINER_STATE_FILE).write_text(state_json)
        if config_json is not None:
            (tmp / CONFIG_FILE).write_text(config_json)
        if identity_json is not None:
            (tmp / IDENTITY_FILE).write_text(identity_json)
        # Data must be on disk before the rename that publishes it, or a power loss could leave a
        # committed name pointing at empty files.
        _fsync_tree(tmp)
        _commit(tmp, final)
    except BaseException as error:
        # Also on KeyboardInterrupt: leave nothing half-written behind (a SIGKILL is handled by the
        # stale-directory cleanup of the next save instead).
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, Exception) and _disk_full(error, output_dir):
            previous = find_latest_checkpoint(output_dir)
            intact = f"the previous {previous.name} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(
                f"no space left on {output_dir.resolve()}: {final.name} not written; {intact}. "
                f"Free space there (or lower max_ckpt_to_keep), then resume with resume_from_checkpoint=true."
            ) from None
        raise
    logger.info("saved checkpoint %s", final)

    if max_to_keep > 0:
        _prune(output_dir, keep=max_to_keep, protect=final, identity=identity)


def write_model_state(
    directory: str | os.PathLike,
    *,
    model: Any = None,
    tokenizer: Any = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    rng: bool = True,
    rank: int = 0,
) -> None:
    """Write into a checkpoint being assembled: the HF model and tokenizer under `student/`, the optimizer and
    scheduler state, and this process's RNG state (`rng_state.pt` for rank 0, `rng_state_<rank>.pt` for
    other ranks). Parts given as None are not written (ranks that hold no copy of them)."""
    directory = pathlib.Path(directory)
    if model is not None:
        model.save_pretrained(directory / STUDENT_DIR)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory / STUDENT_DIR)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    if rng:
        torch.save(capture_rng_state(), directory / rng_file(rank))


def rng_file(rank: int = 0) -> str:
    """The RNG state file of a rank (rank 0 keeps the original single-process name)."""
    return RNG_FILE if rank == 0 else f"rng_state_{rank}.pt"


def refuse_nonfinite_parameters(model: Any, checkpoint_dir: str | os.PathLike) -> None:
    """CheckpointError if any parameter of `model` holds NaN/inf: a diverged model must never replace (or,
    through pruning, delete) a good checkpoint. Call before writing anything into `checkpoint_dir` (the
    directory `assembling_checkpoint` yields, or the `checkpoint-<step>` to be written)."""
    bad = _first_nonfinite_parameter(model)
    if bad is not None:
        path = pathlib.Path(checkpoint_dir)
        work = _WORK_RE.match(path.name)
        name = f"{CHECKPOINT_PREFIX}{work.group(1)}" if work else path.name
        raise CheckpointError(
            f"refusing to write {name}: parameter {bad} holds NaN/inf values; "
            f"the existing checkpoints in {path.parent} are left as they are"
        )


def _first_nonfinite_parameter(model: Any) -> str | None:
    named = getattr(model, "named_parameters", None)
    if named is None:
        return None
    with torch.no_grad():
        for name, param in named():
            if not bool(torch.isfinite(param).all()):
                return name
    return None


def _disk_full(error: Exception, directory: pathlib.Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT, or (torch.save hides the errno) no free space left."""
    cause: BaseException | None = error
    seen: set[int] = set()
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # `.cause`: the original exception inside a Ray RayTaskError (a rank's write failed).
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(directory).free < _FULL_DISK_BYTES
    except OSError:
        return False


def _commit(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename `tmp` to `final`; if `final` exists, swap it out without ever losing both."""
    if not final.exists():
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return
    # Linux has no portable atomic directory swap, so: old aside, new in, old deleted. If the second
    # rename fails, put the old one back; if the process dies in between, _recover_interrupted_saves
    # moves it back at the next save or resume.
    step = final.name[len(CHECKPOINT_PREFIX):]
    old = final.parent / f".{CHECKPOINT_PREFIX}{step}.old-{os.getpid()}"
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted_saves(output_dir: pathlib.Path) -> None:
    """Repair what a killed save or prune left behind in `output_dir`.

    - `.old-*`: a complete earlier checkpoint moved aside for a re-save; if its `checkpoint-<step>`
      is missing (killed between the two renames), move it back, else delete it.
    - `.tmp-*` / `.deleting-*`: a save or a deletion that never finished; delete.
    """
    for entry in sorted(output_dir.iterdir()):
        match = _WORK_RE.match(entry.name)
        if not match or not entry.is_dir():
            continue
        step, kind = match.group(1), match.group(2)
        final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        if kind == "old" and not final.exists() and _is_complete(entry):
            logger.warning("restoring %s from %s (an earlier save was interrupted)", final, entry.name)
            os.replace(entry, final)
            _fsync_dir(output_dir)
        else:
            logger.info("removing %s left by an interrupted checkpoint save", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _prune(output_dir: pathlib.Path, *, keep: int, protect: pathlib.Path, identity: RunIdentity | None) -> None:
    others = [p for p in _complete_checkpoints(output_dir) if p != protect]
    if identity is not None:
        # Never another run's: claim_output_dir refused them at start, but a second writer may have appeared.
        others = [p for p in others if _belongs_to(p, identity)]
    # `protect` takes one of the `keep` slots; the rest go to the newest others.
    for path in others[: max(0, len(others) - (keep - 1))]:
        step = path.name[len(CHECKPOINT_PREFIX):]
        # Rename first: deleting in place could leave config.json + trainer_state.json without
        # weights, i.e. a directory that looks complete but is not.
        doomed = output_dir / f".{CHECKPOINT_PREFIX}{step}.deleting-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        logger.info("pruned %s (max_to_keep=%d)", path, keep)


def _fsync_tree(root: pathlib.Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(pathlib.Path(dirpath))


def _fsync_dir(path: pathlib.Path) -> None:
    # Makes the directory's entries (new files, renames) durable; not supported on every platform.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -------------------------------------------------------------------------------------- find/load


def _missing_parts(path: pathlib.Path) -> list[str]:
    """What `path` lacks to be a checkpoint a reader may use (empty list = complete)."""
    required = [TRAINER_STATE_FILE, f"{STUDENT_DIR}/config.json"]
    return [name for name in required if not (path / name).is_file()]


def _is_complete(path: pathlib.Path) -> bool:
    return path.is_dir() and not _missing_parts(path)


def _complete_checkpoints(output_dir: pathlib.Path) -> list[pathlib.Path]:
    """Complete `checkpoint-<int>` directories in `output_dir`, oldest step first."""
    if not output_dir.is_dir():
        return []
    found = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match and _is_complete(entry):
            found.append((int(match.group(1)), entry))
    return [path for _step, path in sorted(found)]


def find_latest_checkpoint(output_dir: str | os.PathLike) -> pathlib.Path | None:
    """The complete `checkpoint-<step>` in `output_dir` with the highest step, or None.

    Hidden work directories of interrupted saves and directories missing trainer_state.json or
    student/config.json are ignored.
    """
    checkpoints = _complete_checkpoints(pathlib.Path(output_dir))
    return checkpoints[-1] if checkpoints else None


# ----------------------------------------------------------------------------------- run identity


def checkpoint_identity(path: pathlib.Path) -> RunIdentity | None:
    """The run that wrote checkpoint `path` (derived from its config for checkpoints older than identities)."""
    return read_identity(path, IDENTITY_FILE, CONFIG_FILE)


def _belongs_to(path: pathlib.Path, identity: RunIdentity) -> bool:
    theirs = checkpoint_identity(path)
    return theirs is not None and theirs.fingerprint == identity.fingerprint


def _conflict_message(paths: list[pathlib.Path], identity: RunIdentity, what: str, fix: str) -> str:
    theirs = checkpoint_identity(paths[-1])
    names = ", ".join(p.name for p in paths)
    lines = [
        f"{what}: {paths[-1].parent.resolve()} holds {names} of another run.",
        f"  theirs:   {theirs.describe() if theirs else 'an unknown run (no run_identity.json or distill_config.json)'}",
        f"  this run: {identity.describe()}",
    ]
    if theirs is not None:
        lines += ["  differences:"] + [f"    {line}" for line in differences(identity, theirs)]
    lines.append(f"  {fix}")
    return "\n".join(lines)


def claim_output_dir(output_dir: str | os.PathLike, identity: RunIdentity, *, overwrite: bool = False) -> list[str]:
    """Make sure `output_dir` holds no checkpoint of another run before this one trains into it.

    Without `overwrite`, any complete checkpoint whose identity differs raises RunConflictError (nothing is
    touched). With `overwrite`, those checkpoints are deleted (renamed hidden first, like pruning) and their
    names returned. Checkpoints of this same run are kept: they are what `resume_from_checkpoint=true` uses.
    """
    output_dir = pathlib.Path(output_dir)
    if not output_dir.is_dir():
        return []
    _recover_interrupted_saves(output_dir)
    foreign = [p for p in _complete_checkpoints(output_dir) if not _belongs_to(p, identity)]
    if not foreign:
        return []
    if not overwrite:
        raise RunConflictError(
            _conflict_message(
                foreign,
                identity,
                "output_dir is in use by another run",
                "Nothing was changed. Choose a new output_dir, or set overwrite_output_dir=true to delete "
                "those checkpoints and start this run there.",
            )
        )
    for path in foreign:
        step = path.name[len(CHECKPOINT_PREFIX):]
        doomed = output_dir / f".{CHECKPOINT_PREFIX}{step}.deleting-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        logger.warning("overwrite_output_dir=true: deleted %s of another run", path)
    return [p.name for p in foreign]


def resolve_resume_checkpoint(
    resume_from_checkpoint: bool | str | os.PathLike | None,
    output_dir: str | os.PathLike,
    identity: RunIdentity | None = None,
) -> pathlib.Path | None:
    """Turn the `resume_from_checkpoint` setting into a checkpoint path, or None to start fresh.

    - False / None: None.
    - True: the newest complete checkpoint in `output_dir`; None (logged) if there is none, so a
      job that is retried from the start and one that crashed after a save use the same setting.
    - a path: that checkpoint. A relative path is taken from the working directory, or else from
      `output_dir` (so `checkpoint-100` works). Missing or incomplete raises CheckpointError.
    With an `identity`, a checkpoint written by another run raises RunConflictError instead of being used.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    output_dir = pathlib.Path(output_dir)
    if resume_from_checkpoint is True:
        if output_dir.is_dir():
            # A save killed between its two renames leaves the newest checkpoint aside; put it back
            # before looking, so resume does not silently fall back to an older step.
            _recover_interrupted_saves(output_dir)
        latest = find_latest_checkpoint(output_dir)
        if latest is not None and identity is not None:
            _check_same_run(latest, identity)
        if latest is None:
            logger.info("resume_from_checkpoint=true: no checkpoint in %s, starting from step 0", output_dir)
        else:
            logger.info("resuming from %s", latest)
        return latest

    path = pathlib.Path(resume_from_checkpoint)
    if not path.exists() and not path.is_absolute() and (output_dir / path).exists():
        path = output_dir / path
    if not path.exists():
        raise CheckpointError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r}: {path.resolve()} does not exist. "
            f"Point it at a {CHECKPOINT_PREFIX}<step> directory, or set resume_from_checkpoint=true "
            f"to resume from the newest checkpoint in output_dir ({output_dir})."
        )
    missing = _missing_parts(path)
    if missing:
        hint = ""
        latest = find_latest_checkpoint(path)
        if latest is not None:
            hint = f" It looks like an output_dir; did you mean {latest}?"
        raise CheckpointError(
            f"resume_from_checkpoint={str(resume_from_checkpoint)!r}: {path.resolve()} is not a complete "
            f"checkpoint (missing {', '.join(missing)}).{hint} Point it at a {CHECKPOINT_PREFIX}<step> "
            f"directory written by save_checkpoint, or set resume_from_checkpoint=true."
        )
    if identity is not None:
        _check_same_run(path, identity)
    logger.info("resuming from %s", path)
    return path


def _check_same_run(path: pathlib.Path, identity: RunIdentity) -> None:
    if not _belongs_to(path, identity):
        raise RunConflictError(
            _conflict_message(
                [path],
                identity,
                "refusing to resume from a checkpoint of another run",
                f"To start a new run from its weights, set student_pretrain={path / STUDENT_DIR} and "
                f"resume_from_checkpoint=false; to continue that run, use its own config.",
            )
        )


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The trainer state (`step`, data position, ...) of a complete checkpoint; CheckpointError if incomplete."""
    path = pathlib.Path(path)
    missing = _missing_parts(path)
    if missing:
        raise CheckpointError(
            f"cannot resume from {path.resolve()}: missing {', '.join(missing)}. "
            f"Choose another {CHECKPOINT_PREFIX}<step> directory or start fresh (resume_from_checkpoint=false)."
        )
    return json.loads((path / TRAINER_STATE_FILE).read_text())


def load_model_state(
    path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None, scheduler: Any, rank: int = 0
) -> None:
    """Restore optimizer, scheduler and this rank's RNG state from `path` (what `write_model_state` wrote),
    RNG last so nothing consumes random numbers after the restore. The weights are the caller's."""
    path = pathlib.Path(path)
    wanted = [rng_file(rank)] + [name for name, part in ((OPTIMIZER_FILE, optimizer), (SCHEDULER_FILE, scheduler))
                                 if part is not None]
    missing = [name for name in wanted if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"cannot resume from {path.resolve()}: missing {', '.join(missing)}. "
            f"Choose another {CHECKPOINT_PREFIX}<step> directory or start fresh (resume_from_checkpoint=false)."
        )
    # weights_only: a checkpoint directory is data, it must not be able to run code when loaded.
    # map_location cpu: load_state_dict moves optimizer state onto each parameter's device itself.
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True))
    restore_rng_state(torch.load(path / rng_file(rank), map_location="cpu", weights_only=True))


def load_checkpoint(path: str | os.PathLike, *, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
    """Restore optimizer, scheduler and RNG states from `path`; return the trainer_state dict.

    The student weights are not touched: build the model from `<path>/student` first (its
    construction may draw random numbers), then call this, so the RNG state restored here is the
    one the next training step sees.
    """
    path = pathlib.Path(path)
    missing = _missing_parts(path) + [
        name for name in (OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE) if not (path / name).is_file()
    ]
    if missing:
        raise CheckpointError(
            f"cannot resume from {path.resolve()}: missing {', '.join(missing)}. "
            f"Choose another {CHECKPOINT_PREFIX}<step> directory or start fresh (resume_from_checkpoint=false)."
        )
    trainer_state = read_trainer_state(path)
    load_model_state(path, optimizer=optimizer, scheduler=scheduler)
    return trainer_state
