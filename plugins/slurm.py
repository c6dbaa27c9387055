"""Slurm as the session manager: ``--manager slurm`` runs Jupyter as a batch job.

Where a cluster's login node is for logging in, not for computing, Jupyter runs
as a job on a compute node: nbtunnel submits its constant job script to
``sbatch --parsable`` on stdin (nothing is uploaded, the options are argv words),
follows the job with ``squeue``, and tunnels through the login node to the
address and port that the job published.  ``--terminate`` shuts Jupyter down
through its API, then ``scancel``s the job.  Needs sbatch, squeue and scancel on
the login node's PATH and a home directory shared with the compute nodes.
"""

import re

import nbtunnel

# squeue's columns, in the order of FIELDS: id, state, reason, node list, time left,
# expected start (N/A until the scheduler has one), elapsed.
FORMAT = "%i|%T|%r|%N|%L|%S|%M"
FIELDS = ["job_id", "state", "reason", "node", "time_left", "expected_start", "elapsed"]
SHORT_JOB = 10  # minutes: shorter jobs get no default --signal (it could come at once)


def job_minutes(text):
    """Minutes of a Slurm time (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S), or None."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", (text or "").strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        return days * 1440 + a * 60 + (b or 0) + (c or 0) / 60
    if c is not None:  # H:M:S
        return a * 60 + b + c / 60
    return a + (b or 0) / 60  # M or M:S


def Opt(flag, help, metavar="VALUE", **kw):
    """A Slurm option of the session; its value goes to sbatch as one word."""
    return nbtunnel.Option(flag, help, metavar=metavar, **kw)


class Slurm(nbtunnel.BatchManager):
    """Slurm: Jupyter as a batch job on a compute node, reached through the login node."""

    name = "slurm"
    program = "sbatch"
    default_timeout = 900.0
    options = [
        Opt("--partition", "partition (sbatch --partition)", "NAME"),
        Opt("--time", "time limit (sbatch --time, e.g. 8:00:00)", "TIME"),
        Opt("--cpus", "CPUs (sbatch --cpus-per-task)", "N"),
        Opt("--mem", "memory (sbatch --mem, e.g. 16G)", "SIZE"),
        Opt("--gres", "generic resources (sbatch --gres, e.g. gpu:1)"),
        Opt("--account", "account to charge (sbatch --account)", "NAME"),
        Opt("--qos", "quality of service (sbatch --qos)", "NAME"),
        Opt("--constraint", "node features (sbatch --constraint)"),
        Opt("--sbatch-arg", "one more sbatch argument, as one word "
            "(--sbatch-arg=--exclusive); repeatable", "ARG", multiple=True),
        Opt("--signal", "signal before the time limit, so that Jupyter "
            "shuts down cleanly (sbatch --signal; default B:TERM@120 for jobs of %d minutes "
            "or more; none: no signal)" % SHORT_JOB, "[B:]SIG[@SECONDS]"),
    ]
    FLAGS = [("partition", "--partition"), ("time", "--time"), ("cpus", "--cpus-per-task"),
             ("mem", "--mem"), ("gres", "--gres"), ("account", "--account"), ("qos", "--qos"),
             ("constraint", "--constraint")]

    waiting = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
               "RESV_DEL_HOLD", "SUSPENDED", "STOPPED", "RESIZING")
    running = ("RUNNING",)
    ending = ("COMPLETING", "SIGNALING", "STAGE_OUT")
    # Reasons that never clear by themselves: the request is beyond what the cluster has.
    fatal_reasons = ("PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit",
                     "BadConstraints", "DependencyNeverSatisfied", "InvalidAccount",
                     "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed")
    reason_text = {
        "PartitionConfig": "the request (CPUs, memory, GPUs) exceeds what the partition's "
                           "nodes have",
        "PartitionNodeLimit": "more nodes than the partition allows",
        "PartitionTimeLimit": "the time limit exceeds the partition's (see sinfo)",
        "BadConstraints": "no node has the requested features",
        "DependencyNeverSatisfied": "a dependency can never be satisfied",
    }
    job_id_re = r"\A\s*([0-9]+)"  # --parsable prints ID or ID;CLUSTER
    gone_re = r"Invalid job id"
    job_env = {"job": "SLURM_JOB_ID", "submit_host": "SLURM_SUBMIT_HOST",
               "node": "SLURMD_NODENAME"}
    output_escapes = {"%": "%%"}  # sbatch --output expands %j and the like
    state_format = {"sep": "|", "fields": FIELDS}

    def submit(self):
        """The job script comes on stdin; --parsable prints just the id."""
        return ["sbatch", "--parsable", "--job-name", "@NAME@", "--output", "@OUTPUT@"]

    def job_options(self, args):
        """Each option one word, --flag=VALUE, so that no value can pass for an option."""
        words = ["%s=%s" % (flag, getattr(args, dest)) for dest, flag in self.FLAGS
                 if getattr(args, dest, None) is not None]
        signal = getattr(args, "signal", None)
        if signal is None:
            minutes = job_minutes(getattr(args, "time", None))
            signal = "B:TERM@120" if minutes is None or minutes >= SHORT_JOB else "none"
        if signal.lower() != "none":
            words.append("--signal=" + signal)
        return words + list(getattr(args, "sbatch_arg", None) or ())

    def state(self):
        """One line, any state (a job that ended stays listed a little while)."""
        return ["squeue", "--noheader", "--states=all", "--jobs", "@JOB@", "--format", FORMAT]

    def find(self):
        """The user's waiting and running jobs of that name."""
        return ["squeue", "--noheader", "--user", "@USER@", "--name", "@NAME@",
                "--format", FORMAT]

    def cancel(self):
        """scancel ends it whatever its state."""
        return ["scancel", "@JOB@"]


nbtunnel.register(Slurm())
