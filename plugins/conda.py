"""conda environments: ``--conda ENV`` activates ENV before Jupyter starts.

Works with whichever the remote has: conda (also mamba 1.x installs, which
include conda), mamba 2.x or micromamba.  It is found through $CONDA_EXE,
$MAMBA_EXE, the login PATH, or the usual install places (~/miniforge3,
~/miniconda3, ~/anaconda3, ~/mambaforge, /opt/conda, ~/.local/bin/micromamba,
~/micromamba/bin/micromamba), since `conda init` often sets up only
interactive shells.  Activation is the documented one: the tool's shell hook,
then `conda activate ENV` (`micromamba activate ENV`).  ENV may be a name or a
path.  Under csh/tcsh only conda itself is supported (`conda shell.csh
activate`).  ENV travels as data in $NBT_CONDA, never as shell text.
"""

import nbtunnel

# Written once in POSIX sh and run by every shell family (as `sh -c "$NBT_CONDA_FIND"`):
# prints the path of the first conda-like tool found.
FIND = r"""
for x in "${CONDA_EXE:-}" "${MAMBA_EXE:-}" conda mamba micromamba \
    "$HOME/miniforge3/bin/conda" "$HOME/miniconda3/bin/conda" "$HOME/anaconda3/bin/conda" \
    "$HOME/mambaforge/bin/conda" /opt/conda/bin/conda "$HOME/.local/bin/micromamba" \
    "$HOME/micromamba/bin/micromamba"; do
    [ -n "$x" ] || continue
    case $x in
        */*) [ -x "$x" ] && { echo "$x"; exit 0; } ;;
        *) p=$(command -v "$x") && case $p in /*) echo "$p"; exit 0 ;; esac ;;
    esac
done
exit 1
"""

NONE = "nbtunnel: --conda: no conda, mamba or micromamba found on this host"
FAIL = "nbtunnel: --conda: cannot activate the environment $NBT_CONDA"

SH = r"""nbt_exe=$(sh -c "$NBT_CONDA_FIND") || { echo "%(none)s" >&2; exit 1; }
case ${nbt_exe##*/} in
    conda) eval "$("$nbt_exe" shell.posix hook)" && conda activate "$NBT_CONDA" ;;
    *) eval "$("$nbt_exe" shell hook -s posix)" && "${nbt_exe##*/}" activate "$NBT_CONDA" ;;
esac || { echo "%(fail)s" >&2; exit 1; }""" % dict(none=NONE, fail=FAIL)

FISH = r"""set -l nbt_exe (sh -c "$NBT_CONDA_FIND"); or begin; echo "%(none)s" >&2; exit 1; end
set -l nbt_name (string replace -r '.*/' '' -- $nbt_exe)
if test "$nbt_name" = conda
    $nbt_exe shell.fish hook | source; and conda activate $NBT_CONDA
else
    $nbt_exe shell hook -s fish | source; and $nbt_name activate $NBT_CONDA
end
or begin; echo "%(fail)s" >&2; exit 1; end""" % dict(none=NONE, fail=FAIL)

CSH = r"""set nbt_exe = "`sh -c $NBT_CONDA_FIND:q`"
if ( "$nbt_exe" == "" ) then
echo "%(none)s" > /dev/stderr
exit 1
endif
if ( "$nbt_exe:t" != "conda" ) then
echo "nbtunnel: --conda under csh/tcsh needs conda itself, not $nbt_exe:t" > /dev/stderr
exit 1
endif
eval "`$nbt_exe:q shell.csh activate $NBT_CONDA:q`"
if ( ! $?CONDA_DEFAULT_ENV ) setenv CONDA_DEFAULT_ENV ""
if ( "$CONDA_DEFAULT_ENV" != "$NBT_CONDA" ) then
echo "%(fail)s" > /dev/stderr
exit 1
endif""" % dict(none=NONE, fail=FAIL.replace("$NBT_CONDA", "$NBT_CONDA:q"))


class Conda(nbtunnel.ShellEnvironment):
    """--conda ENV: activate a conda/mamba/micromamba environment."""

    name = "conda"
    order = 40

    def add_arguments(self, parser):
        """One option, also accepted as `conda = ENV` in the config file."""
        parser.add_argument("--conda", metavar="ENV",
                            help="activate this conda/mamba/micromamba environment (name or path)")
        nbtunnel.CONFIG_KEYS["conda"] = ("conda", str)

    def steps(self, args):
        """Find the tool, run its shell hook, activate ENV; fail loudly if any of it fails."""
        if not getattr(args, "conda", None):
            return []
        return [dict(vars={"NBT_CONDA": args.conda, "NBT_CONDA_FIND": FIND},
                     sh=SH, fish=FISH, csh=CSH)]


nbtunnel.register(Conda())
