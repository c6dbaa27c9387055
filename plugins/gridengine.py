"""Grid Engine as the session manager: ``--manager gridengine`` runs Jupyter as a batch job.

For clusters run by Son of Grid Engine, Univa/Altair Grid Engine or the old Sun Grid
Engine (``qsub``, ``qstat``, ``qdel``): nbtunnel submits its constant job script to
``qsub -terse`` on stdin (nothing is uploaded, each option is one argv word), follows
the job with ``qstat -xml`` (and ``qstat -j`` for the scheduler's reason while it
waits), and tunnels through the login node to the address and port that the job
published.  ``--terminate`` shuts Jupyter down through its API, then ``qdel``s the job.

Assumptions about the cell: qsub, qstat and qdel on the login node's PATH with the
cell's settings (SGE_ROOT, SGE_CELL: sites source ``settings.sh`` from the login
profile), the home directory shared with the execution hosts, and ``-w e`` allowed
(qsub then refuses a job that no queue of the cell could ever run, in Grid Engine's
own words, instead of leaving it waiting for ever).
"""

import nbtunnel

# qstat -xml: each job is a <job_list> element; the children used, by our names.
FIELDS = {
    "JB_job_number": "job_id",
    "JB_name": "name",
    "state": "state",
    "queue_name": ["node", r"@(.+)"],  # the queue instance QUEUE@HOST
    "hard_request@h_rt": "time_limit",  # seconds
    "JAT_start_time": "start_time",
}
QSTAT = ["qstat", "-xml", "-r", "-u", "@USER@"]


def Opt(flag, help, metavar="VALUE", **kw):
    """A Grid Engine option of the session; each goes to qsub as its own argv word."""
    return nbtunnel.Option(flag, help, metavar=metavar, **kw)


class GridEngine(nbtunnel.BatchManager):
    """Grid Engine: Jupyter as a batch job on an execution host, reached through the login node."""

    name = "gridengine"
    program = "qsub"
    default_timeout = 900.0
    options = [  # one line each in --help
        Opt("--queue", "queue (qsub -q)", "NAME"),
        Opt("--runtime", "run time limit (qsub -l h_rt=, e.g. 8:00:00)", "TIME"),
        Opt("--pe", "parallel environment for --slots (default smp)", "NAME"),
        Opt("--slots", "slots (qsub -pe PE N)", "N"),
        Opt("--memory", "memory per slot (qsub -l h_vmem=, or --mem-complex)", "SIZE"),
        Opt("--mem-complex", "the site's memory complex (default h_vmem)", "NAME"),
        Opt("--project", "project to charge (qsub -P)", "NAME"),
        Opt("--qsub-arg", "one more qsub argument, one word; repeatable", "ARG",
            multiple=True),
    ]

    waiting = ("qw", "hqw", "hRwq", "Rq", "t", "Rt", "s", "ts", "S", "tS", "T", "tT",
               "Rs", "Rts", "RS", "RtS", "RT", "RtT", "Eqw", "Ehqw", "EhRqw")
    running = ("r", "Rr")
    ending = ("dr", "dt", "dRr", "dRt", "ds", "dS", "dT", "dRs", "dRS", "dRT", "dqw",
              "dhqw", "dEqw")
    # States of a waiting job that never clear by themselves: E, the job hit an error
    # (a bad working directory, an unwritable output path) and waits for qmod -cj.
    fatal_reasons = ("Eqw", "Ehqw", "EhRqw")
    reason_text = {"Eqw": "the job is in error state (see qstat -j JOB)",
                   "Ehqw": "the job is in error state (see qstat -j JOB)",
                   "EhRqw": "the job is in error state (see qstat -j JOB)"}
    job_id_re = r"\A\s*([0-9]+)"  # -terse prints ID (ID.TASKS for an array job)
    gone_re = ""  # qstat -u lists the user's jobs: a forgotten one is just not listed
    job_env = {"job": "JOB_ID", "submit_host": "SGE_O_HOST", "node": "HOSTNAME"}
    output_escapes = {}  # qsub -o expands $JOB_ID, $HOME and the like; ours has no $
    state_format = {"xml": "job_list", "fields": FIELDS}
    # qstat -j: the first error reason, else the scheduler's first message (it has them
    # when the site keeps schedd_job_info, else says that it is turned off).
    reason_re = r"^(?:error reason\s+\d+|scheduling info):\s+(.+)$"

    def submit(self):
        """The job script comes on stdin; -terse prints just the id.  -V hands the login
        environment to the job, as sbatch does (Grid Engine does not by default); -w e
        refuses a job that no queue could ever run; -S /bin/sh whatever the queue's shell."""
        return ["qsub", "-terse", "-V", "-w", "e", "-S", "/bin/sh", "-j", "y", "-r", "n",
                "-N", "@NAME@", "-o", "@OUTPUT@"]

    def job_options(self, args):
        """Each option its own words (-l h_rt=VALUE is two), so that no value can pass
        for an option: qsub takes a word after -q, -l, -pe, -P as that option's value."""
        val = lambda dest: getattr(args, dest, None)  # noqa: E731
        words = []
        if val("queue") is not None:
            words += ["-q", val("queue")]
        resources = []
        if val("runtime") is not None:
            resources.append("h_rt=" + val("runtime"))
        if val("memory") is not None:
            resources.append("%s=%s" % (val("mem_complex") or "h_vmem", val("memory")))
        for resource in resources:
            words += ["-l", resource]
        if val("slots") is not None or val("pe") is not None:
            words += ["-pe", val("pe") or "smp", val("slots") or "1"]
        if val("project") is not None:
            words += ["-P", val("project")]
        return words + list(val("qsub_arg") or ())

    def state(self):
        """Every job of the user as XML (qstat -j gives no state letters)."""
        return list(QSTAT)

    def find(self):
        """The same list: the core keeps the jobs named like the session's."""
        return list(QSTAT)

    def reason(self):
        """Why a job waits: qstat -j's error reason or scheduling info."""
        return ["qstat", "-j", "@JOB@"]

    def cancel(self):
        """qdel ends it whatever its state."""
        return ["qdel", "@JOB@"]


nbtunnel.register(GridEngine())
