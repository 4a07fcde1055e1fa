"""Distinct GPUs for jobs that run side by side on one machine.

Snakemake's ``resources: gpu=1`` bounds how many GPU jobs run at once (``--resources gpu=<number of GPUs>``), but
not which GPU each gets: every job would use device 0. So a job run with ``--device cuda`` claims its devices
itself before CUDA starts: it takes an exclusive ``fcntl.flock`` on one lock file per device, among the devices the
machine offers (``CUDA_VISIBLE_DEVICES``, else those ``nvidia-smi -L`` lists), and narrows its own
``CUDA_VISIBLE_DEVICES`` to the claimed ones, so a one-GPU job sees its GPU as ``cuda:0``. A multi-GPU job is
launched through ``python -m ssl3d.gpus N torchrun ...``, which claims N devices and then becomes ``torchrun``. The
kernel releases a lock when its process ends, however it ends (an error, a kill, a lost node), so a failed job never
leaves a device claimed and its restart claims afresh; no state to clean up. A job that finds every device claimed
waits for one.

Locks live in ``$SSL3D_GPU_LOCKS`` (default: ``ssl3d-gpus`` in the temporary folder), one folder per machine.
Hand-written: neither Snakemake nor torch assigns devices to independent local processes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def offered_devices() -> list[str]:
    """The machine's GPU ids this process may use: ``CUDA_VISIBLE_DEVICES``, else every GPU ``nvidia-smi`` lists
    (asking torch would start CUDA, after which the devices can no longer be narrowed)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [device.strip() for device in visible.split(",") if device.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


def claim_gpus(count: int = 1, lock_dir: str | Path | None = None, poll_s: float = 1.0) -> list[str]:
    """Claim ``count`` of :func:`offered_devices` for this process (waiting while too few are free) and make them
    the only visible ones; returns their ids ([] when the machine offers no GPU list to choose from). Fewer
    offered than ``count`` is an error: the job's processes would ask for devices that do not exist."""
    devices = offered_devices()
    if devices and len(devices) < count:
        raise ValueError(f"this job asks for {count} GPUs and the machine offers {len(devices)} "
                         f"({','.join(devices)}: CUDA_VISIBLE_DEVICES, else nvidia-smi -L); give its rule fewer "
                         "(set-resources: pretrain: gpu: N in the profile)")
    if not devices or len(devices) == count:
        return devices
    folder = Path(lock_dir or os.environ.get("SSL3D_GPU_LOCKS") or Path(tempfile.gettempdir()) / "ssl3d-gpus")
    folder.mkdir(parents=True, exist_ok=True)
    claimed: dict[str, int] = {}
    waited = False
    while True:
        for device in devices:
            if len(claimed) == count:
                break
            fd = os.open(folder / f"gpu{device}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.set_inheritable(fd, True)  # held on by a command this process becomes (main) and its children
            claimed[device] = fd
        if len(claimed) == count:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(claimed)
            log.info("claimed GPU %s of %s (locks in %s)", ",".join(claimed), ",".join(devices), folder)
            return list(claimed)
        for fd in claimed.values():  # not enough free: give back what was taken, so two jobs cannot deadlock
            os.close(fd)
        claimed.clear()
        if not waited:
            log.info("fewer than %d of the GPUs %s are free; waiting", count, ",".join(devices))
            waited = True
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    """``python -m ssl3d.gpus N command ...``: claim N GPUs, then become ``command`` (a multi-GPU ``torchrun``
    job), which holds the claim until it and its children end."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        claim_gpus(int(argv[0]))
    except ValueError as err:
        sys.exit(f"ssl3d.gpus: {err}")
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main()
