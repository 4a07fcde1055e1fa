"""Where an experiment's work is: each run's state, last step and ETA, read from its folder and its log.

Snakemake's console says "N of M steps done"; a training job's own progress (step, loss, steps/s, ETA) is in its
log, one line per ``log_every`` steps (``ssl3d.engine``). ``ssl3d status results/<experiment>`` gathers both for
every run folder, so a user sees at a glance what is finished, what is training (and when it will end) and which
log to follow. Only the run folders are read; nothing is locked or changed, so it is safe while Snakemake runs.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pandas as pd

# the engine's progress line: "step 120/200  loss 0.4312  3.21 steps/s  ETA 25 s"
PROGRESS = re.compile(r"step (?P<step>\d+)/(?P<steps>\d+) .*?(?P<rate>[\d.]+) steps/s\s+ETA (?P<eta>\d+) s")
# what marks a run's stage as finished: the output its next stage reads
DONE = {"pretrain": ("pretrained.pt",), "finetune": ("per_case.csv", "model.pt")}
STATES = ["done", "trained", "training", "pending"]
COLUMNS = ["stage", "run", "state", "step", "steps", "steps_per_s", "eta_s", "log_age_s", "log"]


def _progress(log: Path) -> dict:
    """The last progress line of ``log`` (step, steps, rate, ETA), or {}."""
    if not log.is_file():
        return {}
    matches = list(PROGRESS.finditer(log.read_text(errors="replace")))
    if not matches:
        return {}
    last = matches[-1]
    return {"step": int(last["step"]), "steps": int(last["steps"]), "steps_per_s": float(last["rate"]),
            "eta_s": int(last["eta"])}


def run_states(results_dir: str | Path, now: float | None = None) -> pd.DataFrame:
    """One row per run folder of ``results_dir/{pretrain,finetune}``: ``state`` is ``done`` (pre-trained, or
    fine-tuned and evaluated), ``trained`` (model.pt, not yet evaluated), ``training`` (its log shows steps),
    or ``pending`` (configured, no step yet); with the last step, steps/s, ETA and how long ago the log was
    written (a training run whose log is old was probably interrupted: re-run snakemake to resume it)."""
    now = time.time() if now is None else now
    rows = []
    for stage, outputs in DONE.items():
        for folder in sorted(path for path in (Path(results_dir) / stage).glob("*") if path.is_dir()):
            log = folder / f"{stage}.log"
            progress = _progress(log)
            finished = [name for name in outputs if (folder / name).is_file()]
            state = ("done" if finished and finished[0] == outputs[0] else "trained" if finished
                     else "training" if progress else "pending")
            rows.append({"stage": stage, "run": folder.name, "state": state, **progress, "log": str(log),
                         "log_age_s": round(now - log.stat().st_mtime) if log.is_file() else None})
    return pd.DataFrame(rows, columns=COLUMNS)


def status_text(results_dir: str | Path) -> str:
    """Counts per stage and state, then each run in training with its step, ETA and log."""
    runs = run_states(results_dir)
    if runs.empty:
        return f"{results_dir}: no runs yet (run snakemake; dry run: snakemake -n --quiet rules)"
    counts = runs.groupby(["stage", "state"]).size().unstack(fill_value=0).reindex(columns=STATES, fill_value=0)
    lines = [f"{stage}: " + ", ".join(f"{int(n)} {state}" for state, n in counts.loc[stage].items() if n)
             for stage in DONE if stage in counts.index]
    for run in runs[runs.state == "training"].itertuples():
        lines.append(f"  {run.stage}/{run.run}: step {run.step:.0f}/{run.steps:.0f}, {run.steps_per_s:.2f} steps/s, "
                     f"ETA {run.eta_s:.0f} s (log written {run.log_age_s:.0f} s ago: {run.log})")
    return "\n".join(lines)
