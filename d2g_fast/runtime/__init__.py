"""Running on shared machines and clusters: preemption signals, one writer per folder, full and
read-only disks, checksummed checkpoints. Every ``d2g`` command that writes a folder uses these
helpers; the exit statuses below are the one source of the codes documented in the README.

    signals     SIGTERM/SIGUSR1 (configurable) -> finish the step or shard, save, exit REQUEUE
    lock        a lock file (pid, host) per written folder; stale locks are taken over
    diskspace   one message for full and read-only disks (path, bytes needed and free)
    checksums   sha256 + size records of the files in a folder, and their verification
    ranks       run a step on rank 0 and give every rank its result (or its error)
    verify      ``d2g verify`` of run folders, exported students and lpips checkpoints
"""
from __future__ import annotations

# Exit statuses of every d2g command (sysexits.h names where one fits).
EXIT_BAD_INPUT = 2   # an argument is wrong (the message names the flag)
EXIT_LOCKED = 73     # the output folder is in use by another command (EX_CANTCREAT)
EXIT_DISK = 74       # the disk is full or read-only (EX_IOERR)
EXIT_REQUEUE = 75    # preempted: the state is saved, rerun the same command (EX_TEMPFAIL)
